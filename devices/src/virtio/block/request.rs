//! Parsing and execution of virtio-block requests, and the queue drain loop.
//!
//! A request is a descriptor chain: a device-readable 16-byte header (type, reserved, sector),
//! zero or more data descriptors, and a device-writable status byte at the end. Everything in
//! it is guest-controlled, so each step is checked; a chain whose status byte can be written
//! gets `VIRTIO_BLK_S_IOERR` / `VIRTIO_BLK_S_UNSUPP`, anything else is completed with used
//! length 0. Nothing here panics on guest input, and data is copied in bounded chunks so the
//! guest cannot make the device allocate large buffers.

use std::io;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::disk::Disk;
use crate::rate_limiter::RateLimiter;
use crate::GuestMemoryMmap;

/// Size of a virtio-block sector, whatever the disk's physical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_SIZE: u32 = 16;
/// Largest chunk copied between the disk and guest memory at once.
const COPY_CHUNK: usize = 64 * 1024;

/// Request status byte values.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The request failed (bad parameters or an I/O error).
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The request type is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest buffers.
    In,
    /// Write guest buffers to sectors.
    Out,
    /// Make previous writes durable.
    Flush,
    /// Return the 20-byte device ID.
    GetId,
    /// Any other type value.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Why a chain could not be executed. [`RequestError::status`] gives the status byte to report
/// when the chain has a usable status descriptor.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The head index is outside the descriptor table, so the chain yields nothing.
    #[error("descriptor chain with head {0} is empty (head index out of range)")]
    EmptyChain(u16),
    /// The chain ends on a descriptor that still has NEXT set: it loops, points outside the
    /// table, is longer than the queue, or a descriptor could not be read.
    #[error(
        "descriptor chain with head {head} is broken after {count} descriptors (loop, `next` \
         out of range, too long or unreadable)"
    )]
    BrokenChain {
        /// Head index.
        head: u16,
        /// Descriptors read before the chain broke.
        count: usize,
    },
    /// No descriptor that can take the status byte.
    #[error("no usable status descriptor (last descriptor {addr:#x}+{len}): {reason}")]
    BadStatusDescriptor {
        /// Address of the last descriptor.
        addr: u64,
        /// Its length.
        len: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header descriptor is device-writable.
    #[error("request header descriptor at {0:#x} is write-only")]
    HeaderWriteOnly(u64),
    /// The header descriptor is too short.
    #[error("request header descriptor is {0} bytes, need {HEADER_SIZE}")]
    HeaderTooShort(u32),
    /// The header could not be read from guest memory.
    #[error("failed to read the request header at {addr:#x}: {source}")]
    HeaderRead {
        /// Header address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: GuestMemoryError,
    },
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A data descriptor has the wrong direction for the request type.
    #[error("{request:?} request has a {found} data descriptor at {addr:#x}+{len}")]
    DataDirection {
        /// The request type.
        request: RequestType,
        /// "write-only" or "read-only".
        found: &'static str,
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// A data buffer lies (partly) outside guest memory or wraps around the address space.
    #[error("data descriptor {addr:#x}+{len} is outside guest memory")]
    DataOutsideMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// `sector * 512 + len` does not fit in 64 bits.
    #[error("request at sector {sector} with {len} bytes overflows the byte offset")]
    OffsetOverflow {
        /// Requested sector.
        sector: u64,
        /// Data length.
        len: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("request at sector {sector} with {len} bytes is beyond the disk end ({disk_sectors} sectors)")]
    OutOfRange {
        /// Requested sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk capacity.
        disk_sectors: u64,
    },
    /// A write to a read-only disk.
    #[error("write to read-only disk at sector {0}")]
    ReadOnly(u64),
    /// Host I/O on the disk image failed.
    #[error("disk {op} at byte offset {offset} failed: {source}")]
    Io {
        /// "read", "write" or "flush".
        op: &'static str,
        /// Byte offset in the image.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Copying to or from guest memory failed.
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        /// Guest address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

impl RequestError {
    /// The status byte to report for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A validated request, ready to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (meaningful for `In` / `Out`).
    pub sector: u64,
    /// Data buffers, in chain order: `(address, length)`. Each lies inside guest memory.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Checks that the chain ends in a usable status descriptor; returns its address.
pub fn status_descriptor(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<GuestAddress, RequestError> {
    let Some(last) = descs.last() else {
        return Err(RequestError::BadStatusDescriptor {
            addr: 0,
            len: 0,
            reason: "chain is empty",
        });
    };
    let bad = |reason| RequestError::BadStatusDescriptor {
        addr: last.addr().0,
        len: last.len(),
        reason,
    };
    if descs.len() < 2 {
        return Err(bad(
            "chain has only a header, the status descriptor is missing",
        ));
    }
    if !last.is_write_only() {
        return Err(bad("it is not device-writable"));
    }
    if last.len() < 1 {
        return Err(bad("it is empty"));
    }
    if !mem.check_range(last.addr(), 1, Permissions::Write) {
        return Err(bad("it is outside guest memory"));
    }
    Ok(last.addr())
}

/// Parses the chain `descs` (whose last descriptor was validated by [`status_descriptor`])
/// into a [`Request`], checking header, directions, lengths, memory ranges and disk bounds.
pub fn parse_request(
    descs: &[Descriptor],
    status_addr: GuestAddress,
    mem: &GuestMemoryMmap,
    disk: &Disk,
) -> Result<Request, RequestError> {
    // `status_descriptor` guarantees at least two descriptors.
    let (header_desc, rest) = descs.split_first().ok_or(RequestError::EmptyChain(0))?;
    let data_descs = rest.split_last().map_or(&[][..], |(_, data)| data);

    if header_desc.is_write_only() {
        return Err(RequestError::HeaderWriteOnly(header_desc.addr().0));
    }
    if header_desc.len() < HEADER_SIZE {
        return Err(RequestError::HeaderTooShort(header_desc.len()));
    }
    // `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
    let header: [u8; HEADER_SIZE as usize] =
        mem.read_obj(header_desc.addr())
            .map_err(|source| RequestError::HeaderRead {
                addr: header_desc.addr().0,
                source,
            })?;
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    let request_type = RequestType::from(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes(s);

    let wants_writable = match request_type {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        RequestType::Flush => None, // carries no data; extra descriptors are ignored
        RequestType::Unsupported(t) => return Err(RequestError::Unsupported(t)),
    };

    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len: u64 = 0;
    if let Some(writable) = wants_writable {
        for d in data_descs {
            if d.is_write_only() != writable {
                return Err(RequestError::DataDirection {
                    request: request_type,
                    found: if d.is_write_only() {
                        "write-only"
                    } else {
                        "read-only"
                    },
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            let access = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let inside = d.addr().checked_add(u64::from(d.len())).is_some()
                && mem.check_range(d.addr(), d.len() as usize, access);
            if !inside {
                return Err(RequestError::DataOutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            data.push((d.addr(), d.len()));
            // At most 2^16 descriptors of < 2^32 bytes each: cannot overflow u64.
            data_len += u64::from(d.len());
        }
    }

    if matches!(request_type, RequestType::In | RequestType::Out) {
        if !data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength(data_len));
        }
        if request_type == RequestType::Out && disk.read_only() {
            return Err(RequestError::ReadOnly(sector));
        }
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(data_len))
            .ok_or(RequestError::OffsetOverflow {
                sector,
                len: data_len,
            })?;
        if end > disk.size() {
            return Err(RequestError::OutOfRange {
                sector,
                len: data_len,
                disk_sectors: disk.sectors(),
            });
        }
    }

    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status_addr,
    })
}

/// Executes a parsed request against `disk`; returns the number of bytes written into guest
/// data buffers (not counting the status byte).
pub fn execute_request(
    req: &Request,
    mem: &GuestMemoryMmap,
    disk: &Disk,
) -> Result<u32, RequestError> {
    match req.request_type {
        RequestType::In => {
            let mut buf = vec![0u8; chunk_len(req.data_len)];
            let mut offset = byte_offset(req)?;
            for &(addr, len) in &req.data {
                copy_chunks(addr, len, &mut buf, |gpa, chunk| {
                    disk.read_at(chunk, offset)
                        .map_err(|source| RequestError::Io {
                            op: "read",
                            offset,
                            source,
                        })?;
                    mem.write_slice(chunk, gpa)
                        .map_err(|source| RequestError::Memory {
                            addr: gpa.0,
                            source,
                        })?;
                    offset += chunk.len() as u64;
                    Ok(())
                })?;
            }
            // The whole chain is < 2^32 bytes (virtio-queue stops iterating otherwise).
            Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
        }
        RequestType::Out => {
            let mut buf = vec![0u8; chunk_len(req.data_len)];
            let mut offset = byte_offset(req)?;
            for &(addr, len) in &req.data {
                copy_chunks(addr, len, &mut buf, |gpa, chunk| {
                    mem.read_slice(chunk, gpa)
                        .map_err(|source| RequestError::Memory {
                            addr: gpa.0,
                            source,
                        })?;
                    disk.write_at(chunk, offset)
                        .map_err(|source| RequestError::Io {
                            op: "write",
                            offset,
                            source,
                        })?;
                    offset += chunk.len() as u64;
                    Ok(())
                })?;
            }
            Ok(0)
        }
        RequestType::Flush => {
            if !disk.read_only() {
                disk.sync_data().map_err(|source| RequestError::Io {
                    op: "flush",
                    offset: 0,
                    source,
                })?;
            }
            Ok(0)
        }
        RequestType::GetId => {
            let mut id: &[u8] = disk.id();
            let mut written = 0u32;
            for &(addr, len) in &req.data {
                if id.is_empty() {
                    break;
                }
                let n = id.len().min(len as usize);
                mem.write_slice(&id[..n], addr)
                    .map_err(|source| RequestError::Memory {
                        addr: addr.0,
                        source,
                    })?;
                id = &id[n..];
                written += n as u32; // at most 20
            }
            Ok(written)
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

/// Byte offset of the request's first sector (checked again: `Request` fields are public).
fn byte_offset(req: &Request) -> Result<u64, RequestError> {
    req.sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::OffsetOverflow {
            sector: req.sector,
            len: req.data_len,
        })
}

fn chunk_len(total: u64) -> usize {
    usize::try_from(total).map_or(COPY_CHUNK, |t| t.min(COPY_CHUNK))
}

/// Calls `f` for consecutive pieces of `[addr, addr + len)`, each at most `buf.len()` bytes.
fn copy_chunks(
    addr: GuestAddress,
    len: u32,
    buf: &mut [u8],
    mut f: impl FnMut(GuestAddress, &mut [u8]) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut done: u64 = 0;
    while done < u64::from(len) {
        let n = buf.len().min((u64::from(len) - done) as usize);
        if n == 0 {
            break; // empty buffer; cannot happen for non-empty data
        }
        // `parse_request` checked that addr + len does not wrap; stay safe for hand-built
        // requests anyway.
        let gpa = addr
            .checked_add(done)
            .ok_or(RequestError::DataOutsideMemory { addr: addr.0, len })?;
        f(gpa, &mut buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Collects a chain's descriptors, rejecting empty and broken chains.
fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<Descriptor>, RequestError> {
    let head = chain.head_index();
    // virtio-queue bounds the walk to the queue size (or indirect table size) and stops on
    // `next` out of range or unreadable descriptors.
    let descs: Vec<Descriptor> = chain.collect();
    match descs.last() {
        None => Err(RequestError::EmptyChain(head)),
        Some(last) if last.has_next() => Err(RequestError::BrokenChain {
            head,
            count: descs.len(),
        }),
        Some(_) => Ok(descs),
    }
}

/// Handles one descriptor chain end to end and returns the used length to report (data bytes
/// written plus the status byte, or 0 when no status could be written).
pub fn handle_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &Disk,
) -> u32 {
    let head = chain.head_index();
    let descs = match collect_chain(chain) {
        Ok(d) => d,
        Err(e) => {
            crate::guest_warn!("virtio-block: {e}; completing it with length 0");
            return 0;
        }
    };
    let status_addr = match status_descriptor(&descs, mem) {
        Ok(a) => a,
        Err(e) => {
            crate::guest_warn!("virtio-block: chain {head}: {e}; completing it with length 0");
            return 0;
        }
    };
    let (status, written) = match parse_request(&descs, status_addr, mem, disk).and_then(|req| {
        let written = execute_request(&req, mem, disk)?;
        disk.count(req.request_type, req.data_len);
        Ok(written)
    }) {
        Ok(written) => (STATUS_OK, written),
        Err(e) => {
            crate::guest_warn!("virtio-block: chain {head}: {e}");
            (e.status(), 0)
        }
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            crate::guest_warn!(
                "virtio-block: chain {head}: failed to write the status byte at {:#x}: {e}",
                status_addr.0
            );
            0
        }
    }
}

/// Drains `queue`: notifications are disabled while chains are processed and re-enabled at the
/// end, looping if the driver added more chains meanwhile. Returns whether any chain was
/// completed (the caller then decides whether to interrupt via `needs_notification`).
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, disk: &Disk) -> bool {
    process_queue_limited(queue, mem, disk, &mut RateLimiter::unlimited()).used_any
}

/// What [`process_queue_limited`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Some chain was completed.
    pub used_any: bool,
    /// The rate limiter refused the next chain: it stays in the ring, notifications stay
    /// off, and the caller retries after `limiter.wait_time()`.
    pub throttled: bool,
}

/// As [`process_queue`], charging each chain (its descriptors' total length, and one
/// operation) to `limiter` before handling it.
pub fn process_queue_limited(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    limiter: &mut RateLimiter,
) -> QueueOutcome {
    let mut used_any = false;
    let outcome = |used_any, throttled| QueueOutcome {
        used_any,
        throttled,
    };
    let mut empty_rounds = 0u8;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            crate::guest_warn!("virtio-block: cannot disable queue notifications: {e}");
            return outcome(used_any, false);
        }
        let mut progressed = false;
        loop {
            // A fresh iterator per chain: `add_used` needs the queue back in between.
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    // E.g. an avail index more than a queue size ahead: unrecoverable until the
                    // driver resets the device; stop instead of spinning.
                    crate::guest_warn!("virtio-block: cannot read the available ring: {e}");
                    return outcome(used_any, false);
                }
            };
            let Some(chain) = chain else { break };
            if limiter.is_limited() {
                // The chain's length bounds the data moved (the iterator stops at a queue's
                // worth of descriptors, so a looping chain costs a bounded amount to measure).
                let cost = chain
                    .clone()
                    .map(|d| u64::from(d.len()))
                    .fold(0u64, u64::saturating_add);
                if !limiter.try_consume(cost) {
                    queue.go_to_previous_position();
                    return outcome(used_any, true);
                }
            }
            progressed = true;
            let head = chain.head_index();
            let len = handle_chain(chain, mem, disk);
            match queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => crate::guest_warn!("virtio-block: cannot complete chain {head}: {e}"),
            }
        }
        match queue.enable_notification(mem) {
            // More chains arrived while notifications were off.
            Ok(true) if progressed => empty_rounds = 0,
            // A chain published just after the ring was read: read it again (stopping here
            // would leave it unprocessed, with no kick to come).
            Ok(true) if empty_rounds == 0 => empty_rounds = 1,
            Ok(true) => {
                // The ring claims more chains but none could be read: do not spin.
                crate::guest_warn!("virtio-block: available ring is not readable; stopping");
                return outcome(used_any, false);
            }
            Ok(false) => return outcome(used_any, false),
            Err(e) => {
                crate::guest_warn!("virtio-block: cannot re-enable queue notifications: {e}");
                return outcome(used_any, false);
            }
        }
    }
}

#[cfg(test)]
mod tests;
