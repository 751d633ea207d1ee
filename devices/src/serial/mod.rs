//! 16550A UART (COM1) on port I/O, built on `vm_superio::Serial`.
//!
//! Guest output never blocks the vCPU: bytes go into a bounded in-memory queue that a
//! dedicated writer thread drains into the real sink. When the queue is full (the sink is slow
//! or stuck), new bytes are dropped and counted.

mod output;
mod persist;

use std::io;

use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use output::SerialOutput;
pub use persist::SerialSnapshot;

/// Port I/O base of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// Default bound on guest output waiting for the sink.
pub const DEFAULT_OUTPUT_CAPACITY: usize = 64 * 1024;

/// Errors from creating a [`Serial`].
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output capacity must hold at least one byte.
    #[error("serial output queue capacity must be non-zero (got {0})")]
    ZeroCapacity(usize),
    /// The writer thread could not be started.
    #[error("failed to spawn the serial output thread: {0}")]
    SpawnWriter(#[source] io::Error),
    #[error("cannot restore the serial port from its saved state: {0}")]
    Restore(String),
}

/// The emulated UART.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("dropped_bytes", &self.dropped_bytes())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART raising `irq` and sending guest output to `out` through a
    /// [`DEFAULT_OUTPUT_CAPACITY`]-byte queue.
    pub fn new(irq: EventFd, out: Box<dyn io::Write + Send>) -> Result<Self, SerialError> {
        Self::with_capacity(irq, out, DEFAULT_OUTPUT_CAPACITY)
    }

    /// Like [`Serial::new`] with an explicit output queue bound in bytes.
    pub fn with_capacity(
        irq: EventFd,
        out: Box<dyn io::Write + Send>,
        capacity: usize,
    ) -> Result<Self, SerialError> {
        if capacity == 0 {
            return Err(SerialError::ZeroCapacity(capacity));
        }
        let output = SerialOutput::spawn(out, capacity).map_err(SerialError::SpawnWriter)?;
        Ok(Serial {
            uart: vm_superio::Serial::new(IrqLine::new(irq), output),
        })
    }

    /// Guest output bytes dropped so far because the output queue was full.
    pub fn dropped_bytes(&self) -> u64 {
        self.uart.writer().dropped_bytes()
    }

    /// Offers `input` to the guest (receive FIFO). Returns how many bytes were accepted; the
    /// rest did not fit in the FIFO and should be offered again later.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                crate::guest_warn!("serial: failed to queue {} input bytes: {e}", input.len());
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Register state, for snapshots.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(reg), 1) if offset < SERIAL_PORT_LEN => data[0] = self.uart.read(reg),
            _ => {
                crate::guest_warn!(
                    "serial: ignoring {}-byte read at offset {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(reg), &[value]) if offset < SERIAL_PORT_LEN => {
                if let Err(e) = self.uart.write(reg, value) {
                    crate::guest_warn!("serial: write of {value:#x} to register {reg} failed: {e}");
                }
            }
            _ => crate::guest_warn!(
                "serial: ignoring {}-byte write at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
