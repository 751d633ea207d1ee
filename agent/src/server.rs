//! The agent's side of the protocol: serves one connection per thread, over any
//! [`Transport`] (an AF_VSOCK socket in the guest, a `UnixStream` in tests).
//!
//! Per connection: the calling thread reads and dispatches frames; every response goes
//! through one writer mutex, a whole frame at a time, so frames never interleave. Each exec
//! gets a thread that spawns, waits and reports, a thread per output pipe, a stdin feeder and,
//! with a timeout, a timer; each `WriteFile` and `ReadFile` gets a thread. Nothing is buffered
//! whole: data moves in chunks of at most [`MAX_CHUNK`] under the windows described in
//! [`crate::protocol`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::init::{release_owned, spawn_owned};
use crate::protocol::{
    decode, decode_id, encode_frame, read_frame, Credit, ErrorKind, ExecRequest, ExitStatus,
    FileStat, FileType, FrameError, RemoteError, Request, RequestBody, Response, ResponseBody,
    Transport, ACK_THRESHOLD, CAP_RESYNC, MAX_CHUNK, PROTOCOL_VERSION, STREAM_WINDOW,
};

/// What the agent tells the host it can do, in `Hello`.
pub const CAPABILITIES: &[&str] = &[
    "exec",
    "exec-stdin-stream",
    "exec-timeout",
    "kill",
    "write-file",
    "read-file",
    "mkdir",
    "stat",
    "shutdown",
    CAP_RESYNC,
];

/// How long an exec waits for its output pipes to close after the command exited (a
/// background process may keep them open) before reporting the exit anyway.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Stack size of the agent's helper threads: they only move buffers that live on the heap.
const THREAD_STACK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create an AF_VSOCK socket: {0}")]
    Socket(io::Error),
    #[error("cannot bind AF_VSOCK port {port}: {source}")]
    Bind { port: u32, source: io::Error },
    #[error("cannot listen on AF_VSOCK port {port}: {source}")]
    Listen { port: u32, source: io::Error },
    #[error("cannot split the connection into a reader and a writer: {0}")]
    Split(io::Error),
    #[error("connection broken: {0}")]
    Frame(#[from] FrameError),
}

/// What the server does beyond answering requests.
pub struct ServerConfig {
    /// Called after `Shutdown` was answered. In the guest: `init::sync_and_reset`.
    pub on_shutdown: Box<dyn Fn() + Send + Sync>,
}

impl ServerConfig {
    pub fn new(on_shutdown: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            on_shutdown: Box::new(on_shutdown),
        }
    }
}

/// Serves one connection until the peer closes it or sends a frame that cannot be
/// resynchronised (oversized or truncated). When it returns, every command the connection
/// started has been sent SIGKILL.
pub fn serve_connection<S: Transport>(
    stream: S,
    config: Arc<ServerConfig>,
) -> Result<(), ServerError> {
    let writer = stream.try_clone_transport().map_err(ServerError::Split)?;
    let conn = Arc::new(Conn {
        out: Mutex::new(Box::new(writer)),
        broken: AtomicBool::new(false),
        execs: Mutex::new(HashMap::new()),
        uploads: Mutex::new(HashMap::new()),
        outputs: Mutex::new(HashMap::new()),
        config,
    });
    let mut reader = BufReader::with_capacity(MAX_CHUNK, stream);
    let result = loop {
        match read_frame(&mut reader) {
            Ok(None) => break Ok(()),
            Ok(Some(payload)) => match decode::<Request>(&payload) {
                Ok(request) => conn.handle(request),
                Err(err) => {
                    let id = decode_id(&payload).unwrap_or(0);
                    conn.send_error(
                        id,
                        RemoteError::new(
                            ErrorKind::Protocol,
                            format!(
                                "request {id}: malformed {}-byte frame: {err}",
                                payload.len()
                            ),
                        ),
                    );
                }
            },
            Err(FrameError::Io(err)) => break Err(ServerError::Frame(FrameError::Io(err))),
            Err(err) => {
                conn.send_error(
                    0,
                    RemoteError::new(
                        ErrorKind::Protocol,
                        format!("{err}; closing the connection"),
                    ),
                );
                break Err(ServerError::Frame(err));
            }
        }
    };
    conn.teardown();
    reader.get_ref().shutdown_transport().ok();
    result
}

/// One connection's shared state.
struct Conn {
    out: Mutex<Box<dyn Write + Send>>,
    /// Set once a write failed: the peer is gone, stop producing output.
    broken: AtomicBool,
    execs: Mutex<HashMap<u64, Arc<ExecEntry>>>,
    /// Open `WriteFile` streams by request id.
    uploads: Mutex<HashMap<u64, Inbound>>,
    /// Windows of the output streams (exec output, `ReadFile`) by request id.
    outputs: Mutex<HashMap<u64, Arc<Credit>>>,
    config: Arc<ServerConfig>,
}

/// The agent's end of an input stream (`Stdin`, `FileData`) fed to a consumer thread.
struct Inbound {
    tx: Sender<Chunk>,
    /// Bytes received and not yet consumed; over two windows is a protocol violation.
    queued: Arc<AtomicU64>,
}

impl Inbound {
    fn new() -> (Self, Receiver<Chunk>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        (
            Self {
                tx,
                queued: queued.clone(),
            },
            rx,
            queued,
        )
    }

    /// Queues `data`; `Err` when the sender broke the window.
    fn push(&self, data: Vec<u8>) -> Result<(), u64> {
        let len = data.len() as u64;
        let queued = self.queued.fetch_add(len, Ordering::SeqCst) + len;
        if queued > 2 * STREAM_WINDOW {
            return Err(queued);
        }
        // The consumer may be gone (it failed or finished); the data is then dropped.
        self.tx.send(Chunk::Data(data)).ok();
        Ok(())
    }
}

enum Chunk {
    Data(Vec<u8>),
    /// The input is complete (`FileEnd`). A closed channel without it means aborted (or, for
    /// stdin, `StdinClose`).
    End,
}

/// Acknowledges consumed input in batches.
struct Acker {
    id: u64,
    unacked: u64,
    queued: Arc<AtomicU64>,
}

impl Acker {
    fn consumed(&mut self, conn: &Conn, bytes: u64) {
        let left = self.queued.fetch_sub(bytes, Ordering::SeqCst) - bytes;
        self.unacked += bytes;
        if self.unacked >= ACK_THRESHOLD || left == 0 {
            conn.send(
                self.id,
                ResponseBody::Ack {
                    bytes: self.unacked,
                },
            );
            self.unacked = 0;
        }
    }
}

struct ExecEntry {
    state: Mutex<ProcState>,
    stdin: Mutex<Option<Inbound>>,
}

enum ProcState {
    /// Not spawned yet; a `Kill` meanwhile is delivered right after spawning.
    Starting {
        pending_signal: Option<i32>,
    },
    Running {
        pgid: libc::pid_t,
    },
    /// Exited (the zombie may not be reaped yet, so the pid is not reused): no more signals.
    Exited,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a helper thread; `Err` says why it could not (e.g. out of memory or pids).
fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), RemoteError> {
    std::thread::Builder::new()
        .name(name.clone())
        .stack_size(THREAD_STACK)
        .spawn(f)
        .map(drop)
        .map_err(|err| RemoteError::from_io(format!("start thread {name}"), &err))
}

/// Sends `signal` to the process group `pgid`.
fn kill_group(pgid: libc::pid_t, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions; a negative pid names a process group
    // the agent created (the exec's leader was spawned with process_group(0)).
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Conn {
    /// Sends one response frame; `false` when the peer is gone.
    fn send(&self, id: u64, body: ResponseBody) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        let frame = match encode_frame(&Response { id, body }) {
            Ok(frame) => frame,
            Err(err) => {
                eprintln!("ember-agent: response to request {id}: {err}");
                return false;
            }
        };
        let mut out = lock(&self.out);
        if out.write_all(&frame).and_then(|()| out.flush()).is_err() {
            self.broken.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn send_error(&self, id: u64, error: RemoteError) -> bool {
        self.send(id, ResponseBody::Error(error))
    }

    fn handle(self: &Arc<Self>, request: Request) {
        let id = request.id;
        match request.body {
            RequestBody::Hello { .. } => {
                self.send(
                    id,
                    ResponseBody::Hello {
                        agent_version: env!("CARGO_PKG_VERSION").to_string(),
                        protocol_version: PROTOCOL_VERSION,
                        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
                    },
                );
            }
            RequestBody::Exec(exec) => self.start_exec(id, exec),
            RequestBody::Stdin { data } => {
                let Some(entry) = lock(&self.execs).get(&id).cloned() else {
                    return; // The command already ended: its stdin is gone.
                };
                let pushed = match lock(&entry.stdin).as_ref() {
                    Some(inbound) => inbound.push(data),
                    None => Ok(()),
                };
                if let Err(queued) = pushed {
                    self.violation(id, &entry, queued);
                }
            }
            RequestBody::StdinClose => {
                if let Some(entry) = lock(&self.execs).get(&id).cloned() {
                    lock(&entry.stdin).take();
                }
            }
            RequestBody::Kill { target, signal } => {
                let result = self.kill(target, signal);
                match result {
                    Ok(()) => self.send(id, ResponseBody::Done { bytes: 0 }),
                    Err(err) => self.send_error(id, err),
                };
            }
            RequestBody::WriteFile {
                path,
                mode,
                create_parents,
            } => self.start_write(id, path, mode, create_parents),
            RequestBody::FileData { data } => {
                let mut uploads = lock(&self.uploads);
                if let Some(inbound) = uploads.get(&id) {
                    if let Err(queued) = inbound.push(data) {
                        uploads.remove(&id);
                        drop(uploads);
                        self.send_error(id, window_error(queued));
                    }
                }
            }
            RequestBody::FileEnd => {
                if let Some(inbound) = lock(&self.uploads).remove(&id) {
                    inbound.tx.send(Chunk::End).ok();
                }
            }
            RequestBody::ReadFile { path } => self.start_read(id, path),
            RequestBody::Mkdir { path, mode } => {
                match mkdir_p(&path, mode) {
                    Ok(()) => self.send(id, ResponseBody::Done { bytes: 0 }),
                    Err(err) => self.send_error(id, err),
                };
            }
            RequestBody::Stat { path } => {
                match stat(&path) {
                    Ok(stat) => self.send(id, ResponseBody::StatResult(stat)),
                    Err(err) => self.send_error(id, err),
                };
            }
            RequestBody::Shutdown => {
                self.send(id, ResponseBody::Done { bytes: 0 });
                (self.config.on_shutdown)();
            }
            RequestBody::Ack { bytes } => {
                if let Some(credit) = lock(&self.outputs).get(&id) {
                    credit.release(bytes);
                }
            }
            RequestBody::Resync {
                unix_time_ns,
                entropy,
            } => {
                // clock_settime and two ioctls: answered inline, like Mkdir.
                match crate::resync::resync(unix_time_ns, &entropy) {
                    Ok(bytes) => self.send(id, ResponseBody::Done { bytes }),
                    Err(err) => self.send_error(id, err),
                };
            }
        }
    }

    /// The host sent more stdin than the window allows: the command is killed.
    fn violation(&self, id: u64, entry: &ExecEntry, queued: u64) {
        lock(&entry.stdin).take();
        if let ProcState::Running { pgid } = *lock(&entry.state) {
            kill_group(pgid, libc::SIGKILL).ok();
        }
        self.send_error(id, window_error(queued));
    }

    fn kill(&self, target: u64, signal: i32) -> Result<(), RemoteError> {
        let not_running = || {
            RemoteError::new(
                ErrorKind::NotFound,
                format!("no running command with request id {target}"),
            )
        };
        let entry = lock(&self.execs)
            .get(&target)
            .cloned()
            .ok_or_else(not_running)?;
        let mut state = lock(&entry.state);
        match &mut *state {
            ProcState::Starting { pending_signal } => {
                *pending_signal = Some(signal);
                Ok(())
            }
            ProcState::Running { pgid } => kill_group(*pgid, signal).map_err(|err| {
                RemoteError::from_io(
                    format!("kill signal {signal} to process group {pgid}"),
                    &err,
                )
            }),
            ProcState::Exited => Err(not_running()),
        }
    }

    fn start_exec(self: &Arc<Self>, id: u64, mut request: ExecRequest) {
        let mut execs = lock(&self.execs);
        if execs.contains_key(&id) {
            drop(execs);
            self.send_error(
                id,
                RemoteError::new(
                    ErrorKind::Protocol,
                    format!("request id {id} is already a running command"),
                ),
            );
            return;
        }
        let (inbound, stdin_rx, queued) = Inbound::new();
        let entry = Arc::new(ExecEntry {
            state: Mutex::new(ProcState::Starting {
                pending_signal: None,
            }),
            stdin: Mutex::new(request.stdin_stream.then_some(inbound)),
        });
        execs.insert(id, entry.clone());
        drop(execs);
        let credit = Arc::new(Credit::default());
        lock(&self.outputs).insert(id, credit.clone());
        let conn = self.clone();
        let inline = std::mem::take(&mut request.stdin);
        let started = spawn_thread(format!("exec-{id}"), move || {
            let stdin = StdinFeed {
                inline,
                rx: stdin_rx,
                acker: Acker {
                    id,
                    unacked: 0,
                    queued,
                },
            };
            let result = run_exec(&conn, id, &request, &entry, stdin, &credit);
            lock(&conn.execs).remove(&id);
            if let Some(credit) = lock(&conn.outputs).remove(&id) {
                credit.close();
            }
            match result {
                Ok(status) => conn.send(id, ResponseBody::Exited { status }),
                Err(err) => conn.send_error(id, err),
            };
        });
        if let Err(err) = started {
            lock(&self.execs).remove(&id);
            lock(&self.outputs).remove(&id);
            self.send_error(id, err);
        }
    }

    fn start_write(self: &Arc<Self>, id: u64, path: String, mode: u32, create_parents: bool) {
        let (inbound, rx, queued) = Inbound::new();
        {
            let mut uploads = lock(&self.uploads);
            if uploads.contains_key(&id) {
                drop(uploads);
                self.send_error(
                    id,
                    RemoteError::new(
                        ErrorKind::Protocol,
                        format!("request id {id} is already an open WriteFile"),
                    ),
                );
                return;
            }
            uploads.insert(id, inbound);
        }
        let conn = self.clone();
        let started = spawn_thread(format!("write-{id}"), move || {
            let mut acker = Acker {
                id,
                unacked: 0,
                queued,
            };
            let result = write_file(&conn, &path, mode, create_parents, &rx, &mut acker);
            // On failure, stop accepting data for this id (later frames are ignored).
            lock(&conn.uploads).remove(&id);
            match result {
                Ok(Some(bytes)) => conn.send(id, ResponseBody::Done { bytes }),
                Ok(None) => false, // The connection closed before FileEnd.
                Err(err) => conn.send_error(id, err),
            };
        });
        if let Err(err) = started {
            lock(&self.uploads).remove(&id);
            self.send_error(id, err);
        }
    }

    fn start_read(self: &Arc<Self>, id: u64, path: String) {
        let credit = Arc::new(Credit::default());
        lock(&self.outputs).insert(id, credit.clone());
        let conn = self.clone();
        let started = spawn_thread(format!("read-{id}"), move || {
            let result = read_file(&conn, id, &path, &credit);
            lock(&conn.outputs).remove(&id);
            match result {
                Ok(bytes) => conn.send(id, ResponseBody::Done { bytes }),
                Err(err) => conn.send_error(id, err),
            };
        });
        if let Err(err) = started {
            lock(&self.outputs).remove(&id);
            self.send_error(id, err);
        }
    }

    /// The connection is closing: kill its commands and release every waiting thread.
    fn teardown(&self) {
        self.broken.store(true, Ordering::SeqCst);
        for entry in lock(&self.execs).values() {
            lock(&entry.stdin).take();
            if let ProcState::Running { pgid } = *lock(&entry.state) {
                kill_group(pgid, libc::SIGKILL).ok();
            }
        }
        lock(&self.uploads).clear();
        for credit in lock(&self.outputs).values() {
            credit.close();
        }
    }
}

fn window_error(queued: u64) -> RemoteError {
    RemoteError::new(
        ErrorKind::Protocol,
        format!("{queued} bytes of input queued: more than the window of {STREAM_WINDOW} allows"),
    )
}

fn absolute_path(path: &str) -> Result<&Path, RemoteError> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("path {path:?} is not absolute"),
        ));
    }
    if path.contains('\0') {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("path {path:?} contains a NUL byte"),
        ));
    }
    Ok(Path::new(path))
}

struct StdinFeed {
    inline: Vec<u8>,
    rx: Receiver<Chunk>,
    acker: Acker,
}

/// Spawns, streams and waits for one command.
fn run_exec(
    conn: &Arc<Conn>,
    id: u64,
    request: &ExecRequest,
    entry: &Arc<ExecEntry>,
    stdin: StdinFeed,
    credit: &Arc<Credit>,
) -> Result<ExitStatus, RemoteError> {
    let mut command = build_command(request, !stdin.inline.is_empty())?;
    let program = &request.argv[0];
    let mut child = spawn_owned(&mut command)
        .map_err(|err| RemoteError::from_io(format!("cannot execute {program:?}"), &err))?;
    let pid = child.id();
    let pgid = pid as libc::pid_t;
    {
        let mut state = lock(&entry.state);
        if let ProcState::Starting {
            pending_signal: Some(signal),
        } = *state
        {
            kill_group(pgid, signal).ok();
        }
        *state = ProcState::Running { pgid };
    }
    conn.send(id, ResponseBody::Started { pid });

    if let Some(child_stdin) = child.stdin.take() {
        let conn = conn.clone();
        if let Err(err) = spawn_thread(format!("stdin-{id}"), move || {
            feed_stdin(&conn, child_stdin, stdin)
        }) {
            eprintln!("ember-agent: exec {id}: {err}; its stdin is closed");
        }
    }
    let (done_tx, done_rx) = mpsc::channel();
    let pump_state = Arc::new(PumpState::default());
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        pumps += 1;
        start_pump(conn, id, out, true, credit, &pump_state, done_tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        pumps += 1;
        start_pump(conn, id, err, false, credit, &pump_state, done_tx.clone());
    }
    drop(done_tx);

    let timer = request
        .timeout_ms
        .map(|ms| start_timer(id, Duration::from_millis(ms), entry.clone()));

    let status = wait_child(&mut child, entry);
    release_owned(pid);
    let timed_out = timer.is_some_and(|(cancel, fired)| {
        drop(cancel);
        fired.load(Ordering::SeqCst)
    });

    // Report the output before the exit, unless a background process holds the pipes open
    // for longer than OUTPUT_GRACE. Time spent waiting for the host to take the output (a
    // full window) does not count: that output is never dropped.
    let mut finished = 0;
    let mut deadline = Instant::now() + OUTPUT_GRACE;
    while finished < pumps {
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(()) => finished += 1,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                if pump_state.sending.load(Ordering::SeqCst) > 0 {
                    deadline = Instant::now() + OUTPUT_GRACE;
                } else if Instant::now() >= deadline {
                    pump_state.abandoned.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
    }
    let status = status.map_err(|err| RemoteError::from_io(format!("wait for pid {pid}"), &err))?;
    Ok(if timed_out {
        ExitStatus::TimedOut
    } else if let Some(code) = status.code() {
        ExitStatus::Code(code)
    } else {
        ExitStatus::Signal(status.signal().unwrap_or(0))
    })
}

fn build_command(request: &ExecRequest, inline_stdin: bool) -> Result<Command, RemoteError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(RemoteError::new(ErrorKind::InvalidInput, "argv is empty"));
    };
    if program.is_empty() {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            "the program name (argv[0]) is empty",
        ));
    }
    let mut command = Command::new(program);
    command.args(args);
    if !request.inherit_env {
        command.env_clear();
    }
    for (key, value) in &request.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(RemoteError::new(
                ErrorKind::InvalidInput,
                format!("environment variable name {key:?} is not valid"),
            ));
        }
        command.env(key, value);
    }
    let cwd = request.cwd.as_deref().unwrap_or("/");
    let cwd_path = absolute_path(cwd)?;
    match std::fs::metadata(cwd_path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(RemoteError {
                kind: ErrorKind::InvalidInput,
                errno: Some(libc::ENOTDIR),
                message: format!("working directory {cwd:?} is not a directory"),
            })
        }
        Err(err) => {
            return Err(RemoteError::from_io(
                format!("working directory {cwd:?}"),
                &err,
            ))
        }
    }
    command.current_dir(cwd_path);
    if let Some(uid) = request.uid {
        command.uid(uid);
    }
    if let Some(gid) = request.gid {
        command.gid(gid);
    }
    // Its own process group, so Kill and timeouts reach the whole tree.
    command.process_group(0);
    if !inline_stdin && !request.stdin_stream {
        command.stdin(Stdio::null());
    } else {
        command.stdin(Stdio::piped());
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(command)
}

/// Waits until `child` exited, marks it so no signal can reach a reused pid, then reaps it.
fn wait_child(child: &mut Child, entry: &ExecEntry) -> io::Result<std::process::ExitStatus> {
    let pid = child.id();
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child a zombie, so its
        // pid (and process group id) stays reserved until the reaping below.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            // Cannot happen for our own child; let Child::wait report whatever it is.
            break;
        }
    }
    *lock(&entry.state) = ProcState::Exited;
    child.wait()
}

/// Kills the process group after `timeout` unless the returned sender is dropped first.
fn start_timer(id: u64, timeout: Duration, entry: Arc<ExecEntry>) -> (Sender<()>, Arc<AtomicBool>) {
    let (cancel, cancelled) = mpsc::channel::<()>();
    let fired = Arc::new(AtomicBool::new(false));
    let fired_in_timer = fired.clone();
    let started = spawn_thread(format!("timeout-{id}"), move || {
        if let Err(RecvTimeoutError::Timeout) = cancelled.recv_timeout(timeout) {
            let state = lock(&entry.state);
            if let ProcState::Running { pgid } = *state {
                fired_in_timer.store(true, Ordering::SeqCst);
                kill_group(pgid, libc::SIGKILL).ok();
            }
        }
    });
    if let Err(err) = started {
        eprintln!("ember-agent: exec {id}: {err}; its timeout is not enforced");
    }
    (cancel, fired)
}

fn feed_stdin(conn: &Conn, mut child_stdin: std::process::ChildStdin, mut feed: StdinFeed) {
    // After EPIPE (the command closed its stdin) the rest is consumed and dropped, so the
    // host's window keeps moving.
    let mut open = child_stdin.write_all(&feed.inline).is_ok();
    feed.inline = Vec::new();
    while let Ok(Chunk::Data(data)) = feed.rx.recv() {
        if open && child_stdin.write_all(&data).is_err() {
            open = false;
        }
        feed.acker.consumed(conn, data.len() as u64);
    }
}

/// Shared by an exec's output pumps and the thread waiting for them.
#[derive(Default)]
struct PumpState {
    /// The exec was reported: drain and drop the rest.
    abandoned: AtomicBool,
    /// Pumps waiting for the window or writing a frame (waiting for the host, not the pipe).
    sending: AtomicUsize,
}

fn start_pump(
    conn: &Arc<Conn>,
    id: u64,
    mut pipe: impl Read + Send + 'static,
    stdout: bool,
    credit: &Arc<Credit>,
    state: &Arc<PumpState>,
    done: Sender<()>,
) {
    let (conn, credit, state) = (conn.clone(), credit.clone(), state.clone());
    let name = format!("{}-{id}", if stdout { "stdout" } else { "stderr" });
    let started = spawn_thread(name, move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut forwarding = true;
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // Once the exec is over (or the host is gone) the rest is drained and dropped.
            forwarding = forwarding && !state.abandoned.load(Ordering::SeqCst);
            if forwarding {
                state.sending.fetch_add(1, Ordering::SeqCst);
                forwarding = credit.acquire(n as u64) && {
                    let data = buf[..n].to_vec();
                    let body = if stdout {
                        ResponseBody::Stdout { data }
                    } else {
                        ResponseBody::Stderr { data }
                    };
                    conn.send(id, body)
                };
                state.sending.fetch_sub(1, Ordering::SeqCst);
            }
        }
        done.send(()).ok();
    });
    if let Err(err) = started {
        // `done` was dropped with the closure: the exec reports its exit without this output.
        eprintln!("ember-agent: exec {id}: {err}; its output is dropped");
    }
}

/// Writes a `WriteFile`'s content; `Ok(None)` when the connection closed before `FileEnd`.
fn write_file(
    conn: &Conn,
    path: &str,
    mode: u32,
    create_parents: bool,
    rx: &Receiver<Chunk>,
    acker: &mut Acker,
) -> Result<Option<u64>, RemoteError> {
    let file_path = absolute_path(path)?;
    if create_parents {
        if let Some(parent) = file_path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|err| {
                    RemoteError::from_io(format!("create the parents of {path:?}"), &err)
                })?;
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(file_path)
        .map_err(|err| RemoteError::from_io(format!("open {path:?} for writing"), &err))?;
    // Exactly `mode`, whatever the umask or an existing file's mode. Not for devices and
    // FIFOs that a caller may write to on purpose: only regular files.
    let meta = file
        .metadata()
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    if meta.is_file() {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|err| RemoteError::from_io(format!("chmod {mode:o} {path:?}"), &err))?;
    }
    let mut written = 0u64;
    loop {
        match rx.recv() {
            Ok(Chunk::Data(data)) => {
                file.write_all(&data).map_err(|err| {
                    RemoteError::from_io(format!("write {path:?} at offset {written}"), &err)
                })?;
                written += data.len() as u64;
                acker.consumed(conn, data.len() as u64);
            }
            Ok(Chunk::End) => break,
            // The connection closed, or the upload was refused, before FileEnd.
            Err(_) => return Ok(None),
        }
    }
    file.flush()
        .map_err(|err| RemoteError::from_io(format!("flush {path:?}"), &err))?;
    Ok(Some(written))
}

fn read_file(conn: &Conn, id: u64, path: &str, credit: &Credit) -> Result<u64, RemoteError> {
    let file_path = absolute_path(path)?;
    let mut file = File::open(file_path)
        .map_err(|err| RemoteError::from_io(format!("open {path:?} for reading"), &err))?;
    let meta = file
        .metadata()
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    if meta.is_dir() {
        return Err(RemoteError {
            kind: ErrorKind::InvalidInput,
            errno: Some(libc::EISDIR),
            message: format!("cannot read {path:?}: it is a directory"),
        });
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(RemoteError::from_io(
                    format!("read {path:?} at offset {total}"),
                    &err,
                ))
            }
        };
        if !credit.acquire(n as u64)
            || !conn.send(
                id,
                ResponseBody::FileChunk {
                    data: buf[..n].to_vec(),
                },
            )
        {
            return Err(RemoteError::new(ErrorKind::Io, "connection closed"));
        }
        total += n as u64;
    }
}

fn mkdir_p(path: &str, mode: u32) -> Result<(), RemoteError> {
    let dir = absolute_path(path)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode & 0o7777)
        .create(dir)
        .map_err(|err| RemoteError::from_io(format!("mkdir -p {path:?}"), &err))
}

fn stat(path: &str) -> Result<FileStat, RemoteError> {
    let file_path = absolute_path(path)?;
    let meta = std::fs::metadata(file_path)
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    let file_type = if meta.is_file() {
        FileType::File
    } else if meta.is_dir() {
        FileType::Dir
    } else if meta.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    };
    Ok(FileStat {
        size: meta.len(),
        mode: meta.mode(),
        file_type,
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    })
}

/// A connected AF_VSOCK stream socket.
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for VsockStream {
    fn try_clone_transport(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }
    fn shutdown_transport(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd this value owns.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl crate::forward::HalfClose for VsockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd this value owns.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A listening AF_VSOCK socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for any CID (the host connects through the VMM's vsock device).
    pub fn bind(port: u32) -> Result<Self, ServerError> {
        // SAFETY: socket has no memory-safety preconditions.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(ServerError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh socket fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ServerError::Bind {
                port,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: listen on a bound socket fd this value owns.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(ServerError::Listen {
                port,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { fd })
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 with NULL address pointers (the peer's address is not needed).
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: `raw` is a fresh connected socket fd that nothing else owns.
                return Ok(VsockStream(unsafe { File::from_raw_fd(raw) }));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// Accepts forwarded connections ([`crate::forward`]) on `listener` forever, one thread
/// each.
pub fn serve_forwards_forever(listener: VsockListener) -> ! {
    let mut connections = 0u64;
    loop {
        match listener.accept() {
            Ok(stream) => {
                connections += 1;
                let spawned = spawn_thread(format!("fwd-{connections}"), move || {
                    if let Err(err) = crate::forward::forward_connection(stream) {
                        eprintln!("ember-agent: forwarded connection {connections}: {err}");
                    }
                });
                if let Err(err) = spawned {
                    eprintln!("ember-agent: forwarded connection {connections}: {err}");
                }
            }
            Err(err) => {
                eprintln!("ember-agent: accept on the forwarding port: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Accepts connections on `listener` forever, one thread per connection.
pub fn serve_forever(listener: VsockListener, config: Arc<ServerConfig>) -> ! {
    let mut connections = 0u64;
    loop {
        match listener.accept() {
            Ok(stream) => {
                connections += 1;
                let config = config.clone();
                if let Err(err) = spawn_thread(format!("conn-{connections}"), move || {
                    if let Err(err) = serve_connection(stream, config) {
                        eprintln!("ember-agent: connection {connections}: {err}");
                    }
                }) {
                    eprintln!("ember-agent: connection {connections}: {err}");
                }
            }
            Err(err) => {
                eprintln!("ember-agent: accept on vsock: {err}");
                // E.g. EMFILE: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
