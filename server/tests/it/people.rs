//! People and trust over HTTP: nothing readable anonymously, roles enforced on the server
//! (REST and server functions), cookie writes only from our own pages, the sign-in
//! throttle, sessions in the database (restarts, replicas, logout, password change), API
//! tokens, first-start setup and the audit log.

use crate::both_backends;
use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::proxmox::{history, report_vm, start};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const PASSWORD: &str = "a long enough password";

/// A browser-like client: keeps the session cookie and says it comes from our own pages.
struct Person {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Person {
    fn at(srv: &TestServer) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: srv.base.clone(),
            cookie: None,
        }
    }

    fn on(&self, srv: &TestServer) -> Self {
        Self {
            http: self.http.clone(),
            base: srv.base.clone(),
            cookie: self.cookie.clone(),
        }
    }

    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
        site: &str,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("sec-fetch-site", site);
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        for set in headers.get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap().to_owned();
            if pair.starts_with("vmhc_session=") {
                self.cookie = Some(pair);
            }
        }
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn call(&mut self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, body, _) = self.request(method, path, body, "same-origin").await;
        (status, body)
    }

    async fn login(&mut self, username: &str, password: &str) -> u16 {
        self.call(
            Method::POST,
            "/api/login",
            Some(json!({"username": username, "password": password})),
        )
        .await
        .0
    }

    /// A server function call, as the dashboard makes it.
    async fn rpc(&mut self, endpoint: &str, form: &str) -> u16 {
        let mut req = self
            .http
            .post(format!("{}/rpc/{endpoint}", self.base))
            .header("sec-fetch-site", "same-origin")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned());
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        req.send().await.unwrap().status().as_u16()
    }
}

/// Keeps the scheduler's hands off a VM that stops reporting, so only people act on it.
pub(crate) async fn opt_out(srv: &TestServer, vm: i64) {
    let (status, body) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{vm}/auto-reset"),
            Some(ADMIN_TOKEN),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

pub async fn add_user(srv: &TestServer, username: &str, role: &str) {
    let (status, body) = srv
        .send(
            Method::POST,
            "/api/users",
            Some(ADMIN_TOKEN),
            Some(json!({"username": username, "password": PASSWORD, "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Acceptance: anonymous requests to every GET route, the dashboard and every server
/// function are refused (401 for the API, a redirect to the sign-in page for pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_readable_anonymously() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let (_, body) = srv.report(&report_for("web-01")).await;
    let id = body["vm_id"].as_i64().unwrap();
    let gets = [
        "/api/vms".to_owned(),
        format!("/api/vms/{id}"),
        format!("/api/vms/{id}/metrics"),
        format!("/api/vms/{id}/reset-history"),
        "/api/remediation".to_owned(),
        "/api/status".to_owned(),
        "/api/status/config".to_owned(),
        "/api/settings".to_owned(),
        "/api/proxmox/check".to_owned(),
        "/api/me".to_owned(),
        "/api/users".to_owned(),
        "/api/tokens".to_owned(),
        "/api/audit".to_owned(),
        "/api/enrolment-tokens".to_owned(),
    ];
    for path in &gets {
        for token in [None, Some(AGENT_TOKEN), Some("vmhc_api_guess")] {
            let (status, body) = srv.get_as(path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert!(!body.to_string().contains("web-01"), "{path}: {body}");
        }
        assert_eq!(srv.get_as(path, Some(ADMIN_TOKEN)).await.0, 200, "{path}");
    }
    let mut anonymous = Person::at(&srv);
    for page in ["/", "/anything"] {
        let (status, _, headers) = anonymous.request(Method::GET, page, None, "none").await;
        assert_eq!(status, 303, "{page}");
        assert_eq!(headers["location"], "/setup", "no user yet: setup first");
    }
    add_user(&srv, "vera", "viewer").await;
    let (status, _, headers) = anonymous.request(Method::GET, "/", None, "none").await;
    assert_eq!(
        (status, headers["location"].to_str().unwrap()),
        (303, "/login")
    );
    // The sign-in page itself: a nonce-based content security policy, no referrer.
    let (status, page, headers) = anonymous.request(Method::GET, "/login", None, "none").await;
    assert_eq!(status, 200);
    let csp = headers["content-security-policy"].to_str().unwrap();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let page = page.as_str().unwrap();
    assert!(
        page.contains(&format!("nonce=\"{nonce}\"")),
        "inline scripts carry the nonce"
    );
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let (_, _, again) = anonymous.request(Method::GET, "/login", None, "none").await;
    assert_ne!(
        again["content-security-policy"], headers["content-security-policy"],
        "a nonce per page"
    );
    assert_eq!(anonymous.rpc("fleet", "").await, 401);
    assert_eq!(anonymous.rpc("me", "").await, 401);
    assert_eq!(
        anonymous
            .rpc("act", &format!("vm_id={id}&action=reset"))
            .await,
        401
    );
    // Health: anonymous callers learn only whether it is up.
    let (status, health) = srv.get_as("/api/health", None).await;
    assert_eq!((status, health.clone()), (200, json!({"status": "ok"})));
    let (_, detailed) = srv.get("/api/health").await;
    assert!(detailed["remediation"].is_object(), "{detailed}");
    srv.stop().await;
}

/// Acceptance: a viewer's forged reset (REST or server function) gets 403 and changes
/// nothing; an operator's reset works and is in the audit log with the user; a write
/// with the session cookie from another site is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_are_enforced_on_the_server() {
    let fake = FakePve::start(vec![FakeVm::running(101, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    let vm = report_vm(&srv, 101, "pve1", 100).await;
    opt_out(&srv, vm).await;
    add_user(&srv, "vera", "viewer").await;
    add_user(&srv, "otto", "operator").await;

    let mut viewer = Person::at(&srv);
    assert_eq!(viewer.login("vera", PASSWORD).await, 200);
    assert_eq!(viewer.call(Method::GET, "/api/vms", None).await.0, 200);
    assert_eq!(viewer.rpc("fleet", "query=").await, 200);
    let reset = format!("/api/vms/{vm}/reset");
    let (status, body) = viewer.call(Method::POST, &reset, None).await;
    assert_eq!(status, 403, "{body}");
    for action in ["reset", "shutdown", "hold", "acknowledge"] {
        let form = format!("vm_id={vm}&action={action}");
        assert_eq!(viewer.rpc("act", &form).await, 403, "{action}");
    }
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/api/vms/{vm}/proxmox"),
            Some(json!({"node": null, "vmid": null})),
        ),
        (
            Method::PUT,
            "/api/status/config".to_owned(),
            Some(json!({"cpu_threshold": 50})),
        ),
        (Method::GET, "/api/audit".to_owned(), None),
        (Method::GET, "/api/users".to_owned(), None),
    ] {
        assert_eq!(viewer.call(method, &path, body).await.0, 403, "{path}");
    }
    assert!(fake.posts().is_empty(), "a viewer's call reached Proxmox");
    assert!(history(&srv, vm).await.is_empty());

    let mut operator = Person::at(&srv);
    assert_eq!(operator.login("otto", PASSWORD).await, 200);
    // The operator's cookie, sent by another site's page: refused before anything happens.
    let (status, _, _) = operator
        .request(Method::POST, &reset, None, "cross-site")
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        operator
            .rpc_cross_site("act", &format!("vm_id={vm}&action=reset"))
            .await,
        403
    );
    assert!(fake.posts().is_empty());
    let (status, body) = operator.call(Method::POST, &reset, None).await;
    assert_eq!(status, 202, "{body}");
    crate::common::wait_for("the reset", Duration::from_secs(10), || async {
        (!fake.posts().is_empty()).then_some(())
    })
    .await;
    assert_eq!(history(&srv, vm).await[0]["requested_by"], "otto");
    let (_, audit) = srv.get("/api/audit").await;
    let actions: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("otto".into(), "reset".into(), "accepted".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("vera".into(), "reset".into(), "forbidden".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("vera".into(), "login".into(), "success".into())),
        "{actions:?}"
    );
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["source"] != "unknown"),
        "the audit log says where from: {audit}"
    );
    srv.stop().await;
}

impl Person {
    async fn rpc_cross_site(&mut self, endpoint: &str, form: &str) -> u16 {
        let mut req = self
            .http
            .post(format!("{}/rpc/{endpoint}", self.base))
            .header("sec-fetch-site", "cross-site")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned());
        if let Some(cookie) = &self.cookie {
            req = req.header("cookie", cookie);
        }
        req.send().await.unwrap().status().as_u16()
    }
}

/// Acceptance: 20 wrong passwords in a row are refused; after the window the right
/// password works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guessing_is_throttled() {
    let mut srv = TestServer::start(Backend::Sqlite, &[("LOGIN_THROTTLE_WINDOW_MS", "3000")]).await;
    add_user(&srv, "alice", "admin").await;
    let mut guesser = Person::at(&srv);
    let mut answers = Vec::new();
    for i in 0..20 {
        answers.push(guesser.login("alice", &format!("guess number {i}")).await);
    }
    assert_eq!(&answers[..5], &[401; 5], "{answers:?}");
    assert!(answers[5..].iter().all(|s| *s == 429), "{answers:?}");
    // While locked even the right password is refused: guessing learns nothing.
    assert_eq!(guesser.login("alice", PASSWORD).await, 429);
    let (_, audit) = srv.get("/api/audit").await;
    let throttled = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "login" && e["outcome"] == "throttled")
        .count();
    assert_eq!(
        throttled, 1,
        "one entry per window, not one per guess: {audit}"
    );
    wait_for("the window to pass", Duration::from_secs(10), || async {
        let mut fresh = Person::at(&srv);
        (fresh.login("alice", PASSWORD).await == 200).then_some(())
    })
    .await;
    srv.stop().await;
}

/// Acceptance: sessions live in the database: they survive a restart, and a logout on one
/// replica ends the session on the other at once; a new password ends every session.
async fn sessions_survive_restarts_and_end_everywhere(backend: Backend) {
    let mut a = TestServer::start(backend, &[]).await;
    add_user(&a, "alice", "admin").await;
    let mut alice = Person::at(&a);
    assert_eq!(alice.login("alice", PASSWORD).await, 200);
    let cookie = alice.cookie.clone().unwrap();
    assert!(!cookie.contains(PASSWORD));
    let (status, me) = alice.call(Method::GET, "/api/me", None).await;
    assert_eq!((status, me["role"].clone()), (200, json!("admin")));

    // Restart on the same database: still signed in.
    a.stop().await;
    let db = a.db;
    let a = TestServer::start_on(db, &[]).await;
    let mut alice = alice.on(&a);
    assert_eq!(alice.call(Method::GET, "/api/me", None).await.0, 200);

    // A second replica on the same database sees the session; a logout on the first ends it.
    let replica_db = TestDb {
        url: a.db.url.clone(),
        dir: tempfile::tempdir().unwrap(),
    };
    let b = TestServer::start_on(replica_db, &[]).await;
    let mut alice_b = alice.on(&b);
    assert_eq!(alice_b.call(Method::GET, "/api/me", None).await.0, 200);
    assert_eq!(alice.call(Method::POST, "/api/logout", None).await.0, 204);
    alice_b.cookie = Some(cookie.clone());
    assert_eq!(alice_b.call(Method::GET, "/api/me", None).await.0, 401);

    // A new password ends the sessions made with the old one.
    let mut again = Person::at(&a);
    assert_eq!(again.login("alice", PASSWORD).await, 200);
    let (_, users) = a.get("/api/users").await;
    let id = users[0]["id"].as_i64().unwrap();
    let (status, _) = a
        .send(
            Method::PUT,
            &format!("/api/users/{id}/password"),
            Some(ADMIN_TOKEN),
            Some(json!({"password": "another long password"})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(again.call(Method::GET, "/api/me", None).await.0, 401);
    assert_eq!(again.on(&b).call(Method::GET, "/api/me", None).await.0, 401);
    assert_eq!(again.login("alice", "another long password").await, 200);
    let mut b = b;
    b.stop().await;
    let mut a = a;
    a.stop().await;
}
both_backends!(sessions_survive_restarts_and_end_everywhere);

/// The session cookie's flags, and sign-in answers that never carry a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_session_cookie_is_httponly_and_strict() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    add_user(&srv, "alice", "admin").await;
    let mut alice = Person::at(&srv);
    let (status, body, headers) = alice
        .request(
            Method::POST,
            "/api/login",
            Some(json!({"username": "alice", "password": PASSWORD})),
            "same-origin",
        )
        .await;
    assert_eq!(status, 200);
    assert!(!body.to_string().contains("hash"), "{body}");
    let set = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    // Wrong name and wrong password answer alike.
    let mut other = Person::at(&srv);
    let (s1, b1) = other
        .call(
            Method::POST,
            "/api/login",
            Some(json!({"username": "nobody", "password": PASSWORD})),
        )
        .await;
    let (s2, b2) = other
        .call(
            Method::POST,
            "/api/login",
            Some(json!({"username": "alice", "password": "wrong password!"})),
        )
        .await;
    assert_eq!((s1, b1), (s2, b2));
    // A sign-in posted from another site is refused.
    let (status, _, _) = other
        .request(
            Method::POST,
            "/api/login",
            Some(json!({"username": "alice", "password": PASSWORD})),
            "cross-site",
        )
        .await;
    assert_eq!(status, 403);
    srv.stop().await;
}

/// Per-user API tokens: at most the owner's role, shown once, last use listed, revocable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_tokens_act_as_their_user_within_their_role() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    add_user(&srv, "otto", "operator").await;
    let create = |body: Value| {
        let srv = &srv;
        async move {
            srv.send(Method::POST, "/api/tokens", Some(ADMIN_TOKEN), Some(body))
                .await
        }
    };
    let (status, body) = create(json!({"username": "otto", "label": "x", "role": "admin"})).await;
    assert_eq!(status, 400, "a token above its owner's role: {body}");
    let (status, created) =
        create(json!({"username": "otto", "label": "grafana", "role": "viewer"})).await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(srv.get_as("/api/vms", Some(&token)).await.0, 200);
    let (status, _) = srv
        .send(Method::POST, "/api/vms/1/reset", Some(&token), None)
        .await;
    assert_eq!(status, 403, "a viewer token reset");
    let (_, list) = srv.get("/api/tokens").await;
    assert_eq!(list[0]["username"], "otto");
    assert!(list[0]["last_used_ms"].is_i64(), "{list}");
    assert!(!list.to_string().contains(&token));
    let (status, _) = srv
        .send(
            Method::DELETE,
            &format!("/api/tokens/{}", created["id"]),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(srv.get_as("/api/vms", Some(&token)).await.0, 401);
    srv.stop().await;
}

/// First start over the API: the setup code from `data/setup-code` (0600) creates the first
/// admin once; a wrong code or a second setup changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_start_setup_needs_the_code_and_happens_once() {
    use std::os::unix::fs::PermissionsExt;
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let path = srv.db.dir.path().join("setup-code");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let code = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    let mut person = Person::at(&srv);
    let setup = |code: &str, name: &str| json!({"setup_code": code, "username": name, "password": PASSWORD});
    let (status, _) = person
        .call(Method::POST, "/api/setup", Some(setup("nope", "root")))
        .await;
    assert_eq!(status, 403);
    let (status, _) = person
        .call(
            Method::POST,
            "/api/setup",
            Some(json!({"setup_code": code, "username": "root", "password": "short"})),
        )
        .await;
    assert_eq!(status, 400);
    let (_, users) = srv.get("/api/users").await;
    assert_eq!(users, json!([]));
    let (status, body) = person
        .call(Method::POST, "/api/setup", Some(setup(&code, "root")))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(person.call(Method::GET, "/api/me", None).await.0, 200);
    let (status, _) = Person::at(&srv)
        .call(Method::POST, "/api/setup", Some(setup(&code, "mallory")))
        .await;
    assert_eq!(status, 409);
    assert!(!path.exists());
    srv.stop().await;

    // Unattended installs: ADMIN_USERNAME/ADMIN_PASSWORD, no setup code at all.
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[("ADMIN_USERNAME", "ops"), ("ADMIN_PASSWORD", PASSWORD)],
    )
    .await;
    assert!(!srv.db.dir.path().join("setup-code").exists());
    assert_eq!(Person::at(&srv).login("ops", PASSWORD).await, 200);
    srv.stop().await;
}

/// One VM credential cannot flood the writer: beyond its burst it gets 429 with
/// Retry-After and nothing is stored; other VMs and enrolments are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credential_that_floods_is_slowed() {
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[("REPORT_RATE_PER_MINUTE", "1"), ("REPORT_BURST", "3")],
    )
    .await;
    let mut credentials = Vec::new();
    for host in ["flood", "calm"] {
        let (status, body) = srv.report(&report_for(host)).await;
        assert_eq!(status, 200, "{body}");
        credentials.push(body["credential"].as_str().unwrap().to_owned());
    }
    let body = report_for("flood").to_string().into_bytes();
    for _ in 0..3 {
        assert_eq!(
            srv.report_raw(body.clone(), Some(&credentials[0])).await.0,
            200
        );
    }
    let rows = srv.metric_rows().await;
    let resp = srv
        .http
        .post(srv.url("/api/health/report"))
        .bearer_auth(&credentials[0])
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(srv.metric_rows().await, rows, "a refused report was stored");
    let calm = report_for("calm").to_string().into_bytes();
    assert_eq!(srv.report_raw(calm, Some(&credentials[1])).await.0, 200);
    assert_eq!(srv.report(&report_for("newcomer")).await.0, 200);
    srv.stop().await;

    // Without a credential (the fleet token, made-up bearers) one address is limited too:
    // it cannot flood the writer or create VMs without end.
    let mut srv = TestServer::start(Backend::Sqlite, &[("ENROLMENT_RATE_PER_MINUTE", "3")]).await;
    let mut answers = Vec::new();
    for i in 0..3 {
        answers.push(srv.report(&report_for(&format!("new-{i}"))).await.0);
    }
    let forged = report_for("x").to_string().into_bytes();
    answers.push(srv.report_raw(forged, Some("vmhc_enrol_made_up")).await.0);
    answers.push(srv.report(&report_for("new-4")).await.0);
    assert_eq!(answers, [200, 200, 200, 429, 429]);
    assert_eq!(srv.vm_count().await, 3);
    srv.stop().await;
}

/// A made-up VM credential gets no allowance of its own: until a credential has been
/// admitted here it counts against its client address, so a spray of invented ones from
/// one address is slowed like any unknown bearer (it cannot crowd the writer and shed
/// real reports), while a VM whose credential was admitted keeps its own allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_credentials_count_against_their_address() {
    let mut srv = TestServer::start(Backend::Sqlite, &[("ENROLMENT_RATE_PER_MINUTE", "3")]).await;
    let (status, body) = srv.report(&report_for("real")).await;
    assert_eq!(status, 200, "{body}");
    let credential = body["credential"].as_str().unwrap().to_owned();
    let real = report_for("real").to_string().into_bytes();
    assert_eq!(srv.report_raw(real.clone(), Some(&credential)).await.0, 200);
    let mut answers = Vec::new();
    for i in 0..3 {
        let forged = report_for("real").to_string().into_bytes();
        let made_up = format!("vmhc_vm_made_up_{i}");
        answers.push(srv.report_raw(forged, Some(&made_up)).await.0);
    }
    assert_eq!(answers, [401, 429, 429]);
    assert_eq!(srv.report_raw(real, Some(&credential)).await.0, 200);
    assert_eq!(srv.vm_count().await, 1);
    srv.stop().await;
}

/// With `PUBLIC_URL`, a request naming another host (DNS rebinding) is refused; the
/// public name and loopback answer. Behind a trusted proxy the audit log names the client
/// from `X-Forwarded-For`; from anyone else that header is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_hosts_are_refused_and_only_trusted_proxies_name_the_client() {
    let mut srv = TestServer::start(
        Backend::Sqlite,
        &[
            ("PUBLIC_URL", "https://mon.example:8443"),
            ("TRUSTED_PROXIES", "127.0.0.1"),
        ],
    )
    .await;
    let get = |path: &'static str, host: &'static str| {
        let srv = &srv;
        async move {
            srv.http
                .get(srv.url(path))
                .header("host", host)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("/api/me", "evil.example").await, 421);
    assert_eq!(get("/api/vms", "mon.example:9999").await, 421);
    assert_eq!(get("/", "evil.example").await, 421);
    assert_eq!(get("/api/vms", "mon.example:8443").await, 200);
    assert_eq!(get("/api/vms", "localhost:1234").await, 200);
    // Agents and load balancers may know the server by an address: their routes answer.
    assert_eq!(get("/api/health", "10.0.0.5:8443").await, 200);
    let report = srv
        .http
        .post(srv.url("/api/health/report"))
        .header("host", "10.0.0.5:8443")
        .bearer_auth(AGENT_TOKEN)
        .json(&report_for("by-address"))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status().as_u16(), 200);
    add_user(&srv, "alice", "admin").await;
    let login = srv
        .http
        .post(srv.url("/api/login"))
        .header("x-forwarded-for", "198.51.100.1, 192.0.2.7")
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 200);
    let (_, audit) = srv.get("/api/audit").await;
    assert_eq!(audit[0]["source"], "192.0.2.7", "{audit}");
    srv.stop().await;

    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    add_user(&srv, "alice", "admin").await;
    srv.http
        .post(srv.url("/api/login"))
        .header("x-forwarded-for", "192.0.2.7")
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"username": "alice", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let (_, audit) = srv.get("/api/audit").await;
    assert_eq!(
        audit[0]["source"], "127.0.0.1",
        "an untrusted peer chose its address: {audit}"
    );
    srv.stop().await;
}

/// Reads that hang on the database hold at most their share of connections: a report
/// still commits while ten history reads wait on a locked table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_reads_never_starve_the_writer() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let mut srv = TestServer::start(Backend::Postgres, &[("DB_POOL_SIZE", "4")]).await;
    let (_, body) = srv.report(&report_for("web-01")).await;
    let id = body["vm_id"].as_i64().unwrap();
    let mut locker = AsyncPgConnection::establish(&srv.db.url).await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE reset_attempts IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let reads: Vec<_> = (0..10)
        .map(|_| {
            let (http, url) = (
                srv.http.clone(),
                srv.url(&format!("/api/vms/{id}/reset-history")),
            );
            tokio::spawn(async move { http.get(url).bearer_auth(ADMIN_TOKEN).send().await })
        })
        .collect();
    // Give the reads time to take every connection they are allowed.
    let admin_url = admin_pg_url();
    let name = srv.db.url.rsplit('/').next().unwrap().to_owned();
    wait_for("reads waiting on the lock", Duration::from_secs(10), || {
        let (admin_url, name) = (admin_url.clone(), name.clone());
        async move {
            let mut admin = AsyncPgConnection::establish(&admin_url).await.ok()?;
            #[derive(diesel::QueryableByName)]
            struct Waiting {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            use diesel_async::RunQueryDsl;
            let w: Waiting = diesel::sql_query(format!(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{name}' \
                 AND wait_event_type = 'Lock'"
            ))
            .get_result(&mut admin)
            .await
            .ok()?;
            (w.n >= 1).then_some(())
        }
    })
    .await;
    let (status, body) = srv.report(&report_for("web-02")).await;
    assert_eq!(status, 200, "the writer was starved by reads: {body}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap().status().as_u16(), 200);
    }
    srv.stop().await;
}

/// Operators see, on the server-rendered add-VM page, an install line carrying the SHA-256
/// of the agent script this server hands out (the installer refuses any other script);
/// viewers do not see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_get_an_install_line_with_the_agents_hash() {
    use sha2::Digest;
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let script = std::fs::read(workspace_root().join("agents/linux-agent.sh")).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&script));
    let page = |token: String| {
        let srv = &srv;
        async move {
            srv.http
                .get(srv.url("/add-vm"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let html = page(ADMIN_TOKEN.to_owned()).await;
    assert!(
        html.contains(&format!("--sha256 {sha}")),
        "no install line with the hash"
    );
    assert!(
        html.contains(&format!("{}/agents/install.sh", srv.base)),
        "{html}"
    );
    add_user(&srv, "vera", "viewer").await;
    let (_, token) = srv
        .send(
            Method::POST,
            "/api/tokens",
            Some(ADMIN_TOKEN),
            Some(json!({"username": "vera", "label": "x", "role": "viewer"})),
        )
        .await;
    let html = page(token["token"].as_str().unwrap().to_owned()).await;
    assert!(
        html.contains("vm-healthcheck") && !html.contains("--sha256"),
        "{html}"
    );
    srv.stop().await;
}
