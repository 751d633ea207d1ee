//! One exec: spawning the command, feeding its stdin, pumping its output, its timeout and its
//! exit.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::init::{release_owned, spawn_owned};
use crate::protocol::{
    Credit, ErrorKind, ExecRequest, ExitStatus, RemoteError, ResponseBody, MAX_CHUNK,
    PTY_DEFAULT_TERM,
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

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WindowSize {
    pub(super) cols: u16,
    pub(super) rows: u16,
}

impl WindowSize {
    fn winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// Sets the window size of the terminal whose master side is `master`; the kernel sends
/// SIGWINCH to the terminal's foreground process group when it changes.
pub(super) fn set_window_size(master: &OwnedFd, size: WindowSize) -> io::Result<()> {
    let winsize = size.winsize();
    // SAFETY: TIOCSWINSZ reads one `winsize` from the valid pointer; the fd is open (owned).
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new pseudo-terminal of `size`: (master, slave), both close-on-exec.
fn open_pty(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let winsize = size.winsize();
    // SAFETY: openpty writes two fds into the valid pointers; a null name and termios are
    // allowed (no name is returned, default settings), and `winsize` is read only.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both fds are open and nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own; F_SETFD takes an int flag.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

/// Makes `command` run on the terminal whose slave side is `slave`: a session of its own, the
/// terminal its controlling terminal and its stdin, stdout and stderr.
fn attach_to_pty(command: &mut Command, slave: &OwnedFd, request: &ExecRequest) -> io::Result<()> {
    // The terminal belongs to the user who runs on it (as a login would do it).
    if let Some(uid) = request.uid {
        let gid = request.gid.map_or(u32::MAX, |gid| gid as libc::gid_t);
        // SAFETY: fchown on an fd we own; -1 (u32::MAX) leaves the group as it is.
        if unsafe { libc::fchown(slave.as_raw_fd(), uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    command
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave.try_clone()?);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (setsid, ioctl) without allocating.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // stdin is the slave by now: make it the session's controlling terminal.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Spawns, streams and waits for one command (on a new terminal of `pty`'s size if given).
pub(super) fn run_exec(
    conn: &Arc<Conn>,
    id: u64,
    request: &ExecRequest,
    entry: &Arc<ExecEntry>,
    stdin: StdinFeed,
    credit: &Arc<Credit>,
    pty: Option<WindowSize>,
) -> Result<ExitStatus, RemoteError> {
    let mut command = build_command(request, !stdin.inline.is_empty(), pty.is_some())?;
    let program = &request.argv[0];
    // A terminal: its master side is the command's stdin (`terminal_input`) and its only
    // output (`terminal_output`); `master` stays for `Resize`.
    let mut master = None;
    let mut terminal_input = None;
    let mut terminal_output = None;
    if let Some(size) = pty {
        let setup = |err: io::Error| RemoteError::from_io("set up a pseudo-terminal", &err);
        let (master_fd, slave) = open_pty(size).map_err(setup)?;
        attach_to_pty(&mut command, &slave, request).map_err(setup)?;
        let term_given = request.env.iter().any(|(key, _)| key == "TERM")
            || (request.inherit_env && std::env::var_os("TERM").is_some());
        if !term_given {
            command.env("TERM", PTY_DEFAULT_TERM);
        }
        terminal_input = Some(std::fs::File::from(master_fd.try_clone().map_err(setup)?));
        terminal_output = Some(std::fs::File::from(master_fd.try_clone().map_err(setup)?));
        master = Some(Arc::new(master_fd));
        // `slave` closes here; the command holds its copies.
    }
    let spawned = spawn_owned(&mut command);
    // The parent's copies of the slave (inside `command`) must close, or reading the master
    // never ends.
    drop(command);
    let mut child =
        spawned.map_err(|err| RemoteError::from_io(format!("cannot execute {program:?}"), &err))?;
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
    if let Some(master) = &master {
        *lock(&entry.pty) = Some(master.clone());
    }
    conn.send(id, ResponseBody::Started { pid });

    let input: Option<Box<dyn Write + Send>> = match (child.stdin.take(), terminal_input) {
        (Some(pipe), _) => Some(Box::new(pipe)),
        (None, Some(terminal)) => Some(Box::new(terminal)),
        (None, None) => None,
    };
    if let Some(input) = input {
        let conn = conn.clone();
        if let Err(err) = spawn_thread(format!("stdin-{id}"), move || {
            feed_stdin(&conn, input, stdin)
        }) {
            eprintln!("ember-agent: exec {id}: {err}; its stdin is closed");
        }
    }
    let (done_tx, done_rx) = mpsc::channel();
    let pump_state = Arc::new(PumpState::default());
    let mut pumps = 0;
    if let Some(output) = terminal_output {
        pumps += 1;
        start_pump(conn, id, output, true, credit, &pump_state, done_tx.clone());
    }
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
    lock(&entry.pty).take();
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
    pty: bool,
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
    if pty {
        // Its own session (set up by the caller), which is also its own process group; its
        // stdio is the terminal.
        return Ok(command);
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

pub(super) fn feed_stdin(conn: &Conn, mut child_stdin: impl Write, mut feed: StdinFeed) {
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
