//! Many agents at once: every answered report is stored exactly once and none is refused.

use crate::both_backends;
use crate::common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const RUN_FOR: Duration = Duration::from_secs(3);
/// A slow machine still sends every host at least once, within this bound.
const MAX_RUN: Duration = Duration::from_secs(60);

async fn hammer(srv: &TestServer, hostnames: Arc<Vec<String>>) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let claimed = Arc::new(AtomicU64::new(0));
    let minimum = hostnames.len() as u64;
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url) = (srv.http.clone(), srv.url("/api/health/report"));
        let (ok, failed, hostnames, claimed) = (
            ok.clone(),
            failed.clone(),
            hostnames.clone(),
            claimed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let elapsed = started.elapsed();
                let n = claimed.fetch_add(1, Ordering::Relaxed);
                if (elapsed >= RUN_FOR && n >= minimum) || elapsed >= MAX_RUN {
                    break;
                }
                let host = &hostnames[n as usize % hostnames.len()];
                let resp = http
                    .post(&url)
                    .bearer_auth(AGENT_TOKEN)
                    .json(&report_for(host))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().as_u16() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!(
                            "refused: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("transport error: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

async fn concurrent_reports_to_one_vm(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let (ok, failed) = hammer(&srv, Arc::new(vec!["shared-vm".to_owned()])).await;
    assert_eq!(failed, 0);
    assert!(ok > CLIENTS as u64, "only {ok} reports went through");
    assert_eq!(srv.metric_rows().await, ok as i64);
    assert_eq!(srv.vm_count().await, 1);
    srv.stop().await;
}
both_backends!(concurrent_reports_to_one_vm);

async fn concurrent_reports_over_a_thousand_vms(backend: Backend) {
    let mut srv = TestServer::start(backend, &[]).await;
    let hostnames: Vec<String> = (0..1000).map(|i| format!("vm-{i:04}")).collect();
    let (ok, failed) = hammer(&srv, Arc::new(hostnames)).await;
    assert_eq!(failed, 0);
    assert!(ok >= 1000, "only {ok} reports went through");
    assert_eq!(srv.metric_rows().await, ok as i64);
    // Every host that was sent at least once exists exactly once.
    assert_eq!(srv.vm_count().await, 1000);
    srv.stop().await;
}
both_backends!(concurrent_reports_over_a_thousand_vms);
