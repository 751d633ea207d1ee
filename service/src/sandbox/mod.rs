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
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use super::error::ApiError;
use super::exec::CommandRecord;
use super::network::{self, NetworkMode, SandboxNet};
use super::ports::{self, ExposedPort};
use super::process::Process;
use super::AppState;
use ember_client::responses::{NetworkModeName, SandboxInfo, SandboxNetwork};
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

pub use ember_client::responses::{RemoteFetch, SandboxState};

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
    /// A sandbox restored from a snapshot only the remote tier had: what was downloaded
    /// before its agent answered.
    #[serde(default)]
    pub remote_fetch: Option<RemoteFetch>,
    /// Its runtime's image: how its commands run (none: a record from before runtimes,
    /// `base`).
    #[serde(default)]
    pub runtime: Option<ember_client::images::RuntimeImage>,
    /// What its timeout and idleness do, and whether it is suspended now.
    #[serde(default)]
    pub lifecycle: crate::lifecycle::Lifecycle,
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
    /// Its terminal sessions (see [`crate::pty`]).
    pub ptys: Mutex<HashMap<String, Arc<crate::pty::PtySession>>>,
    pub next_pty: AtomicU64,
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
    /// Its name server (egress networks).
    resolver: Mutex<Option<Arc<network::resolver::Resolver>>>,
    /// Its VMM process (by pidfd) while the service knows it.
    process: Mutex<Option<Arc<Process>>>,
    /// Turns for blocking calls to its agent (see [`Sandbox::agent_turn`]).
    agent_calls: Arc<tokio::sync::Semaphore>,
    /// Use of it, for idleness and resumes on use (see [`crate::lifecycle`]).
    pub activity: crate::lifecycle::Activity,
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
            ptys: Mutex::new(HashMap::new()),
            next_pty: AtomicU64::new(1),
            first_exec_done: std::sync::atomic::AtomicBool::new(false),
            resynced: std::sync::atomic::AtomicBool::new(false),
            removed: Mutex::new(false),
            forwards: Mutex::new(Vec::new()),
            resolver: Mutex::new(None),
            process: Mutex::new(None),
            agent_calls: Arc::new(tokio::sync::Semaphore::new(MAX_AGENT_CALLS)),
            activity: Default::default(),
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
            staging_dir: None,
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
            remote_fetch: None,
            runtime: None,
            lifecycle: Default::default(),
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
    /// Stops listening on its exposed ports (connections already made end with the VMM) and
    /// stops its name server.
    pub fn close_ports(&self) {
        self.resolver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for task in self
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Starts its name server if it has an egress network (`reset`: and writes its rules
    /// again, for a sandbox adopted after a restart).
    pub async fn start_resolver(
        &self,
        state: &AppState,
        reset: bool,
    ) -> Result<(), network::resolver::ResolverError> {
        let Some(policy) = self.record().net.and_then(|net| net.mode.policy()) else {
            return Ok(());
        };
        let resolver = network::resolver::Resolver::start(
            &self.id,
            policy,
            state.config.dns_upstreams.clone(),
            reset,
            state.metrics.dns_questions.clone(),
        )
        .await?;
        *self.resolver.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(resolver));
        Ok(())
    }

    /// Its running name server, if any.
    pub fn resolver(&self) -> Option<Arc<network::resolver::Resolver>> {
        self.resolver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Listens on its exposed ports: `wanted` guest ports on any free host ports, and those
    /// of its record (after a service restart) on the same host ports where still free.
    pub async fn open_ports(&self, wanted: &[u16]) -> Result<(), ports::PortError> {
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
            let (port, task) =
                made.map_err(|source| ports::PortError::Listen { guest_port, source })?;
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
    pub fn info(&self) -> SandboxInfo {
        let r = self.record();
        let (snapshot, restore_mode) = match &r.spec.origin {
            WorkerOrigin::Restore { snapshot, mode, .. } => (Some(snapshot.clone()), Some(*mode)),
            WorkerOrigin::Boot => (None, None),
        };
        SandboxInfo {
            state: r.state,
            failure: r.failure,
            created_unix_ms: r.created_unix_ms,
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.mem_mib,
            snapshot,
            restore_mode,
            timeout_at_unix_ms: r.deadline_unix_ms,
            ready_ms: r.ready_ms,
            memory: r.memory,
            timeline: r.timeline.steps,
            pid: r.pid,
            env: r.env,
            disk_limits: r.spec.disk_rate_limit,
            net_limits: r.spec.net_rate_limits,
            network: r.net.as_ref().map_or(
                SandboxNetwork {
                    mode: NetworkModeName::None,
                    allow: None,
                    deny: Vec::new(),
                    guest_address: None,
                    link: None,
                },
                SandboxNet::info,
            ),
            ports: r.ports,
            remote_fetch: r.remote_fetch,
            runtime: r
                .runtime
                .map_or_else(|| ember_client::images::BASE_RUNTIME.into(), |i| i.runtime),
            on_timeout: r.lifecycle.on_timeout,
            auto_resume: r.lifecycle.auto_resume,
            idle_timeout_s: r.lifecycle.idle_timeout_ms.map(|ms| ms / 1000),
            suspended: r.lifecycle.suspended,
            id: r.id,
        }
    }

    /// Whether a command it started is still running, or a client is at one of its
    /// terminals (the sandbox is in use).
    pub fn has_running_commands(&self) -> bool {
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|c| !c.finished());
        commands
            || self
                .ptys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|t| t.in_use())
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
    ) -> Result<ControlReply, ControlError> {
        // The wait for an earlier request (a long snapshot, say) counts toward the timeout.
        let path = self.record().spec.control_socket;
        let turn_and_answer = async {
            let _turn = self.control.lock().await;
            control_request(&path, &request).await
        };
        tokio::time::timeout(timeout, turn_and_answer)
            .await
            .map_err(|_| ControlError::Timeout {
                request: request.clone(),
                timeout,
            })?
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

/// Why a control request to a VMM got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the VMM's control socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {request:?} for the VMM: {source}")]
    Encode {
        request: ControlRequest,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot send to the VMM: {0}")]
    Send(#[source] std::io::Error),
    #[error("cannot read the VMM's reply: {0}")]
    Receive(#[source] std::io::Error),
    #[error("the VMM closed its control socket without answering")]
    Closed,
    #[error("malformed reply from the VMM: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("the VMM did not answer {request:?} within {timeout:?}")]
    Timeout {
        request: ControlRequest,
        timeout: Duration,
    },
}

async fn control_request(
    path: &Path,
    request: &ControlRequest,
) -> Result<ControlReply, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).map_err(|source| ControlError::Encode {
        request: request.clone(),
        source,
    })?;
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(ControlError::Send)?;
    let mut reply = String::new();
    let mut reader = BufReader::new(read).take(MAX_CONTROL_LINE as u64);
    reader
        .read_line(&mut reply)
        .await
        .map_err(ControlError::Receive)?;
    if reply.is_empty() {
        return Err(ControlError::Closed);
    }
    serde_json::from_str(&reply).map_err(ControlError::Malformed)
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

mod recover;
mod start;

#[cfg(test)]
pub(crate) use recover::remove_ended;
pub use recover::{reap_expired, recover};
pub use start::{base_spec, check_room, create, NewSandbox, VMM_DIR};

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
