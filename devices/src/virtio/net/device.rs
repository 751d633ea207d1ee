//! The virtio-net device: features, config space, the two queues and event-loop integration.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use super::{
    NetError, NetRateLimits, Tap, ETH_HLEN, MAX_FRAME_LEN, MAX_GSO_FRAME_LEN, VNET_HDR_LEN,
};
use crate::rate_limiter::Throttle;
use crate::virtio::chain::{ChainError, Direction, Segments};
use crate::virtio::LogLimiter;
use crate::virtio::VirtioCommon;
use crate::virtio::{
    checked_queues, read_config_space, ActivateError, VirtioDevice, VirtioInterrupt,
    FEATURE_VERSION_1,
};
use crate::GuestMemoryMmap;

/// Maximum (and default) size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_net_config` the device exposes: the MAC address.
pub const NET_CONFIG_SIZE: usize = 6;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_NAMES: [&str; 2] = ["receive", "transmit"];
const RX_THROTTLE: &str = "virtio-net receive";
const TX_THROTTLE: &str = "virtio-net transmit";
/// Longest transmit chain taken (with segmentation offload): a header and the largest frame.
const MAX_TX_LEN: usize = VNET_HDR_LEN + MAX_GSO_FRAME_LEN;
/// Room for one read from the TAP: one byte more than the largest frame it may send, so a
/// larger one is seen (and dropped) rather than cut.
const RX_BUF_LEN: usize = VNET_HDR_LEN + MAX_GSO_FRAME_LEN + 1;
/// Offloads offered on a TAP that takes them: checksums and TCP segmentation, both ways.
const OFFLOAD_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6;
/// The guest sends frames with partial checksums.
const HOST_CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
/// The guest sends TCP segmentation offload frames.
const HOST_TSO: u64 = 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6;
/// Frames moved per event before the event loop gets to others.
const FRAMES_PER_EVENT: usize = 256;

/// What the device did with frames, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Their bytes (headers excluded).
    pub tx_bytes: u64,
    /// Guest frames dropped: malformed chains, short or oversized frames, TAP write errors.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (headers excluded).
    pub rx_bytes: u64,
    /// Host frames dropped: larger than the guest's receive buffer.
    pub rx_dropped: u64,
    /// Receive chains the guest made unusable (completed empty).
    pub rx_bad_chains: u64,
    /// Times the receive rate limit held a frame back.
    pub rx_throttled: u64,
    /// Times the transmit rate limit held a frame back.
    pub tx_throttled: u64,
}

/// Everything that only exists between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-net device backed by a [`Tap`].
///
/// Processing happens on the event-manager thread: add the device (as `Arc<Mutex<Net>>`, the
/// same object given to the transport) with `EventManager::add_subscriber`.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    /// Features, queue sizes, and the eventfd `activate` / `reset` (vCPU thread) write so the
    /// event loop updates what it watches.
    common: VirtioCommon,
    /// The TAP's offloads are set for the acked features (done on the event loop).
    offloads_applied: bool,
    active: Option<Active>,
    /// Our clones of the queue eventfds the event loop watches (see the block device).
    registered: Vec<EventFd>,
    /// Whether the event loop watches the TAP for frames.
    tap_watched: bool,
    /// A frame read from the TAP that waits for a receive buffer: its length in `rx_buf`.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    stats: NetStats,
    rx_throttle: Throttle,
    tx_throttle: Throttle,
    log: LogLimiter,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("acked_features", &self.common.acked_features())
            .field("active", &self.active.is_some())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device on `tap` whose guest has MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Result<Net, NetError> {
        let offloads = tap.supports_offloads();
        Net::with_offloads(tap, mac, offloads)
    }

    /// [`Net::new`], offering the offloads only if `offloads` (tests: a socket stands in for
    /// the TAP).
    pub(crate) fn with_offloads(tap: Tap, mac: [u8; 6], offloads: bool) -> Result<Net, NetError> {
        let mut avail_features = FEATURE_VERSION_1 | 1 << VIRTIO_NET_F_MAC;
        if offloads {
            avail_features |= OFFLOAD_FEATURES;
        }
        Ok(Net {
            tap,
            mac,
            common: VirtioCommon::new("virtio-net", avail_features, &[NET_QUEUE_SIZE; 2])
                .map_err(NetError::EventFd)?,
            offloads_applied: false,
            active: None,
            registered: Vec::new(),
            tap_watched: false,
            rx_pending: None,
            rx_buf: vec![0; RX_BUF_LEN],
            tx_buf: vec![0; MAX_TX_LEN],
            stats: NetStats::default(),
            rx_throttle: Throttle::unlimited(RX_THROTTLE),
            tx_throttle: Throttle::unlimited(TX_THROTTLE),
            log: LogLimiter::new("virtio-net"),
        })
    }

    /// Limits the guest's traffic (before the device is added to the event loop).
    pub fn set_rate_limits(&mut self, limits: NetRateLimits) -> Result<(), NetError> {
        let timer_error = |direction| move |source| NetError::Timer { direction, source };
        self.rx_throttle = Throttle::new(limits.rx, RX_THROTTLE).map_err(timer_error("receive"))?;
        self.tx_throttle =
            Throttle::new(limits.tx, TX_THROTTLE).map_err(timer_error("transmit"))?;
        Ok(())
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        NetStats {
            rx_throttled: self.rx_throttle.throttled(),
            tx_throttled: self.tx_throttle.throttled(),
            ..self.stats
        }
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

    fn signal(active: &mut Active, queue: usize, name: &str) {
        let Some(q) = active.queues.get_mut(queue) else {
            return;
        };
        match q.needs_notification(&active.mem) {
            Ok(true) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    log::error!("virtio-net: failed to raise the used-ring interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                crate::guest_warn!(
                    "virtio-net: cannot check whether to notify the {name} queue: {e}"
                )
            }
        }
    }

    /// Sends what the guest queued for transmission to the TAP, as far as the transmit rate
    /// limit allows. Returns whether any chain was completed (the driver was notified if it
    /// wants to be).
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if self.tx_throttle.waiting() {
            return false;
        }
        let mut used_any = false;
        let mut empty_rounds = 0u8;
        'rounds: loop {
            let Some(queue) = active.queues.get_mut(TX) else {
                return false;
            };
            if let Err(e) = queue.disable_notification(&active.mem) {
                self.log
                    .warn(format_args!("cannot disable transmit notifications: {e}"));
                break;
            }
            let mut progressed = false;
            loop {
                let chain = match queue.iter(&active.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.log
                            .warn(format_args!("cannot read the transmit ring: {e}"));
                        break;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let segs = Segments::from_chain(chain, &active.mem, Direction::Read);
                // A malformed chain costs an operation too: the guest pays for the work.
                let bytes = segs
                    .as_ref()
                    .map_or(0, |s| s.len().saturating_sub(VNET_HDR_LEN as u64));
                if !self.tx_throttle.admit(bytes) {
                    // Taken again when the timer fires; the guest need not kick meanwhile
                    // (notifications stay off).
                    queue.go_to_previous_position();
                    break 'rounds;
                }
                progressed = true;
                transmit(
                    head,
                    segs,
                    &active.mem,
                    self.common.acked_features(),
                    &self.tap,
                    &mut self.tx_buf,
                    &mut self.stats,
                    &mut self.log,
                );
                // The device writes nothing into a transmit chain.
                match queue.add_used(&active.mem, head, 0) {
                    Ok(()) => used_any = true,
                    Err(e) => self
                        .log
                        .warn(format_args!("cannot complete transmit chain {head}: {e}")),
                }
            }
            match queue.enable_notification(&active.mem) {
                Ok(true) if progressed => empty_rounds = 0,
                Ok(true) if empty_rounds == 0 => empty_rounds = 1,
                Ok(true) => {
                    self.log
                        .warn(format_args!("transmit ring is not readable; stopping"));
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    self.log
                        .warn(format_args!("cannot re-enable transmit notifications: {e}"));
                    break;
                }
            }
        }
        if used_any {
            Self::signal(active, TX, QUEUE_NAMES[TX]);
        }
        used_any
    }

    /// Moves frames from the TAP into the guest's receive buffers, up to
    /// `FRAMES_PER_EVENT` and as far as the receive rate limit allows. Returns whether a
    /// frame waits for a buffer or for the limit (then the TAP is not read until the driver
    /// adds buffers or the limiter's timer fires).
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if self.rx_throttle.waiting() {
            return true;
        }
        let mut used_any = false;
        let mut waiting = false;
        for _ in 0..FRAMES_PER_EVENT {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.log
                            .warn(format_args!("reading TAP {} failed: {e}", self.tap.name()));
                        break;
                    }
                },
            };
            if !(VNET_HDR_LEN + ETH_HLEN..RX_BUF_LEN).contains(&len) {
                // Not a frame the guest could take (a larger one was cut by the buffer).
                self.stats.rx_dropped += 1;
                self.rx_pending = None;
                continue;
            }
            self.rx_pending = Some(len);
            let Some(queue) = active.queues.get_mut(RX) else {
                return false;
            };
            let chain = match queue.iter(&active.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.log
                        .warn(format_args!("cannot read the receive ring: {e}"));
                    None
                }
            };
            let Some(chain) = chain else {
                waiting = true;
                break;
            };
            let head = chain.head_index();
            let written = match Segments::from_chain(chain, &active.mem, Direction::Write) {
                Err(e) => {
                    self.log.warn(format_args!(
                        "bad receive chain {head}: {e}; completing it empty"
                    ));
                    self.stats.rx_bad_chains += 1;
                    Some(0)
                }
                Ok(segs) if segs.len() < len as u64 => {
                    // Too small for this frame: the frame goes, the buffer stays for the next.
                    queue.go_to_previous_position();
                    self.stats.rx_dropped += 1;
                    self.rx_pending = None;
                    None
                }
                Ok(_) if !self.rx_throttle.admit((len - VNET_HDR_LEN) as u64) => {
                    // The frame stays pending and the buffer in the ring until the timer fires.
                    queue.go_to_previous_position();
                    waiting = true;
                    break;
                }
                Ok(segs) => {
                    let frame = &mut self.rx_buf[..len];
                    // num_buffers: one chain per frame (VIRTIO_NET_F_MRG_RXBUF is not offered).
                    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    match segs.write_at(&active.mem, 0, frame) {
                        Ok(()) => {
                            self.stats.rx_frames += 1;
                            self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                            self.rx_pending = None;
                            // len < RX_BUF_LEN: fits.
                            Some(len as u32)
                        }
                        Err(e) => {
                            self.log.warn(format_args!(
                                "cannot write receive chain {head}: {e}; completing it empty"
                            ));
                            self.stats.rx_bad_chains += 1;
                            Some(0)
                        }
                    }
                }
            };
            if let Some(written) = written {
                match queue.add_used(&active.mem, head, written) {
                    Ok(()) => used_any = true,
                    Err(e) => self
                        .log
                        .warn(format_args!("cannot complete receive chain {head}: {e}")),
                }
            }
        }
        if used_any {
            Self::signal(active, RX, QUEUE_NAMES[RX]);
        }
        waiting
    }

    /// Runs both queues and makes the event loop watch the TAP exactly while frames can go to
    /// the guest.
    fn run(&mut self, ops: &mut EventOps) {
        if self.active.is_some() && !self.offloads_applied {
            // Here, not when the features are acked: that runs on a vCPU thread, whose
            // seccomp filter allows KVM's ioctls only.
            self.offloads_applied = true;
            if self.common.avail_features() & OFFLOAD_FEATURES != 0 {
                let flags = tun_offloads(self.common.acked_features());
                if let Err(e) = self.tap.set_offload(flags) {
                    log::error!(
                        "virtio-net: cannot set the offloads {flags:#x} of TAP {}: {e}",
                        self.tap.name()
                    );
                }
            }
        }
        self.process_tx();
        // Waiting for buffers or for the receive limit: either way the TAP keeps its frames.
        let waiting = self.process_rx();
        let want = self.active.is_some() && !waiting;
        if want != self.tap_watched {
            let events = Events::new(&self.tap, EventSet::IN);
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            match result {
                Ok(()) => self.tap_watched = want,
                Err(e) => log::error!("virtio-net: cannot change the watch on the TAP: {e:?}"),
            }
        }
    }

    /// Makes the event loop watch exactly the current queue eventfds (none if inactive).
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                crate::guest_warn!("virtio-net: failed to unregister a queue eventfd: {e:?}");
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        for evt in &active.queue_evts {
            match evt.try_clone() {
                Ok(evt) => match ops.add(Events::new(&evt, EventSet::IN)) {
                    Ok(()) => self.registered.push(evt),
                    Err(e) => log::error!("virtio-net: failed to register a queue eventfd: {e:?}"),
                },
                Err(e) => log::error!("virtio-net: failed to clone a queue eventfd: {e}"),
            }
        }
    }
}

/// Sends the frame of transmit chain `head` (its segments, or why it has none) to the TAP, or
/// drops and counts it.
#[allow(clippy::too_many_arguments)]
fn transmit(
    head: u16,
    segs: Result<Segments, ChainError>,
    mem: &GuestMemoryMmap,
    acked: u64,
    tap: &Tap,
    buf: &mut [u8],
    stats: &mut NetStats,
    log: &mut LogLimiter,
) {
    let segs = match segs {
        Ok(segs) => segs,
        Err(e) => {
            log.warn(format_args!("dropping transmit chain {head}: {e}"));
            stats.tx_dropped += 1;
            return;
        }
    };
    let len = segs.len();
    let max = VNET_HDR_LEN
        + if acked & HOST_TSO != 0 {
            MAX_GSO_FRAME_LEN
        } else {
            MAX_FRAME_LEN
        };
    if len < (VNET_HDR_LEN + ETH_HLEN) as u64 || len > max.min(buf.len()) as u64 {
        log.warn(format_args!(
            "dropping a {len}-byte transmit chain {head}: a frame with its header is {} to {max} \
             bytes",
            VNET_HDR_LEN + ETH_HLEN,
        ));
        stats.tx_dropped += 1;
        return;
    }
    // len <= buf.len(): fits usize.
    let frame = &mut buf[..len as usize];
    if let Err(e) = segs.read_at(mem, 0, frame) {
        log.warn(format_args!("dropping transmit chain {head}: {e}"));
        stats.tx_dropped += 1;
        return;
    }
    clear_unnegotiated(&mut frame[..VNET_HDR_LEN], acked);
    match tap.write_frame(frame) {
        Ok(_) => {
            stats.tx_frames += 1;
            stats.tx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
        }
        Err(e) => {
            // E.g. the interface is down, or its queue is full: the frame is lost, as on a
            // wire.
            log.warn(format_args!(
                "writing a frame to TAP {} failed: {e}",
                tap.name()
            ));
            stats.tx_dropped += 1;
        }
    }
}

/// Clears from a transmitted `virtio_net_hdr_v1` what the guest did not negotiate: the
/// checksum request without `VIRTIO_NET_F_CSUM`, segmentation without `HOST_TSO4/6`, and always
/// `num_buffers` (a receive-side field).
fn clear_unnegotiated(header: &mut [u8], acked: u64) {
    if acked & HOST_CSUM == 0 {
        header.fill(0);
        return;
    }
    if acked & HOST_TSO == 0 {
        // gso_type, hdr_len, gso_size.
        header[1..6].fill(0);
    }
    header[10..12].fill(0);
}

/// The TAP offloads (`TUN_F_*`) for the guest's acked receive features.
fn tun_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & 1 << VIRTIO_NET_F_GUEST_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if acked & 1 << VIRTIO_NET_F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if acked & 1 << VIRTIO_NET_F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.common.queue_max_sizes()
    }

    fn avail_features(&self) -> u64 {
        self.common.avail_features()
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.common.set_acked_features(acked);
        self.offloads_applied = false;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space("virtio-net", &self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR, which is not offered.
        crate::guest_warn!(
            "virtio-net: ignoring {}-byte write to read-only config space at {offset:#x}",
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
        let queues = checked_queues(queues, &queue_evts, 2)?;
        self.active = Some(Active {
            mem,
            queues,
            queue_evts,
            interrupt,
        });
        if let Err(e) = self.common.signal_event_loop() {
            self.active = None;
            return Err(ActivateError::Signal(e));
        }
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.offloads_applied = false;
        self.rx_pending = None;
        // A timer still armed fires into an inactive device, which does nothing.
        self.rx_throttle.release();
        self.tx_throttle.release();
        self.common.reset();
        true
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.common.activate_evt(), EventSet::IN)) {
            log::error!("virtio-net: failed to register the activation eventfd: {e:?}");
        }
        for throttle in [&self.rx_throttle, &self.tx_throttle] {
            if let Some(timer) = throttle.timer() {
                if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                    log::error!("virtio-net: failed to register a rate limiter's timer: {e:?}");
                }
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.common.activate_evt().as_raw_fd() {
            // Non-blocking: a spurious wake-up just reads EAGAIN.
            let _ = self.common.activate_evt().read();
            self.sync_registrations(ops);
            // A restored queue may hold chains already: take them without waiting for a kick.
        } else if let Some(evt) = self.registered.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
        } else if self.rx_throttle.expired(fd) || self.tx_throttle.expired(fd) {
            // The held-back direction goes on below.
        } else if fd != self.tap.as_raw_fd() {
            crate::guest_warn!("virtio-net: event on unexpected fd {fd}");
            return;
        }
        self.run(ops);
    }
}

#[cfg(test)]
mod tests;
