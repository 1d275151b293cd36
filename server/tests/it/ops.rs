//! Operations: the Prometheus endpoint, read as a scraper would and parsed by the
//! reference OpenMetrics parser (Python's `prometheus_client`).

use crate::common::*;
use crate::fake_pve::{FakePve, FakeVm};
use crate::proxmox::{history, report_vm, start};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `/metrics` read with `token`: status, content type, body.
async fn scrape(srv: &TestServer, token: Option<&str>) -> (u16, String, String) {
    let mut req = srv.http.get(srv.url("/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, r.text().await.unwrap())
}

/// Every sample of the exposition, as the strict OpenMetrics parser reads it:
/// `[name, {label: value}, value]`. Panics with the parser's complaint when it is invalid.
fn parse(text: &str) -> Vec<(String, serde_json::Map<String, Value>, f64)> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (pip: prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_owned(),
                s[1].as_object().unwrap().clone(),
                s[2].as_f64().unwrap(),
            )
        })
        .collect()
}

fn value(
    samples: &[(String, serde_json::Map<String, Value>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k) == Some(&(*v).into())))
        .map(|(_, _, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_carry_the_servers_health_and_each_vms_gauges() {
    let fake = FakePve::start(vec![FakeVm::running(100, "pve1")]).await;
    let mut srv = start(Backend::Sqlite, &fake, &[]).await;
    // A linked guest that falls silent: one reboot, followed to its end.
    let hung = report_vm(&srv, 100, "pve1", 5000).await;
    wait_for("the reboot to end", Duration::from_secs(20), || async {
        let h = history(&srv, hung).await;
        (h.first()?["outcome"] == "ok").then_some(())
    })
    .await;
    // Two healthy VMs (reported just before the scrape, well inside the stale timeout).
    let mut web = report_for("web-01");
    web["cpu_percent"] = 42.5.into();
    assert_eq!(srv.report(&web).await.0, 200);
    // A hostname in another script is a label value like any other.
    assert_eq!(srv.report(&report_for("сервер-1")).await.0, 200);

    let (status, kind, text) = scrape(&srv, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let samples = parse(&text);

    // The server's own health.
    assert!(value(&samples, "vmhc_reports_total", &[("result", "stored")]).unwrap() >= 3.0);
    assert!(value(&samples, "vmhc_ingest_batch_reports_count", &[]).unwrap() >= 1.0);
    assert!(value(&samples, "vmhc_ingest_commit_seconds_count", &[]).unwrap() >= 1.0);
    assert!(value(&samples, "vmhc_scheduler_round_seconds_count", &[]).unwrap() >= 1.0);
    assert!(value(&samples, "vmhc_scheduler_last_round_age_seconds", &[]).unwrap() < 60.0);
    assert!(value(&samples, "vmhc_notifier_last_pass_age_seconds", &[]).unwrap() < 60.0);
    assert_eq!(value(&samples, "vmhc_ingest_queue_reports", &[]), Some(0.0));
    assert_eq!(
        value(&samples, "vmhc_ingest_queue_capacity_reports", &[]),
        Some(20_000.0)
    );
    assert_eq!(
        value(
            &samples,
            "vmhc_power_actions_total",
            &[("action", "reboot"), ("outcome", "ok")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, "vmhc_vms", &[("status", "down")]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "vmhc_vms", &[("status", "healthy")]),
        Some(2.0)
    );

    // Per VM, labelled by id and hostname.
    let web_id = samples
        .iter()
        .find(|(n, l, _)| n == "vmhc_vm_status" && l["hostname"] == "web-01")
        .map(|(_, l, _)| l["vm_id"].as_str().unwrap().to_owned())
        .unwrap();
    let web = [("vm_id", web_id.as_str()), ("hostname", "web-01")];
    assert_eq!(value(&samples, "vmhc_vm_cpu_percent", &web), Some(42.5));
    assert_eq!(
        value(&samples, "vmhc_vm_ram_used_bytes", &web),
        Some(1_000_000_000.0)
    );
    assert_eq!(
        value(&samples, "vmhc_vm_ram_total_bytes", &web),
        Some(4_000_000_000.0)
    );
    assert_eq!(
        value(&samples, "vmhc_vm_disk_max_percent", &web),
        Some(25.0)
    );
    assert_eq!(
        value(&samples, "vmhc_vm_uptime_seconds", &web),
        Some(3600.0)
    );
    let seen = value(&samples, "vmhc_vm_last_seen_timestamp_seconds", &web).unwrap();
    assert!(
        (seen - server::now_ms() as f64 / 1000.0).abs() < 120.0,
        "{seen}"
    );
    assert_eq!(
        value(
            &samples,
            "vmhc_vm_status",
            &[("hostname", "web-01"), ("status", "healthy")]
        ),
        Some(1.0)
    );
    assert!(value(&samples, "vmhc_vm_status", &[("hostname", "сервер-1")]).is_some());
    assert_eq!(
        value(
            &samples,
            "vmhc_vm_status",
            &[("hostname", "guest-100"), ("status", "down")]
        ),
        Some(1.0)
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_need_a_reading_credential_and_hold_no_secret() {
    let mut srv = TestServer::start(Backend::Sqlite, &[]).await;
    let (status, body) = srv.report(&report_for("web-01")).await;
    assert_eq!(status, 200, "{body}");
    let credential = body["credential"].as_str().unwrap().to_owned();
    // Nobody on the LAN, and no guest (neither the fleet token nor a VM's own credential).
    for token in [
        None,
        Some(AGENT_TOKEN),
        Some(credential.as_str()),
        Some("wrong"),
    ] {
        let (status, _, text) = scrape(&srv, token).await;
        assert_eq!(status, 401, "{token:?}: {text}");
        assert!(!text.contains("vmhc_"), "{token:?}: {text}");
    }
    let (status, _, text) = scrape(&srv, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    for secret in [AGENT_TOKEN, ADMIN_TOKEN, credential.as_str()] {
        assert!(!text.contains(secret), "a secret in the metrics");
    }
    srv.stop().await;
}
