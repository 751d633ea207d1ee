//! One connection between a guest stream socket and a host Unix stream: its state machine, the
//! credit accounting of both directions and the bounded guest→host buffer.
//!
//! Credit (virtio 1.2 §5.10.6.3): each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it consumed from that buffer, wrapping). A sender may have at most
//! `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes in flight.
//!
//! - guest→host: the device advertises [`CONN_BUF_ALLOC`]; bytes the host socket does not take
//!   at once wait in `buf`, which therefore never holds more than the advertised amount. A
//!   guest sending beyond its credit is reset. `fwd_cnt` counts bytes written to the host
//!   socket; a credit update goes out once enough were written since the last advertised
//!   value (every packet carries the current value too).
//! - host→guest: the device reads from the host socket only as much as the guest's credit
//!   and the rx buffer allow, so a fast host writer is throttled by its own socket.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{CONN_BUF_ALLOC, HOST_CID};

/// Send a credit update once the host consumed this many bytes since the last advertised
/// `fwd_cnt`.
pub(crate) const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Identifies a connection: the host-side port and the guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: the request is (about to be) sent, no response yet.
    Connecting,
    /// Data may flow (subject to shutdowns).
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Data before the connection was accepted.
    #[error("{len} data bytes on a connection that is not established")]
    NotEstablished {
        /// Payload length.
        len: usize,
    },
    /// Data after the guest said it would send no more.
    #[error("{len} data bytes after the guest shut down its sending side")]
    DataAfterShutdown {
        /// Payload length.
        len: usize,
    },
    /// The guest ignored the credit it was given.
    #[error(
        "guest sent {len} bytes with {buffered} still buffered, beyond the {CONN_BUF_ALLOC} \
         byte credit"
    )]
    CreditExceeded {
        /// Payload length.
        len: usize,
        /// Bytes already waiting for the host socket.
        buffered: usize,
    },
    /// The host socket failed.
    #[error("host socket {op} failed: {source}")]
    Io {
        /// "read", "write" or "shutdown".
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A packet the connection wants to send to the guest; for `Rw` the payload is in the scratch
/// buffer passed to [`Connection::produce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub op: Op,
    pub flags: u32,
    pub len: usize,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    state: State,
    ports: ConnKey,
    stream: UnixStream,
    pub created: Instant,

    // Control packets owed to the guest.
    need_request: bool,
    need_response: bool,
    need_rst: bool,
    need_credit_update: bool,
    need_credit_request: bool,
    /// Shutdown flags to tell the guest, and those told already.
    shutdown_pending: u32,
    shutdown_sent: u32,
    /// The RST went out: the connection is over.
    rst_sent: bool,

    // Host socket.
    /// The socket (may) have bytes or EOF to read; cleared when a read would block.
    readable: bool,
    /// Read returned EOF.
    host_eof: bool,
    /// The host peer closed both directions (EPOLLHUP).
    host_hup: bool,
    /// The socket's write side was shut down (the guest stopped sending and `buf` drained).
    host_write_shut: bool,

    // Guest side.
    /// Shutdown flags the guest sent.
    peer_shutdown: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    rx_cnt: Wrapping<u32>,

    // guest→host.
    /// Written to the host before any guest byte (`OK <port>\n`); not guest data, not credit.
    prefix: Vec<u8>,
    /// Guest bytes the host socket has not taken yet; at most [`CONN_BUF_ALLOC`].
    buf: VecDeque<u8>,
    /// Guest bytes written to the host socket, ever.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard of.
    fwd_cnt_sent: Wrapping<u32>,

    /// Queued for the muxer's rx list / interest sync (bookkeeping owned by the muxer).
    pub in_rx_list: bool,
    pub registered: Option<EventSet>,
}

impl Connection {
    fn new(stream: UnixStream, ports: ConnKey, state: State) -> Connection {
        Connection {
            state,
            ports,
            stream,
            created: Instant::now(),
            need_request: false,
            need_response: false,
            need_rst: false,
            need_credit_update: false,
            need_credit_request: false,
            shutdown_pending: 0,
            shutdown_sent: 0,
            rst_sent: false,
            readable: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            peer_shutdown: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            prefix: Vec::new(),
            buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            in_rx_list: false,
            registered: None,
        }
    }

    /// A host-initiated connection: a request to the guest is owed.
    pub fn new_local(stream: UnixStream, ports: ConnKey) -> Connection {
        let mut c = Connection::new(stream, ports, State::Connecting);
        c.need_request = true;
        c
    }

    /// A guest-initiated connection whose host socket is connected: a response is owed.
    pub fn new_peer(stream: UnixStream, ports: ConnKey, request: &Header) -> Connection {
        let mut c = Connection::new(stream, ports, State::Established);
        c.need_response = true;
        c.update_peer_credit(request);
        c
    }

    pub fn ports(&self) -> ConnKey {
        self.ports
    }

    /// Guest bytes received but not yet written to the host socket.
    pub fn undelivered(&self) -> usize {
        self.buf.len()
    }

    /// Whether guest bytes (or the `OK` line) still wait for a host socket that can take
    /// them: the connection is not being reset.
    pub fn awaiting_host_write(&self) -> bool {
        !self.rst_sent && !self.need_rst && (!self.prefix.is_empty() || !self.buf.is_empty())
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the socket up (to close it once the event loop stopped watching it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// The RST went out; the muxer drops the connection.
    pub fn is_closed(&self) -> bool {
        self.rst_sent
    }

    /// Every packet carries the peer's buffer state.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can take now. A guest reporting more consumed than was sent gets none.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The header of a packet [`Connection::produce`] returned.
    pub fn header(&self, guest_cid: u64, out: Outgoing) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.ports.local_port,
            dst_port: self.ports.peer_port,
            len: u32::try_from(out.len).unwrap_or(u32::MAX),
            type_: TYPE_STREAM,
            op: out.op as u16,
            flags: out.flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt_sent.0,
        }
    }

    /// The guest accepted a host-initiated connection: tell the host client.
    pub fn recv_response(&mut self) -> Result<(), ConnError> {
        self.state = State::Established;
        self.prefix = format!("OK {}\n", self.ports.local_port).into_bytes();
        self.flush()
    }

    /// The guest sent data.
    pub fn recv_rw(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.state != State::Established {
            return Err(ConnError::NotEstablished { len: data.len() });
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::DataAfterShutdown { len: data.len() });
        }
        let buffered = self.buf.len();
        if buffered.saturating_add(data.len()) > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                buffered,
            });
        }
        let mut rest = data;
        if self.prefix.is_empty() && self.buf.is_empty() {
            let n = write_to(&self.stream, rest)?;
            self.fwd_cnt += Wrapping(n as u32); // n <= MAX_PKT_LEN
            rest = rest.get(n..).unwrap_or_default();
        }
        self.buf.extend(rest);
        self.after_host_progress()
    }

    /// The guest shut down one or both directions.
    pub fn recv_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        self.after_host_progress()
    }

    /// The guest asked for our buffer state.
    pub fn recv_credit_request(&mut self) {
        self.need_credit_update = true;
    }

    /// Something went wrong: reset the connection.
    pub fn reset(&mut self) {
        self.need_rst = true;
    }

    /// The host socket is ready (`set` as reported by epoll).
    pub fn on_event(&mut self, set: EventSet) -> Result<(), ConnError> {
        if set
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            self.readable = true;
        }
        if set.contains(EventSet::HANG_UP) {
            self.host_hup = true;
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what the host socket takes of the prefix and the buffered guest bytes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.prefix.is_empty() {
            let n = write_to(&self.stream, &self.prefix)?;
            if n == 0 {
                return Ok(());
            }
            self.prefix.drain(..n);
        }
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            let n = write_to(&self.stream, front)?;
            if n == 0 {
                break;
            }
            self.buf.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        self.after_host_progress()
    }

    /// After bytes reached the host or the guest shut something down: owe a credit update,
    /// shut the host socket's write side, or end the connection when nothing is left to do.
    fn after_host_progress(&mut self) -> Result<(), ConnError> {
        let drained = self.prefix.is_empty() && self.buf.is_empty();
        if drained && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            match self.stream.shutdown(Shutdown::Write) {
                Ok(()) => {}
                // The host side is already gone: nothing to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(source) => {
                    return Err(ConnError::Io {
                        op: "shutdown",
                        source,
                    })
                }
            }
        }
        self.check_done();
        Ok(())
    }

    /// Resets once no byte can flow any more: the guest closed both directions (and its data
    /// reached the host), or each side finished sending.
    fn check_done(&mut self) {
        let drained = self.prefix.is_empty() && self.buf.is_empty();
        if !drained || self.state != State::Established {
            return;
        }
        let guest_closed = self.peer_shutdown == SHUTDOWN_BOTH;
        let both_sent =
            self.peer_shutdown & SHUTDOWN_SEND != 0 && self.shutdown_sent & SHUTDOWN_SEND != 0;
        if guest_closed || both_sent {
            self.need_rst = true;
        }
    }

    fn unacked_fwd(&self) -> u32 {
        (self.fwd_cnt - self.fwd_cnt_sent).0
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && !self.need_rst
            && !self.rst_sent
    }

    /// Whether [`Connection::produce`] has something to send (given an rx buffer).
    pub fn wants_rx(&self) -> bool {
        if self.rst_sent {
            return false;
        }
        self.need_rst
            || self.need_request
            || self.need_response
            || (self.can_read_host() && self.peer_credit() > 0)
            || self.shutdown_pending & !self.shutdown_sent != 0
            || self.need_credit_update
            || self.need_credit_request
            || self.unacked_fwd() >= CREDIT_UPDATE_THRESHOLD
    }

    /// The epoll events the connection needs on its host socket (`None`: do not watch it).
    pub fn interest(&self) -> Option<EventSet> {
        if self.rst_sent || self.need_rst {
            return None;
        }
        let mut set = EventSet::empty();
        if self.state == State::Established
            && !self.readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
        {
            set |= EventSet::IN;
        }
        if !self.prefix.is_empty() || !self.buf.is_empty() {
            set |= EventSet::OUT;
        }
        (!set.is_empty()).then_some(set)
    }

    /// The next packet for the guest, for an rx buffer with `room` payload bytes; data is read
    /// from the host socket into `scratch`.
    pub fn produce(&mut self, room: usize, scratch: &mut [u8]) -> Option<Outgoing> {
        let out = self.next_outgoing(room, scratch);
        if out.is_some() {
            // Every packet tells the guest the current `fwd_cnt`.
            self.fwd_cnt_sent = self.fwd_cnt;
            self.need_credit_update = false;
        }
        out
    }

    fn next_outgoing(&mut self, room: usize, scratch: &mut [u8]) -> Option<Outgoing> {
        let control = |op| {
            Some(Outgoing {
                op,
                flags: 0,
                len: 0,
            })
        };
        if self.rst_sent {
            return None;
        }
        if self.need_rst {
            self.need_rst = false;
            self.rst_sent = true;
            return control(Op::Rst);
        }
        if self.need_request {
            self.need_request = false;
            return control(Op::Request);
        }
        if self.need_response {
            self.need_response = false;
            return control(Op::Response);
        }
        if self.can_read_host() {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            let n = room.min(scratch.len()).min(credit);
            if n > 0 {
                match self.stream.read(&mut scratch[..n]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.readable = false;
                        self.shutdown_pending |= SHUTDOWN_SEND;
                        if self.host_hup {
                            self.shutdown_pending |= SHUTDOWN_RCV;
                        }
                    }
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32); // n <= MAX_PKT_LEN
                        if self.peer_credit() == 0 {
                            self.need_credit_request = true;
                        }
                        return Some(Outgoing {
                            op: Op::Rw,
                            flags: 0,
                            len: n,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!(
                            "virtio-vsock: connection {:?}: host read failed: {e}",
                            self.ports
                        );
                        self.rst_sent = true;
                        return control(Op::Rst);
                    }
                }
            }
        }
        let new_flags = self.shutdown_pending & !self.shutdown_sent;
        if new_flags != 0 {
            self.shutdown_sent |= new_flags;
            self.check_done();
            return Some(Outgoing {
                op: Op::Shutdown,
                flags: self.shutdown_sent,
                len: 0,
            });
        }
        if self.need_credit_update || self.unacked_fwd() >= CREDIT_UPDATE_THRESHOLD {
            return control(Op::CreditUpdate);
        }
        if self.need_credit_request {
            self.need_credit_request = false;
            return control(Op::CreditRequest);
        }
        None
    }
}

/// Writes what a non-blocking socket takes now (0 when it would block).
fn write_to(mut stream: &UnixStream, data: &[u8]) -> Result<usize, ConnError> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ConnError::Io {
                    op: "write",
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
