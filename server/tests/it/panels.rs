//! The admin pages' server functions (`/rpc/panel`, `/rpc/panel-submit`): each role sees and
//! does only what its REST twin allows, every form goes through the same service (same
//! checks, same audit), and the link queue approves only exactly what was shown.

use crate::common::{ADMIN_TOKEN, AGENT_TOKEN, Backend, TestServer, report_for, wait_for};
use crate::fake_pve::{FakePve, FakeVm};
use crate::people::add_user;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// A user of `role` and an API token acting as them.
pub(crate) async fn token_for(srv: &TestServer, username: &str, role: &str) -> String {
    add_user(srv, username, role).await;
    let (status, body) = srv
        .send(
            Method::POST,
            "/api/tokens",
            Some(ADMIN_TOKEN),
            Some(json!({"username": username, "label": "pages", "role": role})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn encode(pairs: &[(&str, &str)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

/// A server function call as the dashboard makes it; the answer's status, body and headers.
async fn rpc(
    srv: &TestServer,
    token: &str,
    endpoint: &str,
    args: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let resp = srv
        .http
        .post(srv.url(&format!("/rpc/{endpoint}")))
        .bearer_auth(token)
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encode(args))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// An admin page as the server draws it (HTML), with the answer's status.
async fn page(srv: &TestServer, token: &str, name: &str, query: &str) -> (u16, String) {
    let (status, body, _) = rpc(srv, token, "panel", &[("name", name), ("query", query)]).await;
    (status, html_of(body))
}

/// A submission; the answer is the page drawn again with the outcome where it was asked.
async fn submit(
    srv: &TestServer,
    token: &str,
    name: &str,
    action: &str,
    form: &[(&str, &str)],
) -> (u16, String) {
    let form = encode(form);
    let (status, body, headers) = rpc(
        srv,
        token,
        "panel-submit",
        &[("name", name), ("action", action), ("form", &form)],
    )
    .await;
    if status == 200 {
        assert_eq!(
            headers.get("cache-control").map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "answers that may carry a secret shown once are never cached"
        );
    }
    (status, html_of(body))
}

fn html_of(body: Value) -> String {
    match body {
        Value::String(html) => html,
        other => other.to_string(),
    }
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The text of every `start ... end` in `html`, unescaped.
fn between(html: &str, start: &str, end: &str) -> Vec<String> {
    html.split(start)
        .skip(1)
        .filter_map(|rest| rest.split_once(end).map(|(inside, _)| unescape(inside)))
        .collect()
}

/// Every table cell's text (a cell's content follows its `data-label`).
fn cells(html: &str) -> Vec<String> {
    between(html, "<td data-label=\"", "</td>")
        .into_iter()
        .filter_map(|c| c.split_once("\">").map(|(_, text)| text.to_owned()))
        .collect()
}

fn keys(html: &str) -> Vec<String> {
    between(html, "<tr data-key=\"", "\"")
}

/// Whether the answer says done (`Some(true)`) or refused, and its message.
fn verdict(html: &str) -> (Option<bool>, String) {
    let ok = between(html, "data-ok=\"", "\"")
        .first()
        .map(|v| v == "true");
    let message = between(html, "role=\"status\" data-ok=", "</p>")
        .first()
        .and_then(|m| m.split_once("<p>").map(|(_, m)| m.to_owned()))
        .unwrap_or_default();
    (ok, message)
}

/// The fields shown with an error next to them.
fn errors(html: &str) -> Vec<String> {
    between(html, "data-error-for=\"", "\"")
}

/// The copyable blocks (commands, a token shown once).
fn codes(html: &str) -> Vec<String> {
    between(html, "<pre class=\"code\">", "</pre>")
}

async fn audit_actions(srv: &TestServer) -> Vec<(String, String, String)> {
    let (_, audit) = srv.get("/api/audit?limit=1000").await;
    audit
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
        .collect()
}

/// Viewers see none of the admin pages; operators see adding VMs and approvals; admins
/// everything. A forged submission is refused with 403, changes nothing and is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_page_and_action_needs_its_role() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let viewer = token_for(&srv, "vera", "viewer").await;
    let operator = token_for(&srv, "olga", "operator").await;
    let admin = token_for(&srv, "adam", "admin").await;
    let all = [
        "settings", "add-vm", "users", "tokens", "audit", "links", "alerts",
    ];
    for name in all {
        assert_eq!(page(&srv, &viewer, name, "").await.0, 403, "viewer, {name}");
        let expected = if matches!(name, "add-vm" | "links" | "alerts") {
            200
        } else {
            403
        };
        assert_eq!(
            page(&srv, &operator, name, "").await.0,
            expected,
            "operator, {name}"
        );
        let (status, body) = page(&srv, &admin, name, "").await;
        assert_eq!(status, 200, "admin, {name}: {body}");
        assert!(body.starts_with("<h2 class=\"panel-title\">"), "{body}");
    }
    let (status, body) = page(&srv, &admin, "nonsense", "").await;
    assert_ne!(status, 200, "an unknown page is an error: {body}");
    let anonymous = srv
        .http
        .post(srv.url("/rpc/panel"))
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=settings&query=")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    // The operator forges the settings form and the enrolment-token form.
    let (_, before) = srv.get("/api/settings").await;
    let (status, _) = submit(
        &srv,
        &operator,
        "settings",
        "save",
        &[("status.cpu_threshold", "1")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = submit(&srv, &operator, "add-vm", "enrol", &[("label", "x")]).await;
    assert_eq!(status, 403);
    let (status, _) = submit(
        &srv,
        &viewer,
        "links",
        "approve",
        &[("key", "1:pve1:100:qemu")],
    )
    .await;
    assert_eq!(status, 403);
    let (_, after) = srv.get("/api/settings").await;
    assert_eq!(before, after, "a refused submission changes nothing");
    let long = "x".repeat(10_000);
    let (status, _) = submit(&srv, &viewer, "users", &long, &[]).await;
    assert_eq!(status, 400, "an action the page does not have");
    let (_, tokens) = srv.get("/api/enrolment-tokens").await;
    assert_eq!(tokens, json!([]));
    let actions = audit_actions(&srv).await;
    assert!(
        !actions.iter().any(|(_, what, _)| what.contains("xxxx")),
        "an unknown action's text never reaches the audit log"
    );
    for (who, what) in [
        ("olga", "settings:save"),
        ("olga", "add-vm:enrol"),
        ("vera", "links:approve"),
    ] {
        assert!(
            actions.contains(&(who.into(), what.into(), "forbidden".into())),
            "{who} {what} audited as forbidden: {actions:?}"
        );
    }
    srv.stop().await;
}

/// The settings form saves through the same service as PUT /api/settings: a good value is
/// in force at once and audited; a bad one comes back naming its field and saves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_form_checks_each_field_and_saves_whole() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let admin = token_for(&srv, "adam", "admin").await;
    let (_, before) = srv.get("/api/settings").await;
    // The form's fields, filled as the page shows them (the settings in force).
    let (_, html) = page(&srv, &admin, "settings", "").await;
    let mut fields = Vec::new();
    for (group, values) in before.as_object().unwrap() {
        for (key, value) in values.as_object().unwrap() {
            let name = format!("{group}.{key}");
            assert!(
                html.contains(&format!("name=\"{name}\"")),
                "{name} is on the page"
            );
            let shown = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            fields.push((name, shown));
        }
    }
    let with = |name: &str, value: &str| -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if k == name {
                        value.to_owned()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect()
    };
    let send = |pairs: Vec<(String, String)>| {
        let srv = &srv;
        let admin = admin.clone();
        async move {
            let refs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            submit(srv, &admin, "settings", "save", &refs).await
        }
    };
    for (field, bad) in [
        ("status.cpu_threshold", "abc"),
        ("status.cpu_threshold", "150"),
        ("remediation.auto_reset", "sometimes"),
        ("remediation.storm_percent", "100"),
        ("remediation.veto_seconds", "-1"),
    ] {
        let (status, html) = send(with(field, bad)).await;
        assert_eq!(status, 200, "{html}");
        assert_eq!(verdict(&html).0, Some(false), "{field}={bad}: {html}");
        assert_eq!(errors(&html), vec![field.to_owned()], "{field}={bad}");
        // What was typed stays, marked (a list can only mark itself).
        let marked = if field == "remediation.auto_reset" {
            format!("name=\"{field}\" aria-invalid=\"true\"")
        } else {
            format!("value=\"{bad}\" aria-invalid=\"true\"")
        };
        assert!(html.contains(&marked), "{field}={bad}: {html}");
        let (_, now) = srv.get("/api/settings").await;
        assert_eq!(now, before, "{field}={bad} changed nothing");
    }
    let (_, html) = send(with("status.cpu_threshold", "42.5")).await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    let (_, now) = srv.get("/api/settings").await;
    assert_eq!(now["status"]["cpu_threshold"], 42.5);
    assert_eq!(
        now["remediation"], before["remediation"],
        "the rest as it was"
    );
    let (_, html) = page(&srv, &admin, "settings", "").await;
    assert!(
        html.contains(
            "name=\"status.cpu_threshold\" type=\"text\" inputmode=\"decimal\" value=\"42.5\""
        ),
        "{html}"
    );
    assert!(
        audit_actions(&srv)
            .await
            .iter()
            .any(|(who, what, outcome)| who == "adam"
                && what == "configure"
                && outcome.starts_with("saved")),
        "saved settings are audited"
    );
    // The connection test answers in words even without Proxmox configured.
    let (status, html) = submit(&srv, &admin, "settings", "test-proxmox", &[]).await;
    assert_eq!(status, 200);
    let (ok, message) = verdict(&html);
    assert_eq!(ok, Some(false));
    assert!(message.contains("not configured"), "{message}");
    srv.stop().await;
}

/// Users and API tokens through their pages: the same checks as the API, a token shown once
/// that works, revocation that takes effect, and the page never showing a secret again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_and_tokens_pages_manage_people_like_the_api() {
    let mut srv = TestServer::start(Backend::Postgres, &[]).await;
    let admin = token_for(&srv, "adam", "admin").await;
    let (_, answer) = submit(
        &srv,
        &admin,
        "users",
        "add",
        &[
            ("username", "paula"),
            ("password", "short"),
            ("role", "operator"),
        ],
    )
    .await;
    assert_eq!(errors(&answer), vec!["password"], "{answer}");
    let (_, answer) = submit(
        &srv,
        &admin,
        "users",
        "add",
        &[
            ("username", "paula"),
            ("password", "a long enough password"),
            ("role", "root"),
        ],
    )
    .await;
    assert_eq!(errors(&answer), vec!["role"], "{answer}");
    assert!(
        !answer.contains("a long enough password"),
        "a refused password is not sent back"
    );
    let (_, users) = srv.get("/api/users").await;
    assert!(!users.to_string().contains("paula"), "refusals add nobody");
    let (_, answer) = submit(
        &srv,
        &admin,
        "users",
        "add",
        &[
            ("username", "paula"),
            ("password", "a long enough password"),
            ("role", "operator"),
        ],
    )
    .await;
    assert_eq!(verdict(&answer).0, Some(true), "{answer}");
    let (_, panel) = page(&srv, &admin, "users", "").await;
    assert!(cells(&panel).contains(&"paula".to_owned()));
    assert!(!panel.contains("a long enough password"));

    // An API token for paula, shown once, working, then revoked from its row.
    let (_, answer) = submit(
        &srv,
        &admin,
        "tokens",
        "create-api",
        &[
            ("username", "paula"),
            ("label", "backup script"),
            ("role", "admin"),
        ],
    )
    .await;
    assert_eq!(
        errors(&answer),
        vec!["role"],
        "a token never outranks its user: {answer}"
    );
    let (_, answer) = submit(
        &srv,
        &admin,
        "tokens",
        "create-api",
        &[
            ("username", "paula"),
            ("label", "backup script"),
            ("role", "viewer"),
        ],
    )
    .await;
    let token = codes(&answer)[0].clone();
    assert!(token.starts_with("vmhc_api_"), "{answer}");
    let (status, me) = srv.get_as("/api/me", Some(&token)).await;
    assert_eq!((status, me["username"].as_str()), (200, Some("paula")));
    let (_, panel) = page(&srv, &admin, "tokens", "").await;
    assert!(!panel.contains(&token), "the page never shows it again");
    let row = panel
        .split("<tr data-key=\"")
        .find(|row| row.contains(">backup script<"))
        .and_then(|row| row.split('"').next())
        .unwrap()
        .to_owned();
    let (_, answer) = submit(&srv, &admin, "tokens", "revoke-api", &[("key", &row)]).await;
    assert_eq!(verdict(&answer).0, Some(true), "{answer}");
    assert_eq!(srv.get_as("/api/me", Some(&token)).await.0, 401);
    let (_, answer) = submit(&srv, &admin, "tokens", "revoke-api", &[("key", "999999")]).await;
    assert_eq!(
        verdict(&answer).0,
        Some(false),
        "an unknown token is refused: {answer}"
    );

    // A password change from the page, then deleting the user from the row.
    let (_, answer) = submit(
        &srv,
        &admin,
        "users",
        "password",
        &[("username", "paula"), ("password", "another long password")],
    )
    .await;
    assert_eq!(verdict(&answer).0, Some(true), "{answer}");
    let (_, answer) = submit(&srv, &admin, "users", "delete", &[("key", "paula")]).await;
    assert_eq!(verdict(&answer).0, Some(true), "{answer}");
    let (_, users) = srv.get("/api/users").await;
    assert!(!users.to_string().contains("paula"));
    let actions = audit_actions(&srv).await;
    for what in [
        "create_user",
        "create_api_token",
        "revoke_api_token",
        "set_password",
        "delete_user",
    ] {
        assert!(
            actions.contains(&("adam".into(), what.into(), "success".into())),
            "{what} audited: {actions:?}"
        );
    }
    srv.stop().await;
}

/// The audit page filters by who, what and target (kept in its query, so a view can be
/// shared), as `GET /api/audit` does; a target's LIKE wildcards match only themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_page_filters_like_the_api() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let mut srv = TestServer::start(backend, &[]).await;
        let admin = token_for(&srv, "adam", "admin").await;
        add_user(&srv, "bob_1", "viewer").await;
        add_user(&srv, "bobx1", "viewer").await;
        let (_, panel) = page(
            &srv,
            &admin,
            "audit",
            "actor=admin+token&action=create_api_token",
        )
        .await;
        let shown = cells(&panel);
        assert!(shown.contains(&"create_api_token".to_owned()), "{panel}");
        assert!(!shown.contains(&"create_user".to_owned()), "{panel}");
        let (_, panel) = page(&srv, &admin, "audit", "actor=adam").await;
        assert!(
            !cells(&panel).contains(&"create_api_token".to_owned()),
            "only adam's entries: {panel}"
        );
        // The filter form shows what is in force, and is a filter (it changes the address).
        assert!(panel.contains("data-kind=\"filter\""), "{panel}");
        assert!(
            panel.contains("name=\"actor\" type=\"text\" inputmode=\"text\" value=\"adam\""),
            "{panel}"
        );
        let (_, panel) = page(&srv, &admin, "audit", "?target=bob_").await;
        let shown = cells(&panel);
        assert!(shown.contains(&"bob_1".to_owned()), "{shown:?}");
        assert!(
            !shown.contains(&"bobx1".to_owned()),
            "_ is a character, not a wildcard: {shown:?}"
        );
        let (_, api) = srv.get("/api/audit?action=create_user&target=bob_").await;
        assert_eq!(api.as_array().unwrap().len(), 1, "{api}");
        let (status, body) = page(&srv, &admin, "audit", "before=abc").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("before"), "{body}");
        srv.stop().await;
    }
}

/// The add-VM page: install commands carrying this server's address and both agents'
/// hashes; an admin's token filled in (and working); the new VM listed once it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_vm_page_fills_in_commands_and_shows_arrivals() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let operator = token_for(&srv, "olga", "operator").await;
    let admin = token_for(&srv, "adam", "admin").await;
    let served_hash = |file: &'static str| {
        let srv = &srv;
        async move {
            let body = srv
                .http
                .get(srv.url(&format!("/agents/{file}")))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            server::auth::hash_token(std::str::from_utf8(&body).unwrap())
        }
    };
    let linux = served_hash("linux-agent.sh").await;
    let windows = served_hash("windows-agent.ps1").await;
    let (_, panel) = page(&srv, &operator, "add-vm", "").await;
    let commands = codes(&panel).join("\n");
    assert!(
        commands.contains(&linux) && commands.contains(&windows),
        "{panel}"
    );
    assert!(
        commands.contains(&format!("--server {}", srv.base)),
        "{panel}"
    );
    assert!(
        !panel.contains("data-action=\"enrol\""),
        "operators cannot create enrolment tokens"
    );
    let (_, panel) = page(&srv, &admin, "add-vm", "").await;
    assert!(panel.contains("data-action=\"enrol\""), "{panel}");

    let (_, answer) = submit(
        &srv,
        &admin,
        "add-vm",
        "enrol",
        &[
            ("label", "web"),
            ("expires_in_hours", "0"),
            ("max_uses", "1"),
        ],
    )
    .await;
    assert_eq!(errors(&answer), vec!["expires_in_hours"], "{answer}");
    let (_, answer) = submit(
        &srv,
        &admin,
        "add-vm",
        "enrol",
        &[
            ("label", "web"),
            ("expires_in_hours", "24"),
            ("max_uses", "1"),
        ],
    )
    .await;
    assert_eq!(verdict(&answer).0, Some(true), "{answer}");
    // The page's two commands, then the outcome's two with the token filled in.
    let blocks = codes(&answer);
    assert_eq!(blocks.len(), 4, "{answer}");
    let linux_line = &blocks[2];
    let token = linux_line
        .split('\'')
        .find(|part| part.starts_with("vmhc_enrol_"))
        .unwrap_or_else(|| panic!("the token is filled in: {linux_line}"))
        .to_owned();
    assert!(blocks[3].contains(&token), "{answer}");
    let (_, panel) = page(&srv, &admin, "add-vm", "").await;
    assert!(!panel.contains(&token), "shown once only");

    // The token enrols a VM, which the page then lists as just arrived.
    let (status, body) = srv
        .report_raw(
            report_for("fresh-01").to_string().into_bytes(),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, panel) = page(&srv, &operator, "add-vm", "").await;
    assert!(cells(&panel).contains(&"fresh-01".to_owned()), "{panel}");
    srv.stop().await;
}

/// Reports `vmid` on `node` from `host` and waits for the link refresh to propose it.
async fn propose(srv: &TestServer, host: &str, vmid: i64, node: &str) -> i64 {
    let mut r = report_for(host);
    r["vmid"] = json!(vmid);
    r["node"] = json!(node);
    let (status, body) = srv.report(&r).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    wait_for("the proposed link", Duration::from_secs(15), || async {
        let (_, v) = srv.get(&format!("/api/vms/{id}")).await;
        (v["proxmox_vmid"] == vmid && v["link_verified"] == false).then_some(())
    })
    .await;
    id
}

async fn verified(srv: &TestServer, vm: i64) -> bool {
    let (_, body) = srv.get(&format!("/api/vms/{vm}")).await;
    body["link_verified"].as_bool().unwrap()
}

/// The approval queue: bulk approval confirms exactly the proposals shown; a guest two VMs
/// claim is never approved; a proposal the guest changed after the page was read is
/// refused; the REST door behaves the same. A guest cannot get another's link approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn link_queue_approves_only_what_was_shown() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let guests = [
            (101, "pve1"),
            (202, "pve1"),
            (303, "pve2"),
            (404, "pve2"),
            (505, "pve2"),
        ];
        let fake = FakePve::start(
            guests
                .iter()
                .map(|(vmid, node)| FakeVm::running(*vmid, node))
                .collect(),
        )
        .await;
        // Auto-reset off: the VMs fall silent here, and this test is about approvals alone.
        let mut srv =
            crate::proxmox::start(backend, &fake, &[("AUTO_RESET_ENABLED", "false")]).await;
        let operator = token_for(&srv, "olga", "operator").await;
        let alone = propose(&srv, "alone", 101, "pve1").await;
        let claim_a = propose(&srv, "claim-a", 202, "pve1").await;
        let claim_b = propose(&srv, "claim-b", 202, "pve1").await;
        let moving = propose(&srv, "moving", 303, "pve2").await;
        let (_, panel) = page(&srv, &operator, "links", "").await;
        let shown = keys(&panel);
        assert_eq!(shown.len(), 4, "{panel}");
        assert!(
            panel.contains("class=\"bulk\" name=\"do\" value=\"approve\""),
            "{panel}"
        );
        assert_eq!(
            between(&panel, "type=\"checkbox\" name=\"key\" value=\"", "\""),
            shown,
            "one box per proposal, carrying its key"
        );
        assert!(
            cells(&panel)
                .iter()
                .any(|c| c == &format!("yes: vm {claim_b}")),
            "the page says a guest is contested: {panel}"
        );
        // Root inside "moving" re-points its proposal at another guest after the page was read.
        propose(&srv, "moving", 404, "pve2").await;
        let form: Vec<(&str, &str)> = shown.iter().map(|k| ("key", k.as_str())).collect();
        let (status, answer) = submit(&srv, &operator, "links", "approve", &form).await;
        assert_eq!(status, 200, "{answer}");
        let (ok, message) = verdict(&answer);
        assert_eq!(ok, Some(false), "{answer}");
        assert!(message.starts_with("Approved 1."), "{message}");
        assert!(
            message.contains(&format!("vm {moving}: the VM's proposed link is no longer")),
            "{message}"
        );
        assert!(
            message.contains(&format!("vm {claim_a}: the guest is also claimed")),
            "{message}"
        );
        assert!(verified(&srv, alone).await);
        for vm in [claim_a, claim_b, moving] {
            assert!(!verified(&srv, vm).await, "vm {vm} stays unapproved");
        }
        let (_, body) = srv.get(&format!("/api/vms/{moving}")).await;
        assert_eq!(
            body["proxmox_vmid"], 404,
            "the new proposal is left for review"
        );

        // A forged key is refused before anything is approved.
        let (_, answer) = submit(
            &srv,
            &operator,
            "links",
            "approve",
            &[("key", &format!("{moving}:pve2:404:qemu")), ("key", "x:y")],
        )
        .await;
        assert_eq!(errors(&answer), Vec::<String>::new(), "{answer}");
        assert!(
            verdict(&answer).1.contains("key: not a proposal"),
            "{answer}"
        );
        assert!(!verified(&srv, moving).await);

        // The REST door: the same rules.
        let approve = |vm: i64, vmid: i64| {
            let srv = &srv;
            let operator = operator.clone();
            async move {
                srv.send(
                    Method::POST,
                    &format!("/api/vms/{vm}/proxmox/approve"),
                    Some(&operator),
                    Some(json!({"node": "pve2", "vmid": vmid})),
                )
                .await
            }
        };
        assert_eq!(
            approve(moving, 303).await.0,
            409,
            "not what it proposes now"
        );
        let (status, body) = approve(moving, 404).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["link_verified"], true);
        assert_eq!(approve(moving, 404).await.0, 409, "already approved");
        let (status, _) = srv
            .send(
                Method::POST,
                &format!("/api/vms/{moving}/proxmox/approve"),
                Some(AGENT_TOKEN),
                Some(json!({"node": "pve2", "vmid": 404})),
            )
            .await;
        assert_eq!(status, 401, "the fleet token is no operator");
        let actions = audit_actions(&srv).await;
        assert!(actions.contains(&("olga".into(), "approve_link".into(), "approved".into())));

        // One VM's link page: a contested guest offers no approval; by hand; unlink.
        let viewer = token_for(&srv, "vera", "viewer").await;
        let vm_query = |vm: i64| format!("vm={vm}");
        assert_eq!(page(&srv, &viewer, "link", &vm_query(claim_a)).await.0, 403);
        let (status, html) = page(&srv, &operator, "link", "vm=999999").await;
        assert_eq!(status, 404, "{html}");
        let (_, html) = page(&srv, &operator, "link", &vm_query(claim_a)).await;
        assert!(
            html.contains(&format!("also claimed by vm {claim_b}")),
            "{html}"
        );
        assert!(!html.contains("data-action=\"approve\""), "{html}");
        let set = |vm: i64, vmid: &'static str| {
            let srv = &srv;
            let operator = operator.clone();
            async move {
                let vm = vm.to_string();
                submit(
                    srv,
                    &operator,
                    "link",
                    "set",
                    &[
                        ("vm", &vm),
                        ("node", "pve1"),
                        ("vmid", vmid),
                        ("type", "qemu"),
                    ],
                )
                .await
                .1
            }
        };
        assert_eq!(errors(&set(claim_a, "2x").await), vec!["vmid"]);
        assert!(!verified(&srv, claim_a).await);
        let answer = set(claim_a, "202").await;
        assert_eq!(verdict(&answer).0, Some(true), "{answer}");
        assert!(
            answer.contains("data-action=\"unlink\""),
            "the page drawn again: {answer}"
        );
        assert!(
            verified(&srv, claim_a).await,
            "an operator's link is approved"
        );
        // A guest already linked to one VM is not linked to another by hand, here or by API.
        let answer = set(claim_b, "202").await;
        assert_eq!(verdict(&answer).0, Some(false), "{answer}");
        assert!(
            verdict(&answer)
                .1
                .contains(&format!("already linked to vm {claim_a}")),
            "{answer}"
        );
        let (status, _) = srv
            .send(
                Method::PUT,
                &format!("/api/vms/{claim_b}/proxmox"),
                Some(&operator),
                Some(json!({"node": "pve1", "vmid": 202})),
            )
            .await;
        assert_eq!(status, 409);
        assert!(!verified(&srv, claim_b).await);
        let (_, answer) = submit(
            &srv,
            &operator,
            "link",
            "unlink",
            &[("vm", &claim_b.to_string())],
        )
        .await;
        assert_eq!(verdict(&answer).0, Some(true), "{answer}");
        let (_, body) = srv.get(&format!("/api/vms/{claim_b}")).await;
        assert!(body["proxmox_vmid"].is_null(), "{body}");

        // Approving from the page: only the guest the page showed.
        let solo = propose(&srv, "solo", 505, "pve2").await;
        let (_, html) = page(&srv, &operator, "link", &vm_query(solo)).await;
        assert!(html.contains("name=\"vmid\" value=\"505\""), "{html}");
        assert!(
            html.contains("name=\"vmid\" type=\"text\" inputmode=\"decimal\" value=\"\""),
            "linking by hand does not start from what the guest claims: {html}"
        );
        let approve_as = |vmid: &'static str| {
            let srv = &srv;
            let operator = operator.clone();
            async move {
                let vm = solo.to_string();
                submit(
                    srv,
                    &operator,
                    "link",
                    "approve",
                    &[
                        ("vm", &vm),
                        ("node", "pve2"),
                        ("vmid", vmid),
                        ("type", "qemu"),
                    ],
                )
                .await
                .1
            }
        };
        let answer = approve_as("404").await;
        assert_eq!(verdict(&answer).0, Some(false), "a tampered form: {answer}");
        assert!(!verified(&srv, solo).await);
        let answer = approve_as("505").await;
        assert_eq!(verdict(&answer).0, Some(true), "{answer}");
        assert!(verified(&srv, solo).await);
        // Approvals outlive the link refresh (every 200 ms here), which demotes proposals.
        crate::proxmox::wait_rounds(&srv, 10).await;
        for vm in [alone, moving, solo] {
            assert!(
                verified(&srv, vm).await,
                "vm {vm} still approved after refreshes"
            );
        }
        assert_eq!(
            fake.action_attempts(),
            Vec::<String>::new(),
            "nothing was powered"
        );
        assert!(actions.iter().any(|(who, what, outcome)| who == "olga"
            && what == "approve_link"
            && outcome.starts_with("refused")));
        srv.stop().await;
    }
}

/// The alerts page: operators plan windows over a VM or tag, snooze and tag VMs; admins
/// also manage channels and rules. Each form goes through its REST twin's service: the
/// same refusals (a fleet-wide window needs an admin), the same records, and no secret is
/// ever drawn back. A tag then filters the fleet (`tag:db`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_page_plans_windows_snoozes_tags_and_routes_like_the_api() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let viewer = token_for(&srv, "vera", "viewer").await;
    let operator = token_for(&srv, "olga", "operator").await;
    let admin = token_for(&srv, "adam", "admin").await;
    let (_, db_vm) = srv.report(&report_for("db-01")).await;
    let (_, web_vm) = srv.report(&report_for("web-01")).await;
    let db_id = db_vm["vm_id"].as_i64().unwrap().to_string();
    let web_id = web_vm["vm_id"].as_i64().unwrap().to_string();

    assert_eq!(page(&srv, &viewer, "alerts", "").await.0, 403);
    let (status, html) = page(&srv, &operator, "alerts", &format!("?vm={db_id}")).await;
    assert_eq!(status, 200, "{html}");
    assert!(!html.contains("Add a channel"), "channels are an admin's");
    assert!(
        html.contains(&format!("value=\"{db_id}\"")),
        "the VM is filled in"
    );

    // Tags: set through the page, read back through the API.
    let (status, html) = submit(
        &srv,
        &operator,
        "alerts",
        "tags",
        &[("vm", &db_id), ("tags", "DB, site:paris")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    let (_, tags) = srv.get(&format!("/api/vms/{db_id}/tags")).await;
    assert_eq!(
        tags,
        json!({"tags": ["db", "site:paris"], "proxmox_tags": []})
    );
    let (_, html) = submit(
        &srv,
        &operator,
        "alerts",
        "tags",
        &[("vm", &web_id), ("tags", "no spaces allowed")],
    )
    .await;
    assert_eq!(errors(&html), vec!["tags"], "{html}");

    // The fleet filtered by tag shows only the tagged VM.
    let fleet = srv.page("/?q=tag%3Adb").await;
    assert!(fleet.contains("db-01"), "{fleet}");
    assert!(!fleet.contains("web-01"), "an untagged VM is filtered out");
    let fleet = srv.page("/?q=tag%3Anobody").await;
    assert!(!fleet.contains("db-01"));

    // Windows: a tag one by an operator; a fleet-wide one refused to them; a bad time named.
    let (_, html) = submit(
        &srv,
        &operator,
        "alerts",
        "window-add",
        &[
            ("name", "db patching"),
            ("scope", "tag"),
            ("value", "db"),
            ("starts_ms", "2030-01-01 02:00"),
            ("ends_ms", "2030-01-01 04:00"),
        ],
    )
    .await;
    assert_eq!(
        verdict(&html),
        (Some(true), "Planned db patching.".into()),
        "{html}"
    );
    let (status, _) = submit(
        &srv,
        &operator,
        "alerts",
        "window-add",
        &[
            ("name", "everything"),
            ("scope", "all"),
            ("starts_ms", "2030-01-01 02:00"),
            ("ends_ms", "2030-01-01 04:00"),
        ],
    )
    .await;
    assert_eq!(status, 403, "a fleet-wide window needs an admin");
    let (_, html) = submit(
        &srv,
        &operator,
        "alerts",
        "window-add",
        &[
            ("name", "bad"),
            ("scope", "vm"),
            ("value", &web_id),
            ("starts_ms", "tomorrow"),
            ("ends_ms", "2030-01-01 04:00"),
        ],
    )
    .await;
    assert_eq!(errors(&html), vec!["starts_ms"], "{html}");
    let (_, html) = submit(
        &srv,
        &operator,
        "alerts",
        "snooze",
        &[("vm", &web_id), ("hours", "2")],
    )
    .await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    let (_, windows) = srv.get("/api/maintenance").await;
    let names: Vec<&str> = windows
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["db patching", &format!("snooze of VM {web_id}")]
    );
    let window_id = windows[0]["id"].as_i64().unwrap().to_string();
    let (_, html) = submit(
        &srv,
        &operator,
        "alerts",
        "window-delete",
        &[("key", &window_id)],
    )
    .await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    let (_, windows) = srv.get("/api/maintenance").await;
    assert_eq!(windows.as_array().unwrap().len(), 1);

    // Channels and rules: an operator's forged form is refused; an admin's secret is kept
    // and never drawn back.
    let hook = [
        ("name", "ops hook"),
        ("kind", "webhook"),
        ("target", "http://127.0.0.1:9/hook"),
        ("secret", "hmac-key-never-shown"),
    ];
    assert_eq!(
        submit(&srv, &operator, "alerts", "channel-add", &hook)
            .await
            .0,
        403
    );
    // A token in a shown URL's query string is refused, and the form is not drawn back.
    let (_, html) = submit(
        &srv,
        &admin,
        "alerts",
        "channel-add",
        &[
            ("name", "ntfy"),
            ("kind", "ntfy"),
            ("target", "https://ntfy.example/alerts?auth=tk-never-shown"),
        ],
    )
    .await;
    assert_eq!(errors(&html), vec!["target"], "{html}");
    assert!(!html.contains("tk-never-shown"), "{html}");
    let (_, html) = submit(&srv, &admin, "alerts", "channel-add", &hook).await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    assert!(!html.contains("hmac-key-never-shown"));
    assert!(cells(&html).contains(&"set".to_owned()), "{html}");
    let (_, channels) = srv.get("/api/notify/channels").await;
    let channel_id = channels[0]["id"].as_i64().unwrap().to_string();
    // Nothing listens on port 9: the test button says it failed.
    let (_, html) = submit(
        &srv,
        &admin,
        "alerts",
        "channel-test",
        &[("key", &channel_id)],
    )
    .await;
    let (ok, message) = verdict(&html);
    assert_eq!(ok, Some(false), "{html}");
    assert!(message.starts_with("The test message failed"), "{message}");
    let (_, html) = submit(
        &srv,
        &admin,
        "alerts",
        "rule-add",
        &[("channel", "ops hook"), ("kinds", "vm_down, bogus")],
    )
    .await;
    assert_eq!(errors(&html), vec!["kinds"], "{html}");
    let (_, html) = submit(
        &srv,
        &admin,
        "alerts",
        "rule-add",
        &[
            ("channel", "ops hook"),
            ("kinds", "vm_down, vm_recovered"),
            ("tag", "db"),
            ("repeat_minutes", "60"),
        ],
    )
    .await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");
    let (_, rules) = srv.get("/api/notify/rules").await;
    assert_eq!(rules[0]["kinds"], json!(["vm_down", "vm_recovered"]));
    assert_eq!(rules[0]["tag"], "db");
    assert_eq!(rules[0]["repeat_ms"], 3_600_000);

    // A recurring window is an admin's to plan and to end.
    let (status, weekly) = srv
        .send(
            Method::POST,
            "/api/maintenance",
            Some(&admin),
            Some(json!({"name": "weekly", "scope": "tag", "value": "db",
                        "cron": "0 2 * * 6", "duration_minutes": 60})),
        )
        .await;
    assert_eq!(status, 201, "{weekly}");
    let weekly = weekly["id"].as_i64().unwrap().to_string();
    let (status, _) = submit(
        &srv,
        &operator,
        "alerts",
        "window-delete",
        &[("key", &weekly)],
    )
    .await;
    assert_eq!(
        status, 403,
        "an operator cannot end an admin's recurring window"
    );
    let (status, _) = srv
        .send(
            Method::DELETE,
            &format!("/api/maintenance/{weekly}"),
            Some(&operator),
            None,
        )
        .await;
    assert_eq!(status, 403, "nor through the API");
    let (_, html) = submit(&srv, &admin, "alerts", "window-delete", &[("key", &weekly)]).await;
    assert_eq!(verdict(&html).0, Some(true), "{html}");

    let actions = audit_actions(&srv).await;
    for (who, what) in [
        ("olga", "vm.tags"),
        ("olga", "maintenance.create"),
        ("olga", "vm.snooze"),
        ("olga", "maintenance.delete"),
        ("adam", "notify.channel.create"),
        ("adam", "notify.rule.create"),
        ("olga", "alerts:channel-add"),
    ] {
        assert!(
            actions.iter().any(|(a, w, _)| a == who && w == what),
            "{who} {what} audited: {actions:?}"
        );
    }
    srv.stop().await;
}
