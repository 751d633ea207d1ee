//! A hostile driver's virtio-block queue: descriptor table, available ring and request bytes
//! all come from the input, then the device drains the queue twice. Any panic, hang or memory
//! error is a finding; malformed chains must be completed with length 0 or dropped.
#![no_main]

use std::sync::OnceLock;

use ember_devices::virtio::block::request::process_queue;
use ember_devices::virtio::block::Disk;
use ember_devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x2_0000;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DATA: u64 = 0x3000;
const DESC_BYTES: usize = QUEUE_SIZE as usize * 16;
const AVAIL_BYTES: usize = 4 + QUEUE_SIZE as usize * 2;

/// A 64 KiB disk in a temporary file, shared by every run of this process.
fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ember-fuzz-block-{}", std::process::id()));
        std::fs::write(&path, vec![0xa5u8; 64 << 10]).expect("the fuzz disk");
        let disk = Disk::open(&path, false, "fuzz").expect("open the fuzz disk");
        // The open file stays usable; the name is not needed.
        let _ = std::fs::remove_file(&path);
        disk
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (desc, rest) = data.split_at(data.len().min(DESC_BYTES));
    let (avail, rest) = rest.split_at(rest.len().min(AVAIL_BYTES));
    let rest = &rest[..rest.len().min(MEM_SIZE - DATA as usize)];
    mem.write_slice(desc, GuestAddress(DESC)).unwrap();
    mem.write_slice(avail, GuestAddress(AVAIL)).unwrap();
    mem.write_slice(rest, GuestAddress(DATA)).unwrap();

    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    // Event indexes on or off, as the input's first byte says.
    queue.set_event_idx(data.first().is_some_and(|b| b & 1 == 1));
    process_queue(&mut queue, &mem, disk());
    process_queue(&mut queue, &mem, disk());
});
