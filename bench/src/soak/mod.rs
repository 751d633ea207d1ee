//! `ember-bench --soak N`: N cycles of create → exec → snapshot → restore → exec → delete
//! through the API of a service this run starts, sampling the service's open file
//! descriptors, threads and resident memory after each cycle, then looking for anything left
//! behind (VMM processes, cgroups, sockets, overlays, records, mounts, the store's temporary
//! files and, when run as root, where every sandbox has an egress network: namespaces, veths,
//! the NAT table). A leak shows as a curve that climbs: the report compares the first cycles'
//! figures with the last ones'. With `--soak-streams K` K cycles run at once (a service under
//! concurrent load; also K times fewer hours for the same number of cycles in the lab).

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{id_of, step, Api, BenchError, CallError};
use hyper::Method;

mod judge;
mod leftovers;
mod report;

pub use judge::{growth, growth_by_service, is_judged, service_runs, MIN_JUDGED_RUN};
#[cfg(test)]
use leftovers::{counted_mounts, temporary_files};
use leftovers::{leftovers, mount_count};

/// One sample of the service process, after a cycle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakSample {
    pub cycle: u32,
    pub open_fds: u64,
    pub threads: u64,
    pub rss_kib: u64,
    /// Bytes of the store's pack files (deleted snapshots are reclaimed by the service's GC).
    #[serde(default)]
    pub store_kib: u64,
    /// How long the cycle took.
    pub seconds: f64,
}

/// The soak's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakReport {
    pub environment: String,
    pub cycles: u32,
    pub samples: Vec<SoakSample>,
    /// What the cycles left behind (empty when clean).
    pub leftovers: Vec<String>,
    /// Growth beyond noise between the first and the last cycles (empty when flat).
    pub growth: Vec<String>,
    /// Whether every sandbox had an egress network (namespace, TAP, veth, nftables).
    #[serde(default)]
    pub networked: bool,
    /// Cycles run at once.
    #[serde(default = "one")]
    pub streams: u32,
    /// The error that stopped the soak early (none: every cycle ran).
    #[serde(default)]
    pub failure: Option<String>,
    /// Cycles that failed; the soak cleans up after each and goes on (up to
    /// [`MAX_FAILED_CYCLES`]), so a rare failure is counted, not the end of the run.
    #[serde(default)]
    pub failed_cycles: Vec<FailedCycle>,
    /// Indices into `samples` where a new service began: `[0]` for one run; more when the soak
    /// was continued (`--soak-resume`) after the machine running it died. Growth is judged
    /// within each service's run.
    #[serde(default = "first_service")]
    pub service_starts: Vec<usize>,
}

/// A cycle that failed, and where what was found about it went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedCycle {
    pub cycle: u32,
    pub error: String,
    /// The file (in the report's folder) with the sandboxes' records, their VMM logs and the
    /// guest's kernel log, gathered right after the failure.
    pub evidence: String,
    /// The lab's fault, not ember's: in the lab a guest triple fault is how the emulated SVM's
    /// lost guest states end (the VM tests retry those too). The service must still report
    /// the sandbox failed and leave nothing behind, which the soak checks.
    #[serde(default)]
    pub lab_fault: bool,
}

/// A soak with this many failed cycles stops: something is broken, not rare.
pub const MAX_FAILED_CYCLES: usize = 5;
/// Lab faults are counted apart; this many means the lab itself is unusable.
pub const MAX_LAB_FAULTS: usize = 50;

/// Whether a failed cycle was the lab's guest triple fault (only in the lab).
fn is_lab_fault(in_lab: bool, error: &str, evidence: &str) -> bool {
    const SIGN: &str = "triple fault (shutdown)";
    in_lab && (error.contains(SIGN) || evidence.contains(SIGN))
}

/// The id in a failed create's error ("sandbox sb-… did not start"): the service keeps a
/// sandbox that failed to start, to say why, until it is deleted.
fn sandbox_named_in(error: &str) -> Option<String> {
    let at = error.find("sandbox sb-")? + "sandbox ".len();
    let id: String = error[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    ember_service::sandbox::valid_id(&id).then_some(id)
}

fn first_service() -> Vec<usize> {
    vec![0]
}

fn one() -> u32 {
    1
}

/// Reads one figure of a sample.
type Metric = fn(&SoakSample) -> f64;

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn sample(pid: u32, state_dir: &Path, cycle: u32, seconds: f64) -> SoakSample {
    SoakSample {
        cycle,
        open_fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        threads: status_field(pid, "Threads:"),
        // Anonymous memory only: what a leak grows. The service maps the store's packs to
        // materialise snapshot memory, and those file pages (the kernel's to reclaim) would
        // count in VmRSS as if they were held.
        rss_kib: status_field(pid, "RssAnon:"),
        store_kib: file_bytes(&state_dir.join("store/packs")) / 1024,
        seconds,
    }
}

/// Bytes of the files directly in `dir`.
fn file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

/// What the soak is told to do.
pub(super) struct SoakPlan<'a> {
    pub cycles: u32,
    pub streams: u32,
    pub environment: String,
    /// Where the (partial, then final) report goes.
    pub out: &'a Path,
    /// An earlier, unfinished run of this soak to continue (its samples are kept).
    pub resume: Option<SoakReport>,
}

/// Runs the cycles against the service at `api` (process `pid`, state in `state_dir`),
/// `plan.streams` at a time. A failed cycle is recorded with its evidence and cleaned up;
/// [`MAX_FAILED_CYCLES`] failures (or [`MAX_LAB_FAULTS`] of the lab's) stop the soak, and
/// the report then names the last error.
pub(super) async fn soak(
    api: &Api,
    pid: u32,
    state_dir: &Path,
    plan: SoakPlan<'_>,
) -> Result<SoakReport, BenchError> {
    let SoakPlan {
        cycles,
        streams,
        environment,
        out,
        resume,
    } = plan;
    let (earlier, service_starts, earlier_failed) = match resume {
        Some(r) => {
            let mut starts = r.service_starts;
            starts.push(r.samples.len());
            (r.samples, starts, r.failed_cycles)
        }
        None => (Vec::new(), first_service(), Vec::new()),
    };
    // Cycles keep counting where the earlier run stopped.
    let first_cycle = earlier
        .iter()
        .map(|s| s.cycle + 1)
        .chain(earlier_failed.iter().map(|f| f.cycle + 1))
        .max()
        .unwrap_or(0);
    let attempted = (earlier.len() + earlier_failed.len()) as u32;
    let last_cycle = first_cycle + cycles.saturating_sub(attempted);
    let streams = streams.clamp(1, cycles.max(1));
    let mounts_before = mount_count();
    // Sandbox networks need a service run as root (as the one this run starts is then).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let networked = unsafe { libc::geteuid() } == 0;
    let in_lab = super::in_lab();
    let failed_cycles: RefCell<Vec<FailedCycle>> = RefCell::new(earlier_failed);
    let partial = |samples: Vec<SoakSample>, failure: Option<String>| SoakReport {
        environment: environment.clone(),
        cycles,
        samples,
        leftovers: Vec::new(),
        growth: Vec::new(),
        networked,
        streams,
        failure,
        service_starts: service_starts.clone(),
        failed_cycles: failed_cycles.borrow().clone(),
    };
    let next = Cell::new(first_cycle);
    let failure: RefCell<Option<String>> = RefCell::new(None);
    let samples: RefCell<Vec<SoakSample>> = RefCell::new(earlier);
    let stream = || async {
        loop {
            let cycle = next.get();
            if cycle >= last_cycle || failure.borrow().is_some() {
                return;
            }
            next.set(cycle + 1);
            let start = Instant::now();
            let made = RefCell::new(Made::default());
            if let Err(e) = one_cycle(api, cycle, networked, &made).await {
                let error = e.to_string();
                eprintln!("ember-bench: soak cycle {} failed: {error}", cycle + 1);
                let mut made = made.into_inner();
                if let Some(id) = sandbox_named_in(&error) {
                    if !made.sandboxes.contains(&id) {
                        made.sandboxes.push(id);
                    }
                }
                let (evidence, text) =
                    gather_evidence(api, state_dir, out, cycle, &error, &made).await;
                clean_up(api, &made).await;
                let lab_fault = is_lab_fault(in_lab, &error, &text);
                let (failed, lab_faults) = {
                    let mut failed = failed_cycles.borrow_mut();
                    failed.push(FailedCycle {
                        cycle,
                        error: error.clone(),
                        evidence,
                        lab_fault,
                    });
                    let lab = failed.iter().filter(|f| f.lab_fault).count();
                    (failed.len() - lab, lab)
                };
                if failed >= MAX_FAILED_CYCLES || lab_faults >= MAX_LAB_FAULTS {
                    failure.borrow_mut().get_or_insert(format!(
                        "{failed} cycles failed and {lab_faults} met the lab's fault; the \
                         last one: {error}"
                    ));
                    return;
                }
                continue;
            }
            let s = sample(pid, state_dir, cycle, start.elapsed().as_secs_f64());
            let done = {
                let mut all = samples.borrow_mut();
                all.push(s.clone());
                all.len()
            };
            eprintln!(
                "ember-bench: soak cycle {} ({done}/{cycles} done): {} fds, {} threads, \
                 {} KiB resident, store {} KiB, {:.1} s",
                cycle + 1,
                s.open_fds,
                s.threads,
                s.rss_kib,
                s.store_kib,
                s.seconds
            );
            // The partial report after every cycle: a soak that dies (in the lab, with the
            // machine under it) loses only the cycles in flight.
            if let Err(e) = partial(samples.borrow().clone(), None).write(out) {
                eprintln!("ember-bench: writing the partial soak report: {e}");
            }
        }
    };
    futures_util::future::join_all((0..streams).map(|_| stream())).await;
    let samples = samples.into_inner();
    let failure = failure.into_inner();
    // A VMM's cgroup goes a moment after the VMM: give the last cycle's a few seconds.
    let mut leftovers = leftovers(state_dir);
    for _ in 0..10 {
        if leftovers.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        leftovers = self::leftovers(state_dir);
    }
    let mounts_after = mount_count();
    if mounts_after > mounts_before {
        leftovers.push(format!(
            "{} mounts more than before the cycles",
            mounts_after - mounts_before
        ));
    }
    if networked {
        leftovers.extend(ember_service::network::leftovers());
    }
    let growth = growth_by_service(&samples, &service_starts);
    Ok(SoakReport {
        leftovers,
        growth,
        ..partial(samples, failure)
    })
}

/// What a cycle has made so far (what to look at, and clean up, when it fails).
#[derive(Default)]
struct Made {
    sandboxes: Vec<String>,
    snapshot: Option<String>,
}

/// Writes `failed-cycle-N.txt` into `out`: the error, then for each sandbox of the cycle its
/// record as the service shows it, the tail of its VMM's log and, if its agent still answers,
/// the guest kernel's log. Returns the file's name and what it holds.
async fn gather_evidence(
    api: &Api,
    state_dir: &Path,
    out: &Path,
    cycle: u32,
    error: &str,
    made: &Made,
) -> (String, String) {
    let mut text = format!("soak cycle {} failed: {error}\n", cycle + 1);
    for id in &made.sandboxes {
        let record = api
            .0
            .json(
                Method::GET,
                &format!("/sandboxes/{id}"),
                ember_client::empty_body(),
            )
            .await
            .map_or_else(|e| format!("(no record: {e})"), |v| v.to_string());
        text.push_str(&format!("\n=== sandbox {id}\n{record}\n"));
        let log =
            std::fs::read(state_dir.join("sandboxes").join(id).join("vmm.log")).unwrap_or_default();
        let tail = &log[log.len().saturating_sub(EVIDENCE_LOG_BYTES)..];
        text.push_str(&format!(
            "--- its VMM's log (last {} bytes)\n{}\n",
            tail.len(),
            String::from_utf8_lossy(tail)
        ));
        let kernel_log = api
            .exec(id, "sh", &["-c", "dmesg | tail -n 80"])
            .await
            .map_or_else(
                |e| format!("(no answer: {e})"),
                |v| v["stdout"].as_str().unwrap_or_default().to_string(),
            );
        text.push_str(&format!("--- the guest kernel's log\n{kernel_log}\n"));
    }
    let name = format!("failed-cycle-{}.txt", cycle + 1);
    if let Err(e) =
        std::fs::create_dir_all(out).and_then(|()| std::fs::write(out.join(&name), &text))
    {
        eprintln!("ember-bench: writing {name}: {e}");
    }
    (name, text)
}

/// How much of a failed sandbox's VMM log the evidence keeps.
const EVIDENCE_LOG_BYTES: usize = 64 * 1024;

/// Deletes what a failed cycle made, so the next cycles (and the leftover check) start clean.
async fn clean_up(api: &Api, made: &Made) {
    for id in &made.sandboxes {
        if let Err(e) = api.delete(id).await {
            eprintln!("ember-bench: deleting sandbox {id} after a failed cycle: {e}");
        }
    }
    if let Some(name) = &made.snapshot {
        let deleted = api
            .0
            .json(
                Method::DELETE,
                &format!("/snapshots/{name}"),
                ember_client::empty_body(),
            )
            .await;
        if let Err(e) = deleted {
            eprintln!("ember-bench: deleting snapshot {name} after a failed cycle: {e}");
        }
    }
}

async fn one_cycle(
    api: &Api,
    cycle: u32,
    networked: bool,
    made: &RefCell<Made>,
) -> Result<(), BenchError> {
    let what = |s: &str| format!("soak cycle {cycle}: {s}");
    let network = if networked {
        json!({"mode": "egress"})
    } else {
        json!({"mode": "none"})
    };
    let sandbox = api
        .create(json!({ "network": network }))
        .await
        .map_err(step(what("create")))?;
    let id = id_of(&sandbox).map_err(step(what("create")))?;
    made.borrow_mut().sandboxes.push(id.clone());
    api.exec(&id, "sh", &["-c", &format!("echo {cycle} > /root/cycle")])
        .await
        .map_err(step(what("exec")))?;
    let name = format!("soak-{cycle}");
    made.borrow_mut().snapshot = Some(name.clone());
    api.snapshot(&id, json!({"name": name, "stop": true}))
        .await
        .map_err(step(what("snapshot")))?;
    api.delete(&id).await.map_err(step(what("delete")))?;
    made.borrow_mut().sandboxes.retain(|s| s != &id);
    let restored = api
        .create(json!({ "snapshot": name, "network": network }))
        .await
        .map_err(step(what("restore")))?;
    let restored_id = id_of(&restored).map_err(step(what("restore")))?;
    made.borrow_mut().sandboxes.push(restored_id.clone());
    let out = api
        .exec(&restored_id, "cat", &["/root/cycle"])
        .await
        .map_err(step(what("exec after restore")))?;
    if out["stdout"] != json!(format!("{cycle}\n")) {
        return Err(step(what("exec after restore"))(CallError::Implausible(
            format!("the restored sandbox read {}", out["stdout"]),
        )));
    }
    api.delete(&restored_id)
        .await
        .map_err(step(what("delete the restored sandbox")))?;
    made.borrow_mut().sandboxes.clear();
    api.0
        .json(
            Method::DELETE,
            &format!("/snapshots/{name}"),
            ember_client::empty_body(),
        )
        .await
        .map_err(crate::service::call(format!("DELETE /snapshots/{name}")))
        .map_err(step(what("delete the snapshot")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10-cycle soak in the lab, two at a time, networked, flat, with `done` cycles done.
    fn lab_report(done: usize, failed_cycles: Vec<FailedCycle>) -> SoakReport {
        SoakReport {
            environment: "the lab".into(),
            cycles: 10,
            samples: samples(&vec![20; done], &vec![30000; done]),
            leftovers: Vec::new(),
            growth: Vec::new(),
            networked: true,
            streams: 2,
            failure: None,
            service_starts: vec![0],
            failed_cycles,
        }
    }

    fn samples(fds: &[u64], rss: &[u64]) -> Vec<SoakSample> {
        fds.iter()
            .zip(rss)
            .enumerate()
            .map(|(i, (&f, &r))| SoakSample {
                cycle: i as u32,
                open_fds: f,
                threads: 8,
                rss_kib: r,
                store_kib: 1000,
                seconds: 1.0,
            })
            .collect()
    }

    #[test]
    fn a_flat_curve_passes_and_a_leak_is_named() {
        let flat = samples(
            &[40, 20, 21, 20, 22, 20],
            &[9000, 30000, 30500, 31000, 30800, 31200],
        );
        assert!(growth(&flat).is_empty(), "{:?}", growth(&flat));
        let leaking: Vec<u64> = (0..30).map(|i| 20 + i).collect();
        let rss = vec![30000; 30];
        let found = growth(&samples(&leaking, &rss));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("open file descriptors grew"),
            "{found:?}"
        );
        let bloating: Vec<u64> = (0..30).map(|i| 30000 + i * 4000).collect();
        let found = growth(&samples(&[20; 30], &bloating));
        assert!(found[0].starts_with("resident KiB grew"), "{found:?}");
        // A store that keeps every deleted snapshot's pages.
        let mut hoarding = samples(&[20; 30], &[30000; 30]);
        for (i, s) in hoarding.iter_mut().enumerate() {
            s.store_kib = 40_000 * (i as u64 + 1);
        }
        let found = growth(&hoarding);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("store pack KiB grew"), "{found:?}");
    }

    #[test]
    fn a_resumed_soak_is_judged_within_each_services_run() {
        // A second service that starts with fewer descriptors and stays flat: no growth,
        // though its figures differ from the first service's.
        let mut fds: Vec<u64> = vec![30; 40];
        fds.extend([20; 40]);
        let flat = samples(&fds, &[30000; 80]);
        assert!(growth_by_service(&flat, &[0, 40]).is_empty());
        // The same figures read as one run would look like a shrink, never a leak; a leak in
        // the second run is named with its run.
        let mut leaking: Vec<u64> = vec![20; 40];
        leaking.extend((0..40).map(|i| 20 + i));
        let found = growth_by_service(&samples(&leaking, &[30000; 80]), &[0, 40]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("service run 2 of 2: open file descriptors grew"),
            "{found:?}"
        );
        // A run too short to judge is skipped; one run is judged as a whole.
        let mut short_tail: Vec<u64> = vec![20; 78];
        short_tail.extend([90, 90]);
        let short = samples(&short_tail, &[30000; 80]);
        assert!(growth_by_service(&short, &[0, 78]).is_empty());
        assert_eq!(growth_by_service(&short, &[0]).len(), 1);
        assert_eq!(
            growth_by_service(&samples(&leaking, &[30000; 80]), &[0]).len(),
            1
        );
        // A fresh service's thread pool fills over its first cycles (a 23-cycle run of the
        // 1,000-cycle lab soak: 5 threads for three cycles, then 7-8 like every other run's):
        // too short a run to tell that from a leak, so it is not judged.
        let threads = [
            5, 5, 5, 7, 7, 7, 7, 7, 8, 7, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8,
        ];
        let mut warming = samples(&[18; 63], &[30000; 63]);
        for (s, t) in warming[40..].iter_mut().zip(threads) {
            s.threads = t;
        }
        assert_eq!(
            growth(&warming[40..]).len(),
            1,
            "judged alone, it looks like growth"
        );
        assert!(growth_by_service(&warming, &[0, 40]).is_empty());
        assert_eq!(service_runs(63, &[0, 40]), [0..40, 40..63]);
        assert_eq!(service_runs(63, &[40, 0, 63]), [0..40, 40..63]);
    }

    #[test]
    fn the_report_renders_with_its_curve() {
        let report = SoakReport {
            environment: "test".into(),
            cycles: 3,
            samples: samples(&[20, 21, 20], &[30000, 30100, 30050]),
            leftovers: Vec::new(),
            growth: Vec::new(),
            networked: false,
            streams: 1,
            failure: None,
            service_starts: vec![0],
            failed_cycles: Vec::new(),
        };
        assert!(report.passed());
        // A failed cycle, cleaned up and passed over, still fails the soak, and is listed.
        let with_failed = SoakReport {
            failed_cycles: vec![FailedCycle {
                cycle: 1,
                error: "soak cycle 1: exec: the agent closed the connection".into(),
                evidence: "failed-cycle-2.txt".into(),
                lab_fault: false,
            }],
            ..report.clone()
        };
        assert!(!with_failed.passed());
        let md = with_failed.markdown();
        assert!(md.contains("**1 of 4 cycles failed**"), "{md}");
        assert!(md.contains("- cycle 2: soak cycle 1: exec: the agent closed the connection (evidence: `failed-cycle-2.txt`)"), "{md}");
        let dir = std::env::temp_dir().join(format!("ember-soak-test-{}", std::process::id()));
        report.write(&dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("soak.svg")).unwrap();
        assert!(
            svg.len() > 2000 && svg.contains("<polyline"),
            "{}",
            svg.len()
        );
        let md = std::fs::read_to_string(dir.join("soak.md")).unwrap();
        assert!(md.contains("| cycle 3 | 20 | 8 | 29 | 0 | 1.0 |"), "{md}");
        let back: SoakReport =
            serde_json::from_slice(&std::fs::read(dir.join("soak.json")).unwrap()).unwrap();
        assert_eq!(back.samples.len(), 3);
        // A soak a failed cycle stopped fails, and says where and why.
        let stopped = SoakReport {
            failure: Some("soak cycle 2: restore: the VMM ended".into()),
            streams: 2,
            ..report
        };
        assert!(!stopped.passed());
        let md = stopped.markdown();
        assert!(md.contains("2 at a time"), "{md}");
        assert!(
            md.contains("**Stopped after 3 cycles**: soak cycle 2: restore"),
            "{md}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_resumed_report_brings_its_evidence_and_judges_old_failures_again() {
        let base = std::env::temp_dir().join(format!("ember-soak-resume-{}", std::process::id()));
        let (earlier, out) = (base.join("earlier"), base.join("out"));
        std::fs::create_dir_all(&earlier).unwrap();
        // Recorded before lab faults were told apart: the triple fault is in the evidence
        // (cycle 4) or in neither (cycle 6, ember's failure as far as anyone can tell).
        let failed = |cycle: u32| FailedCycle {
            cycle,
            error: "exec: the agent closed the connection".into(),
            evidence: format!("failed-cycle-{}.txt", cycle + 1),
            lab_fault: false,
        };
        let report = lab_report(6, vec![failed(3), failed(5)]);
        report.write(&earlier).unwrap();
        std::fs::write(
            earlier.join("failed-cycle-4.txt"),
            "vCPU 0 triple fault (shutdown) at rip 0xfff0",
        )
        .unwrap();
        std::fs::write(earlier.join("failed-cycle-6.txt"), "vmm.log: all well").unwrap();
        let back = SoakReport::load_into(&earlier.join("soak.json"), &out, true).unwrap();
        let judged: Vec<bool> = back.failed_cycles.iter().map(|f| f.lab_fault).collect();
        assert_eq!(judged, [true, false]);
        for name in ["failed-cycle-4.txt", "failed-cycle-6.txt"] {
            assert_eq!(
                std::fs::read(out.join(name)).unwrap(),
                std::fs::read(earlier.join(name)).unwrap()
            );
        }
        // Outside the lab nothing is the lab's fault.
        let outside = SoakReport::load_into(&earlier.join("soak.json"), &out, false).unwrap();
        assert!(outside.failed_cycles.iter().all(|f| !f.lab_fault));
        // A report that names a file elsewhere gets no evidence read for it.
        let mut hostile = report.clone();
        hostile.failed_cycles[0].evidence = "../earlier/failed-cycle-4.txt".into();
        hostile.write(&base.join("hostile")).unwrap();
        let back = SoakReport::load_into(&base.join("hostile/soak.json"), &out, true).unwrap();
        assert!(!back.failed_cycles[0].lab_fault);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn failed_cycles_name_their_sandbox_and_lab_faults_are_told_apart() {
        let error = "soak cycle 230: create: sandbox sb-a8d0d1014ce8 did not start: the VMM \
                     process (pid 17115) ended (exit status: 1): vCPU 0 triple fault (shutdown) \
                     at rip 0xfff0";
        assert_eq!(sandbox_named_in(error).as_deref(), Some("sb-a8d0d1014ce8"));
        assert_eq!(
            sandbox_named_in("exec: the agent closed the connection"),
            None
        );
        assert!(is_lab_fault(true, error, ""));
        assert!(!is_lab_fault(false, error, ""), "only in the lab");
        let closed = "exec after restore: the agent closed the connection";
        assert!(!is_lab_fault(true, closed, "vmm.log: all well"));
        assert!(is_lab_fault(
            true,
            closed,
            "[INFO ember_vmm::vcpu] vCPU 0 triple fault (shutdown) at rip 0xfff0"
        ));
        // Lab faults alone do not fail a soak; one failure of ember's does.
        let failed = |lab_fault| FailedCycle {
            cycle: 3,
            error: error.into(),
            evidence: "failed-cycle-4.txt".into(),
            lab_fault,
        };
        let report = |failed_cycles| lab_report(9, failed_cycles);
        let lab = report(vec![failed(true)]);
        assert!(lab.passed());
        assert!(lab
            .markdown()
            .contains("cycle 4 (the lab's fault: a guest triple fault)"));
        assert!(!report(vec![failed(true), failed(false)]).passed());
    }

    #[test]
    fn the_stores_temporary_files_are_found_at_any_depth_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("ember-soak-tmp-{}", std::process::id()));
        let packs = dir.join("packs");
        std::fs::create_dir_all(&packs).unwrap();
        std::fs::write(packs.join("0001.pack"), b"x").unwrap();
        std::fs::write(packs.join(".0002.pack.77.1.tmp"), b"x").unwrap();
        std::fs::write(dir.join(".base.tmp-4242"), b"x").unwrap();
        std::fs::write(dir.join("notes.tmp"), b"x").unwrap();
        let found = temporary_files(&dir);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().any(|f| f.contains(".0002.pack.77.1.tmp")));
        assert!(found.iter().any(|f| f.contains(".base.tmp-4242")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_netns_folder_is_not_counted_but_a_namespace_below_it_is() {
        let mountinfo = "22 1 0:21 / / rw - ext4 /dev/vda rw\n\
            40 22 0:30 /netns /run/netns rw shared:5 - tmpfs tmpfs rw\n\
            41 40 0:4 net:[4026532] /run/netns/ember-sb-1 rw shared:6 - nsfs nsfs rw\n";
        assert_eq!(counted_mounts(mountinfo), 2);
    }
}
