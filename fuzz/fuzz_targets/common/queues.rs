//! Guest memory laid out by the fuzz input: for each queue a descriptor table and available
//! ring taken from the input (a hostile driver's), then the rest of the input as the bytes the
//! descriptors point at.

use ember_devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const MEM_SIZE: usize = 0x2_0000;
pub const QUEUE_SIZE: u16 = 16;
/// Queue `i`'s descriptor table is at `i * 0x1000`, its available ring 0x400 later, its used
/// ring 0x800 later; data starts after the last queue's page.
const DESC_BYTES: usize = QUEUE_SIZE as usize * 16;
const AVAIL_BYTES: usize = 4 + QUEUE_SIZE as usize * 2;

/// Guest memory with `count` queues from `data`, the queues, and the input not used.
pub fn from_input(data: &[u8], count: usize) -> (GuestMemoryMmap, Vec<Queue>, &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rest = data;
    let mut queues = Vec::new();
    for index in 0..count {
        let base = index as u64 * 0x1000;
        let (desc, more) = rest.split_at(rest.len().min(DESC_BYTES));
        let (avail, more) = more.split_at(more.len().min(AVAIL_BYTES));
        rest = more;
        mem.write_slice(desc, GuestAddress(base)).unwrap();
        mem.write_slice(avail, GuestAddress(base + 0x400)).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x400) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x800) as u32), Some(0));
        queue.set_ready(true);
        queues.push(queue);
    }
    let data_start = count * 0x1000;
    let (fill, rest) = rest.split_at(rest.len().min(MEM_SIZE - data_start));
    mem.write_slice(fill, GuestAddress(data_start as u64))
        .unwrap();
    (mem, queues, rest)
}
