//! Milestones of a VM's start (a boot or a restore), in milliseconds since the VMM's start
//! ([`crate::VmmOptions::start`]): where a start spends its time, reported by `ember run`, the
//! service's `GET /sandboxes/{id}` and the bench report.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One step of a start and when it was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
