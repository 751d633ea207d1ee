//! The Unix-socket side of the device: the listening socket and its `CONNECT <port>` handshake,
//! connections to `<uds_path>_<port>` for the guest, the connection table, the order in which
//! connections get rx buffers, and which host sockets the event loop watches.
//!
//! The muxer never blocks: every socket is non-blocking, a host client's CONNECT line is read
//! byte by byte as it arrives (bounded, and dropped when too slow), and connecting to a host
//! listener uses a non-blocking `connect`. Sockets the muxer is done with are closed only after
//! the event loop stopped watching them ([`Muxer::sync_epoll`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use super::connection::{ConnKey, Connection, Outgoing, State};
use super::packet::{Header, Op, PacketError};
use super::{
    VsockError, HANDSHAKE_TIMEOUT, HOST_CID, MAX_CONNECTIONS, MAX_CONNECT_LINE,
    MAX_PENDING_CLIENTS, MAX_UDS_PATH_LEN,
};
use crate::virtio::LogLimiter;

/// First port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1024;
/// Where host ports start after a transport reset (see `move_ports_past_old_connections`).
const RESTORED_FIRST_PORT: u32 = 1 << 20;
/// Resets for unknown connections waiting for an rx buffer; more are dropped.
const MAX_PENDING_RSTS: usize = 1024;
/// Connections accepted per listener event, so a connect storm cannot starve the queues.
const ACCEPTS_PER_EVENT: usize = 16;

/// Errors of the Unix-socket side (logged; they end one connection, never the device).
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// A host client's CONNECT line is not `CONNECT <port>`.
    #[error("malformed CONNECT line {0:?}")]
    BadConnectLine(String),
    /// A host client's CONNECT line is too long.
    #[error("CONNECT line longer than {MAX_CONNECT_LINE} bytes")]
    ConnectLineTooLong,
    /// No connection slot or host port is free.
    #[error("no connection slot left ({0} connections)")]
    TooManyConnections(usize),
    /// The guest's target path does not fit `sun_path`.
    #[error("host socket path {0:?} is too long")]
    PathTooLong(PathBuf),
    /// Connecting to a host listener failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What a watched file descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener,
    Pending(u64),
    Conn(ConnKey),
}

/// A host client that has not finished its CONNECT line.
#[derive(Debug)]
struct PendingClient {
    id: u64,
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
    registered: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, so drop removes only our own.
    socket_id: Option<(u64, u64)>,
    listener_registered: bool,
    pending: Vec<PendingClient>,
    next_pending_id: u64,
    conns: HashMap<ConnKey, Connection>,
    /// Connections that may have something for the guest, in service order.
    rx_list: VecDeque<ConnKey>,
    /// Resets answering packets for unknown connections.
    rst_queue: VecDeque<Header>,
    /// Connections whose epoll interest may have changed.
    dirty: HashSet<ConnKey>,
    /// Every socket fd we own (except retired ones).
    tokens: HashMap<RawFd, Token>,
    /// Sockets to close once the event loop stopped watching them: (socket, registered).
    retired: Vec<(OwnedFd, bool)>,
    next_local_port: u32,
    last_sweep: Instant,
    log: LogLimiter,
}

/// Checks `path` and binds a non-blocking listener there, replacing a stale socket file.
fn listen(path: &Path) -> Result<(UnixListener, Option<(u64, u64)>), VsockError> {
    let len = path.as_os_str().len();
    if len > MAX_UDS_PATH_LEN || len == 0 {
        return Err(VsockError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VsockError::Listen {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let listen_err = |source| VsockError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let id = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok((listener, id))
}

/// `connect(2)` without blocking: a listener whose backlog is full answers EAGAIN instead of
/// stalling the event loop.
fn connect_nonblocking(path: &Path) -> Result<UnixStream, MuxerError> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() {
        return Err(MuxerError::PathTooLong(path.to_path_buf()));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let connect_err = |source| MuxerError::Connect {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(connect_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket just created by this thread and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a fully initialised `sockaddr_un` that outlives the call, and the length
    // passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(connect_err(io::Error::last_os_error()));
    }
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect_line(line: &[u8]) -> Result<u32, MuxerError> {
    let bad = || MuxerError::BadConnectLine(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ").ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    port.parse::<u32>().map_err(|_| bad())
}

impl Muxer {
    /// Listens on `uds_path` for a guest with CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Muxer, VsockError> {
        let (listener, socket_id) = listen(&uds_path)?;
        let mut tokens = HashMap::new();
        tokens.insert(listener.as_raw_fd(), Token::Listener);
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            socket_id,
            listener_registered: false,
            pending: Vec::new(),
            next_pending_id: 0,
            conns: HashMap::new(),
            rx_list: VecDeque::new(),
            rst_queue: VecDeque::new(),
            dirty: HashSet::new(),
            tokens,
            retired: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            last_sweep: Instant::now(),
            log: LogLimiter::new("virtio-vsock"),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients still sending their CONNECT line.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Guest→host bytes buffered for each live connection (tests, diagnostics).
    #[cfg(test)]
    pub fn buffered(&self) -> Vec<usize> {
        self.conns.values().map(Connection::buffered).collect()
    }

    /// Drops every connection without telling the guest (device or transport reset). Host
    /// clients still in their CONNECT handshake are kept.
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rx_list.clear();
        self.rst_queue.clear();
        self.dirty.clear();
    }

    /// After a transport reset (a restored snapshot), new connections take host ports far
    /// from those the snapshot's connections used: until the guest has processed the reset
    /// event, its old sockets are still connected, and a new connection on an old port pair
    /// would be delivered to the old socket. Old connections used ports counted up from
    /// `FIRST_LOCAL_PORT`; new ones start at a random port in `[2^20, 2^31)`.
    pub fn move_ports_past_old_connections(&mut self) {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        self.next_local_port =
            RESTORED_FIRST_PORT + (random % u64::from(RESTORED_FIRST_PORT * 2047)) as u32;
    }

    /// Guest bytes that live host sockets have yet to take.
    pub fn undelivered_to_host(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.awaiting_host_write())
            .map(Connection::undelivered)
            .sum()
    }

    /// Writes the guest bytes still buffered to their host sockets, waiting (blocking) up to
    /// `limit` for slow readers. For the end of a VM: the guest's last words (an echo, a
    /// command's output) often arrive just before it powers off, and without this they would
    /// be lost with the sockets. Returns the bytes no host socket took in time.
    pub fn deliver_to_host(&mut self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let waiting: Vec<(ConnKey, RawFd)> = self
                .conns
                .iter()
                .filter(|(_, c)| c.awaiting_host_write())
                .map(|(key, c)| (*key, c.stream().as_raw_fd()))
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if waiting.is_empty() || left.is_zero() {
                return self.undelivered_to_host();
            }
            let mut fds: Vec<libc::pollfd> = waiting
                .iter()
                .map(|(_, fd)| libc::pollfd {
                    fd: *fd,
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            let timeout_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that outlives
            // the call; the descriptors belong to connections this muxer owns.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("virtio-vsock: waiting for host sockets to drain failed: {e}");
                    return self.undelivered_to_host();
                }
                continue;
            }
            for ((key, _), pfd) in waiting.iter().zip(&fds) {
                if pfd.revents == 0 {
                    continue;
                }
                if let Some(conn) = self.conns.get_mut(key) {
                    if let Err(e) = conn.flush() {
                        log::debug!("virtio-vsock: connection {key:?}: {e}; giving up on it");
                        conn.reset();
                    }
                }
            }
        }
    }

    // ---- bookkeeping -------------------------------------------------------------------

    /// Re-evaluates a connection after something happened to it.
    fn touch(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.wants_rx() && !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
        }
        self.dirty.insert(key);
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let registered = conn.registered.is_some();
        self.tokens.remove(&conn.stream().as_raw_fd());
        self.dirty.remove(&key);
        self.retired
            .push((OwnedFd::from(conn.into_stream()), registered));
    }

    fn retire_pending(&mut self, index: usize) {
        if index >= self.pending.len() {
            return;
        }
        let p = self.pending.remove(index);
        self.tokens.remove(&p.stream.as_raw_fd());
        self.retired.push((OwnedFd::from(p.stream), p.registered));
    }

    fn queue_rst(&mut self, hdr: Header) {
        if self.rst_queue.len() >= MAX_PENDING_RSTS {
            self.log.warn(format_args!(
                "dropping a reset ({hdr}): {MAX_PENDING_RSTS} already queued"
            ));
            return;
        }
        self.rst_queue.push_back(hdr);
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        let used: HashSet<u32> = self.conns.keys().map(|k| k.local_port).collect();
        for _ in 0..=used.len() {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                // u32::MAX is VMADDR_PORT_ANY.
                Some(next) if next != u32::MAX => next,
                _ => FIRST_LOCAL_PORT,
            };
            if !used.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    // ---- guest → host ------------------------------------------------------------------

    /// Handles a validated packet from the guest; `payload` holds its `len` bytes.
    pub fn recv_packet(&mut self, hdr: &Header, op: Op, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            self.log.warn(format_args!(
                "dropping packet with source CID {} (the guest is {}): {hdr}",
                hdr.src_cid, self.guest_cid
            ));
            return;
        }
        if hdr.dst_cid != HOST_CID {
            self.log.warn(format_args!(
                "resetting packet for CID {} (only the host, {HOST_CID}, is reachable): {hdr}",
                hdr.dst_cid
            ));
            if op != Op::Rst {
                self.queue_rst(hdr.reset_reply());
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match op {
                Op::Request => self.connect_for_guest(hdr, key),
                Op::Rst => {}
                _ => {
                    log::debug!("virtio-vsock: resetting packet for unknown connection: {hdr}");
                    self.queue_rst(hdr.reset_reply());
                }
            }
            return;
        };
        conn.update_peer_credit(hdr);
        let result = match op {
            Op::Rst => {
                // Evidence for a rare loss seen in the lab (an echo 21,972 bytes short): a
                // guest that resets a connection while bytes it sent still wait for the host
                // socket loses them here.
                if conn.undelivered() > 0 {
                    self.log.warn(format_args!(
                        "the guest reset {key:?} with {} of its bytes not yet delivered to \
                         the host; they are dropped",
                        conn.undelivered()
                    ));
                }
                self.remove(key);
                return;
            }
            Op::Request => {
                self.log.warn(format_args!(
                    "request for existing connection {key:?}; resetting it"
                ));
                conn.reset();
                Ok(())
            }
            Op::Response if conn.state() == State::Connecting => conn.recv_response(),
            Op::Response => {
                self.log
                    .warn(format_args!("duplicate response on {key:?}; ignoring it"));
                Ok(())
            }
            Op::Shutdown => conn.recv_shutdown(hdr.flags),
            Op::Rw => conn.recv_rw(payload),
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                conn.recv_credit_request();
                Ok(())
            }
        };
        if let Err(e) = result {
            self.log
                .warn(format_args!("connection {key:?}: {e}; resetting it"));
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.reset();
            }
        }
        self.touch(key);
    }

    /// Answers a packet that failed validation with a reset when it can be addressed.
    pub fn recv_bad_packet(&mut self, hdr: &Header, err: &PacketError) {
        self.log.warn(format_args!("bad packet ({err}): {hdr}"));
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.op == Op::Rst as u16 {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.reset();
            self.touch(key);
        } else {
            self.queue_rst(hdr.reset_reply());
        }
    }

    /// The path a guest connection to host port `port` goes to.
    fn peer_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn connect_for_guest(&mut self, hdr: &Header, key: ConnKey) {
        let result = if self.conns.len() >= MAX_CONNECTIONS {
            Err(MuxerError::TooManyConnections(self.conns.len()))
        } else {
            connect_nonblocking(&self.peer_path(key.local_port))
        };
        match result {
            Ok(stream) => {
                self.tokens.insert(stream.as_raw_fd(), Token::Conn(key));
                self.conns
                    .insert(key, Connection::new_peer(stream, key, hdr));
                self.touch(key);
            }
            Err(e) => {
                log::debug!("virtio-vsock: refusing guest connection {key:?}: {e}");
                self.queue_rst(hdr.reset_reply());
            }
        }
    }

    // ---- host → guest ------------------------------------------------------------------

    /// Whether a packet for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_list.is_empty()
    }

    /// The next packet for the guest, for an rx buffer with `room` payload bytes: its header
    /// and the number of payload bytes put in `scratch`. One pass over the waiting
    /// connections at most.
    pub fn next_rx(&mut self, room: usize, scratch: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return Some((hdr, 0));
        }
        for _ in 0..self.rx_list.len() {
            let key = self.rx_list.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            let out = conn.produce(room, scratch);
            let hdr = out.map(|o: Outgoing| (conn.header(self.guest_cid, o), o.len));
            if conn.is_closed() {
                self.remove(key);
            } else {
                self.touch(key);
            }
            if hdr.is_some() {
                return hdr;
            }
        }
        None
    }

    /// The rx buffer a packet from `next_rx` was for could not be written: the connection
    /// lost bytes and must be reset.
    pub fn rx_failed(&mut self, hdr: &Header) {
        let key = ConnKey {
            local_port: hdr.src_port,
            peer_port: hdr.dst_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.reset();
            self.touch(key);
        }
    }

    // ---- host sockets ------------------------------------------------------------------

    /// Handles readiness of `fd`; `false` if the muxer does not own it.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet) -> bool {
        let handled = match self.tokens.get(&fd).copied() {
            Some(Token::Listener) => {
                self.accept();
                true
            }
            Some(Token::Pending(id)) => {
                self.read_connect_line(id);
                true
            }
            Some(Token::Conn(key)) => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    if let Err(e) = conn.on_event(set) {
                        log::debug!("virtio-vsock: connection {key:?}: {e}; resetting it");
                        conn.reset();
                    }
                    self.touch(key);
                }
                true
            }
            None => false,
        };
        self.sweep();
        handled
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log.warn(format_args!(
                        "accepting on {} failed: {e}",
                        self.uds_path.display()
                    ));
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                self.log
                    .warn(format_args!("cannot make a host client non-blocking: {e}"));
                continue;
            }
            if self.pending.len() >= MAX_PENDING_CLIENTS {
                self.log.warn(format_args!(
                    "{MAX_PENDING_CLIENTS} host clients have not sent CONNECT yet; dropping \
                     the oldest"
                ));
                self.retire_pending(0);
            }
            let id = self.next_pending_id;
            self.next_pending_id = self.next_pending_id.wrapping_add(1);
            self.tokens.insert(stream.as_raw_fd(), Token::Pending(id));
            self.pending.push(PendingClient {
                id,
                stream,
                line: Vec::new(),
                since: Instant::now(),
                registered: false,
            });
        }
    }

    /// Reads a host client's CONNECT line one byte at a time (never past the newline: bytes
    /// after it belong to the connection).
    fn read_connect_line(&mut self, id: u64) {
        let Some(index) = self.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let outcome: Option<Result<u32, MuxerError>> = loop {
            let p = &mut self.pending[index];
            let mut byte = [0u8; 1];
            match p.stream.read(&mut byte) {
                Ok(0) => {
                    log::debug!("virtio-vsock: host client closed before CONNECT");
                    self.retire_pending(index);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect_line(&p.line)),
                Ok(_) => {
                    p.line.push(byte[0]);
                    if p.line.len() >= MAX_CONNECT_LINE {
                        break Some(Err(MuxerError::ConnectLineTooLong));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("virtio-vsock: host client read failed: {e}");
                    self.retire_pending(index);
                    return;
                }
            }
        };
        let port = match outcome {
            None => return,
            Some(Ok(port)) => port,
            Some(Err(e)) => {
                self.log.warn(format_args!("host client: {e}; closing it"));
                self.retire_pending(index);
                return;
            }
        };
        let local_port = if self.conns.len() >= MAX_CONNECTIONS {
            None
        } else {
            self.alloc_local_port()
        };
        let Some(local_port) = local_port else {
            self.log.warn(format_args!(
                "host client: {}; closing it",
                MuxerError::TooManyConnections(self.conns.len())
            ));
            self.retire_pending(index);
            return;
        };
        // The socket stays open (and watched) and becomes the connection's.
        let p = self.pending.remove(index);
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let fd = p.stream.as_raw_fd();
        let mut conn = Connection::new_local(p.stream, key);
        conn.registered = p.registered.then_some(EventSet::IN);
        self.tokens.insert(fd, Token::Conn(key));
        self.conns.insert(key, conn);
        self.touch(key);
    }

    /// Drops host clients and host-initiated requests that took too long (checked at most once
    /// a second, when there is activity).
    fn sweep(&mut self) {
        if self.last_sweep.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = Instant::now();
        while let Some(index) = self
            .pending
            .iter()
            .position(|p| p.since.elapsed() > HANDSHAKE_TIMEOUT)
        {
            self.log.warn(format_args!(
                "host client sent no CONNECT line within {HANDSHAKE_TIMEOUT:?}; closing it"
            ));
            self.retire_pending(index);
        }
        let stale: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.state() == State::Connecting && c.created.elapsed() > HANDSHAKE_TIMEOUT)
            .map(Connection::ports)
            .collect();
        for key in stale {
            self.log.warn(format_args!(
                "guest did not answer connection request {key:?} within {HANDSHAKE_TIMEOUT:?}"
            ));
            if let Some(conn) = self.conns.get(&key) {
                let hdr = conn.header(
                    self.guest_cid,
                    Outgoing {
                        op: Op::Rst,
                        flags: 0,
                        len: 0,
                    },
                );
                self.queue_rst(hdr);
            }
            self.remove(key);
        }
    }

    /// Makes the event loop watch exactly what the muxer needs, then closes retired sockets.
    pub fn sync_epoll(&mut self, ops: &mut EventOps) {
        for (fd, registered) in self.retired.drain(..) {
            if registered {
                if let Err(e) = ops.remove(Events::empty(&fd)) {
                    log::warn!("virtio-vsock: cannot stop watching a closed socket: {e:?}");
                }
            }
        }
        if !self.listener_registered {
            match ops.add(Events::new(&self.listener, EventSet::IN)) {
                Ok(()) => self.listener_registered = true,
                Err(e) => log::error!("virtio-vsock: cannot watch the listening socket: {e:?}"),
            }
        }
        for p in self.pending.iter_mut().filter(|p| !p.registered) {
            match ops.add(Events::new(&p.stream, EventSet::IN)) {
                Ok(()) => p.registered = true,
                Err(e) => log::error!("virtio-vsock: cannot watch a host client: {e:?}"),
            }
        }
        for key in self.dirty.drain() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = conn.interest();
            let result = match (conn.registered, want) {
                (None, None) => Ok(()),
                (Some(have), Some(want)) if have == want => Ok(()),
                (None, Some(want)) => ops.add(Events::new(conn.stream(), want)),
                (Some(_), Some(want)) => ops.modify(Events::new(conn.stream(), want)),
                (Some(_), None) => ops.remove(Events::empty(conn.stream())),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    log::error!(
                        "virtio-vsock: cannot update the watch of connection {key:?}: {e:?}"
                    );
                }
            }
        }
    }

    /// Whether the event loop owes this muxer a [`Muxer::sync_epoll`] call.
    pub fn needs_sync(&self) -> bool {
        !self.retired.is_empty()
            || !self.dirty.is_empty()
            || !self.listener_registered
            || self.pending.iter().any(|p| !p.registered)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound.
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests;
