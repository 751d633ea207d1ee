//! The device without a guest kernel: in-memory guest memory, a hand-written driver on the two
//! queues, the real event loop, and a `SOCK_SEQPACKET` socket pair in place of the TAP (one
//! message per frame, like a TAP queue).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::rate_limiter::RateLimit;
use crate::virtio::test_rings::Rings;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const MAC: [u8; 6] = [0x06, 0xe0, 0x00, 0x00, 0x00, 0x01];
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 64;
const RX_BUF: u64 = 0x10_0000;
const RX_LEN: u32 = 2048;
const TX_BUF: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A `SOCK_SEQPACKET` pair: (device end, host end).
fn frame_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills the two-element array it is given; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

/// A frame as the TAP carries it: an empty virtio header, then Ethernet bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Net>>,
    em: EventManager<Arc<Mutex<Net>>>,
    rings: [Rings; 2],
    kicks: Vec<EventFd>,
    /// The host side of the "TAP" (message boundaries kept, like the real one).
    host: UnixDatagram,
    next_rx: u16,
    next_tx: u16,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(false, None)
    }

    /// A device offering offloads (`offloads`) with `acked` features acked before activation.
    fn with(offloads: bool, acked: Option<u64>) -> Harness {
        Harness::build(offloads, acked, NetRateLimits::default())
    }

    /// A device without offloads whose traffic is limited by `limits`.
    fn limited(limits: NetRateLimits) -> Harness {
        Harness::build(false, None, limits)
    }

    fn build(offloads: bool, acked: Option<u64>, limits: NetRateLimits) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (dev_end, host_end) = frame_pair();
        let tap = Tap::from_fd(dev_end, "test0").unwrap();
        let mut net = Net::with_offloads(tap, MAC, offloads).unwrap();
        if let Some(acked) = acked {
            net.set_acked_features(acked);
        }
        net.set_rate_limits(limits).unwrap();
        let dev = Arc::new(Mutex::new(net));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let rings = [
            Rings::new(&mem, 0x1000, QSIZE),
            Rings::new(&mem, 0x4000, QSIZE),
        ];
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let queues = rings.iter().map(|r| r.queue(&mem)).collect();
        let intr = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.lock()
            .unwrap()
            .activate(mem.clone(), queues, evts, intr)
            .unwrap();
        // A SOCK_SEQPACKET socket reads and writes like a datagram socket here.
        let host = UnixDatagram::from(host_end);
        host.set_nonblocking(true).unwrap();
        let mut h = Harness {
            mem,
            dev,
            em,
            rings,
            kicks,
            host,
            next_rx: 0,
            next_tx: 0,
        };
        h.pump();
        h
    }

    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(5).unwrap() == 0 {
                return;
            }
        }
    }

    /// Runs the event loop (timers included) until `done` or `limit` passed; returns whether
    /// `done` held.
    fn pump_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Harness) -> bool) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if done(self) {
                return true;
            }
            self.em.run_with_timeout(20).unwrap();
        }
        done(self)
    }

    fn kick(&mut self, q: usize) {
        self.kicks[q].write(1).unwrap();
        self.pump();
    }

    fn stats(&self) -> NetStats {
        self.dev.lock().unwrap().stats()
    }

    /// Publishes a receive chain of one descriptor of `len` bytes with `flags`; returns its
    /// head index.
    fn post_rx_with(&mut self, len: u32, flags: u16) -> u16 {
        let index = self.next_rx % QSIZE;
        self.next_rx += 1;
        let addr = RX_BUF + u64::from(index) * 0x1000;
        self.rings[RX].desc(&self.mem, index, addr, len, flags, 0);
        self.rings[RX].make_avail(&self.mem, index);
        index
    }

    fn post_rx(&mut self) -> u16 {
        self.post_rx_with(RX_LEN, W)
    }

    /// The frames the guest received since the last call: (head, used length, bytes).
    fn received(&mut self) -> Vec<(u16, u32, Vec<u8>)> {
        self.rings[RX]
            .take_used(&self.mem)
            .into_iter()
            .map(|(id, len)| {
                let mut data = vec![0u8; len as usize];
                let addr = RX_BUF + u64::from(id) * 0x1000;
                self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
                (id as u16, len, data)
            })
            .collect()
    }

    /// Queues `bytes` as a transmit chain of descriptors split at `split` (if given), with
    /// `flags` on every descriptor.
    fn queue_tx_with(&mut self, bytes: &[u8], split: Option<usize>, flags: u16) -> u16 {
        let head = (self.next_tx * 2) % QSIZE;
        let addr = TX_BUF + u64::from(self.next_tx) * TX_SLOT;
        self.next_tx += 1;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        match split {
            Some(at) => {
                self.rings[TX].desc(&self.mem, head, addr, at as u32, flags | NEXT, head + 1);
                self.rings[TX].desc(
                    &self.mem,
                    head + 1,
                    addr + at as u64,
                    (bytes.len() - at) as u32,
                    flags,
                    0,
                );
            }
            None => self.rings[TX].desc(&self.mem, head, addr, bytes.len() as u32, flags, 0),
        }
        self.rings[TX].make_avail(&self.mem, head);
        head
    }

    /// Sends a frame the way Linux does (header descriptor, frame descriptor) and kicks.
    fn transmit(&mut self, bytes: &[u8]) -> u16 {
        let head = self.queue_tx_with(bytes, Some(VNET_HDR_LEN), 0);
        self.kick(TX);
        head
    }

    /// Frames the host side received.
    fn host_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

#[test]
fn features_and_config_space_carry_the_mac() {
    let h = Harness::new();
    let mut dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_NET);
    assert_eq!(dev.queue_max_sizes(), &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]);
    let features = dev.avail_features();
    assert_eq!(features, FEATURE_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    dev.set_acked_features(features | 1 << 0);
    assert_eq!(
        dev.acked_features(),
        features,
        "an unoffered feature was kept"
    );
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    let mut past = [0xffu8; 4];
    dev.read_config(4, &mut past);
    assert_eq!(past, [MAC[4], MAC[5], 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    dev.write_config(0, &[1, 2, 3, 4, 5, 6]);
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC, "the guest changed its MAC");
}

#[test]
fn frames_flow_both_ways() {
    let mut h = Harness::new();
    // Guest → host.
    let sent = frame(60, 1);
    let head = h.transmit(&sent);
    assert_eq!(h.host_frames(), vec![sent.clone()]);
    assert_eq!(h.rings[TX].take_used(&h.mem), vec![(u32::from(head), 0)]);
    // Host → guest, into a buffer posted before the frame came.
    let rx_head = h.post_rx();
    h.kick(RX);
    let incoming = frame(1514, 7);
    h.host.send(&incoming).unwrap();
    h.pump();
    let got = h.received();
    assert_eq!(got.len(), 1);
    let (id, len, data) = &got[0];
    assert_eq!((*id, *len as usize), (rx_head, incoming.len()));
    // num_buffers is 1; everything else as the host sent it.
    let mut expected = incoming.clone();
    expected[10] = 1;
    assert_eq!(data, &expected);
    let stats = h.stats();
    assert_eq!(
        (
            stats.tx_frames,
            stats.tx_bytes,
            stats.rx_frames,
            stats.rx_bytes
        ),
        (1, 60, 1, 1514)
    );
    assert_eq!(
        (stats.tx_dropped, stats.rx_dropped, stats.rx_bad_chains),
        (0, 0, 0)
    );
}

#[test]
fn hostile_transmit_chains_are_dropped_counted_and_completed() {
    let mut h = Harness::new();
    let mut heads = Vec::new();
    // Shorter than a header and an Ethernet header.
    heads.push(h.queue_tx_with(&frame(ETH_HLEN - 1, 0), None, 0));
    // Larger than the largest frame.
    heads.push(h.queue_tx_with(&frame(MAX_FRAME_LEN + 1, 0), Some(VNET_HDR_LEN), 0));
    // Device-writable buffers on the transmit queue.
    heads.push(h.queue_tx_with(&frame(60, 0), Some(VNET_HDR_LEN), W));
    // A descriptor outside guest memory.
    let head = (h.next_tx * 2) % QSIZE;
    h.next_tx += 1;
    h.rings[TX].desc(&h.mem, head, MEM_SIZE as u64 - 16, 100, 0, 0);
    h.rings[TX].make_avail(&h.mem, head);
    heads.push(head);
    // A chain that loops.
    let head = (h.next_tx * 2) % QSIZE;
    h.next_tx += 1;
    h.rings[TX].desc(&h.mem, head, TX_BUF, 100, NEXT, head);
    h.rings[TX].make_avail(&h.mem, head);
    heads.push(head);
    // A header asking for offloads that were never negotiated: sent, with the header cleared.
    let mut gso = frame(60, 3);
    gso[..VNET_HDR_LEN].copy_from_slice(&[1, 4, 0x40, 0, 0xdc, 5, 0, 0, 0, 0, 0, 0]);
    heads.push(h.queue_tx_with(&gso, Some(VNET_HDR_LEN), 0));
    h.kick(TX);
    let used = h.rings[TX].take_used(&h.mem);
    let expected: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    assert_eq!(used, expected, "every chain is completed, with length 0");
    let cleared = frame(60, 3);
    assert_eq!(h.host_frames(), vec![cleared]);
    let stats = h.stats();
    assert_eq!((stats.tx_dropped, stats.tx_frames), (5, 1));
    // The device still works.
    let good = frame(100, 9);
    h.transmit(&good);
    assert_eq!(h.host_frames(), vec![good]);
}

#[test]
fn received_frames_wait_for_buffers_in_order() {
    let mut h = Harness::new();
    let (a, b) = (frame(100, 1), frame(200, 2));
    h.host.send(&a).unwrap();
    h.host.send(&b).unwrap();
    h.pump();
    assert!(h.received().is_empty());
    // One buffer: the first frame. Another: the second.
    h.post_rx();
    h.kick(RX);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2[VNET_HDR_LEN..], a[VNET_HDR_LEN..]);
    h.post_rx();
    h.kick(RX);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2[VNET_HDR_LEN..], b[VNET_HDR_LEN..]);
    assert_eq!(h.stats().rx_dropped, 0);
}

#[test]
fn unusable_receive_buffers_cost_the_guest_not_the_device() {
    let mut h = Harness::new();
    // A device-readable receive buffer is completed empty; the frame goes to the next buffer.
    let bad = h.post_rx_with(RX_LEN, 0);
    let good = h.post_rx();
    h.kick(RX);
    let f = frame(300, 5);
    h.host.send(&f).unwrap();
    h.pump();
    let got = h.received();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].0, got[0].1), (bad, 0));
    assert_eq!((got[1].0, got[1].1 as usize), (good, f.len()));
    assert_eq!(h.stats().rx_bad_chains, 1);
    // A buffer too small for a frame: the frame is dropped, the buffer kept for a smaller one.
    let small = h.post_rx_with(200, W);
    h.kick(RX);
    h.host.send(&frame(500, 6)).unwrap();
    h.pump();
    assert!(h.received().is_empty());
    assert_eq!(h.stats().rx_dropped, 1);
    let fits = frame(150, 7);
    h.host.send(&fits).unwrap();
    h.pump();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1 as usize), (small, fits.len()));
    // Runt frames from the host never reach the guest.
    h.post_rx();
    h.kick(RX);
    h.host.send(&[0u8; VNET_HDR_LEN + 3]).unwrap();
    h.pump();
    assert!(h.received().is_empty());
    assert_eq!(h.stats().rx_dropped, 2);
}

#[test]
fn a_reset_device_leaves_the_tap_alone_until_activated_again() {
    let mut h = Harness::new();
    assert!(h.dev.lock().unwrap().reset());
    h.pump();
    assert!(!h.dev.lock().unwrap().is_activated());
    h.host.send(&frame(100, 1)).unwrap();
    h.pump();
    assert_eq!(
        h.stats().rx_dropped + h.stats().rx_frames,
        0,
        "a reset device read the TAP"
    );
}

#[test]
fn offloads_are_offered_only_on_a_tap_that_takes_them_and_kept_only_when_negotiated() {
    let offered = Harness::with(true, None)
        .dev
        .lock()
        .unwrap()
        .avail_features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(offered & 1 << bit, 0, "feature {bit} not offered");
    }
    // A segmented frame with a partial checksum: 30,000 bytes, gso TCPv4, mss 1448.
    let mut gso = frame(30_000, 4);
    gso[..VNET_HDR_LEN].copy_from_slice(&[1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 9, 9]);
    // All negotiated: sent whole, the header as the guest wrote it but num_buffers.
    let mut h = Harness::with(true, Some(offered));
    h.transmit(&gso);
    let mut expected = gso.clone();
    expected[10..12].fill(0);
    assert_eq!(h.host_frames(), vec![expected.clone()]);
    // Checksums only: a frame that large is refused; a small one keeps its checksum request
    // and loses the segmentation fields.
    let mut h = Harness::with(true, Some(FEATURE_VERSION_1 | 1 << VIRTIO_NET_F_CSUM));
    h.transmit(&gso);
    assert!(h.host_frames().is_empty());
    assert_eq!(h.stats().tx_dropped, 1);
    let mut small = frame(100, 5);
    small[..VNET_HDR_LEN].copy_from_slice(&[1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0]);
    h.transmit(&small);
    let mut expected = small.clone();
    expected[1..6].fill(0);
    assert_eq!(h.host_frames(), vec![expected]);
    assert_eq!(tun_offloads(offered), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
    assert_eq!(
        tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
        0,
        "TSO without checksums"
    );
}

/// `count` distinct frames of `len` bytes.
fn frames(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count).map(|i| frame(len, i as u8)).collect()
}

#[test]
fn the_transmit_limit_holds_frames_in_the_ring_and_sends_them_all_in_order() {
    let limits = NetRateLimits {
        tx: RateLimit {
            bytes_per_sec: None,
            ops_per_sec: Some(20),
        },
        ..NetRateLimits::default()
    };
    let mut h = Harness::limited(limits);
    let sent = frames(30, 100);
    let heads: Vec<u16> = sent
        .iter()
        .map(|f| h.queue_tx_with(f, Some(VNET_HDR_LEN), 0))
        .collect();
    let start = std::time::Instant::now();
    h.kick(TX);
    // The bucket's 20 frames and one more (into debt) go at once; the rest wait in the ring.
    let mut got = h.host_frames();
    assert_eq!(got.len(), 21, "frames sent before the limit held");
    assert_eq!(h.rings[TX].take_used(&h.mem).len(), 21);
    assert!(h.stats().tx_throttled >= 1);
    // Kicks while held back send nothing.
    h.kick(TX);
    assert!(h.host_frames().is_empty(), "a kick got past the limit");
    // The timer sends the other 9 at 20 a second: ~0.45 s more.
    let all = h.pump_until(Duration::from_secs(5), |h| {
        got.extend(h.host_frames());
        got.len() == sent.len()
    });
    let elapsed = start.elapsed();
    assert!(all, "only {} of {} frames were sent", got.len(), sent.len());
    assert_eq!(got, sent, "frames lost, duplicated or reordered");
    assert!(
        elapsed >= Duration::from_millis(400),
        "30 frames at 20/s took {elapsed:?}"
    );
    let used: Vec<u32> = h.rings[TX]
        .take_used(&h.mem)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let expected: Vec<u32> = heads[21..].iter().map(|&h| u32::from(h)).collect();
    assert_eq!(used, expected);
    assert_eq!((h.stats().tx_frames, h.stats().tx_dropped), (30, 0));
}

#[test]
fn the_receive_limit_holds_frames_back_without_losing_one() {
    let limits = NetRateLimits {
        rx: RateLimit {
            bytes_per_sec: Some(10_000),
            ops_per_sec: None,
        },
        ..NetRateLimits::default()
    };
    let mut h = Harness::limited(limits);
    for _ in 0..QSIZE {
        h.post_rx();
    }
    h.kick(RX);
    let incoming = frames(15, 1000);
    let start = std::time::Instant::now();
    for f in &incoming {
        h.host.send(f).unwrap();
    }
    h.pump();
    // 10,000 bytes in the bucket: ten frames, and an eleventh into debt.
    let mut got: Vec<Vec<u8>> = h.received().into_iter().map(|(_, _, d)| d).collect();
    assert_eq!(got.len(), 11, "frames delivered before the limit held");
    assert!(h.stats().rx_throttled >= 1);
    // The other four at 1,000 bytes per 0.1 s.
    let all = h.pump_until(Duration::from_secs(5), |h| {
        got.extend(h.received().into_iter().map(|(_, _, d)| d));
        got.len() == incoming.len()
    });
    let elapsed = start.elapsed();
    assert!(
        all,
        "only {} of {} frames arrived",
        got.len(),
        incoming.len()
    );
    for (got, sent) in got.iter().zip(&incoming) {
        assert_eq!(
            got[VNET_HDR_LEN..],
            sent[VNET_HDR_LEN..],
            "frames out of order"
        );
    }
    assert!(
        elapsed >= Duration::from_millis(350),
        "15,000 bytes at 10,000/s took {elapsed:?}"
    );
    assert_eq!((h.stats().rx_frames, h.stats().rx_dropped), (15, 0));
}

#[test]
fn an_unlimited_device_has_no_timers_and_never_throttles() {
    let mut h = Harness::new();
    let sent = frames(30, 1400);
    for f in &sent {
        h.queue_tx_with(f, Some(VNET_HDR_LEN), 0);
    }
    h.kick(TX);
    assert_eq!(h.host_frames(), sent);
    let dev = h.dev.lock().unwrap();
    assert!(dev.rx_throttle.timer().is_none() && dev.tx_throttle.timer().is_none());
    assert_eq!((dev.stats().rx_throttled, dev.stats().tx_throttled), (0, 0));
}
