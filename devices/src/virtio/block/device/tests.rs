use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::request::STATUS_OK;
use crate::virtio::mmio::{regs, MmioTransport};
use crate::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::VIRTIO_MMIO_INT_VRING;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

fn image(len: u64) -> TempFile {
    let f = TempFile::new_with_prefix(std::env::temp_dir().join("ember-blkdev-test-")).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    f.as_file().write_all_at(&data, 0).unwrap();
    f
}

fn config(b: &Block, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xffu8; len];
    b.read_config(offset, &mut v);
    v
}

#[test]
fn features_and_config_space() {
    let img = image(64 * 512 + 100);
    let b = Block::new(img.as_path(), false, "rootfs".into()).unwrap();
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[BLOCK_QUEUE_SIZE]);
    let f = b.avail_features();
    assert_ne!(f & FEATURE_VERSION_1, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_FLUSH, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_SEG_MAX, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);

    assert_eq!(config(&b, 0, 8), 64u64.to_le_bytes());
    assert_eq!(config(&b, 12, 4), 254u32.to_le_bytes());
    assert_eq!(config(&b, 20, 4), 512u32.to_le_bytes());
    // Partly and fully out of range reads give zeros where there is nothing.
    assert_eq!(config(&b, 20, 8), [0, 2, 0, 0, 0, 0, 0, 0]);
    assert_eq!(config(&b, 0x1000, 4), [0; 4]);
    assert_eq!(config(&b, u64::MAX, 8), [0; 8]);

    let ro = Block::new(img.as_path(), true, "ro".into()).unwrap();
    assert_ne!(ro.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn block_over_a_cow_disk() {
    let img = image(64 * 512 + 100);
    let overlay = img.as_path().with_extension("overlay");
    let disk = Disk::open_cow(img.as_path(), &overlay, "cow").unwrap();
    let b = Block::with_disk(disk).unwrap();
    assert_eq!(b.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(config(&b, 0, 8), 64u64.to_le_bytes());
    let cow = b.disk().cow().unwrap();
    assert_eq!(cow.base_path(), img.as_path());
    assert_eq!(cow.overlay_path(), overlay);
    assert!(overlay.exists());
    drop(b);
    assert!(!overlay.exists());

    // A read-only disk gives a read-only device.
    let ro = Block::with_disk(Disk::open(img.as_path(), true, "ro").unwrap()).unwrap();
    assert_ne!(ro.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn config_writes_and_unoffered_acks_are_ignored() {
    let img = image(4096);
    let mut b = Block::new(img.as_path(), false, "x".into()).unwrap();
    b.write_config(0, &[0xff; 8]);
    assert_eq!(config(&b, 0, 8), 8u64.to_le_bytes());
    b.set_acked_features(u64::MAX);
    assert_eq!(b.acked_features(), b.avail_features());
}

#[test]
fn open_errors() {
    let missing = std::env::temp_dir().join("ember-definitely-missing-disk.img");
    assert!(matches!(
        Block::new(&missing, false, String::new()),
        Err(BlockError::Open { .. })
    ));
    assert!(matches!(
        Block::new(&std::env::temp_dir(), true, String::new()),
        Err(BlockError::NotAFile(_)) | Err(BlockError::Open { .. })
    ));
}

#[test]
fn activate_checks_its_inputs() {
    let img = image(4096);
    let mut b = Block::new(img.as_path(), false, "x".into()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let intr = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let ready_queue = || {
        let mut q = Queue::new(16).unwrap();
        q.set_ready(true);
        q
    };

    let err = b
        .activate(mem.clone(), vec![], vec![evt()], intr.clone())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    let err = b
        .activate(mem.clone(), vec![ready_queue()], vec![], intr.clone())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::EventCount {
            expected: 1,
            got: 0
        }
    ));
    let err = b
        .activate(
            mem.clone(),
            vec![Queue::new(16).unwrap()],
            vec![evt()],
            intr.clone(),
        )
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    assert!(!b.is_activated());

    b.activate(mem.clone(), vec![ready_queue()], vec![evt()], intr.clone())
        .unwrap();
    assert!(b.is_activated());
    assert_eq!(b.activate_evt().read().unwrap(), 1);
    let err = b
        .activate(mem.clone(), vec![ready_queue()], vec![evt()], intr.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActive));

    assert!(b.reset());
    assert!(!b.is_activated());
    // Processing an inactive device is a no-op.
    b.process_queue();
}

const QSIZE: u16 = 16;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn bring_up(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemoryMmap>) {
    wr(t, regs::STATUS, ACKNOWLEDGE);
    wr(t, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(t, regs::DRIVER_FEATURES_SEL, 1);
    wr(t, regs::DRIVER_FEATURES, (FEATURE_VERSION_1 >> 32) as u32);
    wr(t, regs::DRIVER_FEATURES_SEL, 0);
    wr(t, regs::DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    wr(t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(t, regs::QUEUE_SEL, 0);
    wr(t, regs::QUEUE_NUM, QSIZE.into());
    wr(t, regs::QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
    wr(t, regs::QUEUE_AVAIL_LOW, vq.avail_addr().0 as u32);
    wr(t, regs::QUEUE_USED_LOW, vq.used_addr().0 as u32);
    wr(t, regs::QUEUE_READY, 1);
    wr(
        t,
        regs::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

fn read_request(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let n = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, n, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 512, n | w, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, w, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
}

/// The whole path the VMM wires up: transport on a vCPU thread, device on the event loop.
#[test]
fn transport_and_event_loop_end_to_end() {
    let img = image(8 * 512);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(img.as_path(), false, "e2e".into()).unwrap(),
    ));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut mmio =
        MmioTransport::new(block.clone(), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());

    let vq = MockSplitQueue::new(&mem, QSIZE);
    bring_up(&mut mmio, &vq);
    assert!(mmio.is_activated());
    assert!(block.lock().unwrap().is_activated());
    assert_eq!(
        block.lock().unwrap().acked_features(),
        FEATURE_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH
    );

    // The event loop picks up the activation and starts watching the queue eventfd.
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    read_request(&mem, &vq, 3);
    wr(&mut mmio, regs::QUEUE_NOTIFY, 0); // as if the ioeventfd fired
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), STATUS_OK);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let expected: Vec<u8> = (3 * 512..4 * 512).map(|i| (i % 253) as u8).collect();
    assert_eq!(got.to_vec(), expected);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut mmio, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    wr(&mut mmio, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

    // Reset: the event loop drops the queue eventfd; a notification now does nothing.
    wr(&mut mmio, regs::STATUS, 0);
    assert!(!block.lock().unwrap().is_activated());
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    wr(&mut mmio, regs::QUEUE_NOTIFY, 0);
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);

    // Bring it up again on a fresh ring: registration works a second time.
    mem.write_slice(&[0u8; 0x400], GuestAddress(0)).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    bring_up(&mut mmio, &vq);
    assert!(mmio.is_activated());
    // Activation plus the notification left pending since the reset.
    em.run_with_timeout(1000).unwrap();
    read_request(&mem, &vq, 5);
    wr(&mut mmio, regs::QUEUE_NOTIFY, 0);
    em.run_with_timeout(1000).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let expected: Vec<u8> = (5 * 512..6 * 512).map(|i| (i % 253) as u8).collect();
    assert_eq!(got.to_vec(), expected);
}
