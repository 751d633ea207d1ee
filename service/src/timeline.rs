//! A sandbox's start, step by step, in milliseconds since the service accepted its request:
//! the service's own steps (the VMM process spawned), the VMM's (memory mapped, devices
//! built, vCPUs running, the agent answering; put on the same axis by wall-clock time), and
//! the first command's start and end. Shown by `GET /sandboxes/{id}` and the bench report.

use ember_vmm::timeline::unix_ms_now;
use ember_vmm::Milestone;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartTimeline {
    /// When the request was accepted (milliseconds since the Unix epoch).
    pub accepted_unix_ms: f64,
    /// Steps in the order reached, in milliseconds since then.
    pub steps: Vec<Milestone>,
}

impl StartTimeline {
    /// A timeline whose request was accepted `ago_ms` milliseconds ago.
    pub fn accepted(ago_ms: f64) -> StartTimeline {
        StartTimeline {
            accepted_unix_ms: unix_ms_now() - ago_ms,
            steps: vec![Milestone {
                step: "request_accepted".into(),
                ms: 0.0,
            }],
        }
    }

    /// Records `step` as reached now, unless it was already.
    pub fn mark(&mut self, step: &str) {
        let ms = unix_ms_now() - self.accepted_unix_ms;
        self.push(step, ms);
    }

    fn push(&mut self, step: &str, ms: f64) {
        if self.accepted_unix_ms > 0.0 && self.steps.iter().all(|s| s.step != step) {
            self.steps.push(Milestone {
                step: step.to_string(),
                ms,
            });
        }
    }

    /// Adds the VMM's own milestones, counted from its start at `started_unix_ms`.
    pub fn add_vmm(&mut self, started_unix_ms: f64, steps: &[Milestone]) {
        if started_unix_ms <= 0.0 {
            return;
        }
        let offset = started_unix_ms - self.accepted_unix_ms;
        self.push("vmm_started", offset);
        for step in steps {
            self.push(&step.step, offset + step.ms);
        }
    }

    /// When `step` was reached, if it was.
    pub fn at(&self, step: &str) -> Option<f64> {
        self.steps.iter().find(|s| s.step == step).map(|s| s.ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_steps_go_on_the_request_axis() {
        let mut timeline = StartTimeline::accepted(0.0);
        let accepted = timeline.accepted_unix_ms;
        timeline.push("vmm_spawned", 5.0);
        timeline.add_vmm(
            accepted + 10.0,
            &[
                Milestone {
                    step: "memory_mapped".into(),
                    ms: 3.0,
                },
                Milestone {
                    step: "agent_answered".into(),
                    ms: 40.0,
                },
            ],
        );
        timeline.push("vmm_spawned", 99.0);
        let steps: Vec<(&str, f64)> = timeline
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.ms))
            .collect();
        assert_eq!(
            steps,
            [
                ("request_accepted", 0.0),
                ("vmm_spawned", 5.0),
                ("vmm_started", 10.0),
                ("memory_mapped", 13.0),
                ("agent_answered", 50.0)
            ]
        );
        assert_eq!(timeline.at("agent_answered"), Some(50.0));
        assert_eq!(timeline.at("first_exec_ended"), None);
    }

    #[test]
    fn a_record_without_a_timeline_gets_no_steps() {
        let mut timeline = StartTimeline::default();
        timeline.mark("first_exec_started");
        timeline.add_vmm(1.0, &[]);
        assert!(timeline.steps.is_empty());
    }
}
