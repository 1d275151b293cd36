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
            // The process id lets scripts/test.sh drop only what finished test processes left.
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

/// The migrated template, looked up (or made) once per test process.
static PG_TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn pg_template(admin: &str) -> &'static str {
    PG_TEMPLATE
        .get_or_init(|| create_pg_template(admin))
        .await
        .as_str()
}

/// Advisory lock (taken in the admin database) serialising template creation across
/// test processes: the test runner starts one process per test.
const PG_TEMPLATE_LOCK_KEY: i64 = 0x0076_6d68_746d_706c;

/// First 16 hex digits of SHA-256 over migrations/postgres: every relative file path in byte
/// order, each followed by NUL, its contents and NUL. scripts/test.sh computes the same
/// digest to drop templates of older migrations.
fn migrations_hash() -> String {
    use sha2::{Digest, Sha256};
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let root = workspace_root().join("migrations/postgres");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut files: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, p)
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (rel, path) in files {
        hasher.update(rel.as_bytes());
        hasher.update([0]);
        hasher.update(std::fs::read(&path).unwrap());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `vmhc_tmpl_<migrations hash>`, shared by every test process and every run with the same
/// migrations. Made under an advisory lock, migrated through the server's own start-up path,
/// then closed to connections: PostgreSQL clones a database only while nobody is connected,
/// and a closed database is also the mark of a finished template (a creator that died
/// half-way leaves one still open, which the next creator replaces).
async fn create_pg_template(admin: &str) -> String {
    use diesel_async::RunQueryDsl;
    let name = format!("vmhc_tmpl_{}", migrations_hash());
    let mut conn = AsyncPgConnection::establish(admin).await.unwrap();
    conn.batch_execute(&format!("SELECT pg_advisory_lock({PG_TEMPLATE_LOCK_KEY})"))
        .await
        .unwrap();
    let ready: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "(SELECT count(*) FROM pg_database WHERE datname = '{name}' AND NOT datallowconn)"
    )))
    .get_result(&mut conn)
    .await
    .unwrap();
    if ready == 0 {
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
        // Refuses new sessions; the migration session still closes asynchronously, so wait
        // before letting anyone clone it.
        conn.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .await
            .unwrap();
        wait_until_unused(&mut conn, &name).await;
    }
    conn.batch_execute(&format!(
        "SELECT pg_advisory_unlock({PG_TEMPLATE_LOCK_KEY})"
    ))
    .await
    .unwrap();
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
    vars.insert("TLS".into(), "off".into());
    // Every test reports from 127.0.0.1, most with the fleet token; one test sets it low.
    vars.insert("ENROLMENT_RATE_PER_MINUTE".into(), "1000000".into());
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
        self.try_report_raw(body, token).await.unwrap()
    }

    /// `report_raw` that returns a transport failure instead of panicking: a server that
    /// answers 413 before reading an oversized body may reset the connection while the
    /// client is still sending it.
    pub async fn try_report_raw(
        &self,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut req = self
            .http
            .post(self.url("/api/health/report"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// A read as the bootstrap admin token (every read needs a credential).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, Some(ADMIN_TOKEN)).await
    }

    /// The server-rendered dashboard page at `path`, as the bootstrap admin sees it.
    pub async fn page(&self, path: &str) -> String {
        self.http
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A read with `token`, or anonymously.
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
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

/// Whether `body` has the API's error shape: `{"error": {"code", "message", "field"?}}`.
pub fn is_error_body(body: &Value) -> bool {
    let error = &body["error"];
    error["code"].is_string()
        && error["message"].is_string()
        && (error.get("field").is_none() || error["field"].is_string())
}

/// An error body as one line, `"field: message"` when it names a field.
pub fn error_text(body: &Value) -> String {
    assert!(is_error_body(body), "not an error body: {body}");
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or_default();
    match error["field"].as_str() {
        Some(field) => format!("{field}: {message}"),
        None => message.to_owned(),
    }
}

/// The wall clock, in ms since the epoch.
pub fn epoch_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}
