//! The REST API's OpenAPI 3.1 document, generated from the handlers, and a page that reads it.

use super::error::{ApiError, ErrorBody};
use super::extract::Viewer;
use super::{enrolment, health, live, metrics, notify, people, remediation, report, status, vms};
use axum::Json;
use axum::response::Html;
use std::fmt::Write as _;
use std::sync::OnceLock;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vm-healthcheck",
        description = "Health monitoring and automatic remediation for Proxmox VE guests.\n\n\
            Every request but `GET /api/health`, sign-in and setup needs an API token \
            (`Authorization: Bearer ...`, created by an admin) or the dashboard's session \
            cookie. Agents report with their own credential. Every error answers \
            `{\"error\": {\"code\", \"message\", \"field\"?}}`: `code` is stable, `field` names \
            the input that was wrong."
    ),
    paths(
        health::health, report::report,
        people::login, people::logout, people::setup, people::me, people::list_users,
        people::create_user, people::delete_user, people::set_password, people::list_api_tokens,
        people::create_api_token, people::revoke_api_token, people::audit, people::form_login,
        people::form_logout, people::form_setup,
        vms::list, vms::get, vms::delete, vms::metrics, vms::reset_history, vms::link,
        vms::approve_link, vms::set_auto_reset,
        enrolment::rotate, enrolment::revoke, enrolment::list_tokens, enrolment::create_token,
        enrolment::revoke_token,
        remediation::reset, remediation::shutdown, remediation::acknowledge, remediation::hold,
        remediation::overview,
        live::stream,
        status::proxmox_check, status::summary, status::get_config, status::put_config,
        status::get_settings, status::put_settings,
        notify::get_tags, notify::put_tags, notify::snooze, notify::list_channels,
        notify::create_channel, notify::delete_channel, notify::test_channel, notify::list_rules,
        notify::create_rule, notify::delete_rule, notify::messages, notify::list_windows,
        notify::create_window, notify::delete_window,
        metrics::metrics,
        document, docs,
    ),
    components(schemas(ErrorBody, domain::DeliveryState)),
    modifiers(&Conventions),
    security(("token" = []), ("session" = [])),
    tags(
        (name = "service", description = "The monitor's own health, settings and metrics"),
        (name = "agents", description = "Reports and agent credentials"),
        (name = "vms", description = "The fleet"),
        (name = "remediation", description = "Power actions and the engine"),
        (name = "notify", description = "Notifications, maintenance windows, tags"),
        (name = "people", description = "Users, sessions, API tokens, the audit log"),
    )
)]
pub struct ApiDoc;

/// What every operation shares: how callers prove who they are, and the error body.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token an admin created (POST /api/tokens)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "vmhc_session",
                "The dashboard's session, after POST /api/login",
            ))),
        );
        components.add_security_scheme(
            "agent",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The VM's agent credential, or an enrolment token on its first report",
                    ))
                    .build(),
            ),
        );
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                        .build(),
                )
                .build()
        };
        // Bodies the derive cannot describe: this document, a report (read loosely) and the
        // live stream's events.
        let content = |schema| ContentBuilder::new().schema(Some(schema)).build();
        if let Some(RefOr::T(answer)) = operation(doc, "/api/openapi.json")
            .and_then(|operation| operation.responses.responses.get_mut("200"))
        {
            answer
                .content
                .insert("application/json".into(), content(document_schema()));
        }
        if let Some(RefOr::T(answer)) = operation(doc, "/api/live")
            .and_then(|operation| operation.responses.responses.get_mut("200"))
        {
            answer
                .content
                .insert("text/event-stream".into(), content(live_event_schema()));
        }
        if let Some(body) = operation(doc, "/api/health/report")
            .and_then(|operation| operation.request_body.as_mut())
        {
            body.content
                .insert("application/json".into(), content(report_schema()));
        }
        for item in doc.paths.paths.values_mut() {
            for operation in operations(item) {
                operation
                    .responses
                    .responses
                    .entry("4XX".into())
                    .or_insert_with(|| {
                        RefOr::T(error(
                            "The request was refused; `code` and `message` say why",
                        ))
                    });
                operation
                    .responses
                    .responses
                    .entry("5XX".into())
                    .or_insert_with(|| RefOr::T(error("The service failed or is unavailable")));
            }
        }
    }
}

/// What `GET /api/openapi.json` answers: an OpenAPI 3.1 document, its top level checked
/// here and the rest as the specification has it.
fn document_schema() -> RefOr<utoipa::openapi::schema::Schema> {
    let object = || Object::with_type(Type::Object);
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "openapi",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^3\.1\.[0-9]+$")),
        )
        .required("openapi")
        .property("info", object())
        .required("info")
        .property("paths", object())
        .required("paths")
        .property("components", object())
        .required("components")
        .into()
}

/// The heartbeat contract (`domain::heartbeat`) as agents send it. The parser reads the
/// optional parts loosely (one of the wrong shape is dropped with a warning), so this is
/// what a good agent sends, not all that is accepted.
fn report_schema() -> RefOr<utoipa::openapi::schema::Schema> {
    let count = |minimum: i64| serde_json::json!({"type": "integer", "minimum": minimum});
    let text = serde_json::json!({"type": "string"});
    json_schema(serde_json::json!({
        "type": "object",
        "required": [
            "hostname", "os", "cpu_percent", "ram_used_bytes", "ram_total_bytes",
            "uptime_seconds"
        ],
        "properties": {
            "hostname": {
                "type": "string", "minLength": 1, "maxLength": 253,
                "description": "Letters, digits, '.', '-' and '_'"
            },
            "os": {"type": "string", "enum": ["linux", "windows", "other"]},
            "machine_id": {"type": "string", "description": "A UUID"},
            "vmid": {"type": "integer", "minimum": 100, "maximum": 999_999_999},
            "node": text,
            "cpu_percent": {"type": "number", "minimum": 0, "maximum": 100},
            "ram_used_bytes": count(0),
            "ram_total_bytes": count(1),
            "disks": {
                "type": "array",
                "description": "One entry per filesystem; of more than 64, the 64 fullest are kept",
                "items": {
                    "type": "object",
                    "required": ["mount", "used_bytes", "total_bytes"],
                    "properties": {
                        "mount": text, "used_bytes": count(0), "total_bytes": count(0)
                    }
                }
            },
            "uptime_seconds": count(0),
            "agent_version": text,
            "observed_at": {"type": "string", "format": "date-time"}
        }
    }))
}

/// One event of `GET /api/live`, as a client reads it (Open API 3.1 has the schema of an
/// event stream describe each event): the mode, then which VMs changed.
fn live_event_schema() -> RefOr<utoipa::openapi::schema::Schema> {
    json_schema(serde_json::json!({
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["mode"]},
                    "data": {
                        "type": "string", "enum": ["push", "poll"],
                        "description": "push: changes arrive here; poll: the page must poll too"
                    },
                    "retry": {"type": "integer", "minimum": 0}
                }
            },
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["change"]},
                    "data": {
                        "type": "string", "pattern": "^([*]|[0-9]+(,[0-9]+)*)$",
                        "description": "`*` (reload everything) or the ids of the VMs that changed"
                    }
                }
            }
        ]
    }))
}

/// A schema written as JSON; one that does not read is a bug the document's test finds (the
/// body stays free-form).
fn json_schema(schema: serde_json::Value) -> RefOr<utoipa::openapi::schema::Schema> {
    serde_json::from_value(schema).unwrap_or_else(|err| {
        tracing::error!(error = %err, "a hand-written schema does not read");
        Object::with_type(Type::Object).into()
    })
}

/// The one operation at `path` (each path with a hand-written body has one).
fn operation<'a>(doc: &'a mut utoipa::openapi::OpenApi, path: &str) -> Option<&'a mut Operation> {
    operations(doc.paths.paths.get_mut(path)?).next()
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// The document, built once.
pub fn document_json() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}

/// This API's OpenAPI 3.1 document.
// `Conventions` replaces the free-form body below with the document's own schema.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
pub async fn document(_viewer: Viewer) -> Json<&'static serde_json::Value> {
    Json(document_json())
}

/// The API described for people: every route, who may call it, what it takes and answers.
#[utoipa::path(
    get,
    path = "/api/docs",
    tag = "service",
    responses((status = 200, description = "An HTML page", body = String, content_type = "text/html"))
)]
pub async fn docs(_viewer: Viewer) -> Result<Html<&'static str>, ApiError> {
    static PAGE: OnceLock<String> = OnceLock::new();
    Ok(Html(PAGE.get_or_init(|| render(&ApiDoc::openapi()))))
}

/// The document as a plain page: no script, so it works under the dashboard's policy.
fn render(doc: &utoipa::openapi::OpenApi) -> String {
    let mut page = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>vm-healthcheck API</title><link rel=\"stylesheet\" href=\"/pkg/frontend.css\">\
         </head><body><main class=\"api-docs\"><h1>vm-healthcheck API</h1>",
    );
    if let Some(text) = &doc.info.description {
        for paragraph in text.split("\n\n") {
            let _ = write!(page, "<p>{}</p>", escape(paragraph));
        }
    }
    page.push_str(
        "<p>The machine-readable document: <a href=\"/api/openapi.json\">/api/openapi.json</a> \
         (OpenAPI 3.1).</p>",
    );
    for (path, item) in &doc.paths.paths {
        for (method, operation) in [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
        ] {
            let Some(operation) = operation else { continue };
            let _ = write!(
                page,
                "<section><h2><code>{method} {}</code></h2>",
                escape(path)
            );
            for text in [&operation.summary, &operation.description]
                .into_iter()
                .flatten()
            {
                let _ = write!(page, "<p>{}</p>", escape(text));
            }
            if let Some(params) = &operation.parameters {
                page.push_str("<ul>");
                for param in params {
                    let _ = write!(
                        page,
                        "<li><code>{}</code> (in {}{}){}</li>",
                        escape(&param.name),
                        match param.parameter_in {
                            ParameterIn::Path => "path",
                            ParameterIn::Query => "query",
                            ParameterIn::Header => "header",
                            ParameterIn::Cookie => "cookie",
                        },
                        if matches!(param.required, utoipa::openapi::Required::True) {
                            ", required"
                        } else {
                            ""
                        },
                        param
                            .description
                            .as_deref()
                            .map(|d| format!(": {}", escape(d)))
                            .unwrap_or_default()
                    );
                }
                page.push_str("</ul>");
            }
            if let Some(body) = &operation.request_body {
                for (kind, content) in &body.content {
                    let _ = write!(
                        page,
                        "<p>Body: <code>{}</code> {}</p>",
                        escape(kind),
                        schema_name(content.schema.as_ref())
                    );
                }
            }
            page.push_str("<ul>");
            for (code, response) in &operation.responses.responses {
                if let RefOr::T(response) = response {
                    let _ = write!(
                        page,
                        "<li><code>{}</code> {}</li>",
                        escape(code),
                        escape(&response.description)
                    );
                }
            }
            page.push_str("</ul></section>");
        }
    }
    page.push_str("</main></body></html>");
    page
}

/// A schema as a reader would name it: the referenced type, else its kind.
fn schema_name(schema: Option<&RefOr<utoipa::openapi::schema::Schema>>) -> String {
    match schema {
        Some(RefOr::Ref(reference)) => format!(
            "<code>{}</code>",
            escape(
                reference
                    .ref_location
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
            )
        ),
        Some(RefOr::T(_)) => "(JSON)".to_owned(),
        None => String::new(),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
