//! Storage: one code path over SQLite and PostgreSQL through diesel-async.

mod batch;
pub mod history;
pub mod identity;
pub mod incidents;
pub mod notify;
pub mod people;
pub mod reports;
pub mod schema;
pub mod store;
pub mod stored;

use diesel::migration::{MigrationSource, MigrationVersion};
use diesel::result::Error as DieselError;
use diesel::sqlite::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use std::sync::Arc;
use std::time::Duration;

pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

/// Applied to every SQLite connection: WAL lets readers run beside the writer, NORMAL is
/// durable across process crashes in WAL mode, and the busy timeout absorbs short lock waits.
/// The busy timeout comes first so that switching to WAL already waits for a lock.
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;";

/// Arbitrary constant naming the migration lock among PostgreSQL advisory locks.
const MIGRATION_LOCK_KEY: i64 = 0x0076_6d68_636d_6967;

/// Storage failures, split by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(#[from] DieselError),
    #[error("migration failed: {0}")]
    Migration(String),
}

impl DbError {
    /// True for failures that a retry may cure (connection loss, pool exhaustion, locks, a
    /// full disk).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Unavailable(_) => true,
            DbError::Query(DieselError::DatabaseError(kind, info)) => {
                let message = info.message();
                matches!(kind, diesel::result::DatabaseErrorKind::ClosedConnection)
                    || message.contains("database is locked")
                    // SQLite's SQLITE_FULL and SQLITE_IOERR, PostgreSQL's disk_full.
                    || message.contains("database or disk is full")
                    || message.contains("disk I/O error")
                    || message.contains("No space left on device")
            }
            DbError::Query(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

/// The connection pool for whichever backend `DATABASE_URL` selects.
#[derive(Clone)]
pub enum Db {
    Postgres(Pool<AsyncPgConnection>),
    /// SQLite allows one writer at a time: the mutex serialises this process's write
    /// transactions so none fails on a lock upgrade.
    Sqlite(Pool<SqliteConn>, Arc<tokio::sync::Mutex<()>>),
}

/// One pooled connection of either backend.
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived; boxing would add an allocation per checkout"
)]
pub enum Conn {
    Postgres(Object<AsyncPgConnection>),
    Sqlite(Object<SqliteConn>),
}

/// Held for the duration of a write transaction (a no-op on PostgreSQL).
pub struct WriteGuard(
    #[expect(dead_code, reason = "held only for its drop")]
    Option<tokio::sync::OwnedMutexGuard<()>>,
);

impl Conn {
    /// The connection itself, whether the caller holds it or a `&mut` to it.
    pub fn as_backend(&mut self) -> &mut Conn {
        self
    }
}

/// Runs `$body` in a write transaction on whichever connection `$conn` holds. On SQLite the
/// transaction takes the write lock as it begins (`BEGIN IMMEDIATE`): a deferred one that
/// reads first fails at once ("database is locked", no busy timeout waits it out) when
/// another connection writes between its read and its write, as a sign-in's or an audit
/// entry's may.
#[macro_export]
macro_rules! write_transaction {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn.as_backend() {
            $crate::db::Conn::Postgres(pooled) => {
                let $c: &mut diesel_async::AsyncPgConnection = &mut *pooled;
                diesel_async::AsyncConnection::transaction::<_, $crate::db::DbError, _>(
                    $c,
                    async |$c| $body,
                )
                .await
            }
            $crate::db::Conn::Sqlite(pooled) => {
                let $c: &mut $crate::db::SqliteConn = &mut *pooled;
                $c.immediate_transaction::<_, $crate::db::DbError, _>(async |$c| $body)
                    .await
            }
        }
    };
}

/// Runs the same diesel-async code against whichever connection type `$conn` holds.
#[macro_export]
macro_rules! with_conn {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn.as_backend() {
            $crate::db::Conn::Postgres(pooled) => {
                let $c: &mut diesel_async::AsyncPgConnection = &mut *pooled;
                $body
            }
            $crate::db::Conn::Sqlite(pooled) => {
                let $c: &mut $crate::db::SqliteConn = &mut *pooled;
                $body
            }
        }
    };
}

impl Db {
    /// Connects, creating the SQLite file and its folder when needed, and runs migrations.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, DbError> {
        Ok(Self::connect_migrated(url, pool_size).await?.0)
    }

    /// `connect`, also naming the migrations it applied, in order (empty: up to date).
    pub async fn connect_migrated(
        url: &str,
        pool_size: usize,
    ) -> Result<(Self, Vec<String>), DbError> {
        let (db, applied) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let applied = run_postgres_migrations(url).await?;
            let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
            let pool = Pool::builder(manager)
                .max_size(pool_size)
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(Duration::from_secs(5)))
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| DbError::Unavailable(e.to_string()))?;
            (Db::Postgres(pool), applied)
        } else {
            let path = sqlite_path(url);
            if let Some(parent) = std::path::Path::new(&path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)
                    .map_err(|e| DbError::Unavailable(format!("{}: {e}", parent.display())))?;
            }
            let mut config = ManagerConfig::<SqliteConn>::default();
            config.custom_setup = Box::new(|url| {
                let url = url.to_owned();
                Box::pin(async move {
                    let mut conn = SqliteConn::establish(&url).await?;
                    conn.batch_execute(SQLITE_PRAGMAS)
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let manager = AsyncDieselConnectionManager::<SqliteConn>::new_with_config(path, config);
            let pool = Pool::builder(manager)
                .max_size(pool_size)
                .wait_timeout(Some(Duration::from_secs(5)))
                .create_timeout(Some(Duration::from_secs(5)))
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .map_err(|e| DbError::Unavailable(e.to_string()))?;
            let db = Db::Sqlite(pool, Arc::new(tokio::sync::Mutex::new(())));
            let applied = db.run_sqlite_migrations().await?;
            (db, applied)
        };
        Ok((db, applied))
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgresql",
            Db::Sqlite(..) => "sqlite",
        }
    }

    /// Takes a connection from the pool.
    pub async fn conn(&self) -> Result<Conn, DbError> {
        match self {
            Db::Postgres(pool) => pool
                .get()
                .await
                .map(Conn::Postgres)
                .map_err(|e| DbError::Unavailable(e.to_string())),
            Db::Sqlite(pool, _) => pool
                .get()
                .await
                .map(Conn::Sqlite)
                .map_err(|e| DbError::Unavailable(e.to_string())),
        }
    }

    /// Takes a connection for a write transaction, with this process's write turn on SQLite.
    pub async fn write_conn(&self) -> Result<(Conn, WriteGuard), DbError> {
        let guard = match self {
            Db::Postgres(_) => None,
            Db::Sqlite(_, lock) => Some(lock.clone().lock_owned().await),
        };
        Ok((self.conn().await?, WriteGuard(guard)))
    }

    async fn run_sqlite_migrations(&self) -> Result<Vec<String>, DbError> {
        let Conn::Sqlite(mut conn) = self.conn().await? else {
            return Ok(Vec::new());
        };
        conn.spawn_blocking(|c| {
            c.run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|applied| {
                    migration_names::<diesel::sqlite::Sqlite>(SQLITE_MIGRATIONS, &applied)
                })
                .map_err(DieselError::QueryBuilderError)
        })
        .await
        .map_err(|e| DbError::Migration(e.to_string()))
    }
}

/// Runs embedded PostgreSQL migrations under an advisory lock so replicas starting together
/// do not race each other.
async fn run_postgres_migrations(url: &str) -> Result<Vec<String>, DbError> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| DbError::Unavailable(e.to_string()))?;
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await?;
    // The harness drives async calls with block_on, which must not run on a runtime worker.
    tokio::task::spawn_blocking(move || {
        let mut harness = diesel_async::AsyncMigrationHarness::new(conn);
        let result = harness
            .run_pending_migrations(POSTGRES_MIGRATIONS)
            .map(|applied| migration_names::<diesel::pg::Pg>(POSTGRES_MIGRATIONS, &applied))
            .map_err(|e| DbError::Migration(e.to_string()));
        // Closing the connection releases the advisory lock.
        drop(harness.into_inner());
        result
    })
    .await
    .map_err(|e| DbError::Migration(e.to_string()))?
}

/// The folder names of the applied migrations (`2026-11-27-000001_initial`), which say more
/// than the bare versions the harness returns.
fn migration_names<DB: diesel::backend::Backend>(
    source: EmbeddedMigrations,
    applied: &[MigrationVersion<'_>],
) -> Vec<String> {
    let known = MigrationSource::<DB>::migrations(&source).unwrap_or_default();
    applied
        .iter()
        .map(|version| {
            known
                .iter()
                .find(|m| m.name().version() == *version)
                .map_or_else(|| version.to_string(), |m| m.name().to_string())
        })
        .collect()
}

/// Turns `sqlite://path` (or a bare path) into the path SQLite opens.
pub fn sqlite_path(url: &str) -> String {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url)
        .to_owned()
}
