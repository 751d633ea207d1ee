//! Boot timer: the guest's init writes [`BOOT_TIMER_MAGIC`] to port [`BOOT_TIMER_PORT`] once
//! userspace is up, and the VMM learns how long the boot took.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// Port the guest writes to (the VMM maps the device there with length 1).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// Value that marks "userspace reached".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Records the time from `start` to the first magic write.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// A timer measuring from `start` (typically when the VMM process started).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            reached: Arc::new(OnceLock::new()),
        }
    }

    /// Shared handle: set (once) to the elapsed time when the guest signals userspace.
    pub fn reached(&self) -> Arc<OnceLock<Duration>> {
        self.reached.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_TIMER_MAGIC] {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.reached.set(elapsed).is_ok() {
            log::info!("guest userspace reached after {} ms", elapsed.as_millis());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_once_and_ignores_other_writes() {
        let start = Instant::now() - Duration::from_millis(50);
        let mut timer = BootTimer::new(start);
        let reached = timer.reached();

        timer.write(0, &[BOOT_TIMER_MAGIC - 1]);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[]);
        assert!(reached.get().is_none());

        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = *reached.get().unwrap();
        assert!(first >= Duration::from_millis(50));

        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(*reached.get().unwrap(), first);

        let mut b = [0xff];
        timer.read(0, &mut b);
        assert_eq!(b, [0]);
    }
}
