//! Interrupt lines backed by an `EventFd`.
//!
//! The VMM registers the eventfd with KVM as an irqfd, so writing it injects the interrupt
//! without a round trip through the VMM.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt (or any other one-shot signal, such as the i8042 reset line)
/// raised by writing `1` to an eventfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wraps `evt`; the caller keeps (a clone of) it to register it as an irqfd.
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }

    /// Raises the line.
    pub fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }

    /// The underlying eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Duplicates the line (a second fd for the same eventfd).
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(IrqLine)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn trigger_writes_the_eventfd() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let line = IrqLine::new(evt.try_clone().unwrap());
        line.trigger().unwrap();
        vm_superio::Trigger::trigger(&line).unwrap();
        assert_eq!(evt.read().unwrap(), 2);
    }
}
