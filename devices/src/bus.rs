//! Address-range dispatch for port I/O and MMIO exits.
//!
//! The bus is filled at start-up and then shared read-only (`Arc<Bus>`) by the vCPU threads; each
//! device sits behind its own mutex so two vCPUs can touch different devices concurrently.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A device that answers reads and writes inside the range it was inserted at.
///
/// `offset` is relative to the start of that range; the bus guarantees
/// `offset + data.len() <= len`.
pub trait BusDevice: Send {
    /// Handles a guest read; the device must fill all of `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from inserting into or dispatching on a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length 0 was inserted.
    #[error("cannot insert a zero-length range at {base:#x}")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps the existing range {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already present.
        other_base: u64,
        /// Length of the range already present.
        other_len: u64,
    },
    /// No device covers the accessed address.
    #[error("no device at address {addr:#x}")]
    NoDevice {
        /// The accessed address.
        addr: u64,
    },
    /// The access starts inside a device's range but does not end inside it.
    #[error("access at {addr:#x} of {len} bytes crosses the end of the device range")]
    CrossesRange {
        /// The accessed address.
        addr: u64,
        /// The access size in bytes.
        len: usize,
    },
}

#[derive(Clone)]
struct BusRange {
    /// Length of the range in bytes (never 0).
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

impl BusRange {
    /// Last address covered by the range. Cannot overflow: `insert` checked `base + len - 1`.
    fn last(&self, base: u64) -> u64 {
        base + (self.len - 1)
    }
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    /// Keyed by base address.
    ranges: BTreeMap<u64, BusRange>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|(base, r)| format!("{base:#x}+{:#x}", r.len)),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;

        // The only candidates for overlap are the closest range starting at or before `last`.
        if let Some((&other_base, other)) = self.ranges.range(..=last).next_back() {
            if other.last(other_base) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.ranges.insert(base, BusRange { len, device: dev });
        Ok(())
    }

    /// Finds the device covering the whole access `[addr, addr + len)`; returns it and the
    /// offset of `addr` inside its range.
    fn resolve(&self, addr: u64, len: usize) -> Result<(&BusRange, u64), BusError> {
        let (&base, range) = self
            .ranges
            .range(..=addr)
            .next_back()
            .filter(|(&base, r)| addr <= r.last(base))
            .ok_or(BusError::NoDevice { addr })?;
        let offset = addr - base;
        // A zero-length access is trivially inside; otherwise the last byte must be inside too.
        let fits = match (len as u64).checked_sub(1) {
            None => true,
            Some(extra) => offset.checked_add(extra).is_some_and(|end| end < range.len),
        };
        if !fits {
            return Err(BusError::CrossesRange { addr, len });
        }
        Ok((range, offset))
    }

    /// Dispatches a guest read. On error `data` is left untouched (the caller should fill it
    /// with the "nothing there" value, typically all ones or zeros).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (range, offset) = self.resolve(addr, data.len())?;
        lock_recover(&range.device).read(offset, data);
        Ok(())
    }

    /// Dispatches a guest write.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (range, offset) = self.resolve(addr, data.len())?;
        lock_recover(&range.device).write(offset, data);
        Ok(())
    }
}

/// Locks `m`, recovering the guard if a previous holder panicked: a device's state stays usable
/// and a vCPU thread must not die because another thread did.
pub(crate) fn lock_recover<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        crate::guest_warn!("device mutex was poisoned by a panicking thread; recovering it");
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access; reads return the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_zero_overflow_and_overlap() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(probe(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // The very last byte of the address space is mappable.
        bus.insert(probe(), u64::MAX, 1).unwrap();

        bus.insert(probe(), 0x100, 0x10).unwrap();
        for (base, len) in [
            (0x100, 0x10),
            (0xf8, 0x9),
            (0x10f, 1),
            (0x104, 2),
            (0x0, 0x1000),
        ] {
            assert!(
                matches!(
                    bus.insert(probe(), base, len),
                    Err(BusError::Overlap {
                        other_base: 0x100,
                        other_len: 0x10,
                        ..
                    })
                ),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x1000, 0x1000).unwrap();

        bus.write(0x3fb, &[7]).unwrap();
        assert_eq!(a.lock().unwrap().last_write, Some((3, vec![7])));
        assert!(b.lock().unwrap().last_write.is_none());

        bus.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            b.lock().unwrap().last_write,
            Some((0xffc, vec![1, 2, 3, 4]))
        );

        let mut data = [0u8; 2];
        bus.read(0x1010, &mut data).unwrap();
        assert_eq!(data, [0x10, 0x10]);

        assert_eq!(
            bus.read(0x3f7, &mut data),
            Err(BusError::NoDevice { addr: 0x3f7 })
        );
        assert_eq!(
            bus.write(0x400, &[0]),
            Err(BusError::NoDevice { addr: 0x400 })
        );
        assert_eq!(
            bus.write(0x1ffe, &[0; 4]),
            Err(BusError::CrossesRange {
                addr: 0x1ffe,
                len: 4
            })
        );
        assert_eq!(
            bus.read(u64::MAX, &mut data),
            Err(BusError::NoDevice { addr: u64::MAX })
        );
    }

    #[test]
    fn poisoned_device_mutex_does_not_panic_the_caller() {
        let mut bus = Bus::new();
        let dev = probe();
        bus.insert(dev.clone(), 0x60, 5).unwrap();
        let d2 = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = d2.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(dev.is_poisoned());
        bus.write(0x64, &[0xfe]).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x61, &mut data).unwrap();
        assert_eq!(data, [1]);
    }
}
