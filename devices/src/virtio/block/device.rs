//! The virtio-block device: features, config space, activation and event-loop integration.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::{process_queue_limited, SECTOR_SIZE};
use super::BlockError;
use crate::rate_limiter::{RateLimit, Throttle};
use crate::virtio::VirtioCommon;
use crate::virtio::{
    checked_queues, read_config_space, ActivateError, VirtioDevice, VirtioInterrupt,
    FEATURE_VERSION_1,
};
use crate::GuestMemoryMmap;

/// Maximum (and default) size of the request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` the device exposes: capacity, size_max, seg_max,
/// geometry and blk_size.
pub const BLOCK_CONFIG_SIZE: usize = 24;
/// Whose rate limit a log line is about.
const THROTTLE_NAME: &str = "virtio-block";

/// Everything that only exists between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-block device with one request queue, backed by a [`Disk`] (a raw image file or a
/// copy-on-write view of a base image).
///
/// Processing happens on the event-manager thread: add the device (as
/// `Arc<Mutex<Block>>`, the same object given to the transport) with
/// `EventManager::add_subscriber`.
pub struct Block {
    disk: Disk,
    /// Features, queue size, and the eventfd `activate` / `reset` (vCPU thread) write so the
    /// event loop updates which queue eventfds it watches.
    common: VirtioCommon,
    active: Option<Active>,
    /// Our own clones of the queue eventfds currently added to the event loop. Kept separate
    /// from `active` so a reset cannot close an fd that epoll still watches.
    registered: Vec<EventFd>,
    /// Limits on the guest's disk bytes and requests per second (unlimited by default).
    /// The rate limit: a queue it held back waits for its timer; kicks meanwhile change
    /// nothing.
    throttle: Throttle,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("avail_features", &self.common.avail_features())
            .field("acked_features", &self.common.acked_features())
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens the raw image at `path` (read-only if `read_only`); `id` is what GET_ID returns
    /// (at most 20 bytes are used).
    pub fn new(path: &Path, read_only: bool, id: String) -> Result<Block, BlockError> {
        Block::with_disk(Disk::open(path, read_only, &id)?)
    }

    /// A device over an already opened disk, e.g. a copy-on-write one from
    /// [`Disk::open_cow`]. The device is read-only if the disk is.
    pub fn with_disk(disk: Disk) -> Result<Block, BlockError> {
        let mut avail_features = FEATURE_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if disk.read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            disk,
            common: VirtioCommon::new(THROTTLE_NAME, avail_features, &[BLOCK_QUEUE_SIZE])
                .map_err(BlockError::EventFd)?,
            active: None,
            registered: Vec::new(),
            throttle: Throttle::unlimited(THROTTLE_NAME),
        })
    }

    /// Limits the guest's disk traffic (before the device is added to the event loop).
    pub fn set_rate_limit(&mut self, limit: RateLimit) -> Result<(), BlockError> {
        self.throttle = Throttle::new(limit, THROTTLE_NAME).map_err(BlockError::Timer)?;
        Ok(())
    }

    /// The backing disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Features acked by the driver.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The eventfd the event loop watches for (de)activation.
    pub fn activate_evt(&self) -> &EventFd {
        self.common.activate_evt()
    }

    /// The config space bytes (`struct virtio_blk_config` prefix, little endian).
    fn config_bytes(&self) -> [u8; BLOCK_CONFIG_SIZE] {
        let mut c = [0u8; BLOCK_CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        // size_max (8..12) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        // seg_max: the header and status take two descriptors of the chain.
        let seg_max = u32::from(BLOCK_QUEUE_SIZE) - 2;
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        // geometry (16..20) stays 0: VIRTIO_BLK_F_GEOMETRY is not offered.
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Drains the request queue and interrupts the driver if it needs it. Does nothing when
    /// the device is not active. Exposed so tests and the VMM can run it without an event
    /// loop.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let outcome = process_queue_limited(
            &mut active.queue,
            &active.mem,
            &self.disk,
            self.throttle.limiter_mut(),
        );
        if outcome.throttled {
            self.throttle.hold();
        } else {
            self.throttle.release();
        }
        if !outcome.used_any {
            return;
        }
        match active.queue.needs_notification(&active.mem) {
            Ok(true) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    log::error!("virtio-block: failed to raise the used-ring interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => crate::guest_warn!("virtio-block: cannot check whether to notify: {e}"),
        }
    }

    /// Makes the event loop watch exactly the current queue eventfd (none if inactive).
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                crate::guest_warn!("virtio-block: failed to unregister a queue eventfd: {e:?}");
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        match active.queue_evt.try_clone() {
            Ok(evt) => match ops.add(Events::new(&evt, EventSet::IN)) {
                Ok(()) => self.registered.push(evt),
                Err(e) => log::error!("virtio-block: failed to register the queue eventfd: {e:?}"),
            },
            Err(e) => log::error!("virtio-block: failed to clone the queue eventfd: {e}"),
        }
        // A restored queue may hold requests the device had not taken yet (e.g. held back by
        // the rate limiter, with notifications off): take them now rather than wait for a kick
        // that will not come. A fresh queue is empty and this does nothing.
        self.throttle.release();
        self.process_queue();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.common.avail_features()
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.common.set_acked_features(acked);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space("virtio-block", &self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "virtio-block: ignoring {}-byte write to read-only config space at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let queues = checked_queues(queues, &queue_evts, 1)?;
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        self.active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        if let Err(e) = self.common.signal_event_loop() {
            self.active = None;
            return Err(ActivateError::Signal(e));
        }
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.throttle.release();
        // The event loop then drops the queue eventfd registration.
        self.common.reset();
        true
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.common.activate_evt(), EventSet::IN)) {
            log::error!("virtio-block: failed to register the activation eventfd: {e:?}");
        }
        if let Some(timer) = self.throttle.timer() {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                log::error!("virtio-block: failed to register the rate limiter's timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.common.activate_evt().as_raw_fd() {
            // Non-blocking: a spurious wake-up just reads EAGAIN.
            let _ = self.common.activate_evt().read();
            self.sync_registrations(ops);
            return;
        }
        if self.throttle.expired(fd) {
            self.process_queue();
            return;
        }
        if let Some(evt) = self.registered.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
            // Throttled: the timer resumes processing; a kick changes nothing before then.
            if !self.throttle.waiting() {
                self.process_queue();
            }
            return;
        }
        crate::guest_warn!("virtio-block: event on unexpected fd {fd}");
    }
}

#[cfg(test)]
mod tests;
