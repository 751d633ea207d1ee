//! The host↔guest protocol, shared by the agent ([`crate::server`]) and the host
//! ([`crate::client`]).
//!
//! # Framing
//!
//! Every message is one frame: a `u32` little-endian payload length, then the payload, a
//! [`Request`] (host → guest) or a [`Response`] (guest → host) serialized with `postcard`.
//! Payloads are at most [`MAX_FRAME_LEN`] bytes; a reader rejects a longer length before
//! allocating anything ([`FrameError::TooLarge`]) and a stream that ends inside a frame
//! ([`FrameError::Truncated`]). Neither can be resynchronised, so both end the connection; a
//! frame of the right length whose payload does not decode is answered with an
//! [`ErrorKind::Protocol`] error and the connection goes on.
//!
//! # Requests and ids
//!
//! Every frame carries an `id: u64` chosen by the client; every response to a request carries
//! the request's id, so many requests can be in flight on one connection. A request gets any
//! number of intermediate responses and then exactly one final one ([`ResponseBody::is_final`]):
//! `Hello`, `Exited`, `Done`, `StatResult`, `Listing`, `Entry`, `Extracted` or `Error`.
//! Follow-up frames of a streaming request (`Stdin`, `StdinClose`, `FileData`, `FileEnd`,
//! `Ack`) reuse the id of the request they belong to.
//!
//! # Flow control
//!
//! Each direction of a stream has a window of [`STREAM_WINDOW`] bytes: a sender may have at
//! most that many data bytes (`Stdin`/`FileData` from the host, `Stdout`/`Stderr`/`FileChunk`
//! from the guest, and each `Watch` event's [`watch_event_cost`]) sent and not yet
//! acknowledged, and the receiver acknowledges what it has
//! consumed with `Ack { bytes }` frames carrying the stream's id. Memory stays bounded on both
//! sides however large a file or an output is, and a command that does not read its stdin
//! cannot block the connection for the other requests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change of the types below.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 52;

/// Largest data chunk in one frame (`Stdout`, `Stderr`, `FileChunk`, `Stdin`, `FileData`).
pub const MAX_CHUNK: usize = 64 * 1024;

/// Largest payload of one frame: 1 MiB of data (inline stdin) plus room for the rest.
pub const MAX_FRAME_LEN: usize = 1024 * 1024 + 64 * 1024;

/// Unacknowledged data bytes a sender may have in flight on one stream.
pub const STREAM_WINDOW: u64 = 1024 * 1024;

/// A receiver acknowledges once it has consumed this many unacknowledged bytes.
pub const ACK_THRESHOLD: u64 = STREAM_WINDOW / 4;

/// Largest `entropy` a [`RequestBody::Resync`] may carry.
pub const MAX_RESYNC_ENTROPY: usize = 512;

/// The capability (in `Hello`) of an agent that handles [`RequestBody::Resync`]. Agents
/// without it (older ones, e.g. inside an older snapshot) cannot decode that request and
/// answer it with an [`ErrorKind::Protocol`] error.
pub const CAP_RESYNC: &str = "resync";

/// The capability (in `Hello`) of an agent that handles the files requests added after
/// `Resync`: [`RequestBody::ListDir`], `Lstat`, `Remove`, `Rename`, `ReadTar`, `WriteTar`,
/// `Watch` and `Cancel`. Older agents answer them with an [`ErrorKind::Protocol`] error.
pub const CAP_FILES: &str = "files";

mod files;
pub use files::{
    watch_event_cost, DirEntry, TarSummary, WatchEvent, WatchKind, MAX_LIST_BYTES, MAX_LIST_ENTRIES,
};
/// The capability (in `Hello`) of an agent that handles [`RequestBody::ExecPty`] and
/// [`RequestBody::Resize`]. Older agents cannot decode them.
pub const CAP_PTY: &str = "pty";

/// The `TERM` a command on a pseudo-terminal gets unless its environment sets one.
pub const PTY_DEFAULT_TERM: &str = "xterm-256color";

/// A frame from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Handshake; answered with [`ResponseBody::Hello`].
    Hello {
        protocol_version: u32,
        client: String,
    },
    /// Runs a command: `Started`, then `Stdout`/`Stderr`, then `Exited` (or one `Error`).
    Exec(ExecRequest),
    /// More stdin for the running exec with this frame's id.
    Stdin {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Closes the stdin of the exec with this frame's id.
    StdinClose,
    /// Sends `signal` to the process group of the exec whose request id is `target`.
    /// Answered with `Done` or `Error` under this frame's own id.
    Kill { target: u64, signal: i32 },
    /// Creates or truncates `path` with permission bits `mode`; the content follows in
    /// `FileData` frames, then `FileEnd`. Answered with `Done` (or `Error`, possibly early).
    WriteFile {
        path: String,
        mode: u32,
        create_parents: bool,
    },
    /// Content for the `WriteFile` with this frame's id.
    FileData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of the content of the `WriteFile` with this frame's id.
    FileEnd,
    /// Streams `path` back as `FileChunk`s, then `Done`.
    ReadFile { path: String },
    /// `mkdir -p path` with permission bits `mode` for the directories it creates.
    Mkdir { path: String, mode: u32 },
    /// Answered with `StatResult` (symlinks are followed).
    Stat { path: String },
    /// Syncs, remounts / read-only and resets the guest, after answering `Done`.
    Shutdown,
    /// The host consumed `bytes` of the output stream (`Stdout`/`Stderr`/`FileChunk`) with
    /// this frame's id.
    Ack { bytes: u64 },
    /// After a restore (every clone of a snapshot wakes up with the same clock and the same
    /// RNG state): sets the guest's wall clock (`CLOCK_REALTIME`) to `unix_time_ns`, then
    /// mixes `entropy` (at most [`MAX_RESYNC_ENTROPY`] bytes) into the kernel's RNG,
    /// crediting 8 bits per byte, and reseeds it. Answered with `Done` (`bytes`: the entropy
    /// bytes mixed in) or an `Error` that says which step failed. Needs [`CAP_RESYNC`]; new
    /// variants go last so the older ones keep their encoding.
    Resync {
        unix_time_ns: u64,
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
    },
    /// The entries of the directory `path` (symlinks in it not followed), at most `limit`
    /// (and at most [`MAX_LIST_ENTRIES`] and [`MAX_LIST_BYTES`]): answered with `Listing`.
    /// Needs [`CAP_FILES`], as do all the requests below.
    ListDir { path: String, limit: u32 },
    /// `path` itself, a symlink not followed: answered with `Entry`.
    Lstat { path: String },
    /// Removes `path`: a file or symlink, an empty directory, or with `recursive` a
    /// directory and everything under it (symlinks are removed, never followed). `/` is
    /// refused. Answered with `Done` (`bytes`: 0).
    Remove { path: String, recursive: bool },
    /// Renames `from` to `to` (one `rename(2)`); without `overwrite` an existing `to` is
    /// refused (`AlreadyExists`). Answered with `Done`.
    Rename {
        from: String,
        to: String,
        overwrite: bool,
    },
    /// Streams the directory `path` as a tar archive (paths relative to it; symlinks kept
    /// as symlinks) in `FileChunk`s under the window, then `Done` (`bytes`: the archive's
    /// length). `Cancel` ends it early.
    ReadTar { path: String },
    /// Extracts a tar archive, sent in `FileData` frames and ended by `FileEnd`, under the
    /// directory `path` (created with its parents if missing). Entries may not leave it
    /// (`..`, absolute paths, writing through a symlink are refused). Answered with
    /// `Extracted` (or an `Error` naming the entry that failed, possibly early).
    WriteTar { path: String },
    /// Watches the directory `path` (and with `recursive` the directories under it) with
    /// inotify: a `WatchEvent` of kind `Watching` once the watch is set up, then one per
    /// change, under the window (see [`watch_event_cost`]); events that do not fit are
    /// dropped and counted in an `Overflow` event. Ends with `Done` after `Cancel`, when
    /// `path` goes away, or when the connection closes.
    Watch { path: String, recursive: bool },
    /// Ends the `ReadTar` or `Watch` whose request id is `target`. Answered with `Done` (or
    /// `NotFound`) under this frame's own id.
    Cancel { target: u64 },
    // --- Interactive terminals (capability [`CAP_PTY`]): keep these two together, after
    // every older variant, so those keep their encoding. ---
    /// Runs a command on a new pseudo-terminal of `cols` x `rows`: the command leads a session
    /// of its own with the terminal as its controlling terminal and its stdin, stdout and
    /// stderr (`exec.stdin_stream` is implied; `TERM` is [`PTY_DEFAULT_TERM`] unless `env`
    /// sets it). Answered as `Exec`: `Started`, `Stdout` (all the terminal's output, under
    /// the same window and `Ack`s), then `Exited`; input comes in `Stdin` frames.
    ExecPty {
        exec: ExecRequest,
        cols: u16,
        rows: u16,
    },
    /// Sets the window size of the terminal of the `ExecPty` whose request id is `target`
    /// (the kernel sends its foreground process group SIGWINCH). Answered with `Done` or
    /// `Error` under this frame's own id.
    Resize { target: u64, cols: u16, rows: u16 },
}

/// The environment a command gets from ember's hosts (the CLI and the service) unless the
/// request adds to it: a login-like `PATH`, root's home, a UTF-8 locale, a dumb terminal.
pub const DEFAULT_COMMAND_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// What to run and how. Only `argv` is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments. A program without `/` is looked up in the `PATH` of
    /// `env` (or `/bin:/usr/bin` when `env` has none).
    pub argv: Vec<String>,
    /// The command's whole environment: nothing else is passed unless `inherit_env`.
    pub env: Vec<(String, String)>,
    /// Starts from the agent's own environment, with `env` applied over it.
    pub inherit_env: bool,
    /// Working directory; `/` when absent.
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Written to stdin first (at most about 1 MiB: it travels in the `Exec` frame).
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    /// More stdin follows in `Stdin` frames until `StdinClose`; otherwise stdin is closed
    /// after `stdin`.
    pub stdin_stream: bool,
    /// Kills the process group and reports `TimedOut` after this long.
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request for `argv` with an empty environment and no stdin.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// `sh -c script` with `PATH` set to the usual directories.
    pub fn shell(script: &str) -> Self {
        let mut request = Self::new(["/bin/sh", "-c", script]);
        request.env.push((
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ));
        request
    }
}

/// A frame from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub body: ResponseBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Hello {
        agent_version: String,
        protocol_version: u32,
        capabilities: Vec<String>,
    },
    Started {
        pid: u32,
    },
    Stdout {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Exited {
        status: ExitStatus,
    },
    FileChunk {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Success of `WriteFile` (with the bytes written), `ReadFile` (bytes read), `Mkdir`,
    /// `Kill` and `Shutdown` (0).
    Done {
        bytes: u64,
    },
    StatResult(FileStat),
    Error(RemoteError),
    /// The agent consumed `bytes` of the input stream (`Stdin`/`FileData`) with this id.
    Ack {
        bytes: u64,
    },
    /// The answer to `ListDir`: entries sorted by name; `truncated` when the directory had
    /// more than the limits allowed. New variants go last (see `RequestBody::Resync`).
    Listing {
        entries: Vec<DirEntry>,
        truncated: bool,
    },
    /// The answer to `Lstat`.
    Entry(DirEntry),
    /// The answer to `WriteTar`: what was extracted.
    Extracted(TarSummary),
    /// A change under a `Watch` (not final).
    Watch(WatchEvent),
}

impl ResponseBody {
    /// Whether this is the last response to its request.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Hello { .. }
                | Self::Exited { .. }
                | Self::Done { .. }
                | Self::StatResult(_)
                | Self::Error(_)
                | Self::Listing { .. }
                | Self::Entry(_)
                | Self::Extracted(_)
        )
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// `timeout_ms` passed; the process group was killed.
    TimedOut,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == Self::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
            Self::TimedOut => write!(f, "timed out"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    /// Permission bits and the file type bits, as `st_mode`.
    pub mode: u32,
    pub file_type: FileType,
    /// Seconds and nanoseconds since the epoch.
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    InvalidInput,
    TooLarge,
    Io,
    /// A frame that does not decode, or a request that breaks the protocol's rules.
    Protocol,
}

/// An error reported by the agent. Errors are values: every request ends with a final
/// response, this one when it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub errno: Option<i32>,
    pub message: String,
}

impl RemoteError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            errno: None,
            message: message.into(),
        }
    }

    /// Classifies an I/O error; `what` says what failed, e.g. `open "/etc/x"`.
    pub fn from_io(what: impl std::fmt::Display, err: &io::Error) -> Self {
        let errno = err.raw_os_error();
        let kind = match errno {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                ErrorKind::PermissionDenied
            }
            Some(libc::EEXIST) => ErrorKind::AlreadyExists,
            Some(libc::EINVAL) | Some(libc::EISDIR) | Some(libc::ENAMETOOLONG) => {
                ErrorKind::InvalidInput
            }
            Some(libc::EFBIG) | Some(libc::E2BIG) => ErrorKind::TooLarge,
            _ => match err.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                _ => ErrorKind::Io,
            },
        };
        Self {
            kind,
            errno,
            message: format!("{what}: {err}"),
        }
    }
}

/// Reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge { len: usize },
    #[error("stream ended inside a frame: got {got} of {expected} bytes")]
    Truncated { got: usize, expected: usize },
    #[error("frame payload does not decode: {0}")]
    Decode(postcard::Error),
    #[error("cannot encode a frame: {0}")]
    Encode(postcard::Error),
    #[error("frame I/O: {0}")]
    Io(#[from] io::Error),
}

/// Serializes `message` into one frame (length prefix included).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = postcard::to_extend(message, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len })?;
    frame[..4].copy_from_slice(&prefix.to_le_bytes());
    Ok(frame)
}

/// Writes `message` as one frame and flushes.
pub fn write_frame<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame's payload: `Ok(None)` on a clean end of stream (between frames).
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let got = read_full(reader, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < prefix.len() {
        return Err(FrameError::Truncated { got, expected: 4 });
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated { got, expected: len });
    }
    Ok(Some(payload))
}

/// Decodes a payload read by [`read_frame`].
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// The id of a payload whose body does not decode, when at least the id does (it comes
/// first), so the error can be answered to the right request.
pub fn decode_id(payload: &[u8]) -> Option<u64> {
    postcard::take_from_bytes::<u64>(payload)
        .ok()
        .map(|(id, _)| id)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(got)
}

/// A byte stream that can be split into a reading and a writing half and shut down from
/// either: what the server and the client run over.
pub trait Transport: Read + Write + Send + Sized + 'static {
    /// Another handle to the same stream (e.g. `dup`).
    fn try_clone_transport(&self) -> io::Result<Self>;
    /// Shuts both directions down, waking a thread blocked reading.
    fn shutdown_transport(&self) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn try_clone_transport(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_transport(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Both)
    }
}

impl Transport for std::net::TcpStream {
    fn try_clone_transport(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_transport(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Both)
    }
}

/// Sender-side accounting of a stream's window (see the module docs).
#[derive(Debug, Default)]
pub struct Credit {
    state: std::sync::Mutex<CreditState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct CreditState {
    in_flight: u64,
    closed: bool,
}

impl Credit {
    /// Waits until `bytes` more fit in the window and takes them; `false` once closed.
    pub fn acquire(&self, bytes: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if state.closed {
                return false;
            }
            if state.in_flight == 0 || state.in_flight + bytes <= STREAM_WINDOW {
                state.in_flight += bytes;
                return true;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes `bytes` if they fit in the window now; `false` otherwise or once closed.
    pub fn try_acquire(&self, bytes: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.closed || (state.in_flight != 0 && state.in_flight + bytes > STREAM_WINDOW) {
            return false;
        }
        state.in_flight += bytes;
        true
    }

    /// As [`Credit::acquire`], giving up after `patience`: `None` when the window stayed full
    /// that long.
    pub fn acquire_within(&self, bytes: u64, patience: std::time::Duration) -> Option<bool> {
        let deadline = std::time::Instant::now() + patience;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if state.closed {
                return Some(false);
            }
            if state.in_flight == 0 || state.in_flight + bytes <= STREAM_WINDOW {
                state.in_flight += bytes;
                return Some(true);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The receiver acknowledged `bytes`.
    pub fn release(&self, bytes: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight = state.in_flight.saturating_sub(bytes);
        self.changed.notify_all();
    }

    /// The stream ended: wakes and fails every waiter.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn frames_round_trip() {
        let request = Request {
            id: 7,
            body: RequestBody::Exec(ExecRequest {
                argv: vec!["echo".into(), "héllo wörld".into()],
                env: vec![("A".into(), "b".into())],
                stdin: vec![0, 255, 10],
                timeout_ms: Some(5),
                ..ExecRequest::default()
            }),
        };
        let mut bytes = encode_frame(&request).unwrap();
        bytes.extend(encode_frame(&request).unwrap());
        let mut reader = &bytes[..];
        for _ in 0..2 {
            let payload = read_frame(&mut reader).unwrap().unwrap();
            assert_eq!(decode::<Request>(&payload).unwrap(), request);
            assert_eq!(decode_id(&payload), Some(7));
        }
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn resync_round_trips_and_older_requests_keep_their_encoding() {
        let request = Request {
            id: 42,
            body: RequestBody::Resync {
                unix_time_ns: 1_700_000_000_123_456_789,
                entropy: (0..=255u8).chain(0..=255u8).collect(),
            },
        };
        let frame = encode_frame(&request).unwrap();
        let payload = read_frame(&mut &frame[..]).unwrap().unwrap();
        assert_eq!(decode::<Request>(&payload).unwrap(), request);
        assert_eq!(decode_id(&payload), Some(42));
        // The entropy travels as bytes: 512 of them plus a few bytes of framing.
        assert!(payload.len() < MAX_RESYNC_ENTROPY + 24, "{}", payload.len());
        // Adding Resync last left every older request's encoding (its variant index) alone:
        // `Shutdown` is still variant 11 and `Ack` 12, as an older agent expects.
        let shutdown = encode_frame(&Request {
            id: 1,
            body: RequestBody::Shutdown,
        })
        .unwrap();
        assert_eq!(&shutdown[4..], &[1, 11]);
        let ack = encode_frame(&Request {
            id: 1,
            body: RequestBody::Ack { bytes: 5 },
        })
        .unwrap();
        assert_eq!(&ack[4..], &[1, 12, 5]);
        assert_eq!(payload[1], 13);
        // The terminal requests come after Resync and the files requests (14-21).
        let resize = encode_frame(&Request {
            id: 1,
            body: RequestBody::Resize {
                target: 2,
                cols: 3,
                rows: 4,
            },
        })
        .unwrap();
        assert_eq!(&resize[4..], &[1, 23, 2, 3, 4]);
    }

    #[test]
    fn oversized_frames_are_rejected_before_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        let err = read_frame(&mut &bytes[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len } if len == u32::MAX as usize));
        let just_over = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &just_over[..]),
            Err(FrameError::TooLarge { .. })
        ));
        // And the encoder refuses to produce one.
        let huge = Response {
            id: 1,
            body: ResponseBody::Stdout {
                data: vec![0; MAX_FRAME_LEN + 1],
            },
        };
        assert!(matches!(
            encode_frame(&huge),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_frames_are_rejected() {
        // Inside the length prefix.
        let err = read_frame(&mut &[1u8, 0][..]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                got: 2,
                expected: 4
            }
        ));
        // Inside the payload.
        let mut frame = encode_frame(&Request {
            id: 1,
            body: RequestBody::Shutdown,
        })
        .unwrap();
        frame.pop();
        let err = read_frame(&mut &frame[..]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("ended inside a frame"));
    }

    #[test]
    fn malformed_payloads_are_decode_errors() {
        for payload in [
            &[][..],
            &[5][..],
            &[5, 200][..],
            &[5, 0, 0xff, 0xff, 0xff][..],
        ] {
            let bytes = frame_of(payload);
            let payload = read_frame(&mut &bytes[..]).unwrap().unwrap();
            assert!(matches!(
                decode::<Request>(&payload),
                Err(FrameError::Decode(_))
            ));
        }
        // A lying length inside the payload does not allocate it.
        let payload = [1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode::<Request>(&payload).is_err());
        assert_eq!(decode_id(&[5, 200]), Some(5));
        assert_eq!(decode_id(&[]), None);
    }

    #[test]
    fn data_travels_as_bytes_not_as_a_sequence() {
        let chunk = Response {
            id: 1,
            body: ResponseBody::Stdout {
                data: vec![0xff; MAX_CHUNK],
            },
        };
        let frame = encode_frame(&chunk).unwrap();
        assert!(frame.len() <= MAX_CHUNK + 16, "{} bytes", frame.len());
    }

    #[test]
    fn credit_blocks_at_the_window_and_fails_when_closed() {
        let credit = std::sync::Arc::new(Credit::default());
        assert!(credit.acquire(STREAM_WINDOW));
        let waiter = {
            let credit = credit.clone();
            std::thread::spawn(move || credit.acquire(10))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        credit.release(100);
        assert!(waiter.join().unwrap());
        credit.close();
        assert!(!credit.acquire(1));
    }
}
