//! Whether a soak's service grew: its first cycles' figures against its last ones', with
//! allowances for noise.

use super::{Metric, SoakSample};

/// File descriptors and threads may differ by this much between the start and the end
/// (a connection in flight, a runtime thread parked).
const FD_NOISE: f64 = 3.0;
const THREAD_NOISE: f64 = 2.0;
/// Resident memory may grow by this fraction plus this much (allocator caches settling).
const RSS_NOISE_FRACTION: f64 = 0.2;
const RSS_NOISE_KIB: f64 = 16.0 * 1024.0;
/// The store holds the snapshots of the cycles in flight; GC runs after each deletion, a
/// moment later, so a sample may still count a deleted snapshot's packs.
const STORE_NOISE_FRACTION: f64 = 0.5;
const STORE_NOISE_KIB: f64 = 64.0 * 1024.0;

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / f64::from(n)
    }
}

/// A resumed soak judges only service runs this long. A tenth of a shorter run is a few
/// samples, and one sample swings more than the allowances (two cycles in flight move the
/// descriptors by up to 11 from one sample to the next; a fresh service's pools fill over its
/// first few cycles), so a short run would flag or clear a leak by chance.
pub const MIN_JUDGED_RUN: usize = 40;

/// The sample ranges of a soak's service runs (`starts`: where each began).
pub fn service_runs(samples: usize, starts: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut bounds: Vec<usize> = starts.iter().copied().filter(|&i| i < samples).collect();
    bounds.push(0);
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(samples);
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

/// Whether [`growth_by_service`] judges a run of `len` cycles out of `runs`: every run of a
/// soak never resumed, runs of at least [`MIN_JUDGED_RUN`] cycles otherwise.
pub fn is_judged(len: usize, runs: usize) -> bool {
    runs == 1 || len >= MIN_JUDGED_RUN
}

/// [`growth`] within each service's run (a resumed soak's new service starts afresh), for the
/// runs long enough to judge ([`is_judged`]).
pub fn growth_by_service(samples: &[SoakSample], starts: &[usize]) -> Vec<String> {
    let runs = service_runs(samples.len(), starts);
    let mut found = Vec::new();
    for (k, range) in runs.iter().enumerate() {
        if !is_judged(range.len(), runs.len()) {
            continue;
        }
        for g in growth(&samples[range.clone()]) {
            found.push(if runs.len() > 1 {
                format!("service run {} of {}: {g}", k + 1, runs.len())
            } else {
                g
            });
        }
    }
    found
}

/// Compares the first and the last tenth of the cycles (at least one cycle each; the very
/// first cycle is left out when there are more: it warms up the service's pools).
pub fn growth(samples: &[SoakSample]) -> Vec<String> {
    let samples = if samples.len() > 3 {
        &samples[1..]
    } else {
        samples
    };
    if samples.len() < 2 {
        return Vec::new();
    }
    let window = (samples.len() / 10).max(1);
    let first = &samples[..window];
    let last = &samples[samples.len() - window..];
    let mut growth = Vec::new();
    let checks: [(&str, Metric, f64, f64); 4] = [
        (
            "open file descriptors",
            |s| s.open_fds as f64,
            0.0,
            FD_NOISE,
        ),
        ("threads", |s| s.threads as f64, 0.0, THREAD_NOISE),
        (
            "resident KiB",
            |s| s.rss_kib as f64,
            RSS_NOISE_FRACTION,
            RSS_NOISE_KIB,
        ),
        (
            "store pack KiB",
            |s| s.store_kib as f64,
            STORE_NOISE_FRACTION,
            STORE_NOISE_KIB,
        ),
    ];
    for (name, pick, fraction, absolute) in checks {
        let (a, b) = (mean(first.iter().map(pick)), mean(last.iter().map(pick)));
        if b > a * (1.0 + fraction) + absolute {
            growth.push(format!("{name} grew from {a:.0} to {b:.0}"));
        }
    }
    growth
}
