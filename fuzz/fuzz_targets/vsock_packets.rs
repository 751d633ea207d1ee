//! A hostile driver's virtio-vsock queues: the tx and rx descriptor tables, available rings and
//! packet bytes come from the input; the device hands tx packets to its connection muxer
//! (with a real Unix socket behind it) and fills rx buffers. Any panic, hang or memory error is
//! a finding.
#![no_main]

use std::sync::Arc;

use ember_devices::virtio::vsock::Vsock;
use ember_devices::virtio::{VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "common/queues.rs"]
mod queues;

fuzz_target!(|data: &[u8]| {
    // rx, tx and event queues, then packet bytes.
    let (mem, queues, _) = queues::from_input(data, 3);

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
