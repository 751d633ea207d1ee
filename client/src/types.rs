//! The HTTP API's request and response bodies: what `ember serve` parses and answers, and what
//! its clients (the `ember` CLI, `ember-bench`, SDK tests) send and read. One definition for
//! both sides, so a field cannot mean one thing to the service and another to a client.
//!
//! Requests refuse unknown fields. Optional fields a client leaves unset are not sent, so the
//! service's defaults apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use crate::network::{Cidr, CidrError, EgressRule, NetworkMode, NetworkPolicy};
pub use ember_vmm::{NetRateLimits, RateLimit, RestoreMode};

fn is_false(value: &bool) -> bool {
    !*value
}

/// `POST /sandboxes`: boot a sandbox, or restore one from `snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `base` (Debian bookworm, Python 3.11, Node 18; commands run as root in `/`),
    /// `python3.13`, `node22` or `node24` (Debian trixie; commands run as `user`, with
    /// passwordless sudo, in `/home/user`), or a container image imported with `POST
    /// /images`. Default: the service's (`base` unless `ember serve --default-runtime` says
    /// otherwise). A restore has its snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The older name for the base runtime: `default`, `python` or `node` (all `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Restore this snapshot instead of booting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Restore this template's snapshot (see `POST /templates`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How a restore's memory arrives (default `auto`); restores only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_mode: Option<RestoreMode>,
    /// Limits on the sandbox's root disk: `{bytes_per_sec, ops_per_sec}` (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limits: Option<RateLimit>,
    /// Limits on the sandbox's network device, each way as the guest sees it: `{rx: {..},
    /// tx: {..}}` of `{bytes_per_sec, ops_per_sec}` (ops are frames); egress mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_limits: Option<NetRateLimits>,
    /// `{"mode": "none"}` (default: no network device) or `{"mode": "egress", "allow":
    /// ["10.0.0.0/8", ...]}` (outgoing connections through NAT, to the allow-list only if
    /// one is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// Guest TCP ports to expose on the host's loopback (through vsock, any network mode);
    /// `GET /sandboxes/{id}` shows where each is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// What happens at the timeout (and after `idle_timeout_s` without use): `stop` (the
    /// default), `pause` (the VMM stays, paused: no CPU, memory kept) or `snapshot` (saved
    /// to the store, its VMM freed). A paused or snapshotted sandbox resumes, under the same
    /// id and with its processes, on its next exec, files or commands request unless
    /// `auto_resume` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// Resume a sandbox suspended by `on_timeout` on use (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
    /// Apply `on_timeout` once no exec, files or commands request has been made, and no
    /// command it ran has been running, for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
}

/// What a sandbox's timeout (or idleness) does to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    #[default]
    Stop,
    Pause,
    Snapshot,
}

impl OnTimeout {
    pub fn label(self) -> &'static str {
        match self {
            OnTimeout::Stop => "stop",
            OnTimeout::Pause => "pause",
            OnTimeout::Snapshot => "snapshot",
        }
    }
}

/// `POST /sandboxes/{id}/timeout`: the sandbox now stops `timeout_s` from now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    pub timeout_s: u64,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// The snapshot's id (default: a fresh `snap-…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Store only the pages written since the snapshot this sandbox was restored from.
    #[serde(default, skip_serializing_if = "is_false")]
    pub diff: bool,
    /// Stop the sandbox after saving it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop: bool,
}

/// `POST /snapshots/{id}/fork`: `count` sandboxes from one snapshot at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_mode: Option<RestoreMode>,
    /// Each clone's network (see [`CreateBody::network`]); every clone has a namespace of its
    /// own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMode>,
    /// Guest ports each clone exposes (on host ports of its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Each clone's root-disk limits (see [`CreateBody::disk_limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limits: Option<RateLimit>,
    /// Each clone's network limits (see [`CreateBody::net_limits`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_limits: Option<NetRateLimits>,
}

/// `POST /sandboxes/{id}/exec`: one command, its output streamed back (or, `detach`, its id).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the runtime's, `/home/user` or `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `root`, or the runtime's own user (`user`, or an imported image's; default: the
    /// runtime's, `root` in `base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Text written to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes (base64) written to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Start the command and answer at once with its id.
    #[serde(default, skip_serializing_if = "is_false")]
    pub detach: bool,
}

/// `POST /sandboxes/{id}/pty`: a command (default: the runtime user's login shell) on a new
/// pseudo-terminal of `cols` x `rows`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtyBody {
    /// The program (default: `/bin/bash -l`, or `/bin/sh -l` where there is no bash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The terminal's width in columns.
    pub cols: u16,
    /// The terminal's height in rows.
    pub rows: u16,
    /// Added to the sandbox's environment; `TERM` is `xterm-256color` unless set here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the runtime's, `/home/user` or `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `root`, or the runtime's own user (default: the runtime's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A text message a client sends on `GET /sandboxes/{id}/pty/{pty_id}/connect`'s WebSocket
/// (binary messages are what it types).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PtyControl {
    /// The terminal's new size (the command gets SIGWINCH).
    Resize { cols: u16, rows: u16 },
    /// Sends `signal` (1-64) to the terminal's foreground job (its foreground process group,
    /// as a key like ^C would; the command's own group when nothing else is in the
    /// foreground). SIGKILL also ends the command itself.
    Signal { signal: i32 },
}

/// `GET /sandboxes/{id}/commands/{cid}?wait=true`: answer when the command has ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExecQuery {
    #[serde(default)]
    pub wait: bool,
}

/// `POST /sandboxes/{id}/commands/{cid}/kill` (default signal: SIGKILL, 9).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KillBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// The query of `GET`/`PUT /sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    pub path: String,
    /// Permission bits (octal text, e.g. `755`) for an upload; 644 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `POST /sandboxes/{id}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// A snapshot as `GET /snapshots/{id}` and `ember snapshots --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: Option<String>,
    /// When it was taken, RFC 3339 in UTC.
    pub created: String,
    pub created_unix_ms: u64,
    /// The guest's RAM.
    pub memory_bytes: u64,
    pub memory_mib: f64,
    pub vcpus: Option<u32>,
    /// The snapshot a diff snapshot builds on.
    pub parent: Option<String>,
    pub disks: usize,
    /// Whether the guest had a network device.
    pub network: bool,
    /// Whether its memory is materialised for `file` restores (the service only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_materialised: Option<bool>,
    /// With a remote tier (the service only): `local`, `pushing`, `remote` or
    /// `push_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// With a remote tier (the service only): whether this host holds all of the snapshot
    /// (false while only the remote does, or a restore from it is still fetching the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
    /// Why the last push failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_error: Option<String>,
}

/// An API error's document: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDocument {
    pub error: ErrorBody,
}

/// What failed: a stable machine-readable `code` and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unset_fields_are_not_sent_and_bodies_round_trip() {
        assert_eq!(
            serde_json::to_value(CreateBody::default()).unwrap(),
            json!({})
        );
        let body = CreateBody {
            snapshot: Some("snap-1".into()),
            restore_mode: Some(RestoreMode::File),
            network: Some(NetworkMode::Egress {
                allow: Some(vec!["10.1.0.0/16".parse().unwrap()]),
                deny: Vec::new(),
            }),
            ports: vec![8080],
            ..Default::default()
        };
        let sent = serde_json::to_value(&body).unwrap();
        assert_eq!(
            sent,
            json!({"snapshot": "snap-1", "restore_mode": "file", "ports": [8080],
                   "network": {"mode": "egress", "allow": ["10.1.0.0/16"]}})
        );
        assert_eq!(serde_json::from_value::<CreateBody>(sent).unwrap(), body);
        assert_eq!(
            serde_json::to_value(SnapshotBody::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn unknown_fields_and_bad_networks_are_refused() {
        assert!(serde_json::from_value::<CreateBody>(json!({"vcpu": 2})).is_err());
        assert!(serde_json::from_value::<ForkBody>(json!({"count": 1, "x": 0})).is_err());
        assert!(serde_json::from_value::<NetworkMode>(json!({"mode": "bridge"})).is_err());
        let error = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "\"10.0.0.0/33\" is not an IPv4 network (a.b.c.d/n)"
        );
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
    }
}
