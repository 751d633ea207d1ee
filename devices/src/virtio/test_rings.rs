//! Tests' side of a split virtqueue: the driver's descriptor table, available ring and used
//! ring laid out in in-memory guest memory (virtio-queue's mock queues leave no room for a full
//! available ring), and a device-side [`Queue`] over them.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// One queue's rings: descriptor table at `base`, available ring 1 KiB later, used ring 2 KiB
/// later (room for 64 entries each).
#[derive(Debug, Clone)]
pub struct Rings {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next available index the driver publishes.
    pub avail_idx: u16,
    /// Used entries already collected.
    pub used_seen: u16,
}

impl Rings {
    /// Zeroed rings for a queue of `size` (at most 64) at `base`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Rings {
        assert!(size <= 64);
        mem.write_slice(&[0u8; 0x1000], GuestAddress(base)).unwrap();
        Rings {
            size,
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A ready device-side queue over these rings.
    pub fn queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        queue
    }

    /// Writes descriptor `index`.
    pub fn desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        mem.write_obj(raw, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    /// Publishes the chain starting at `head`.
    pub fn make_avail(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The used entries (head id, length) the device added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != used_idx {
            let slot = u64::from(self.used_seen % self.size);
            let id: u32 = mem
                .read_obj(GuestAddress(self.used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = mem
                .read_obj(GuestAddress(self.used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
