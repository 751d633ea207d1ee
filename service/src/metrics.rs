//! `GET /metrics`: Prometheus text exposition of the service's counters.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::sandbox::SandboxState;
use super::AppState;

/// A running sum and count of durations (a Prometheus summary without quantiles).
#[derive(Default)]
pub struct Timing {
    sum_ms: Mutex<f64>,
    count: AtomicU64,
}

impl Timing {
    fn add(&self, ms: f64) {
        *self.sum_ms.lock().unwrap_or_else(|p| p.into_inner()) += ms;
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let sum = *self.sum_ms.lock().unwrap_or_else(|p| p.into_inner()) / 1e3;
        header(out, name, "summary", help);
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

#[derive(Default)]
pub struct Metrics {
    pub boots: AtomicU64,
    pub restores: AtomicU64,
    pub start_failures: AtomicU64,
    pub execs: AtomicU64,
    pub snapshots: AtomicU64,
    pub timeouts: AtomicU64,
    /// Starts whose VMM passed up the connection it found the agent on (adopted by the
    /// service as the sandbox's first agent connection), and starts whose did not.
    pub agent_connections_passed: AtomicU64,
    pub agent_connections_not_passed: AtomicU64,
    /// What the sandboxes' name servers did with their guests' questions.
    pub dns_questions: Arc<crate::network::resolver::QuestionCounters>,
    boot_ready: Timing,
    restore_ready: Timing,
    snapshot_time: Timing,
}

impl Metrics {
    pub fn record_start(&self, restored: bool, ready_ms: f64) {
        if restored {
            self.restores.fetch_add(1, Ordering::Relaxed);
            self.restore_ready.add(ready_ms);
        } else {
            self.boots.fetch_add(1, Ordering::Relaxed);
            self.boot_ready.add(ready_ms);
        }
    }

    pub fn record_agent_connection(&self, passed: bool) {
        match passed {
            true => &self.agent_connections_passed,
            false => &self.agent_connections_not_passed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_start_failure(&self) {
        self.start_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_snapshot(&self, took_ms: Option<f64>) {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        if let Some(ms) = took_ms {
            self.snapshot_time.add(ms);
        }
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// The memory cache's and the warm pool's counters, and the idle pool VMMs' resident memory.
fn mem_cache_and_pool(state: &AppState, out: &mut String) {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let cache = &state.mem_cache;
    counter(
        out,
        "ember_mem_cache_materialised_total",
        "Snapshot memories written into the memory cache.",
        load(&cache.materialised),
    );
    counter(
        out,
        "ember_mem_cache_failures_total",
        "Snapshot memories that could not be materialised (restores read the store).",
        load(&cache.failed),
    );
    counter(
        out,
        "ember_mem_cache_evicted_total",
        "Memory cache entries evicted to stay within --mem-cache-bytes.",
        load(&cache.evicted),
    );
    let Some(pool) = &state.pool else {
        return;
    };
    counter(
        out,
        "ember_warm_pool_hits_total",
        "Sandboxes given a VMM started ahead of time.",
        load(&pool.hits),
    );
    counter(
        out,
        "ember_warm_pool_misses_total",
        "Sandboxes without a network namespace that found the pool empty and started a VMM.",
        load(&pool.misses),
    );
    counter(
        out,
        "ember_warm_pool_died_idle_total",
        "Pooled VMMs found dead while idle (replaced, never assigned).",
        load(&pool.died_idle),
    );
    gauge(
        out,
        "ember_warm_pool_target",
        "Pooled VMMs the service keeps waiting (--warm-pool).",
        pool.target() as u64,
    );
    let pids = pool.idle_pids();
    gauge(
        out,
        "ember_warm_pool_idle",
        "Pooled VMMs waiting for a sandbox.",
        pids.len() as u64,
    );
    let rss: u64 = pids.iter().map(|pid| resident_bytes(*pid)).sum();
    gauge(
        out,
        "ember_warm_pool_idle_rss_bytes",
        "Resident memory of the idle pooled VMMs (each with its jail supervisor).",
        rss,
    );
}

/// The remote tier's traffic since the service started (none without `--remote`).
fn remote_traffic(state: &AppState, out: &mut String) {
    let Some(tier) = &state.remote else {
        return;
    };
    let traffic = tier.remote.traffic();
    counter(
        out,
        "ember_remote_requests_total",
        "Requests made to the remote tier.",
        traffic.requests,
    );
    counter(
        out,
        "ember_remote_downloaded_bytes_total",
        "Object bytes downloaded from the remote tier.",
        traffic.bytes_downloaded,
    );
    counter(
        out,
        "ember_remote_uploaded_bytes_total",
        "Object bytes uploaded to the remote tier.",
        traffic.bytes_uploaded,
    );
}

/// Resident bytes of process `pid` and its children (a jailed VMM runs under a supervisor).
pub(crate) fn resident_bytes(pid: u32) -> u64 {
    let rss = |pid: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096)
    };
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    rss(&pid.to_string()) + children.split_whitespace().map(rss).sum::<u64>()
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let mut out = String::new();
    let states: Vec<SandboxState> = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|s| s.state())
        .collect();
    header(&mut out, "ember_sandboxes", "gauge", "Sandboxes by state.");
    for s in SandboxState::ALL {
        let n = states.iter().filter(|x| **x == s).count();
        let _ = writeln!(out, "ember_sandboxes{{state=\"{}\"}} {n}", s.label());
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    counter(
        &mut out,
        "ember_boots_total",
        "Sandboxes booted.",
        load(&m.boots),
    );
    counter(
        &mut out,
        "ember_restores_total",
        "Sandboxes restored from a snapshot.",
        load(&m.restores),
    );
    counter(
        &mut out,
        "ember_start_failures_total",
        "Sandboxes that failed to start.",
        load(&m.start_failures),
    );
    counter(
        &mut out,
        "ember_execs_total",
        "Commands started.",
        load(&m.execs),
    );
    counter(
        &mut out,
        "ember_snapshots_total",
        "Snapshots saved.",
        load(&m.snapshots),
    );
    counter(
        &mut out,
        "ember_timeouts_total",
        "Sandboxes stopped at their timeout.",
        load(&m.timeouts),
    );
    counter(
        &mut out,
        "ember_agent_connections_passed_total",
        "Starts whose VMM passed up the connection its agent answered on (the first request needs none of its own).",
        load(&m.agent_connections_passed),
    );
    counter(
        &mut out,
        "ember_agent_connections_not_passed_total",
        "Starts whose VMM passed no agent connection up (their first request connects).",
        load(&m.agent_connections_not_passed),
    );
    let gc = &state.gc;
    counter(
        &mut out,
        "ember_store_gc_runs_total",
        "Store garbage collections run (one follows each snapshot deletion).",
        load(&gc.runs),
    );
    counter(
        &mut out,
        "ember_store_gc_failures_total",
        "Store garbage collections that failed.",
        load(&gc.failures),
    );
    counter(
        &mut out,
        "ember_store_gc_reclaimed_bytes_total",
        "Pack bytes the store's garbage collections freed.",
        load(&gc.bytes_reclaimed),
    );
    header(
        &mut out,
        "ember_dns_questions_total",
        "counter",
        "Questions guests asked their sandbox's name server, by what became of them.",
    );
    for (outcome, n) in m.dns_questions.outcomes() {
        let _ = writeln!(
            out,
            "ember_dns_questions_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    mem_cache_and_pool(&state, &mut out);
    crate::sandbox_metrics::write_labelled(&state, &mut out).await;
    remote_traffic(&state, &mut out);
    m.boot_ready.write(
        &mut out,
        "ember_boot_ready_seconds",
        "VMM start to agent ready, booted sandboxes.",
    );
    m.restore_ready.write(
        &mut out,
        "ember_restore_ready_seconds",
        "VMM start to agent ready, restored sandboxes.",
    );
    m.snapshot_time.write(
        &mut out,
        "ember_snapshot_seconds",
        "Time to save a snapshot.",
    );
    let store = state.store.clone();
    // VMM processes write snapshots: read what they added before counting.
    let stats = tokio::task::spawn_blocking(move || {
        store.refresh()?;
        store.stats()
    });
    if let Ok(Ok(stats)) = stats.await {
        gauge(
            &mut out,
            "ember_store_snapshots",
            "Snapshots in the store.",
            stats.manifests as u64,
        );
        gauge(
            &mut out,
            "ember_store_logical_bytes",
            "Memory and disk bytes the snapshots describe.",
            stats.logical_bytes,
        );
        gauge(
            &mut out,
            "ember_store_stored_bytes",
            "Bytes of pack files (after dedup).",
            stats.stored_bytes,
        );
        gauge(
            &mut out,
            "ember_store_objects",
            "Distinct objects stored.",
            stats.unique_objects as u64,
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}
