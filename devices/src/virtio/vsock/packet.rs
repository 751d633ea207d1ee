//! The `virtio_vsock_hdr` wire format and moving packets in and out of descriptor chains.
//!
//! A packet is a 44-byte little-endian header followed by `len` payload bytes. The driver may
//! split it over descriptors any way it likes (Linux 6.1 uses one descriptor for the header and
//! one for the payload), so a chain is handled as a list of validated guest memory
//! [`Segments`] read and written at byte offsets. Every descriptor is checked for direction and
//! for lying inside guest memory before anything is copied.

use std::fmt;

use crate::virtio::chain::ChainError;
pub use crate::virtio::chain::{Direction, Segments};
use crate::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// Largest payload the device accepts in, or puts in, one packet.
pub const MAX_PKT_LEN: u32 = 64 * 1024;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;
/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the event-queue event id telling the driver that every
/// connection is gone (and to re-read the guest CID).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_SIZE: usize = 4;

/// Packet operations (`virtio_vsock_hdr.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset (refused or aborted).
    Rst = 3,
    /// Half or full shutdown; `flags` say which directions.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's receive buffer state (`buf_alloc`, `fwd_cnt`) changed.
    CreditUpdate = 6,
    /// Asks the receiver for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The op for a wire value, if it is one.
    pub fn from_wire(value: u16) -> Option<Op> {
        Some(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a packet was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain is unusable.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The header says more payload than the device accepts.
    #[error("packet length {len} is above the maximum {MAX_PKT_LEN}")]
    LenTooLarge {
        /// Claimed length.
        len: u32,
    },
    /// The header says more payload than the chain carries.
    #[error("packet length {len} is more than the {available} payload bytes in the chain")]
    LenPastChain {
        /// Claimed length.
        len: u32,
        /// Bytes after the header.
        available: u64,
    },
    /// Unknown `op`.
    #[error("unknown packet op {0}")]
    UnknownOp(u16),
    /// Socket type other than stream.
    #[error("unsupported socket type {0} (only stream, 1, is offered)")]
    UnsupportedType(u16),
}

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation (see [`Op`]).
    pub op: u16,
    /// Op-specific flags (shutdown directions).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Decodes the wire bytes (no validation: see [`Header::check`]).
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Header {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Validates a received header against the `available` payload bytes that follow it in
    /// the chain; returns the op.
    pub fn check(&self, available: u64) -> Result<Op, PacketError> {
        if self.len > MAX_PKT_LEN {
            return Err(PacketError::LenTooLarge { len: self.len });
        }
        if u64::from(self.len) > available {
            return Err(PacketError::LenPastChain {
                len: self.len,
                available,
            });
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::UnsupportedType(self.type_));
        }
        Op::from_wire(self.op).ok_or(PacketError::UnknownOp(self.op))
    }

    /// The header that resets the connection this header belongs to (source and destination
    /// swapped), for answering packets the device cannot accept.
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op {} {}:{} -> {}:{} len {} type {} flags {:#x}",
            self.op,
            self.src_cid,
            self.src_port,
            self.dst_cid,
            self.dst_port,
            self.len,
            self.type_,
            self.flags
        )
    }
}

/// Packets in and out of chains.
pub trait PacketChain {
    /// Reads a tx packet header (validate it with [`Header::check`]). The payload is the
    /// `hdr.len` bytes at offset [`HDR_SIZE`].
    fn read_header(&self, mem: &GuestMemoryMmap) -> Result<Header, PacketError>;
    /// Payload bytes after the header.
    fn payload_room(&self) -> u64;
    /// Writes an rx packet (header, then `payload`); returns the used length.
    fn write_packet(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError>;
}

impl PacketChain for Segments {
    fn read_header(&self, mem: &GuestMemoryMmap) -> Result<Header, PacketError> {
        let mut b = [0u8; HDR_SIZE];
        self.read_at(mem, 0, &mut b)?;
        Ok(Header::from_bytes(&b))
    }

    fn payload_room(&self) -> u64 {
        self.len().saturating_sub(HDR_SIZE as u64)
    }

    fn write_packet(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let total = HDR_SIZE + payload.len();
        if total as u64 > self.len() {
            return Err(ChainError::TooShort {
                have: self.len(),
                need: total as u64,
            }
            .into());
        }
        self.write_at(mem, 0, &hdr.to_bytes())?;
        self.write_at(mem, HDR_SIZE as u64, payload)?;
        // Bounded by the chain length check above and by MAX_PKT_LEN at the callers.
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests;
