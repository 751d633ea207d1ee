//! One exec: spawning the command, feeding its stdin, pumping its output, its timeout and its
//! exit.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::init::{release_owned, spawn_owned};
use crate::protocol::{
    Credit, ErrorKind, ExecRequest, ExitStatus, RemoteError, ResponseBody, MAX_CHUNK,
};

use super::{
    absolute_path, kill_group, lock, spawn_thread, Acker, Chunk, Conn, ExecEntry, ProcState,
    OUTPUT_GRACE,
};

pub(super) struct StdinFeed {
    pub(super) inline: Vec<u8>,
    pub(super) rx: Receiver<Chunk>,
    pub(super) acker: Acker,
}

/// Spawns, streams and waits for one command.
pub(super) fn run_exec(
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

pub(super) fn build_command(
    request: &ExecRequest,
    inline_stdin: bool,
) -> Result<Command, RemoteError> {
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
pub(super) fn wait_child(
    child: &mut Child,
    entry: &ExecEntry,
) -> io::Result<std::process::ExitStatus> {
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
pub(super) fn start_timer(
    id: u64,
    timeout: Duration,
    entry: Arc<ExecEntry>,
) -> (Sender<()>, Arc<AtomicBool>) {
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

pub(super) fn feed_stdin(
    conn: &Conn,
    mut child_stdin: std::process::ChildStdin,
    mut feed: StdinFeed,
) {
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
pub(super) struct PumpState {
    /// The exec was reported: drain and drop the rest.
    abandoned: AtomicBool,
    /// Pumps waiting for the window or writing a frame (waiting for the host, not the pipe).
    sending: AtomicUsize,
}

pub(super) fn start_pump(
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
