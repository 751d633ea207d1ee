//! Bounded, non-blocking output path from the UART to the host sink.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::bus::lock_recover;

/// Largest chunk the writer thread takes out of the queue at once.
const WRITE_CHUNK: usize = 4096;

#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// Set when the UART goes away: the writer drains what is left and exits.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    capacity: usize,
    dropped: AtomicU64,
    warned: AtomicBool,
}

/// The `Write` end handed to `vm_superio::Serial`. `write` never blocks on the sink: it only
/// appends to the bounded queue (briefly taking a lock the writer thread never holds while
/// doing I/O).
pub(super) struct SerialOutput {
    shared: Arc<Shared>,
}

impl SerialOutput {
    /// Starts the writer thread feeding `sink`.
    pub(super) fn spawn(mut sink: Box<dyn Write + Send>, capacity: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            capacity,
            dropped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        ember_seccomp::spawn_filtered(
            "serial-out".into(),
            ember_seccomp::ThreadKind::SerialOutput,
            move || writer_loop(&thread_shared, &mut *sink),
        )?;
        Ok(SerialOutput { shared })
    }

    pub(super) fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = lock_recover(&self.shared.pending);
        let room = self.shared.capacity.saturating_sub(pending.bytes.len());
        let taken = room.min(buf.len());
        pending.bytes.extend(&buf[..taken]);
        drop(pending);
        if taken > 0 {
            self.shared.wake.notify_one();
        }
        let lost = buf.len() - taken;
        if lost > 0 {
            self.shared
                .dropped
                .fetch_add(lost as u64, Ordering::Relaxed);
            if !self.shared.warned.swap(true, Ordering::Relaxed) {
                crate::guest_warn!(
                    "serial: output queue full ({} bytes), dropping guest output \
                     (further drops are only counted)",
                    self.shared.capacity
                );
            }
        }
        // Report success even for dropped bytes: the guest must not see (or wait on) a slow
        // host console.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SerialOutput {
    fn drop(&mut self) {
        lock_recover(&self.shared.pending).closed = true;
        self.shared.wake.notify_one();
        // Not joined: the sink may be stuck forever, and the VMM must still be able to exit.
    }
}

fn writer_loop(shared: &Shared, sink: &mut dyn Write) {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    let mut sink_failed = false;
    loop {
        {
            let mut pending = lock_recover(&shared.pending);
            while pending.bytes.is_empty() && !pending.closed {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if pending.bytes.is_empty() {
                return; // closed and drained
            }
            let n = pending.bytes.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(pending.bytes.drain(..n));
        }
        if let Err(e) = sink.write_all(&chunk).and_then(|()| sink.flush()) {
            shared
                .dropped
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if !sink_failed {
                sink_failed = true;
                crate::guest_warn!("serial: writing guest output to the sink failed: {e}");
            }
        }
    }
}
