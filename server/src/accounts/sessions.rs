//! Browser sessions in our database, so they survive restarts and every replica sees a
//! logout at once. Rows are keyed by the SHA-256 of the session id.

use crate::auth::hash_token;
use crate::db::{Db, people};
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, SessionStore};

/// Key under which a signed-in session keeps its [`super::SessionUser`].
pub const USER_KEY: &str = "user";

#[derive(Clone)]
pub struct DbSessionStore {
    db: Db,
}

impl std::fmt::Debug for DbSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbSessionStore")
    }
}

impl DbSessionStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn backend(err: impl std::fmt::Display) -> session_store::Error {
    session_store::Error::Backend(err.to_string())
}

fn id_hash(id: &Id) -> String {
    hash_token(&id.to_string())
}

/// The signed-in user (so a password change can end their sessions) and the data as JSON.
fn columns(record: &Record) -> session_store::Result<(Option<i64>, String)> {
    let data = serde_json::to_string(&record.data)
        .map_err(|e| session_store::Error::Encode(e.to_string()))?;
    let user_id = record
        .data
        .get(USER_KEY)
        .and_then(|u| u.get("user_id"))
        .and_then(serde_json::Value::as_i64);
    Ok((user_id, data))
}

fn epoch_ms(at: time::OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl SessionStore for DbSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let mut conn = self.db.conn().await.map_err(backend)?;
        // 128 random bits: a collision is practically impossible, but never reuse one.
        while people::session_exists(&mut conn, &id_hash(&record.id))
            .await
            .map_err(backend)?
        {
            record.id = Id::default();
        }
        let (user_id, data) = columns(record)?;
        people::insert_session(
            &mut conn,
            &id_hash(&record.id),
            user_id,
            &data,
            epoch_ms(record.expiry_date),
        )
        .await
        .map_err(backend)
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let (user_id, data) = columns(record)?;
        let mut conn = self.db.conn().await.map_err(backend)?;
        people::update_session(
            &mut conn,
            &id_hash(&record.id),
            user_id,
            &data,
            epoch_ms(record.expiry_date),
        )
        .await
        .map_err(backend)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let mut conn = self.db.conn().await.map_err(backend)?;
        let Some((data, expires_ms)) =
            people::load_session(&mut conn, &id_hash(id), crate::now_ms())
                .await
                .map_err(backend)?
        else {
            return Ok(None);
        };
        let data =
            serde_json::from_str(&data).map_err(|e| session_store::Error::Decode(e.to_string()))?;
        let expiry_date = time::OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(expires_ms).saturating_mul(1_000_000),
        )
        .map_err(|e| session_store::Error::Decode(e.to_string()))?;
        Ok(Some(Record {
            id: *id,
            data,
            expiry_date,
        }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let mut conn = self.db.conn().await.map_err(backend)?;
        people::delete_session(&mut conn, &id_hash(id))
            .await
            .map_err(backend)
    }
}
