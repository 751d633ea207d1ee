//! virtio-mmio transport, version 2 (virtio 1.x §4.2.2), for one device in a 0x1000-byte
//! window.
//!
//! Every register access is validated: wrong sizes, unknown offsets, out-of-range queue
//! selectors, invalid queue sizes, unoffered feature bits, queue changes after the queue went
//! live and out-of-order status transitions are ignored with a warning (and, where the spec
//! asks for it, the device status reports DEVICE_NEEDS_RESET).

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{VirtioDevice, VirtioInterrupt, FEATURE_VERSION_1};
use crate::bus::{lock_recover, BusDevice};
use crate::GuestMemoryMmap;

/// Size of the MMIO window of one transport.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport implements the modern (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("EMBR").
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"EMBR");

/// Register offsets (virtio 1.x §4.2.2).
pub mod regs {
    /// Magic value "virt" (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Transport version (R).
    pub const VERSION: u64 = 0x004;
    /// Virtio device ID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor ID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 bits of the device features selected by `DEVICE_FEATURES_SEL` (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects which 32 bits `DEVICE_FEATURES` shows (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 bits of the features the driver accepts (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects which 32 bits `DRIVER_FEATURES` sets (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue, 0 if it does not exist (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready bit (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification: the value is the queue index (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt bits (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt bits (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (RW); writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low 32 bits (W).
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high 32 bits (W).
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low 32 bits (W).
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high 32 bits (W).
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region selector (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory region length, low 32 bits (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high 32 bits (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory region base, low 32 bits (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory region base, high 32 bits (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Configuration atomicity value (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Errors from creating an [`MmioTransport`].
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared a queue maximum size virtio-queue rejects (0, > 32768 or not a
    /// power of two).
    #[error("device queue {index} has an invalid maximum size {max_size}: {source}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        max_size: u16,
        /// The underlying error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device declared no queues.
    #[error("device type {0} declares no queues")]
    NoQueues(u32),
    /// The device does not offer VIRTIO_F_VERSION_1, which this transport requires.
    #[error(
        "device type {device_type} does not offer VIRTIO_F_VERSION_1 (features {features:#x})"
    )]
    NotModern {
        /// Virtio device ID.
        device_type: u32,
        /// The features it offers.
        features: u64,
    },
    /// Creating a queue notification eventfd failed.
    #[error("failed to create the eventfd for queue {index}: {source}")]
    QueueEventFd {
        /// Queue index.
        index: usize,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// virtio-mmio transport for one device. Insert it on the MMIO bus with length
/// [`MMIO_WINDOW_SIZE`].
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    // Everything below is plain register state (snapshot-friendly).
    device_type: u32,
    avail_features: u64,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd the VMM registered as the device's irqfd.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock_recover(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues(device_type));
        }
        if avail_features & FEATURE_VERSION_1 == 0 {
            return Err(MmioError::NotModern {
                device_type,
                features: avail_features,
            });
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size).map_err(|source| MmioError::QueueMaxSize {
                    index,
                    max_size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|index| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queue_evts,
            device_type,
            avail_features,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// One notification eventfd per queue, in queue order. The VMM registers each as an
    /// ioeventfd at `base + regs::QUEUE_NOTIFY` (4 bytes) with datamatch = queue index.
    pub fn queue_evts(&self) -> Vec<&EventFd> {
        self.queue_evts.iter().collect()
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> Arc<VirtioInterrupt> {
        self.interrupt.clone()
    }

    /// The device behind the transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Virtio device ID of the device.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted) and not reset since.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The transport's view of the queues (as configured by the driver).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The selected queue, if the selector is in range.
    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue if the driver may still configure it: features negotiated, not yet
    /// DRIVER_OK (nor failed), selector in range and the queue not ready.
    fn configurable_queue(&mut self, reg: &str) -> Option<&mut Queue> {
        const MASK: u32 = DRIVER | FEATURES_OK | DRIVER_OK | FAILED;
        if self.status & MASK != DRIVER | FEATURES_OK {
            crate::guest_warn!(
                "virtio-mmio: ignoring {reg} write in device status {:#x}",
                self.status
            );
            return None;
        }
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            None => {
                crate::guest_warn!(
                    "virtio-mmio: ignoring {reg} write: queue_sel {sel} is out of range"
                );
                None
            }
            Some(q) if q.ready() => {
                crate::guest_warn!(
                    "virtio-mmio: ignoring {reg} write: queue {sel} is already ready"
                );
                None
            }
            Some(q) => Some(q),
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device_type,
            regs::VENDOR_ID => MMIO_VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length reads as "does not exist" (all ones).
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                crate::guest_warn!(
                    "virtio-mmio: read of unknown or write-only register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM => {
                let max = self.selected_queue().map_or(0, |q| q.max_size());
                let Ok(size) = u16::try_from(value) else {
                    crate::guest_warn!(
                        "virtio-mmio: ignoring queue size {value}: above the maximum {max}"
                    );
                    return;
                };
                if let Some(q) = self.configurable_queue("QueueNum") {
                    if q.try_set_size(size).is_err() {
                        crate::guest_warn!(
                            "virtio-mmio: ignoring queue size {size}: must be a power of two \
                             in 1..={max}"
                        );
                    }
                }
            }
            regs::QUEUE_READY => self.write_queue_ready(value),
            regs::QUEUE_NOTIFY => self.notify_queue(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => self.write_queue_address(offset, value),
            regs::SHM_SEL => {} // no shared memory regions; reads report none
            _ => crate::guest_warn!(
                "virtio-mmio: ignoring write of {value:#x} to unknown or read-only register \
                 {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            crate::guest_warn!(
                "virtio-mmio: ignoring DriverFeatures write of {value:#x} in device status {:#x}",
                self.status
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                if value != 0 {
                    crate::guest_warn!(
                        "virtio-mmio: ignoring DriverFeatures {value:#x} for selector {sel}: \
                         no such features offered"
                    );
                }
                return;
            }
        };
        let offered = (self.avail_features >> shift) as u32;
        let unknown = value & !offered;
        if unknown != 0 {
            crate::guest_warn!(
                "virtio-mmio: driver acked feature bits {unknown:#x} (word {}) that were never \
                 offered; ignoring them",
                shift / 32
            );
        }
        let accepted = u64::from(value & offered) << shift;
        self.acked_features = (self.acked_features & !(u64::from(u32::MAX) << shift)) | accepted;
    }

    fn write_queue_ready(&mut self, value: u32) {
        match value {
            0 => {
                // Un-readying is harmless until DRIVER_OK; drivers do it while tearing down.
                if self.status & DRIVER_OK != 0 {
                    crate::guest_warn!("virtio-mmio: ignoring QueueReady=0 after DRIVER_OK");
                } else if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    q.set_ready(false);
                }
            }
            1 => {
                if let Some(q) = self.configurable_queue("QueueReady") {
                    q.set_ready(true);
                }
            }
            other => crate::guest_warn!("virtio-mmio: ignoring QueueReady write of {other}"),
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.configurable_queue("queue address") else {
            return;
        };
        let (current, high) = match offset {
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => {
                (q.desc_table(), offset == regs::QUEUE_DESC_HIGH)
            }
            regs::QUEUE_AVAIL_LOW | regs::QUEUE_AVAIL_HIGH => {
                (q.avail_ring(), offset == regs::QUEUE_AVAIL_HIGH)
            }
            _ => (q.used_ring(), offset == regs::QUEUE_USED_HIGH),
        };
        let addr = if high {
            (current & u64::from(u32::MAX)) | (u64::from(value) << 32)
        } else {
            (current & !u64::from(u32::MAX)) | u64::from(value)
        };
        let addr = vm_memory::GuestAddress(addr);
        let res = match offset {
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => q.try_set_desc_table_address(addr),
            regs::QUEUE_AVAIL_LOW | regs::QUEUE_AVAIL_HIGH => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        };
        if let Err(e) = res {
            crate::guest_warn!(
                "virtio-mmio: ignoring queue address {:#x} (register {offset:#x}): {e}",
                addr.0
            );
        }
    }

    fn notify_queue(&self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!("virtio-mmio: failed to signal queue {value}: {e}");
                }
            }
            None => crate::guest_warn!(
                "virtio-mmio: ignoring notification of nonexistent queue {value}"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is owned by the device: drivers echo it back when adding bits.
        let value = value & !DEVICE_NEEDS_RESET;
        let current = self.status & !DEVICE_NEEDS_RESET;
        if value & FAILED != 0 {
            crate::guest_warn!(
                "virtio-mmio: driver marked device type {} FAILED",
                self.device_type
            );
            self.status |= FAILED;
            return;
        }
        const KNOWN: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        if value & !KNOWN != 0 || value & current != current {
            crate::guest_warn!(
                "virtio-mmio: ignoring status write {value:#x} (current {:#x}): unknown bits or \
                 bits cleared without a reset",
                self.status
            );
            return;
        }
        if self.status & (FAILED | DEVICE_NEEDS_RESET) != 0 && value != current {
            crate::guest_warn!(
                "virtio-mmio: ignoring status write {value:#x}: device needs a reset (status {:#x})",
                self.status
            );
            return;
        }
        // The status only ever grows along ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, so a
        // valid value is one of these prefixes (several steps in one write are fine).
        const STEPS: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];
        let in_order = (1..=STEPS.len()).any(|n| STEPS[..n].iter().fold(0, |a, b| a | b) == value);
        if !in_order {
            crate::guest_warn!(
                "virtio-mmio: ignoring status write {value:#x}: out of order (status {:#x})",
                self.status
            );
            return;
        }
        for bit in STEPS {
            if value & !current & bit == 0 {
                continue;
            }
            let accepted = match bit {
                FEATURES_OK => self.features_ok(),
                DRIVER_OK => self.activate(),
                _ => true,
            };
            if !accepted {
                return;
            }
            self.status |= bit;
        }
    }

    /// Validates the negotiated features; `false` leaves FEATURES_OK clear, which tells the
    /// driver the subset is unacceptable.
    fn features_ok(&mut self) -> bool {
        if self.acked_features & FEATURE_VERSION_1 == 0 {
            crate::guest_warn!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (acked {:#x}); legacy \
                 drivers are not supported",
                self.acked_features
            );
            return false;
        }
        lock_recover(&self.device).set_acked_features(self.acked_features);
        true
    }

    /// Hands the configured queues to the device. On failure DEVICE_NEEDS_RESET is set and
    /// DRIVER_OK stays clear.
    fn activate(&mut self) -> bool {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                crate::guest_warn!(
                    "virtio-mmio: queue {index} is not valid (size {}, desc {:#x}, avail {:#x}, \
                     used {:#x}); device needs reset",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                );
                self.status |= DEVICE_NEEDS_RESET;
                return false;
            }
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: queue {index} state is invalid: {e}");
                    self.status |= DEVICE_NEEDS_RESET;
                    return false;
                }
            }
        }
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for (index, evt) in self.queue_evts.iter().enumerate() {
            match evt.try_clone() {
                Ok(e) => evts.push(e),
                Err(e) => {
                    log::error!("virtio-mmio: failed to clone the eventfd of queue {index}: {e}");
                    self.status |= DEVICE_NEEDS_RESET;
                    return false;
                }
            }
        }
        let res = lock_recover(&self.device).activate(
            self.mem.clone(),
            queues,
            evts,
            self.interrupt.clone(),
        );
        match res {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                crate::guest_warn!(
                    "virtio-mmio: activating device type {} failed: {e}",
                    self.device_type
                );
                self.status |= DEVICE_NEEDS_RESET;
                false
            }
        }
    }

    fn reset(&mut self) {
        // Always tell the device (it may hold acked features); a device that cannot reset is
        // only a problem once it was activated.
        let device_reset = lock_recover(&self.device).reset();
        if self.activated && !device_reset {
            log::error!(
                "virtio-mmio: device type {} cannot be reset; marking it failed",
                self.device_type
            );
            self.status |= FAILED;
            return;
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            if (1..=8).contains(&data.len()) {
                lock_recover(&self.device).read_config(offset - regs::CONFIG, data);
            } else {
                crate::guest_warn!(
                    "virtio-mmio: ignoring {}-byte config read at {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_warn!(
                "virtio-mmio: ignoring {}-byte register read at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if (1..=8).contains(&data.len()) {
                lock_recover(&self.device).write_config(offset - regs::CONFIG, data);
            } else {
                crate::guest_warn!(
                    "virtio-mmio: ignoring {}-byte config write at {offset:#x}",
                    data.len()
                );
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => crate::guest_warn!(
                "virtio-mmio: ignoring {}-byte register write at {offset:#x}",
                data.len()
            ),
        }
    }
}

mod persist;
pub use persist::{MmioStateError, MmioTransportState, QueueSnapshot};

#[cfg(test)]
mod tests;
