//! The admin command line, run as a person or a script runs it: the built binary, settings
//! in its environment, a fresh data directory or database per test, and each refusal
//! checked to change nothing.

use crate::both_backends;
use crate::common::*;
use reqwest::Method;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PASSWORD: &str = "a long enough password";

/// What one run of the binary did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "{self:?}");
        &self.stdout
    }

    /// Refused with `code`, saying `why` on standard error, printing nothing else.
    #[track_caller]
    fn refused(&self, code: i32, why: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stderr.contains(why), "expected {why:?}: {self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
    }
}

/// The settings a command needs to find this database and data directory.
pub fn settings_of(db: &TestDb) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("DATA_DIR".into(), db.dir.path().display().to_string()),
    ]
}

/// `vm-healthcheck args`, with only `settings` (and `PATH`) in its environment, run in
/// `dir` (so no `.env` of ours applies), `stdin` as its standard input.
pub async fn vmhc(dir: &Path, settings: &[(String, String)], args: &[&str], stdin: &str) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(settings.iter().map(|(k, v)| (k, v)))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        // A command that does not read its input closes the pipe: not an error here.
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        let out = child.wait_with_output().unwrap();
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// The migrations the binary carries for `backend`, by folder name, in order.
fn migration_names(backend: &str) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(workspace_root().join("migrations").join(backend))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    names.sort();
    names
}

/// A PostgreSQL database with nothing in it (`fresh_db` clones a migrated one).
async fn empty_pg_database() -> String {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let admin = admin_pg_url();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    // The process id lets scripts/test.sh drop what a finished test process left.
    let name = format!("vmhc_t_{}_cli_empty_{nanos}", std::process::id());
    let mut conn = AsyncPgConnection::establish(&admin).await.unwrap();
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

/// `migrate` applies every migration to a new database, naming each, then finds nothing to
/// do; settings that do not parse are refused before anything is made.
async fn migrate_applies_what_is_pending_then_says_up_to_date(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (url, folder) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", data.join("vm-healthcheck.db").display()),
            "sqlite",
        ),
        Backend::Postgres => (empty_pg_database().await, "postgres"),
    };
    let settings = vec![
        ("DATABASE_URL".to_owned(), url.clone()),
        ("DATA_DIR".to_owned(), data.display().to_string()),
    ];

    let mut bad = settings.clone();
    bad.push(("CPU_THRESHOLD".into(), "lots".into()));
    vmhc(dir.path(), &bad, &["migrate"], "")
        .await
        .refused(1, "CPU_THRESHOLD");
    assert!(!data.exists(), "a refused command made the data directory");
    vmhc(dir.path(), &settings, &["migrate", "now"], "")
        .await
        .refused(2, "unknown command");

    let first = vmhc(dir.path(), &settings, &["migrate"], "").await;
    let applied: Vec<&str> = first
        .ok()
        .lines()
        .filter_map(|l| l.strip_prefix("applied "))
        .collect();
    assert_eq!(applied, migration_names(folder), "{first:?}");
    assert!(first.stdout.contains("up to date"), "{first:?}");
    // Where it went, but never a password.
    assert!(first.stdout.contains(&server::config::redact_url(&url)));

    let again = vmhc(dir.path(), &settings, &["migrate"], "").await;
    assert!(
        again.ok().contains("up to date: no migration pending"),
        "{again:?}"
    );
    assert!(!again.stdout.contains("applied "), "{again:?}");
    // The server starts on what `migrate` made, with nothing left to do.
    let mut srv = TestServer::start_on(
        TestDb {
            url,
            dir: tempfile::tempdir().unwrap(),
        },
        &[],
    )
    .await;
    assert_eq!(srv.get("/api/health").await.0, 200);
    srv.stop().await;
}
both_backends!(migrate_applies_what_is_pending_then_says_up_to_date);

/// Signs in over the API as a browser on our own pages would: the status, and who the
/// session then is.
pub async fn sign_in(srv: &TestServer, username: &str, password: &str) -> (u16, Value) {
    let answer = srv
        .http
        .post(srv.url("/api/login"))
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let cookie = answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("vmhc_session="))
        .map(|c| c.split(';').next().unwrap().to_owned());
    let Some(cookie) = cookie else {
        return (status, Value::Null);
    };
    let me = srv
        .http
        .get(srv.url("/api/me"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap_or(Value::Null);
    (status, me)
}

async fn user_count(srv: &TestServer) -> i64 {
    let mut conn = srv.state().db.conn().await.unwrap();
    server::db::people::count_users(&mut conn).await.unwrap()
}

/// `user add`: the password only from standard input (and so never in `ps`), checked like
/// the API's; the first user an admin, which ends the setup code; a taken name, an unknown
/// role or a bad name refused with nothing changed; audited as the API audits.
async fn user_add_makes_the_first_admin_and_refuses_bad_input(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let settings = settings_of(&srv.db);
    let dir = srv.db.dir.path().to_owned();
    let setup_file = dir.join("setup-code");
    let setup_code = std::fs::read_to_string(&setup_file).unwrap();
    let line = format!("{PASSWORD}\n");

    // Refused before anything is read or written.
    vmhc(
        &dir,
        &settings,
        &[
            "user",
            "add",
            "alice",
            "--role",
            "admin",
            "--password",
            PASSWORD,
        ],
        "",
    )
    .await
    .refused(2, "the password is read from standard input");
    vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "root"],
        &line,
    )
    .await
    .refused(2, "unknown role: \"root\": viewer, operator or admin");
    vmhc(&dir, &settings, &["user", "add", "alice"], &line)
        .await
        .refused(2, "--role");
    // Refused by the checks the API makes.
    vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "viewer"],
        &line,
    )
    .await
    .refused(1, "the first must be an admin");
    vmhc(
        &dir,
        &settings,
        &["user", "add", "al ice", "--role", "admin"],
        &line,
    )
    .await
    .refused(1, "user name");
    vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "admin"],
        "short\n",
    )
    .await
    .refused(1, "password: at least 12 characters");
    vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "admin"],
        "",
    )
    .await
    .refused(1, "no password on standard input");
    assert_eq!(user_count(&srv).await, 0);
    assert!(setup_file.exists());

    // What `ps` shows of a waiting `user add` carries no password: it is not there yet, and
    // then it arrives on standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vm-healthcheck"))
        .env_clear()
        .envs(settings.iter().map(|(k, v)| (k, v)))
        .args(["user", "add", "alice", "--role", "admin"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cmdline = format!("/proc/{}/cmdline", child.id());
    let shown = wait_for("the command to start", Duration::from_secs(10), || async {
        std::fs::read(&cmdline)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .filter(|c| c.contains("vm-healthcheck"))
    })
    .await;
    assert_eq!(
        shown.trim_end(),
        format!(
            "{} user add alice --role admin",
            env!("CARGO_BIN_EXE_vm-healthcheck")
        )
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "added admin alice\n");
    assert!(!format!("{out:?}").contains(PASSWORD));

    // The first admin ends the setup: its code is gone and worth nothing.
    assert!(!setup_file.exists());
    let setup = srv
        .http
        .post(srv.url("/api/setup"))
        .header("sec-fetch-site", "same-origin")
        .json(
            &json!({"setup_code": setup_code.trim(), "username": "mallory", "password": PASSWORD}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(setup.status().as_u16(), 409);
    let (status, me) = sign_in(&srv, "alice", PASSWORD).await;
    assert_eq!(status, 200);
    assert_eq!(me, json!({"username": "alice", "role": "admin"}));

    // A taken name: refused, and the user stays as it was.
    let other = "another long password";
    vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "viewer"],
        &format!("{other}\n"),
    )
    .await
    .refused(1, "exists already; nothing changed");
    assert_eq!(sign_in(&srv, "alice", other).await.0, 401);
    assert_eq!(
        sign_in(&srv, "alice", PASSWORD).await.1,
        json!({"username": "alice", "role": "admin"})
    );

    // Later users take any role; a line ending typed on Windows is not part of the password.
    let added = vmhc(
        &dir,
        &settings,
        &["user", "add", "bob", "--role=operator"],
        &format!("{other}\r\n"),
    )
    .await;
    assert_eq!(added.ok(), "added operator bob\n");
    assert_eq!(
        sign_in(&srv, "bob", other).await.1,
        json!({"username": "bob", "role": "operator"})
    );
    assert_eq!(user_count(&srv).await, 2);

    let (_, audit) = srv.get("/api/audit?action=create_user").await;
    let entries: Vec<(String, String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (
                field("actor"),
                field("target"),
                field("detail"),
                field("outcome"),
            )
        })
        .collect();
    let by_cli = |target: &str, role: &str| {
        (
            "command line".to_owned(),
            target.to_owned(),
            role.to_owned(),
            "success".to_owned(),
        )
    };
    assert_eq!(
        entries,
        vec![by_cli("bob", "operator"), by_cli("alice", "admin")]
    );
    srv.stop().await;
}
both_backends!(user_add_makes_the_first_admin_and_refuses_bad_input);

/// A fresh install needs no setup code: the first admin made before the first start is
/// there, and the server makes no code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_added_before_the_first_start_means_no_setup_code() {
    let db = fresh_db(Backend::Sqlite).await;
    let settings = settings_of(&db);
    let database = PathBuf::from(server::db::sqlite_path(&db.url));
    assert!(!database.exists());
    // A refusal leaves the install as it was: no database made.
    vmhc(
        db.dir.path(),
        &settings,
        &["user", "add", "viewer1", "--role", "viewer"],
        &format!("{PASSWORD}\n"),
    )
    .await
    .refused(1, "the first must be an admin");
    assert!(!database.exists());
    let added = vmhc(
        db.dir.path(),
        &settings,
        &["user", "add", "root", "--role", "admin"],
        &format!("{PASSWORD}\n"),
    )
    .await;
    assert_eq!(added.ok(), "added admin root\n");
    let mut srv = TestServer::start_on(db, &[]).await;
    assert!(!srv.db.dir.path().join("setup-code").exists());
    assert_eq!(sign_in(&srv, "root", PASSWORD).await.0, 200);
    srv.stop().await;
}

/// An API token through the API, as an admin makes one: `(id, secret)`.
async fn api_token(srv: &TestServer, username: &str, label: &str, role: &str) -> (i64, String) {
    let (status, created) = srv
        .send(
            Method::POST,
            "/api/tokens",
            Some(ADMIN_TOKEN),
            Some(json!({"username": username, "label": label, "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    (
        created["id"].as_i64().unwrap(),
        created["token"].as_str().unwrap().to_owned(),
    )
}

async fn me_with(srv: &TestServer, token: &str) -> (u16, Value) {
    srv.get_as("/api/me", Some(token)).await
}

/// `token rotate`: the old token stops working and the new one, of the same user, label and
/// role, works; only the new token is on standard output, stored as a hash like the API's;
/// an unknown label, or a label two users share, changes nothing.
async fn token_rotate_replaces_the_token_and_the_old_one_stops_working(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let settings = settings_of(&srv.db);
    let dir = srv.db.dir.path().to_owned();
    crate::people::add_user(&srv, "bob", "operator").await;
    crate::people::add_user(&srv, "carol", "admin").await;
    let (old_id, old) = api_token(&srv, "bob", "ci", "operator").await;
    let bob = json!({"username": "bob", "role": "operator"});
    assert_eq!(me_with(&srv, &old).await, (200, bob.clone()));
    let (_, before) = srv.get("/api/tokens").await;

    vmhc(&dir, &settings, &["token", "rotate", "deploy"], "")
        .await
        .refused(
            1,
            "no API token in force is labelled \"deploy\"; nothing changed",
        );
    vmhc(
        &dir,
        &settings,
        &["token", "rotate", "ci", "--user", "carol"],
        "",
    )
    .await
    .refused(1, "\"carol\" has no API token in force labelled \"ci\"");
    vmhc(&dir, &settings, &["token", "rotate"], "")
        .await
        .refused(2, "LABEL");
    assert_eq!(srv.get("/api/tokens").await.1, before);
    assert_eq!(me_with(&srv, &old).await.0, 200);

    let rotated = vmhc(&dir, &settings, &["token", "rotate", "ci"], "").await;
    let new = rotated.ok().strip_suffix('\n').unwrap().to_owned();
    assert!(
        new.starts_with("vmhc_api_") && new.len() == "vmhc_api_".len() + 64 && !new.contains('\n'),
        "only the token on standard output: {rotated:?}"
    );
    assert!(!rotated.stderr.contains(&new), "{rotated:?}");
    assert!(
        rotated.stderr.contains(&format!("token {old_id}")),
        "{rotated:?}"
    );
    assert_eq!(
        me_with(&srv, &old).await.0,
        401,
        "the old token still works"
    );
    assert_eq!(me_with(&srv, &new).await, (200, bob.clone()));
    // Listed like any token (the old one revoked), stored only as its hash.
    let (_, tokens) = srv.get("/api/tokens").await;
    let tokens = tokens.as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(tokens[0]["id"], old_id);
    assert!(tokens[0]["revoked_ms"].is_i64(), "{tokens:?}");
    assert_eq!(
        (
            &tokens[1]["username"],
            &tokens[1]["label"],
            &tokens[1]["role"]
        ),
        (&json!("bob"), &json!("ci"), &json!("operator"))
    );
    assert!(tokens[1]["revoked_ms"].is_null());
    {
        let mut conn = srv.state().db.conn().await.unwrap();
        let hashed = server::auth::hash_token(&new);
        assert!(
            server::db::people::api_token_by_hash(&mut conn, &hashed)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            server::db::people::api_token_by_hash(&mut conn, &new)
                .await
                .unwrap()
                .is_none(),
            "the token itself is stored"
        );
    }

    // A label two users' tokens share: refused until the user is named.
    let (_, carols) = api_token(&srv, "carol", "ci", "admin").await;
    let (_, before) = srv.get("/api/tokens").await;
    vmhc(&dir, &settings, &["token", "rotate", "ci"], "")
        .await
        .refused(1, "pick one with --user NAME; nothing changed");
    assert_eq!(srv.get("/api/tokens").await.1, before);
    let carol_new = vmhc(
        &dir,
        &settings,
        &["token", "rotate", "ci", "--user", "carol"],
        "",
    )
    .await;
    let carol_new = carol_new.ok().trim_end().to_owned();
    assert_eq!(me_with(&srv, &carols).await.0, 401);
    assert_eq!(
        me_with(&srv, &carol_new).await,
        (200, json!({"username": "carol", "role": "admin"}))
    );
    assert_eq!(me_with(&srv, &new).await.0, 200, "bob's token is untouched");

    let (_, audit) = srv.get("/api/audit?action=rotate_api_token").await;
    let audit = audit.as_array().unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[1]["actor"], "command line");
    assert_eq!(audit[1]["target"], format!("token {old_id}"));
    assert!(
        !serde_json::to_string(&audit).unwrap().contains("vmhc_api_"),
        "{audit:?}"
    );
    srv.stop().await;
}
both_backends!(token_rotate_replaces_the_token_and_the_old_one_stops_working);

/// `check-proxmox` says what `GET /api/proxmox/check` says, with the configured connection:
/// exit 0 only when every needed privilege is there and the certificate is verified; a
/// missing privilege, a wrong secret or pin, or no Proxmox at all exits 1; the secret is
/// never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_proxmox_says_what_it_found_and_never_the_secret() {
    use crate::fake_pve::{FakePve, FakeVm, SECRET, TOKEN_ID, USER};
    use sha2::Digest;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_der = certified.cert.der().to_vec();
    let (fake, _) = FakePve::start_tls(
        vec![FakeVm::running(100, "pve1")],
        cert_der.clone(),
        certified.key_pair.serialize_der(),
    )
    .await;
    let pin = |der: &[u8]| -> String {
        let digest: [u8; 32] = sha2::Sha256::digest(der).into();
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let settings = |secret: &str, fingerprint: &str| -> Vec<(String, String)> {
        [
            ("DATA_DIR", data.display().to_string()),
            ("PROXMOX_HOST", fake.base.clone()),
            ("PROXMOX_USER", USER.into()),
            ("PROXMOX_TOKEN", TOKEN_ID.into()),
            ("PROXMOX_SECRET", secret.into()),
            ("PROXMOX_FINGERPRINT", fingerprint.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let check = async |settings: Vec<(String, String)>| -> Ran {
        let ran = vmhc(dir.path(), &settings, &["check-proxmox"], "").await;
        assert!(
            !format!("{}{}", ran.stdout, ran.stderr).contains(SECRET),
            "the secret was printed: {ran:?}"
        );
        ran
    };

    let good = check(settings(SECRET, &pin(&cert_der))).await;
    let said = good.ok();
    for line in [
        "TLS: the certificate is pinned by its SHA-256 fingerprint.",
        "Proxmox VE 9.1.3",
        "VM.Audit on /vms: yes",
        "VM.PowerMgmt on /vms: yes",
    ] {
        assert!(said.contains(line), "{line}: {good:?}");
    }

    fake.deny("/vms", "VM.PowerMgmt");
    let missing = check(settings(SECRET, &pin(&cert_der))).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stdout.contains("VM.PowerMgmt on /vms: MISSING"),
        "{missing:?}"
    );

    let wrong_secret = check(settings("not-the-secret", &pin(&cert_der))).await;
    assert_eq!(wrong_secret.code, 1, "{wrong_secret:?}");
    assert!(
        wrong_secret.stdout.contains("refused the token"),
        "{wrong_secret:?}"
    );
    assert!(!wrong_secret.stdout.contains("not-the-secret"));

    let mut other = cert_der.clone();
    other[0] ^= 0xff;
    let wrong_pin = check(settings(SECRET, &pin(&other))).await;
    assert_eq!(wrong_pin.code, 1, "{wrong_pin:?}");
    assert!(wrong_pin.stdout.contains("NOT trusted"), "{wrong_pin:?}");

    let bare = vec![("DATA_DIR".to_owned(), data.display().to_string())];
    let unconfigured = check(bare).await;
    assert_eq!(unconfigured.code, 1, "{unconfigured:?}");
    assert!(
        unconfigured.stdout.contains("set PROXMOX_HOST"),
        "{unconfigured:?}"
    );

    assert!(!data.exists(), "the check touched the data directory");
}

/// Reads one number from a SQLite file, without the server's code (which would migrate it).
fn sqlite_count(file: &Path, sql: &str) -> i64 {
    use diesel::{Connection, RunQueryDsl};
    let mut conn = diesel::sqlite::SqliteConnection::establish(file.to_str().unwrap()).unwrap();
    diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!(
        "({sql})"
    )))
    .get_result(&mut conn)
    .unwrap()
}

/// `backup` on SQLite, while the server runs and takes reports: a copy that opens with the
/// whole schema, the users and the VMs, readable by its owner only; an existing file, a
/// missing folder or a missing database are refused and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_snapshots_sqlite_and_never_overwrites() {
    let out = tempfile::tempdir().unwrap();
    let nothing = fresh_db(Backend::Sqlite).await;
    vmhc(
        nothing.dir.path(),
        &settings_of(&nothing),
        &["backup", out.path().join("none.db").to_str().unwrap()],
        "",
    )
    .await
    .refused(1, "no database at");
    assert!(!Path::new(&server::db::sqlite_path(&nothing.url)).exists());
    assert!(!out.path().join("none.db").exists());

    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let settings = settings_of(&srv.db);
    let dir = srv.db.dir.path().to_owned();
    let added = vmhc(
        &dir,
        &settings,
        &["user", "add", "alice", "--role", "admin"],
        &format!("{PASSWORD}\n"),
    )
    .await;
    added.ok();
    for n in 0..3 {
        assert_eq!(srv.report(&report_for(&format!("vm-{n}"))).await.0, 200);
    }
    // Reports keep arriving while the copy is taken.
    let reporting = {
        let (http, url) = (srv.http.clone(), srv.url("/api/health/report"));
        tokio::spawn(async move {
            for n in 0.. {
                let _ = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for(&format!("busy-{}", n % 20)))
                    .send()
                    .await;
            }
        })
    };
    let snapshot = out.path().join("snapshot.db");
    let ran = vmhc(&dir, &settings, &["backup", snapshot.to_str().unwrap()], "").await;
    reporting.abort();
    assert!(
        ran.ok().starts_with("wrote a consistent copy of"),
        "{ran:?}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    assert_eq!(
        sqlite_count(&snapshot, "SELECT count(*) FROM __diesel_schema_migrations"),
        i64::try_from(migration_names("sqlite").len()).unwrap()
    );
    assert_eq!(
        sqlite_count(
            &snapshot,
            "SELECT count(*) FROM users WHERE username = 'alice' AND role = 'admin'"
        ),
        1
    );
    assert!(
        sqlite_count(
            &snapshot,
            "SELECT count(*) FROM vms WHERE hostname LIKE 'vm-%'"
        ) == 3
    );
    {
        use diesel::{Connection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct Check {
            #[diesel(sql_type = diesel::sql_types::Text)]
            integrity_check: String,
        }
        let mut conn =
            diesel::sqlite::SqliteConnection::establish(snapshot.to_str().unwrap()).unwrap();
        let check: Vec<Check> = diesel::sql_query("PRAGMA integrity_check")
            .load(&mut conn)
            .unwrap();
        assert_eq!(check.len(), 1);
        assert_eq!(check[0].integrity_check, "ok");
    }

    // Never over an existing file, nor into a folder that is not there.
    let kept = std::fs::read(&snapshot).unwrap();
    vmhc(&dir, &settings, &["backup", snapshot.to_str().unwrap()], "")
        .await
        .refused(1, "exists already; a backup never overwrites a file");
    assert_eq!(std::fs::read(&snapshot).unwrap(), kept);
    let nowhere = out.path().join("missing/snapshot.db");
    vmhc(&dir, &settings, &["backup", nowhere.to_str().unwrap()], "")
        .await
        .refused(1, "missing/snapshot.db");
    assert!(!nowhere.exists());
    srv.stop().await;
}

/// `backup` on PostgreSQL prints the `pg_dump` command for the configured database, without
/// its password, and that command makes a dump; it writes nothing itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_on_postgres_prints_a_pg_dump_command_without_the_password() {
    let db = fresh_db(Backend::Postgres).await;
    // The test server trusts local connections: the password is not needed, only hidden.
    let with_password = db
        .url
        .replacen("://postgres@", "://postgres:hunter2-never-shown@", 1);
    assert_ne!(
        with_password, db.url,
        "TEST_PG_URL names no user postgres: {}",
        db.url
    );
    let settings = vec![("DATABASE_URL".to_owned(), with_password)];
    let dump = db.dir.path().join("vmhc.dump");
    let ran = vmhc(
        db.dir.path(),
        &settings,
        &["backup", dump.to_str().unwrap()],
        "",
    )
    .await;
    let hint = ran.ok();
    assert!(!format!("{ran:?}").contains("hunter2"), "{ran:?}");
    assert!(hint.contains("PGPASSWORD"), "{ran:?}");
    assert!(!dump.exists(), "the hint wrote the file itself");
    let command = hint
        .lines()
        .find(|l| l.starts_with("pg_dump "))
        .unwrap_or_else(|| panic!("no pg_dump line: {ran:?}"));
    let status = Command::new("bash")
        .args(["-c", command])
        .current_dir(db.dir.path())
        .status()
        .expect("bash and pg_dump (apt: postgresql-client)");
    assert!(status.success(), "{command}");
    assert!(std::fs::metadata(&dump).unwrap().len() > 0);
    vmhc(
        db.dir.path(),
        &settings,
        &["backup", dump.to_str().unwrap()],
        "",
    )
    .await
    .refused(1, "exists already");
}
