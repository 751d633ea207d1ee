//! Minimal i8042 (PS/2 controller): only what a guest needs to reboot / power off the VM.
//!
//! Port mapping: the VMM inserts the device **once at base 0x60 with length 5**, covering ports
//! 0x60 (data), 0x61 (system control port B), 0x62, 0x63 and 0x64 (command/status). Offsets
//! passed to the device are therefore `port - 0x60`; the command port is offset 4. All reads
//! return 0 (no keyboard, output buffer empty) and only the "pulse reset line" command (0xFE
//! written to 0x64) has an effect: it signals `reset_evt`, on which the VMM exits.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// First port the device decodes.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Number of ports decoded from [`I8042_PORT_BASE`] (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command port (0x64) from [`I8042_PORT_BASE`].
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// The "pulse CPU reset line" command.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// The emulated controller.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<IrqLine>,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            inner: I8042Device::new(IrqLine::new(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if offset < I8042_PORT_LEN => data[0] = self.inner.read(off),
            _ => {
                crate::guest_warn!(
                    "i8042: ignoring {}-byte read at offset {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), &[value]) if offset < I8042_PORT_LEN => {
                if off == I8042_COMMAND_OFFSET as u8 && value == I8042_CMD_RESET_CPU {
                    log::info!("i8042: guest requested a CPU reset");
                }
                if let Err(e) = self.inner.write(off, value) {
                    log::error!("i8042: failed to signal the reset event: {e}");
                }
            }
            _ => crate::guest_warn!(
                "i8042: ignoring {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn reset_command_raises_the_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());

        // Other commands, the data port and odd sizes do nothing.
        dev.write(I8042_COMMAND_OFFSET, &[0xaa]);
        dev.write(0, &[I8042_CMD_RESET_CPU]);
        dev.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU, 0]);
        dev.write(u64::MAX, &[I8042_CMD_RESET_CPU]);
        assert!(evt.read().is_err(), "no reset expected yet");

        dev.write(I8042_COMMAND_OFFSET, &[I8042_CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn reads_return_zero() {
        let mut dev = I8042::new(EventFd::new(EFD_NONBLOCK).unwrap());
        for off in 0..I8042_PORT_LEN {
            let mut b = [0xff];
            dev.read(off, &mut b);
            assert_eq!(b, [0]);
        }
        let mut w = [0xff; 4];
        dev.read(0, &mut w);
        assert_eq!(w, [0; 4]);
    }
}
