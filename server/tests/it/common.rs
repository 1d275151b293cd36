//! Test harness: fresh databases on both backends, in-process servers, HTTP helpers.

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use serde_json::{Value, json};
use server::RunningServer;
use server::config::Config;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const AGENT_TOKEN: &str = "agent-test-token-0123456789";
pub const ADMIN_TOKEN: &str = "admin-test-token-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    };
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A database nobody else uses: a new SQLite file or a new PostgreSQL database.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
}

pub fn admin_pg_url() -> String {
    std::env::var("TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub async fn fresh_db(backend: Backend) -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("test.db").display()),
        Backend::Postgres => {
            let admin = admin_pg_url();
            let template = pg_template(&admin).await;
            // The process id lets scripts/test.sh drop only what finished runs left behind.
            let name = format!(
                "vmhc_t_{}_{}",
                std::process::id(),
                dir.path()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_lowercase()
                    .replace(['.', '-'], "_")
            );
            let mut conn = AsyncPgConnection::establish(&admin).await.unwrap();
            clone_pg_database(&mut conn, &name, template).await;
            pg_database_url(&admin, &name)
        }
    };
    TestDb { url, dir }
}

/// `admin` with its database name replaced by `name`.
fn pg_database_url(admin: &str, name: &str) -> String {
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// How long template preparation and cloning may wait for stray sessions to leave.
const PG_TEMPLATE_DEADLINE: Duration = Duration::from_secs(30);

/// The migrated template of this test process, made on first use and shared by every test
/// in the process (each test runs on its own runtime; the cell does not depend on one).
static PG_TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn pg_template(admin: &str) -> &'static str {
    PG_TEMPLATE
        .get_or_init(|| create_pg_template(admin))
        .await
        .as_str()
}

/// Creates `vmhc_tmpl_<pid>` and migrates it through the server's own start-up path, then
/// closes it to connections: PostgreSQL clones a database only while nobody is connected.
/// The process id keeps concurrent runs from sharing or dropping each other's template.
async fn create_pg_template(admin: &str) -> String {
    let name = format!("vmhc_tmpl_{}", std::process::id());
    let mut conn = AsyncPgConnection::establish(admin).await.unwrap();
    // Left by an earlier process that had the same id, or by a test that failed half-way
    // through this function.
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = server::db::Db::connect(&pg_database_url(admin, &name), 1)
        .await
        .unwrap_or_else(|e| panic!("migrating template database {name}: {e}"));
    drop(db);
    // Refuses new sessions; the migration session still closes asynchronously, so wait.
    conn.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    wait_until_unused(&mut conn, &name).await;
    name
}

/// Polls pg_stat_activity until no session is connected to `database`.
async fn wait_until_unused(conn: &mut AsyncPgConnection, database: &str) {
    use diesel_async::RunQueryDsl;
    let start = Instant::now();
    loop {
        let sessions: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
            &format!("(SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}')"),
        ))
        .get_result(conn)
        .await
        .unwrap();
        if sessions == 0 {
            return;
        }
        assert!(
            start.elapsed() < PG_TEMPLATE_DEADLINE,
            "{sessions} session(s) still connected to {database} after {PG_TEMPLATE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `CREATE DATABASE name TEMPLATE template`, retried while a session lingers on the template.
async fn clone_pg_database(conn: &mut AsyncPgConnection, name: &str, template: &str) {
    let start = Instant::now();
    loop {
        let sql = format!("CREATE DATABASE {name} TEMPLATE {template}");
        match conn.batch_execute(&sql).await {
            Ok(()) => return,
            Err(e)
                if e.to_string().contains("is being accessed by other users")
                    && start.elapsed() < PG_TEMPLATE_DEADLINE =>
            {
                wait_until_unused(conn, template).await;
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

pub fn test_config(db: &TestDb, extra: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), db.url.clone());
    vars.insert("DATA_DIR".into(), db.dir.path().display().to_string());
    vars.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    vars.insert("AGENT_TOKEN".into(), AGENT_TOKEN.into());
    vars.insert("ADMIN_TOKEN".into(), ADMIN_TOKEN.into());
    vars.insert("SCHEDULER_INTERVAL_MS".into(), "200".into());
    vars.insert(
        "SITE_ROOT".into(),
        workspace_root().join("target/site").display().to_string(),
    );
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).unwrap()
}

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub http: reqwest::Client,
    pub db: TestDb,
}

impl TestServer {
    pub async fn start(backend: Backend, extra: &[(&str, &str)]) -> Self {
        let db = fresh_db(backend).await;
        Self::start_on(db, extra).await
    }

    pub async fn start_on(db: TestDb, extra: &[(&str, &str)]) -> Self {
        let server = server::start(test_config(&db, extra)).await.unwrap();
        let base = format!("http://{}", server.addr);
        Self {
            server: Some(server),
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            db,
        }
    }

    pub fn state(&self) -> &server::state::AppState {
        &self.server.as_ref().unwrap().state
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn report(&self, body: &Value) -> (u16, Value) {
        self.report_raw(body.to_string().into_bytes(), Some(AGENT_TOKEN))
            .await
    }

    pub async fn report_raw(&self, body: Vec<u8>, token: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .post(self.url("/api/health/report"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    pub async fn metric_rows(&self) -> i64 {
        let mut conn = self.state().db.conn().await.unwrap();
        server::db::store::count_metric_samples(&mut conn, None)
            .await
            .unwrap()
    }

    pub async fn vm_count(&self) -> usize {
        let mut conn = self.state().db.conn().await.unwrap();
        server::db::store::list_vms(&mut conn).await.unwrap().len()
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

/// A valid report for `hostname`.
pub fn report_for(hostname: &str) -> Value {
    json!({
        "hostname": hostname,
        "os": "linux",
        "cpu_percent": 12.5,
        "ram_used_bytes": 1_000_000_000i64,
        "ram_total_bytes": 4_000_000_000i64,
        "disks": [{"mount": "/", "used_bytes": 10_000_000_000i64, "total_bytes": 40_000_000_000i64}],
        "uptime_seconds": 3600,
        "agent_version": "test"
    })
}

/// Polls `check` until it yields a value or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
