//! Warnings a guest can trigger at will (a bad register write, a malformed descriptor) are
//! logged at most [`BURST`] times per call site per [`WINDOW_SECS`]; the rest are counted and
//! the count goes with the next warning let through. A hostile guest cannot fill the host's
//! disk with the VMM's log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Warnings let through per call site per window.
pub const BURST: u64 = 10;
/// The window, in seconds.
pub const WINDOW_SECS: u64 = 60;

/// One call site's budget.
#[derive(Debug)]
pub struct LogLimit {
    window: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            window: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now; if so, how many warnings were suppressed since the last one.
    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.admit_at(now / WINDOW_SECS)
    }

    fn admit_at(&self, window: u64) -> Option<u64> {
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit::new()
    }
}

/// `log::warn!` under a [`LogLimit`] of its own call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        match LIMIT.admit() {
            Some(0) => log::warn!($($arg)+),
            Some(suppressed) => log::warn!(
                "{} ({suppressed} like it suppressed)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_warnings_are_counted_until_the_next_window() {
        let limit = LogLimit::new();
        for _ in 0..BURST {
            assert_eq!(limit.admit_at(7), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.admit_at(7), None);
        }
        assert_eq!(limit.admit_at(8), Some(1000));
        assert_eq!(limit.admit_at(8), Some(0));
    }
}
