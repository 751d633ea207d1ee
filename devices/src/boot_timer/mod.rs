//! Boot timer: the guest's init writes [`BOOT_TIMER_MAGIC`] to port [`BOOT_TIMER_PORT`] once
//! userspace is up, and the VMM learns how long the boot took by its own clock. The init also
//! reports milestones by the guest's clock (microseconds since the guest kernel started), one
//! 32-bit write each at [`BOOT_TIMER_PORT`] + [`GuestMilestone::offset`], so a boot report
//! can put the guest's view of its boot beside the VMM's.
//!
//! The guest is untrusted: each figure is taken once, only from a 4-byte write at its own
//! offset, and is only ever reported, never acted on.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// Port the guest writes to (the VMM maps [`BOOT_TIMER_PORT_LEN`] ports from there).
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// Ports the device covers: the magic byte at 0, then one 32-bit register per milestone.
pub const BOOT_TIMER_PORT_LEN: u64 = 16;
/// Value that marks "userspace reached".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// A point of the boot the guest reports by its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMilestone {
    /// The guest kernel ran init (its log's "Run … as init process" timestamp).
    KernelRanInit = 0,
    /// The agent (init) started: its first instruction's moment, near enough.
    AgentStarted = 1,
    /// The agent listens for the host.
    AgentReady = 2,
}

impl GuestMilestone {
    pub const ALL: [GuestMilestone; 3] = [
        GuestMilestone::KernelRanInit,
        GuestMilestone::AgentStarted,
        GuestMilestone::AgentReady,
    ];

    /// The milestone's register, as an offset from [`BOOT_TIMER_PORT`].
    pub const fn offset(self) -> u64 {
        4 + 4 * self as u64
    }

    fn at_offset(offset: u64) -> Option<GuestMilestone> {
        Self::ALL.into_iter().find(|m| m.offset() == offset)
    }
}

/// The guest's own account of its boot, in microseconds of its clock since its kernel
/// started (`None`: not reported, e.g. a restored guest, or a guest without ember's agent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMilestones {
    pub kernel_ran_init_us: Option<u64>,
    pub agent_started_us: Option<u64>,
    pub agent_ready_us: Option<u64>,
}

/// What the guest has signalled so far; shared between the device and the VMM's report.
#[derive(Debug, Default)]
pub struct BootMarks {
    userspace: OnceLock<Duration>,
    guest_us: [OnceLock<u32>; 3],
}

impl BootMarks {
    /// Time from the timer's start to the guest's "userspace reached".
    pub fn userspace(&self) -> Option<Duration> {
        self.userspace.get().copied()
    }

    /// The milestones the guest reported.
    pub fn guest(&self) -> GuestMilestones {
        let get = |m: GuestMilestone| self.guest_us[m as usize].get().map(|&us| u64::from(us));
        GuestMilestones {
            kernel_ran_init_us: get(GuestMilestone::KernelRanInit),
            agent_started_us: get(GuestMilestone::AgentStarted),
            agent_ready_us: get(GuestMilestone::AgentReady),
        }
    }
}

/// Records the time from `start` to the first magic write, and the guest's milestones.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    marks: Arc<BootMarks>,
}

impl BootTimer {
    /// A timer measuring from `start` (typically when the VMM process started).
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            marks: Arc::new(BootMarks::default()),
        }
    }

    /// Shared handle to what the guest signals.
    pub fn marks(&self) -> Arc<BootMarks> {
        self.marks.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_TIMER_MAGIC] {
            let elapsed = self.start.elapsed();
            if self.marks.userspace.set(elapsed).is_ok() {
                log::info!("guest userspace reached after {} ms", elapsed.as_millis());
            }
            return;
        }
        let (Some(milestone), Ok(bytes)) =
            (GuestMilestone::at_offset(offset), <[u8; 4]>::try_from(data))
        else {
            return;
        };
        let us = u32::from_le_bytes(bytes);
        if self.marks.guest_us[milestone as usize].set(us).is_ok() {
            log::debug!("guest reports {milestone:?} at {us} µs of its clock");
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
        let marks = timer.marks();

        timer.write(0, &[BOOT_TIMER_MAGIC - 1]);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[]);
        assert!(marks.userspace().is_none());

        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = marks.userspace().unwrap();
        assert!(first >= Duration::from_millis(50));

        std::thread::sleep(Duration::from_millis(5));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(marks.userspace().unwrap(), first);

        let mut b = [0xff];
        timer.read(0, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn guest_milestones_take_one_aligned_dword_each_once() {
        let mut timer = BootTimer::new(Instant::now());
        let marks = timer.marks();
        let init = GuestMilestone::KernelRanInit.offset();
        let ready = GuestMilestone::AgentReady.offset();

        // Wrong widths, misaligned offsets and offsets past the last register are ignored.
        timer.write(init, &[1, 0]);
        timer.write(init, &[1, 0, 0, 0, 0, 0, 0, 0]);
        timer.write(init + 1, &[1, 0, 0, 0]);
        timer.write(ready + 4, &[1, 0, 0, 0]);
        assert_eq!(marks.guest(), GuestMilestones::default());

        timer.write(init, &880_611u32.to_le_bytes());
        timer.write(init, &1u32.to_le_bytes());
        timer.write(ready, &u32::MAX.to_le_bytes());
        assert_eq!(
            marks.guest(),
            GuestMilestones {
                kernel_ran_init_us: Some(880_611),
                agent_started_us: None,
                agent_ready_us: Some(u64::from(u32::MAX)),
            }
        );
        assert!(
            marks.userspace().is_none(),
            "a milestone is not the magic byte"
        );
        assert!(ready + 4 <= BOOT_TIMER_PORT_LEN);
    }
}
