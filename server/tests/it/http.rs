//! The HTTP layer's contract: typed ids, caller checks, and errors that answer JSON with the
//! right status and never leak internal detail.

use crate::both_backends;
use crate::common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// Sends a request and keeps the headers and the raw body, for checks `send` cannot make.
async fn raw(
    srv: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = srv.http.request(method, srv.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

fn is_json(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// A route taking a VM id: method, path after `/api/vms/{id}`, and a valid body.
struct IdRoute {
    method: Method,
    suffix: &'static str,
    body: Option<&'static [u8]>,
}

const fn id_route(method: Method, suffix: &'static str, body: Option<&'static [u8]>) -> IdRoute {
    IdRoute {
        method,
        suffix,
        body,
    }
}

async fn bad_ids_are_400_naming_id(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let routes = [
        id_route(Method::GET, "", None),
        id_route(Method::GET, "/metrics", None),
        id_route(Method::GET, "/reset-history", None),
        id_route(Method::DELETE, "", None),
        id_route(Method::POST, "/reset", None),
        id_route(Method::POST, "/shutdown", None),
        id_route(Method::POST, "/acknowledge", None),
        id_route(Method::PUT, "/auto-reset", Some(br#"{"enabled": true}"#)),
        id_route(
            Method::PUT,
            "/proxmox",
            Some(br#"{"node": null, "vmid": null}"#),
        ),
    ];
    for bad in [
        "abc",
        "0",
        "-1",
        "1.5",
        "99999999999999999999",
        "%FF",
        "1%20",
    ] {
        for route in &routes {
            let method = route.method.clone();
            let path = format!("/api/vms/{bad}{}", route.suffix);
            let token = Some(ADMIN_TOKEN);
            let body = route.body.map(<[u8]>::to_vec);
            let (status, headers, text) = raw(&srv, method.clone(), &path, token, body).await;
            assert_eq!(status, 400, "{method} {path}: {text}");
            assert!(is_json(&headers), "{method} {path}: {headers:?}");
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                body,
                json!({"error": {
                    "code": "bad_request",
                    "message": "must be a positive integer",
                    "field": "id",
                }}),
                "{method} {path}"
            );
        }
    }
    // The caller is checked before the id: a stranger learns nothing about ids.
    let (status, _, _) = raw(&srv, Method::DELETE, "/api/vms/abc", None, None).await;
    assert_eq!(status, 401);
    srv.stop().await;
}
both_backends!(bad_ids_are_400_naming_id);

async fn missing_or_wrong_tokens_are_401_with_a_challenge(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (_, body) = srv.report(&report_for("guarded")).await;
    let id = body["vm_id"].as_i64().unwrap();
    let admin_routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::DELETE, format!("/api/vms/{id}"), None),
        (
            Method::PUT,
            "/api/status/config".into(),
            Some(json!({"cpu_threshold": 1})),
        ),
        (Method::POST, format!("/api/vms/{id}/reset"), None),
        (Method::POST, format!("/api/vms/{id}/shutdown"), None),
        (Method::POST, format!("/api/vms/{id}/acknowledge"), None),
        (
            Method::PUT,
            format!("/api/vms/{id}/auto-reset"),
            Some(json!({"enabled": false})),
        ),
        (
            Method::PUT,
            format!("/api/vms/{id}/proxmox"),
            Some(json!({"node": null, "vmid": null})),
        ),
    ];
    for (method, path, body) in admin_routes {
        for token in [None, Some("wrong"), Some(AGENT_TOKEN), Some("")] {
            let body = body.as_ref().map(|b| b.to_string().into_bytes());
            let (status, headers, text) = raw(&srv, method.clone(), &path, token, body).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {text}");
            assert_eq!(headers["www-authenticate"], "Bearer", "{method} {path}");
            assert!(is_json(&headers));
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                json!({"error": {"code": "unauthorized", "message": "missing or invalid token"}})
            );
        }
    }
    // A Basic credential carrying the right secret is still not a bearer token.
    let resp = srv
        .http
        .delete(srv.url(&format!("/api/vms/{id}")))
        .header("authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    for token in [None, Some("wrong"), Some(ADMIN_TOKEN)] {
        let body = Some(report_for("guarded").to_string().into_bytes());
        let (status, headers, _) = raw(&srv, Method::POST, "/api/health/report", token, body).await;
        assert_eq!(status, 401, "report with {token:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    // Nothing was changed by any of them.
    assert_eq!(srv.vm_count().await, 1);
    let (_, vm) = srv.get(&format!("/api/vms/{id}")).await;
    assert_eq!(vm["auto_reset"], true, "{vm}");
    srv.stop().await;
}
both_backends!(missing_or_wrong_tokens_are_401_with_a_challenge);

/// Lets a row hold a remediation phase no version knows, as a newer or broken writer might.
async fn corrupt_remediation_phase(srv: &TestServer, backend: Backend, id: i64) {
    use diesel_async::SimpleAsyncConnection;
    let sql = match backend {
        Backend::Sqlite => format!(
            "DROP TRIGGER vms_remediation_phase_check_update; \
             UPDATE vms SET remediation_phase = 'bogus' WHERE id = {id};"
        ),
        Backend::Postgres => format!(
            "ALTER TABLE vms DROP CONSTRAINT vms_remediation_phase_check; \
             UPDATE vms SET remediation_phase = 'bogus' WHERE id = {id};"
        ),
    };
    let mut pooled = srv.state().db.conn().await.unwrap();
    let conn = &mut pooled;
    server::with_conn!(conn, |c| c.batch_execute(&sql).await).unwrap();
}

async fn unreadable_stored_value_is_a_logged_500_not_a_503(backend: Backend) {
    // An unreachable Redis makes the fleet read come from the database, not the cache.
    let redis = format!("redis://127.0.0.1:{}", free_port());
    let mut srv = TestServer::start(backend, &[("REDIS_URL", &redis)]).await;
    let (status, body) = srv.report(&report_for("corrupt-01")).await;
    assert_eq!(status, 200, "{body}");
    let id = body["vm_id"].as_i64().unwrap();
    assert_eq!(srv.get("/api/vms").await.0, 200);
    corrupt_remediation_phase(&srv, backend, id).await;

    // (`/api/status` counts the status column alone, which is intact here.)
    for path in ["/api/vms".to_owned(), format!("/api/vms/{id}")] {
        let (status, headers, text) = raw(&srv, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
        assert_eq!(status, 500, "{path}: {text}");
        assert!(
            headers.get("retry-after").is_none(),
            "{path}: a corrupt row is not an outage"
        );
        assert!(is_json(&headers));
        // Generic: neither the value, the column nor the database's words reach the client.
        assert_eq!(
            text, r#"{"error":{"code":"internal","message":"internal error"}}"#,
            "{path}"
        );
    }
    srv.stop().await;
}
both_backends!(unreadable_stored_value_is_a_logged_500_not_a_503);

async fn extreme_metric_ranges_are_400(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (_, body) = srv.report(&report_for("ranges-01")).await;
    let id = body["vm_id"].as_i64().unwrap();
    for vm in [1, id] {
        for query in [
            "from=-9223372036854775807&to=9223372036854775807",
            "from=-9223372036854775808&to=0",
            "from=-9223372036854775807&to=-9223372036854775000",
            "from=9223372036854775000&to=9223372036854775807",
            "from=0&to=99999999999999999999",
            "points=abc",
            "points=-1",
        ] {
            let path = format!("/api/vms/{vm}/metrics?{query}");
            let (status, headers, text) =
                raw(&srv, Method::GET, &path, Some(ADMIN_TOKEN), None).await;
            assert_eq!(status, 400, "{path}: {text}");
            assert!(is_json(&headers), "{path}");
            let error: Value = serde_json::from_str(&text).unwrap();
            assert!(is_error_body(&error), "{path}: {text}");
        }
    }
    // Far but writable bounds are fine.
    let (status, hist) = srv
        .get(&format!(
            "/api/vms/{id}/metrics?from=2020-01-01T00:00:00Z&to=2020-12-31T00:00:00Z"
        ))
        .await;
    assert_eq!(status, 200, "{hist}");
    assert_eq!(hist["points"], json!([]));
    srv.stop().await;
}
both_backends!(extreme_metric_ranges_are_400);

async fn bodies_and_answers_keep_their_shapes(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (_, body) = srv.report(&report_for("shapes-01")).await;
    let id = body["vm_id"].as_i64().unwrap();

    let (status, answer) = srv
        .send(
            Method::PUT,
            &format!("/api/vms/{id}/auto-reset"),
            Some(ADMIN_TOKEN),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"vm_id": id, "auto_reset": false}));

    let (status, answer) = srv
        .send(
            Method::PUT,
            "/api/status/config",
            Some(ADMIN_TOKEN),
            Some(json!({"ram_threshold": 95})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["config"]["ram_threshold"], 95.0);
    assert_eq!(answer["changed_vms"], 0);
    assert_eq!(answer.as_object().unwrap().len(), 2);

    let (status, answer) = srv.get("/api/remediation").await;
    assert_eq!(status, 200);
    assert!(
        answer["summary"].is_object() && answer["events"].is_array(),
        "{answer}"
    );

    // Not waiting for an operator: a conflict, in JSON.
    let (status, answer) = srv
        .send(
            Method::POST,
            &format!("/api/vms/{id}/acknowledge"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, 409);
    assert!(is_error_body(&answer), "{answer}");

    // Bodies: the wrong field is named; trailing garbage and oversize bodies are refused.
    let path = format!("/api/vms/{id}/auto-reset");
    for (body, expected, prefix) in [
        (br#"{"enabled": "yes"}"#.to_vec(), 400, "enabled: "),
        (
            br#"{"enabled": true, "x": 1}"#.to_vec(),
            400,
            "x: unknown field",
        ),
        (br#"{"enabled": true} {}"#.to_vec(), 400, "body: "),
        (Vec::new(), 400, "body: "),
        (vec![b' '; 65 * 1024], 413, "request body larger than"),
    ] {
        let (status, headers, text) =
            raw(&srv, Method::PUT, &path, Some(ADMIN_TOKEN), Some(body)).await;
        assert_eq!(status, expected, "{text}");
        assert!(is_json(&headers));
        let error: Value = serde_json::from_str(&text).unwrap();
        assert!(error_text(&error).starts_with(prefix), "{prefix}: {text}");
    }
    let (_, vm) = srv.get(&format!("/api/vms/{id}")).await;
    assert_eq!(vm["auto_reset"], false);

    let (status, headers, text) = raw(&srv, Method::GET, "/api/nothing/here", None, None).await;
    assert_eq!(status, 404);
    assert!(is_json(&headers));
    assert_eq!(
        text,
        r#"{"error":{"code":"not_found","message":"not found"}}"#
    );
    srv.stop().await;
}
both_backends!(bodies_and_answers_keep_their_shapes);
