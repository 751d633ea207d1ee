//! `GET /sandboxes/{id}/metrics`: a sandbox's CPU, memory, disk and network, from the guest's
//! `/proc` (read through its agent) and from the host (its VMM process, cgroup and devices).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use ember_client::responses::{GuestMetrics, HostMetrics, SandboxMetrics, SandboxState};
use ember_client::types::ErrorDocument;
use ember_sandbox::control::ControlRequest;

use crate::error::ApiError;
use crate::sandbox::Sandbox;
use crate::AppState;

/// The guest kernel's clock ticks per second in `/proc/stat` (`USER_HZ`, 100 on x86).
const USER_HZ: u64 = 100;
/// Bound on one `/proc` file read from the guest.
const MAX_PROC_FILE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum GuestMetricsError {
    #[error("the guest's {file} has no {field}")]
    Missing {
        file: &'static str,
        field: &'static str,
    },
    #[error("the guest's {file} is larger than {MAX_PROC_FILE} bytes")]
    TooLarge { file: &'static str },
    #[error("cannot reach the guest's agent: {0}")]
    Agent(#[source] ApiError),
    #[error("reading the guest's {file}: {source}")]
    Read {
        file: &'static str,
        #[source]
        source: ember_agent::client::ClientError,
    },
    #[error("the thread reading the guest's /proc ended: {0}")]
    Thread(#[source] tokio::task::JoinError),
}

/// A field of `/proc/meminfo` in bytes.
fn meminfo_bytes(meminfo: &str, field: &'static str) -> Result<u64, GuestMetricsError> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or(GuestMetricsError::Missing {
            file: "/proc/meminfo",
            field,
        })
}

/// Parses the guest's `/proc/stat`, `/proc/meminfo`, `/proc/loadavg` and `/proc/uptime`.
pub fn parse_guest(
    stat: &str,
    meminfo: &str,
    loadavg: &str,
    uptime: &str,
) -> Result<GuestMetrics, GuestMetricsError> {
    let missing = |file, field| GuestMetricsError::Missing { file, field };
    let cpu: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .ok_or(missing("/proc/stat", "cpu line"))?
        .split_whitespace()
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    let ticks = |i: usize| cpu.get(i).copied().unwrap_or(0) * 1000 / USER_HZ;
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    let total = meminfo_bytes(meminfo, "MemTotal")?;
    let available = meminfo_bytes(meminfo, "MemAvailable")?;
    let mut load = loadavg.split_whitespace();
    let mut next_load = |field| {
        load.next()
            .and_then(|n| n.parse::<f64>().ok())
            .ok_or(missing("/proc/loadavg", field))
    };
    let (load_1m, load_5m, load_15m) = (next_load("1m")?, next_load("5m")?, next_load("15m")?);
    let processes = loadavg
        .split_whitespace()
        .nth(3)
        .and_then(|runnable_total| runnable_total.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .ok_or(missing("/proc/loadavg", "process count"))?;
    let uptime_s = uptime
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(missing("/proc/uptime", "uptime"))?;
    Ok(GuestMetrics {
        cpus,
        cpu_user_ms: ticks(0) + ticks(1),
        cpu_system_ms: ticks(2) + ticks(5) + ticks(6),
        cpu_idle_ms: ticks(3),
        cpu_iowait_ms: ticks(4),
        memory_total_bytes: total,
        memory_available_bytes: available,
        memory_used_bytes: total.saturating_sub(available),
        load_1m,
        load_5m,
        load_15m,
        processes,
        uptime_s,
    })
}

/// Reads the guest's `/proc` files through its agent.
async fn guest_metrics(sandbox: &Arc<Sandbox>) -> Result<GuestMetrics, GuestMetricsError> {
    let agent = sandbox.agent().await.map_err(GuestMetricsError::Agent)?;
    let turn = sandbox
        .agent_turn()
        .await
        .map_err(GuestMetricsError::Agent)?;
    let texts = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut texts = Vec::new();
        for file in [
            "/proc/stat",
            "/proc/meminfo",
            "/proc/loadavg",
            "/proc/uptime",
        ] {
            let mut bytes = Vec::new();
            let mut bounded = BoundedWriter(&mut bytes);
            agent
                .read_file(file, &mut bounded)
                .map_err(|source| GuestMetricsError::Read { file, source })?;
            if bytes.len() > MAX_PROC_FILE {
                return Err(GuestMetricsError::TooLarge { file });
            }
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        Ok(texts)
    })
    .await
    .map_err(GuestMetricsError::Thread)??;
    parse_guest(&texts[0], &texts[1], &texts[2], &texts[3])
}

/// Keeps at most [`MAX_PROC_FILE`] + 1 bytes (so an oversize file is noticed, not kept).
struct BoundedWriter<'a>(&'a mut Vec<u8>);

impl std::io::Write for BoundedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = (MAX_PROC_FILE + 1).saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The CPU time of process `pid` (user + system), in microseconds.
fn proc_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()?
        .max(1);
    Some((utime + stime) * 1_000_000 / hz)
}

async fn host_metrics(state: &AppState, sandbox: &Arc<Sandbox>) -> HostMetrics {
    let pid = sandbox.record().pid;
    let cgroup = state.cgroups.as_ref().map(|c| c.root().join(&sandbox.id));
    let read_cgroup = |file: &str| -> Option<String> {
        std::fs::read_to_string(cgroup.as_ref()?.join(file)).ok()
    };
    let cgroup_cpu = read_cgroup("cpu.stat").and_then(|stat| {
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|n| n.trim().parse().ok())
    });
    let io = if sandbox.state().is_live() {
        sandbox
            .control(ControlRequest::IoStats, Duration::from_secs(2))
            .await
            .ok()
            .and_then(|reply| reply.io)
    } else {
        None
    };
    HostMetrics {
        vmm_pid: pid,
        cpu_usage_us: cgroup_cpu.or_else(|| pid.and_then(proc_cpu_us)),
        rss_bytes: pid.map(crate::metrics::resident_bytes),
        cgroup_memory_bytes: read_cgroup("memory.current").and_then(|m| m.trim().parse().ok()),
        io,
    }
}

#[utoipa::path(get, path = "/sandboxes/{id}/metrics", tag = "sandboxes",
    params(crate::api::SandboxId),
    responses(
        (status = 200, description = "One sample: the guest's CPU, memory and load (from its /proc, through the agent; none while paused) and the host's view of its VMM (CPU, RSS, cgroup memory, disk and network traffic)", body = SandboxMetrics),
        (status = 404, description = "No such sandbox", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/metrics`
pub async fn sandbox_metrics(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let sandbox_state = sandbox.state();
    let (guest, guest_error) = match sandbox_state {
        SandboxState::Running => match guest_metrics(&sandbox).await {
            Ok(guest) => (Some(guest), None),
            Err(e) => (None, Some(e.to_string())),
        },
        other => (None, Some(format!("the sandbox is {}", other.label()))),
    };
    let host = host_metrics(&state, &sandbox).await;
    Ok(axum::Json(SandboxMetrics {
        id,
        state: sandbox_state,
        sampled_unix_ms: crate::sandbox::unix_ms(),
        guest,
        guest_error,
        host,
    })
    .into_response())
}

/// Sandboxes `/metrics` labels one by one (the newest live ones); the rest are counted in
/// `ember_sandbox_series_dropped`, so a busy host cannot blow up a scraper's series.
pub const MAX_LABELLED_SANDBOXES: usize = 64;

/// Per-sandbox series for `/metrics`: host-side only (no guest is asked during a scrape).
pub async fn write_labelled(state: &AppState, out: &mut String) {
    use std::fmt::Write;
    let mut live: Vec<Arc<Sandbox>> = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|s| s.state().is_live())
        .cloned()
        .collect();
    live.sort_by_key(|s| std::cmp::Reverse(s.record().created_unix_ms));
    let dropped = live.len().saturating_sub(MAX_LABELLED_SANDBOXES);
    live.truncate(MAX_LABELLED_SANDBOXES);
    let samples = futures_util::future::join_all(live.iter().map(|s| host_metrics(state, s))).await;
    type Pick = fn(&HostMetrics) -> Option<f64>;
    let series: [(&str, &str, &str, Pick); 7] = [
        (
            "ember_sandbox_cpu_seconds_total",
            "counter",
            "CPU time of the sandbox's VMM (its cgroup when it has one).",
            |h| h.cpu_usage_us.map(|us| us as f64 / 1e6),
        ),
        (
            "ember_sandbox_rss_bytes",
            "gauge",
            "Resident memory of the sandbox's VMM process.",
            |h| h.rss_bytes.map(|b| b as f64),
        ),
        (
            "ember_sandbox_disk_read_bytes_total",
            "counter",
            "Bytes the guest read from its root disk (since its VMM started).",
            |h| h.io.and_then(|io| io.disk).map(|d| d.read_bytes as f64),
        ),
        (
            "ember_sandbox_disk_write_bytes_total",
            "counter",
            "Bytes the guest wrote to its root disk (since its VMM started).",
            |h| h.io.and_then(|io| io.disk).map(|d| d.write_bytes as f64),
        ),
        (
            "ember_sandbox_net_rx_bytes_total",
            "counter",
            "Bytes of frames delivered to the guest.",
            |h| h.io.and_then(|io| io.net).map(|n| n.rx_bytes as f64),
        ),
        (
            "ember_sandbox_net_tx_bytes_total",
            "counter",
            "Bytes of frames the guest sent.",
            |h| h.io.and_then(|io| io.net).map(|n| n.tx_bytes as f64),
        ),
        (
            "ember_sandbox_cgroup_memory_bytes",
            "gauge",
            "Memory of the sandbox's cgroup.",
            |h| h.cgroup_memory_bytes.map(|b| b as f64),
        ),
    ];
    for (name, kind, help, pick) in series {
        crate::metrics::header(out, name, kind, help);
        for (sandbox, sample) in live.iter().zip(&samples) {
            if let Some(value) = pick(sample) {
                let runtime = sandbox
                    .record()
                    .runtime
                    .map(|r| r.runtime)
                    .unwrap_or_else(|| ember_client::images::BASE_RUNTIME.to_string());
                let _ = writeln!(
                    out,
                    "{name}{{sandbox=\"{}\",runtime=\"{runtime}\"}} {value}",
                    sandbox.id
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP ember_sandbox_series_dropped Live sandboxes beyond the {MAX_LABELLED_SANDBOXES} labelled ones.\n# TYPE ember_sandbox_series_dropped gauge\nember_sandbox_series_dropped {dropped}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 40 2000 3 0 2 0 0 0\ncpu0 50 2 20 1000 1 0 1 0 0 0\ncpu1 50 3 20 1000 2 0 1 0 0 0\nintr 1\n";
    const MEMINFO: &str =
        "MemTotal:         500000 kB\nMemFree:          100000 kB\nMemAvailable:     300000 kB\n";

    #[test]
    fn guest_proc_files_parse_into_milliseconds_and_bytes() {
        let m = parse_guest(
            STAT,
            MEMINFO,
            "0.50 0.25 0.10 2/87 412\n",
            "123.45 200.00\n",
        )
        .unwrap();
        assert_eq!(m.cpus, 2);
        assert_eq!(m.cpu_user_ms, 1050);
        assert_eq!(m.cpu_system_ms, 420);
        assert_eq!(m.cpu_idle_ms, 20000);
        assert_eq!(m.cpu_iowait_ms, 30);
        assert_eq!(m.memory_total_bytes, 500000 * 1024);
        assert_eq!(m.memory_used_bytes, 200000 * 1024);
        assert_eq!((m.load_1m, m.load_15m), (0.5, 0.1));
        assert_eq!(m.processes, 87);
        assert_eq!(m.uptime_s, 123.45);
    }

    #[test]
    fn a_guest_that_lies_in_its_proc_files_gets_an_error_naming_the_field() {
        let e = parse_guest("intr 1\n", MEMINFO, "0 0 0 1/1 1", "1 1").unwrap_err();
        assert!(e.to_string().contains("cpu line"), "{e}");
        let e = parse_guest(STAT, "MemTotal: 1 kB\n", "0 0 0 1/1 1", "1 1").unwrap_err();
        assert!(e.to_string().contains("MemAvailable"), "{e}");
        let e = parse_guest(STAT, MEMINFO, "x", "1 1").unwrap_err();
        assert!(e.to_string().contains("/proc/loadavg"), "{e}");
    }

    #[test]
    fn the_vmm_side_reads_this_process() {
        let pid = std::process::id();
        assert!(crate::metrics::resident_bytes(pid) > 0);
        assert!(proc_cpu_us(pid).is_some());
    }
}
