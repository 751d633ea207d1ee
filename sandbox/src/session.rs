//! A foreground VM and one command through its agent (`ember run … -- CMD`, `ember restore`):
//! boot or restore, wait for the agent, run CMD with streamed output, then shut down or save.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::defaults::{default_mem_cache, default_store_dir, open_store, overlay_path};
use ember_agent::client::{AgentClient, AgentInfo, OutputStream};
use ember_agent::protocol::{ExecRequest, ExitStatus, AGENT_VSOCK_PORT};
use ember_vmm::{
    ExitReason, NetRateLimits, RateLimit, RestoreMode, SnapshotKind, VmConfig, Vmm, VmmError,
    VmmOptions, VsockConfig,
};

/// The guest's CID for a single foreground VM.
pub(crate) const GUEST_CID: u32 = 3;
/// How long the guest may take to boot to its agent (the lab is ~30× slower than native).
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);
/// How much of the guest console is kept to explain a failure.
const CONSOLE_TAIL: usize = 16 * 1024;

/// What `ember run -- CMD` does around the command.
pub struct CommandPlan {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
    pub copy_in: Vec<(PathBuf, String)>,
    pub copy_out: Vec<(String, PathBuf)>,
    pub forward_stdin: bool,
    /// Where the VM's vsock socket goes (a private temporary folder when absent).
    pub socket: Option<PathBuf>,
    /// After the command, save the VM as this snapshot (and stop it) instead of shutting the
    /// guest down.
    pub snapshot_on_exit: Option<String>,
    /// Store only the pages written since the restored snapshot (`snapshot_on_exit`).
    pub diff: bool,
    /// The snapshot store (for `snapshot_on_exit` after a boot).
    pub store_dir: PathBuf,
    /// Where snapshots' memory is materialised for `file` restores.
    pub mem_cache: PathBuf,
    /// Limits on the root disk's traffic.
    pub disk_rate_limit: RateLimit,
    /// Limits on the network device's traffic.
    pub net_rate_limits: NetRateLimits,
}

/// Where the VM comes from.
pub enum Origin {
    Boot,
    Restore {
        store: Arc<ember_snapshot_store::Store>,
        id: String,
        mode: RestoreMode,
        /// The store holds the snapshot only in part: the rest comes from here.
        partial: Option<Box<ember_vmm::PartialSnapshot>>,
    },
}

/// The options `ember run` and `ember restore` share for the command they run.
#[derive(clap::Args, Debug)]
pub struct CommandArgs {
    /// Copy a host file into the guest before the command: HOST:GUEST (repeatable).
    #[arg(long, value_name = "HOST:GUEST", value_parser = parse_copy)]
    pub copy_in: Vec<(String, String)>,
    /// Copy a guest file to the host after the command: GUEST:HOST (repeatable).
    #[arg(long, value_name = "GUEST:HOST", value_parser = parse_copy)]
    pub copy_out: Vec<(String, String)>,
    /// Set a variable in the command's environment: KEY=VALUE (repeatable). The command sees
    /// only a small default environment plus these, never ember's own.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command's working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Kill the command (and everything it started) after this many seconds; ember exits 124.
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Forward ember's stdin to the command (otherwise its stdin is empty).
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// After the command, save the VM as snapshot ID in the store and stop it (instead of
    /// shutting the guest down); `ember restore ID` continues from there.
    #[arg(long, value_name = "ID")]
    pub snapshot_on_exit: Option<String>,
    /// With --snapshot-on-exit after a restore: a diff snapshot, which hashes and stores only
    /// the pages written since the restored snapshot (the rest is shared with it).
    #[arg(long, requires = "snapshot_on_exit")]
    pub diff: bool,
    /// The snapshot store (default: $EMBER_STORE, else ~/.local/share/ember/store).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Where snapshots' memory is materialised as files that restores map (default:
    /// `mem-cache` beside the store). A snapshot saved here is materialised at once.
    #[arg(long)]
    pub mem_cache: Option<PathBuf>,
    /// Put the VM's vsock socket here (default: a private temporary folder), so that other
    /// agent clients can reach the sandbox while the command runs.
    #[arg(long)]
    pub vsock_socket: Option<PathBuf>,
    /// Limits on the guest's disk and network traffic.
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl CommandArgs {
    /// The plan for running `argv` with these options.
    pub fn into_plan(self, argv: Vec<String>) -> CommandPlan {
        let disk_rate_limit = self.limits.disk_rate_limit();
        let net_rate_limits = self.limits.net_rate_limits();
        CommandPlan {
            argv,
            env: self.env,
            cwd: self.cwd,
            timeout: self.timeout_s.map(Duration::from_secs),
            copy_in: self
                .copy_in
                .into_iter()
                .map(|(h, g)| (PathBuf::from(h), g))
                .collect(),
            copy_out: self
                .copy_out
                .into_iter()
                .map(|(g, h)| (g, PathBuf::from(h)))
                .collect(),
            forward_stdin: self.interactive,
            socket: self.vsock_socket,
            snapshot_on_exit: self.snapshot_on_exit,
            diff: self.diff,
            mem_cache: self.mem_cache.unwrap_or_else(|| {
                default_mem_cache(&self.store.clone().unwrap_or_else(default_store_dir))
            }),
            store_dir: self.store.unwrap_or_else(default_store_dir),
            disk_rate_limit,
            net_rate_limits,
        }
    }
}

/// Token-bucket limits on a guest's disk and network (each bucket holds one second's worth).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LimitArgs {
    /// Limit the guest's root disk to this many bytes per second.
    #[arg(long, value_name = "BYTES")]
    pub disk_bytes_per_sec: Option<u64>,
    /// Limit the guest's root disk to this many requests per second.
    #[arg(long, value_name = "N")]
    pub disk_ops_per_sec: Option<u64>,
    /// Limit what the guest receives over its network device to this many bytes per second
    /// (needs a network device: --tap, or a sandbox in egress mode).
    #[arg(long, value_name = "BYTES")]
    pub net_rx_bytes_per_sec: Option<u64>,
    /// Limit what the guest receives to this many frames per second.
    #[arg(long, value_name = "N")]
    pub net_rx_ops_per_sec: Option<u64>,
    /// Limit what the guest sends over its network device to this many bytes per second.
    #[arg(long, value_name = "BYTES")]
    pub net_tx_bytes_per_sec: Option<u64>,
    /// Limit what the guest sends to this many frames per second.
    #[arg(long, value_name = "N")]
    pub net_tx_ops_per_sec: Option<u64>,
}

impl LimitArgs {
    /// Refuses network limits for a guest without a network device (`has_nic`).
    pub fn check_net(&self, has_nic: bool) -> Result<(), ArgError> {
        if !has_nic && self.net_rate_limits().is_limited() {
            return Err(ArgError::NetLimitsWithoutNic);
        }
        Ok(())
    }

    /// The disk limits these options ask for.
    pub fn disk_rate_limit(&self) -> RateLimit {
        RateLimit {
            bytes_per_sec: self.disk_bytes_per_sec,
            ops_per_sec: self.disk_ops_per_sec,
        }
    }

    /// The network limits these options ask for.
    pub fn net_rate_limits(&self) -> NetRateLimits {
        NetRateLimits {
            rx: RateLimit {
                bytes_per_sec: self.net_rx_bytes_per_sec,
                ops_per_sec: self.net_rx_ops_per_sec,
            },
            tx: RateLimit {
                bytes_per_sec: self.net_tx_bytes_per_sec,
                ops_per_sec: self.net_tx_ops_per_sec,
            },
        }
    }
}

/// A command-line value that does not parse, or options that do not go together.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    #[error("{0:?} is not of the form SOURCE:DESTINATION")]
    Copy(String),
    #[error("{0:?} is not of the form KEY=VALUE")]
    Env(String),
    #[error("--net-* limits apply to a network device: give --tap too")]
    NetLimitsWithoutNic,
}

/// Parses `HOST:GUEST` (or `GUEST:HOST` for copy-out, with `guest_first`).
pub fn parse_copy(spec: &str) -> Result<(String, String), ArgError> {
    match spec.split_once(':') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(ArgError::Copy(spec.to_string())),
    }
}

pub fn parse_env(spec: &str) -> Result<(String, String), ArgError> {
    match spec.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(ArgError::Env(spec.to_string())),
    }
}

/// Keeps the last bytes the guest wrote to its console.
#[derive(Clone, Default)]
pub(crate) struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend(buf);
        let excess = tail.len().saturating_sub(CONSOLE_TAIL);
        tail.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleTail {
    pub(crate) fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&tail.iter().copied().collect::<Vec<u8>>()).into_owned()
    }
}

pub(crate) type VmResult = Result<ExitReason, VmmError>;

/// A private folder for the VM's vsock socket, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> std::io::Result<SocketDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("ember-run-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(SocketDir(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots `config`, runs the plan and returns ember's exit code.
pub fn run_command(
    mut config: VmConfig,
    mut origin: Origin,
    plan: CommandPlan,
    start: Instant,
) -> i32 {
    let partial = match &mut origin {
        Origin::Restore { partial, .. } => partial.take().map(|p| *p),
        Origin::Boot => None,
    };
    let dir = match SocketDir::new() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("ember: cannot create a folder for the VM's vsock socket: {e}");
            return 1;
        }
    };
    let socket = plan
        .socket
        .clone()
        .unwrap_or_else(|| dir.0.join("vsock.sock"));
    config.vsock = Some(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: socket.clone(),
    });
    let console = ConsoleTail::default();
    let options = VmmOptions {
        serial_out: Box::new(console.clone()),
        start,
        disk_rate_limit: plan.disk_rate_limit,
        net_rate_limits: plan.net_rate_limits,
        mem_cache: Some(ember_snapshot_store::MemCache::new(plan.mem_cache.clone())),
        tap_fd: None,
        partial,
    };
    block_stall_signal();
    let built = match &origin {
        Origin::Boot => Vmm::build(&config, options),
        Origin::Restore {
            store, id, mode, ..
        } => {
            // Used only if the snapshot's rootfs has an overlay.
            config.rootfs_overlay = Some(overlay_path());
            Vmm::restore(&config, store.clone(), id, options, *mode)
        }
    };
    let vmm = match built.and_then(|vmm| vmm.resume().map(|()| vmm)) {
        Ok(vmm) => Arc::new(vmm),
        Err(e) => {
            eprintln!("ember: {e}");
            return 1;
        }
    };
    log_stall_reports_on_sigusr1(&vmm);
    let (done_tx, vm_done) = channel::<VmResult>();
    {
        let vmm = vmm.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(vmm.wait());
        });
    }

    let client = match wait_for_agent(&socket, &vm_done, &vmm)
        .map_err(|e| e.to_string())
        .and_then(|(stream, info)| AgentClient::adopt(stream, info).map_err(|e| e.to_string()))
    {
        Ok(client) => client,
        Err(why) => {
            eprintln!(
                "ember: {why}\n--- guest console (tail) ---\n{}",
                console.text()
            );
            return 1;
        }
    };
    let ready = start.elapsed();
    log::info!(
        "agent ready after {:.1} ms{}",
        ready.as_secs_f64() * 1e3,
        vmm.restore_mode()
            .map(|mode| format!(" (restored; memory: {mode})"))
            .unwrap_or_default()
    );
    if matches!(origin, Origin::Restore { .. }) {
        // The restored guest's clock and RNG are the snapshot's (the same in every clone):
        // the host's go ahead of the command, on the same connection, without a round trip.
        if let Err(e) = client.resync_now_pipelined() {
            log::warn!("cannot resync the restored guest's clock and entropy: {e}");
        }
    }

    let code = match run_plan(&client, &plan) {
        Ok(code) => code,
        Err(why) => {
            eprintln!("ember: {why}");
            1
        }
    };
    if let Origin::Restore {
        store, id, mode, ..
    } = &origin
    {
        record_working_set(&vmm, store, store, id);
        if *mode == RestoreMode::Auto && vmm.restore_mode() != Some(RestoreMode::File) {
            // Saved before the cache (or evicted): the next restore maps it.
            if let Ok(manifest) = store.load_manifest(id) {
                materialise(store, &manifest, &plan.mem_cache);
            }
        }
    }
    if let (Some(id), Origin::Boot | Origin::Restore { .. }) = (&plan.snapshot_on_exit, &origin) {
        // Without the agent connection the snapshot holds only listeners: its restores
        // connect at once, with no transport reset.
        drop(client);
        vmm.wait_for_vsock_idle(Duration::from_millis(250));
        let store = match &origin {
            Origin::Restore { store, .. } => Ok(store.clone()),
            Origin::Boot => open_store(&plan.store_dir).map_err(|e| e.to_string()),
        };
        let result = store.and_then(|store| {
            let t = Instant::now();
            let kind = if plan.diff {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            };
            vmm.snapshot_as(&store, id, kind)
                .map(|m| (m, t.elapsed(), store))
                .map_err(|e| e.to_string())
        });
        vmm.stop();
        let _ = vm_done.recv_timeout(Duration::from_secs(60));
        return match result {
            Ok((manifest, took, store)) => {
                eprintln!(
                    "ember: saved snapshot {} ({} MiB of memory) in {:.1} ms",
                    manifest.id,
                    manifest.memory.size_bytes >> 20,
                    took.as_secs_f64() * 1e3
                );
                materialise(&store, &manifest, &plan.mem_cache);
                code
            }
            Err(e) => {
                eprintln!("ember: {e}");
                if code == 0 {
                    1
                } else {
                    code
                }
            }
        };
    }
    // The guest resets right after the agent answers, so the answer may be lost with the
    // connection: whether the shutdown worked is told by the VM ending.
    let shutdown = client.shutdown();
    let failed = |code: i32| if code == 0 { 1 } else { code };
    let result = match vm_done.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(reason)) => {
            log::info!(
                "guest ended ({reason:?}) after {:.1} ms (agent ready at {:.1} ms{})",
                start.elapsed().as_secs_f64() * 1e3,
                ready.as_secs_f64() * 1e3,
                vmm.faults_served()
                    .map(|f| format!(
                        ", {f} pages served on demand, {} prefetched",
                        vmm.pages_prefetched().unwrap_or(0)
                    ))
                    .unwrap_or_default()
            );
            code
        }
        Ok(Err(e)) => {
            eprintln!("ember: {e}");
            failed(code)
        }
        Err(_) => {
            let why = shutdown
                .err()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            eprintln!("ember: the guest did not stop within 60 s of its shutdown{why}");
            failed(code)
        }
    };
    result
}

/// Materialises a snapshot's memory in the cache at `dir` for `file` restores (a failure
/// only means restores read the store).
fn materialise(
    store: &ember_snapshot_store::Store,
    manifest: &ember_snapshot_store::Manifest,
    dir: &Path,
) {
    match ember_snapshot_store::MemCache::new(dir).materialise(store, manifest) {
        Ok(done) if done.already => {}
        Ok(done) => eprintln!(
            "ember: materialised its memory for restores in {:.1} ms ({})",
            done.took.as_secs_f64() * 1e3,
            done.path.display()
        ),
        Err(e) => eprintln!(
            "ember: restores of {} will read the store: {e}",
            manifest.id
        ),
    }
}

/// How many restores a snapshot's working set is the union of, at most.
pub(crate) const WORKING_SET_RESTORES: u32 = 3;

/// After a `prefetch` or `file` restore has run its command: the first restore of a snapshot
/// saves the pages it needed, so later restores load (or map) them up front; the next
/// restores that needed more than 2 % pages beyond it add them (the guest does not touch
/// exactly the same pages every time), up to [`WORKING_SET_RESTORES`] restores. Then the set
/// stays as it is: a union over every restore would only grow (by 5-15 % a restore in the
/// lab), toward every page any restore ever touched. The known set is read from `store`; the
/// new one is saved into `into` (the same store, or a VMM's staging store over it).
pub(crate) fn record_working_set(
    vmm: &Vmm,
    store: &ember_snapshot_store::Store,
    into: &ember_snapshot_store::Store,
    id: &str,
) {
    if !matches!(
        vmm.restore_mode(),
        Some(RestoreMode::Prefetch | RestoreMode::File)
    ) {
        return;
    }
    let known = match store.load_working_set(id) {
        Ok(known) => known,
        // A damaged one is replaced.
        Err(e) => {
            log::warn!("{e}; recording a new one");
            None
        }
    };
    let Some(faulted) = vmm.take_working_set() else {
        return;
    };
    let (pages, restores) = match known {
        None => (faulted, 1),
        Some(known) if known.restores >= WORKING_SET_RESTORES => return,
        Some(mut known) => {
            let seen: std::collections::HashSet<u64> = known.pages.iter().copied().collect();
            let extra: Vec<u64> = faulted.into_iter().filter(|p| !seen.contains(p)).collect();
            if extra.len() * 50 <= known.pages.len() {
                return;
            }
            known.pages.extend(extra);
            (known.pages, known.restores + 1)
        }
    };
    match into.save_working_set(id, &pages, restores) {
        Ok(()) => log::info!(
            "recorded a working set of {} pages for snapshot {id} (from {restores} restores)",
            pages.len()
        ),
        Err(e) => log::warn!("cannot record the working set of snapshot {id}: {e}"),
    }
}

/// Blocks SIGUSR1 in this thread and every thread it starts from now on, so that only the
/// thread of [`log_stall_reports_on_sigusr1`] receives it. Call before the VMM starts its
/// threads.
pub(crate) fn block_stall_signal() {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset, which initialises it;
    // pthread_sigmask only changes this thread's mask. The handler does nothing (the signal
    // is taken by sigwait); it is there because a jailed VMM is PID 1 of its namespace, and
    // the kernel drops signals from outside that a PID 1 has left at their default action.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            ignore as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// `kill -USR1` of a VMM process logs what its VM is doing (`Vmm::stall_report`), and writes it
/// to `$TMPDIR/ember-stall-PID.txt`: how a hung test or sandbox is looked into without
/// stopping it.
pub(crate) fn log_stall_reports_on_sigusr1(vmm: &Arc<Vmm>) {
    let vmm = Arc::downgrade(vmm);
    let spawned = std::thread::Builder::new()
        .name("ember-stall".into())
        .spawn(move || {
            if let Err(e) = ember_seccomp::install(ember_seccomp::ThreadKind::Control) {
                log::warn!("stall reports: {e}; no reports");
                return;
            }
            loop {
                let mut signal = 0;
                // SAFETY: as in block_stall_signal; sigwait writes the signal number to
                // `signal`.
                let waited = unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGUSR1);
                    libc::sigwait(&set, &mut signal)
                };
                if waited != 0 {
                    log::warn!("stall reports: sigwait failed ({waited}); no more reports");
                    return;
                }
                let Some(vmm) = vmm.upgrade() else { return };
                let report = vmm.stall_report();
                log::warn!("SIGUSR1: what the VM is doing:\n{report}");
                // Also in a file: a captured stderr (a test's) may never be shown.
                let file =
                    std::env::temp_dir().join(format!("ember-stall-{}.txt", std::process::id()));
                if let Err(e) = std::fs::write(&file, &report) {
                    log::warn!("cannot write {}: {e}", file.display());
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the stall report thread: {e}");
    }
}

/// A minute without an answer is far beyond a healthy boot or restore, even in the lab: the
/// VMM then logs what the VM is doing (see `Vmm::stall_report`).
const AGENT_STALL_REPORT_AFTER: Duration = Duration::from_secs(60);

/// Why [`wait_for_agent`] found no agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentWaitError {
    #[error("the guest ended ({0:?}) before its agent answered")]
    GuestEnded(ExitReason),
    #[error("the VM failed before its agent answered: {0}")]
    VmFailed(#[source] VmmError),
    #[error("the VM thread ended unexpectedly")]
    VmThreadGone,
    #[error(
        "the agent did not answer within {AGENT_TIMEOUT:?} (last error: {last_error})\n\
         --- what the VM is doing ---\n{stall_report}"
    )]
    Silent {
        last_error: String,
        stall_report: String,
    },
}

/// Connects to the agent once it listens and says hello, giving up if the VM ends or time
/// runs out: the connection (with nothing after the hello on it) and what the agent said. A
/// guest that keeps silent gets `vmm`'s stall report in the log, and again in the error.
pub(crate) fn wait_for_agent(
    socket: &Path,
    vm_done: &Receiver<VmResult>,
    vmm: &Vmm,
) -> Result<(UnixStream, AgentInfo), AgentWaitError> {
    let started = Instant::now();
    let deadline = started + AGENT_TIMEOUT;
    let mut last_error = String::from("no attempt yet");
    let mut reported = false;
    loop {
        match vm_done.try_recv() {
            Ok(Ok(reason)) => return Err(AgentWaitError::GuestEnded(reason)),
            Ok(Err(source)) => return Err(AgentWaitError::VmFailed(source)),
            Err(TryRecvError::Disconnected) => return Err(AgentWaitError::VmThreadGone),
            Err(TryRecvError::Empty) => {}
        }
        if socket.exists() {
            let attempt = Instant::now();
            let patience = deadline.saturating_duration_since(attempt);
            match AgentClient::handshake_uds(socket, AGENT_VSOCK_PORT, patience) {
                Ok(client) => {
                    log::debug!(
                        "agent connected and answered in {:.1} ms",
                        attempt.elapsed().as_secs_f64() * 1e3
                    );
                    return Ok(client);
                }
                Err(e) => {
                    log::debug!("agent not ready yet: {e}");
                    last_error = e.to_string()
                }
            }
        }
        if Instant::now() > deadline {
            return Err(AgentWaitError::Silent {
                last_error,
                stall_report: vmm.stall_report(),
            });
        }
        if !reported && started.elapsed() > AGENT_STALL_REPORT_AFTER {
            reported = true;
            log::warn!(
                "the agent has not answered for {AGENT_STALL_REPORT_AFTER:?} (last error: \
                 {last_error}); the VM:\n{}",
                vmm.stall_report()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Why the command of `ember run`/`restore` or its copies failed.
#[derive(Debug, thiserror::Error)]
enum PlanError {
    #[error("--copy-in: cannot open {}: {source}", host.display())]
    OpenCopyIn {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--copy-out: cannot create {}: {source}", host.display())]
    CreateCopyOut {
        host: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {from} → {to}: {source}")]
    Copy {
        what: &'static str,
        from: String,
        to: String,
        #[source]
        source: Box<ember_agent::client::ClientError>,
    },
    #[error("running {argv:?}: {source}")]
    Run {
        argv: Vec<String>,
        #[source]
        source: Box<ember_agent::client::ClientError>,
    },
}

fn run_plan(client: &AgentClient, plan: &CommandPlan) -> Result<i32, PlanError> {
    for (host, guest) in &plan.copy_in {
        let file = std::fs::File::open(host).map_err(|source| PlanError::OpenCopyIn {
            host: host.clone(),
            source,
        })?;
        let mode = file
            .metadata()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o644);
        client
            .write_file(guest, mode, file)
            .map_err(|source| PlanError::Copy {
                what: "--copy-in",
                from: host.display().to_string(),
                to: guest.clone(),
                source: Box::new(source),
            })?;
    }

    let mut env: Vec<(String, String)> = ember_agent::protocol::DEFAULT_COMMAND_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &plan.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    let request = ExecRequest {
        argv: plan.argv.clone(),
        env,
        cwd: plan.cwd.clone(),
        timeout_ms: plan.timeout.map(|t| t.as_millis() as u64),
        stdin_stream: plan.forward_stdin,
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let mut on_output = |stream: OutputStream, data: &[u8]| {
        let _ = match stream {
            OutputStream::Stdout => stdout.write_all(data).and_then(|_| stdout.flush()),
            OutputStream::Stderr => stderr.write_all(data),
        };
    };
    let status = if plan.forward_stdin {
        client.exec_with_stdin(request, std::io::stdin(), &mut on_output)
    } else {
        client.exec(request, &mut on_output)
    }
    .map_err(|source| PlanError::Run {
        argv: plan.argv.clone(),
        source: Box::new(source),
    })?;

    for (guest, host) in &plan.copy_out {
        let file = std::fs::File::create(host).map_err(|source| PlanError::CreateCopyOut {
            host: host.clone(),
            source,
        })?;
        client
            .read_file(guest, file)
            .map_err(|source| PlanError::Copy {
                what: "--copy-out",
                from: guest.clone(),
                to: host.display().to_string(),
                source: Box::new(source),
            })?;
    }
    Ok(match status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal(signal) => {
            eprintln!("ember: {:?} was killed by signal {signal}", plan.argv[0]);
            128 + signal
        }
        ExitStatus::TimedOut => {
            eprintln!("ember: {:?} timed out and was killed", plan.argv[0]);
            124
        }
    })
}
