//! The OpenAPI document: served to callers with a credential only, valid OpenAPI 3.1 as an
//! independent validator reads it, and naming exactly the routes the server has.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::Command;

/// Every `(METHOD, path)` the REST router declares, read from its route table: a route
/// added there without a document entry fails the test below.
fn declared_routes() -> BTreeSet<(String, String)> {
    let source = std::fs::read_to_string(workspace_root().join("server/src/http/mod.rs")).unwrap();
    let mut routes = BTreeSet::new();
    for chunk in source.split(".route(").skip(1) {
        let chunk = chunk.split(".layer(DefaultBodyLimit").next().unwrap();
        let path = chunk.split('"').nth(1).unwrap().to_owned();
        for method in ["get", "post", "put", "delete", "any"] {
            let calls = chunk.matches(&format!("{method}(")).count();
            // Handlers are named `module::name`, so `get(` is only ever the method router.
            if calls > 0 {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_validates() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;

    // Like everything else, it needs a credential.
    let (status, body) = srv.get_as("/api/openapi.json", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, doc) = srv.get("/api/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    // Every declared route is documented, and nothing documented is missing from the
    // router. The catch-all that answers unknown API paths with 404 is not a route.
    let mut declared = declared_routes();
    assert!(
        declared.len() > 50,
        "the route table was not read: {declared:?}"
    );
    assert!(declared.remove(&("ANY".into(), "/api/{*rest}".into())));
    let documented = documented_routes(&doc);
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&declared).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        phantom.is_empty(),
        "documented routes the server lacks: {phantom:?}"
    );

    // Operation ids are unique (client generators name functions by them).
    let mut ids = BTreeSet::new();
    for item in doc["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            let id = operation["operationId"].as_str().unwrap();
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
        }
    }

    // Ids name their own operation.
    for (path, method, id) in [
        ("/api/vms/{id}/credential", "post", "rotate_credential"),
        ("/api/vms/{id}/credential", "delete", "revoke_credential"),
        ("/api/login", "post", "login"),
        ("/api/notify/channels", "post", "create_channel"),
        ("/api/vms", "get", "list_vms"),
        ("/api/audit", "get", "audit_log"),
    ] {
        assert_eq!(
            doc["paths"][path][method]["operationId"], id,
            "{method} {path}"
        );
    }

    // The one error shape, referenced by every operation.
    let error = &doc["components"]["schemas"]["ErrorDetail"];
    assert_eq!(
        error["required"],
        serde_json::json!(["code", "message"]),
        "{error}"
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            assert_eq!(
                operation["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
        }
    }
    // Every JSON answer has a real schema: a named one, a list of named ones, or an inline
    // object that says what it requires; never a bare `object`.
    let mut answered = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for (code, response) in operation["responses"].as_object().unwrap() {
                let Some(schema) = response["content"]
                    .get("application/json")
                    .map(|c| &c["schema"])
                else {
                    continue;
                };
                let typed = schema.get("$ref").is_some()
                    || schema["items"].get("$ref").is_some()
                    || schema["required"].is_array();
                assert!(typed, "{method} {path} {code}: untyped answer {schema}");
                answered.push(schema.clone());
            }
        }
    }
    // What the server sends always carries every member it has: a member that may be left
    // out must be one the server really omits (`skip_serializing_if`), listed here.
    let omitted = [
        ("ErrorDetail", "field"),
        ("ReportAccepted", "warnings"),
        ("ReportAccepted", "credential"),
    ];
    let schemas = &doc["components"]["schemas"];
    let mut seen = BTreeSet::new();
    let mut pending: Vec<(String, Value)> = answered
        .into_iter()
        .map(|schema| ("(inline)".to_owned(), schema))
        .collect();
    while let Some((name, schema)) = pending.pop() {
        let mut stack = vec![schema];
        while let Some(value) = stack.pop() {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let target = target.rsplit('/').next().unwrap().to_owned();
                        if seen.insert(target.clone()) {
                            pending.push((target.clone(), schemas[target.as_str()].clone()));
                        }
                    }
                    if let Some(Value::Object(properties)) = map.get("properties") {
                        let required = map["required"].as_array().cloned().unwrap_or_default();
                        for member in properties.keys() {
                            assert!(
                                required.contains(&Value::from(member.as_str()))
                                    || omitted.contains(&(name.as_str(), member.as_str())),
                                "{name}.{member} is sent always but not documented as required"
                            );
                        }
                    }
                    stack.extend(map.into_values());
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }
    assert!(
        seen.contains("VmView") && seen.contains("ErrorBody"),
        "{seen:?}"
    );
    // The live stream documents its events, one schema per kind.
    let events = &doc["paths"]["/api/live"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"];
    assert_eq!(
        events["oneOf"].as_array().map(Vec::len),
        Some(2),
        "{events}"
    );
    // A report's body is the heartbeat contract, so generated reports can be stored.
    let report = &doc["paths"]["/api/health/report"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    assert!(
        report["required"]
            .as_array()
            .is_some_and(|fields| fields.contains(&Value::from("hostname"))),
        "{report}"
    );

    // Public routes say so; the rest inherit the document's token-or-session rule.
    assert_eq!(
        doc["paths"]["/api/health"]["get"]["security"],
        serde_json::json!([{}])
    );
    assert!(doc["paths"]["/api/vms"]["get"].get("security").is_none());
    assert_eq!(doc["security"].as_array().unwrap().len(), 2);

    // An independent validator of OpenAPI 3.1 accepts it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3 with openapi-spec-validator (pip: openapi-spec-validator)");
    assert!(
        out.status.success(),
        "the validator refused the document: {:.2000}{:.2000}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the parameterless reads answer has the documented top-level shape (a list where
    // a list is documented), with a VM on file so the lists are not empty.
    assert_eq!(srv.report(&report_for("doc-01")).await.0, 200);
    for (method, path) in &documented {
        if method != "GET" || path.contains('{') || path == "/api/live" {
            continue;
        }
        let answer = srv
            .http
            .get(srv.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{path}");
        let documented = &doc["paths"][path.as_str()]["get"]["responses"]["200"]["content"];
        let Some(schema) = documented.get("application/json").map(|c| &c["schema"]) else {
            continue;
        };
        let body: Value = answer.json().await.unwrap();
        // A `$ref` names one of the schemas, all objects.
        let expected = schema["type"].as_str().unwrap_or("object");
        let actual = match body {
            Value::Array(_) => "array",
            Value::Object(_) => "object",
            _ => "other",
        };
        assert_eq!(actual, expected, "{path}: documented {schema}");
    }

    // The page for people names every route, and needs a credential too.
    let anonymous = srv.http.get(srv.url("/api/docs")).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let page = srv.page("/api/docs").await;
    for (method, path) in &documented {
        assert!(
            page.contains(&format!("<code>{method} {path}</code>")),
            "{method} {path}"
        );
    }
    srv.stop().await;
}

/// The validator is not a rubber stamp: a document with a broken reference is refused.
#[test]
fn the_validator_refuses_a_broken_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.json");
    let broken = serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "x", "version": "1"},
        "paths": {"/x": {"get": {"responses": {"200": {"$ref": "#/components/responses/nope"}}}}}
    });
    std::fs::write(&file, broken.to_string()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
