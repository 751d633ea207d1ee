//! The control protocol between `ember serve` and a sandbox's VMM process (`ember-vmm`):
//! one JSON object per line on the VMM's control socket, one reply line per request.
//!
//! The VMM process also writes one [`WorkerEvent`] line to its stdout when the guest's agent
//! first answers, so the service knows the sandbox is ready and how long that took.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The longest control line either side accepts.
pub const MAX_CONTROL_LINE: usize = 64 * 1024;

/// What the VMM process is asked to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    pub sandbox_id: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub origin: WorkerOrigin,
    pub store_dir: PathBuf,
    /// The VM's vsock Unix socket (the service talks to the agent through it).
    pub vsock_socket: PathBuf,
    /// Where the VMM listens for [`ControlRequest`]s.
    pub control_socket: PathBuf,
    /// The private copy-on-write overlay of the rootfs.
    pub overlay: PathBuf,
    /// Limits on the root disk's traffic.
    #[serde(default)]
    pub disk_rate_limit: ember_vmm::RateLimit,
    /// Limits on the network device's traffic.
    #[serde(default)]
    pub net_rate_limits: ember_vmm::NetRateLimits,
    /// The jail the VMM enters first (none: it runs as started, e.g. a service not run as
    /// root).
    #[serde(default)]
    pub jail: Option<ember_jail::JailSpec>,
    /// The guest's network interface (none: the guest has no network device).
    #[serde(default)]
    pub net: Option<WorkerNet>,
    /// The service's memory cache, where restores find snapshots' materialised memory
    /// (read-only to the VMM).
    #[serde(default)]
    pub mem_cache: Option<PathBuf>,
    /// Where the VMM writes snapshots and working sets (see [`staged_snapshot_dir`]) when
    /// the store is not its to write: the service ingests them from there. None: straight
    /// into the store.
    #[serde(default)]
    pub staging_dir: Option<PathBuf>,
}

/// The folder of a VMM's staging folder its snapshots go to, one store each (named by the
/// snapshot id), layered over the shared store.
pub const STAGED_SNAPSHOTS: &str = "snapshots";
/// The folder of a VMM's staging folder where it records its restore's working set.
pub const STAGED_WORKING_SET: &str = "working-set";

/// Where a VMM with staging folder `staging` writes snapshot `id`.
pub fn staged_snapshot_dir(staging: &Path, id: &str) -> PathBuf {
    staging.join(STAGED_SNAPSHOTS).join(id)
}

/// Where a VMM with staging folder `staging` records its restore's working set.
pub fn staged_working_set_dir(staging: &Path) -> PathBuf {
    staging.join(STAGED_WORKING_SET)
}

/// The guest's `eth0`: a TAP interface in the sandbox's network namespace, which the VMM's
/// jail joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerNet {
    /// The TAP, in the jail's network namespace.
    pub tap: String,
    pub mac: [u8; 6],
    /// The guest's address, set by its kernel at boot; a restored guest keeps its own.
    pub guest: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    /// The guest's name server (in its `/proc/net/pnp`, which its `/etc/resolv.conf` is).
    #[serde(default)]
    pub dns: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerOrigin {
    Boot,
    Restore {
        snapshot: String,
        mode: ember_vmm::RestoreMode,
        /// Set when the store holds the snapshot only in part (it is being fetched from the
        /// remote tier): the pages it lacks come over the page channel the service passes
        /// on stdin (see [`crate::page_channel`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partial: Option<Box<PartialOrigin>>,
    },
}

/// What a VMM restoring a partial snapshot is given besides the page channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialOrigin {
    /// The snapshot's manifest (the store does not have it yet).
    pub manifest: ember_snapshot_store::Manifest,
    /// Pages to load first; the store has them.
    pub working_set: Vec<u64>,
    /// How long the VMM waits for one page before it stops the guest.
    pub page_timeout_ms: u64,
}

/// What a warm-pool VMM (`ember-vmm --pooled`) is told on stdin (a Unix socket) when it is
/// given a sandbox:
/// everything of its spec that the pool could not know. The rest (its id, folders, jail,
/// store) was the sandbox's from the VMM's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolAssignment {
    pub vcpus: u8,
    pub mem_mib: u32,
    pub origin: WorkerOrigin,
    pub disk_rate_limit: ember_vmm::RateLimit,
    pub net_rate_limits: ember_vmm::NetRateLimits,
    /// The guest's network interface. Its TAP queue, opened by the service in the sandbox's
    /// network namespace, comes attached to the assignment's line (`SCM_RIGHTS`): a pooled
    /// VMM's jail has a network namespace of its own, made before the sandbox existed.
    #[serde(default)]
    pub net: Option<WorkerNet>,
}

impl PoolAssignment {
    /// The assignment of a sandbox whose spec is `spec`.
    pub fn of(spec: &WorkerSpec) -> PoolAssignment {
        PoolAssignment {
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
            origin: spec.origin.clone(),
            disk_rate_limit: spec.disk_rate_limit,
            net_rate_limits: spec.net_rate_limits,
            net: spec.net.clone(),
        }
    }

    /// Completes a pooled VMM's spec.
    pub fn apply_to(self, spec: &mut WorkerSpec) {
        spec.vcpus = self.vcpus;
        spec.mem_mib = self.mem_mib;
        spec.origin = self.origin;
        spec.disk_rate_limit = self.disk_rate_limit;
        spec.net_rate_limits = self.net_rate_limits;
        spec.net = self.net;
    }
}

/// A line on the VMM process's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerEvent {
    /// The guest's agent answered; `ready_ms` counts from the VMM process's start.
    Ready {
        ready_ms: f64,
        restored: bool,
        /// Pages served on demand until then (restores only).
        faults: Option<u64>,
        /// When the VMM process started (milliseconds since the Unix epoch): the base of
        /// `timeline`.
        #[serde(default)]
        started_unix_ms: f64,
        /// Where the start spent its time, up to the agent answering.
        #[serde(default)]
        timeline: Vec<ember_vmm::Milestone>,
        /// How a restored VM's memory arrived (`file`, `prefetch`, `lazy`, `eager`).
        #[serde(default)]
        memory: Option<ember_vmm::RestoreMode>,
        /// When the connection that found the agent was passed on over stdin (a Unix
        /// socket), what its hello said: the service adopts it as its own first connection.
        #[serde(default)]
        agent: Option<ember_agent::client::AgentInfo>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Answered with the VM's state.
    Status,
    /// Stops every vCPU at a consistent point; the agent does not answer meanwhile.
    Pause,
    Resume,
    /// Saves the VM as snapshot `id` (a diff against the snapshot it came from with `diff`),
    /// then resumes it, or stops the VMM with `stop`.
    Snapshot {
        id: String,
        diff: bool,
        stop: bool,
        /// Recorded in the snapshot's metadata (see `Vmm::snapshot_labelled`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
    },
    /// After a prefetch-mode restore's first command: record the pages it needed.
    RecordWorkingSet,
    /// Answered with the restore's page faults over time (see [`FaultReport`]).
    Faults,
    /// Ends the VM (and the VMM process) without involving the guest.
    Stop,
    /// Answered with the guest's disk and network traffic (see [`ember_vmm::IoStats`]).
    IoStats,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `running` or `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotDone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<ember_vmm::IoStats>,
}

/// A restored VM's demand for memory: pages served on demand (userfaultfd faults) per
/// `bucket_ms` since the restore started serving memory, and the totals. `lazy` is false (and
/// the rest empty) for a booted or eagerly restored VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultReport {
    pub lazy: bool,
    pub bucket_ms: u64,
    pub counts: Vec<u32>,
    pub served: u64,
    pub prefetched: u64,
}

impl ControlReply {
    pub fn ok() -> ControlReply {
        ControlReply {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(message: impl Into<String>) -> ControlReply {
        ControlReply {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }
}

/// What a snapshot request saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDone {
    pub id: String,
    pub memory_bytes: u64,
    pub took_ms: f64,
    pub parent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let request = ControlRequest::Snapshot {
            id: "a".into(),
            diff: true,
            stop: false,
            labels: BTreeMap::new(),
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"op":"snapshot","id":"a","diff":true,"stop":false}"#
        );
        assert_eq!(
            serde_json::from_str::<ControlRequest>(&line).unwrap(),
            request
        );
        assert!(serde_json::from_str::<ControlRequest>(
            r#"{"op":"snapshot","id":"a","diff":true,"stop":false,"x":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn spec_round_trips() {
        let spec = WorkerSpec {
            sandbox_id: "sb".into(),
            kernel: "/k".into(),
            rootfs: "/r".into(),
            vcpus: 2,
            mem_mib: 256,
            origin: WorkerOrigin::Restore {
                snapshot: "s".into(),
                mode: ember_vmm::RestoreMode::Prefetch,
                partial: None,
            },
            store_dir: "/s".into(),
            vsock_socket: "/v".into(),
            control_socket: "/c".into(),
            overlay: "/o".into(),
            disk_rate_limit: ember_vmm::RateLimit {
                bytes_per_sec: Some(1 << 20),
                ops_per_sec: None,
            },
            net_rate_limits: ember_vmm::NetRateLimits {
                rx: ember_vmm::RateLimit {
                    bytes_per_sec: Some(1 << 16),
                    ops_per_sec: Some(100),
                },
                tx: ember_vmm::RateLimit::default(),
            },
            jail: Some(ember_jail::JailSpec {
                root: "/j".into(),
                uid: 7,
                gid: 8,
                mounts: vec![ember_jail::JailMount {
                    path: "/s".into(),
                    writable: true,
                }],
                netns: Some("/run/netns/n".into()),
            }),
            net: Some(WorkerNet {
                tap: "tap0".into(),
                mac: [6, 0, 0, 0, 0, 2],
                guest: "172.16.0.2".parse().unwrap(),
                prefix_len: 30,
                gateway: "172.16.0.1".parse().unwrap(),
                dns: Some("192.0.2.53".parse().unwrap()),
            }),
            mem_cache: Some("/m".into()),
            staging_dir: None,
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<WorkerSpec>(&text).unwrap(), spec);
    }
}
