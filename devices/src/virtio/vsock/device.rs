//! The virtio-vsock device: features, config space, activation, the three queues and
//! event-loop integration.
//!
//! Queues: rx (0, device→driver packets), tx (1, driver→device packets) and event (2,
//! transport reset notifications). Everything runs on the event-manager thread: queue
//! notifications, host socket readiness and the activation eventfd all land in
//! [`MutEventSubscriber::process`], which handles the event, moves whatever packets can move,
//! raises the interrupt if the driver wants it and updates which host sockets are watched.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{
    Direction, Op, PacketChain, Segments, EVENT_SIZE, EVENT_TRANSPORT_RESET, HDR_SIZE, MAX_PKT_LEN,
};
use super::{VsockError, MIN_GUEST_CID};
use crate::virtio::LogLimiter;
use crate::virtio::VirtioCommon;
use crate::virtio::{
    checked_queues, read_config_space, ActivateError, VirtioDevice, VirtioInterrupt,
    FEATURE_VERSION_1,
};
use crate::GuestMemoryMmap;

/// Maximum (and default) size of each queue.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_vsock_config`: the guest CID (le64).
pub const VSOCK_CONFIG_SIZE: usize = 8;

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
const QUEUE_COUNT: usize = 3;
const QUEUE_NAMES: [&str; QUEUE_COUNT] = ["rx", "tx", "event"];

/// Everything that only exists between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-vsock device whose host side is a Unix socket (see the module documentation).
///
/// Processing happens on the event-manager thread: add the device (as `Arc<Mutex<Vsock>>`, the
/// same object given to the transport) with `EventManager::add_subscriber`.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    /// Features, queue sizes, and the eventfd `activate` / `reset` / `send_transport_reset`
    /// (other threads) write so the event loop updates what it watches.
    common: VirtioCommon,
    active: Option<Active>,
    /// Our own clones of the queue eventfds the event loop watches, in queue order.
    registered: Vec<EventFd>,
    /// A transport reset event waits for an event-queue buffer.
    pending_reset_event: bool,
    /// The reset event was delivered but the driver has not yet handled it (it re-posts the
    /// event buffer and kicks the event queue when it has). Until then nothing goes to the
    /// guest's rx queue: a host connection requested now would be torn down by the reset
    /// the guest has yet to process.
    reset_unhandled: bool,
    /// Payload staging for one packet.
    scratch: Vec<u8>,
    log: LogLimiter,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.muxer.uds_path())
            .field("active", &self.active.is_some())
            .field("connections", &self.muxer.connection_count())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening on `uds_path` (a stale socket file
    /// there is replaced; anything else there is an error).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        // u32::MAX is VMADDR_CID_ANY; Linux keeps CIDs in 32 bits.
        if guest_cid < MIN_GUEST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            guest_cid,
            muxer,
            common: VirtioCommon::new(
                "virtio-vsock",
                FEATURE_VERSION_1,
                &[VSOCK_QUEUE_SIZE; QUEUE_COUNT],
            )
            .map_err(|source| VsockError::EventFd {
                what: "activation",
                source,
            })?,
            active: None,
            registered: Vec::new(),
            pending_reset_event: false,
            reset_unhandled: false,
            scratch: vec![0; MAX_PKT_LEN as usize],
            log: LogLimiter::new("virtio-vsock"),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Features acked by the driver.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Guest bytes that live host sockets have yet to take.
    pub fn undelivered_to_host(&self) -> usize {
        self.muxer.undelivered_to_host()
    }

    /// When the VM has ended: takes the packets the guest queued but the event loop did not
    /// handle before it stopped, writes the guest bytes still buffered to their host sockets,
    /// waiting up to `limit` for slow readers, and says how many were lost if some were.
    pub fn deliver_to_host(&mut self, limit: Duration) -> usize {
        self.process_tx();
        let lost = self.muxer.deliver_to_host(limit);
        if lost > 0 {
            crate::guest_warn!(
                "virtio-vsock: {lost} bytes the guest sent were not taken by their host \
                 sockets within {limit:?} of the VM's end; they are dropped"
            );
        }
        lost
    }

    /// Host clients still sending their CONNECT line.
    pub fn pending_client_count(&self) -> usize {
        self.muxer.pending_count()
    }

    /// The eventfd the event loop watches for (de)activation and wake-ups.
    pub fn activate_evt(&self) -> &EventFd {
        self.common.activate_evt()
    }

    fn wake_loop(&self) {
        if let Err(e) = self.common.signal_event_loop() {
            crate::guest_warn!("virtio-vsock: cannot wake the event loop: {e}");
        }
    }

    /// Drops every connection and tells the driver with a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event (sent as soon as the event queue has a
    /// buffer). Host sockets are closed; the guest resets its connected sockets and re-reads
    /// its CID. Used when the guest resumes somewhere its connections do not exist (snapshots).
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset_all();
        self.muxer.move_ports_past_old_connections();
        self.pending_reset_event = true;
        if self.flush_events() {
            self.signal(EVT);
        }
        // Let the event loop stop watching (and close) the dropped sockets.
        self.wake_loop();
    }

    /// For a guest restored from a snapshot that held no connections: no reset is needed,
    /// and new host connections take ports past any the guest used before the snapshot, so
    /// a socket the guest still tears down can never be taken for a new one.
    pub fn resume_without_reset(&mut self) {
        self.muxer.move_ports_past_old_connections();
    }

    /// Whether a transport reset event is still waiting for an event-queue buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.pending_reset_event
    }

    /// Whether rx delivery waits for the driver to handle a transport reset.
    pub fn rx_held_for_reset(&self) -> bool {
        self.pending_reset_event || self.reset_unhandled
    }

    /// Raises the used-ring interrupt for `queue` if the driver wants it.
    fn signal(&mut self, queue: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.get_mut(queue) else {
            return;
        };
        match q.needs_notification(&active.mem) {
            Ok(true) => {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    log::error!("virtio-vsock: failed to raise the used-ring interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => crate::guest_warn!(
                "virtio-vsock: cannot check whether to notify the {} queue: {e}",
                QUEUE_NAMES[queue]
            ),
        }
    }

    /// Drains the tx queue, handing each packet to the muxer. Returns whether any chain was
    /// completed.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let q = &mut active.queues[TX];
        let mut used_any = false;
        let mut empty_rounds = 0u8;
        loop {
            if let Err(e) = q.disable_notification(mem) {
                self.log
                    .warn(format_args!("cannot disable tx queue notifications: {e}"));
                return used_any;
            }
            let mut progressed = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                handle_tx_chain(
                    chain,
                    mem,
                    &mut self.muxer,
                    &mut self.scratch,
                    &mut self.log,
                );
                match q.add_used(mem, head, 0) {
                    Ok(()) => used_any = true,
                    Err(e) => self
                        .log
                        .warn(format_args!("cannot complete tx chain {head}: {e}")),
                }
            }
            match q.enable_notification(mem) {
                Ok(true) if progressed => empty_rounds = 0,
                // The driver published a chain just after the ring was read: read it again
                // (stopping here would leave it unprocessed, with no kick to come).
                Ok(true) if empty_rounds == 0 => empty_rounds = 1,
                Ok(true) => {
                    self.log
                        .warn(format_args!("tx available ring is not readable; stopping"));
                    return used_any;
                }
                Ok(false) => return used_any,
                Err(e) => {
                    self.log
                        .warn(format_args!("cannot re-enable tx queue notifications: {e}"));
                    return used_any;
                }
            }
        }
    }

    /// Moves packets from the muxer into rx buffers while both exist. Returns whether any
    /// chain was completed.
    pub fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if !self.muxer.has_rx() || self.pending_reset_event || self.reset_unhandled {
            return false;
        }
        let mem = &active.mem;
        let q = &mut active.queues[RX];
        let mut used_any = false;
        let mut empty_rounds = 0u8;
        loop {
            if let Err(e) = q.disable_notification(mem) {
                self.log
                    .warn(format_args!("cannot disable rx queue notifications: {e}"));
                return used_any;
            }
            let mut out_of_buffers = false;
            let mut progressed = false;
            while self.muxer.has_rx() {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    out_of_buffers = true;
                    break;
                };
                progressed = true;
                let head = chain.head_index();
                let segs = match Segments::from_chain(chain, mem, Direction::Write) {
                    Ok(s) if s.len() >= HDR_SIZE as u64 => s,
                    Ok(s) => {
                        self.log.warn(format_args!(
                            "rx chain {head} holds {} bytes, less than a header; skipping it",
                            s.len()
                        ));
                        used_any |= add_used(q, mem, head, 0, &mut self.log);
                        continue;
                    }
                    Err(e) => {
                        self.log
                            .warn(format_args!("rx chain {head}: {e}; skipping it"));
                        used_any |= add_used(q, mem, head, 0, &mut self.log);
                        continue;
                    }
                };
                let room = segs.payload_room().min(u64::from(MAX_PKT_LEN)) as usize;
                let Some((hdr, n)) = self.muxer.next_rx(room, &mut self.scratch) else {
                    // Nothing after all (e.g. a socket that would block): keep the buffer.
                    q.go_to_previous_position();
                    break;
                };
                let payload = self.scratch.get(..n).unwrap_or_default();
                let len = match segs.write_packet(mem, &hdr, payload) {
                    Ok(len) => len,
                    Err(e) => {
                        self.log
                            .warn(format_args!("rx chain {head}: {e}; dropping {hdr}"));
                        if hdr.op == Op::Rw as u16 {
                            self.muxer.rx_failed(&hdr);
                        }
                        0
                    }
                };
                used_any |= add_used(q, mem, head, len, &mut self.log);
            }
            match q.enable_notification(mem) {
                // Buffers arrived while notifications were off and packets still wait.
                Ok(true) if out_of_buffers && self.muxer.has_rx() && progressed => empty_rounds = 0,
                // A buffer published just after the ring was read: read it again.
                Ok(true) if out_of_buffers && self.muxer.has_rx() && empty_rounds == 0 => {
                    empty_rounds = 1
                }
                Ok(true) if out_of_buffers && self.muxer.has_rx() => {
                    // The ring claims buffers but none can be read (e.g. an available index
                    // more than a queue size ahead): stop instead of spinning.
                    self.log
                        .warn(format_args!("rx available ring is not readable; stopping"));
                    return used_any;
                }
                Ok(_) => return used_any,
                Err(e) => {
                    self.log
                        .warn(format_args!("cannot re-enable rx queue notifications: {e}"));
                    return used_any;
                }
            }
        }
    }

    /// Delivers a pending transport reset event. Returns whether a chain was completed.
    fn flush_events(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let q = &mut active.queues[EVT];
        let mut used_any = false;
        while self.pending_reset_event {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = Segments::from_chain(chain, mem, Direction::Write)
                .and_then(|segs| segs.write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes()));
            let len = match written {
                Ok(()) => {
                    self.pending_reset_event = false;
                    self.reset_unhandled = true;
                    EVENT_SIZE as u32
                }
                Err(e) => {
                    self.log
                        .warn(format_args!("event chain {head}: {e}; skipping it"));
                    0
                }
            };
            used_any |= add_used(q, mem, head, len, &mut self.log);
        }
        used_any
    }

    /// Moves everything that can move and interrupts the driver where needed.
    fn run(&mut self, tx: bool) {
        if tx && self.process_tx() {
            self.signal(TX);
        }
        if self.process_rx() {
            self.signal(RX);
        }
        if self.flush_events() {
            self.signal(EVT);
        }
    }

    /// Makes the event loop watch exactly the current queue eventfds (none if inactive).
    fn sync_queue_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.registered.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                crate::guest_warn!("virtio-vsock: failed to unregister a queue eventfd: {e:?}");
            }
        }
        let Some(active) = &self.active else {
            return;
        };
        for (index, evt) in active.queue_evts.iter().enumerate() {
            match evt.try_clone() {
                Ok(evt) => match ops.add(Events::new(&evt, EventSet::IN)) {
                    Ok(()) => self.registered.push(evt),
                    Err(e) => log::error!(
                        "virtio-vsock: failed to register the {} queue eventfd: {e:?}",
                        QUEUE_NAMES[index]
                    ),
                },
                Err(e) => log::error!("virtio-vsock: failed to clone a queue eventfd: {e}"),
            }
        }
    }
}

fn add_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    log: &mut LogLimiter,
) -> bool {
    match q.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log.warn(format_args!("cannot complete chain {head}: {e}"));
            false
        }
    }
}

/// Validates one tx chain and hands its packet to the muxer.
fn handle_tx_chain(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    scratch: &mut [u8],
    log: &mut LogLimiter,
) {
    let head = chain.head_index();
    let segs = match Segments::from_chain(chain, mem, Direction::Read) {
        Ok(s) => s,
        Err(e) => {
            log.warn(format_args!("tx chain {head}: {e}; dropping it"));
            return;
        }
    };
    let hdr = match segs.read_header(mem) {
        Ok(h) => h,
        Err(e) => {
            log.warn(format_args!("tx chain {head}: {e}; dropping it"));
            return;
        }
    };
    let op = match hdr.check(segs.payload_room()) {
        Ok(op) => op,
        Err(e) => {
            muxer.recv_bad_packet(&hdr, &e);
            return;
        }
    };
    // Only data packets carry a payload; anything attached to control packets is ignored.
    let len = if op == Op::Rw { hdr.len as usize } else { 0 };
    let Some(payload) = scratch.get_mut(..len) else {
        // `check` bounds len by MAX_PKT_LEN, the scratch size.
        return;
    };
    if let Err(e) = segs.read_at(mem, HDR_SIZE as u64, payload) {
        muxer.recv_bad_packet(&hdr, &e.into());
        return;
    }
    muxer.recv_packet(&hdr, op, payload);
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
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
        read_config_space("virtio-vsock", &self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "virtio-vsock: ignoring {}-byte write to read-only config space at {offset:#x}",
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
        let queues = checked_queues(queues, &queue_evts, QUEUE_COUNT)?;
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
        self.pending_reset_event = false;
        self.reset_unhandled = false;
        self.muxer.reset_all();
        // The event loop then drops the queue eventfds and closes the connections' sockets.
        self.common.reset();
        true
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.common.activate_evt(), EventSet::IN)) {
            log::error!("virtio-vsock: failed to register the activation eventfd: {e:?}");
        }
        self.muxer.sync_epoll(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let mut tx = false;
        if fd == self.common.activate_evt().as_raw_fd() {
            // Non-blocking: a spurious wake-up just reads EAGAIN.
            let _ = self.common.activate_evt().read();
            self.sync_queue_registrations(ops);
            // Freshly activated (or woken): the driver may have queued packets already.
            tx = self.active.is_some();
        } else if let Some(index) = self.registered.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.registered[index].read();
            tx = index == TX;
            // The driver kicks the event queue after handling events (re-posting buffers).
            if index == EVT && self.reset_unhandled {
                log::debug!("virtio-vsock: the driver handled the transport reset");
                self.reset_unhandled = false;
            }
        } else if !self.muxer.handle_event(fd, events.event_set()) {
            // A socket closed earlier in this batch of events.
            log::debug!("virtio-vsock: event on unknown fd {fd}");
        }
        self.run(tx);
        if self.muxer.needs_sync() {
            self.muxer.sync_epoll(ops);
        }
    }
}

#[cfg(test)]
mod tests;
