//! The agent's side of the protocol: serves one connection per thread, over any
//! [`Transport`] (an AF_VSOCK socket in the guest, a `UnixStream` in tests).
//!
//! Per connection: the calling thread reads and dispatches frames; every response goes
//! through one writer mutex, a whole frame at a time, so frames never interleave. Each exec
//! gets a thread that spawns, waits and reports, a thread per output pipe, a stdin feeder and,
//! with a timeout, a timer; each `WriteFile`, `ReadFile`, `ReadTar`, `WriteTar`, `Watch` and
//! `Remove` gets a thread. Nothing is buffered
//! whole: data moves in chunks of at most [`MAX_CHUNK`] under the windows described in
//! [`crate::protocol`].

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::protocol::{
    decode, decode_id, encode_frame, read_frame, Credit, ErrorKind, ExecRequest, FrameError,
    RemoteError, Request, RequestBody, Response, ResponseBody, Transport, ACK_THRESHOLD, CAP_FILES,
    CAP_PTY, CAP_RESYNC, MAX_CHUNK, PROTOCOL_VERSION, STREAM_WINDOW,
};

mod exec;
mod files;
mod fsops;
mod tar;
mod vsock;
mod watch;

use exec::{run_exec, StdinFeed};
use files::{mkdir_p, read_file, stat, write_file};
pub use vsock::{serve_forever, serve_forwards_forever, VsockListener, VsockStream};

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
    CAP_FILES,
    CAP_PTY,
];

/// Most `Watch`es one connection may have at once (each holds an inotify instance).
pub const MAX_WATCHES: usize = 16;

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
        cancellable: Mutex::new(HashMap::new()),
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
    /// Windows of the output streams (exec output, `ReadFile`, `ReadTar`, `Watch`) by
    /// request id.
    outputs: Mutex<HashMap<u64, Arc<Credit>>>,
    /// The streams `Cancel` can end (`ReadTar`, `Watch`) by request id: set to end one.
    cancellable: Mutex<HashMap<u64, Arc<AtomicBool>>>,
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
    /// The master side of the terminal of an `ExecPty` (for `Resize`), once it is open.
    pty: Mutex<Option<Arc<std::os::fd::OwnedFd>>>,
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

/// The foreground process group of the terminal whose master is `master`, if it has one.
fn foreground_group(master: &std::os::fd::OwnedFd) -> Option<libc::pid_t> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcgetpgrp only reads the terminal's state through an open descriptor.
    let group = unsafe { libc::tcgetpgrp(master.as_raw_fd()) };
    (group > 0).then_some(group)
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
            RequestBody::Exec(exec) => self.start_exec(id, exec, None),
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
            RequestBody::ListDir { path, limit } => {
                let listing = fsops::list_dir(&path, limit)
                    .map(|(entries, truncated)| ResponseBody::Listing { entries, truncated });
                self.reply(id, listing);
            }
            RequestBody::Lstat { path } => {
                self.reply(id, fsops::lstat(&path).map(ResponseBody::Entry));
            }
            RequestBody::Remove { path, recursive } => {
                // A recursive removal may take long: not on the connection's reading thread.
                let conn = self.clone();
                let started = spawn_thread(format!("remove-{id}"), move || {
                    let removed = fsops::remove(&path, recursive);
                    conn.reply(id, removed.map(|()| ResponseBody::Done { bytes: 0 }));
                });
                if let Err(err) = started {
                    self.send_error(id, err);
                }
            }
            RequestBody::Rename {
                from,
                to,
                overwrite,
            } => {
                let renamed = fsops::rename(&from, &to, overwrite);
                self.reply(id, renamed.map(|()| ResponseBody::Done { bytes: 0 }));
            }
            RequestBody::ReadTar { path } => self.start_read_tar(id, path),
            RequestBody::WriteTar { path } => self.start_write_tar(id, path),
            RequestBody::Watch { path, recursive } => self.start_watch(id, path, recursive),
            RequestBody::Cancel { target } => {
                let cancelled = self.cancel(target);
                self.reply(id, cancelled.map(|()| ResponseBody::Done { bytes: 0 }));
            }
            RequestBody::ExecPty {
                mut exec,
                cols,
                rows,
            } => {
                exec.stdin_stream = true;
                self.start_exec(id, exec, Some(exec::WindowSize { cols, rows }));
            }
            RequestBody::Resize { target, cols, rows } => {
                match self.resize(target, exec::WindowSize { cols, rows }) {
                    Ok(()) => self.send(id, ResponseBody::Done { bytes: 0 }),
                    Err(err) => self.send_error(id, err),
                };
            }
        }
    }

    /// Sends a final answer: the body, or the error.
    fn reply(&self, id: u64, result: Result<ResponseBody, RemoteError>) -> bool {
        match result {
            Ok(body) => self.send(id, body),
            Err(err) => self.send_error(id, err),
        }
    }

    /// Ends the `ReadTar` or `Watch` with request id `target`.
    fn cancel(&self, target: u64) -> Result<(), RemoteError> {
        let flag = lock(&self.cancellable)
            .get(&target)
            .cloned()
            .ok_or_else(|| {
                RemoteError::new(
                    ErrorKind::NotFound,
                    format!("no archive or watch with request id {target} to cancel"),
                )
            })?;
        flag.store(true, Ordering::SeqCst);
        // Wakes a sender waiting for room in the window.
        if let Some(credit) = lock(&self.outputs).get(&target) {
            credit.close();
        }
        Ok(())
    }

    /// Registers an output stream that `Cancel` can end: its window and its flag.
    fn open_cancellable(&self, id: u64) -> (Arc<Credit>, Arc<AtomicBool>) {
        let credit = Arc::new(Credit::default());
        let flag = Arc::new(AtomicBool::new(false));
        lock(&self.outputs).insert(id, credit.clone());
        lock(&self.cancellable).insert(id, flag.clone());
        (credit, flag)
    }

    fn close_cancellable(&self, id: u64) {
        if let Some(credit) = lock(&self.outputs).remove(&id) {
            credit.close();
        }
        lock(&self.cancellable).remove(&id);
    }

    fn start_read_tar(self: &Arc<Self>, id: u64, path: String) {
        let (credit, _) = self.open_cancellable(id);
        let conn = self.clone();
        let started = spawn_thread(format!("read-tar-{id}"), move || {
            let result = tar::read_tar(&conn, id, &path, &credit);
            conn.close_cancellable(id);
            conn.reply(id, result.map(|bytes| ResponseBody::Done { bytes }));
        });
        if let Err(err) = started {
            self.close_cancellable(id);
            self.send_error(id, err);
        }
    }

    fn start_write_tar(self: &Arc<Self>, id: u64, path: String) {
        let Some((rx, queued)) = self.open_upload(id, "WriteTar") else {
            return;
        };
        let conn = self.clone();
        let started = spawn_thread(format!("write-tar-{id}"), move || {
            let mut acker = Acker {
                id,
                unacked: 0,
                queued,
            };
            let result = tar::write_tar(&conn, &path, &rx, &mut acker);
            lock(&conn.uploads).remove(&id);
            match result {
                Ok(Some(summary)) => conn.send(id, ResponseBody::Extracted(summary)),
                Ok(None) => false,
                Err(err) => conn.send_error(id, err),
            };
        });
        if let Err(err) = started {
            lock(&self.uploads).remove(&id);
            self.send_error(id, err);
        }
    }

    fn start_watch(self: &Arc<Self>, id: u64, path: String, recursive: bool) {
        if lock(&self.cancellable).len() >= MAX_WATCHES {
            self.send_error(
                id,
                RemoteError::new(
                    ErrorKind::TooLarge,
                    format!("watch {path:?}: this connection has {MAX_WATCHES} streams open"),
                ),
            );
            return;
        }
        let (credit, cancelled) = self.open_cancellable(id);
        let conn = self.clone();
        let started = spawn_thread(format!("watch-{id}"), move || {
            let result = watch::watch(&conn, id, &path, recursive, &credit, &cancelled);
            conn.close_cancellable(id);
            conn.reply(id, result.map(|bytes| ResponseBody::Done { bytes }));
        });
        if let Err(err) = started {
            self.close_cancellable(id);
            self.send_error(id, err);
        }
    }

    /// Opens the input stream of an upload (`WriteFile`, `WriteTar`) with this id; `None`
    /// (and the error sent) when one is open already.
    fn open_upload(&self, id: u64, what: &str) -> Option<(Receiver<Chunk>, Arc<AtomicU64>)> {
        let (inbound, rx, queued) = Inbound::new();
        let mut uploads = lock(&self.uploads);
        if uploads.contains_key(&id) {
            drop(uploads);
            self.send_error(
                id,
                RemoteError::new(
                    ErrorKind::Protocol,
                    format!("request id {id} is already an open {what}"),
                ),
            );
            return None;
        }
        uploads.insert(id, inbound);
        Some((rx, queued))
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
            ProcState::Running { pgid } => {
                let pgid = *pgid;
                let send = |group: libc::pid_t| {
                    kill_group(group, signal).map_err(|err| {
                        RemoteError::from_io(
                            format!("kill signal {signal} to process group {group}"),
                            &err,
                        )
                    })
                };
                // A terminal's signal goes to its foreground job, as a keyboard's would (a
                // shell runs each job in a process group of its own); SIGKILL ends the
                // session's leader as well.
                let job = lock(&entry.pty)
                    .as_deref()
                    .and_then(foreground_group)
                    .filter(|&job| job != pgid);
                match job {
                    Some(job) if signal != libc::SIGKILL => send(job),
                    Some(job) => {
                        kill_group(job, signal).ok();
                        send(pgid)
                    }
                    None => send(pgid),
                }
            }
            ProcState::Exited => Err(not_running()),
        }
    }

    /// Sets the window size of the terminal of the `ExecPty` `target`.
    fn resize(&self, target: u64, size: exec::WindowSize) -> Result<(), RemoteError> {
        let entry = lock(&self.execs).get(&target).cloned().ok_or_else(|| {
            RemoteError::new(
                ErrorKind::NotFound,
                format!("no running command with request id {target}"),
            )
        })?;
        let master = lock(&entry.pty).clone().ok_or_else(|| {
            RemoteError::new(
                ErrorKind::InvalidInput,
                format!("command {target} does not run on a terminal (or has not started)"),
            )
        })?;
        exec::set_window_size(&master, size)
            .map_err(|err| RemoteError::from_io(format!("resize the terminal of {target}"), &err))
    }

    fn start_exec(
        self: &Arc<Self>,
        id: u64,
        mut request: ExecRequest,
        pty: Option<exec::WindowSize>,
    ) {
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
            pty: Mutex::new(None),
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
            let result = run_exec(&conn, id, &request, &entry, stdin, &credit, pty);
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
        let Some((rx, queued)) = self.open_upload(id, "WriteFile") else {
            return;
        };
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
        for flag in lock(&self.cancellable).values() {
            flag.store(true, Ordering::SeqCst);
        }
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
