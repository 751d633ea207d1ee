//! Virtio device model: the [`VirtioDevice`] trait implemented by device back-ends, the
//! interrupt state they share with the transport, and the virtio-mmio transport itself.

pub mod block;
pub mod chain;
pub mod common;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_rings;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

pub use common::VirtioCommon;

pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// `VIRTIO_F_VERSION_1` as a feature mask (bit 32): the device is a modern (non-legacy) one.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Device status bits (virtio 1.x §2.1), as `u32` like the MMIO `Status` register.
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Errors a device reports from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device uses.
        expected: usize,
        /// Queues received.
        got: usize,
    },
    /// The transport passed the wrong number of queue eventfds.
    #[error("expected {expected} queue eventfds, got {got}")]
    EventCount {
        /// Eventfds the device needs.
        expected: usize,
        /// Eventfds received.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} was not set up by the driver")]
    QueueNotReady(usize),
    /// `activate` was called twice without a reset in between.
    #[error("the device is already active")]
    AlreadyActive,
    /// Signalling the device's event loop failed.
    #[error("failed to signal the device activation: {0}")]
    Signal(#[source] io::Error),
}

/// Copies config-space bytes at `offset` into `data`; bytes past the end of `config` read as
/// zero, with a warning naming `device`.
pub(crate) fn read_config_space(device: &str, config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let mut outside = false;
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = match start.checked_add(i).and_then(|o| config.get(o)) {
            Some(b) => *b,
            None => {
                outside = true;
                0
            }
        };
    }
    if outside {
        log::warn!(
            "{device}: config read at {offset:#x} of {} bytes goes past the {} byte config \
             space; reading zeros",
            data.len(),
            config.len()
        );
    }
}

/// Checks what a transport hands to `activate`: `expected` queues, each made ready by the
/// driver, and as many eventfds. Queues are switched to plain notification suppression
/// (`VIRTIO_RING_F_EVENT_IDX` is never offered).
pub(crate) fn checked_queues(
    queues: Vec<Queue>,
    queue_evts: &[EventFd],
    expected: usize,
) -> Result<Vec<Queue>, ActivateError> {
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    if queue_evts.len() != expected {
        return Err(ActivateError::EventCount {
            expected,
            got: queue_evts.len(),
        });
    }
    let mut queues = queues;
    for (index, q) in queues.iter_mut().enumerate() {
        if !q.ready() {
            return Err(ActivateError::QueueNotReady(index));
        }
        q.set_event_idx(false);
    }
    Ok(queues)
}

/// A virtio device back-end, driven by a transport (here: [`mmio::MmioTransport`]).
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers; must include `VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`), set at FEATURES_OK.
    fn set_acked_features(&mut self, acked: u64);
    /// Reads device config space at `offset`; out-of-range bytes read as 0 (and warn).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; out-of-range or read-only writes are ignored (and warn).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device once the driver set DRIVER_OK. Runs on a vCPU thread: it must hand the
    /// work to the device's event loop rather than process queues itself.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its pre-activation state; `false` if it cannot.
    fn reset(&mut self) -> bool;
    /// The live state of the device's queues once activated (the device, not the transport,
    /// advances them), in queue order; empty before activation. Snapshots save these.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
}

/// The interrupt status register of a virtio-mmio device and the line that signals it.
///
/// Shared (`Arc`) between the transport (which reads and acknowledges the status) and the
/// device back-end (which raises it).
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt raised by writing `irq` (registered by the VMM as an irqfd).
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// A used ring was updated.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// The device configuration changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The driver acknowledged the bits in `mask`.
    pub fn ack(&self, mask: u32) {
        self.status.fetch_and(!mask, Ordering::SeqCst);
    }

    /// Current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears every pending bit (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd the interrupt is raised on.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }
}

/// One device's warnings about guest (or host client) misbehaviour on its data path, under
/// one [`crate::log_limit::LogLimit`] for the whole device (call sites elsewhere use
/// [`crate::guest_warn!`], a limit per call site).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    device: &'static str,
    limit: crate::log_limit::LogLimit,
}

impl LogLimiter {
    /// Warnings of `device` (the log prefix, e.g. "virtio-net").
    pub(crate) fn new(device: &'static str) -> Self {
        LogLimiter {
            device,
            limit: crate::log_limit::LogLimit::new(),
        }
    }

    pub(crate) fn warn(&mut self, args: std::fmt::Arguments) {
        match self.limit.admit() {
            Some(0) => log::warn!("{}: {args}", self.device),
            Some(suppressed) => {
                log::warn!("{}: {args} ({suppressed} like it suppressed)", self.device)
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_status_bits() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let intr = VirtioInterrupt::new(evt.try_clone().unwrap());
        intr.signal_used_queue().unwrap();
        intr.signal_config_change().unwrap();
        assert_eq!(
            intr.status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(evt.read().unwrap(), 2);
        intr.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(intr.status(), VIRTIO_MMIO_INT_CONFIG);
        intr.ack(u32::MAX);
        assert_eq!(intr.status(), 0);
        intr.signal_used_queue().unwrap();
        intr.reset();
        assert_eq!(intr.status(), 0);
    }
}
