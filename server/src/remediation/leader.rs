//! Leader election: on PostgreSQL one replica holds an advisory lock and alone remediates.

/// PostgreSQL advisory lock key naming the remediation leader.
const LEADER_LOCK_KEY: i64 = 0x0076_6d68_636c_6561;

/// Who may act: always this process on SQLite, the lock holder on PostgreSQL.
pub enum Leader {
    /// SQLite: one process by construction.
    Always,
    Postgres {
        url: String,
        conn: Option<Box<diesel_async::AsyncPgConnection>>,
    },
    /// Leadership switched by a test.
    #[cfg(test)]
    Manual(std::sync::Arc<std::sync::atomic::AtomicBool>),
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

impl Leader {
    /// True while this process holds the leader lock; takes it when free.
    pub async fn check(&mut self) -> bool {
        use diesel_async::{AsyncConnection, RunQueryDsl};
        match self {
            Leader::Always => true,
            #[cfg(test)]
            Leader::Manual(flag) => {
                std::sync::atomic::AtomicBool::load(flag, std::sync::atomic::Ordering::Acquire)
            }
            Leader::Postgres { url, conn } => {
                if let Some(c) = conn.as_mut() {
                    // The session lock lives as long as this connection does.
                    if diesel::sql_query("SELECT TRUE AS locked")
                        .get_result::<Locked>(c)
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                    tracing::warn!("lost the remediation leader connection");
                    *conn = None;
                }
                let Ok(mut c) = diesel_async::AsyncPgConnection::establish(url).await else {
                    return false;
                };
                let got = diesel::sql_query(format!(
                    "SELECT pg_try_advisory_lock({LEADER_LOCK_KEY}) AS locked"
                ))
                .get_result::<Locked>(&mut c)
                .await
                .map(|l| l.locked)
                .unwrap_or(false);
                if got {
                    tracing::info!("this instance now leads remediation");
                    *conn = Some(Box::new(c));
                }
                got
            }
        }
    }
}

impl Leader {
    pub fn for_database(is_postgres: bool, url: &str) -> Self {
        if is_postgres {
            Leader::Postgres {
                url: url.to_owned(),
                conn: None,
            }
        } else {
            Leader::Always
        }
    }
}
