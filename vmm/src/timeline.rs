//! Milestones of a VM's start (a boot or a restore), in milliseconds since the VMM's start
//! ([`crate::VmmOptions::start`]): where a start spends its time, reported by `ember run`, the
//! service's `GET /sandboxes/{id}` and the bench report.

use std::sync::Mutex;
use std::time::Instant;

use ember_devices::GuestMilestones;
use serde::{Deserialize, Serialize};

/// One step of a start and when it was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Milestone {
    /// What was reached (`memory_mapped`, `devices_built`, `vcpus_running`, …).
    pub step: String,
    /// Milliseconds since the start.
    pub ms: f64,
}

/// Now, in milliseconds since the Unix epoch (how processes put their timelines on one
/// axis).
pub fn unix_ms_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The milestones reached so far.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    steps: Mutex<Vec<Milestone>>,
}

impl Timeline {
    pub fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            steps: Mutex::new(Vec::new()),
        }
    }

    /// Records `step` as reached now (a step already recorded keeps its first time).
    pub fn mark(&self, step: &str) {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        if steps.iter().all(|s| s.step != step) {
            log::debug!("{step} at {ms:.1} ms");
            steps.push(Milestone {
                step: step.to_string(),
                ms,
            });
        }
    }

    /// The milestones in the order they were reached.
    pub fn steps(&self) -> Vec<Milestone> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `steps` with the guest's own milestones put on the same axis, sorted by time. The agent
/// notes its start in the guest's log right before it signals "userspace reached", whose
/// moment the VMM knows (`userspace_ms`): that pair ties the guest's clock to the VMM's. The
/// guest's clock starts some way into the kernel's boot, not at its first instruction; the
/// gap shows as `guest_clock_started` after `vcpus_running`. Without the pair, `steps` as
/// they are.
pub fn with_guest_milestones(
    mut steps: Vec<Milestone>,
    guest: &GuestMilestones,
    userspace_ms: Option<f64>,
) -> Vec<Milestone> {
    let (Some(userspace_ms), Some(started_us)) = (userspace_ms, guest.agent_started_us) else {
        return steps;
    };
    let clock_zero = userspace_ms - started_us as f64 / 1e3;
    let reported = [
        ("guest_clock_started", Some(0)),
        ("guest_kernel_ran_init", guest.kernel_ran_init_us),
        ("guest_agent_started", guest.agent_started_us),
        ("guest_agent_ready", guest.agent_ready_us),
    ];
    for (step, us) in reported {
        if let Some(us) = us {
            steps.push(Milestone {
                step: step.to_string(),
                ms: clock_zero + us as f64 / 1e3,
            });
        }
    }
    steps.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_milestones_are_tied_to_the_vmm_clock_by_the_agents_start() {
        let step = |step: &str, ms: f64| Milestone {
            step: step.into(),
            ms,
        };
        let guest = GuestMilestones {
            kernel_ran_init_us: Some(800_000),
            agent_started_us: Some(850_000),
            agent_ready_us: None,
        };
        let steps = vec![
            step("devices_built", 10.0),
            step("vcpus_running", 20.0),
            step("agent_answered", 1300.0),
        ];
        // "Userspace reached" at 1150 ms of the VMM's clock: the guest's clock started at 300.
        let merged = with_guest_milestones(steps.clone(), &guest, Some(1150.0));
        assert_eq!(
            merged,
            [
                step("devices_built", 10.0),
                step("vcpus_running", 20.0),
                step("guest_clock_started", 300.0),
                step("guest_kernel_ran_init", 1100.0),
                step("guest_agent_started", 1150.0),
                step("agent_answered", 1300.0),
            ]
        );
        assert_eq!(with_guest_milestones(steps.clone(), &guest, None), steps);
        assert_eq!(
            with_guest_milestones(steps.clone(), &GuestMilestones::default(), Some(1150.0)),
            steps
        );
    }

    #[test]
    fn steps_keep_their_first_time_and_order() {
        let timeline = Timeline::new(Instant::now());
        timeline.mark("a");
        std::thread::sleep(std::time::Duration::from_millis(2));
        timeline.mark("b");
        timeline.mark("a");
        let steps = timeline.steps();
        assert_eq!(
            steps.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(steps[1].ms > steps[0].ms);
    }
}
