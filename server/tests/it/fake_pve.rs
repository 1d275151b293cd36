//! A fake Proxmox VE API, faithful to the reference: PVEAPIToken auth with 401 reason
//! phrases, the `{"data": ...}` envelope, UPID tasks that run then stop with an exit status,
//! locks, `VM 100 not running`, 595 for an offline node, 596 after a forwarded request,
//! node task lists, VMs that migrate. HTTP or HTTPS.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::ext::ReasonPhrase;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        }
    }
}

struct Task {
    started: Instant,
    exit: String,
    node: String,
    kind: String,
    vmid: i64,
    /// Epoch seconds, as Proxmox lists it.
    starttime: i64,
}

#[derive(Default)]
pub struct FakeState {
    pub vms: BTreeMap<i64, FakeVm>,
    pub offline_nodes: HashSet<String>,
    /// Every power-action POST that reached the fake, as "action vmid".
    pub posts: Vec<String>,
    tasks: HashMap<String, Task>,
    pub task_duration: Duration,
    next_pid: u32,
    /// Power actions whose task starts but whose answer is lost on the way back: the node
    /// proxy answers 596 after it forwarded the request.
    pub lost_answers: u32,
    /// The node's task list answers 500 (e.g. the node is still struggling).
    pub task_list_broken: bool,
}

#[derive(Clone)]
pub struct FakePve {
    pub state: Arc<Mutex<FakeState>>,
    pub base: String,
}

impl FakePve {
    pub fn posts(&self) -> Vec<String> {
        self.state.lock().unwrap().posts.clone()
    }

    pub fn with_vm<R>(&self, vmid: i64, f: impl FnOnce(&mut FakeVm) -> R) -> R {
        f(self.state.lock().unwrap().vms.get_mut(&vmid).unwrap())
    }

    /// Environment for a server using this fake.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROXMOX_HOST", self.base.clone()),
            ("PROXMOX_USER", USER.into()),
            ("PROXMOX_TOKEN", TOKEN_ID.into()),
            ("PROXMOX_SECRET", SECRET.into()),
        ]
    }

    fn router(state: Arc<Mutex<FakeState>>) -> Router {
        Router::new()
            .route("/api2/json/version", get(version))
            .route("/api2/json/cluster/resources", get(resources))
            .route(
                "/api2/json/nodes/{node}/{kind}/{vmid}/status/current",
                get(current),
            )
            .route("/api2/json/nodes/{node}/qemu/{vmid}/config", get(config))
            .route(
                "/api2/json/nodes/{node}/{kind}/{vmid}/status/{action}",
                post(action),
            )
            .route(
                "/api2/json/nodes/{node}/tasks/{upid}/status",
                get(task_status),
            )
            .route("/api2/json/nodes/{node}/tasks", get(task_list))
            .fallback(|req: Request<Body>| async move {
                let text = format!(
                    "Method '{} {}' not implemented",
                    req.method(),
                    req.uri().path().trim_start_matches("/api2/json")
                );
                pve_error(501, &text)
            })
            .layer(axum::middleware::from_fn(authenticate))
            .with_state(state)
    }

    fn new_state(vms: Vec<FakeVm>) -> Arc<Mutex<FakeState>> {
        Arc::new(Mutex::new(FakeState {
            vms: vms.into_iter().map(|v| (v.vmid, v)).collect(),
            task_duration: Duration::from_millis(150),
            next_pid: 0x000A_1B2C,
            ..Default::default()
        }))
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

fn data(value: Value) -> Response {
    axum::Json(json!({ "data": value })).into_response()
}

async fn authenticate(
    headers: HeaderMap,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let expected = format!("PVEAPIToken={USER}!{TOKEN_ID}={SECRET}");
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => pve_error(401, "No ticket"),
        Some(v) if v == expected => next.run(req).await,
        Some(_) => pve_error(401, "Authentication failed!"),
    }
}

type Shared = State<Arc<Mutex<FakeState>>>;

async fn version() -> Response {
    data(json!({"version": "9.1.3", "release": "9.1", "repoid": "1a2b3c4d"}))
}

async fn resources(State(state): Shared, Query(q): Query<HashMap<String, String>>) -> Response {
    let st = state.lock().unwrap();
    assert_eq!(q.get("type").map(String::as_str), Some("vm"));
    let list: Vec<Value> = st
        .vms
        .values()
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
            entry
        })
        .collect();
    data(json!(list))
}

/// The VM if it lives on `node`, else the error Proxmox gives for a VMID not on that node.
#[expect(clippy::result_large_err, reason = "the error is the response itself")]
fn locate(st: &FakeState, node: &str, vmid: i64, for_post: bool) -> Result<FakeVm, Response> {
    if st.offline_nodes.contains(node) {
        return Err(pve_error(595, "No route to host"));
    }
    match st.vms.get(&vmid) {
        Some(vm) if vm.node == node => Ok(vm.clone()),
        _ if for_post => Err(pve_error(
            500,
            &format!("unable to find configuration file for VM {vmid} on node '{node}'"),
        )),
        _ => Err(pve_error(
            500,
            &format!("Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"),
        )),
    }
}

async fn current(
    State(state): Shared,
    Path((node, _kind, vmid)): Path<(String, String, i64)>,
) -> Response {
    let st = state.lock().unwrap();
    let vm = match locate(&st, &node, vmid, false) {
        Ok(vm) => vm,
        Err(resp) => return resp,
    };
    let mut body = json!({
        "vmid": vm.vmid, "name": vm.name, "status": vm.status, "qmpstatus": vm.qmpstatus,
        "uptime": "100", "ha": {"managed": i32::from(vm.ha_managed)}, "template": i32::from(vm.template),
        "agent": 1, "cpus": 2,
    });
    if let Some(lock) = &vm.lock {
        body["lock"] = json!(lock);
    }
    data(body)
}

async fn config(State(state): Shared, Path((node, vmid)): Path<(String, i64)>) -> Response {
    let st = state.lock().unwrap();
    let vm = match locate(&st, &node, vmid, false) {
        Ok(vm) => vm,
        Err(resp) => return resp,
    };
    let mut body = json!({"name": vm.name, "cores": 2, "memory": "2048", "cpulimit": "0.5"});
    if let Some(uuid) = &vm.smbios_uuid {
        body["smbios1"] = json!(format!("manufacturer=UUVNVQ==,uuid={uuid},base64=1"));
    }
    data(body)
}

async fn action(
    State(state): Shared,
    Path((node, kind, vmid, action)): Path<(String, String, i64, String)>,
) -> Response {
    let mut st = state.lock().unwrap();
    let vm = match locate(&st, &node, vmid, true) {
        Ok(vm) => vm,
        Err(resp) => return resp,
    };
    if kind == "lxc" && action == "reset" {
        return pve_error(
            501,
            &format!("Method 'POST /nodes/{node}/lxc/{vmid}/status/reset' not implemented"),
        );
    }
    if matches!(action.as_str(), "reset" | "reboot" | "shutdown") && vm.status != "running" {
        return pve_error(500, &format!("VM {vmid} not running"));
    }
    st.posts.push(format!("{action} {vmid}"));
    st.next_pid += 1;
    let task_type = format!("qm{action}");
    let upid = format!(
        "UPID:{node}:{:08X}:0123ABCD:{:08X}:{task_type}:{vmid}:{USER}!{TOKEN_ID}:",
        st.next_pid,
        0x66A1_B2C3u32 + st.next_pid
    );
    // The lock is checked inside the worker, so the POST itself succeeds.
    let exit = match &vm.lock {
        Some(lock) => format!("VM is locked ({lock})"),
        None => vm.task_exit.clone(),
    };
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
            starttime,
        },
    );
    if st.lost_answers > 0 {
        st.lost_answers -= 1;
        return pve_error(596, "Connection timed out");
    }
    data(json!(upid))
}

/// `GET /nodes/{node}/tasks?vmid=&typefilter=&since=`: newest first, like Proxmox.
async fn task_list(
    State(state): Shared,
    Path(node): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = state.lock().unwrap();
    if st.task_list_broken {
        return pve_error(500, "got timeout");
    }
    let vmid: Option<i64> = q.get("vmid").and_then(|v| v.parse().ok());
    let since: i64 = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut list: Vec<(&String, &Task)> = st
        .tasks
        .iter()
        .filter(|(_, t)| t.node == node)
        .filter(|(_, t)| vmid.is_none_or(|v| t.vmid == v))
        .filter(|(_, t)| q.get("typefilter").is_none_or(|f| &t.kind == f))
        .filter(|(_, t)| t.starttime >= since)
        .collect();
    list.sort_by_key(|(_, t)| std::cmp::Reverse(t.starttime));
    let entries: Vec<Value> = list
        .into_iter()
        .map(|(upid, t)| {
            json!({"upid": upid, "node": t.node, "type": t.kind, "id": t.vmid.to_string(),
                   "starttime": t.starttime, "user": format!("{USER}!{TOKEN_ID}")})
        })
        .collect();
    data(json!(entries))
}

async fn task_status(State(state): Shared, Path((node, upid)): Path<(String, String)>) -> Response {
    let st = state.lock().unwrap();
    if st.offline_nodes.contains(&node) {
        return pve_error(595, "No route to host");
    }
    let Some(task) = st.tasks.get(&upid) else {
        let mut resp = pve_error(400, "Parameter verification failed.");
        *resp.body_mut() = Body::from(
            json!({"data": null, "errors": {"upid": "no such task"}, "message": "Parameter verification failed.\n"}).to_string(),
        );
        return resp;
    };
    let mut body =
        json!({"upid": upid, "node": node, "type": task.kind, "user": USER, "tokenid": TOKEN_ID});
    if task.started.elapsed() < st.task_duration {
        body["status"] = json!("running");
    } else {
        body["status"] = json!("stopped");
        body["exitstatus"] = json!(task.exit);
    }
    data(body)
}
