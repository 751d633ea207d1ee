use std::io::{self, Write};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

const DATA: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LSR: u64 = 5;

#[derive(Clone, Default)]
struct SharedSink(Arc<Mutex<Vec<u8>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A sink whose every `write` waits for a token on `gate` (like a terminal nobody reads).
struct StuckSink {
    gate: Receiver<()>,
    inner: SharedSink,
}

impl Write for StuckSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Once the test drops the sender, writes go through.
        let _ = self.gate.recv();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn evt() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

#[test]
fn output_reaches_the_sink() {
    let sink = SharedSink::default();
    let mut serial = Serial::new(evt(), Box::new(sink.clone())).unwrap();
    for b in b"hello, ember\n" {
        serial.write(DATA, &[*b]);
    }
    assert!(wait_for(
        || sink.0.lock().unwrap().as_slice() == b"hello, ember\n"
    ));
    assert_eq!(serial.dropped_bytes(), 0);
}

#[test]
fn stuck_sink_drops_and_counts_without_blocking() {
    let (tx, rx) = channel();
    let sink = SharedSink::default();
    let stuck = StuckSink {
        gate: rx,
        inner: sink.clone(),
    };
    let mut serial = Serial::with_capacity(evt(), Box::new(stuck), 16).unwrap();

    let start = Instant::now();
    for i in 0..100u8 {
        serial.write(DATA, &[i]);
    }
    // 100 port writes with a stuck sink must not wait on it.
    assert!(start.elapsed() < Duration::from_secs(2));

    // The writer thread holds at most one chunk (<= 16 bytes here), the queue 16 more.
    let dropped = serial.dropped_bytes();
    assert!((68..=84).contains(&dropped), "dropped {dropped}");

    // Unstick the sink: everything that was not dropped arrives, in order.
    drop(tx);
    let expected = 100 - dropped as usize;
    assert!(wait_for(|| sink.0.lock().unwrap().len() == expected));
    let got = sink.0.lock().unwrap().clone();
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(got[0], 0);
}

#[test]
fn failing_sink_counts_lost_bytes() {
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("broken pipe"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut serial = Serial::new(evt(), Box::new(Broken)).unwrap();
    serial.write(DATA, b"x");
    assert!(wait_for(|| serial.dropped_bytes() == 1));
}

#[test]
fn zero_capacity_is_rejected() {
    assert!(matches!(
        Serial::with_capacity(evt(), Box::new(io::sink()), 0),
        Err(SerialError::ZeroCapacity(0))
    ));
}

#[test]
fn thr_empty_interrupt_is_raised() {
    let irq = evt();
    let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
    // Enable the "transmitter holding register empty" interrupt.
    serial.write(IER, &[0x02]);
    assert!(irq.read().unwrap() >= 1);
    // The guest reads IIR (acknowledging it); the next byte raises the interrupt again.
    let mut iir = [0u8];
    serial.read(IIR, &mut iir);
    assert_eq!(iir[0] & 0x0f, 0x02, "THR empty pending");
    serial.write(DATA, b"a");
    assert_eq!(irq.read().unwrap(), 1);
}

#[test]
fn input_is_readable_by_the_guest() {
    let irq = evt();
    let mut serial = Serial::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
    serial.write(IER, &[0x01]); // received-data interrupt
    assert_eq!(serial.enqueue_input(b"ok"), 2);
    assert!(irq.read().unwrap() >= 1);

    let mut lsr = [0u8];
    serial.read(LSR, &mut lsr);
    assert_eq!(lsr[0] & 1, 1, "data ready");
    let mut b = [0u8];
    serial.read(DATA, &mut b);
    assert_eq!(b[0], b'o');
    serial.read(DATA, &mut b);
    assert_eq!(b[0], b'k');
    serial.read(LSR, &mut lsr);
    assert_eq!(lsr[0] & 1, 0);

    // Overfilling the FIFO accepts only what fits.
    let cap = serial.input_capacity();
    assert_eq!(serial.enqueue_input(&vec![b'z'; cap + 10]), cap);
    assert_eq!(serial.enqueue_input(b"more"), 0);
}

#[test]
fn odd_accesses_are_ignored() {
    let sink = SharedSink::default();
    let mut serial = Serial::new(evt(), Box::new(sink.clone())).unwrap();
    let mut two = [0xffu8; 2];
    serial.read(DATA, &mut two);
    assert_eq!(two, [0, 0]);
    let mut one = [0xffu8; 1];
    serial.read(8, &mut one);
    assert_eq!(one, [0]);
    serial.read(u64::MAX, &mut one);
    serial.write(DATA, b"ab");
    serial.write(9, b"a");
    serial.write(u64::MAX, b"a");
    serial.write(DATA, b"");
    std::thread::sleep(Duration::from_millis(20));
    assert!(sink.0.lock().unwrap().is_empty());
}
