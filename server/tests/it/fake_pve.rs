//! A strict fake Proxmox VE API, faithful to the reference: API tokens with 401 reason phrases,
//! per-token privileges answering 403, the `{"data": ...}` envelope, guest-type-checked paths,
//! UPID tasks readable only on their own node, locks, 595/596, slow and hung answers, and a
//! log of every call recorded before it is answered. HTTP or HTTPS.

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::ext::ReasonPhrase;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const USER: &str = "root@pam";
pub const TOKEN_ID: &str = "monitor";
pub const SECRET: &str = "11111111-2222-3333-4444-555555555555";

#[derive(Clone, Debug)]
pub struct FakeVm {
    pub vmid: i64,
    pub node: String,
    pub kind: &'static str,
    pub name: String,
    pub status: &'static str,
    pub qmpstatus: &'static str,
    pub template: bool,
    pub lock: Option<String>,
    pub ha_managed: bool,
    pub smbios_uuid: Option<String>,
    /// Exit status the next reset tasks end with.
    pub task_exit: String,
    /// `agent: 1` in the config.
    pub agent: bool,
    /// How the guest agent inside answers a ping (when configured and the VM runs).
    pub guest_agent: GuestAgent,
    /// Cumulative I/O counters of `status/current`.
    pub io: [u64; 4],
    /// Each status read finds the guest's disk writes and network sends grown.
    pub io_moving: bool,
    /// The guest ignores ACPI: a reboot task waits out its timeout and fails.
    pub ignores_acpi: bool,
    /// `tags` in `cluster/resources` (`prod;web`), absent when `None`.
    pub tags: Option<String>,
}

/// The QEMU guest agent inside a fake VM.
#[derive(Clone, Debug, PartialEq)]
pub enum GuestAgent {
    Answers,
    NotRunning,
    /// The guest does not answer: Proxmox gives up after this long with "got timeout".
    Silent(Duration),
}

impl FakeVm {
    pub fn running(vmid: i64, node: &str) -> Self {
        Self {
            vmid,
            node: node.into(),
            kind: "qemu",
            name: format!("vm{vmid}"),
            status: "running",
            qmpstatus: "running",
            template: false,
            lock: None,
            ha_managed: false,
            smbios_uuid: None,
            task_exit: "OK".into(),
            agent: true,
            guest_agent: GuestAgent::NotRunning,
            io: [1_000_000, 2_000_000, 300_000, 400_000],
            io_moving: false,
            ignores_acpi: false,
            tags: None,
        }
    }

    /// A running LXC container.
    pub fn container(vmid: i64, node: &str) -> Self {
        Self {
            kind: "lxc",
            name: format!("ct{vmid}"),
            ..Self::running(vmid, node)
        }
    }
}

/// One request as the fake received it: recorded on arrival, `status` set when answered
/// (0 while no answer was sent: held, hung, or abandoned by the client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    /// Percent-decoded, without `/api2/json` and without the query.
    pub path: String,
    /// The token id presented (`monitor` of `root@pam!monitor`), empty without one.
    pub token_id: String,
    pub status: u16,
}

/// What a real guest's hypervisor says, for a VM the fake drives through a backend.
#[derive(Clone, Debug)]
pub struct GuestReading {
    pub running: bool,
    pub qmpstatus: String,
    pub uptime: u64,
    pub diskread: u64,
    pub diskwrite: u64,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A real guest behind a VMID (QEMU through QMP and its guest agent): the fake answers
/// `status/current`, `agent/ping` and power actions from it, and a task ends when the
/// guest did the work.
pub trait GuestBackend: Send + Sync {
    fn reading(&self) -> Boxed<'_, Result<GuestReading, String>>;
    /// `Err` carries the text Proxmox would put after "VM N ".
    fn ping(&self) -> Boxed<'_, Result<(), String>>;
    fn act<'a>(
        &'a self,
        action: &'a str,
        timeout_seconds: Option<u64>,
    ) -> Boxed<'a, Result<(), String>>;
}

/// A power-action POST about to be accepted, as the action gate sees it.
#[derive(Clone, Debug)]
pub struct ActionCall {
    pub node: String,
    pub kind: String,
    pub vmid: i64,
    pub action: String,
    pub token_id: String,
}

/// Decides whether a power action is accepted; awaited without the fake's lock.
pub type Gate = Arc<dyn Fn(ActionCall) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

pub const GATE_REFUSAL: &str = "refused by the test gate: no pending attempt";

struct Task {
    started: Instant,
    exit: String,
    node: String,
    kind: String,
    vmid: i64,
    /// The token that started it: only it may read the task without `Sys.Audit`.
    token_id: String,
    /// Epoch seconds, as Proxmox lists it.
    starttime: i64,
    /// For a real guest: the exit status once the guest did the work.
    finished: Option<Arc<Mutex<Option<String>>>>,
}

/// A privilege withheld on an ACL path (and everything below it), from one token or all.
struct Denial {
    token_id: Option<String>,
    acl_path: String,
    privilege: String,
}

struct StatusBarrier {
    id: u64,
    waiting: usize,
    deadline: Duration,
    held: usize,
    first_held: Option<Instant>,
    release: watch::Sender<bool>,
}

pub struct FakeState {
    pub vms: BTreeMap<i64, FakeVm>,
    pub offline_nodes: HashSet<String>,
    /// Every power-action POST the fake accepted (a task started), as "action vmid".
    pub posts: Vec<String>,
    /// The form body of each accepted power action, in the same order.
    pub forms: Vec<String>,
    /// Every request, in arrival order.
    pub calls: Vec<Call>,
    tasks: HashMap<String, Task>,
    pub task_duration: Duration,
    next_pid: u32,
    /// Power actions whose task starts but whose answer is lost on the way back: the node
    /// proxy answers 596 after it forwarded the request.
    pub lost_answers: u32,
    /// The node's task list answers 500 (e.g. the node is still struggling).
    pub task_list_broken: bool,
    tokens: BTreeSet<String>,
    denials: Vec<Denial>,
    /// Substrings of "METHOD path": matching requests wait before the fake acts on them.
    hangs: Vec<String>,
    /// Substrings of "METHOD path": the fake acts, then the answer waits.
    hung_answers: Vec<String>,
    delays: Vec<(String, Duration)>,
    /// Bumped whenever the hang settings change, to wake hung requests.
    hang_changed: watch::Sender<u64>,
    barrier: Option<StatusBarrier>,
    next_barrier: u64,
    gate: Option<Gate>,
    /// VMIDs backed by a real guest.
    backends: HashMap<i64, Arc<dyn GuestBackend>>,
}

impl FakeState {
    fn new(vms: Vec<FakeVm>) -> Self {
        Self {
            vms: vms.into_iter().map(|v| (v.vmid, v)).collect(),
            offline_nodes: HashSet::new(),
            posts: Vec::new(),
            forms: Vec::new(),
            calls: Vec::new(),
            tasks: HashMap::new(),
            task_duration: Duration::from_millis(150),
            next_pid: 0x000A_1B2C,
            lost_answers: 0,
            task_list_broken: false,
            tokens: BTreeSet::from([TOKEN_ID.to_owned()]),
            denials: Vec::new(),
            hangs: Vec::new(),
            hung_answers: Vec::new(),
            delays: Vec::new(),
            hang_changed: watch::Sender::new(0),
            barrier: None,
            next_barrier: 0,
            gate: None,
            backends: HashMap::new(),
        }
    }

    /// Whether `token_id` lacks `privilege` on `acl_path` (ACLs propagate down the tree).
    fn denied(&self, token_id: &str, acl_path: &str, privilege: &str) -> bool {
        self.denials.iter().any(|d| {
            d.privilege == privilege
                && d.token_id.as_deref().is_none_or(|t| t == token_id)
                && (d.acl_path == "/"
                    || acl_path == d.acl_path
                    || acl_path.starts_with(&format!("{}/", d.acl_path)))
        })
    }

    fn wake_hung(&self) {
        self.hang_changed.send_modify(|v| *v += 1);
    }
}

#[derive(Clone)]
pub struct FakePve {
    pub state: Arc<Mutex<FakeState>>,
    pub base: String,
}

impl FakePve {
    /// Power actions the fake accepted, as "action vmid".
    pub fn posts(&self) -> Vec<String> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Every request received so far, whatever it was answered.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Every power-action POST that reached the fake, whatever it answered: "reset 100".
    pub fn action_attempts(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| c.method == "POST")
            .filter_map(|c| {
                let parts: Vec<&str> = c.path.split('/').collect();
                match parts.as_slice() {
                    ["", "nodes", _, "qemu" | "lxc", vmid, "status", action] => {
                        Some(format!("{action} {vmid}"))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    pub fn with_vm<R>(&self, vmid: i64, f: impl FnOnce(&mut FakeVm) -> R) -> R {
        f(self.state.lock().unwrap().vms.get_mut(&vmid).unwrap())
    }

    /// Environment for a server using this fake.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_for_token(TOKEN_ID)
    }

    /// Environment for a server using this fake with another token of `USER`.
    pub fn env_for_token(&self, token_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("PROXMOX_HOST", self.base.clone()),
            ("PROXMOX_USER", USER.into()),
            ("PROXMOX_TOKEN", token_id.into()),
            ("PROXMOX_SECRET", SECRET.into()),
            // The fake speaks plain HTTP on loopback.
            ("PROXMOX_TLS_INSECURE", "true".into()),
        ]
    }

    /// Accepts `USER!token_id` (with `SECRET`) as well.
    pub fn allow_token(&self, token_id: &str) {
        self.state.lock().unwrap().tokens.insert(token_id.into());
    }

    /// Deletes the token `token_id`, as rotating it in Proxmox does: it gets 401 from now on.
    pub fn revoke_token(&self, token_id: &str) {
        self.state.lock().unwrap().tokens.remove(token_id);
    }

    /// Withholds `privilege` (`VM.Audit`, `VM.PowerMgmt`, `Sys.Audit`) on `acl_path`
    /// (`/vms/100`, `/vms`, `/nodes/pve1`, `/`) and below, from every token.
    pub fn deny(&self, acl_path: &str, privilege: &str) {
        self.state.lock().unwrap().denials.push(Denial {
            token_id: None,
            acl_path: acl_path.into(),
            privilege: privilege.into(),
        });
    }

    /// Withholds `privilege` on `acl_path` and below from one token only.
    pub fn deny_token(&self, token_id: &str, acl_path: &str, privilege: &str) {
        self.state.lock().unwrap().denials.push(Denial {
            token_id: Some(token_id.into()),
            acl_path: acl_path.into(),
            privilege: privilege.into(),
        });
    }

    /// Every answer waits `d` before the fake acts (`Duration::ZERO`: no delay).
    pub fn delay(&self, d: Duration) {
        self.delay_on("", d);
    }

    /// Requests whose "METHOD path" contains `matcher` wait `d` before the fake acts; the
    /// longest matching delay applies. Setting the same matcher again replaces it.
    pub fn delay_on(&self, matcher: &str, d: Duration) {
        let mut st = self.state.lock().unwrap();
        st.delays.retain(|(m, _)| m != matcher);
        if !d.is_zero() {
            st.delays.push((matcher.into(), d));
        }
    }

    /// Every request waits, unanswered and not acted on, until `hang(false)`; off also
    /// clears `hang_on` and `hang_answer_on`.
    pub fn hang(&self, on: bool) {
        let mut st = self.state.lock().unwrap();
        if on {
            st.hangs.push(String::new());
        } else {
            st.hangs.clear();
            st.hung_answers.clear();
        }
        st.wake_hung();
    }

    /// Requests whose "METHOD path" contains `matcher` (e.g. `"POST "`, `"status/current"`)
    /// hang before the fake acts on them: nothing happens, no answer comes.
    pub fn hang_on(&self, matcher: &str) {
        let mut st = self.state.lock().unwrap();
        st.hangs.push(matcher.into());
        st.wake_hung();
    }

    /// Requests whose "METHOD path" contains `matcher` are acted on (a POST starts its task)
    /// but their answer never comes.
    pub fn hang_answer_on(&self, matcher: &str) {
        let mut st = self.state.lock().unwrap();
        st.hung_answers.push(matcher.into());
        st.wake_hung();
    }

    /// Holds each `GET .../status/current` until `waiting` of them are held at once or
    /// `deadline` passed since the first was held; then releases them all and disarms.
    pub fn hold_status_until(&self, waiting: usize, deadline: Duration) {
        let mut st = self.state.lock().unwrap();
        st.next_barrier += 1;
        st.barrier = Some(StatusBarrier {
            id: st.next_barrier,
            waiting,
            deadline,
            held: 0,
            first_held: None,
            release: watch::Sender::new(false),
        });
    }

    /// Every power-action POST awaits `gate` before it is accepted; `false` refuses it
    /// with a 500 ([`GATE_REFUSAL`]).
    pub fn gate_actions(&self, gate: Gate) {
        self.state.lock().unwrap().gate = Some(gate);
    }

    /// Drives `vmid` through a real guest from now on.
    pub fn attach(&self, vmid: i64, backend: Arc<dyn GuestBackend>) {
        self.state.lock().unwrap().backends.insert(vmid, backend);
    }

    pub fn ungate_actions(&self) {
        self.state.lock().unwrap().gate = None;
    }

    fn router(state: Arc<Mutex<FakeState>>) -> Router {
        Router::new()
            .route("/api2/json/version", get(version))
            .route("/api2/json/access/permissions", get(permissions))
            .route("/api2/json/cluster/resources", get(resources))
            .route(
                "/api2/json/nodes/{node}/qemu/{vmid}/status/current",
                get(|s: Shared, c: Caller, p: GuestPath| current(s, c, p, "qemu")),
            )
            .route(
                "/api2/json/nodes/{node}/lxc/{vmid}/status/current",
                get(|s: Shared, c: Caller, p: GuestPath| current(s, c, p, "lxc")),
            )
            .route(
                "/api2/json/nodes/{node}/qemu/{vmid}/config",
                get(|s: Shared, c: Caller, p: GuestPath| async move { config(s, c, p, "qemu") }),
            )
            .route(
                "/api2/json/nodes/{node}/lxc/{vmid}/config",
                get(|s: Shared, c: Caller, p: GuestPath| async move { config(s, c, p, "lxc") }),
            )
            .route(
                "/api2/json/nodes/{node}/qemu/{vmid}/status/{action}",
                post(|s: Shared, c: Caller, p: ActionPath, f: String| action(s, c, p, "qemu", f)),
            )
            .route(
                "/api2/json/nodes/{node}/lxc/{vmid}/status/{action}",
                post(|s: Shared, c: Caller, p: ActionPath, f: String| action(s, c, p, "lxc", f)),
            )
            .route(
                "/api2/json/nodes/{node}/qemu/{vmid}/agent/ping",
                post(agent_ping),
            )
            .route(
                "/api2/json/nodes/{node}/tasks/{upid}/status",
                get(task_status),
            )
            .route("/api2/json/nodes/{node}/tasks", get(task_list))
            .fallback(|req: Request<Body>| async move { not_implemented(&req) })
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                authenticate,
            ))
            .layer(axum::middleware::from_fn_with_state(state.clone(), record))
            .with_state(state)
    }

    fn new_state(vms: Vec<FakeVm>) -> Arc<Mutex<FakeState>> {
        Arc::new(Mutex::new(FakeState::new(vms)))
    }

    /// Serves over plain HTTP on a free port.
    pub async fn start(vms: Vec<FakeVm>) -> Self {
        let state = Self::new_state(vms);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Self::router(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            state,
            base: format!("http://{addr}"),
        }
    }

    /// Serves over HTTPS with `cert`/`key` (PEM).
    pub async fn start_tls(
        vms: Vec<FakeVm>,
        cert_der: Vec<u8>,
        key_der: Vec<u8>,
    ) -> (Self, SocketAddr) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let state = Self::new_state(vms);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert_der)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let app = Self::router(state.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // Refused handshakes are the point of some tests; ignore them here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        (
            Self {
                state,
                base: format!("https://localhost:{}", addr.port()),
            },
            addr,
        )
    }
}

/// A response with a Proxmox-style reason phrase and error body.
fn pve_error(status: u16, message: &str) -> Response {
    let body = if status == 401 || status == 595 {
        Body::empty()
    } else {
        Body::from(json!({"data": null, "message": format!("{message}\n")}).to_string())
    };
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Ok(reason) = ReasonPhrase::try_from(message.to_owned()) {
        response.extensions_mut().insert(reason);
    }
    response
}

fn forbidden(acl_path: &str, privilege: &str) -> Response {
    pve_error(
        403,
        &format!("Permission check failed ({acl_path}, {privilege})"),
    )
}

fn no_such_task() -> Response {
    let mut resp = pve_error(400, "Parameter verification failed.");
    *resp.body_mut() = Body::from(
        json!({"data": null, "errors": {"upid": "no such task"}, "message": "Parameter verification failed.\n"})
            .to_string(),
    );
    resp
}

fn not_implemented(req: &Request<Body>) -> Response {
    let text = format!(
        "Method '{} {}' not implemented",
        req.method(),
        req.uri().path().trim_start_matches("/api2/json")
    );
    pve_error(501, &text)
}

fn data(value: Value) -> Response {
    axum::Json(json!({ "data": value })).into_response()
}

fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The token id in `PVEAPIToken=user!tokenid=secret`, empty without one.
fn presented_token(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("PVEAPIToken="))
        .and_then(|v| v.split_once('!'))
        .and_then(|(_, rest)| rest.split_once('='))
        .map(|(token, _)| token.to_owned())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq)]
enum HangPoint {
    BeforeActing,
    BeforeAnswering,
}

/// Waits while a hang setting matches `line`; the lock is held only to check.
async fn wait_while_hung(state: &Arc<Mutex<FakeState>>, line: &str, point: HangPoint) {
    loop {
        let mut changed = {
            let st = state.lock().unwrap();
            let matchers = match point {
                HangPoint::BeforeActing => &st.hangs,
                HangPoint::BeforeAnswering => &st.hung_answers,
            };
            if !matchers.iter().any(|m| line.contains(m.as_str())) {
                return;
            }
            // Subscribed under the lock: a change made after the check is not missed.
            st.hang_changed.subscribe()
        };
        if changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Holds a status read at the armed barrier, if any, until it releases.
async fn hold_at_barrier(state: &Arc<Mutex<FakeState>>) {
    let (mut released, id, until) = {
        let mut st = state.lock().unwrap();
        let Some(barrier) = st.barrier.as_mut() else {
            return;
        };
        barrier.held += 1;
        let first = *barrier.first_held.get_or_insert_with(Instant::now);
        if barrier.held >= barrier.waiting {
            barrier.release.send_replace(true);
            st.barrier = None;
            return;
        }
        (
            barrier.release.subscribe(),
            barrier.id,
            first + barrier.deadline,
        )
    };
    let until = tokio::time::Instant::from_std(until);
    if tokio::time::timeout_at(until, released.wait_for(|r| *r))
        .await
        .is_err()
    {
        let mut st = state.lock().unwrap();
        if let Some(barrier) = st.barrier.take_if(|b| b.id == id) {
            barrier.release.send_replace(true);
        }
    }
}

/// Records the call, then applies delay, hang and barrier, then answers and notes the status.
async fn record(
    State(state): State<Arc<Mutex<FakeState>>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let method = req.method().to_string();
    let path = percent_decode(req.uri().path().trim_start_matches("/api2/json"));
    let line = format!("{method} {path}");
    let (index, delay) = {
        let mut st = state.lock().unwrap();
        st.calls.push(Call {
            method: method.clone(),
            path: path.clone(),
            token_id: presented_token(req.headers()),
            status: 0,
        });
        let delay = st
            .delays
            .iter()
            .filter(|(m, _)| line.contains(m.as_str()))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default();
        (st.calls.len() - 1, delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    wait_while_hung(&state, &line, HangPoint::BeforeActing).await;
    if method == "GET" && path.ends_with("/status/current") {
        hold_at_barrier(&state).await;
    }
    let response = next.run(req).await;
    wait_while_hung(&state, &line, HangPoint::BeforeAnswering).await;
    if let Some(call) = state.lock().unwrap().calls.get_mut(index) {
        call.status = response.status().as_u16();
    }
    response
}

/// The token calling, once authenticated.
#[derive(Clone)]
struct TokenId(String);

type Shared = State<Arc<Mutex<FakeState>>>;
type Caller = Extension<TokenId>;
type GuestPath = Path<(String, i64)>;
type ActionPath = Path<(String, i64, String)>;

/// Token auth, then the node proxy: a request for an offline node never reaches it (595).
async fn authenticate(State(state): Shared, mut req: Request<Body>, next: Next) -> Response {
    let Some(header) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    else {
        return pve_error(401, "No ticket");
    };
    let token_id = presented_token(req.headers());
    let offline = {
        let st = state.lock().unwrap();
        if !st.tokens.contains(&token_id)
            || header != format!("PVEAPIToken={USER}!{token_id}={SECRET}")
        {
            return pve_error(401, "Authentication failed!");
        }
        let path = req.uri().path().trim_start_matches("/api2/json");
        let mut parts = path.split('/').skip(1);
        parts.next() == Some("nodes")
            && parts
                .next()
                .is_some_and(|node| st.offline_nodes.contains(&percent_decode(node)))
    };
    if offline {
        return pve_error(595, "No route to host");
    }
    req.extensions_mut().insert(TokenId(token_id));
    next.run(req).await
}

async fn version() -> Response {
    data(json!({"version": "9.1.3", "release": "9.1", "repoid": "1a2b3c4d"}))
}

/// The caller's privileges on `path` (`GET /access/permissions?path=/vms`), as a map of
/// path to privilege names with `1` (propagated), as Proxmox answers it.
async fn permissions(
    State(state): Shared,
    Extension(caller): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = state.lock().unwrap();
    let path = q.get("path").cloned().unwrap_or_else(|| "/".into());
    let privileges: serde_json::Map<String, Value> = [
        "VM.Audit",
        "VM.PowerMgmt",
        "VM.GuestAgent.Audit",
        "VM.Console",
    ]
    .into_iter()
    .filter(|p| !st.denied(&caller.0, &path, p))
    .map(|p| (p.to_owned(), json!(1)))
    .collect();
    data(json!({ path: privileges }))
}

/// Only guests the token may audit are listed, as Proxmox filters by `VM.Audit`.
async fn resources(
    State(state): Shared,
    Extension(caller): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = state.lock().unwrap();
    assert_eq!(q.get("type").map(String::as_str), Some("vm"));
    let list: Vec<Value> = st
        .vms
        .values()
        .filter(|vm| !st.denied(&caller.0, &format!("/vms/{}", vm.vmid), "VM.Audit"))
        .map(|vm| {
            let mut entry = json!({
                "id": format!("{}/{}", vm.kind, vm.vmid), "vmid": vm.vmid, "node": vm.node,
                "type": vm.kind, "status": vm.status, "name": vm.name,
                "template": i32::from(vm.template), "uptime": 100, "cpu": 0.01, "maxmem": 2147483648u64,
            });
            if let Some(lock) = &vm.lock {
                entry["lock"] = json!(lock);
            }
            if vm.ha_managed {
                entry["hastate"] = json!("started");
            }
            if let Some(tags) = &vm.tags {
                entry["tags"] = json!(tags);
            }
            entry
        })
        .collect();
    data(json!(list))
}

/// Where Proxmox keeps a guest's config, as its "does not exist" message names it.
fn config_path(node: &str, kind: &str, vmid: i64) -> String {
    let dir = if kind == "lxc" { "lxc" } else { "qemu-server" };
    format!("nodes/{node}/{dir}/{vmid}.conf")
}

/// The guest if a config of this type exists on `node`: a container reached through
/// `/qemu/` (or a VM through `/lxc/`) has none there, exactly like a VMID of another node.
fn guest_on(st: &FakeState, node: &str, kind: &str, vmid: i64) -> Option<FakeVm> {
    st.vms
        .get(&vmid)
        .filter(|vm| vm.node == node && vm.kind == kind)
        .cloned()
}

/// `GET .../status/current` and `GET .../config` load the config first.
#[expect(clippy::result_large_err, reason = "the error is the response itself")]
fn audited_guest(
    st: &FakeState,
    caller: &str,
    node: &str,
    kind: &str,
    vmid: i64,
) -> Result<FakeVm, Response> {
    if st.denied(caller, &format!("/vms/{vmid}"), "VM.Audit") {
        return Err(forbidden(&format!("/vms/{vmid}"), "VM.Audit"));
    }
    guest_on(st, node, kind, vmid).ok_or_else(|| {
        pve_error(
            500,
            &format!(
                "Configuration file '{}' does not exist",
                config_path(node, kind, vmid)
            ),
        )
    })
}

async fn current(
    State(state): Shared,
    Extension(caller): Caller,
    Path((node, vmid)): GuestPath,
    kind: &'static str,
) -> Response {
    let found = {
        let st = state.lock().unwrap();
        audited_guest(&st, &caller.0, &node, kind, vmid)
            .map(|vm| (st.backends.get(&vmid).cloned(), vm))
    };
    let (backend, vm) = match found {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    if let Some(backend) = backend {
        return match backend.reading().await {
            Ok(r) => data(json!({
                "vmid": vmid, "name": vm.name,
                "status": if r.running { "running" } else { "stopped" },
                "qmpstatus": r.qmpstatus, "uptime": if r.running { r.uptime } else { 0 },
                "ha": {"managed": 0}, "template": 0, "cpus": 1, "cpu": 0.0,
                // QMP gives block counters; it has no NIC byte counters.
                "diskread": r.diskread, "diskwrite": r.diskwrite, "netin": 0, "netout": 0,
                "agent": i32::from(vm.agent),
            })),
            Err(message) => pve_error(500, &message),
        };
    }
    let vm = if vm.io_moving && vm.status == "running" {
        // The guest keeps writing and sending between two reads.
        let mut st = state.lock().unwrap();
        let moving = st.vms.get_mut(&vmid).unwrap();
        moving.io[1] += 65_536;
        moving.io[3] += 1_500;
        moving.clone()
    } else {
        vm
    };
    let [diskread, diskwrite, netin, netout] = vm.io;
    let mut body = json!({
        "vmid": vm.vmid, "name": vm.name, "status": vm.status,
        "uptime": "100", "ha": {"managed": i32::from(vm.ha_managed)}, "template": i32::from(vm.template),
        "cpus": 2, "cpu": 0.0123, "diskread": diskread, "diskwrite": diskwrite,
        "netin": netin, "netout": netout,
    });
    if kind == "qemu" {
        // Only QEMU has a QMP status and a guest agent.
        body["qmpstatus"] = json!(vm.qmpstatus);
        if vm.agent {
            body["agent"] = json!(1);
        }
    } else {
        body["type"] = json!("lxc");
    }
    if let Some(lock) = &vm.lock {
        body["lock"] = json!(lock);
    }
    data(body)
}

fn config(
    State(state): Shared,
    Extension(caller): Caller,
    Path((node, vmid)): GuestPath,
    kind: &'static str,
) -> Response {
    let st = state.lock().unwrap();
    let vm = match audited_guest(&st, &caller.0, &node, kind, vmid) {
        Ok(vm) => vm,
        Err(resp) => return resp,
    };
    if kind == "lxc" {
        return data(json!({
            "hostname": vm.name, "cores": 1, "memory": 512, "swap": 512, "ostype": "debian",
            "arch": "amd64", "rootfs": format!("local-lvm:vm-{vmid}-disk-0,size=8G"),
            "digest": "0123456789abcdef0123456789abcdef01234567",
        }));
    }
    let mut body = json!({"name": vm.name, "cores": 2, "memory": "2048", "cpulimit": "0.5"});
    if vm.agent {
        body["agent"] = json!("1");
    }
    if let Some(uuid) = &vm.smbios_uuid {
        body["smbios1"] = json!(format!("manufacturer=UUVNVQ==,uuid={uuid},base64=1"));
    }
    data(body)
}

/// The checks qemu-server and pve-container make before forking the worker: the guest's
/// config must be on this node (QEMU), the guest running (LXC checks only that, locally).
/// `Ok` carries the exit status the task will end with.
#[expect(clippy::result_large_err, reason = "the error is the response itself")]
fn admit_action(
    st: &FakeState,
    node: &str,
    kind: &str,
    vmid: i64,
    action: &str,
) -> Result<String, Response> {
    let guest = guest_on(st, node, kind, vmid);
    let running = guest.as_ref().is_some_and(|g| g.status == "running");
    if kind == "qemu" {
        let Some(vm) = guest else {
            return Err(pve_error(
                500,
                &format!("unable to find configuration file for VM {vmid} on node '{node}'"),
            ));
        };
        if matches!(action, "reset" | "reboot" | "shutdown") && !running {
            return Err(pve_error(500, &format!("VM {vmid} not running")));
        }
        if action == "start" && running {
            return Ok(format!("VM {vmid} already running"));
        }
        // The lock is checked inside the worker, so the POST itself succeeds.
        return Ok(match &vm.lock {
            Some(lock) => format!("VM is locked ({lock})"),
            None if action == "reboot" && vm.ignores_acpi => {
                "VM quit/powerdown failed - got timeout".into()
            }
            None => vm.task_exit,
        });
    }
    match action {
        // pve-container's reboot says "VM", the others "CT".
        "reboot" if !running => Err(pve_error(500, &format!("VM {vmid} not running"))),
        "stop" | "shutdown" if !running => Err(pve_error(500, &format!("CT {vmid} not running"))),
        "start" if running => Err(pve_error(500, &format!("CT {vmid} already running"))),
        // The start worker loads the config and fails there.
        "start" if guest.is_none() => Ok(format!(
            "Configuration file '{}' does not exist",
            config_path(node, kind, vmid)
        )),
        _ => {
            let ct = guest.unwrap();
            Ok(match &ct.lock {
                // The reboot worker takes no config lock.
                Some(lock) if action != "reboot" => format!("CT is locked ({lock})"),
                _ => ct.task_exit,
            })
        }
    }
}

async fn action(
    State(state): Shared,
    Extension(caller): Caller,
    Path((node, vmid, action)): ActionPath,
    kind: &'static str,
    form: String,
) -> Response {
    let known: &[&str] = if kind == "qemu" {
        &["reset", "reboot", "shutdown", "stop", "start"]
    } else {
        // Containers have no reset.
        &["reboot", "shutdown", "stop", "start"]
    };
    if !known.contains(&action.as_str()) {
        return pve_error(
            501,
            &format!("Method 'POST /nodes/{node}/{kind}/{vmid}/status/{action}' not implemented"),
        );
    }
    let gate = {
        let st = state.lock().unwrap();
        if st.denied(&caller.0, &format!("/vms/{vmid}"), "VM.PowerMgmt") {
            return forbidden(&format!("/vms/{vmid}"), "VM.PowerMgmt");
        }
        st.gate.clone()
    };
    if let Some(gate) = gate {
        let call = ActionCall {
            node: node.clone(),
            kind: kind.into(),
            vmid,
            action: action.clone(),
            token_id: caller.0.clone(),
        };
        if !gate(call).await {
            return pve_error(500, GATE_REFUSAL);
        }
    }
    let backend = state.lock().unwrap().backends.get(&vmid).cloned();
    if let Some(backend) = backend {
        return real_action(&state, &caller.0, &node, vmid, &action, &form, backend).await;
    }
    let mut st = state.lock().unwrap();
    let exit = match admit_action(&st, &node, kind, vmid, &action) {
        Ok(exit) => exit,
        Err(resp) => return resp,
    };
    st.posts.push(format!("{action} {vmid}"));
    st.forms.push(form);
    // A stop or start changes the guest's power state (what `status/current` shows next).
    if let Some(vm) = st.vms.get_mut(&vmid).filter(|_| exit == "OK") {
        match action.as_str() {
            "stop" => (vm.status, vm.qmpstatus) = ("stopped", "stopped"),
            "start" => (vm.status, vm.qmpstatus) = ("running", "running"),
            _ => {}
        }
    }
    st.next_pid += 1;
    let prefix = if kind == "lxc" { "vz" } else { "qm" };
    let task_type = format!("{prefix}{action}");
    let upid = format!(
        "UPID:{node}:{:08X}:0123ABCD:{:08X}:{task_type}:{vmid}:{USER}!{}:",
        st.next_pid,
        0x66A1_B2C3u32 + st.next_pid,
        caller.0
    );
    let starttime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    st.tasks.insert(
        upid.clone(),
        Task {
            started: Instant::now(),
            exit,
            node: node.clone(),
            kind: task_type,
            vmid,
            token_id: caller.0.clone(),
            starttime,
            finished: None,
        },
    );
    if st.lost_answers > 0 {
        st.lost_answers -= 1;
        return pve_error(596, "Connection timed out");
    }
    data(json!(upid))
}

/// A power action on a real guest: the checks qemu-server makes, then a task that ends
/// when QEMU did the work.
async fn real_action(
    state: &Arc<Mutex<FakeState>>,
    caller: &str,
    node: &str,
    vmid: i64,
    action: &str,
    form: &str,
    backend: Arc<dyn GuestBackend>,
) -> Response {
    let running = backend.reading().await.is_ok_and(|r| r.running);
    if matches!(action, "reset" | "reboot" | "shutdown" | "stop") && !running {
        return pve_error(500, &format!("VM {vmid} not running"));
    }
    let timeout = form
        .split('&')
        .find_map(|kv| kv.strip_prefix("timeout="))
        .and_then(|t| t.parse().ok());
    let finished = Arc::new(Mutex::new(None));
    let upid = {
        let mut st = state.lock().unwrap();
        st.posts.push(format!("{action} {vmid}"));
        st.forms.push(form.to_owned());
        st.next_pid += 1;
        let upid = format!(
            "UPID:{node}:{:08X}:0123ABCD:{:08X}:qm{action}:{vmid}:{USER}!{caller}:",
            st.next_pid,
            0x66A1_B2C3u32 + st.next_pid,
        );
        let starttime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        st.tasks.insert(
            upid.clone(),
            Task {
                started: Instant::now(),
                exit: String::new(),
                node: node.to_owned(),
                kind: format!("qm{action}"),
                vmid,
                token_id: caller.to_owned(),
                starttime,
                finished: Some(finished.clone()),
            },
        );
        upid
    };
    let action = action.to_owned();
    tokio::spawn(async move {
        let exit = if action == "start" && running {
            format!("VM {vmid} already running")
        } else {
            match backend.act(&action, timeout).await {
                Ok(()) => "OK".to_owned(),
                Err(why) => why,
            }
        };
        *finished.lock().unwrap() = Some(exit);
    });
    data(json!(upid))
}

/// `POST .../qemu/{vmid}/agent/ping`: `VM.GuestAgent.Audit` on PVE 9; failures are 500s
/// whose message says why, a silent guest only after Proxmox's own timeout.
async fn agent_ping(
    State(state): Shared,
    Extension(caller): Caller,
    Path((node, vmid)): GuestPath,
) -> Response {
    let (vm, backend) = {
        let st = state.lock().unwrap();
        if st.denied(&caller.0, &format!("/vms/{vmid}"), "VM.GuestAgent.Audit") {
            return forbidden(&format!("/vms/{vmid}"), "VM.GuestAgent.Audit");
        }
        match guest_on(&st, &node, "qemu", vmid) {
            Some(vm) => (vm, st.backends.get(&vmid).cloned()),
            None => {
                return pve_error(
                    500,
                    &format!(
                        "Configuration file '{}' does not exist",
                        config_path(&node, "qemu", vmid)
                    ),
                );
            }
        }
    };
    if let Some(backend) = backend {
        if !vm.agent {
            return pve_error(500, "No QEMU guest agent configured");
        }
        if !backend.reading().await.is_ok_and(|r| r.running) {
            return pve_error(500, &format!("VM {vmid} is not running"));
        }
        return match backend.ping().await {
            Ok(()) => data(json!({"result": {}})),
            Err(why) => pve_error(500, &format!("VM {vmid} {why}")),
        };
    }
    if vm.status != "running" {
        return pve_error(500, &format!("VM {vmid} is not running"));
    }
    if !vm.agent {
        return pve_error(500, "No QEMU guest agent configured");
    }
    match vm.guest_agent {
        GuestAgent::Answers => data(json!({"result": {}})),
        GuestAgent::NotRunning => pve_error(500, "QEMU guest agent is not running"),
        GuestAgent::Silent(after) => {
            tokio::time::sleep(after).await;
            pve_error(
                500,
                &format!("VM {vmid} qmp command 'guest-ping' failed - got timeout"),
            )
        }
    }
}

/// `GET /nodes/{node}/tasks?vmid=&typefilter=&since=`: newest first, like Proxmox; without
/// `Sys.Audit` on the node a token sees only the tasks it started.
async fn task_list(
    State(state): Shared,
    Extension(caller): Caller,
    Path(node): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = state.lock().unwrap();
    if st.task_list_broken {
        return pve_error(500, "got timeout");
    }
    let audit = !st.denied(&caller.0, &format!("/nodes/{node}"), "Sys.Audit");
    let vmid: Option<i64> = q.get("vmid").and_then(|v| v.parse().ok());
    let since: i64 = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut list: Vec<(&String, &Task)> = st
        .tasks
        .iter()
        .filter(|(_, t)| t.node == node)
        .filter(|(_, t)| audit || t.token_id == caller.0)
        .filter(|(_, t)| vmid.is_none_or(|v| t.vmid == v))
        .filter(|(_, t)| q.get("typefilter").is_none_or(|f| &t.kind == f))
        .filter(|(_, t)| t.starttime >= since)
        .collect();
    list.sort_by_key(|(_, t)| std::cmp::Reverse(t.starttime));
    let entries: Vec<Value> = list
        .into_iter()
        .map(|(upid, t)| {
            json!({"upid": upid, "node": t.node, "type": t.kind, "id": t.vmid.to_string(),
                   "starttime": t.starttime, "user": format!("{USER}!{}", t.token_id)})
        })
        .collect();
    data(json!(entries))
}

/// A task's log lives on the node that ran it: asked on another node, there is no such task.
async fn task_status(
    State(state): Shared,
    Extension(caller): Caller,
    Path((node, upid)): Path<(String, String)>,
) -> Response {
    let st = state.lock().unwrap();
    let Some(task) = st.tasks.get(&upid).filter(|t| t.node == node) else {
        return no_such_task();
    };
    if task.token_id != caller.0 && st.denied(&caller.0, &format!("/nodes/{node}"), "Sys.Audit") {
        return forbidden(&format!("/nodes/{node}"), "Sys.Audit");
    }
    let mut body = json!({"upid": upid, "node": node, "type": task.kind, "id": task.vmid.to_string(),
                          "user": USER, "tokenid": task.token_id});
    let exit = match &task.finished {
        Some(cell) => cell.lock().unwrap().clone(),
        None => (task.started.elapsed() >= st.task_duration).then(|| task.exit.clone()),
    };
    match exit {
        None => body["status"] = json!("running"),
        Some(exit) => {
            body["status"] = json!("stopped");
            body["exitstatus"] = json!(exit);
        }
    }
    data(body)
}
