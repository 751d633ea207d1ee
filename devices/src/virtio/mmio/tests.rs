use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::{ActivateError, VIRTIO_MMIO_INT_VRING};

const F_EXTRA_LOW: u64 = 1 << 3;
const F_EXTRA_HIGH: u64 = 1 << 40;
const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[derive(Default)]
struct Dummy {
    features: u64,
    acked: Option<u64>,
    max_sizes: Vec<u16>,
    activations: Vec<(Vec<u16>, Vec<bool>, usize)>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    fail_activation: bool,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    /// What `queue_states` reports (the device's live queues).
    live: Vec<virtio_queue::QueueState>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = Some(acked);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = CONFIG.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.activations.push((
            queues.iter().map(|q| q.size()).collect(),
            queues.iter().map(|q| q.ready()).collect(),
            queue_evts.len(),
        ));
        self.interrupt = Some(interrupt);
        Ok(())
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.live.clone()
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.interrupt = None;
        true
    }
}

struct T {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Dummy>>,
    mmio: MmioTransport,
    irq: EventFd,
}

fn dummy() -> Dummy {
    Dummy {
        features: FEATURE_VERSION_1 | F_EXTRA_LOW | F_EXTRA_HIGH,
        max_sizes: vec![16, 32],
        ..Default::default()
    }
}

fn setup_with(dev: Dummy) -> T {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mmio = MmioTransport::new(dev.clone(), mem.clone(), irq.try_clone().unwrap()).unwrap();
    T {
        mem,
        dev,
        mmio,
        irq,
    }
}

fn setup() -> T {
    setup_with(dummy())
}

fn rd(t: &mut T, off: u64) -> u32 {
    let mut b = [0xffu8; 4];
    t.mmio.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut T, off: u64, v: u32) {
    t.mmio.write(off, &v.to_le_bytes());
}

/// Driver steps up to FEATURES_OK, acking `features`.
fn negotiate(t: &mut T, features: u64) {
    wr(t, regs::STATUS, ACKNOWLEDGE);
    wr(t, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(t, regs::DRIVER_FEATURES_SEL, 0);
    wr(t, regs::DRIVER_FEATURES, features as u32);
    wr(t, regs::DRIVER_FEATURES_SEL, 1);
    wr(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
    wr(t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Points queue `index` at a mock ring in guest memory and marks it ready.
fn setup_queue(t: &mut T, index: u32, size: u16, start: u64) {
    let mem = t.mem.clone();
    let vq = MockSplitQueue::create(&mem, GuestAddress(start), size);
    wr(t, regs::QUEUE_SEL, index);
    wr(t, regs::QUEUE_NUM, size.into());
    for (lo, addr) in [
        (regs::QUEUE_DESC_LOW, vq.desc_table_addr().0),
        (regs::QUEUE_AVAIL_LOW, vq.avail_addr().0),
        (regs::QUEUE_USED_LOW, vq.used_addr().0),
    ] {
        wr(t, lo, addr as u32);
        wr(t, lo + 4, (addr >> 32) as u32);
    }
    wr(t, regs::QUEUE_READY, 1);
}

const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

#[test]
fn full_init_handshake_activates_the_device() {
    let mut t = setup();
    assert_eq!(rd(&mut t, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, regs::VERSION), 2);
    assert_eq!(rd(&mut t, regs::DEVICE_ID), 42);
    assert_eq!(rd(&mut t, regs::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, regs::STATUS), 0);

    wr(&mut t, regs::STATUS, ACKNOWLEDGE);
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER);

    wr(&mut t, regs::DEVICE_FEATURES_SEL, 0);
    let lo = rd(&mut t, regs::DEVICE_FEATURES);
    wr(&mut t, regs::DEVICE_FEATURES_SEL, 1);
    let hi = rd(&mut t, regs::DEVICE_FEATURES);
    let offered = u64::from(hi) << 32 | u64::from(lo);
    assert_eq!(offered, FEATURE_VERSION_1 | F_EXTRA_LOW | F_EXTRA_HIGH);
    wr(&mut t, regs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);

    let wanted = FEATURE_VERSION_1 | F_EXTRA_LOW;
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::DRIVER_FEATURES, wanted as u32);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::DRIVER_FEATURES, (wanted >> 32) as u32);
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(t.dev.lock().unwrap().acked, Some(wanted));

    // Queue 0: max 16, use 8. Queue 1 left unused.
    wr(&mut t, regs::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 16);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
    setup_queue(&mut t, 0, 8, 0x1000);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
    wr(&mut t, regs::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 32);

    assert!(t.dev.lock().unwrap().activations.is_empty());
    wr(&mut t, regs::STATUS, ALL_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ALL_OK);
    assert!(t.mmio.is_activated());
    assert_eq!(
        t.dev.lock().unwrap().activations,
        vec![(vec![8, 32], vec![true, false], 2)]
    );

    // A notification that reaches the transport is forwarded to the queue's eventfd.
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(t.mmio.queue_evts()[0].read().unwrap(), 1);
    assert!(t.mmio.queue_evts()[1].read().is_err());

    // Interrupts raised by the device show in InterruptStatus until acked.
    let intr = t.dev.lock().unwrap().interrupt.clone().unwrap();
    intr.signal_used_queue().unwrap();
    assert_eq!(t.irq.read().unwrap(), 1);
    assert_eq!(
        rd(&mut t, regs::INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING_FOR_TEST
    );
    wr(&mut t, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING_FOR_TEST);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);

    // Config space.
    let mut b = [0u8; 4];
    t.mmio.read(regs::CONFIG + 2, &mut b);
    assert_eq!(b, [3, 4, 5, 6]);
    assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 0);

    // Reset.
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert!(!t.mmio.is_activated());
    assert_eq!(t.dev.lock().unwrap().resets, 1);
    wr(&mut t, regs::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
    assert_eq!(t.mmio.queues()[0].size(), 16);
    assert_eq!(t.mmio.acked_features(), 0);

    // And the device can be brought up again.
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1000);
    wr(&mut t, regs::STATUS, ALL_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ALL_OK);
    assert_eq!(t.dev.lock().unwrap().activations.len(), 2);
}

const VIRTIO_MMIO_INT_VRING_FOR_TEST: u32 = crate::virtio::VIRTIO_MMIO_INT_VRING;

#[test]
fn unknown_offsets_and_wrong_sizes_are_ignored() {
    let mut t = setup();
    // Wrong sizes and unaligned register accesses read as zero.
    for (off, len) in [(0u64, 1usize), (0, 2), (0, 8), (2, 4), (0x70, 3), (0xff, 1)] {
        let mut b = vec![0xffu8; len];
        t.mmio.read(off, &mut b);
        assert!(b.iter().all(|&x| x == 0), "read {off:#x}/{len}");
    }
    // Unknown and write-only registers read as zero.
    for off in [0x018u64, 0x040, 0x0c0, 0x0f8, 0x014, 0x050] {
        assert_eq!(rd(&mut t, off), 0, "register {off:#x}");
    }
    // Shared memory regions: none.
    assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);

    // Writes with the wrong size or to unknown/read-only registers change nothing.
    t.mmio.write(regs::STATUS, &[ACKNOWLEDGE as u8]);
    t.mmio.write(regs::STATUS, &[ACKNOWLEDGE as u8, 0]);
    t.mmio
        .write(regs::STATUS, &(ACKNOWLEDGE as u64).to_le_bytes());
    t.mmio.write(regs::STATUS + 1, &ACKNOWLEDGE.to_le_bytes());
    for off in [
        0x000u64, 0x004, 0x008, 0x010, 0x034, 0x060, 0x0c0, 0x0fc, 0x0fe,
    ] {
        wr(&mut t, off, 0xffff_ffff);
    }
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert_eq!(rd(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);

    // Config space: sizes 1..=8 pass through, larger or empty accesses do not.
    let mut big = [0xffu8; 16];
    t.mmio.read(regs::CONFIG, &mut big);
    assert_eq!(big, [0; 16]);
    let mut empty = [0u8; 0];
    t.mmio.read(regs::CONFIG, &mut empty);
    t.mmio.write(regs::CONFIG, &[0; 9]);
    t.mmio.write(regs::CONFIG, &[]);
    t.mmio.write(regs::CONFIG + 1, &[9, 9]);
    assert_eq!(t.dev.lock().unwrap().config_writes, vec![(1, vec![9, 9])]);
    let mut eight = [0u8; 8];
    t.mmio.read(regs::CONFIG, &mut eight);
    assert_eq!(eight, CONFIG);
    // Accesses far out in the window do not panic.
    t.mmio.read(MMIO_WINDOW_SIZE - 1, &mut [0u8; 1]);
    t.mmio.read(u64::MAX, &mut [0u8; 4]);
    t.mmio.write(u64::MAX - 3, &[0u8; 4]);
}

#[test]
fn invalid_queue_sizes_are_ignored() {
    let mut t = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    wr(&mut t, regs::QUEUE_SEL, 0);
    for bad in [0u32, 3, 12, 17, 32, 0x1_0000, u32::MAX] {
        wr(&mut t, regs::QUEUE_NUM, bad);
        assert_eq!(t.mmio.queues()[0].size(), 16, "size {bad}");
    }
    wr(&mut t, regs::QUEUE_NUM, 4);
    assert_eq!(t.mmio.queues()[0].size(), 4);
}

#[test]
fn queue_sel_out_of_range_is_ignored() {
    let mut t = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    for sel in [2u32, 100, u32::MAX] {
        wr(&mut t, regs::QUEUE_SEL, sel);
        assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        wr(&mut t, regs::QUEUE_NUM, 8);
        wr(&mut t, regs::QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, regs::QUEUE_READY, 1);
        wr(&mut t, regs::QUEUE_READY, 0);
        wr(&mut t, regs::QUEUE_NOTIFY, sel);
    }
    assert!(t
        .mmio
        .queues()
        .iter()
        .all(|q| !q.ready() && q.size() == q.max_size()));
}

#[test]
fn unoffered_features_are_not_acked() {
    let mut t = setup();
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::DRIVER_FEATURES, u32::MAX);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::DRIVER_FEATURES, u32::MAX);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 2);
    wr(&mut t, regs::DRIVER_FEATURES, u32::MAX);
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let all = FEATURE_VERSION_1 | F_EXTRA_LOW | F_EXTRA_HIGH;
    assert_eq!(t.mmio.acked_features(), all);
    assert_eq!(t.dev.lock().unwrap().acked, Some(all));

    // After FEATURES_OK the feature set is frozen.
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::DRIVER_FEATURES, 0);
    assert_eq!(t.mmio.acked_features(), all);
}

#[test]
fn features_before_driver_status_are_ignored() {
    let mut t = setup();
    wr(&mut t, regs::DRIVER_FEATURES, F_EXTRA_LOW as u32);
    assert_eq!(t.mmio.acked_features(), 0);
}

#[test]
fn legacy_driver_is_refused_at_features_ok() {
    let mut t = setup();
    negotiate(&mut t, F_EXTRA_LOW);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(t.dev.lock().unwrap().acked, None);
}

#[test]
fn out_of_order_status_is_ignored() {
    let mut t = setup();
    // Skipping steps.
    for bad in [
        DRIVER,
        FEATURES_OK,
        DRIVER_OK,
        ACKNOWLEDGE | FEATURES_OK,
        0x10,
        0x20,
    ] {
        wr(&mut t, regs::STATUS, bad);
        assert_eq!(rd(&mut t, regs::STATUS), 0, "status {bad:#x}");
    }
    wr(&mut t, regs::STATUS, ACKNOWLEDGE);
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE);
    // Several steps in one write, in order, are fine.
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER);
    negotiate(&mut t, FEATURE_VERSION_1);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // Clearing a bit without a reset.
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // FAILED sticks until reset and blocks further progress.
    wr(
        &mut t,
        regs::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED,
    );
    wr(&mut t, regs::STATUS, ALL_OK);
    assert_eq!(
        rd(&mut t, regs::STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED
    );
    assert!(!t.mmio.is_activated());
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
}

#[test]
fn queue_registers_are_frozen_once_ready_or_driver_ok() {
    let mut t = setup();
    // Before FEATURES_OK, queue set-up is ignored.
    wr(&mut t, regs::STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut t, regs::QUEUE_NUM, 8);
    assert_eq!(t.mmio.queues()[0].size(), 16);
    wr(&mut t, regs::STATUS, 0);

    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x1000);
    let desc = t.mmio.queues()[0].desc_table();
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_NUM, 4);
    wr(&mut t, regs::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(t.mmio.queues()[0].size(), 8);
    assert_eq!(t.mmio.queues()[0].desc_table(), desc);

    wr(&mut t, regs::STATUS, ALL_OK);
    assert!(t.mmio.is_activated());
    wr(&mut t, regs::QUEUE_READY, 0);
    wr(&mut t, regs::QUEUE_SEL, 1);
    wr(&mut t, regs::QUEUE_NUM, 4);
    wr(&mut t, regs::QUEUE_READY, 1);
    assert!(t.mmio.queues()[0].ready());
    assert!(!t.mmio.queues()[1].ready());
    assert_eq!(t.mmio.queues()[1].size(), 32);
}

#[test]
fn misaligned_queue_addresses_are_ignored() {
    let mut t = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_DESC_LOW, 0x1008); // needs 16-byte alignment
    wr(&mut t, regs::QUEUE_AVAIL_LOW, 0x2001); // needs 2
    wr(&mut t, regs::QUEUE_USED_LOW, 0x3002); // needs 4
    let q = &t.mmio.queues()[0];
    assert_ne!(q.desc_table(), 0x1008);
    assert_ne!(q.avail_ring(), 0x2001);
    assert_ne!(q.used_ring(), 0x3002);
    wr(&mut t, regs::QUEUE_DESC_HIGH, 0x1);
    assert_eq!(t.mmio.queues()[0].desc_table() >> 32, 1);
}

#[test]
fn invalid_queue_at_driver_ok_needs_reset() {
    let mut t = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1000);
    // Move the used ring outside guest memory before marking ready... it is already ready, so
    // use queue 1 instead: ready with rings outside memory.
    wr(&mut t, regs::QUEUE_SEL, 1);
    wr(&mut t, regs::QUEUE_DESC_LOW, 0);
    wr(&mut t, regs::QUEUE_DESC_HIGH, 0x10);
    wr(&mut t, regs::QUEUE_READY, 1);
    wr(&mut t, regs::STATUS, ALL_OK);
    let status = rd(&mut t, regs::STATUS);
    assert_eq!(status & DRIVER_OK, 0);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert!(!t.mmio.is_activated());
    assert!(t.dev.lock().unwrap().activations.is_empty());
    // Still refused (needs reset), then a reset recovers.
    wr(&mut t, regs::STATUS, ALL_OK | DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, regs::STATUS) & DRIVER_OK, 0);
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
}

#[test]
fn device_activation_failure_needs_reset() {
    let mut t = setup_with(Dummy {
        fail_activation: true,
        ..dummy()
    });
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1000);
    wr(&mut t, regs::STATUS, ALL_OK);
    assert_eq!(
        rd(&mut t, regs::STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DEVICE_NEEDS_RESET
    );
    assert!(!t.mmio.is_activated());
}

#[test]
fn constructor_rejects_bad_devices() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let make = |d: Dummy| MmioTransport::new(Arc::new(Mutex::new(d)), mem.clone(), evt());
    assert!(matches!(
        make(Dummy {
            features: F_EXTRA_LOW,
            ..dummy()
        }),
        Err(MmioError::NotModern { .. })
    ));
    assert!(matches!(
        make(Dummy {
            max_sizes: vec![],
            ..dummy()
        }),
        Err(MmioError::NoQueues(42))
    ));
    assert!(matches!(
        make(Dummy {
            max_sizes: vec![16, 24],
            ..dummy()
        }),
        Err(MmioError::QueueMaxSize {
            index: 1,
            max_size: 24,
            ..
        })
    ));
}

fn activated() -> T {
    let mut t = setup();
    negotiate(&mut t, FEATURE_VERSION_1 | F_EXTRA_HIGH);
    setup_queue(&mut t, 0, 16, 0x1000);
    setup_queue(&mut t, 1, 32, 0x8000);
    wr(&mut t, regs::STATUS, ALL_OK);
    assert!(t.mmio.is_activated());
    t
}

#[test]
fn saved_state_restores_an_activated_device_with_its_queues() {
    let t = activated();
    let state = t.mmio.save_state();
    assert!(state.activated);
    assert_eq!(state.queues.len(), 2);

    // Round trip through serde, as a snapshot would.
    let json = serde_json::to_string(&state).unwrap();
    let state: MmioTransportState = serde_json::from_str(&json).unwrap();

    let mut fresh = setup();
    fresh.mmio.restore_state(&state).unwrap();
    assert!(fresh.mmio.is_activated());
    assert_eq!(rd(&mut fresh, regs::STATUS), ALL_OK);
    assert_eq!(
        fresh.mmio.acked_features(),
        FEATURE_VERSION_1 | F_EXTRA_HIGH
    );
    let dev = fresh.dev.lock().unwrap();
    assert_eq!(dev.acked, Some(FEATURE_VERSION_1 | F_EXTRA_HIGH));
    assert_eq!(dev.activations, vec![(vec![16, 32], vec![true, true], 2)]);
    drop(dev);
    assert_eq!(
        fresh.mmio.save_state(),
        state,
        "restoring then saving gives the same state"
    );
}

#[test]
fn pending_interrupts_are_raised_again_on_restore() {
    let t = activated();
    t.mmio.interrupt().signal_used_queue().unwrap();
    let state = t.mmio.save_state();
    let fresh = setup();
    let mut fresh = fresh;
    let _ = fresh.irq.read();
    fresh.mmio.restore_state(&state).unwrap();
    assert_eq!(
        rd(&mut fresh, regs::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    assert!(fresh.irq.read().is_ok(), "the irqfd fired");
}

#[test]
fn foreign_or_damaged_states_are_refused() {
    let state = activated().mmio.save_state();

    let mut wrong_type = state.clone();
    wrong_type.device_type = 2;
    assert!(matches!(
        setup().mmio.restore_state(&wrong_type),
        Err(MmioStateError::DeviceType { .. })
    ));

    let mut fewer = state.clone();
    fewer.queues.pop();
    assert!(matches!(
        setup().mmio.restore_state(&fewer),
        Err(MmioStateError::QueueCount { .. })
    ));

    let mut bad_size = state.clone();
    bad_size.queues[0].size = 3; // not a power of two
    assert!(matches!(
        setup().mmio.restore_state(&bad_size),
        Err(MmioStateError::Queue { index: 0, .. })
    ));

    let mut bigger = state.clone();
    bigger.queues[1].max_size = 1024;
    assert!(matches!(
        setup().mmio.restore_state(&bigger),
        Err(MmioStateError::Queue { index: 1, .. })
    ));

    let mut features = state.clone();
    features.acked_features |= 1 << 50;
    assert!(matches!(
        setup().mmio.restore_state(&features),
        Err(MmioStateError::Features { .. })
    ));
}

#[test]
fn saved_queue_positions_are_the_devices_live_ones() {
    let t = activated();
    // The device advanced its queues past what the transport saw at activation.
    let mut live: Vec<_> = t.mmio.queues().iter().map(|q| q.state()).collect();
    live[0].next_avail = 7;
    live[0].next_used = 5;
    live[1].next_avail = 3;
    t.dev.lock().unwrap().live = live;
    let state = t.mmio.save_state();
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (7, 5)
    );
    assert_eq!(state.queues[1].next_avail, 3);
    let mut fresh = setup();
    fresh.mmio.restore_state(&state).unwrap();
    assert_eq!(
        fresh.mmio.save_state().queues[0].next_avail,
        7,
        "restored from the live positions"
    );
}
