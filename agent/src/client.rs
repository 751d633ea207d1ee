//! The host's side of the protocol: [`AgentClient`].
//!
//! One client is one connection. A background thread reads every response and hands it to
//! the request with its id, so any number of threads can run requests at once through
//! `&AgentClient` (it is `Send + Sync`). Requests that stream data (exec output, files) move
//! it in chunks under the protocol's windows: neither side holds more than a window per
//! stream.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::{
    decode, encode_frame, read_frame, Credit, ErrorKind, ExecRequest, ExitStatus, FileStat,
    FrameError, RemoteError, Request, RequestBody, Response, ResponseBody, Transport,
    ACK_THRESHOLD, CAP_RESYNC, MAX_CHUNK, MAX_RESYNC_ENTROPY, PROTOCOL_VERSION, STREAM_WINDOW,
};

mod connect;

/// Entropy bytes [`AgentClient::resync_now`] sends.
pub const RESYNC_ENTROPY_BYTES: usize = 64;

/// How long the vsock device's `CONNECT`/`OK` exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The request id of [`AgentClient::handshake_uds`]'s hello (an adopted client's requests
/// count on from it).
const HANDSHAKE_HELLO_ID: u64 = 1;

/// Default limit for requests that answer at once (hello, stat, mkdir, kill, shutdown).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VM's vsock socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vsock handshake on {path} for port {port}: {reason}")]
    Handshake {
        path: PathBuf,
        port: u32,
        reason: String,
    },
    #[error("the agent did not answer {what} within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent connection: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent connection is closed: {0}")]
    Disconnected(String),
    #[error("agent: {0}")]
    Remote(#[from] RemoteError),
    #[error("the agent speaks protocol version {agent}, this client version {client}")]
    Version { agent: u32, client: u32 },
    #[error("unexpected response to {request}: {response}")]
    Unexpected {
        request: &'static str,
        response: String,
    },
    #[error("{what}: {source}")]
    Local { what: String, source: io::Error },
    #[error(
        "the agent (version {agent_version}) cannot {what}: it lacks the {capability:?} capability"
    )]
    Unsupported {
        what: &'static str,
        capability: &'static str,
        agent_version: String,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Which output stream a chunk of exec output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// What `hello` learned about the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInfo {
    pub agent_version: String,
    pub protocol_version: u32,
    pub capabilities: Vec<String>,
}

/// The result of [`AgentClient::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A connection to the agent.
pub struct AgentClient {
    inner: Arc<Inner>,
    reader: Mutex<Option<JoinHandle<()>>>,
    shutdown: Box<dyn Fn() + Send + Sync>,
    request_timeout: Duration,
    /// What the agent said of itself in the last `hello` (none before it).
    info: Mutex<Option<AgentInfo>>,
}

struct Inner {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
    /// The last error the agent reported for no request (id 0).
    connection_error: Option<RemoteError>,
}

struct Slot {
    tx: Sender<ResponseBody>,
    /// The window of this request's input stream (stdin, file content).
    credit: Arc<Credit>,
    /// Output bytes (stdout, stderr, file content) handed to the request and not consumed
    /// yet: an agent that honours the window never has more than [`STREAM_WINDOW`] of them
    /// outstanding, so more means it ignored flow control.
    unconsumed: Arc<AtomicU64>,
}

/// A request's side of its stream: its id, what the agent answers, and both windows.
struct Registered {
    id: u64,
    rx: Receiver<ResponseBody>,
    credit: Arc<Credit>,
    unconsumed: Arc<AtomicU64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn send(&self, id: u64, body: RequestBody) -> Result<()> {
        let frame = encode_frame(&Request { id, body })?;
        let mut writer = lock(&self.writer);
        writer.write_all(&frame)?;
        writer.flush()?;
        Ok(())
    }

    fn register(&self) -> Result<Registered> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new(Credit::default());
        let unconsumed = Arc::new(AtomicU64::new(0));
        let mut pending = lock(&self.pending);
        if let Some(reason) = &pending.closed {
            return Err(ClientError::Disconnected(reason.clone()));
        }
        pending.slots.insert(
            id,
            Slot {
                tx,
                credit: credit.clone(),
                unconsumed: unconsumed.clone(),
            },
        );
        Ok(Registered {
            id,
            rx,
            credit,
            unconsumed,
        })
    }

    fn unregister(&self, id: u64) {
        if let Some(slot) = lock(&self.pending).slots.remove(&id) {
            slot.credit.close();
        }
    }

    fn disconnected(&self) -> ClientError {
        let pending = lock(&self.pending);
        let mut reason = pending
            .closed
            .clone()
            .unwrap_or_else(|| "request abandoned".to_string());
        if let Some(err) = &pending.connection_error {
            reason = format!("{reason} (the agent reported: {err})");
        }
        ClientError::Disconnected(reason)
    }

    /// The background reader: hands each response to its request.
    fn read_responses(&self, mut reader: impl Read) {
        let reason = loop {
            let payload = match read_frame(&mut reader) {
                Ok(Some(payload)) => payload,
                Ok(None) => break "the agent closed the connection".to_string(),
                Err(err) => break err.to_string(),
            };
            let response: Response = match decode(&payload) {
                Ok(response) => response,
                Err(err) => break format!("malformed response from the agent: {err}"),
            };
            let mut pending = lock(&self.pending);
            match response.body {
                ResponseBody::Ack { bytes } => {
                    if let Some(slot) = pending.slots.get(&response.id) {
                        slot.credit.release(bytes);
                    }
                }
                ResponseBody::Error(err) if response.id == 0 => {
                    pending.connection_error = Some(err);
                }
                body if body.is_final() => {
                    if let Some(slot) = pending.slots.remove(&response.id) {
                        slot.credit.close();
                        slot.tx.send(body).ok();
                    }
                }
                body => {
                    let Some(slot) = pending.slots.get(&response.id) else {
                        continue;
                    };
                    let held = output_len(&body)
                        .map(|len| slot.unconsumed.fetch_add(len, Ordering::Relaxed) + len);
                    match held {
                        Some(held) if held > STREAM_WINDOW => {
                            // The stream is closed: what the agent sends for it from now on
                            // is read and dropped, never kept.
                            if let Some(slot) = pending.slots.remove(&response.id) {
                                slot.credit.close();
                                let err = RemoteError::new(
                                    ErrorKind::Protocol,
                                    format!(
                                        "the agent sent {held} bytes on stream {} that were not \
                                         acknowledged, beyond its {STREAM_WINDOW}-byte window: \
                                         the stream was closed",
                                        response.id
                                    ),
                                );
                                slot.tx.send(ResponseBody::Error(err)).ok();
                            }
                        }
                        _ => {
                            slot.tx.send(body).ok();
                        }
                    }
                }
            }
        };
        let mut pending = lock(&self.pending);
        pending.closed = Some(reason);
        for (_, slot) in pending.slots.drain() {
            slot.credit.close();
        }
    }
}

/// The data bytes of an output frame.
fn output_len(body: &ResponseBody) -> Option<u64> {
    match body {
        ResponseBody::Stdout { data }
        | ResponseBody::Stderr { data }
        | ResponseBody::FileChunk { data } => Some(data.len() as u64),
        _ => None,
    }
}

/// Acknowledges consumed output in batches (see `protocol`).
struct OutputAcker {
    id: u64,
    unacked: u64,
    unconsumed: Arc<AtomicU64>,
}

impl OutputAcker {
    fn new(stream: &Registered) -> OutputAcker {
        OutputAcker {
            id: stream.id,
            unacked: 0,
            unconsumed: stream.unconsumed.clone(),
        }
    }

    fn consumed(&mut self, inner: &Inner, bytes: usize) {
        let _ = self
            .unconsumed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(bytes as u64))
            });
        self.unacked += bytes as u64;
        if self.unacked >= ACK_THRESHOLD {
            // A failed send means the connection is gone; the next receive reports it.
            inner
                .send(
                    self.id,
                    RequestBody::Ack {
                        bytes: self.unacked,
                    },
                )
                .ok();
            self.unacked = 0;
        }
    }
}

fn unexpected(request: &'static str, body: &ResponseBody) -> ClientError {
    let mut response = format!("{body:?}");
    response.truncate(200);
    ClientError::Unexpected { request, response }
}

impl AgentClient {
    /// A client over an already connected stream (e.g. one end of a `UnixStream` pair).
    pub fn new<S: Transport>(stream: S) -> Result<Self> {
        Self::over(stream, 1)
    }

    /// A client over `stream`, on which a [`handshake_uds`](Self::handshake_uds) already
    /// said hello (possibly in another process, which passed the connection on): the first
    /// request is not a round trip of its own.
    pub fn adopt(stream: UnixStream, info: AgentInfo) -> Result<Self> {
        let client = Self::over(stream, HANDSHAKE_HELLO_ID + 1)?;
        *lock(&client.info) = Some(info);
        Ok(client)
    }

    fn over<S: Transport>(stream: S, first_id: u64) -> Result<Self> {
        let reader = stream.try_clone_transport()?;
        let closer = Mutex::new(stream.try_clone_transport()?);
        let inner = Arc::new(Inner {
            writer: Mutex::new(Box::new(stream)),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(first_id),
        });
        let reader_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("agent-client-reader".to_string())
            .spawn(move || {
                reader_inner.read_responses(BufReader::with_capacity(MAX_CHUNK, reader))
            })?;
        Ok(Self {
            inner,
            reader: Mutex::new(Some(handle)),
            shutdown: Box::new(move || {
                lock(&closer).shutdown_transport().ok();
            }),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            info: Mutex::new(None),
        })
    }

    /// Limit for requests that answer at once (not exec, read_file or write_file).
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// The next response of request `id`, waiting at most the request timeout (a silent
    /// agent costs the caller that long, never more); on timeout the request is abandoned.
    fn next_response(
        &self,
        what: &str,
        id: u64,
        rx: &Receiver<ResponseBody>,
    ) -> Result<ResponseBody> {
        match rx.recv_timeout(self.request_timeout) {
            Ok(body) => Ok(body),
            Err(RecvTimeoutError::Timeout) => {
                self.inner.unregister(id);
                Err(ClientError::Timeout {
                    what: format!("{what} (request {id})"),
                    timeout: self.request_timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.inner.disconnected()),
        }
    }

    /// Sends a request and waits for its one final response.
    fn call(&self, what: &'static str, body: RequestBody) -> Result<ResponseBody> {
        let Registered { id, rx, .. } = self.inner.register()?;
        if let Err(err) = self.inner.send(id, body) {
            self.inner.unregister(id);
            return Err(err);
        }
        match self.next_response(what, id, &rx)? {
            ResponseBody::Error(err) => Err(ClientError::Remote(err)),
            body => Ok(body),
        }
    }

    /// The handshake: checks the protocol version and returns what the agent says of itself.
    pub fn hello(&self) -> Result<AgentInfo> {
        let info = Self::check_hello(self.call("hello", Self::hello_request())?)?;
        *lock(&self.info) = Some(info.clone());
        Ok(info)
    }

    fn hello_request() -> RequestBody {
        RequestBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: format!("ember-agent-client {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// What a hello's answer says of the agent, if it speaks this client's protocol.
    fn check_hello(body: ResponseBody) -> Result<AgentInfo> {
        match body {
            ResponseBody::Hello {
                agent_version,
                protocol_version,
                capabilities,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(ClientError::Version {
                        agent: protocol_version,
                        client: PROTOCOL_VERSION,
                    });
                }
                Ok(AgentInfo {
                    agent_version,
                    protocol_version,
                    capabilities,
                })
            }
            other => Err(unexpected("hello", &other)),
        }
    }

    /// What the agent said of itself in the last [`hello`](Self::hello), if any.
    pub fn agent_info(&self) -> Option<AgentInfo> {
        lock(&self.info).clone()
    }

    /// Fails with [`ClientError::Unsupported`] when `hello` showed that the agent lacks
    /// `capability` (without a `hello`, the agent is asked anyway).
    fn require(&self, capability: &'static str, what: &'static str) -> Result<()> {
        match &*lock(&self.info) {
            Some(info) if !info.capabilities.iter().any(|c| c == capability) => {
                Err(ClientError::Unsupported {
                    what,
                    capability,
                    agent_version: info.agent_version.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// After a restore: sets the guest's wall clock to `unix_time_ns` (nanoseconds since the
    /// epoch) and mixes `entropy` (at most [`MAX_RESYNC_ENTROPY`] bytes, credited in full)
    /// into the guest kernel's RNG, which then reseeds. An agent without [`CAP_RESYNC`] (in
    /// a snapshot taken before it existed) gives [`ClientError::Unsupported`]; a step that
    /// failed in the guest gives a [`ClientError::Remote`] naming it.
    pub fn resync(&self, unix_time_ns: u64, entropy: &[u8]) -> Result<()> {
        if entropy.len() > MAX_RESYNC_ENTROPY {
            return Err(ClientError::InvalidRequest(format!(
                "resync with {} bytes of entropy: at most {MAX_RESYNC_ENTROPY} are allowed",
                entropy.len()
            )));
        }
        self.require(CAP_RESYNC, "resync the clock and RNG")?;
        let body = RequestBody::Resync {
            unix_time_ns,
            entropy: entropy.to_vec(),
        };
        match self.call("resync", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("resync", &other)),
        }
    }

    /// [`resync`](Self::resync) with the host's current time and
    /// [`RESYNC_ENTROPY_BYTES`] bytes from the host's `/dev/urandom`.
    pub fn resync_now(&self) -> Result<()> {
        let (unix_time_ns, entropy) = Self::host_time_and_entropy()?;
        self.resync(unix_time_ns, &entropy)
    }

    /// As [`resync_now`](Self::resync_now), without waiting for the answer: the agent
    /// handles a resync before the next request on the same connection, so the requests
    /// sent after this one already see the new clock and entropy, and no round trip is
    /// spent on it. A failure in the guest is logged when its answer comes.
    pub fn resync_now_pipelined(&self) -> Result<()> {
        self.require(CAP_RESYNC, "resync the clock and RNG")?;
        let (unix_time_ns, entropy) = Self::host_time_and_entropy()?;
        let Registered { id, rx, .. } = self.inner.register()?;
        let body = RequestBody::Resync {
            unix_time_ns,
            entropy: entropy.to_vec(),
        };
        if let Err(err) = self.inner.send(id, body) {
            self.inner.unregister(id);
            return Err(err);
        }
        let timeout = self.request_timeout;
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("ember-resync".into())
            .spawn(move || match rx.recv_timeout(timeout) {
                Ok(ResponseBody::Done { .. }) => {}
                Ok(ResponseBody::Error(err)) => log::warn!("the guest's resync failed: {err}"),
                Ok(other) => log::warn!("resync: {}", unexpected("resync", &other)),
                Err(_) => inner.unregister(id),
            })
            .map_err(|source| ClientError::Local {
                what: "starting the resync answer's thread".into(),
                source,
            })?;
        Ok(())
    }

    fn host_time_and_entropy() -> Result<(u64, [u8; RESYNC_ENTROPY_BYTES])> {
        let mut entropy = [0u8; RESYNC_ENTROPY_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|source| ClientError::Local {
                what: format!("reading {RESYNC_ENTROPY_BYTES} bytes from /dev/urandom"),
                source,
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| ClientError::InvalidRequest("the host's clock is before 1970".into()))?;
        let unix_time_ns = u64::try_from(now.as_nanos()).map_err(|_| {
            ClientError::InvalidRequest("the host's clock is past the year 2554".into())
        })?;
        Ok((unix_time_ns, entropy))
    }

    /// Starts a command and returns once it runs (or with the reason it could not start,
    /// e.g. [`crate::protocol::ErrorKind::NotFound`] for a missing program).
    pub fn spawn(&self, request: ExecRequest) -> Result<Execution> {
        let stream = self.inner.register()?;
        let Registered { id, .. } = stream;
        if let Err(err) = self.inner.send(id, RequestBody::Exec(request)) {
            self.inner.unregister(id);
            return Err(err);
        }
        match self.next_response("the start of a command", id, &stream.rx)? {
            ResponseBody::Started { pid } => Ok(Execution {
                inner: self.inner.clone(),
                pid,
                stream,
            }),
            ResponseBody::Error(err) => Err(ClientError::Remote(err)),
            other => {
                self.inner.unregister(id);
                Err(unexpected("exec", &other))
            }
        }
    }

    /// Runs a command, handing its output to `on_output` as it comes; each stream's chunks
    /// arrive in order. Stdin is `request.stdin` only (`stdin_stream` is ignored).
    pub fn exec(
        &self,
        mut request: ExecRequest,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus> {
        request.stdin_stream = false;
        self.spawn(request)?.wait(on_output)
    }

    /// Like [`exec`](Self::exec), with stdin streamed from `stdin` (after `request.stdin`)
    /// by a helper thread until its end.
    pub fn exec_with_stdin(
        &self,
        mut request: ExecRequest,
        stdin: impl Read + Send,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus> {
        request.stdin_stream = true;
        let execution = self.spawn(request)?;
        let writer = execution.stdin();
        std::thread::scope(|scope| {
            let feeder = scope.spawn(move || writer.copy_from(stdin));
            let status = execution.wait(on_output);
            let fed = feeder
                .join()
                .unwrap_or_else(|_| Err(ClientError::Disconnected("stdin thread panicked".into())));
            match (status, fed) {
                (Ok(_), Err(err @ ClientError::Local { .. })) => Err(err),
                (status, _) => status,
            }
        })
    }

    /// Runs a command and collects its whole output.
    pub fn exec_collect(&self, request: ExecRequest) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.exec(request, |stream, data| match stream {
            OutputStream::Stdout => stdout.extend_from_slice(data),
            OutputStream::Stderr => stderr.extend_from_slice(data),
        })?;
        Ok(ExecOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Sends `signal` to the process group of the running exec `exec_id`
    /// ([`Execution::id`]).
    pub fn kill(&self, exec_id: u64, signal: i32) -> Result<()> {
        let body = RequestBody::Kill {
            target: exec_id,
            signal,
        };
        match self.call("kill", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("kill", &other)),
        }
    }

    /// Writes `content` to `path` in the guest (created with `mode`, parents created,
    /// truncated if it exists); returns the bytes written.
    pub fn write_file(&self, path: &str, mode: u32, mut content: impl Read) -> Result<u64> {
        let Registered { id, rx, credit, .. } = self.inner.register()?;
        let start = RequestBody::WriteFile {
            path: path.to_string(),
            mode,
            create_parents: true,
        };
        if let Err(err) = self.inner.send(id, start) {
            self.inner.unregister(id);
            return Err(err);
        }
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut local_error = None;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    local_error = Some(err);
                    break;
                }
            };
            // `false`: the agent already answered (an error) or the connection is gone; a
            // window that stays full past the request timeout is a silent agent.
            match credit.acquire_within(n as u64, self.request_timeout) {
                Some(true) => {}
                Some(false) => break,
                None => {
                    self.inner.unregister(id);
                    return Err(ClientError::Timeout {
                        what: format!("room in its window for {path:?} (request {id})"),
                        timeout: self.request_timeout,
                    });
                }
            }
            let data = buf[..n].to_vec();
            if let Err(err) = self.inner.send(id, RequestBody::FileData { data }) {
                self.inner.unregister(id);
                return Err(err);
            }
        }
        self.inner.send(id, RequestBody::FileEnd).ok();
        let result = match self.next_response("the end of a file write", id, &rx) {
            Ok(ResponseBody::Done { bytes }) => Ok(bytes),
            Ok(ResponseBody::Error(err)) => Err(ClientError::Remote(err)),
            Ok(other) => Err(unexpected("write_file", &other)),
            Err(err) => Err(err),
        };
        match local_error {
            Some(source) => Err(ClientError::Local {
                what: format!("reading the content for {path:?} (the guest's file is partial)"),
                source,
            }),
            None => result,
        }
    }

    /// Streams the guest's `path` into `out`; returns the bytes read.
    pub fn read_file(&self, path: &str, mut out: impl Write) -> Result<u64> {
        let stream = self.inner.register()?;
        let id = stream.id;
        if let Err(err) = self.inner.send(
            id,
            RequestBody::ReadFile {
                path: path.to_string(),
            },
        ) {
            self.inner.unregister(id);
            return Err(err);
        }
        let mut acker = OutputAcker::new(&stream);
        let mut local_error = None;
        loop {
            // Each chunk within the request timeout: a file that stops flowing is a silent
            // agent.
            match self.next_response("the next chunk of a file", id, &stream.rx) {
                Ok(ResponseBody::FileChunk { data }) => {
                    if local_error.is_none() {
                        local_error = out.write_all(&data).err();
                    }
                    acker.consumed(&self.inner, data.len());
                }
                Ok(ResponseBody::Done { bytes }) => {
                    return match local_error.or_else(|| out.flush().err()) {
                        Some(source) => Err(ClientError::Local {
                            what: format!("writing the content of {path:?}"),
                            source,
                        }),
                        None => Ok(bytes),
                    };
                }
                Ok(ResponseBody::Error(err)) => return Err(ClientError::Remote(err)),
                Ok(other) => {
                    self.inner.unregister(id);
                    return Err(unexpected("read_file", &other));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `mkdir -p path`; created directories get `mode`.
    pub fn mkdir_p(&self, path: &str, mode: u32) -> Result<()> {
        let body = RequestBody::Mkdir {
            path: path.to_string(),
            mode,
        };
        match self.call("mkdir", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("mkdir", &other)),
        }
    }

    /// Size, mode, type and mtime of `path` (symlinks followed).
    pub fn stat(&self, path: &str) -> Result<FileStat> {
        let body = RequestBody::Stat {
            path: path.to_string(),
        };
        match self.call("stat", body)? {
            ResponseBody::StatResult(stat) => Ok(stat),
            other => Err(unexpected("stat", &other)),
        }
    }

    /// Asks the agent to sync, remount / read-only and reset the guest. Returns once the agent
    /// acknowledged; the connection closes when the guest goes away.
    pub fn shutdown(&self) -> Result<()> {
        match self.call("shutdown", RequestBody::Shutdown)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        (self.shutdown)();
        if let Some(handle) = lock(&self.reader).take() {
            handle.join().ok();
        }
    }
}

/// A running command started by [`AgentClient::spawn`].
pub struct Execution {
    inner: Arc<Inner>,
    pid: u32,
    stream: Registered,
}

impl Execution {
    /// The request id: what [`AgentClient::kill`] takes.
    pub fn id(&self) -> u64 {
        self.stream.id
    }

    /// The command's pid in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that feeds the command's stdin (the request needs `stdin_stream: true`);
    /// usable from another thread while [`wait`](Self::wait) runs.
    pub fn stdin(&self) -> StdinWriter {
        StdinWriter {
            inner: self.inner.clone(),
            id: self.stream.id,
            credit: self.stream.credit.clone(),
        }
    }

    /// Hands the output to `on_output` until the command exits.
    pub fn wait(self, mut on_output: impl FnMut(OutputStream, &[u8])) -> Result<ExitStatus> {
        let mut acker = OutputAcker::new(&self.stream);
        loop {
            match self.stream.rx.recv() {
                Ok(ResponseBody::Stdout { data }) => {
                    on_output(OutputStream::Stdout, &data);
                    acker.consumed(&self.inner, data.len());
                }
                Ok(ResponseBody::Stderr { data }) => {
                    on_output(OutputStream::Stderr, &data);
                    acker.consumed(&self.inner, data.len());
                }
                Ok(ResponseBody::Exited { status }) => return Ok(status),
                Ok(ResponseBody::Error(err)) => return Err(ClientError::Remote(err)),
                Ok(other) => {
                    self.inner.unregister(self.stream.id);
                    return Err(unexpected("exec", &other));
                }
                Err(_) => return Err(self.inner.disconnected()),
            }
        }
    }
}

/// Feeds a running command's stdin. Cheap to clone; closing it once closes the stdin.
#[derive(Clone)]
pub struct StdinWriter {
    inner: Arc<Inner>,
    id: u64,
    credit: Arc<Credit>,
}

impl StdinWriter {
    /// Sends `data`, waiting while the agent's window is full. Fails once the command ended.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            if !self.credit.acquire(chunk.len() as u64) {
                return Err(ClientError::Disconnected(format!(
                    "command {} ended; its stdin is closed",
                    self.id
                )));
            }
            self.inner.send(
                self.id,
                RequestBody::Stdin {
                    data: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Closes the command's stdin (it reads end of file).
    pub fn close(&self) -> Result<()> {
        self.inner.send(self.id, RequestBody::StdinClose)
    }

    /// Copies `reader` to stdin until its end, then closes stdin.
    pub fn copy_from(&self, mut reader: impl Read) -> Result<()> {
        let mut buf = vec![0u8; MAX_CHUNK];
        let result = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(err) = self.write(&buf[..n]) {
                        break Err(err);
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    break Err(ClientError::Local {
                        what: "reading stdin for the command".to_string(),
                        source,
                    })
                }
            }
        };
        self.close().ok();
        result
    }
}
