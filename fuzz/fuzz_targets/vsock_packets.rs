//! A hostile driver's virtio-vsock queues: the tx and rx descriptor tables, available rings and
//! packet bytes come from the input; the device hands tx packets to its connection muxer
//! (with a real Unix socket behind it) and fills rx buffers. Any panic, hang or memory error is
//! a finding.
#![no_main]

use std::sync::Arc;

use ember_devices::virtio::vsock::Vsock;
use ember_devices::virtio::{VirtioDevice, VirtioInterrupt};
use ember_devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x2_0000;
const QUEUE_SIZE: u16 = 16;
/// rx, tx, event queues: descriptor table at the base, available ring +0x400, used +0x800.
const QUEUE_BASE: [u64; 3] = [0x0, 0x1000, 0x2000];
const DATA: u64 = 0x3000;
const DESC_BYTES: usize = QUEUE_SIZE as usize * 16;
const AVAIL_BYTES: usize = 4 + QUEUE_SIZE as usize * 2;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut rest = data;
    let mut queues = Vec::new();
    for base in QUEUE_BASE {
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
    let rest = &rest[..rest.len().min(MEM_SIZE - DATA as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).unwrap();

    let socket = std::env::temp_dir().join(format!("ember-fuzz-vsock-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut vsock = Vsock::new(3, socket).unwrap();
    let evts = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    vsock.activate(mem, queues, evts, interrupt).unwrap();
    vsock.process_tx();
    vsock.process_rx();
    vsock.process_tx();
    vsock.process_rx();
});
