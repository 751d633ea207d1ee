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
    decode, encode_frame, read_frame, Credit, ErrorKind, ExitStatus, FrameError, RemoteError,
    Request, RequestBody, Response, ResponseBody, Transport, ACK_THRESHOLD, CAP_RESYNC, MAX_CHUNK,
    MAX_RESYNC_ENTROPY, PROTOCOL_VERSION, STREAM_WINDOW,
};

mod connect;
mod execution;
mod files;
mod fsops;

pub use execution::{Execution, StdinWriter};
pub use fsops::{Watch, WatchNext};

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

    /// Asks the agent to end the stream of request `id` and forgets it. The `Cancel` has
    /// an id of its own that nothing waits on: its answer is dropped.
    fn cancel(&self, id: u64) {
        let cancel_id = self.next_id.fetch_add(1, Ordering::SeqCst);
        // A connection that is gone has ended the stream already.
        self.send(cancel_id, RequestBody::Cancel { target: id })
            .ok();
        self.unregister(id);
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
        ResponseBody::Watch(event) => Some(crate::protocol::watch_event_cost(event)),
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

    fn consumed(&mut self, inner: &Inner, bytes: u64) {
        let _ = self
            .unconsumed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(bytes))
            });
        self.unacked += bytes;
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
        self.next_response_within(what, id, rx, self.request_timeout)
    }

    /// As [`next_response`](Self::next_response), waiting at most `timeout`.
    fn next_response_within(
        &self,
        what: &str,
        id: u64,
        rx: &Receiver<ResponseBody>,
        timeout: Duration,
    ) -> Result<ResponseBody> {
        match rx.recv_timeout(timeout) {
            Ok(body) => Ok(body),
            Err(RecvTimeoutError::Timeout) => {
                self.inner.unregister(id);
                Err(ClientError::Timeout {
                    what: format!("{what} (request {id})"),
                    timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.inner.disconnected()),
        }
    }

    /// Sends a request and waits for its one final response.
    fn call(&self, what: &'static str, body: RequestBody) -> Result<ResponseBody> {
        self.call_within(what, body, self.request_timeout)
    }

    /// As [`call`](Self::call), waiting at most `timeout` for the answer.
    fn call_within(
        &self,
        what: &'static str,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody> {
        let Registered { id, rx, .. } = self.inner.register()?;
        if let Err(err) = self.inner.send(id, body) {
            self.inner.unregister(id);
            return Err(err);
        }
        match self.next_response_within(what, id, &rx, timeout)? {
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
