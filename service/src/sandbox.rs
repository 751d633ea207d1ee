//! Sandboxes: one VMM process each (`ember-vmm`), its control socket, its agent connection,
//! and the record on disk that lets a restarted service find it again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_agent::client::{AgentClient, AgentInfo};
use ember_agent::protocol::AGENT_VSOCK_PORT;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::error::ApiError;
use super::exec::CommandRecord;
use super::network::{self, NetworkMode, SandboxNet};
use super::ports::{self, ExposedPort};
use super::process::Process;
use super::AppState;
use ember_sandbox::control::{
    ControlReply, ControlRequest, WorkerEvent, WorkerOrigin, WorkerSpec, MAX_CONTROL_LINE,
};

/// How long a VMM process may take from start to its guest's agent answering (the lab is
/// ~30× slower than native hardware).
const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a stopped VMM process gets to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How much of a VMM's log explains its failure.
const FAILURE_TAIL: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    /// Stopped on request (delete, timeout, or a snapshot with `stop`).
    Stopped,
    /// The VMM process ended by itself or could not start; `failure` says why.
    Failed,
}

impl SandboxState {
    pub fn label(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    pub const ALL: [SandboxState; 5] = [
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopped,
        SandboxState::Failed,
    ];

    pub fn is_live(self) -> bool {
        matches!(
            self,
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused
        )
    }
}

/// What is kept on disk about a sandbox (`<state>/sandboxes/<id>/sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub created_unix_ms: u64,
    pub spec: WorkerSpec,
    pub env: BTreeMap<String, String>,
    pub state: SandboxState,
    pub failure: Option<String>,
    pub pid: Option<u32>,
    /// When the sandbox is stopped automatically.
    pub deadline_unix_ms: u64,
    /// From the VMM's start to the agent answering.
    pub ready_ms: Option<f64>,
    /// The last snapshot taken of this sandbox (the parent of a diff).
    #[serde(default)]
    pub last_snapshot: Option<String>,
    /// Its network namespace's mode and link (none: no namespace).
    #[serde(default)]
    pub net: Option<SandboxNet>,
    /// Guest ports exposed on the host's loopback.
    #[serde(default)]
    pub ports: Vec<ExposedPort>,
    /// Where its start spent its time, up to its first command's end.
    #[serde(default)]
    pub timeline: super::timeline::StartTimeline,
    /// How a restored sandbox's memory arrived.
    #[serde(default)]
    pub memory: Option<ember_vmm::RestoreMode>,
    /// When it stopped or failed (its record is deleted a retention period later).
    #[serde(default)]
    pub ended_unix_ms: Option<u64>,
}

pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    record: Mutex<SandboxRecord>,
    /// The connection to the guest's agent, made on first use and shared by requests.
    agent: tokio::sync::Mutex<Option<Arc<AgentClient>>>,
    /// Control requests go one at a time.
    control: tokio::sync::Mutex<()>,
    pub commands: Mutex<HashMap<String, Arc<CommandRecord>>>,
    next_command: AtomicU64,
    /// Whether the first command after a restore has finished (its pages are the working
    /// set recorded for the snapshot).
    pub first_exec_done: std::sync::atomic::AtomicBool,
    /// Whether a restored guest's clock and entropy were resynced (sent ahead of the first
    /// request on the first agent connection).
    resynced: std::sync::atomic::AtomicBool,
    /// Whether the sandbox's folder was removed (it was deleted); held while the record is
    /// written, so a late update (its VMM's end, noticed after the delete) cannot put the
    /// folder back.
    removed: Mutex<bool>,
    /// The listeners of its exposed ports.
    forwards: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Its VMM process (by pidfd) while the service knows it.
    process: Mutex<Option<Arc<Process>>>,
    /// Turns for blocking calls to its agent (see [`Sandbox::agent_turn`]).
    agent_calls: Arc<tokio::sync::Semaphore>,
}

/// Blocking calls to one sandbox's agent at once (commands running, file transfers): a
/// silent or slow agent holds at most this many of the service's blocking threads.
pub const MAX_AGENT_CALLS: usize = 64;
/// How long a request waits for a turn before it is refused.
const AGENT_TURN_WAIT: Duration = Duration::from_secs(30);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A random id with a prefix, e.g. `sb-3f9a0c1d2e4b`.
pub fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Ids the API accepts for sandboxes, snapshots and commands: 1–64 of `[A-Za-z0-9._-]`,
/// not starting with a dot.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Sandbox {
    fn new(dir: PathBuf, record: SandboxRecord) -> Sandbox {
        Sandbox {
            id: record.id.clone(),
            dir,
            record: Mutex::new(record),
            agent: tokio::sync::Mutex::new(None),
            control: tokio::sync::Mutex::new(()),
            commands: Mutex::new(HashMap::new()),
            next_command: AtomicU64::new(1),
            first_exec_done: std::sync::atomic::AtomicBool::new(false),
            resynced: std::sync::atomic::AtomicBool::new(false),
            removed: Mutex::new(false),
            forwards: Mutex::new(Vec::new()),
            process: Mutex::new(None),
            agent_calls: Arc::new(tokio::sync::Semaphore::new(MAX_AGENT_CALLS)),
        }
    }

    /// A sandbox with only a record (no VMM), for tests of the service's bookkeeping.
    #[cfg(test)]
    pub(crate) fn for_test(
        dir: PathBuf,
        id: &str,
        origin: WorkerOrigin,
        state: SandboxState,
    ) -> Sandbox {
        let spec = WorkerSpec {
            sandbox_id: id.into(),
            kernel: "/k".into(),
            rootfs: "/r".into(),
            vcpus: 1,
            mem_mib: 256,
            origin,
            store_dir: "/s".into(),
            vsock_socket: "/v".into(),
            control_socket: "/c".into(),
            overlay: "/o".into(),
            disk_rate_limit: Default::default(),
            net_rate_limits: Default::default(),
            jail: None,
            net: None,
            mem_cache: None,
        };
        let record = SandboxRecord {
            id: id.into(),
            created_unix_ms: 0,
            spec,
            env: BTreeMap::new(),
            state,
            failure: None,
            pid: None,
            deadline_unix_ms: 0,
            ready_ms: None,
            last_snapshot: None,
            net: None,
            ports: Vec::new(),
            timeline: Default::default(),
            memory: None,
            ended_unix_ms: None,
        };
        Sandbox::new(dir, record)
    }

    /// Removes the sandbox's folder (record, log, overlay) and its sockets for good.
    pub fn remove_from_disk(&self) {
        self.close_ports();
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        *removed = true;
        if self.record().net.is_some() {
            network::remove(&self.id);
        }
        let spec = self.record().spec;
        // Sockets live in a folder of their own (`run/ID/`); records from before that had
        // them straight in `run/`.
        let sockets = spec
            .vsock_socket
            .parent()
            .filter(|dir| dir.file_name() == Some(std::ffi::OsStr::new(&self.id)));
        let mut gone = vec![self.dir.clone()];
        match sockets {
            Some(dir) => gone.push(dir.to_path_buf()),
            None => {
                let _ = std::fs::remove_file(&spec.vsock_socket);
                let _ = std::fs::remove_file(&spec.control_socket);
            }
        }
        for dir in gone {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
    }

    pub fn record(&self) -> SandboxRecord {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn state(&self) -> SandboxState {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    /// Changes the record and writes it to disk.
    /// Changes the record in memory only (it is written with the next `update`): for what
    /// is not worth a write on a request's path, such as timeline steps.
    pub fn note(&self, change: impl FnOnce(&mut SandboxRecord)) {
        change(&mut self.record.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn update(&self, change: impl FnOnce(&mut SandboxRecord)) {
        let snapshot = {
            let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
            change(&mut record);
            if record.state.is_live() {
                record.ended_unix_ms = None;
            } else if record.ended_unix_ms.is_none() {
                record.ended_unix_ms = Some(unix_ms());
            }
            record.clone()
        };
        let removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        if *removed {
            return;
        }
        if let Err(e) = save_record(&self.dir, &snapshot) {
            log::warn!("cannot save the record of sandbox {}: {e}", self.id);
        }
        drop(removed);
    }

    /// Marks the sandbox failed unless it was already stopped or failed.
    /// Stops listening on its exposed ports (connections already made end with the VMM).
    pub fn close_ports(&self) {
        for task in self
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Listens on its exposed ports: `wanted` guest ports on any free host ports, and those
    /// of its record (after a service restart) on the same host ports where still free.
    pub async fn open_ports(&self, wanted: &[u16]) -> Result<(), String> {
        let record = self.record();
        let mut plan: Vec<(u16, u16)> = record
            .ports
            .iter()
            .map(|p| (p.guest_port, p.host.port()))
            .collect();
        plan.extend(wanted.iter().map(|&g| (g, 0)));
        let mut exposed = Vec::new();
        for (guest_port, host_port) in plan {
            let socket = record.spec.vsock_socket.clone();
            let made = match ports::expose(socket.clone(), guest_port, host_port).await {
                Err(_) if host_port != 0 => ports::expose(socket, guest_port, 0).await,
                other => other,
            };
            let (port, task) = made.map_err(|e| {
                format!("cannot listen on the host for guest port {guest_port}: {e}")
            })?;
            self.forwards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
            exposed.push(port);
        }
        self.update(|r| r.ports = exposed);
        Ok(())
    }

    pub fn fail(&self, reason: String) {
        self.close_ports();
        self.update(|r| {
            if r.state.is_live() {
                log::warn!("sandbox {} failed: {reason}", r.id);
                r.state = SandboxState::Failed;
                r.failure = Some(reason);
            }
        });
    }

    pub fn next_command_id(&self) -> String {
        format!("cmd-{}", self.next_command.fetch_add(1, Ordering::Relaxed))
    }

    pub fn restored_from(&self) -> Option<String> {
        match &self.record().spec.origin {
            WorkerOrigin::Restore { snapshot, .. } => Some(snapshot.clone()),
            WorkerOrigin::Boot => None,
        }
    }

    /// The sandbox as the API shows it.
    pub fn to_json(&self) -> Value {
        let r = self.record();
        json!({
            "id": r.id,
            "state": r.state.label(),
            "failure": r.failure,
            "created_unix_ms": r.created_unix_ms,
            "vcpus": r.spec.vcpus,
            "memory_mib": r.spec.mem_mib,
            "snapshot": match &r.spec.origin {
                WorkerOrigin::Restore { snapshot, .. } => Some(snapshot.clone()),
                WorkerOrigin::Boot => None,
            },
            "restore_mode": match &r.spec.origin {
                WorkerOrigin::Restore { mode, .. } => Some(*mode),
                WorkerOrigin::Boot => None,
            },
            "timeout_at_unix_ms": r.deadline_unix_ms,
            "ready_ms": r.ready_ms,
            "memory": r.memory,
            "timeline": r.timeline.steps,
            "pid": r.pid,
            "env": r.env,
            "disk_limits": r.spec.disk_rate_limit,
            "net_limits": r.spec.net_rate_limits,
            "network": r.net.as_ref().map_or_else(|| json!({"mode": "none"}), SandboxNet::to_json),
            "ports": r.ports,
        })
    }

    /// Fails unless the sandbox is running (paused, stopped and failed ones run nothing).
    pub fn require_running(&self) -> Result<(), ApiError> {
        let r = self.record();
        match r.state {
            SandboxState::Running => Ok(()),
            SandboxState::Failed => Err(ApiError::conflict(format!(
                "sandbox {} has failed: {}",
                r.id,
                r.failure.unwrap_or_default()
            ))),
            state => Err(ApiError::conflict(format!(
                "sandbox {} is {}",
                r.id,
                state.label()
            ))),
        }
    }

    /// The agent connection (made on first use).
    pub async fn agent(&self) -> Result<Arc<AgentClient>, ApiError> {
        let mut slot = self.agent.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = self.connect_agent().await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// A new connection to the agent, with its hello answered (and, for a restored guest not
    /// resynced yet, the clock and entropy resync sent ahead of the next request).
    async fn connect_agent(&self) -> Result<Arc<AgentClient>, ApiError> {
        let socket = self.record().spec.vsock_socket;
        let id = self.id.clone();
        let client = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let client = AgentClient::connect_uds(&socket, AGENT_VSOCK_PORT)?;
            let connected = start.elapsed();
            client.hello()?;
            log::debug!(
                "{id}: agent connection made in {:.1} ms, hello answered {:.1} ms later",
                connected.as_secs_f64() * 1e3,
                (start.elapsed() - connected).as_secs_f64() * 1e3
            );
            Ok::<_, ember_agent::client::ClientError>(client)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| super::error::from_agent("connecting to the guest agent", e))?;
        self.resync_once(&client);
        Ok(Arc::new(client))
    }

    /// A restored guest has the snapshot's clock and entropy (the same in every clone): its
    /// first connection sends the host's ahead of whatever request comes next.
    fn resync_once(&self, client: &AgentClient) {
        if self.restored_from().is_none() || self.resynced.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = client.resync_now_pipelined() {
            log::warn!(
                "{}: cannot resync the restored guest's clock and entropy: {e}",
                self.id
            );
        }
    }

    /// Takes the connection the VMM found its agent on (passed up its stdin) as this
    /// sandbox's agent connection, so the first request needs no connection of its own.
    /// Without one (false), the first request connects as before.
    pub async fn adopt_agent(
        &self,
        stdin: std::os::unix::net::UnixStream,
        info: AgentInfo,
    ) -> bool {
        let id = self.id.clone();
        let adopted = tokio::task::spawn_blocking(move || {
            let stream = super::launch::receive_agent_connection(&stdin, &id)?;
            AgentClient::adopt(stream, info)
                .map_err(|e| log::warn!("{id}: cannot adopt the agent connection: {e}"))
                .ok()
        })
        .await
        .ok()
        .flatten();
        let Some(client) = adopted else {
            return false;
        };
        self.resync_once(&client);
        let mut slot = self.agent.lock().await;
        if slot.is_none() {
            *slot = Some(Arc::new(client));
        }
        true
    }

    /// A turn for one blocking call to the agent, held until the call ends: waits (without a
    /// thread) while [`MAX_AGENT_CALLS`] are under way, and refuses the request (503) after
    /// waiting that long.
    pub async fn agent_turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        tokio::time::timeout(AGENT_TURN_WAIT, self.agent_calls.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "agent_busy",
                    format!(
                        "sandbox {}: {MAX_AGENT_CALLS} calls to its agent are under way and \
                         none ended within {AGENT_TURN_WAIT:?}",
                        self.id
                    ),
                )
            })
    }

    /// Drops a broken agent connection so the next request makes a new one.
    pub async fn forget_agent(&self) {
        *self.agent.lock().await = None;
    }

    /// Sends one control request to the VMM process.
    pub async fn control(
        &self,
        request: ControlRequest,
        timeout: Duration,
    ) -> Result<ControlReply, String> {
        // The wait for an earlier request (a long snapshot, say) counts toward the timeout.
        let path = self.record().spec.control_socket;
        let turn_and_answer = async {
            let _turn = self.control.lock().await;
            control_request(&path, &request).await
        };
        tokio::time::timeout(timeout, turn_and_answer)
            .await
            .map_err(|_| format!("the VMM did not answer {request:?} within {timeout:?}"))?
    }

    /// Stops the VMM process: asks it, then kills it after a grace period (its whole cgroup
    /// when it has one: the jail's supervisor and anything it left).
    pub async fn stop(&self, why: &str, cgroups: Option<&super::cgroup::Cgroups>) {
        let record = self.record();
        if !record.state.is_live() {
            return;
        }
        log::info!("stopping sandbox {} ({why})", self.id);
        self.close_ports();
        self.update(|r| {
            r.state = SandboxState::Stopped;
            r.failure = None;
        });
        let _ = self
            .control(ControlRequest::Stop, Duration::from_secs(5))
            .await;
        if let Some(process) = self.process() {
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while process.is_alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if process.is_alive() {
                log::warn!(
                    "sandbox {}: killing its VMM (pid {})",
                    self.id,
                    process.pid()
                );
                if let Some(cgroups) = cgroups {
                    cgroups.kill(&self.id);
                }
                let _ = process.signal(libc::SIGKILL);
            }
        }
        self.forget_agent().await;
    }
}

async fn control_request(path: &Path, request: &ControlRequest) -> Result<ControlReply, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot reach the VMM's control socket: {e}"))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("cannot send to the VMM: {e}"))?;
    let mut reply = String::new();
    let mut reader = BufReader::new(read).take(MAX_CONTROL_LINE as u64);
    reader
        .read_line(&mut reply)
        .await
        .map_err(|e| format!("cannot read the VMM's reply: {e}"))?;
    if reply.is_empty() {
        return Err("the VMM closed its control socket without answering".into());
    }
    serde_json::from_str(&reply).map_err(|e| format!("malformed reply from the VMM: {e}"))
}

impl Sandbox {
    /// Its VMM process, if the service holds it.
    pub fn process(&self) -> Option<Arc<Process>> {
        self.process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Holds process `pid` as the sandbox's VMM (logged if it cannot be opened: it ended).
    fn hold_process(&self, pid: u32) -> Option<Arc<Process>> {
        match Process::open(pid) {
            Ok(process) => {
                let process = Arc::new(process);
                *self.process.lock().unwrap_or_else(|p| p.into_inner()) = Some(process.clone());
                Some(process)
            }
            Err(e) => {
                log::warn!("sandbox {}: cannot hold its VMM (pid {pid}): {e}", self.id);
                None
            }
        }
    }
}

fn save_record(dir: &Path, record: &SandboxRecord) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let tmp = dir.join("sandbox.json.tmp");
    super::access::write_private(&tmp, &text)?;
    std::fs::rename(&tmp, dir.join("sandbox.json"))
}

/// The last bytes of a VMM's log: why it failed.
pub fn log_tail(dir: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut log) = std::fs::File::open(dir.join("vmm.log")) else {
        return String::new();
    };
    // Only the tail is read, however long the log grew.
    let _ = log.seek(SeekFrom::End(-(FAILURE_TAIL as i64)));
    let mut tail = Vec::with_capacity(FAILURE_TAIL);
    let _ = log.take(FAILURE_TAIL as u64).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).trim().to_string()
}

/// What a new sandbox is made from.
pub struct NewSandbox {
    pub origin: WorkerOrigin,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub disk_rate_limit: ember_vmm::RateLimit,
    pub net_rate_limits: ember_vmm::NetRateLimits,
    pub network: NetworkMode,
    /// Restored from a snapshot whose guest has a network device (which then needs a TAP
    /// whatever the mode).
    pub restored_nic: bool,
    /// Guest ports to expose on the host.
    pub ports: Vec<u16>,
}

/// The subfolder of a sandbox's folder that belongs to its VMM (overlay, stall reports).
pub const VMM_DIR: &str = "vmm";

/// Starts a VMM process for a new sandbox and waits until its agent answers.
pub async fn create(state: &Arc<AppState>, new: NewSandbox) -> Result<Arc<Sandbox>, ApiError> {
    let begun = std::time::Instant::now();
    let ms = move || begun.elapsed().as_secs_f64() * 1e3;
    let wants_namespace = new.restored_nic || matches!(new.network, NetworkMode::Egress { .. });
    if wants_namespace && state.config.jail.is_none() {
        return Err(ApiError::bad_request(
            "sandbox networks need the service to run as root (it makes network namespaces, \
             TAPs and nftables rules); this one is not",
        ));
    }
    {
        let sandboxes = state.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let live = sandboxes.values().filter(|s| s.state().is_live()).count();
        if live >= state.config.max_sandboxes {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_sandboxes",
                format!(
                    "{live} sandboxes are running; this service allows {}",
                    state.config.max_sandboxes
                ),
            ));
        }
    }
    // A warm-pool VMM made ahead of time becomes this sandbox (its id, folders, jail and
    // cgroup included; a network's TAP queue goes to it with the assignment).
    let pooled = state.pool.as_ref().and_then(|pool| pool.take(state));
    let id = pooled
        .as_ref()
        .map_or_else(|| random_id("sb"), |vmm| vmm.id.clone());
    let dir = state.config.state_dir.join("sandboxes").join(&id);
    super::access::private_dir(&dir)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
    std::fs::create_dir_all(dir.join(VMM_DIR)).map_err(|e| {
        ApiError::internal(format!(
            "cannot create {}: {e}",
            dir.join(VMM_DIR).display()
        ))
    })?;
    // Its sockets get a folder of their own: a jailed VMM sees that folder, not the others'.
    let run = state.config.state_dir.join("run").join(&id);
    std::fs::create_dir_all(&run)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", run.display())))?;
    let mut spec = WorkerSpec {
        vcpus: new.vcpus,
        mem_mib: new.mem_mib,
        origin: new.origin.clone(),
        disk_rate_limit: new.disk_rate_limit,
        net_rate_limits: new.net_rate_limits,
        // A restored guest keeps the MAC it was saved with; this one is for booted guests.
        net: wants_namespace.then(|| network::worker_net(ember_sandbox::defaults::random_mac())),
        ..base_spec(state, &id)
    };
    if let Some(ids) = state.config.jail {
        let mut jail = ids
            .prepare(&spec, &dir, &dir.join(VMM_DIR), &run)
            .map_err(|e| ApiError::internal(format!("cannot prepare the jail: {e}")))?;
        if pooled.is_some() {
            // The pooled VMM's jail, made before this sandbox: a network namespace of its
            // own, the sandbox's TAP queue handed over instead.
            jail.netns = None;
        }
        spec.jail = Some(jail);
    }
    let record = SandboxRecord {
        id: id.clone(),
        created_unix_ms: unix_ms(),
        spec: spec.clone(),
        env: new.env,
        state: SandboxState::Starting,
        failure: None,
        pid: None,
        deadline_unix_ms: unix_ms() + new.timeout.as_millis() as u64,
        ready_ms: None,
        last_snapshot: None,
        net: None,
        ports: Vec::new(),
        timeline: super::timeline::StartTimeline::accepted(ms()),
        memory: None,
        ended_unix_ms: None,
    };
    let sandbox = {
        let mut sandboxes = state.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        // Chosen and taken under one lock. Slots of sandboxes not deleted yet stay taken:
        // their namespaces exist.
        let used: std::collections::HashSet<u32> = sandboxes
            .values()
            .filter_map(|s| s.record().net.and_then(|n| n.slot))
            .collect();
        let slot = match new.network {
            NetworkMode::Egress { .. } => network::free_slot(&used),
            NetworkMode::None {} => None,
        };
        if matches!(new.network, NetworkMode::Egress { .. }) && slot.is_none() {
            drop(sandboxes);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&run);
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_sandboxes",
                format!(
                    "all {} sandbox network links are in use",
                    network::MAX_SLOTS
                ),
            ));
        }
        let mut record = record;
        record.net = wants_namespace.then(|| SandboxNet {
            mode: new.network.clone(),
            slot,
        });
        let sandbox = Arc::new(Sandbox::new(dir.clone(), record));
        sandboxes.insert(id.clone(), sandbox.clone());
        sandbox
    };
    sandbox.update(|_| {});
    if let (Some(net), Some(ids)) = (sandbox.record().net, state.config.jail) {
        let sandbox_id = id.clone();
        let made = tokio::task::spawn_blocking(move || {
            network::create(&sandbox_id, &net.mode, net.slot, (ids.uid, ids.gid))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|made| made.map_err(|e| e.to_string()));
        if let Err(why) = made {
            let why = format!("cannot make its network: {why}");
            sandbox.fail(why.clone());
            return Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                format!("sandbox {id} did not start: {why}"),
            ));
        }
    }

    log::debug!(
        "sandbox {id}: folders, jail and network prepared in {:.1} ms",
        ms()
    );
    let started = match start_vmm(state, &sandbox, &spec, pooled).await {
        Ok(ready_ms) => sandbox.open_ports(&new.ports).await.map(|()| ready_ms),
        Err(why) => Err(why),
    };
    match started {
        Ok(ready_ms) => {
            let restored = matches!(new.origin, WorkerOrigin::Restore { .. });
            if let WorkerOrigin::Restore { snapshot, .. } = &new.origin {
                // The agent connection (with the clock and entropy resync ahead of the first
                // request) is made now, off the path of the request that comes next (made
                // while the VMM restores, beside the VMM's own probe, it slows both).
                let early = sandbox.clone();
                tokio::spawn(async move {
                    let _ = early.agent().await;
                });
                // A snapshot not materialised yet (saved before the cache, or evicted) is,
                // after this restore, for the next ones.
                state
                    .mem_cache
                    .materialise_later(state.store.clone(), snapshot.clone());
            }
            state.metrics.record_start(restored, ready_ms);
            log::info!(
                "sandbox {id} ready in {ready_ms:.1} ms ({}; {:.1} ms since the request)",
                if restored { "restored" } else { "booted" },
                ms()
            );
            Ok(sandbox)
        }
        Err(why) => {
            state.metrics.record_start_failure();
            sandbox.fail(why.clone());
            if let Some(process) = sandbox.process() {
                let _ = process.signal(libc::SIGKILL);
            }
            Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                format!("sandbox {id} did not start: {why}"),
            ))
        }
    }
}

/// The spec of sandbox `id`'s VMM with what does not depend on the request: the service's
/// kernel, rootfs, store and memory cache, the sandbox's own folders; one vCPU, 256 MiB,
/// a boot, no limits and no network until the caller says otherwise.
pub fn base_spec(state: &AppState, id: &str) -> WorkerSpec {
    let dir = state.config.state_dir.join("sandboxes").join(id);
    // Its sockets get a folder of their own: a jailed VMM sees that folder, not the others'.
    let run = state.config.state_dir.join("run").join(id);
    WorkerSpec {
        sandbox_id: id.to_string(),
        kernel: state.config.kernel.clone(),
        rootfs: state.config.rootfs.clone(),
        vcpus: 1,
        mem_mib: 256,
        origin: WorkerOrigin::Boot,
        store_dir: state.config.store_dir.clone(),
        vsock_socket: run.join("vsock"),
        control_socket: run.join("ctl"),
        // The only part of the sandbox's folder its VMM writes (and, jailed, sees): the
        // record and spec stay the service's.
        overlay: dir.join(VMM_DIR).join("rootfs.overlay"),
        disk_rate_limit: Default::default(),
        net_rate_limits: Default::default(),
        jail: None,
        net: None,
        mem_cache: Some(state.mem_cache.cache.dir().to_path_buf()),
    }
}

/// Starts the sandbox's VMM (or hands `pooled` its assignment) and waits until its agent
/// answers.
async fn start_vmm(
    state: &Arc<AppState>,
    sandbox: &Arc<Sandbox>,
    spec: &WorkerSpec,
    pooled: Option<super::pool::IdleVmm>,
) -> Result<f64, String> {
    let ((mut child, stdin), step) = match pooled {
        Some(vmm) => {
            // The record keeps the spec the VMM now runs.
            super::launch::write_spec(&sandbox.dir, spec).map_err(|e| e.to_string())?;
            (
                vmm.assign(state, spec).await.map_err(|e| e.to_string())?,
                "vmm_assigned",
            )
        }
        None => (
            super::launch::spawn_vmm(state, &sandbox.dir, spec, false)
                .map_err(|e| e.to_string())?,
            "vmm_spawned",
        ),
    };
    let pid = child.id().unwrap_or(0);
    // Not reaped before the watcher below waits for it: the pidfd names this process.
    sandbox.hold_process(pid);
    sandbox.update(|r| {
        r.pid = Some(pid);
        r.timeline.mark(step);
    });
    let stdout = child.stdout.take().ok_or("the VMM has no stdout")?;

    // Whatever happens next, the watcher reports the VMM's end.
    let (exited_tx, mut exited_rx) = tokio::sync::oneshot::channel::<String>();
    {
        let sandbox = sandbox.clone();
        let cgroups = state.cgroups.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Some(cgroups) = cgroups {
                let id = sandbox.id.clone();
                let _ = tokio::task::spawn_blocking(move || cgroups.remove(&id)).await;
            }
            let code = match &status {
                Ok(s) => describe_vmm_exit(*s),
                Err(e) => e.to_string(),
            };
            let why = format!(
                "the VMM process (pid {pid}) ended ({code}): {}",
                log_tail(&sandbox.dir)
            );
            sandbox.fail(why.clone());
            sandbox.forget_agent().await;
            // A sandbox whose VMM has ended never runs again: its record stays (to say why)
            // until it is deleted, but its network and exposed ports go now.
            sandbox.close_ports();
            if sandbox.record().net.is_some() {
                let id = sandbox.id.clone();
                let _ = tokio::task::spawn_blocking(move || network::remove(&id)).await;
            }
            let _ = exited_tx.send(why);
        });
    }

    // A VMM's lines are bounded: a compromised VMM cannot grow the service's memory with
    // one endless line (an over-long line is dropped up to its end).
    let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_CONTROL_LINE));
    let ready = async {
        loop {
            tokio::select! {
                line = lines.next() => match line {
                    Some(Ok(line)) => {
                        if let Ok(WorkerEvent::Ready { ready_ms, started_unix_ms, timeline, memory, agent, .. }) =
                            serde_json::from_str(&line)
                        {
                            sandbox.update(|r| {
                                r.timeline.add_vmm(started_unix_ms, &timeline);
                                r.memory = memory;
                            });
                            return Ok((ready_ms, agent));
                        }
                        log::debug!("sandbox {}: VMM says {line}", sandbox.id);
                    }
                    Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                        log::warn!(
                            "sandbox {}: dropped a VMM line over {MAX_CONTROL_LINE} bytes",
                            sandbox.id
                        );
                    }
                    None | Some(Err(LinesCodecError::Io(_))) => {
                        // The process is ending: the watcher has the reason.
                        return Err((&mut exited_rx).await.unwrap_or_else(|_| "the VMM ended".into()));
                    }
                },
                why = &mut exited_rx => {
                    return Err(why.unwrap_or_else(|_| "the VMM ended".into()));
                }
            }
        }
    };
    let (ready_ms, agent) = tokio::time::timeout(READY_TIMEOUT, ready)
        .await
        .map_err(|_| format!("its agent did not answer within {READY_TIMEOUT:?}"))??;
    let passed = match agent {
        Some(info) => sandbox.adopt_agent(stdin, info).await,
        None => false,
    };
    state.metrics.record_agent_connection(passed);
    // Keep reading (and dropping) the VMM's stdout so it never blocks on a full pipe.
    tokio::spawn(async move {
        while let Some(line) = lines.next().await {
            if let Err(LinesCodecError::Io(_)) = line {
                break;
            }
        }
    });
    sandbox.update(|r| {
        if r.state == SandboxState::Starting {
            r.state = SandboxState::Running;
        }
        r.ready_ms = Some(ready_ms);
    });
    if sandbox.state() != SandboxState::Running {
        return Err(sandbox
            .record()
            .failure
            .unwrap_or_else(|| "the sandbox stopped while starting".into()));
    }
    Ok(ready_ms)
}

/// Loads the sandboxes a previous run of the service left: those whose VMM still answers
/// are adopted, the others are reported as failed.
pub async fn recover(state: &Arc<AppState>) {
    let root = state.config.state_dir.join("sandboxes");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join(super::pool::POOLED_MARKER).exists() {
            // A warm-pool VMM of an earlier run that never got a sandbox: it ended with that
            // run's pipes.
            let id = entry.file_name().to_string_lossy().into_owned();
            super::pool::discard(state, &id);
            continue;
        }
        let record: SandboxRecord = match std::fs::read(dir.join("sandbox.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ignoring {}: {e}", dir.display());
                continue;
            }
        };
        let sandbox = Arc::new(Sandbox::new(dir, record.clone()));
        if record.state.is_live() {
            let process = record.pid.and_then(|pid| sandbox.hold_process(pid));
            let alive = process.as_ref().is_some_and(|p| p.is_alive());
            let answer = if alive {
                sandbox
                    .control(ControlRequest::Status, Duration::from_secs(5))
                    .await
                    .ok()
            } else {
                None
            };
            match answer {
                Some(reply) if reply.ok => {
                    let paused = reply.state.as_deref() == Some("paused");
                    sandbox.update(|r| {
                        r.state = if paused {
                            SandboxState::Paused
                        } else {
                            SandboxState::Running
                        }
                    });
                    log::info!("adopted sandbox {} (pid {:?})", record.id, record.pid);
                    if let Err(e) = sandbox.open_ports(&[]).await {
                        log::warn!("sandbox {}: {e}", record.id);
                    }
                    if let Some(process) = process {
                        watch_adopted(sandbox.clone(), process, state.cgroups.clone());
                    }
                }
                _ => sandbox.fail(format!(
                    "its VMM process (pid {}) was gone when the service started: {}",
                    record.pid.map(|p| p.to_string()).unwrap_or("-".into()),
                    log_tail(&sandbox.dir)
                )),
            }
        }
        state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id.clone(), sandbox);
    }
    // Cgroups of sandboxes that are not live any more (their VMM died with a service that
    // was not there to clean up).
    if let Some(cgroups) = &state.cgroups {
        let live: Vec<String> = state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.state().is_live())
            .map(|s| s.id.clone())
            .collect();
        cgroups.remove_stale(&live);
    }
}

/// An adopted VMM is not this process's child: poll whether it lives.
fn watch_adopted(
    sandbox: Arc<Sandbox>,
    process: Arc<Process>,
    cgroups: Option<super::cgroup::Cgroups>,
) {
    let pid = process.pid();
    tokio::spawn(async move {
        while process.is_alive() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(cgroups) = cgroups {
            let id = sandbox.id.clone();
            let _ = tokio::task::spawn_blocking(move || cgroups.remove(&id)).await;
        }
        // As for a VMM this service started: its ports and network go with it.
        sandbox.close_ports();
        if sandbox.record().net.is_some() {
            let id = sandbox.id.clone();
            let _ = tokio::task::spawn_blocking(move || network::remove(&id)).await;
        }
        sandbox.fail(format!(
            "the VMM process (pid {pid}) ended: {}",
            log_tail(&sandbox.dir)
        ));
        sandbox.forget_agent().await;
    });
}

/// Stops sandboxes whose time is up; runs for the life of the service.
pub async fn reap_expired(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = unix_ms();
        let expired: Vec<Arc<Sandbox>> = state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| {
                let r = s.record();
                matches!(r.state, SandboxState::Running | SandboxState::Paused)
                    && r.deadline_unix_ms <= now
            })
            .cloned()
            .collect();
        remove_ended(&state, now);
        for sandbox in expired {
            state.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            let state = state.clone();
            tokio::spawn(async move {
                sandbox
                    .stop("its timeout passed", state.cgroups.as_ref())
                    .await;
                sandbox.update(|r| r.failure = Some("stopped at its timeout".into()));
                drop(state);
            });
        }
    }
}

/// Deletes the stopped and failed sandboxes that ended more than the retention period ago:
/// their records, logs and disks (their snapshots stay).
pub(crate) fn remove_ended(state: &AppState, now: u64) {
    let retention = state.config.retention.as_millis() as u64;
    let ended: Vec<Arc<Sandbox>> = {
        let mut sandboxes = state.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = sandboxes
            .values()
            .filter(|s| {
                let r = s.record();
                !r.state.is_live()
                    && r.ended_unix_ms
                        .is_some_and(|ended| now.saturating_sub(ended) >= retention)
            })
            .map(|s| s.id.clone())
            .collect();
        ids.iter().filter_map(|id| sandboxes.remove(id)).collect()
    };
    for sandbox in ended {
        log::info!(
            "sandbox {}: deleted {:?} after it ended (--retention-s)",
            sandbox.id,
            state.config.retention
        );
        sandbox.remove_from_disk();
    }
}

/// How a VMM process ended, in words: a seccomp stop is named as such.
fn describe_vmm_exit(status: std::process::ExitStatus) -> String {
    if status.code() == Some(ember_seccomp::EXIT_SECCOMP) {
        format!("{status}: stopped by its seccomp filter after a forbidden system call")
    } else {
        status.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_after_the_delete_does_not_bring_the_folder_back() {
        let dir = std::env::temp_dir().join(format!("ember-sb-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sandbox = Sandbox::for_test(
            dir.clone(),
            "sb-t",
            WorkerOrigin::Boot,
            SandboxState::Running,
        );
        sandbox.update(|_| {});
        assert!(dir.join("sandbox.json").exists());
        sandbox.remove_from_disk();
        assert!(!dir.exists());
        // Its VMM's end, noticed after the delete, while the folder is still there (the
        // removal racing with the write): no record is written into it.
        std::fs::create_dir_all(&dir).unwrap();
        sandbox.fail("the VMM process ended".into());
        assert!(
            !dir.join("sandbox.json").exists(),
            "a deleted sandbox's record was written again"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_seccomp_stop_is_named() {
        use std::os::unix::process::ExitStatusExt;
        let seccomp = std::process::ExitStatus::from_raw(ember_seccomp::EXIT_SECCOMP << 8);
        assert!(super::describe_vmm_exit(seccomp).contains("seccomp filter"));
        let plain = std::process::ExitStatus::from_raw(1 << 8);
        assert_eq!(super::describe_vmm_exit(plain), "exit status: 1");
    }
}
