//! Serial port state for snapshots.

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use super::{output::SerialOutput, Serial, SerialError, DEFAULT_OUTPUT_CAPACITY};
use crate::irq::IrqLine;

/// The 16550's registers and receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Serial {
    /// The port's state (the output queue is host-side and not part of it).
    pub fn save_state(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// A serial port that continues from `state`.
    pub fn from_snapshot(
        irq: EventFd,
        out: Box<dyn io::Write + Send>,
        state: &SerialSnapshot,
    ) -> Result<Serial, SerialError> {
        let output =
            SerialOutput::spawn(out, DEFAULT_OUTPUT_CAPACITY).map_err(SerialError::SpawnWriter)?;
        let uart =
            vm_superio::Serial::from_state(&state.into(), IrqLine::new(irq), NoEvents, output)
                .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(Serial { uart })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn registers_survive_save_and_restore() {
        let mut serial =
            Serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), Box::new(io::sink())).unwrap();
        serial.write(7, &[0x5a]); // scratch register
        serial.write(3, &[0x03]); // line control: 8N1
        serial.write(1, &[0x01]); // interrupt enable: received data
        serial.enqueue_input(b"hi");
        let state = serial.save_state();
        assert_eq!(state.scratch, 0x5a);
        assert_eq!(state.in_buffer, b"hi");

        let json = serde_json::to_string(&state).unwrap();
        let state: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let mut restored = Serial::from_snapshot(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Box::new(io::sink()),
            &state,
        )
        .unwrap();
        let mut byte = [0u8];
        restored.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        restored.read(0, &mut byte);
        assert_eq!(byte[0], b'h', "the receive FIFO carries over");
    }

    #[test]
    fn an_oversized_fifo_is_refused() {
        let state = SerialSnapshot {
            in_buffer: vec![0; 1 << 20],
            ..SerialState::default().into()
        };
        let result = Serial::from_snapshot(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Box::new(io::sink()),
            &state,
        );
        assert!(matches!(result, Err(SerialError::Restore(_))));
    }
}
