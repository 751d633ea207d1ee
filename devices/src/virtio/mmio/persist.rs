//! virtio-mmio transport state for snapshots: the registers and every queue's position.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::MmioTransport;
use crate::bus::lock_recover;
use crate::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// One split virtqueue's configuration and ring positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// Why a saved transport state does not fit the transport it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum MmioStateError {
    #[error("saved state is for virtio device type {saved}, this transport has type {current}")]
    DeviceType { saved: u32, current: u32 },
    #[error("saved state has {saved} queues, the device has {current}")]
    QueueCount { saved: usize, current: usize },
    #[error("saved queue {index} is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("saved state acks features {acked:#x} the device does not offer ({offered:#x})")]
    Features { acked: u64, offered: u64 },
    #[error("the device refused to activate from the saved state")]
    Activate,
}

impl MmioTransport {
    /// The transport's registers and queue positions (the device keeps its own state).
    pub fn save_state(&self) -> MmioTransportState {
        let live = self.live_queue_states();
        self.save_state_with(live)
    }

    /// [`MmioTransport::save_state`] for a caller that already holds the device's lock and
    /// passes the device's `queue_states()` (empty when the device is not active).
    pub fn save_state_with(&self, device_queues: Vec<QueueState>) -> MmioTransportState {
        let queues = if self.activated && device_queues.len() == self.queues.len() {
            device_queues
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        MmioTransportState {
            device_type: self.device_type,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues: queues.into_iter().map(Into::into).collect(),
        }
    }

    /// The queues as the device has advanced them when it is active (the transport's own
    /// copies stop at activation), else the transport's.
    fn live_queue_states(&self) -> Vec<QueueState> {
        if self.activated {
            let live = lock_recover(&self.device).queue_states();
            if live.len() == self.queues.len() {
                return live;
            }
            crate::guest_warn!(
                "virtio-mmio: device type {} reports {} live queues, the transport has {}",
                self.device_type,
                live.len(),
                self.queues.len()
            );
        }
        self.queues.iter().map(|q| q.state()).collect()
    }

    /// Puts a freshly created transport into `state`; an activated device is activated again
    /// with the saved queues, and pending interrupts are raised again. The state is checked
    /// against the device, so a state from another device or a damaged one is refused.
    pub fn restore_state(&mut self, state: &MmioTransportState) -> Result<(), MmioStateError> {
        if state.device_type != self.device_type {
            return Err(MmioStateError::DeviceType {
                saved: state.device_type,
                current: self.device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioStateError::QueueCount {
                saved: state.queues.len(),
                current: self.queues.len(),
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(MmioStateError::Features {
                acked: state.acked_features,
                offered: self.avail_features,
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(MmioStateError::Queue {
                    index,
                    reason: format!(
                        "max size {} differs from the device's {}",
                        saved.max_size,
                        current.max_size()
                    ),
                });
            }
            let queue =
                Queue::try_from(QueueState::from(saved)).map_err(|e| MmioStateError::Queue {
                    index,
                    reason: e.to_string(),
                })?;
            queues.push(queue);
        }
        self.queues = queues;
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        lock_recover(&self.device).set_acked_features(state.acked_features);
        if state.activated && !self.activate() {
            return Err(MmioStateError::Activate);
        }
        // Interrupts the guest had not acknowledged yet are raised again (a spurious one is
        // harmless; a lost one would stall the driver).
        if state.interrupt_status & VIRTIO_MMIO_INT_VRING != 0 {
            let _ = self.interrupt.signal_used_queue();
        }
        if state.interrupt_status & VIRTIO_MMIO_INT_CONFIG != 0 {
            let _ = self.interrupt.signal_config_change();
        }
        Ok(())
    }
}
