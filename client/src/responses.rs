//! The HTTP API's response bodies. The service builds its answers from these types and the
//! OpenAPI document is derived from them, so the document cannot drift from what is sent.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::types::{EgressRule, SnapshotInfo};
pub use ember_vmm::Milestone;
use ember_vmm::{NetRateLimits, RateLimit, RestoreMode};

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// Sandboxes the service knows (any state).
    pub sandboxes: usize,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    /// Stopped on request (delete, timeout, or a snapshot with `stop`).
    Stopped,
    /// The VMM process ended by itself or could not start; `failure` says why.
    Failed,
}

impl SandboxState {
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopped,
        SandboxState::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    /// Whether its VMM process may still run.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused
        )
    }
}

/// A guest port and where the host reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExposedPort {
    pub guest_port: u16,
    /// `127.0.0.1:PORT` on the host.
    #[schema(value_type = String, example = "127.0.0.1:40123")]
    pub host: SocketAddr,
}

/// What a restore from the remote tier downloaded before its VMM started (the snapshot's
/// head, disk chunks and recorded working set) and before the sandbox was ready (that and
/// the windows of the pages the guest faulted on until then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemoteFetch {
    pub bytes_before_start: u64,
    pub bytes_before_ready: u64,
    pub requests_before_ready: u64,
}

/// The name of a sandbox's network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkModeName {
    None,
    Egress,
}

/// A sandbox's network as `GET /sandboxes/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxNetwork {
    pub mode: NetworkModeName,
    /// The networks and names it may reach (egress; none: any public address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allow: Option<Vec<EgressRule>>,
    /// The networks and names it may not reach (egress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub deny: Vec<EgressRule>,
    /// The guest's address on its link (a sandbox with a network namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub guest_address: Option<Ipv4Addr>,
    /// The host side of its link (egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub link: Option<Ipv4Addr>,
}

/// A sandbox, as `GET /sandboxes/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    pub id: String,
    pub state: SandboxState,
    /// Why it failed.
    pub failure: Option<String>,
    pub created_unix_ms: u64,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The snapshot it was restored from.
    pub snapshot: Option<String>,
    /// The restore mode asked for.
    pub restore_mode: Option<RestoreMode>,
    /// When it stops unless the timeout is extended.
    pub timeout_at_unix_ms: u64,
    /// From the VMM's start to the agent answering.
    pub ready_ms: Option<f64>,
    /// How a restored sandbox's memory arrived (`auto` resolved).
    pub memory: Option<RestoreMode>,
    /// Where its start spent its time, in milliseconds since the request was accepted.
    pub timeline: Vec<Milestone>,
    /// Its VMM process.
    pub pid: Option<u32>,
    pub env: BTreeMap<String, String>,
    /// Its root disk's limits (unset fields: no limit).
    pub disk_limits: RateLimit,
    /// Its network device's limits (unset fields: no limit).
    pub net_limits: NetRateLimits,
    pub network: SandboxNetwork,
    pub ports: Vec<ExposedPort>,
    /// A restore from the remote tier: what it downloaded.
    pub remote_fetch: Option<RemoteFetch>,
    /// Its runtime (`base`, `python3.13`, `node22`, `node24`); a restore's is its snapshot's.
    pub runtime: String,
    /// What its timeout (or idleness) does: `stop`, `pause` or `snapshot`.
    pub on_timeout: crate::types::OnTimeout,
    /// Whether a request resumes it when `on_timeout` suspended it.
    pub auto_resume: bool,
    pub idle_timeout_s: Option<u64>,
    /// Set while the sandbox is paused or saved by its `on_timeout` (it resumes on use).
    pub suspended: Option<Suspension>,
}

/// Why and how a sandbox was suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Suspension {
    /// `timeout` or `idle`.
    pub reason: String,
    /// `pause` or `snapshot`.
    pub how: crate::types::OnTimeout,
    pub at_unix_ms: u64,
    /// The snapshot it was saved as (`how: snapshot`).
    pub snapshot: Option<String>,
}

/// `GET /sandboxes` and `POST /snapshots/{id}/fork`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxInfo>,
}

/// How a command ended (all null and false while it runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandExit {
    /// Its exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// Its `timeout_s` ran out (it was killed).
    pub timed_out: bool,
    /// Why its end is unknown (the agent connection failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether a command is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Running,
    Finished,
}

/// A command's output: text when it is UTF-8, else base64.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
}

/// A command, as `GET /sandboxes/{id}/commands/{cid}` and a detached exec show it; the
/// output is the newest bytes kept (the list leaves it out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandInfo {
    pub cmd_id: String,
    pub argv: Vec<String>,
    pub pid: Option<u32>,
    pub started_unix_ms: u64,
    pub status: CommandStatus,
    pub duration_ms: Option<f64>,
    #[serde(flatten)]
    pub exit: CommandExit,
    #[serde(flatten)]
    pub output: CommandOutput,
    /// Older output bytes no longer kept.
    pub stdout_dropped_bytes: u64,
    pub stderr_dropped_bytes: u64,
}

/// `GET /sandboxes/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    pub commands: Vec<CommandInfo>,
}

/// `POST /sandboxes/{id}/exec?wait=true`: the whole output and the exit in one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    pub cmd_id: String,
    /// How it ended (`error` says so when its end was never reported).
    #[serde(flatten)]
    pub exit: CommandExit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(flatten)]
    pub output: CommandOutput,
    /// Output beyond what one answer carries was left out.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// One line of `POST /sandboxes/{id}/exec`'s NDJSON stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputRecord {
    /// First: the command runs.
    Started { cmd_id: String, pid: Option<u32> },
    /// Output on stdout: `data` when UTF-8, else `data_base64`.
    Stdout {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    },
    /// Output on stderr, as stdout's.
    Stderr {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    },
    /// Last: how it ended.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        duration_ms: f64,
    },
}

/// A terminal session, as `POST /sandboxes/{id}/pty` and `GET /sandboxes/{id}/pty` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PtyInfo {
    pub pty_id: String,
    /// Its command's pid in the guest (also its session and process group id).
    pub pid: u32,
    pub argv: Vec<String>,
    pub cols: u16,
    pub rows: u16,
    pub started_unix_ms: u64,
    pub status: CommandStatus,
    /// How it ended (all null and false while it runs).
    #[serde(flatten)]
    pub exit: CommandExit,
    /// Whether a client is connected to it now.
    pub attached: bool,
}

/// `GET /sandboxes/{id}/pty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PtyList {
    pub ptys: Vec<PtyInfo>,
}

/// A text message the service sends on a terminal's WebSocket (binary messages are the
/// terminal's output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyEvent {
    /// The command ended (the socket closes after this): its exit code, or the signal
    /// that ended it; `error` when its end is unknown.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A control message was refused (the session goes on).
    Error { message: String },
}

/// `POST /sandboxes/{id}/commands/{cid}/kill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Killed {
    pub cmd_id: String,
    pub signal: i32,
}

/// `PUT /sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub bytes: u64,
    /// Permission bits, octal.
    pub mode: String,
}

/// `POST /sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirCreated {
    pub path: String,
}

/// `GET /sandboxes/{id}/faults`: page faults served per time bucket since a lazy restore
/// (all zero for a booted or eagerly restored sandbox).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Faults {
    pub lazy: bool,
    pub bucket_ms: u64,
    pub counts: Vec<u32>,
    /// Pages served on a fault.
    pub served: u64,
    /// Pages loaded ahead of a fault.
    pub prefetched: u64,
}

/// `GET /snapshots`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
}

/// `POST /sandboxes/{id}/snapshots`: the snapshot, how long it took, and the sandbox after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTaken {
    #[serde(flatten)]
    pub snapshot: SnapshotInfo,
    /// From the request to the snapshot in the store.
    pub took_ms: Option<f64>,
    pub sandbox: SandboxInfo,
}

/// `GET /sandboxes/{id}/metrics`: one sample of a sandbox's use of CPU, memory, disk and
/// network, seen from inside the guest (its agent) and from the host (its VMM process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxMetrics {
    pub id: String,
    pub state: SandboxState,
    pub sampled_unix_ms: u64,
    /// None when the guest cannot be asked (a paused sandbox; `guest_error` says why).
    pub guest: Option<GuestMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_error: Option<String>,
    pub host: HostMetrics,
}

/// The guest kernel's view (its `/proc`), read by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestMetrics {
    pub cpus: u32,
    /// CPU time since the guest booted (or, after a restore, since its snapshot's guest
    /// booted), all CPUs together, in milliseconds.
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub cpu_idle_ms: u64,
    pub cpu_iowait_ms: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Total minus available.
    pub memory_used_bytes: u64,
    pub load_1m: f64,
    pub load_5m: f64,
    pub load_15m: f64,
    pub processes: u32,
    pub uptime_s: f64,
}

/// The host's view of the sandbox's VMM process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostMetrics {
    pub vmm_pid: Option<u32>,
    /// CPU time of the sandbox's cgroup (the VMM and its jail's supervisor), else of the VMM
    /// process, in microseconds.
    pub cpu_usage_us: Option<u64>,
    /// Resident memory of the VMM process and its children (a jailed VMM runs under a
    /// supervisor): the guest pages it has touched and its own.
    pub rss_bytes: Option<u64>,
    /// The sandbox cgroup's memory use (`memory.current`), when it has a cgroup.
    pub cgroup_memory_bytes: Option<u64>,
    /// The guest's disk requests and network frames through the VMM's devices.
    pub io: Option<ember_vmm::IoStats>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_command_shows_null_exit_fields_until_it_has_finished() {
        let mut info = CommandInfo {
            cmd_id: "cmd-1".into(),
            argv: vec!["true".into()],
            pid: Some(7),
            started_unix_ms: 1,
            status: CommandStatus::Running,
            duration_ms: None,
            exit: CommandExit::default(),
            output: CommandOutput {
                stdout: Some(String::new()),
                ..Default::default()
            },
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
        };
        let value = serde_json::to_value(&info).unwrap();
        assert_eq!(value["exit_code"], json!(null), "{value}");
        assert!(value.get("error").is_none(), "{value}");
        assert_eq!(serde_json::from_value::<CommandInfo>(value).unwrap(), info);
        info.status = CommandStatus::Finished;
        info.exit.exit_code = Some(0);
        let value = serde_json::to_value(&info).unwrap();
        assert_eq!(value["exit_code"], json!(0));
        assert_eq!(value["signal"], json!(null));
        assert_eq!(value["timed_out"], json!(false));
        assert_eq!(serde_json::from_value::<CommandInfo>(value).unwrap(), info);
    }

    #[test]
    fn output_records_are_tagged_by_type() {
        let record = OutputRecord::Stdout {
            data: Some("hi\n".into()),
            data_base64: None,
        };
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            json!({"type": "stdout", "data": "hi\n"})
        );
    }
}
