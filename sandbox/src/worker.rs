//! `ember-vmm --spec FILE`: one sandbox's VMM process, started by `ember serve`.
//!
//! It boots or restores the VM, reports on stdout when the guest's agent answers, and serves
//! the control socket (pause, resume, snapshot, stop) until the VM ends. The service talks
//! to the agent itself, through the VM's vsock socket. Running each sandbox in its own
//! process means a VMM that crashes (or a guest that compromises it) takes down only that
//! sandbox.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_vmm::{SnapshotKind, VmConfig, Vmm, VmmOptions, VsockConfig};

use crate::control::{
    ControlReply, ControlRequest, FaultReport, PoolAssignment, SnapshotDone, WorkerEvent,
    WorkerOrigin, WorkerSpec, MAX_CONTROL_LINE,
};
use crate::defaults::open_store_unindexed;
use crate::session::{
    block_stall_signal, log_stall_reports_on_sigusr1, record_working_set, wait_for_agent,
    ConsoleTail, GUEST_CID,
};

#[derive(clap::Args, Debug)]
pub struct VmmArgs {
    /// The sandbox's description (JSON, written by `ember serve`).
    #[arg(long)]
    pub spec: PathBuf,
    /// Instead of running the VM: enter the spec's jail, report what can be seen and done
    /// from inside it (JSON on stdout), and exit. How the jail is tested.
    #[arg(long, hide = true)]
    pub jail_probe: bool,
    /// With --jail-probe: a host path to try to reach (repeatable).
    #[arg(long, hide = true)]
    pub probe_path: Vec<PathBuf>,
    /// With --jail-probe: a TCP address (host:port) to try to connect to.
    #[arg(long, hide = true)]
    pub probe_connect: Option<String>,
    /// A warm-pool VMM: get everything that does not depend on the sandbox ready (jail,
    /// store), then wait for the sandbox's [`PoolAssignment`] as one JSON line on stdin.
    #[arg(long, hide = true)]
    pub pooled: bool,
}

/// How long a snapshot waits for closed vsock connections to be torn down.
const VSOCK_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Exit codes the service reads.
pub const EXIT_STOPPED: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_GUEST_ENDED: i32 = 3;

struct Worker {
    vmm: Arc<Vmm>,
    store: Arc<ember_snapshot_store::Store>,
    spec: WorkerSpec,
    paused: Mutex<bool>,
    stopping: AtomicBool,
}

pub fn run(args: VmmArgs) -> i32 {
    let mut start = Instant::now();
    let mut started_unix_ms = ember_vmm::timeline::unix_ms_now();
    let mut spec: WorkerSpec = match std::fs::read(&args.spec)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!(
                "ember-vmm: cannot read the spec {}: {e}",
                args.spec.display()
            );
            return EXIT_FAILED;
        }
    };
    if let Some(jail) = &spec.jail {
        match ember_jail::enter(jail) {
            Ok(ember_jail::Entered::Jailed) => {}
            Ok(ember_jail::Entered::Supervisor(supervisor)) => {
                if let Err(e) = ember_seccomp::install(ember_seccomp::ThreadKind::JailSupervisor) {
                    eprintln!("ember-vmm: the jail's supervisor: {e}");
                    // SAFETY: kill(2) on our own child, the jailed process.
                    unsafe { libc::kill(supervisor.child(), libc::SIGKILL) };
                    return EXIT_FAILED;
                }
                supervisor.run();
            }
            Err(e) => {
                eprintln!("ember-vmm: cannot enter the jail: {e}");
                return EXIT_FAILED;
            }
        }
    }
    if args.jail_probe {
        return crate::jail_probe::run(&args.probe_path, args.probe_connect.as_deref());
    }
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    log::debug!("spec read and jail entered at {:.1} ms", ms(start));
    let store = match open_store_unindexed(&spec.store_dir) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("ember-vmm: {e}");
            return EXIT_FAILED;
        }
    };
    log::debug!("store opened at {:.1} ms", ms(start));
    let mut tap_fd = None;
    if args.pooled {
        match read_assignment() {
            Ok(Some((assignment, fd))) => {
                assignment.apply_to(&mut spec);
                tap_fd = fd;
            }
            // The service let the pool go (or went away) before using this VMM.
            Ok(None) => return EXIT_STOPPED,
            Err(e) => {
                eprintln!("ember-vmm: {e}");
                return EXIT_FAILED;
            }
        }
        // The sandbox's start is from here: the rest was done ahead of time.
        start = Instant::now();
        started_unix_ms = ember_vmm::timeline::unix_ms_now();
    }
    if let Err(e) = limit_resources(&spec) {
        eprintln!("ember-vmm: {e}");
        return EXIT_FAILED;
    }
    let config = VmConfig {
        kernel: spec.kernel.clone(),
        initrd: None,
        rootfs: Some(spec.rootfs.clone()),
        read_only_rootfs: false,
        rootfs_overlay: Some(spec.overlay.clone()),
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        cmdline_extra: Some(format!("init={}", ember_agent::AGENT_GUEST_PATH)),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: spec.vsock_socket.clone(),
        }),
        net: spec.net.as_ref().map(|net| ember_vmm::NetConfig {
            tap: net.tap.clone(),
            mac: net.mac,
            ipv4: Some(ember_vmm::GuestIpv4 {
                address: net.guest,
                prefix_len: net.prefix_len,
                gateway: Some(net.gateway),
                dns: net.dns,
            }),
        }),
    };
    let console = ConsoleTail::default();
    let options = VmmOptions {
        serial_out: Box::new(console.clone()),
        start,
        disk_rate_limit: spec.disk_rate_limit,
        net_rate_limits: spec.net_rate_limits,
        mem_cache: spec
            .mem_cache
            .clone()
            .map(ember_snapshot_store::MemCache::new),
        tap_fd,
        partial: None,
    };
    block_stall_signal();
    let built = match &spec.origin {
        WorkerOrigin::Boot => Vmm::build(&config, options),
        WorkerOrigin::Restore {
            snapshot,
            mode,
            partial,
        } => {
            let mut options = options;
            if let Some(partial) = partial {
                match partial_snapshot(partial) {
                    Ok(partial) => options.partial = Some(partial),
                    Err(e) => {
                        eprintln!("ember-vmm: {e}");
                        return EXIT_FAILED;
                    }
                }
            }
            Vmm::restore(&config, store.clone(), snapshot, options, *mode)
        }
    };
    let vmm = match built.and_then(|vmm| vmm.resume().map(|()| vmm)) {
        Ok(vmm) => Arc::new(vmm),
        Err(e) => {
            eprintln!("ember-vmm: {e}");
            return EXIT_FAILED;
        }
    };
    log_stall_reports_on_sigusr1(&vmm);
    // From here on this thread (and those it starts) only serves the sandbox: the agent
    // connection, the control socket, snapshots into the store.
    if let Err(e) = ember_seccomp::install(ember_seccomp::ThreadKind::Control) {
        eprintln!("ember-vmm: {e}");
        vmm.stop();
        return EXIT_FAILED;
    }
    let (done_tx, vm_done) = channel();
    {
        let vmm = vmm.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(vmm.wait());
        });
    }
    let restored = matches!(spec.origin, WorkerOrigin::Restore { .. });
    match wait_for_agent(&spec.vsock_socket, &vm_done, &vmm) {
        Ok((connection, info)) => {
            let ready_ms = start.elapsed().as_secs_f64() * 1e3;
            vmm.timeline().mark("agent_answered");
            // The connection that found the agent is the service's first one: passed on, it
            // spares the first request a new vsock connection and hello in the guest. (The
            // service resyncs a restored guest's clock and entropy on it, ahead of that
            // request.)
            let agent = pass_agent_connection(connection).then_some(info);
            if let Some(faults) = vmm.faults_served() {
                log::info!("agent ready after {ready_ms:.1} ms: {faults} pages faulted in so far");
            }
            let event = WorkerEvent::Ready {
                ready_ms,
                restored,
                faults: vmm.faults_served(),
                started_unix_ms,
                timeline: vmm.timeline_with_guest(),
                memory: vmm.restore_mode(),
                agent,
            };
            let line = serde_json::to_string(&event).unwrap_or_default();
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}").and_then(|_| stdout.flush());
            // stdout is a pipe to the service, which may restart; nothing else goes there.
            detach_stdout();
        }
        Err(why) => {
            eprintln!(
                "ember-vmm: {why}\n--- guest console (tail) ---\n{}",
                console.text()
            );
            return EXIT_FAILED;
        }
    }

    let listener = match bind(&spec.control_socket) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "ember-vmm: cannot listen on the control socket {}: {e}",
                spec.control_socket.display()
            );
            vmm.stop();
            return EXIT_FAILED;
        }
    };
    let worker = Arc::new(Worker {
        vmm: vmm.clone(),
        store,
        spec,
        paused: Mutex::new(false),
        stopping: AtomicBool::new(false),
    });
    {
        let worker = worker.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let worker = worker.clone();
                std::thread::spawn(move || serve_connection(&worker, stream));
            }
        });
    }

    let result = vm_done.recv();
    let _ = std::fs::remove_file(&worker.spec.control_socket);
    match result {
        _ if worker.stopping.load(Ordering::SeqCst) => EXIT_STOPPED,
        Ok(Ok(reason)) => {
            eprintln!(
                "ember-vmm: the guest ended by itself ({reason:?})\n--- guest console (tail) ---\n{}",
                console.text()
            );
            EXIT_GUEST_ENDED
        }
        Ok(Err(e)) => {
            eprintln!(
                "ember-vmm: the VM failed: {e}\n--- guest console (tail) ---\n{}",
                console.text()
            );
            EXIT_FAILED
        }
        Err(_) => {
            eprintln!("ember-vmm: the VM thread ended unexpectedly");
            EXIT_FAILED
        }
    }
}

/// How long the VMM waits for the service to pass the page channel.
const PAGE_CHANNEL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A partial snapshot's restore: its manifest and working set from the spec, its missing
/// pages from the page channel the service passes on stdin (one byte, the socket attached).
fn partial_snapshot(
    origin: &crate::control::PartialOrigin,
) -> Result<ember_vmm::PartialSnapshot, SetupError> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    // SAFETY: descriptor 0 is this process's stdin, a socket the service made, read nowhere
    // else at this point; it stays open after (ManuallyDrop), for the agent connection.
    let stdin = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(0) });
    stdin
        .set_read_timeout(Some(PAGE_CHANNEL_WAIT))
        .map_err(SetupError::PageChannelWait)?;
    let mut byte = [0u8; 1];
    let received = stdin.recv_with_fd(&mut byte[..]);
    let _ = stdin.set_read_timeout(None);
    let file = match received {
        Ok((1, Some(file))) => file,
        Ok(_) => return Err(SetupError::NoPageChannel),
        Err(e) => return Err(SetupError::PageChannelReceive(e)),
    };
    let channel = crate::page_channel::PageChannel::new(
        UnixStream::from(OwnedFd::from(file)),
        std::time::Duration::from_millis(origin.page_timeout_ms),
    )
    .map_err(SetupError::PageChannel)?;
    Ok(ember_vmm::PartialSnapshot {
        manifest: origin.manifest.clone(),
        working_set: origin.working_set.clone(),
        missing_pages: Arc::new(channel),
    })
}

/// Passes the agent connection to the service over stdin, when the service made stdin a Unix
/// socket for that (one byte with the descriptor attached), and closes this process's end.
/// False when there is no such socket or the send failed: the service then connects itself.
fn pass_agent_connection(connection: UnixStream) -> bool {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    // SAFETY: fstat(2) into a zeroed stat buffer; descriptor 0 is only inspected.
    let is_socket = unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(0, &mut stat) == 0 && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        return false;
    }
    // SAFETY: descriptor 0 is this process's stdin, a socket (checked above) that nothing
    // else uses once the pool's assignment (if any) was read. ManuallyDrop: descriptor 0 is
    // not closed but pointed at /dev/null below, so it is never reused for another file.
    let stdin = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(0) });
    let passed = match stdin.send_with_fd(&b"a"[..], connection.as_raw_fd()) {
        Ok(1) => true,
        Ok(_) => false,
        Err(e) => {
            log::warn!("cannot pass the agent connection to the service: {e}");
            false
        }
    };
    point_at_dev_null(libc::STDIN_FILENO);
    passed
}

/// A pooled VMM's assignment: one JSON line on stdin, which the service made a Unix socket,
/// with the sandbox's TAP queue attached when it has a network. `None` at the stream's end
/// (no sandbox for this VMM).
fn read_assignment() -> Result<Option<(PoolAssignment, Option<OwnedFd>)>, SetupError> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    // SAFETY: descriptor 0 is this process's stdin, used nowhere else while the assignment
    // is read; it stays open after (ManuallyDrop), for the agent connection to go back on.
    let socket = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(0) });
    let mut line = vec![0u8; MAX_CONTROL_LINE + 1];
    let mut len = 0;
    let mut tap: Option<OwnedFd> = None;
    while !line[..len].contains(&b'\n') {
        if len == line.len() {
            return Err(SetupError::AssignmentTooLong);
        }
        let (read, fd) = socket
            .recv_with_fd(&mut line[len..])
            .map_err(SetupError::AssignmentRead)?;
        if let Some(fd) = fd {
            if tap.replace(OwnedFd::from(fd)).is_some() {
                return Err(SetupError::AssignmentDescriptors);
            }
        }
        if read == 0 {
            return match len {
                0 => Ok(None),
                _ => Err(SetupError::AssignmentCut),
            };
        }
        len += read;
    }
    let end = line[..len].iter().position(|b| *b == b'\n').unwrap_or(len);
    let assignment: PoolAssignment =
        serde_json::from_slice(&line[..end]).map_err(SetupError::AssignmentMalformed)?;
    if assignment.net.is_some() != tap.is_some() {
        return Err(SetupError::AssignmentTap {
            has_net: assignment.net.is_some(),
            has_tap: tap.is_some(),
        });
    }
    Ok(Some((assignment, tap)))
}

/// Points stdout at /dev/null so a write after the service went away cannot kill the VMM
/// with SIGPIPE.
/// File descriptors a VMM may hold: its disk, the store's packs, KVM and event fds, and one
/// per vsock connection; far beyond what a sandbox uses, far below what would starve the host.
const MAX_OPEN_FILES: u64 = 4096;

/// The largest file a VMM may write: its rootfs overlay (at most the rootfs's size) and the
/// store's packs of a snapshot (at most the guest's memory and disk), with room to spare.
fn max_file_size(spec: &WorkerSpec) -> u64 {
    let rootfs = std::fs::metadata(&spec.rootfs).map_or(0, |m| m.len());
    let memory = u64::from(spec.mem_mib) << 20;
    rootfs.saturating_add(memory).saturating_mul(2) + (1 << 30)
}

/// Caps what a compromised VMM could take from the host (`RLIMIT_NOFILE`, `RLIMIT_FSIZE`,
/// soft and hard: it cannot raise them again).
fn limit_resources(spec: &WorkerSpec) -> Result<(), SetupError> {
    for (resource, name, value) in [
        (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", MAX_OPEN_FILES),
        (libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", max_file_size(spec)),
    ] {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `current`.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            return Err(SetupError::ReadLimit {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        // Never above what is already allowed (raising a hard limit needs privileges).
        let value = value.min(current.rlim_max);
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the rlimit we pass; it changes only this process's limits.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(SetupError::SetLimit {
                name,
                value,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

fn detach_stdout() {
    point_at_dev_null(libc::STDOUT_FILENO);
}

/// Points standard descriptor `fd` at /dev/null (closing what it referred to), so it stays
/// open and is never reused for another file.
fn point_at_dev_null(fd: libc::c_int) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    if let Ok(null) = null {
        // SAFETY: dup2 onto a standard descriptor only replaces what it refers to; `null`
        // stays open until after the call.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

/// Answers one line per request until the service hangs up.
fn serve_connection(worker: &Worker, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader)
            .take(MAX_CONTROL_LINE as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_CONTROL_LINE {
            ControlReply::error(format!(
                "control request longer than {MAX_CONTROL_LINE} bytes"
            ))
        } else {
            match serde_json::from_str::<ControlRequest>(line.trim_end()) {
                Ok(request) => handle(worker, request),
                Err(e) => ControlReply::error(format!("malformed control request: {e}")),
            }
        };
        let mut text = serde_json::to_string(&reply).unwrap_or_default();
        text.push('\n');
        let sent = writer
            .write_all(text.as_bytes())
            .and_then(|_| writer.flush());
        // A request that ends the VM does so only once its answer is on its way: the
        // process exits right after the VM does.
        if worker.stopping.load(Ordering::SeqCst) {
            worker.vmm.stop();
        }
        if sent.is_err() {
            return;
        }
    }
}

/// Carries out one control request (a plain function of the worker's state).
fn handle(worker: &Worker, request: ControlRequest) -> ControlReply {
    let mut paused = worker.paused.lock().unwrap_or_else(|p| p.into_inner());
    let state = |paused: bool| Some(if paused { "paused" } else { "running" }.to_string());
    match request {
        ControlRequest::Status => ControlReply {
            state: state(*paused),
            ..ControlReply::ok()
        },
        ControlRequest::IoStats => ControlReply {
            io: Some(worker.vmm.io_stats()),
            ..ControlReply::ok()
        },
        ControlRequest::Faults => ControlReply {
            faults: Some(match worker.vmm.fault_timeline() {
                Some(counts) => FaultReport {
                    lazy: true,
                    bucket_ms: ember_vmm::FAULT_BUCKET_MS,
                    counts,
                    served: worker.vmm.faults_served().unwrap_or(0),
                    prefetched: worker.vmm.pages_prefetched().unwrap_or(0),
                },
                None => FaultReport::default(),
            }),
            ..ControlReply::ok()
        },
        ControlRequest::Pause => match worker.vmm.pause() {
            Ok(()) => {
                *paused = true;
                ControlReply {
                    state: state(true),
                    ..ControlReply::ok()
                }
            }
            Err(e) => ControlReply::error(format!("cannot pause: {e}")),
        },
        ControlRequest::Resume => match worker.vmm.resume() {
            Ok(()) => {
                *paused = false;
                ControlReply {
                    state: state(false),
                    ..ControlReply::ok()
                }
            }
            Err(e) => ControlReply::error(format!("cannot resume: {e}")),
        },
        ControlRequest::Snapshot {
            id,
            diff,
            stop,
            labels,
        } => {
            let kind = if diff {
                SnapshotKind::Diff
            } else {
                SnapshotKind::Full
            };
            let t = Instant::now();
            // The service closed its agent connection first: once the guest has torn it
            // down the snapshot holds only listeners, and its restores need no reset.
            let left = worker.vmm.wait_for_vsock_idle(VSOCK_SETTLE);
            if left.is_some_and(|n| n > 0) {
                log::info!(
                    "snapshot {id}: {left:?} vsock connections open; restores will reset them"
                );
            }
            let result = snapshot(worker, &id, kind, &labels);
            let took_ms = t.elapsed().as_secs_f64() * 1e3;
            // The snapshot left the vCPUs paused.
            let next = if stop && result.is_ok() {
                // The VM stops once this answer is sent (see `serve_connection`).
                worker.stopping.store(true, Ordering::SeqCst);
                Ok(())
            } else if *paused {
                Ok(())
            } else {
                worker.vmm.resume()
            };
            match (result, next) {
                (Ok(m), Ok(())) => ControlReply {
                    snapshot: Some(SnapshotDone {
                        id: m.id.clone(),
                        memory_bytes: m.memory.size_bytes,
                        took_ms,
                        parent: m.parent.clone(),
                    }),
                    state: state(*paused),
                    ..ControlReply::ok()
                },
                (Err(e), _) => ControlReply::error(e.to_string()),
                (Ok(_), Err(e)) => ControlReply::error(format!(
                    "the snapshot {id} was saved but the VM cannot resume: {e}"
                )),
            }
        }
        ControlRequest::RecordWorkingSet => {
            if let Some(faults) = worker.vmm.faults_served() {
                log::info!("first command done: {faults} pages faulted in since the restore");
            }
            if let WorkerOrigin::Restore { snapshot, .. } = &worker.spec.origin {
                match &worker.spec.staging_dir {
                    Some(staging) => {
                        let dir = crate::control::staged_working_set_dir(staging);
                        match open_staging(worker, &dir) {
                            Ok(into) => {
                                record_working_set(&worker.vmm, &worker.store, &into, snapshot)
                            }
                            Err(e) => log::warn!("cannot record the working set: {e}"),
                        }
                    }
                    None => record_working_set(&worker.vmm, &worker.store, &worker.store, snapshot),
                }
            }
            ControlReply::ok()
        }
        ControlRequest::Stop => {
            worker.stopping.store(true, Ordering::SeqCst);
            ControlReply::ok()
        }
    }
}

/// Why the VMM could not take what the service hands it on stdin, or limit itself.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("waiting for the page channel on stdin: {0}")]
    PageChannelWait(#[source] std::io::Error),
    #[error("the service sent no page channel on stdin")]
    NoPageChannel,
    #[error("receiving the page channel on stdin: {0}")]
    PageChannelReceive(#[source] vmm_sys_util::errno::Error),
    #[error("setting up the page channel: {0}")]
    PageChannel(#[source] std::io::Error),
    #[error("the pool assignment is longer than {MAX_CONTROL_LINE} bytes")]
    AssignmentTooLong,
    #[error("reading the pool assignment from stdin: {0}")]
    AssignmentRead(#[source] vmm_sys_util::errno::Error),
    #[error("the pool assignment carried more than one descriptor")]
    AssignmentDescriptors,
    #[error("the pool assignment ended before its line did")]
    AssignmentCut,
    #[error("malformed pool assignment: {0}")]
    AssignmentMalformed(#[source] serde_json::Error),
    #[error("the pool assignment {} a network but {} a TAP queue",
        if *has_net { "has" } else { "has no" },
        if *has_tap { "carries" } else { "carries no" })]
    AssignmentTap { has_net: bool, has_tap: bool },
    #[error("cannot read {name}: {source}")]
    ReadLimit {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set {name} to {value}: {source}")]
    SetLimit {
        name: &'static str,
        value: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Why a snapshot request failed.
#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Vmm(#[from] ember_vmm::VmmError),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the staging store {path}: {source}")]
struct StagingError {
    path: PathBuf,
    #[source]
    source: ember_snapshot_store::StoreError,
}

/// Saves the VM as snapshot `id`: into the store, or, when the store is the service's to
/// write, into a staging store of its own the service ingests from.
fn snapshot(
    worker: &Worker,
    id: &str,
    kind: SnapshotKind,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<ember_snapshot_store::Manifest, SnapshotError> {
    match &worker.spec.staging_dir {
        Some(staging) => {
            let store = open_staging(worker, &crate::control::staged_snapshot_dir(staging, id))?;
            Ok(worker.vmm.snapshot_labelled(&store, id, kind, labels)?)
        }
        None => Ok(worker
            .vmm
            .snapshot_labelled(&worker.store, id, kind, labels)?),
    }
}

/// A fresh staging store at `dir` (whatever an earlier attempt left there is removed) over
/// the VMM's view of the shared store.
fn open_staging(worker: &Worker, dir: &Path) -> Result<ember_snapshot_store::Store, StagingError> {
    let fail = |source| StagingError {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(fail(ember_snapshot_store::StoreError::Io {
                path: dir.to_path_buf(),
                source,
            }))
        }
    }
    ember_snapshot_store::Store::open_staging(
        dir,
        worker.store.clone(),
        worker.store.options().clone(),
    )
    .map_err(fail)
}
