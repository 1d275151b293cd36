//! `/metrics`: this process's own measurements and a few gauges per VM, in the OpenMetrics
//! text format Prometheus scrapes. Read with any credential that may read the fleet (an
//! API token of the viewer role is the usual one for a scraper).

use super::error::ApiError;
use super::extract::Viewer;
use crate::health::JobHealth;
use crate::state::AppState;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use domain::enums::VmStatus;
use domain::status::approx_f64 as to_f64;
use domain::view::VmView;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::fmt;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[utoipa::path(
    get,
    operation_id = "prometheus_metrics",
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "OpenMetrics text (Prometheus reads it): the server's own health and per-VM gauges", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"))
)]
pub async fn metrics(State(state): State<AppState>, _viewer: Viewer) -> Result<Response, ApiError> {
    let vms = super::fleet(&state).await?;
    let scrape = Scrape {
        queued: state.ingest.queued(),
        queue_capacity: state.config.ingest_queue_capacity,
        now_ms: crate::now_ms(),
        health: state.health.clone(),
        vms,
    };
    // Thousands of VMs make a large text: written off the async workers.
    let body = tokio::task::spawn_blocking(move || scrape.render())
        .await
        .map_err(|err| ApiError::Internal(format!("metrics: {err}")))?
        .map_err(|err| ApiError::Internal(format!("metrics: {err}")))?;
    Ok(([(CONTENT_TYPE, OPENMETRICS)], body).into_response())
}

/// What one scrape reports.
struct Scrape {
    queued: usize,
    queue_capacity: usize,
    now_ms: i64,
    health: JobHealth,
    vms: Vec<VmView>,
}

impl Scrape {
    fn render(self) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        self.health.register(&mut registry);
        registry.register_collector(Box::new(Gauges(self)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// The values read at scrape time: the queue, the scheduler's age, the fleet's gauges.
#[derive(Debug)]
struct Gauges(Scrape);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape")
            .field("vms", &self.vms.len())
            .finish()
    }
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// One gauge per VM that has the value: labelled by the VM's id and hostname (both bounded:
/// one series per VM, hostnames at most 253 characters).
fn per_vm(
    encoder: &mut DescriptorEncoder<'_>,
    vms: &[VmView],
    name: &str,
    help: &str,
    value: impl Fn(&VmView) -> Option<f64>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for vm in vms {
        if let Some(v) = value(vm) {
            let labels = vec![
                ("vm_id", vm.id.to_string()),
                ("hostname", vm.hostname.clone()),
            ];
            ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let s = &self.0;
        gauge(
            &mut encoder,
            "vmhc_ingest_queue_reports",
            "Reports waiting for the ingest writer",
            to_f64(i64::try_from(s.queued).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "vmhc_ingest_queue_capacity_reports",
            "Reports the ingest queue holds before it answers 503",
            to_f64(i64::try_from(s.queue_capacity).unwrap_or(i64::MAX)),
        )?;
        let last_round = s.health.last_round_ms();
        if last_round > 0 {
            gauge(
                &mut encoder,
                "vmhc_scheduler_last_round_age_seconds",
                "Time since the scheduler last finished a round",
                to_f64(s.now_ms.saturating_sub(last_round)) / 1000.0,
            )?;
        }
        let last_pass = s.health.last_notifier_pass_ms();
        if last_pass > 0 {
            gauge(
                &mut encoder,
                "vmhc_notifier_last_pass_age_seconds",
                "Time since the notifier last read what happened and queued its messages",
                to_f64(s.now_ms.saturating_sub(last_pass)) / 1000.0,
            )?;
        }
        let restarts = encoder.encode_descriptor(
            "vmhc_job_restarts",
            "Background jobs restarted after a panic",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(u64::try_from(s.health.restarts()).unwrap_or(0)).encode(restarts)?;

        let mut by_status =
            encoder.encode_descriptor("vmhc_vms", "VMs by status", None, MetricType::Gauge)?;
        for status in VmStatus::ALL {
            let n = s.vms.iter().filter(|v| v.status == *status).count();
            let labels = vec![("status", status.as_str())];
            ConstGauge::new(to_f64(i64::try_from(n).unwrap_or(i64::MAX)))
                .encode(by_status.encode_family(&labels)?)?;
        }

        // One series per VM, its status as a label: `vmhc_vm_status{status="down"} == 1`
        // finds the down ones.
        let mut status = encoder.encode_descriptor(
            "vmhc_vm_status",
            "1 for each VM, labelled with its status",
            None,
            MetricType::Gauge,
        )?;
        for vm in &s.vms {
            let labels = vec![
                ("vm_id", vm.id.to_string()),
                ("hostname", vm.hostname.clone()),
                ("status", vm.status.as_str().to_owned()),
            ];
            ConstGauge::new(1.0).encode(status.encode_family(&labels)?)?;
        }
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_cpu_percent",
            "CPU busy share the VM's agent last reported",
            |v| v.cpu_percent,
        )?;
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_ram_used_bytes",
            "RAM in use the VM's agent last reported",
            |v| v.ram_used_bytes.map(to_f64),
        )?;
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_ram_total_bytes",
            "RAM the VM's agent last reported",
            |v| v.ram_total_bytes.map(to_f64),
        )?;
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_disk_max_percent",
            "Fullest filesystem of the VM, in percent",
            |v| v.disk_max_percent,
        )?;
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_last_seen_timestamp_seconds",
            "When the VM's last report arrived (Unix time)",
            |v| v.last_seen_ms.map(|ms| to_f64(ms) / 1000.0),
        )?;
        per_vm(
            &mut encoder,
            &s.vms,
            "vmhc_vm_uptime_seconds",
            "Uptime the VM's agent last reported",
            |v| v.uptime_seconds.map(to_f64),
        )?;
        Ok(())
    }
}
