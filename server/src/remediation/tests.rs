//! Engine unit tests: a scripted Proxmox, a manual clock and a SQLite file; no sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;
use crate::clock::ManualClock;
use crate::db::incidents::Expected;
use crate::ingest::{Submission, write_batch};
use domain::evidence::{AgentPing, IoCounters};
use domain::heartbeat::Heartbeat;
use domain::policy::{GuestPower, GuestState};
use domain::status::StatusConfig;
use domain::{GuestKind, LinkSource, NodeName, OsKind, Vmid};
use proxmox::{PveFuture, TaskState};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

const T0: i64 = 1_800_000_000_000;
const STALE: i64 = 60_000;

/// Proxmox as a script: per-guest states, queued task outcomes, and a log of every POST.
#[derive(Default)]
struct ScriptedPve {
    guests: Mutex<Vec<domain::link::ClusterGuest>>,
    states: Mutex<HashMap<i64, GuestState>>,
    /// Outcome of each task, in order of the power actions; empty means success.
    task_outcomes: Mutex<VecDeque<TaskState>>,
    upids: Mutex<HashMap<String, TaskState>>,
    posts: Mutex<Vec<(i64, PowerAction)>>,
    /// A heartbeat stored while `guest_state` is answering, as a slow Proxmox allows.
    report_during_status: Mutex<Option<(Db, Heartbeat)>>,
    /// Guest-agent answers by VMID; a guest not listed has no agent running.
    pings: Mutex<HashMap<i64, AgentPing>>,
    /// Guests whose disk writes grow between status reads.
    busy: Mutex<std::collections::HashSet<i64>>,
    /// Counter reads so far, by VMID.
    reads: Mutex<HashMap<i64, u64>>,
    /// On the Nth status read of a VMID: what Proxmox shows from then on, and whether an
    /// operator turns the VM's auto-reset off at that moment.
    on_read: Mutex<Option<OnRead>>,
}

/// (VMID, read number, the state shown from then on, an operator's opt-out of this VM).
type OnRead = (i64, u64, Option<GuestState>, Option<(Db, VmId)>);

impl ScriptedPve {
    fn set_state(&self, vmid: i64, state: GuestState) {
        self.states.lock().unwrap().insert(vmid, state);
    }

    fn set_ping(&self, vmid: i64, ping: AgentPing) {
        self.pings.lock().unwrap().insert(vmid, ping);
    }

    fn set_busy(&self, vmid: i64, busy: bool) {
        let mut set = self.busy.lock().unwrap();
        if busy {
            set.insert(vmid);
        } else {
            set.remove(&vmid);
        }
    }

    fn posts(&self) -> Vec<(i64, PowerAction)> {
        self.posts.lock().unwrap().clone()
    }

    fn fail_next_tasks(&self, n: usize) {
        let mut q = self.task_outcomes.lock().unwrap();
        for _ in 0..n {
            q.push_back(TaskState::Failed("VM is locked (backup)".into()));
        }
    }
}

impl ProxmoxApi for ScriptedPve {
    fn cluster_guests(&self) -> PveFuture<'_, Vec<domain::link::ClusterGuest>> {
        Box::pin(async { Ok(self.guests.lock().unwrap().clone()) })
    }

    fn guest_state<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, GuestState> {
        Box::pin(async move {
            let pending = self.report_during_status.lock().unwrap().take();
            if let Some((db, beat)) = pending {
                write_batch(&db, &[Submission::fleet(beat)], &status_config())
                    .await
                    .unwrap();
            }
            let vmid = guest.vmid.get();
            let mut state = self
                .states
                .lock()
                .unwrap()
                .get(&vmid)
                .cloned()
                .unwrap_or_else(|| GuestState {
                    agent_configured: true,
                    ..GuestState::running()
                });
            let reads = {
                let mut reads = self.reads.lock().unwrap();
                let n = reads.entry(vmid).or_default();
                *n += 1;
                *n
            };
            let trigger = self
                .on_read
                .lock()
                .unwrap()
                .take_if(|(v, n, _, _)| *v == vmid && *n == reads);
            if let Some((_, _, new_state, opt_out)) = trigger {
                if let Some(new_state) = new_state {
                    self.states.lock().unwrap().insert(vmid, new_state.clone());
                    state = new_state;
                }
                if let Some((db, id)) = opt_out {
                    let mut conn = db.conn().await.unwrap();
                    incidents::set_auto_reset(&mut conn, id, false)
                        .await
                        .unwrap();
                }
            }
            let busy = self.busy.lock().unwrap().contains(&vmid);
            state.sample.io = Some(IoCounters {
                diskwrite: if busy { reads * 4096 } else { 4096 },
                ..IoCounters::default()
            });
            Ok(state)
        })
    }

    fn graceful_reboot<'a>(
        &'a self,
        guest: &'a GuestRef,
        _timeout_seconds: u64,
    ) -> PveFuture<'a, String> {
        self.power_action(guest, PowerAction::Reboot)
    }

    fn agent_ping<'a>(&'a self, guest: &'a GuestRef) -> PveFuture<'a, AgentPing> {
        Box::pin(async move {
            Ok(self
                .pings
                .lock()
                .unwrap()
                .get(&guest.vmid.get())
                .cloned()
                .unwrap_or(AgentPing::NotRunning))
        })
    }

    fn smbios_uuid<'a>(&'a self, _: &'a NodeName, _: Vmid) -> PveFuture<'a, Option<String>> {
        Box::pin(async { Ok(None) })
    }

    fn power_action<'a>(
        &'a self,
        guest: &'a GuestRef,
        action: PowerAction,
    ) -> PveFuture<'a, String> {
        Box::pin(async move {
            let mut posts = self.posts.lock().unwrap();
            posts.push((guest.vmid.get(), action));
            let upid = format!(
                "UPID:{}:{:08X}:qmreset:{}:",
                guest.node,
                posts.len(),
                guest.vmid
            );
            let outcome = self
                .task_outcomes
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| TaskState::Succeeded("OK".into()));
            self.upids.lock().unwrap().insert(upid.clone(), outcome);
            Ok(upid)
        })
    }

    fn task_state<'a>(&'a self, upid: &'a str) -> PveFuture<'a, TaskState> {
        Box::pin(async move {
            Ok(self
                .upids
                .lock()
                .unwrap()
                .get(upid)
                .cloned()
                .unwrap_or(TaskState::Running))
        })
    }
}

fn status_config() -> StatusConfig {
    StatusConfig {
        stale_timeout_ms: STALE,
        report_interval_seconds: 10,
        ..StatusConfig::default()
    }
}

struct Rig {
    engine: Arc<Engine>,
    pve: Arc<ScriptedPve>,
    clock: ManualClock,
    db: Db,
    _dir: tempfile::TempDir,
}

async fn rig(cfg: RemediationConfig) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("engine.db").display());
    let db = Db::connect(&url, 4).await.unwrap();
    let pve = Arc::new(ScriptedPve::default());
    let clock = ManualClock::new(T0);
    let engine = engine_on(&db, &pve, &clock, cfg, JobHealth::default());
    Rig {
        engine,
        pve,
        clock,
        db,
        _dir: dir,
    }
}

fn engine_on(
    db: &Db,
    pve: &Arc<ScriptedPve>,
    clock: &ManualClock,
    cfg: RemediationConfig,
    health: JobHealth,
) -> Arc<Engine> {
    let ctx = Ctx {
        db: db.clone(),
        cache: Arc::new(StateCache::new(None, crate::live::LiveBus::new(None).0).unwrap()),
        status_config: SharedStatusConfig::new(status_config()),
        cfg: crate::settings::SharedRemediation::new(cfg),
        pve: Some(Arc::<ScriptedPve>::clone(pve)),
        unavailable: None,
        import_tags: false,
        clock: Arc::new(clock.clone()),
        timing: Timing {
            task_timeout: Duration::from_secs(60),
            task_poll: Duration::from_secs(1),
            link_refresh: Duration::from_secs(3600),
        },
        health,
        links: domain::link::LinkPolicy::default(),
    };
    Arc::new(Engine::new(ctx, Leader::Always))
}

fn quick() -> RemediationConfig {
    RemediationConfig {
        backoff_base_ms: 1_000,
        recovery_timeout_ms: 30_000,
        evidence_interval_ms: 10,
        veto_ms: 0,
        ..RemediationConfig::default()
    }
}

fn beat(host: &str, vmid: i64, at: i64, uptime: i64) -> Heartbeat {
    Heartbeat {
        hostname: host.into(),
        os: OsKind::Linux,
        machine_id: None,
        vmid: Some(Vmid::try_from(vmid).unwrap()),
        node: None,
        agent_version: None,
        cpu_percent: 5.0,
        ram_used_bytes: 10,
        ram_total_bytes: 100,
        disks: Vec::new(),
        disk_used_bytes: 0,
        disk_total_bytes: 0,
        disk_max_percent: None,
        uptime_seconds: uptime,
        observed_ms: at,
        received_ms: at,
    }
}

impl Rig {
    /// A VM that reported at `at`, linked to guest `vmid` on pve1.
    async fn vm(&self, host: &str, vmid: i64, at: i64) -> VmId {
        let stored = write_batch(
            &self.db,
            &[Submission::fleet(beat(host, vmid, at, 1_000))],
            &status_config(),
        )
        .await
        .unwrap();
        let id = stored[0].as_ref().unwrap().vm_id;
        let guest = GuestRef {
            node: "pve1".parse().unwrap(),
            vmid: Vmid::try_from(vmid).unwrap(),
            kind: GuestKind::Qemu,
        };
        self.pve
            .guests
            .lock()
            .unwrap()
            .push(domain::link::ClusterGuest {
                guest: guest.clone(),
                name: Some(host.into()),
                template: false,
                tags: Vec::new(),
            });
        let mut conn = self.db.conn().await.unwrap();
        incidents::set_link(&mut conn, id, Some(&(guest, LinkSource::Manual)), true)
            .await
            .unwrap();
        id
    }

    async fn report(&self, host: &str, vmid: i64, uptime: i64) {
        let now = self.clock.now_ms();
        let stored = write_batch(
            &self.db,
            &[Submission::fleet(beat(host, vmid, now, uptime))],
            &status_config(),
        )
        .await
        .unwrap();
        stored[0].as_ref().unwrap();
    }

    /// Scheduler rounds every 5 s of clock time up to `t` (the engine treats a longer
    /// gap as its own outage and restarts the amnesty).
    async fn run_to(&self, t: i64) {
        self.run_engine_to(&self.engine, t).await;
    }

    async fn run_engine_to(&self, engine: &Arc<Engine>, t: i64) {
        while self.clock.now_ms() < t {
            let step = (t - self.clock.now_ms()).min(5_000);
            self.clock.advance(step);
            self.round_of(engine).await;
        }
    }

    /// The scheduler's round at the clock's time: stale check, then the engine.
    async fn round(&self) {
        self.round_of(&self.engine).await;
    }

    async fn round_of(&self, engine: &Arc<Engine>) {
        let now = self.clock.now_ms();
        let mut conn = self.db.conn().await.unwrap();
        let rows = store::overdue_rows(&mut conn, STALE, now).await.unwrap();
        let verdicts = crate::scheduler::judge(&rows, &status_config(), now);
        store::apply_verdicts(&mut conn, &verdicts, now)
            .await
            .unwrap();
        drop(conn);
        engine.tick(now).await.unwrap();
        engine.settle_inspections().await;
    }

    /// An intent written as by a process that died before Proxmox answered.
    async fn open_intent(&self, id: VmId, at: i64) {
        let mut conn = self.db.conn().await.unwrap();
        let row = store::get_row(&mut conn, id).await.unwrap().unwrap();
        let intent = NewAttempt {
            vm_id: id,
            action: PowerAction::Reset,
            trigger_source: TriggerSource::Scheduler,
            requested_by: None,
            mode: Mode::Live,
            guest: row.guest(),
            outcome: AttemptOutcome::Pending,
            error: None,
            evidence_json: None,
            created_ms: at,
        };
        let expected = Expected {
            phase: row.phase(),
            attempts: row.incident_attempts,
            last_reset_ms: row.last_reset_ms,
            still_down_since: None,
            linked_vmid: None,
        };
        incidents::begin_attempt(&mut conn, &expected, true, "reset", &intent)
            .await
            .unwrap()
            .unwrap();
    }

    async fn row(&self, id: VmId) -> VmRow {
        let mut conn = self.db.conn().await.unwrap();
        store::get_row(&mut conn, id).await.unwrap().unwrap()
    }

    /// Lets follower tasks run until the VM leaves `reset_pending` (bounded, no sleeps).
    async fn settle(&self, id: VmId) -> VmRow {
        for _ in 0..1_000 {
            let row = self.row(id).await;
            if row.phase() != RemediationPhase::ResetPending {
                return row;
            }
            tokio::task::yield_now().await;
        }
        panic!("the task follower never finished");
    }

    async fn history(&self, id: VmId) -> Vec<domain::view::ResetAttempt> {
        let mut conn = self.db.conn().await.unwrap();
        store::reset_history(&mut conn, id).await.unwrap()
    }

    async fn events(&self) -> Vec<domain::EventKind> {
        let mut conn = self.db.conn().await.unwrap();
        incidents::recent_events(&mut conn, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }
}

/// Past the start-up amnesty and the VM's stale timeout.
const LATER: i64 = 2 * STALE + 1_000;

#[tokio::test]
async fn one_attempt_then_recovery() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    assert_eq!(
        r.pve.posts(),
        vec![(100, PowerAction::Reboot)],
        "the ladder's first rung"
    );
    let row = r.settle(id).await;
    assert_eq!(row.phase(), RemediationPhase::Recovering);
    let history = r.history(id).await;
    assert_eq!(history[0].outcome, AttemptOutcome::Ok);
    assert_eq!(history[0].trigger_source, TriggerSource::Scheduler);
    // Another round while recovering sends nothing more.
    r.clock.advance(1_000);
    r.round().await;
    assert_eq!(r.pve.posts().len(), 1);
    // A fresh heartbeat with a small uptime ends the incident.
    r.report("web", 100, 20).await;
    let row = r.row(id).await;
    assert_eq!(
        (row.phase(), row.incident_attempts),
        (RemediationPhase::Ok, 0)
    );
    assert!(row.phase_reason.unwrap().contains("after the reset"));
}

#[tokio::test]
async fn failed_resets_back_off_doubling_then_latch_manual() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.pve.fail_next_tasks(3);
    r.run_to(T0 + STALE).await;
    let row = r.settle(id).await;
    assert_eq!(row.next_action_ms, Some(r.clock.now_ms() + 1_000));
    // Not before the first backoff (1 s)...
    r.clock.advance(999);
    r.round().await;
    assert_eq!(r.pve.posts().len(), 1);
    r.clock.advance(1);
    r.round().await;
    assert_eq!(r.pve.posts().len(), 2);
    let row = r.settle(id).await;
    // ...then twice as long (2 s).
    assert_eq!(row.next_action_ms, Some(r.clock.now_ms() + 2_000));
    r.clock.advance(1_999);
    r.round().await;
    assert_eq!(r.pve.posts().len(), 2);
    r.clock.advance(1);
    r.round().await;
    let row = r.settle(id).await;
    assert_eq!(row.phase(), RemediationPhase::Manual);
    assert_eq!(row.incident_attempts, 3);
    let later = r.clock.now_ms() + 600_000;
    r.run_to(later).await;
    assert_eq!(
        r.pve.posts().len(),
        3,
        "manual is latched until acknowledged"
    );
    assert!(r.engine.acknowledge(id).await.unwrap());
    assert_eq!(r.row(id).await.phase(), RemediationPhase::Ok);
}

#[tokio::test]
async fn a_vm_waiting_only_for_a_slot_is_taken_the_round_after_one_frees() {
    let r = rig(RemediationConfig {
        max_concurrent: 1,
        ..quick()
    })
    .await;
    let a = r.vm("a", 100, T0).await;
    let b = r.vm("b", 101, T0).await;
    // Enough of the fleet alive that two stale VMs are two incidents, not a storm.
    for (i, host) in ["c", "d", "e", "f", "g", "h"].iter().enumerate() {
        r.vm(host, 102 + i64::try_from(i).unwrap(), T0 + LATER)
            .await;
    }
    r.run_to(T0 + STALE).await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
    let waiting = r.row(b).await;
    assert!(
        waiting
            .phase_reason
            .as_deref()
            .unwrap()
            .contains("slots are in use"),
        "{:?}",
        waiting.phase_reason
    );
    assert_eq!(waiting.next_action_ms, None, "no recheck delay");
    // A's reset finished: its slot is free, and the very next round takes b.
    assert_eq!(r.settle(a).await.phase(), RemediationPhase::Recovering);
    r.clock.advance(1_000);
    r.round().await;
    assert_eq!(
        r.pve.posts(),
        vec![(100, PowerAction::Reboot), (101, PowerAction::Reboot)],
        "taken 1 s after the slot freed, not after the {} ms recheck interval",
        quick().recheck_ms
    );
}

#[tokio::test]
async fn nothing_is_reset_during_the_amnesty() {
    let r = rig(quick()).await;
    r.vm("web", 100, T0 - 10 * STALE).await;
    // The VM is long stale, but this engine started at T0.
    r.run_to(T0 + STALE - 1).await;
    assert!(r.pve.posts().is_empty());
    assert!(!r.engine.summary(r.clock.now_ms()).active);
    r.run_to(T0 + STALE).await;
    assert_eq!(r.pve.posts().len(), 1);
}

#[tokio::test]
async fn the_breaker_trips_on_mass_staleness_and_clears() {
    let r = rig(quick()).await;
    r.vm("a", 100, T0).await;
    r.vm("b", 101, T0).await;
    r.vm("c", 102, T0 + LATER).await;
    r.vm("d", 103, T0 + LATER).await;
    let others = || async {
        r.report("b", 101, 5_000).await;
        r.report("c", 102, 5_000).await;
        r.report("d", 103, 5_000).await;
    };
    r.run_to(T0 + LATER).await;
    assert!(
        r.pve.posts().is_empty(),
        "2 of 4 stale is a storm, not two hung VMs"
    );
    assert_eq!(r.events().await, vec![domain::EventKind::BreakerTripped]);
    assert!(r.engine.summary(r.clock.now_ms()).reason.contains("paused"));
    // Most of the fleet comes back; `a` stays silent. The breaker clears and a new
    // amnesty starts, so `a` is not reset at once.
    r.clock.advance(1_000);
    others().await;
    r.round().await;
    assert_eq!(r.events().await[0], domain::EventKind::BreakerReset);
    assert!(r.pve.posts().is_empty());
    let cleared = r.clock.now_ms();
    r.run_to(cleared + STALE - 1_000).await;
    assert!(r.pve.posts().is_empty(), "still within the amnesty");
    r.clock.advance(1_000);
    others().await;
    r.round().await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
}

#[tokio::test]
async fn guests_proxmox_reports_as_off_paused_template_locked_or_ha_are_never_reset() {
    let r = rig(quick()).await;
    let screens = [
        (100, GuestPower::Stopped, None, false, false, "stopped"),
        (
            101,
            GuestPower::Suspended("paused".into()),
            None,
            false,
            false,
            "paused",
        ),
        (102, GuestPower::Running, None, true, false, "template"),
        (
            103,
            GuestPower::Running,
            Some("backup"),
            false,
            false,
            "locked",
        ),
        (104, GuestPower::Running, None, false, true, "HA"),
    ];
    let mut ids = Vec::new();
    for (vmid, power, lock, template, ha, _) in &screens {
        ids.push(r.vm(&format!("vm{vmid}"), *vmid, T0).await);
        r.pve.set_state(
            *vmid,
            GuestState {
                power: power.clone(),
                lock: lock.map(str::to_owned),
                template: *template,
                ha_managed: *ha,
                ..GuestState::running()
            },
        );
    }
    // Five of five stale would trip the breaker: a healthy majority keeps it quiet.
    for n in 0..12 {
        r.vm(&format!("ok{n}"), 200 + n, T0 + LATER).await;
    }
    r.run_to(T0 + STALE).await;
    assert!(r.pve.posts().is_empty(), "{:?}", r.pve.posts());
    for (id, (_, _, _, _, _, what)) in ids.iter().zip(&screens) {
        let reason = r.row(*id).await.phase_reason.unwrap_or_default();
        assert!(!reason.is_empty(), "{what}: a reason is recorded");
    }
    let locked = r.row(ids[3]).await;
    assert!(locked.phase_reason.unwrap().contains("locked"));
    assert_eq!(
        r.history(ids[3]).await.len(),
        0,
        "a lock is waited out, not logged"
    );
    assert_eq!(
        r.history(ids[4]).await[0].outcome,
        AttemptOutcome::LeftAlone
    );
}

#[tokio::test]
async fn shadow_mode_records_and_sends_nothing() {
    let cfg = RemediationConfig {
        mode: Mode::Shadow,
        ..quick()
    };
    let r = rig(cfg).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    assert!(r.pve.posts().is_empty());
    let history = r.history(id).await;
    assert_eq!(history[0].outcome, AttemptOutcome::WouldReset);
    assert_eq!(history[0].mode, Mode::Shadow);
    assert_eq!(r.row(id).await.phase(), RemediationPhase::Ok);
}

#[tokio::test]
async fn a_vm_that_reports_while_its_reset_is_decided_is_not_reset() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE - 5_000).await;
    // The heartbeat lands between the stale verdict and the compare-and-set.
    *r.pve.report_during_status.lock().unwrap() =
        Some((r.db.clone(), beat("web", 100, T0 + STALE, 5_000)));
    r.run_to(T0 + STALE).await;
    assert!(
        r.pve.report_during_status.lock().unwrap().is_none(),
        "the round asked Proxmox about the VM"
    );
    assert!(
        r.pve.posts().is_empty(),
        "reset sent to a VM that just reported"
    );
    assert!(r.history(id).await.is_empty());
    let row = r.row(id).await;
    assert_eq!(
        (row.status(), row.phase()),
        (domain::VmStatus::Healthy, RemediationPhase::Ok)
    );
}

#[tokio::test]
async fn a_crash_between_intent_and_outcome_is_not_reset_twice() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.clock.set(T0 + LATER);
    // Mark it stale, then write an intent as a process that died before the POST would.
    let mut conn = r.db.conn().await.unwrap();
    let rows = store::overdue_rows(&mut conn, STALE, T0 + LATER)
        .await
        .unwrap();
    let verdicts = crate::scheduler::judge(&rows, &status_config(), T0 + LATER);
    store::apply_verdicts(&mut conn, &verdicts, T0 + LATER)
        .await
        .unwrap();
    drop(conn);
    r.open_intent(id, T0 + LATER).await;
    // A new process (new engine) starts on the same database and waits out its amnesty.
    let patient = RemediationConfig {
        recovery_timeout_ms: 600_000,
        ..quick()
    };
    let restarted = engine_on(&r.db, &r.pve, &r.clock, patient, JobHealth::default());
    let later = r.clock.now_ms() + STALE;
    r.run_engine_to(&restarted, later).await;
    assert!(
        r.pve.posts().is_empty(),
        "the interrupted reset must not be sent again"
    );
    assert_eq!(r.history(id).await[0].outcome, AttemptOutcome::Interrupted);
    assert_eq!(r.row(id).await.phase(), RemediationPhase::Recovering);
}

#[tokio::test]
async fn an_unknown_stored_state_is_never_acted_on() {
    use diesel_async::SimpleAsyncConnection;
    let r = rig(quick()).await;
    let web = r.vm("web", 100, T0 + LATER).await;
    let db = r.vm("db", 101, T0 + LATER).await;
    for (host, vmid) in [("c", 102), ("d", 103), ("e", 104), ("f", 105), ("g", 106)] {
        r.vm(host, vmid, T0 + LATER).await;
    }
    // Past the amnesty with every VM fresh; then both are marked stale below.
    r.run_to(T0 + LATER).await;
    let mut conn = r.db.conn().await.unwrap();
    let crate::db::Conn::Sqlite(c) = &mut conn else {
        unreachable!("the rig uses SQLite")
    };
    let refused = c
        .batch_execute(&format!(
            "UPDATE vms SET remediation_phase = 'rebooting' WHERE id = {web}"
        ))
        .await;
    assert!(
        refused.is_err(),
        "the CHECK trigger refuses an unknown phase"
    );
    c.batch_execute(
        "DROP TRIGGER vms_remediation_phase_check_update; \
         DROP TRIGGER vms_proxmox_type_check_update",
    )
    .await
    .unwrap();
    c.batch_execute(&format!(
        "UPDATE vms SET status = 'down' WHERE id IN ({web}, {db}); \
         UPDATE vms SET remediation_phase = 'rebooting' WHERE id = {web}; \
         UPDATE vms SET proxmox_type = 'vz' WHERE id = {db}"
    ))
    .await
    .unwrap();
    drop(conn);
    // Both went stale. `db` is among the rows a round reads: its unreadable guest kind
    // fails the round. `web`'s phase is none a round acts on, so it is not read at all.
    r.clock.advance(1_000);
    let now = r.clock.now_ms();
    assert!(
        r.engine.tick(now).await.is_err(),
        "an unreadable state is an error"
    );
    assert!(r.pve.posts().is_empty());
    let mut conn = r.db.conn().await.unwrap();
    let crate::db::Conn::Sqlite(c) = &mut conn else {
        unreachable!("the rig uses SQLite")
    };
    c.batch_execute(&format!(
        "UPDATE vms SET proxmox_type = 'qemu' WHERE id = {db}"
    ))
    .await
    .unwrap();
    drop(conn);
    r.clock.advance(1_000);
    r.engine.tick(now + 1_000).await.unwrap();
    r.engine.settle_inspections().await;
    assert_eq!(
        r.pve.posts(),
        vec![(101, PowerAction::Reboot)],
        "the readable hung VM is acted on; the one in an unknown phase never is"
    );
}

#[tokio::test]
async fn becoming_leader_again_reconciles_what_another_replica_left_open() {
    use std::sync::atomic::AtomicBool;
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    let leading = Arc::new(AtomicBool::new(true));
    let ctx = r.engine.ctx.clone();
    let engine = Arc::new(Engine::new(ctx, Leader::Manual(leading.clone())));
    engine.tick(T0 + 1_000).await.unwrap();
    // Another replica leads for a while and dies between intent and outcome.
    leading.store(false, Ordering::Release);
    engine.tick(T0 + 2_000).await.unwrap();
    r.open_intent(id, T0 + 2_500).await;
    // This process leads again: the open attempt is reconciled, not left pending.
    leading.store(true, Ordering::Release);
    engine.tick(T0 + 3_000).await.unwrap();
    assert_eq!(r.history(id).await[0].outcome, AttemptOutcome::Interrupted);
    assert_eq!(r.row(id).await.phase(), RemediationPhase::Recovering);
}

/// The evidence stored with a VM's newest history row.
async fn newest_evidence(r: &Rig, id: VmId) -> serde_json::Value {
    let history = r.history(id).await;
    let json = history[0]
        .evidence_json
        .as_deref()
        .expect("evidence stored");
    serde_json::from_str(json).unwrap()
}

#[tokio::test]
async fn a_guest_whose_agent_answers_is_left_alone_until_it_reports() {
    let r = rig(quick()).await;
    let id = r.vm("db", 100, T0).await;
    r.pve.set_ping(100, AgentPing::Answered);
    r.run_to(T0 + STALE).await;
    assert!(r.pve.posts().is_empty(), "{:?}", r.pve.posts());
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::AgentSilent);
    assert!(row.phase_reason.unwrap().contains("guest agent answered"));
    assert_eq!(r.events().await, vec![domain::EventKind::AgentSilent]);
    let history = r.history(id).await;
    assert_eq!(history[0].outcome, AttemptOutcome::LeftAlone);
    let evidence = newest_evidence(&r, id).await;
    assert_eq!(evidence["evidence"]["guest_agent"]["result"], "answered");
    // It stays so, with no more looks or history, however long it stays silent.
    r.run_to(T0 + 20 * STALE).await;
    assert!(r.pve.posts().is_empty());
    assert_eq!(r.history(id).await.len(), 1);
    assert_eq!(r.row(id).await.phase(), RemediationPhase::AgentSilent);
    // Its agent reports again: the state ends.
    r.report("db", 100, 50_000).await;
    let row = r.row(id).await;
    assert_eq!(
        (row.phase(), row.status()),
        (RemediationPhase::Ok, domain::VmStatus::Healthy)
    );
}

#[tokio::test]
async fn guest_io_is_a_sign_of_life_under_strict_only() {
    for (mode, acted) in [
        (domain::evidence::HangEvidence::Strict, false),
        (domain::evidence::HangEvidence::Lenient, true),
    ] {
        let r = rig(RemediationConfig {
            hang_evidence: mode,
            ..quick()
        })
        .await;
        let id = r.vm("db", 100, T0).await;
        r.pve.set_busy(100, true);
        r.run_to(T0 + STALE).await;
        assert_eq!(!r.pve.posts().is_empty(), acted, "{mode:?}");
        if !acted {
            let row = r.row(id).await;
            assert_eq!(row.phase(), RemediationPhase::AgentSilent, "{mode:?}");
            assert!(
                row.phase_reason.unwrap().contains("still does I/O"),
                "the deciding evidence is named"
            );
        }
    }
}

#[tokio::test]
async fn a_hung_guest_gets_the_first_rung_with_its_evidence() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.pve.set_ping(100, AgentPing::TimedOut);
    r.run_to(T0 + STALE).await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
    r.settle(id).await;
    let evidence = newest_evidence(&r, id).await;
    assert_eq!(evidence["evidence"]["guest_agent"]["result"], "timed_out");
    assert!(
        evidence["decision"]
            .as_str()
            .unwrap()
            .contains("no sign of life")
    );
    assert!(evidence["evidence"]["second"]["Ok"]["io"].is_object());
    assert_eq!(evidence["last_uptime_seconds"], 1_000);
}

#[tokio::test]
async fn a_guest_stopped_on_an_io_error_is_never_reset() {
    let r = rig(quick()).await;
    let id = r.vm("db", 100, T0).await;
    r.pve.set_state(
        100,
        GuestState {
            power: GuestPower::Fault("io-error".into()),
            ..GuestState::running()
        },
    );
    r.run_to(T0 + 10 * STALE).await;
    assert!(r.pve.posts().is_empty());
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::GuestFault);
    assert!(row.phase_reason.unwrap().contains("io-error"));
    assert_eq!(r.events().await, vec![domain::EventKind::GuestFault]);
    assert_eq!(r.history(id).await.len(), 1, "one record, not one per look");
    // Acknowledged (the storage was repaired): the next round looks afresh.
    r.pve.set_state(100, GuestState::running());
    assert!(r.engine.acknowledge(id).await.unwrap());
    r.clock.advance(1_000);
    r.round().await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
}

#[tokio::test]
async fn without_the_guest_agent_privilege_io_decides_and_the_record_says_so() {
    let r = rig(quick()).await;
    let busy = r.vm("busy", 100, T0).await;
    let hung = r.vm("hung", 101, T0).await;
    for n in 0..8 {
        r.vm(&format!("ok{n}"), 200 + n, T0 + LATER).await;
    }
    let denied = AgentPing::Unavailable("permission".into());
    r.pve.set_ping(100, denied.clone());
    r.pve.set_ping(101, denied);
    r.pve.set_busy(100, true);
    r.run_to(T0 + STALE).await;
    assert_eq!(r.pve.posts(), vec![(101, PowerAction::Reboot)]);
    assert_eq!(r.row(busy).await.phase(), RemediationPhase::AgentSilent);
    for id in [busy, hung] {
        let evidence = newest_evidence(&r, id).await;
        assert_eq!(evidence["evidence"]["guest_agent"]["detail"], "permission");
    }
}

/// Runs rounds until `n` power actions were sent (bounded), then lets followers finish.
async fn until_posts(r: &Rig, engine: &Arc<Engine>, n: usize) {
    for _ in 0..400 {
        if r.pve.posts().len() >= n {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            return;
        }
        r.clock.advance(1_000);
        r.round_of(engine).await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }
    panic!("only {:?} were sent", r.pve.posts());
}

#[tokio::test]
async fn the_ladder_climbs_one_rung_per_attempt_then_latches_manual() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    let mut sent_at = vec![r.clock.now_ms()];
    for n in [2, 3] {
        until_posts(&r, &r.engine, n).await;
        sent_at.push(r.clock.now_ms());
    }
    until_posts(&r, &r.engine, 4).await;
    let row = r.settle(id).await;
    assert_eq!(
        r.pve.posts(),
        vec![
            (100, PowerAction::Reboot),
            (100, PowerAction::Reset),
            (100, PowerAction::Stop),
            (100, PowerAction::Start),
        ],
        "each rung once, in order; stop-start is one rung"
    );
    // Each rung waited out the recovery window and then the doubling backoff.
    assert!(sent_at[1] - sent_at[0] >= 30_000 + 1_000, "{sent_at:?}");
    assert!(sent_at[2] - sent_at[1] >= 30_000 + 2_000, "{sent_at:?}");
    assert_eq!(row.incident_attempts, 3, "the stop-start counts once");
    // The start ends the last rung; its recovery window passes without a heartbeat.
    let later = r.clock.now_ms() + 60_000;
    r.run_to(later).await;
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::Manual);
    assert_eq!(r.pve.posts().len(), 4, "nothing after the last rung");
    let actions: Vec<PowerAction> = r.history(id).await.iter().map(|a| a.action).collect();
    assert_eq!(
        actions,
        vec![
            PowerAction::Start,
            PowerAction::Stop,
            PowerAction::Reset,
            PowerAction::Reboot
        ],
        "each rung has its own history row"
    );
}

#[tokio::test]
async fn containers_climb_reboot_then_stop_start() {
    let r = rig(quick()).await;
    let id = r.vm("ct", 100, T0).await;
    let mut conn = r.db.conn().await.unwrap();
    let ct = GuestRef {
        node: "pve1".parse().unwrap(),
        vmid: Vmid::try_from(100).unwrap(),
        kind: GuestKind::Lxc,
    };
    incidents::set_link(&mut conn, id, Some(&(ct, LinkSource::Manual)), true)
        .await
        .unwrap();
    drop(conn);
    r.run_to(T0 + STALE).await;
    until_posts(&r, &r.engine, 3).await;
    assert_eq!(
        r.pve.posts(),
        vec![
            (100, PowerAction::Reboot),
            (100, PowerAction::Stop),
            (100, PowerAction::Start)
        ]
    );
}

#[tokio::test]
async fn a_restart_in_the_middle_of_the_ladder_resumes_on_the_next_rung() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    r.settle(id).await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
    // The process stops; a new one starts on the same database.
    r.engine.shutdown();
    let restarted = engine_on(&r.db, &r.pve, &r.clock, quick(), JobHealth::default());
    until_posts(&r, &restarted, 2).await;
    assert_eq!(
        r.pve.posts(),
        vec![(100, PowerAction::Reboot), (100, PowerAction::Reset)],
        "the reboot rung is not repeated after a restart"
    );
}

#[tokio::test]
async fn a_restart_between_stop_and_start_still_starts_the_guest() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.clock.set(T0 + LATER);
    let mut conn = r.db.conn().await.unwrap();
    let rows = store::overdue_rows(&mut conn, STALE, T0 + LATER)
        .await
        .unwrap();
    let verdicts = crate::scheduler::judge(&rows, &status_config(), T0 + LATER);
    store::apply_verdicts(&mut conn, &verdicts, T0 + LATER)
        .await
        .unwrap();
    // Two rungs used; the third (stop-start) stopped the guest, recorded its start's
    // intent, and the process died before the start was sent.
    let row = store::get_row(&mut conn, id).await.unwrap().unwrap();
    let expected = Expected {
        phase: row.phase(),
        attempts: 2,
        last_reset_ms: row.last_reset_ms,
        still_down_since: None,
        linked_vmid: None,
    };
    incidents::set_phase(
        &mut conn,
        id,
        None,
        RemediationPhase::Ok,
        Some(2),
        None,
        "two rungs used",
    )
    .await
    .unwrap();
    let stop = NewAttempt {
        vm_id: id,
        action: PowerAction::Stop,
        trigger_source: TriggerSource::Scheduler,
        requested_by: None,
        mode: Mode::Live,
        guest: row.guest(),
        outcome: AttemptOutcome::Pending,
        error: None,
        evidence_json: None,
        created_ms: T0 + LATER,
    };
    let stop_id = incidents::begin_attempt(&mut conn, &expected, true, "stop", &stop)
        .await
        .unwrap()
        .unwrap();
    let start = NewAttempt {
        action: PowerAction::Start,
        ..stop.clone()
    };
    incidents::finish_and_begin(&mut conn, stop_id, T0 + LATER, &start)
        .await
        .unwrap();
    drop(conn);
    let restarted = engine_on(&r.db, &r.pve, &r.clock, quick(), JobHealth::default());
    restarted.tick(r.clock.now_ms()).await.unwrap();
    let row = r.settle(id).await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Start)]);
    assert_eq!(row.phase(), RemediationPhase::Recovering);
}

#[tokio::test]
async fn a_guest_back_without_its_agent_ends_the_ladder() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    r.settle(id).await;
    // The reboot brought the OS back, but our agent does not start.
    r.pve.set_ping(100, AgentPing::Answered);
    r.pve.set_busy(100, true);
    let later = r.clock.now_ms() + 120_000;
    r.run_to(later).await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::AgentSilent);
    assert!(
        row.phase_reason
            .unwrap()
            .contains("guest back, agent not yet")
    );
    assert!(r.events().await.contains(&domain::EventKind::GuestBack));
}

#[tokio::test]
async fn a_guest_whose_clock_is_behind_after_the_reset_still_ends_its_incident() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    let row = r.settle(id).await;
    assert_eq!(row.phase(), RemediationPhase::Recovering);
    let reset_ms = row.last_reset_ms.unwrap();
    // 27 s after the reset the guest reports, its clock 72 s behind, up for 25 s.
    let received = reset_ms + 27_000;
    let mut report = beat("web", 100, received - 72_000, 25);
    report.received_ms = received;
    write_batch(&r.db, &[Submission::fleet(report)], &status_config())
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap();
    let row = r.row(id).await;
    assert_eq!(
        (row.phase(), row.incident_attempts),
        (RemediationPhase::Ok, 0),
        "{:?}",
        row.phase_reason
    );
}

#[tokio::test]
async fn auto_reset_turned_off_while_the_evidence_is_gathered_sends_nothing() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    // The round's read is the first; the inspection's second read is when the operator acts.
    *r.pve.on_read.lock().unwrap() = Some((100, 2, None, Some((r.db.clone(), id))));
    r.run_to(T0 + STALE).await;
    assert!(
        r.pve.on_read.lock().unwrap().is_none(),
        "the inspection read twice"
    );
    assert!(r.pve.posts().is_empty(), "{:?}", r.pve.posts());
    assert!(r.history(id).await.is_empty());
}

#[tokio::test]
async fn a_guest_stopped_between_the_two_reads_is_not_acted_on() {
    let r = rig(quick()).await;
    let id = r.vm("web", 100, T0).await;
    let stopped = GuestState {
        power: GuestPower::Stopped,
        ..GuestState::running()
    };
    *r.pve.on_read.lock().unwrap() = Some((100, 2, Some(stopped), None));
    r.run_to(T0 + STALE).await;
    assert!(r.pve.posts().is_empty(), "{:?}", r.pve.posts());
    let reason = r.row(id).await.phase_reason.unwrap_or_default();
    assert!(
        reason.contains("changed in Proxmox between the reads"),
        "{reason}"
    );
}

/// The veto window by the engine's own clock: announced, sent only after the window; a
/// deferral (a lock at the window's end) or an opt-out calls the announcement off, and the
/// next hung verdict gets a window of its own; an engine that was not leading through the
/// window announces again instead of acting.
#[tokio::test]
async fn an_announced_action_needs_a_whole_watched_window() {
    const WINDOW: i64 = 30_000;
    let cfg = RemediationConfig {
        veto_ms: WINDOW,
        ..quick()
    };
    let r = rig(cfg.clone()).await;
    let id = r.vm("web", 100, T0).await;
    r.run_to(T0 + STALE).await;
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::ResetScheduled);
    let until = row.next_action_ms.unwrap();
    assert!(r.pve.posts().is_empty(), "sent before its window");

    // At the window's end a backup holds a lock: the action is called off, not kept.
    let locked = GuestState {
        lock: Some("backup".into()),
        agent_configured: true,
        ..GuestState::running()
    };
    r.pve.set_state(100, locked);
    r.run_to(until).await;
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::Ok, "{:?}", row.phase_reason);
    assert!(r.pve.posts().is_empty());

    // The lock ends; the next look announces afresh instead of acting at once.
    r.pve.set_state(
        100,
        GuestState {
            agent_configured: true,
            ..GuestState::running()
        },
    );
    let next = row.next_action_ms.unwrap();
    r.run_to(next).await;
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::ResetScheduled);
    assert!(r.pve.posts().is_empty(), "acted without a new window");

    // Opting the VM out calls the countdown off.
    let mut conn = r.db.conn().await.unwrap();
    incidents::set_auto_reset(&mut conn, id, false)
        .await
        .unwrap();
    let row = r.row(id).await;
    assert_eq!(row.phase(), RemediationPhase::Ok);
    incidents::set_auto_reset(&mut conn, id, true)
        .await
        .unwrap();
    drop(conn);
    r.run_to(r.clock.now_ms() + 5_000).await;
    let until = r.row(id).await.next_action_ms.unwrap();

    // Another engine (a restart, a new leader) takes over inside the window: it did not
    // watch the window, so when it ends it announces again instead of acting.
    let successor = engine_on(&r.db, &r.pve, &r.clock, cfg, JobHealth::default());
    let mut row = r.row(id).await;
    for _ in 0..40 {
        r.clock.advance(5_000);
        r.round_of(&successor).await;
        row = r.row(id).await;
        if row.next_action_ms != Some(until) {
            break;
        }
    }
    assert!(
        r.pve.posts().is_empty(),
        "a window nobody here watched was acted on"
    );
    assert_eq!(row.phase(), RemediationPhase::ResetScheduled);
    assert!(row.next_action_ms.unwrap() > until, "not announced again");
    // Its own window, watched to the end: now it acts.
    r.run_engine_to(&successor, row.next_action_ms.unwrap() + 5_000)
        .await;
    assert_eq!(r.pve.posts(), vec![(100, PowerAction::Reboot)]);
}
