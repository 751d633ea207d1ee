//! The device end to end without a guest kernel: in-memory guest memory, a hand-written
//! "driver" on the three queues, the real event loop and real Unix sockets.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::virtio::vsock::packet::{
    Header, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::virtio::vsock::{CONN_BUF_ALLOC, HOST_CID, MAX_CONNECT_LINE};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 64;
const QUEUE_BASE: [u64; 3] = [0x1000, 0x4000, 0x7000];
/// rx chains: header descriptor + 4 KiB data descriptor, like Linux 6.1.
const RX_CHAINS: u16 = QSIZE / 2;
const RX_BUF: u64 = 0x10_0000;
const RX_DATA: u32 = 4096;
const TX_SLOTS: u16 = QSIZE / 2;
const TX_BUF: u64 = 0x20_0000;
const TX_SLOT_SIZE: u64 = 0x1_1000;
const EV_BUF: u64 = 0x80_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Prints the device's log lines with the test output (`--nocapture` shows them).
struct TestLogger;

impl log::Log for TestLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        eprintln!("[{}] {}", record.level(), record.args());
    }
    fn flush(&self) {}
}

static LOGGER: TestLogger = TestLogger;

struct Layout {
    desc: u64,
    avail: u64,
    used: u64,
}

/// Descriptor table, available and used rings of queue `q` (mock queues are not used for
/// this: their ring layout does not leave room for a full available ring).
fn layout(q: usize) -> Layout {
    let base = QUEUE_BASE[q];
    Layout {
        desc: base,
        avail: base + 0x400,
        used: base + 0x800,
    }
}

fn make_queue(mem: &GuestMemoryMmap, q: usize) -> Queue {
    // Zeroed rings (flags, idx and every entry) at the same places `layout` gives.
    let rings = crate::virtio::test_rings::Rings::new(mem, QUEUE_BASE[q], QSIZE);
    debug_assert_eq!(rings.used, layout(q).used);
    rings.queue(mem)
}

/// Pseudo-random bytes (xorshift), reproducible.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A received packet.
#[derive(Debug, Clone)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

impl Pkt {
    fn op(&self) -> Option<Op> {
        Op::from_wire(self.hdr.op)
    }
}

struct Harness {
    _dir: TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    kicks: Vec<EventFd>,
    layouts: Vec<Layout>,
    avail: [u16; 3],
    used_seen: [u16; 3],
    /// Guest receive state for the credit it advertises (one counter for all connections:
    /// tests drive one data connection at a time).
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
}

impl Harness {
    fn new() -> Harness {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
        let dir = TempDir::new_with_prefix("/tmp/ember-vsock-dev-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = Arc::new(Mutex::new(Vsock::new(CID, uds.clone()).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let layouts: Vec<Layout> = (0..3).map(layout).collect();
        let mut h = Harness {
            _dir: dir,
            uds,
            mem,
            dev,
            em,
            kicks: Vec::new(),
            layouts,
            avail: [0; 3],
            used_seen: [0; 3],
            guest_buf_alloc: CONN_BUF_ALLOC,
            guest_fwd_cnt: 0,
        };
        h.activate();
        h
    }

    fn activate(&mut self) {
        let queues: Vec<Queue> = (0..3).map(|q| make_queue(&self.mem, q)).collect();
        self.avail = [0; 3];
        self.used_seen = [0; 3];
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        self.kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let intr = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        self.dev
            .lock()
            .unwrap()
            .activate(self.mem.clone(), queues, evts, intr)
            .unwrap();
        for _ in 0..RX_CHAINS {
            self.post_rx_chain();
        }
        self.pump();
    }

    fn desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(
                raw,
                GuestAddress(self.layouts[q].desc + 16 * u64::from(index)),
            )
            .unwrap();
    }

    fn make_avail(&mut self, q: usize, head: u16) {
        let l = &self.layouts[q];
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(l.avail + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(l.avail + 2))
            .unwrap();
    }

    /// Adds rx chain number `avail % RX_CHAINS` (chains are used in order, so it is free).
    fn post_rx_chain(&mut self) {
        let c = self.avail[RX] % RX_CHAINS;
        let buf = RX_BUF + u64::from(c) * 0x2000;
        self.desc(RX, 2 * c, buf, HDR_SIZE as u32, W | NEXT, 2 * c + 1);
        self.desc(RX, 2 * c + 1, buf + 0x100, RX_DATA, W, 0);
        self.make_avail(RX, 2 * c);
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Runs the event loop until it is idle.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(5).unwrap() == 0 {
                return;
            }
        }
    }

    /// Collects new used tx/rx entries: returns the rx packets, re-posting their buffers.
    fn recv(&mut self) -> Vec<Pkt> {
        let mut out = Vec::new();
        let l = &self.layouts[RX];
        let used_idx: u16 = self.mem.read_obj(GuestAddress(l.used + 2)).unwrap();
        while self.used_seen[RX] != used_idx {
            let slot = u64::from(self.used_seen[RX] % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(l.used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(l.used + 8 + 8 * slot))
                .unwrap();
            self.used_seen[RX] = self.used_seen[RX].wrapping_add(1);
            let buf = RX_BUF + u64::from(id / 2) * 0x2000;
            assert!(
                len as usize >= HDR_SIZE,
                "used length {len} id {id} seen {} idx {used_idx} avail {}",
                self.used_seen[RX],
                self.avail[RX]
            );
            let mut hb = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(buf)).unwrap();
            let hdr = Header::from_bytes(&hb);
            assert_eq!(len as usize, HDR_SIZE + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(buf + 0x100))
                .unwrap();
            out.push(Pkt { hdr, data });
        }
        let n = out.len();
        for _ in 0..n {
            self.post_rx_chain();
        }
        if n > 0 {
            self.kick(RX);
        }
        out
    }

    /// Queues a tx packet (header descriptor + payload descriptor) without kicking.
    fn queue_tx(&mut self, hdr: &Header, payload: &[u8]) {
        let slot = self.avail[TX] % TX_SLOTS;
        let buf = TX_BUF + u64::from(slot) * TX_SLOT_SIZE;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(buf))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(buf + 0x100))
            .unwrap();
        if payload.is_empty() {
            self.desc(TX, 2 * slot, buf, HDR_SIZE as u32, 0, 0);
        } else {
            self.desc(TX, 2 * slot, buf, HDR_SIZE as u32, NEXT, 2 * slot + 1);
            self.desc(TX, 2 * slot + 1, buf + 0x100, payload.len() as u32, 0, 0);
        }
        self.make_avail(TX, 2 * slot);
    }

    /// Queues raw descriptors as one tx chain at slot indices (for hostile chains).
    fn queue_tx_raw(&mut self, parts: &[(u64, u32, u16)]) {
        let slot = self.avail[TX] % TX_SLOTS;
        assert!(parts.len() <= 2);
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let index = 2 * slot + i as u16;
            let last = i + 1 == parts.len();
            let flags = if last { flags } else { flags | NEXT };
            self.desc(TX, index, addr, len, flags, index + 1);
        }
        self.make_avail(TX, 2 * slot);
    }

    fn send(&mut self, hdr: &Header, payload: &[u8]) {
        self.queue_tx(hdr, payload);
        self.kick(TX);
        self.pump();
    }

    fn hdr(&self, op: Op, src_port: u32, dst_port: u32, len: usize) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: self.guest_buf_alloc,
            fwd_cnt: self.guest_fwd_cnt,
        }
    }

    fn tx_used(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.layouts[TX].used + 2))
            .unwrap()
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// Pumps until `f` returns true for the collected packets (or fails after 5 s).
    fn recv_until(&mut self, mut f: impl FnMut(&[Pkt]) -> bool) -> Vec<Pkt> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut all = Vec::new();
        loop {
            self.pump();
            all.extend(self.recv());
            if f(&all) {
                return all;
            }
            assert!(Instant::now() < deadline, "timed out; got {all:?}");
        }
    }

    /// Host client: connect, CONNECT to `port`, and complete the handshake as the guest.
    /// Returns the client socket and the connection's host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let pkts = self.recv_until(|p| !p.is_empty());
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let req = pkts[0].hdr;
        assert_eq!(pkts[0].op(), Some(Op::Request));
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, CID, port)
        );
        assert!(req.src_port >= 1024);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let resp = self.hdr(Op::Response, port, req.src_port, 0);
        self.send(&resp, &[]);
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            client.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
        (client, req.src_port)
    }

    /// Guest side of a data transfer: sends `data` on (guest port, host port) respecting the
    /// device's credit as advertised in the packets it receives.
    fn guest_send_all(&mut self, guest_port: u32, host_port: u32, data: &[u8]) {
        let mut peer_fwd = 0u32;
        let mut peer_alloc = CONN_BUF_ALLOC;
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent < data.len() {
            let credit = peer_alloc as usize - (sent - peer_fwd as usize);
            let n = credit.min(data.len() - sent).min(MAX_PKT_LEN as usize);
            if n > 0 {
                let h = self.hdr(Op::Rw, guest_port, host_port, n);
                self.send(&h, &data[sent..sent + n]);
                sent += n;
            } else {
                // Wait for a credit update.
                self.pump();
                assert!(Instant::now() < deadline, "no credit update");
            }
            for p in self.recv() {
                if p.hdr.src_port == host_port {
                    assert_ne!(p.op(), Some(Op::Rst), "reset while sending");
                    peer_fwd = p.hdr.fwd_cnt;
                    peer_alloc = p.hdr.buf_alloc;
                }
            }
        }
    }
}

fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    stream.read_exact(&mut v).unwrap();
    v
}

#[test]
fn features_config_and_activation_checks() {
    let dir = TempDir::new_with_prefix("/tmp/ember-vsock-dev-").unwrap();
    let uds = dir.as_path().join("v.sock");
    assert!(matches!(
        Vsock::new(2, uds.clone()),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), uds.clone()),
        Err(VsockError::InvalidCid(_))
    ));
    let mut d = Vsock::new(0x1_2345, uds.clone()).unwrap();
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes(), &[VSOCK_QUEUE_SIZE; 3]);
    assert_eq!(d.avail_features(), FEATURE_VERSION_1);
    d.set_acked_features(u64::MAX);
    assert_eq!(d.acked_features(), FEATURE_VERSION_1);
    let mut c = [0xffu8; 8];
    d.read_config(0, &mut c);
    assert_eq!(c, 0x1_2345u64.to_le_bytes());
    let mut c = [0xffu8; 4];
    d.read_config(4, &mut c);
    assert_eq!(c, [0; 4]);
    d.read_config(6, &mut c);
    assert_eq!(c, [0; 4]);
    d.read_config(u64::MAX, &mut c);
    assert_eq!(c, [0; 4]);
    d.write_config(0, &[9; 8]);
    d.read_config(0, &mut c);
    assert_eq!(c, [0x45, 0x23, 0x01, 0]);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let intr = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let evts = |n| {
        (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect::<Vec<_>>()
    };
    let queues = |n, ready| {
        (0..n)
            .map(|_| {
                let mut q = Queue::new(16).unwrap();
                q.set_ready(ready);
                q
            })
            .collect::<Vec<_>>()
    };
    assert!(matches!(
        d.activate(mem.clone(), queues(2, true), evts(3), intr.clone()),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(
        d.activate(mem.clone(), queues(3, true), evts(1), intr.clone()),
        Err(ActivateError::EventCount {
            expected: 3,
            got: 1
        })
    ));
    assert!(matches!(
        d.activate(mem.clone(), queues(3, false), evts(3), intr.clone()),
        Err(ActivateError::QueueNotReady(0))
    ));
    d.activate(mem.clone(), queues(3, true), evts(3), intr.clone())
        .unwrap();
    assert!(d.is_activated());
    assert!(matches!(
        d.activate(mem.clone(), queues(3, true), evts(3), intr.clone()),
        Err(ActivateError::AlreadyActive)
    ));
    assert!(d.reset());
    assert!(!d.is_activated());
    assert!(!d.process_tx());
    assert!(!d.process_rx());
    assert!(uds.exists());
    drop(d);
    assert!(!uds.exists(), "the socket file is removed with the device");
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let mut h = Harness::new();
    let (client, host_port) = h.host_connect(52);
    assert_eq!(h.connections(), 1);

    // Host → guest: 100 KiB, in packets of at most the rx buffer size.
    let data = random_bytes(100 * 1024, 1);
    let writer = {
        let mut c = client.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || c.write_all(&d).unwrap())
    };
    let mut got = Vec::new();
    let pkts = h.recv_until(|p| p.iter().map(|p| p.data.len()).sum::<usize>() >= data.len());
    for p in &pkts {
        assert_eq!(p.op(), Some(Op::Rw), "{p:?}");
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (host_port, 52));
        assert!(p.data.len() <= RX_DATA as usize);
        got.extend_from_slice(&p.data);
    }
    writer.join().unwrap();
    assert!(got == data, "host→guest bytes differ");

    // Guest → host: 600 KiB, more than the credit, with the host reading concurrently.
    let data = random_bytes(600 * 1024, 2);
    let reader = {
        let mut c = client.try_clone().unwrap();
        let n = data.len();
        std::thread::spawn(move || read_exactly(&mut c, n))
    };
    h.guest_send_all(52, host_port, &data);
    let got = reader.join().unwrap();
    assert!(got == data, "guest→host bytes differ");

    // Nothing was reset along the way.
    h.pump();
    assert!(h.recv().iter().all(|p| p.op() != Some(Op::Rst)));
    assert_eq!(h.connections(), 1);
    client.shutdown(Shutdown::Both).unwrap();
}

#[test]
fn host_data_is_back_pressured_by_guest_credit() {
    let mut h = Harness::new();
    h.guest_buf_alloc = 10_000;
    let (mut client, host_port) = h.host_connect(52);
    let data = random_bytes(50_000, 3);
    client.write_all(&data).unwrap();
    let pkts = h.recv_until(|p| p.iter().any(|p| p.op() == Some(Op::CreditRequest)));
    h.pump();
    let more = h.recv();
    let rw: Vec<u8> = pkts
        .iter()
        .chain(&more)
        .filter(|p| p.op() == Some(Op::Rw))
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(
        rw.len(),
        10_000,
        "the device sent beyond the guest's credit"
    );
    assert!(rw == data[..10_000]);
    // The guest consumed everything: a credit update releases the next 10 000 bytes.
    h.guest_fwd_cnt = 10_000;
    let update = h.hdr(Op::CreditUpdate, 52, host_port, 0);
    h.send(&update, &[]);
    let pkts = h.recv_until(|p| {
        p.iter()
            .filter(|p| p.op() == Some(Op::Rw))
            .map(|p| p.data.len())
            .sum::<usize>()
            >= 10_000
    });
    let rw: Vec<u8> = pkts
        .iter()
        .filter(|p| p.op() == Some(Op::Rw))
        .flat_map(|p| p.data.clone())
        .collect();
    assert_eq!(rw.len(), 10_000);
    assert!(rw == data[10_000..20_000]);
}

#[test]
fn a_guest_flooding_beyond_its_credit_is_reset() {
    let mut h = Harness::new();
    let (client, host_port) = h.host_connect(52);
    // The host never reads: the socket fills, then the device's buffer, then the guest
    // exceeds the credit it was given.
    let chunk = vec![0xabu8; MAX_PKT_LEN as usize];
    let mut sent = 0usize;
    let mut reset = false;
    let mut max_fwd = 0u32;
    while !reset {
        let hdr = h.hdr(Op::Rw, 52, host_port, chunk.len());
        h.send(&hdr, &chunk);
        sent += chunk.len();
        // Memory stays bounded by what the device advertised.
        let buffered = h.dev.lock().unwrap().muxer.buffered();
        assert!(
            buffered.iter().all(|&b| b <= CONN_BUF_ALLOC as usize),
            "{buffered:?}"
        );
        for p in h.recv() {
            max_fwd = max_fwd.max(p.hdr.fwd_cnt);
            if p.op() == Some(Op::Rst) {
                reset = true;
            }
        }
        assert!(sent < 64 << 20, "never reset");
    }
    // The reset came only once the guest went past its credit: what the host socket took
    // plus the device's fixed buffer.
    assert!(
        sent > max_fwd as usize + CONN_BUF_ALLOC as usize,
        "sent {sent}, fwd {max_fwd}"
    );
    assert_eq!(h.connections(), 0);
    drop(client);
}

#[test]
fn guest_initiated_connections_reach_the_port_listener_or_are_reset() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_1234", h.uds.display())).unwrap();

    let req = h.hdr(Op::Request, 40000, 1234, 0);
    h.send(&req, &[]);
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op(), Some(Op::Response));
    assert_eq!(
        (
            pkts[0].hdr.src_cid,
            pkts[0].hdr.dst_cid,
            pkts[0].hdr.src_port,
            pkts[0].hdr.dst_port
        ),
        (HOST_CID, CID, 1234, 40000)
    );
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let rw = h.hdr(Op::Rw, 40000, 1234, 5);
    h.send(&rw, b"hello");
    assert_eq!(read_exactly(&mut server, 5), b"hello");
    server.write_all(b"world!").unwrap();
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts[0].op(), Some(Op::Rw));
    assert_eq!(pkts[0].data, b"world!");

    // Nobody listens on port 1235.
    let req = h.hdr(Op::Request, 40001, 1235, 0);
    h.send(&req, &[]);
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].op(), Some(Op::Rst));
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (1235, 40001));
    assert_eq!(h.connections(), 1);
}

#[test]
fn host_initiated_connection_refused_by_the_guest() {
    let mut h = Harness::new();
    let mut client = UnixStream::connect(&h.uds).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    let pkts = h.recv_until(|p| !p.is_empty());
    let req = pkts[0].hdr;
    assert_eq!(pkts[0].op(), Some(Op::Request));
    let rst = h.hdr(Op::Rst, 99, req.src_port, 0);
    h.send(&rst, &[]);
    let mut buf = Vec::new();
    assert_eq!(
        client.read_to_end(&mut buf).unwrap(),
        0,
        "client must be closed"
    );
    assert_eq!(h.connections(), 0);
    // No reset is sent back for a reset.
    h.pump();
    assert!(h.recv().is_empty());
}

#[test]
fn shutdown_host_half_close_then_guest_close() {
    let mut h = Harness::new();
    let (mut client, host_port) = h.host_connect(52);
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let pkts = h.recv_until(|p| p.iter().any(|p| p.op() == Some(Op::Shutdown)));
    assert_eq!(pkts[0].data, b"request");
    let sd = pkts.last().unwrap();
    assert_eq!(
        sd.hdr.flags, SHUTDOWN_SEND,
        "a half-close is not a full shutdown"
    );
    // The guest answers and closes (Linux sends SHUTDOWN with both flags on close).
    let rw = h.hdr(Op::Rw, 52, host_port, 8);
    h.send(&rw, b"response");
    let mut sd = h.hdr(Op::Shutdown, 52, host_port, 0);
    sd.flags = SHUTDOWN_BOTH;
    h.send(&sd, &[]);
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts[0].op(), Some(Op::Rst));
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    assert_eq!(h.connections(), 0);
}

#[test]
fn shutdown_guest_half_close_then_host_close() {
    let mut h = Harness::new();
    let (mut client, host_port) = h.host_connect(52);
    // The guest stops sending: the host reads EOF but can still write.
    let mut sd = h.hdr(Op::Shutdown, 52, host_port, 0);
    sd.flags = SHUTDOWN_SEND;
    h.send(&sd, &[]);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
    client.write_all(b"still here").unwrap();
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts[0].data, b"still here");
    // The host closes: SHUTDOWN with both flags, then (both sides done) a reset.
    drop(client);
    let pkts = h.recv_until(|p| p.iter().any(|p| p.op() == Some(Op::Rst)));
    let ops: Vec<_> = pkts.iter().map(Pkt::op).collect();
    assert_eq!(ops, [Some(Op::Shutdown), Some(Op::Rst)]);
    assert_eq!(pkts[0].hdr.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    assert_eq!(h.connections(), 0);
}

#[test]
fn shutdown_guest_stops_receiving() {
    let mut h = Harness::new();
    let (mut client, host_port) = h.host_connect(52);
    let mut sd = h.hdr(Op::Shutdown, 52, host_port, 0);
    sd.flags = SHUTDOWN_RCV;
    h.send(&sd, &[]);
    client.write_all(b"ignored").unwrap();
    h.pump();
    assert!(
        h.recv().is_empty(),
        "nothing goes to a guest that stopped receiving"
    );
    // Data still flows the other way.
    let rw = h.hdr(Op::Rw, 52, host_port, 2);
    h.send(&rw, b"ok");
    assert_eq!(read_exactly(&mut client, 2), b"ok");
}

#[test]
fn transport_reset_drops_connections_and_notifies_the_guest() {
    let mut h = Harness::new();
    let (mut c1, _) = h.host_connect(52);
    let (mut c2, _) = h.host_connect(53);
    assert_eq!(h.connections(), 2);

    // No event buffer yet: the event waits.
    h.dev.lock().unwrap().send_transport_reset();
    h.pump();
    assert!(h.dev.lock().unwrap().transport_reset_pending());
    assert_eq!(h.connections(), 0);
    let mut buf = Vec::new();
    assert_eq!(c1.read_to_end(&mut buf).unwrap(), 0);
    assert_eq!(c2.read_to_end(&mut buf).unwrap(), 0);

    // The driver posts an event buffer: the event arrives.
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_BUF))
        .unwrap();
    h.desc(EVT, 0, EV_BUF, 4, W, 0);
    h.make_avail(EVT, 0);
    h.kick(EVT);
    h.pump();
    assert!(!h.dev.lock().unwrap().transport_reset_pending());
    let used: u16 = h
        .mem
        .read_obj(GuestAddress(h.layouts[EVT].used + 2))
        .unwrap();
    assert_eq!(used, 1);
    let len: u32 = h
        .mem
        .read_obj(GuestAddress(h.layouts[EVT].used + 8))
        .unwrap();
    assert_eq!(len, 4);
    let id: u32 = h.mem.read_obj(GuestAddress(EV_BUF)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);

    // With a buffer already posted, the event goes out at once; new connections work after.
    h.desc(EVT, 1, EV_BUF + 16, 4, W, 0);
    h.make_avail(EVT, 1);
    h.dev.lock().unwrap().send_transport_reset();
    assert!(!h.dev.lock().unwrap().transport_reset_pending());
    h.pump();
    // Until the driver has handled the reset (it re-posts the buffer and kicks), a host
    // connection waits: its request would be torn down by the reset.
    assert!(h.dev.lock().unwrap().rx_held_for_reset());
    let mut early = UnixStream::connect(&h.uds).unwrap();
    early.write_all(b"CONNECT 52\n").unwrap();
    h.pump();
    assert!(
        h.recv().is_empty(),
        "a request went out before the reset was handled"
    );
    h.desc(EVT, 2, EV_BUF + 32, 4, W, 0);
    h.make_avail(EVT, 2);
    h.kick(EVT);
    h.pump();
    assert!(!h.dev.lock().unwrap().rx_held_for_reset());
    let pkts = h.recv_until(|p| !p.is_empty());
    assert_eq!(pkts[0].op(), Some(Op::Request));
    let rst = h.hdr(Op::Rst, 52, pkts[0].hdr.src_port, 0);
    h.send(&rst, &[]);
    drop(early);
    let (mut c3, port) = h.host_connect(52);
    let rw = h.hdr(Op::Rw, 52, port, 3);
    h.send(&rw, b"new");
    assert_eq!(read_exactly(&mut c3, 3), b"new");
}

#[test]
fn malformed_connect_lines_close_the_client() {
    let mut h = Harness::new();
    let silent = UnixStream::connect(&h.uds).unwrap();
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        &[b'A'; MAX_CONNECT_LINE + 8],
    ] {
        let mut c = UnixStream::connect(&h.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(line).unwrap();
        h.pump();
        // Closed: EOF, or a reset when the device left unread bytes behind.
        let mut buf = Vec::new();
        match c.read_to_end(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{line:?}: {e}"
            ),
        }
        assert!(h.recv().is_empty(), "{line:?} reached the guest");
    }
    // The silent client waits without blocking anyone.
    assert_eq!(h.dev.lock().unwrap().pending_client_count(), 1);
    let (mut c, port) = h.host_connect(7);
    let rw = h.hdr(Op::Rw, 7, port, 2);
    h.send(&rw, b"hi");
    assert_eq!(read_exactly(&mut c, 2), b"hi");
    drop(silent);
    h.pump();
    assert_eq!(h.dev.lock().unwrap().pending_client_count(), 0);
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_the_device_keeps_working() {
    let mut h = Harness::new();
    let base = h.hdr(Op::Request, 40000, 77, 0);

    // Each case: the header, and whether a reset answers it.
    let mut unknown_op = base;
    unknown_op.op = 42;
    let mut bad_type = base;
    bad_type.type_ = 2;
    let mut too_long = h.hdr(Op::Rw, 40000, 77, 0);
    too_long.len = MAX_PKT_LEN + 1;
    let mut past_chain = h.hdr(Op::Rw, 40000, 77, 0);
    past_chain.len = 100; // only 10 payload bytes follow
    let mut wrong_src = base;
    wrong_src.src_cid = 99;
    let mut wrong_dst = base;
    wrong_dst.dst_cid = 7;
    let rw_unknown = h.hdr(Op::Rw, 40000, 77, 3);
    let rst_unknown = h.hdr(Op::Rst, 40000, 77, 0);
    let cases: [(Header, &[u8], bool); 8] = [
        (unknown_op, &[], true),
        (bad_type, &[], true),
        (too_long, &[], true),
        (past_chain, &[0; 10], true),
        (wrong_src, &[], false),
        (wrong_dst, &[], true),
        (rw_unknown, b"abc", true),
        (rst_unknown, &[], false),
    ];
    for (hdr, payload, resets) in cases {
        let before = h.tx_used();
        h.send(&hdr, payload);
        assert_eq!(
            h.tx_used(),
            before.wrapping_add(1),
            "{hdr} was not completed"
        );
        let pkts = h.recv();
        if resets {
            assert_eq!(pkts.len(), 1, "{hdr}: {pkts:?}");
            assert_eq!(pkts[0].op(), Some(Op::Rst));
            assert_eq!(pkts[0].hdr.dst_port, 40000);
        } else {
            assert!(pkts.is_empty(), "{hdr}: {pkts:?}");
        }
    }

    // Chains the device cannot even parse are completed and dropped.
    let hostile: [&[(u64, u32, u16)]; 4] = [
        &[(TX_BUF, HDR_SIZE as u32, W)],              // device-writable on tx
        &[(MEM_SIZE as u64 - 8, HDR_SIZE as u32, 0)], // outside guest memory
        &[(u64::MAX - 8, HDR_SIZE as u32, 0)],        // wrapping
        &[(TX_BUF, 20, 0)],                           // shorter than a header
    ];
    for parts in hostile {
        let before = h.tx_used();
        h.queue_tx_raw(parts);
        h.kick(TX);
        h.pump();
        assert_eq!(h.tx_used(), before.wrapping_add(1), "{parts:?}");
        assert!(h.recv().is_empty(), "{parts:?}");
    }
    // A looping chain.
    let slot = h.avail[TX] % TX_SLOTS;
    h.desc(TX, 2 * slot, TX_BUF, HDR_SIZE as u32, NEXT, 2 * slot);
    h.make_avail(TX, 2 * slot);
    h.kick(TX);
    h.pump();
    assert!(h.recv().is_empty());

    // After all that, a normal connection still works.
    let (mut client, port) = h.host_connect(52);
    let rw = h.hdr(Op::Rw, 52, port, 4);
    h.send(&rw, b"fine");
    assert_eq!(read_exactly(&mut client, 4), b"fine");
}

#[test]
fn unusable_rx_buffers_are_skipped() {
    let mut h = Harness::new();
    // Start from a reset device with a ring whose first rx chains are bad.
    assert!(h.dev.lock().unwrap().reset());
    h.pump();
    let queues: Vec<Queue> = (0..3).map(|q| make_queue(&h.mem, q)).collect();
    h.avail = [0; 3];
    h.used_seen = [0; 3];
    let evts: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    h.kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let intr = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    // Chain 0: device-readable; chain 1: too short for a header; then good chains.
    h.desc(RX, 0, RX_BUF, 64, 0, 0);
    h.make_avail(RX, 0);
    h.desc(RX, 2, RX_BUF + 0x2000, 10, W, 0);
    h.make_avail(RX, 2);
    for _ in 2..RX_CHAINS {
        h.post_rx_chain();
    }
    h.dev
        .lock()
        .unwrap()
        .activate(h.mem.clone(), queues, evts, intr)
        .unwrap();
    h.pump();
    let req = h.hdr(Op::Request, 40000, 77, 0);
    h.send(&req, &[]);
    // The two bad chains come back with length 0, then the reset arrives in a good one.
    let l = &h.layouts[RX];
    let used: u16 = h.mem.read_obj(GuestAddress(l.used + 2)).unwrap();
    assert_eq!(used, 3);
    for (slot, want) in [(0u64, 0u32), (1, 0), (2, HDR_SIZE as u32)] {
        let len: u32 = h.mem.read_obj(GuestAddress(l.used + 8 + 8 * slot)).unwrap();
        assert_eq!(len, want, "used slot {slot}");
    }
}

/// Found by the vsock_packets fuzz target: an rx ring whose available index runs more than a
/// queue size ahead cannot be read, yet re-enabling notifications reports buffers; the device
/// looped on that forever, hanging its event loop.
#[test]
fn an_unreadable_rx_ring_does_not_hang_the_device() {
    let mut h = Harness::new();
    let avail_idx = GuestAddress(h.layouts[RX].avail + 2);
    let sane = h.avail[RX];
    h.mem
        .write_obj(sane.wrapping_add(QSIZE + 7), avail_idx)
        .unwrap();
    // A packet for the guest: a request to a port nobody listens on is answered with a reset.
    let req = h.hdr(Op::Request, 40000, 77, 0);
    h.send(&req, &[]);
    assert!(h.recv().is_empty(), "nothing can be delivered yet");
    // The driver repairs its ring and kicks: the reset arrives.
    h.mem.write_obj(sane, avail_idx).unwrap();
    h.kick(RX);
    h.pump();
    let got = h.recv();
    assert_eq!(got.len(), 1, "{} packets", got.len());
    assert_eq!(got[0].op(), Some(Op::Rst));
}

#[test]
fn device_reset_drops_connections() {
    let mut h = Harness::new();
    let (mut client, _) = h.host_connect(52);
    assert!(h.dev.lock().unwrap().reset());
    h.pump();
    assert_eq!(h.connections(), 0);
    let mut buf = Vec::new();
    assert_eq!(client.read_to_end(&mut buf).unwrap(), 0);
    // The listener survives the reset.
    h.activate();
    let (_c, _) = h.host_connect(52);
}

/// The guest sends to a host client that does not read until the host socket is full and the
/// device buffers the rest, then closes. Returns everything the guest sent.
fn fill_until_the_device_buffers(h: &mut Harness, host_port: u32) -> Vec<u8> {
    let data = random_bytes(4 << 20, 9);
    let (mut sent, mut peer_fwd) = (0usize, 0u32);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.dev.lock().unwrap().undelivered_to_host() == 0 {
        let credit = CONN_BUF_ALLOC as usize - (sent - peer_fwd as usize);
        let n = credit.min(MAX_PKT_LEN as usize);
        assert!(sent + n <= data.len(), "the host socket never filled");
        if n > 0 {
            let hdr = h.hdr(Op::Rw, 52, host_port, n);
            h.send(&hdr, &data[sent..sent + n]);
            sent += n;
        } else {
            h.pump();
        }
        for p in h.recv() {
            assert_ne!(p.op(), Some(Op::Rst), "reset while sending");
            peer_fwd = p.hdr.fwd_cnt;
        }
        assert!(Instant::now() < deadline, "no credit update");
    }
    let mut sd = h.hdr(Op::Shutdown, 52, host_port, 0);
    sd.flags = SHUTDOWN_BOTH;
    h.send(&sd, &[]);
    data[..sent].to_vec()
}

#[test]
fn bytes_a_slow_host_reader_has_not_taken_are_delivered_when_the_vm_ends() {
    let mut h = Harness::new();
    let (client, host_port) = h.host_connect(52);
    let sent = fill_until_the_device_buffers(&mut h, host_port);
    let waiting = h.dev.lock().unwrap().undelivered_to_host();
    assert!(waiting > 0);
    // The VM ends (no more event loop); the host starts reading only later.
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut c = client;
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).map(|_| got)
    });
    let lost = h
        .dev
        .lock()
        .unwrap()
        .deliver_to_host(Duration::from_secs(30));
    assert_eq!(lost, 0, "{waiting} bytes waited");
    assert_eq!(h.dev.lock().unwrap().undelivered_to_host(), 0);
    // The guest had shut down its sending side: once drained, the host reads EOF (not a
    // timeout), with every byte in order.
    let got = reader.join().unwrap().expect("the host read EOF");
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the delivered bytes differ");
}

#[test]
fn packets_the_guest_queued_before_the_vm_ended_reach_the_host() {
    let mut h = Harness::new();
    let (client, host_port) = h.host_connect(52);
    // The guest queues its last bytes and a shutdown, kicks, and powers off before the event
    // loop handled the kick.
    let data = h.hdr(Op::Rw, 52, host_port, 5);
    h.queue_tx(&data, b"last\n");
    let mut sd = h.hdr(Op::Shutdown, 52, host_port, 0);
    sd.flags = SHUTDOWN_BOTH;
    h.queue_tx(&sd, &[]);
    let lost = h
        .dev
        .lock()
        .unwrap()
        .deliver_to_host(Duration::from_secs(5));
    assert_eq!(lost, 0);
    let mut c = client;
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("the host read EOF");
    assert_eq!(got, b"last\n");
}

#[test]
fn a_host_reader_that_never_reads_costs_the_vm_end_at_most_the_limit() {
    let mut h = Harness::new();
    let (_client, host_port) = h.host_connect(52);
    fill_until_the_device_buffers(&mut h, host_port);
    let waiting = h.dev.lock().unwrap().undelivered_to_host();
    let lost = h
        .dev
        .lock()
        .unwrap()
        .deliver_to_host(Duration::from_millis(200));
    assert_eq!(lost, waiting);
}
