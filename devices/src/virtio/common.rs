//! What every virtio device back-end keeps the same way, in one struct each device embeds:
//! its name for messages, the features it offers and those the driver accepted, its queues'
//! maximum sizes, and the eventfd that tells its event loop to (de)register queues or wake.

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device's feature negotiation, queue sizes and event-loop signal.
#[derive(Debug)]
pub struct VirtioCommon {
    name: &'static str,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    activate_evt: EventFd,
}

impl VirtioCommon {
    /// A device called `name` (as messages say it, e.g. `virtio-block`) that offers
    /// `avail_features` and has one queue per entry of `queue_max_sizes`.
    pub fn new(
        name: &'static str,
        avail_features: u64,
        queue_max_sizes: &[u16],
    ) -> io::Result<VirtioCommon> {
        Ok(VirtioCommon {
            name,
            avail_features,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted (a subset of those offered).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// The eventfd the device's event loop watches for (de)activation and wake-ups.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Keeps what of `acked` was offered; the rest is a driver's mistake (or a hostile
    /// guest's), warned about and dropped.
    pub fn set_acked_features(&mut self, acked: u64) {
        let unknown = acked & !self.avail_features;
        if unknown != 0 {
            crate::guest_warn!(
                "{}: ignoring acked features {unknown:#x} that were not offered",
                self.name
            );
        }
        self.acked_features = acked & self.avail_features;
    }

    /// Wakes the device's event loop (to register queues after an activation, to drop them
    /// after a reset, or to do work the device queued for it).
    pub fn signal_event_loop(&self) -> io::Result<()> {
        self.activate_evt.write(1)
    }

    /// Back to before feature negotiation, the event loop told so that it drops the queues'
    /// registrations.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        if let Err(e) = self.signal_event_loop() {
            crate::guest_warn!(
                "{}: failed to signal the reset to the event loop: {e}",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_offered_features_are_acked_and_a_reset_forgets_them() {
        let mut common = VirtioCommon::new("virtio-test", 0b1010, &[256, 256]).unwrap();
        common.set_acked_features(0b1110);
        assert_eq!(common.acked_features(), 0b1010);
        assert_eq!(common.queue_max_sizes(), [256, 256]);
        common.reset();
        assert_eq!(common.acked_features(), 0);
        assert_eq!(common.activate_evt().read().unwrap(), 1);
    }
}
