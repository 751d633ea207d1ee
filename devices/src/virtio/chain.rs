//! Descriptor chains as the devices use them: every descriptor checked for direction and for
//! lying inside guest memory before anything is copied, then read or written as one contiguous
//! byte range however the driver split it.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::GuestMemoryMmap;

/// Why a descriptor chain cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The head index is outside the descriptor table.
    #[error("descriptor chain with head {0} is empty (head index out of range)")]
    EmptyChain(u16),
    /// The chain loops, points outside the table, is too long or could not be read.
    #[error("descriptor chain with head {head} is broken after {count} descriptors")]
    BrokenChain {
        /// Head index.
        head: u16,
        /// Descriptors read before it broke.
        count: usize,
    },
    /// A descriptor has the wrong direction for its queue.
    #[error("descriptor {addr:#x}+{len} is {found} on a queue that needs {expected} buffers")]
    Direction {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
        /// What it is.
        found: &'static str,
        /// What the queue needs.
        expected: &'static str,
    },
    /// A descriptor lies (partly) outside guest memory or wraps the address space.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory {
        /// Descriptor address.
        addr: u64,
        /// Descriptor length.
        len: u32,
    },
    /// The chain cannot hold what is needed.
    #[error("descriptor chain holds {have} bytes, need {need}")]
    TooShort {
        /// Bytes in the chain.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Guest memory access failed (cannot happen for validated segments, but is not trusted).
    #[error("guest memory access at {addr:#x} failed: {source}")]
    Memory {
        /// Guest address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Which way the device uses a chain's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads (tx queue): every descriptor must be device-readable.
    Read,
    /// The device writes (rx and event queues): every descriptor must be device-writable.
    Write,
}

/// A descriptor chain's buffers, each checked to lie inside guest memory with the right
/// direction, read and written as one contiguous byte range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl Segments {
    /// Validates `chain` for `dir`. Empty descriptors are skipped.
    pub fn from_chain(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        dir: Direction,
    ) -> Result<Segments, ChainError> {
        let head = chain.head_index();
        // virtio-queue bounds the walk (queue size, indirect table size) and stops on
        // unreadable or out-of-range descriptors, leaving NEXT set on the last one it yields.
        let descs: Vec<Descriptor> = chain.collect();
        match descs.last() {
            None => return Err(ChainError::EmptyChain(head)),
            Some(last) if last.has_next() => {
                return Err(ChainError::BrokenChain {
                    head,
                    count: descs.len(),
                })
            }
            Some(_) => {}
        }
        let mut out = Segments::default();
        for d in &descs {
            let (found, expected) = match (dir, d.is_write_only()) {
                (Direction::Read, true) => ("device-writable", "device-readable"),
                (Direction::Write, false) => ("device-readable", "device-writable"),
                _ => ("", ""),
            };
            if !found.is_empty() {
                return Err(ChainError::Direction {
                    addr: d.addr().0,
                    len: d.len(),
                    found,
                    expected,
                });
            }
            if d.len() == 0 {
                continue;
            }
            let access = match dir {
                Direction::Read => Permissions::Read,
                Direction::Write => Permissions::Write,
            };
            let inside = d.addr().checked_add(u64::from(d.len())).is_some()
                && mem.check_range(d.addr(), d.len() as usize, access);
            if !inside {
                return Err(ChainError::OutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            out.push(d.addr(), d.len());
        }
        Ok(out)
    }

    /// Adds a buffer (tests and hand-built chains; no validation).
    pub fn push(&mut self, addr: GuestAddress, len: u32) {
        self.segs.push((addr, len));
        // At most 2^16 descriptors of < 2^32 bytes: no overflow.
        self.total += u64::from(len);
    }

    /// Total bytes in the chain.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Calls `f(guest address, range in buf)` for each piece of `[offset, offset + len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let end = offset.saturating_add(len as u64);
        if end > self.total {
            return Err(ChainError::TooShort {
                have: self.total,
                need: end,
            });
        }
        let mut seg_start = 0u64;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            let seg_end = seg_start + u64::from(seg_len);
            let pos = offset + done as u64;
            if done < len && pos < seg_end && pos >= seg_start {
                let within = pos - seg_start;
                let n =
                    usize::try_from((seg_end - pos).min((len - done) as u64)).unwrap_or(len - done);
                let gpa = addr.checked_add(within).ok_or(ChainError::OutsideMemory {
                    addr: addr.0,
                    len: seg_len,
                })?;
                f(gpa, done..done + n)?;
                done += n;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes starting `offset` bytes into the chain.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, buf.len(), |gpa, range| {
            mem.read_slice(&mut buf[range], gpa)
                .map_err(|source| ChainError::Memory {
                    addr: gpa.0,
                    source,
                })
        })
    }

    /// Writes `buf` starting `offset` bytes into the chain.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), ChainError> {
        self.for_each_piece(offset, buf.len(), |gpa, range| {
            mem.write_slice(&buf[range], gpa)
                .map_err(|source| ChainError::Memory {
                    addr: gpa.0,
                    source,
                })
        })
    }
}
