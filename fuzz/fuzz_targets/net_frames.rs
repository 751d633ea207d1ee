//! A hostile driver's virtio-net queues: the receive and transmit descriptor tables, available
//! rings and frame bytes come from the input, and so do the frames the host side sends (over a
//! `SOCK_SEQPACKET` pair standing in for the TAP). Any panic, hang or memory error is a
//! finding.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use ember_devices::virtio::net::{Net, Tap};
use ember_devices::virtio::{VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "common/queues.rs"]
mod queues;

/// A connected `SOCK_SEQPACKET` pair.
fn frame_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors were just created and belong to nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many host frames (0 to 3); then a little-endian u16 length for each.
    let (&count, mut rest) = data.split_first().unwrap_or((&0, &[]));
    let mut host_frames = Vec::new();
    for _ in 0..count % 4 {
        let Some((len, more)) = rest.split_first_chunk::<2>() else {
            break;
        };
        rest = more;
        let len = usize::from(u16::from_le_bytes(*len)) % 4000;
        host_frames.push(vec![0x5a; len]);
    }
    let (mem, queues, _) = queues::from_input(rest, 2);
    let (device_end, host_end) = frame_pair();
    for frame in &host_frames {
        // SAFETY: send(2) of a live buffer on a socket this function owns.
        unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&host_end),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
    }
    let tap = Tap::from_fd(device_end, "fuzz0").unwrap();
    let mut net = Net::new(tap, [6, 0, 0, 0, 0, 1]).unwrap();
    let evts = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    net.activate(mem, queues, evts, interrupt).unwrap();
    net.process_tx();
    net.process_rx();
    net.process_tx();
    net.process_rx();
});
