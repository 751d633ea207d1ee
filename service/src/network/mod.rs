//! Sandbox networks. A sandbox in network mode `none` (the default) has no network device at
//! all. One in mode `egress` gets:
//!
//! - a network namespace `ember-<id>` that its VMM's jail joins, holding the guest's TAP
//!   (`tap0`, host side 172.16.0.1/30, guest 172.16.0.2): the same addresses in every
//!   namespace, so clones restored from one snapshot keep the address they were saved with and
//!   never collide;
//! - a veth pair: `em<12 hex of the id>` in the host's namespace and `uplink` in the sandbox's,
//!   on a /30 of 10.200.0.0/16 (a slot per live sandbox);
//! - nftables in the sandbox's namespace ([`rules`]): the guest is masqueraded behind the
//!   uplink address, may start connections only to its allow-list (when it has none: public
//!   unicast addresses only, never private, shared, loopback, link-local, multicast or
//!   reserved ranges, other sandboxes' links or the host), never to its deny-list, and
//!   receives only replies;
//! - a name server of its own on the TAP's host side ([`resolver`], run by the service): the
//!   only one the guest reaches. It answers only names its policy allows, and puts the
//!   addresses they resolve to in the namespace's name set for their TTL, so an allow-list of
//!   names opens those addresses and nothing beside them;
//! - in the host's namespace, table `ip ember`: the same policy again per sandbox link (a
//!   chain per veth), nothing the links start may reach the host itself, the links' traffic is
//!   masqueraded to whatever uplink the host routes it to, and IPv4 forwarding is on while a
//!   sandbox network exists (as the host had it once the last one goes).
//!
//! A sandbox restored in mode `none` from a snapshot whose guest had a network device gets the
//! namespace and TAP without the veth: the device exists, nothing is reachable.
//!
//! Everything is made with `ip` and `nft` (iproute2, nftables) and removed with the sandbox's
//! namespace (its veth and TAP go with it); namespaces of sandboxes that are no longer live are
//! removed when the service starts, so a crash leaves nothing behind for long.

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ember_client::responses::{NetworkModeName, SandboxNetwork};
pub use ember_client::types::{Cidr, NetworkMode, NetworkPolicy};
use serde::{Deserialize, Serialize};

use ember_sandbox::control::WorkerNet;

pub mod resolver;
pub mod rules;
pub mod update;

use rules::Reach;

/// What failed making, entering or removing a sandbox's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot run {program}: {source} (is it installed?)")]
    Run {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("IPv4 forwarding ({what}): {source}")]
    Forwarding {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the network namespace {} ({what}): {source}", path.display())]
    Namespace {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("in {}: {source}", netns.display())]
    Tap {
        netns: PathBuf,
        #[source]
        source: ember_devices::virtio::net::NetError,
    },
    #[error("an egress network needs a link slot")]
    NoSlot,
    #[error("the thread opening the TAP ended without an answer")]
    TapThread,
}

/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
const NETNS_PREFIX: &str = "ember-";
/// The guest's link, the same in every sandbox namespace.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
const TAP_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
const TAP_PREFIX: u8 = 30;
const TAP_NAME: &str = "tap0";
/// The host side's MAC, the same in every namespace.
const TAP_MAC: &str = "06:e0:00:00:00:01";
const UPLINK_NAME: &str = "uplink";
/// The sandboxes' links: a /30 each.
const LINKS: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 200, 0, 0), 16);
/// Slots in [`LINKS`].
pub const MAX_SLOTS: u32 = 1 << (32 - 16 - 2);
/// Ranges an egress guest without an allow-list never reaches (an allow-list entry for one
/// opens exactly what it names): "this network", private, shared address space (CGNAT),
/// loopback, link-local (cloud metadata services), IETF protocol assignments, benchmarking,
/// multicast and reserved. Documentation ranges (TEST-NET) stay reachable: tests stand in
/// public servers there.
pub const NON_PUBLIC: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];
/// Where the service records that IPv4 forwarding was off before the first sandbox network
/// turned it on (in `/run`: it outlives a restart of the service, not of the host).
const FORWARDING_WAS_OFF: &str = "/run/ember-ip-forward-was-off";
/// Serialises changes to the host's shared part (forwarding, table `ip ember`): the last
/// network's removal must not drop what a concurrent creation just set up.
static HOST_NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the service keeps about a sandbox's network (in its record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxNet {
    pub mode: NetworkMode,
    /// Its slot in the links' range (egress only).
    pub slot: Option<u32>,
}

impl SandboxNet {
    /// How the API shows it.
    pub fn info(&self) -> SandboxNetwork {
        let (mode, allow, deny) = match &self.mode {
            NetworkMode::None {} => (NetworkModeName::None, None, Vec::new()),
            NetworkMode::Egress { allow, deny } => {
                (NetworkModeName::Egress, allow.clone(), deny.clone())
            }
        };
        SandboxNetwork {
            mode,
            allow,
            deny,
            guest_address: Some(GUEST_ADDRESS),
            link: self.slot.map(|slot| link_addresses(slot).0),
        }
    }
}

/// The namespace file of sandbox `id`.
pub fn netns_path(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("{NETNS_PREFIX}{id}"))
}

/// Opens a queue of the TAP `tap` in sandbox `id`'s network namespace, for a VMM whose jail
/// is in another namespace (a warm-pool VMM). A thread of its own enters the namespace (a
/// network namespace is per thread) and ends with it.
pub async fn open_tap_queue(id: &str, tap: &str) -> Result<OwnedFd, NetworkError> {
    let (path, tap) = (netns_path(id), tap.to_string());
    let (opened_tx, opened) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ember-tap-open".into())
        .spawn(move || {
            let _ = opened_tx.send(open_tap_in(&path, &tap));
        })
        .map_err(|source| NetworkError::Run {
            program: "a thread to open the TAP".into(),
            source,
        })?;
    opened.await.map_err(|_| NetworkError::TapThread)?
}

/// Moves the calling thread into the network namespace `netns` (a network namespace is per
/// thread). For threads of their own that do one thing there and end: sockets and TAPs they
/// open stay in that namespace.
fn enter_namespace(netns: &Path) -> Result<(), NetworkError> {
    let ns = std::fs::File::open(netns).map_err(|source| NetworkError::Namespace {
        path: netns.to_path_buf(),
        what: "opening it",
        source,
    })?;
    // SAFETY: setns(2) on a namespace file opened above; CLONE_NEWNET moves only this thread,
    // which its callers start for this and end afterwards.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetworkError::Namespace {
            path: netns.to_path_buf(),
            what: "entering it",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn open_tap_in(netns: &Path, tap: &str) -> Result<OwnedFd, NetworkError> {
    enter_namespace(netns)?;
    ember_devices::virtio::net::Tap::open(tap)
        .map(ember_devices::virtio::net::Tap::into_fd)
        .map_err(|source| NetworkError::Tap {
            netns: netns.to_path_buf(),
            source,
        })
}

fn netns_name(id: &str) -> String {
    format!("{NETNS_PREFIX}{id}")
}

/// The host-side veth of sandbox `id` (15 bytes at most: `em` and the id's last 12).
fn host_veth(id: &str) -> String {
    let tail: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    let start = tail.len().saturating_sub(12);
    format!("em{}", &tail[start..])
}

/// (host side, sandbox side) of slot `slot`'s /30.
fn link_addresses(slot: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(LINKS.0) + slot * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// What the VMM is told about the guest's interface: its name server is its own resolver,
/// on the TAP's host side (nothing answers there in mode `none`).
pub fn worker_net(mac: [u8; 6]) -> WorkerNet {
    WorkerNet {
        tap: TAP_NAME.into(),
        mac,
        guest: GUEST_ADDRESS,
        prefix_len: TAP_PREFIX,
        gateway: TAP_ADDRESS,
        dns: Some(TAP_ADDRESS),
    }
}

/// The name servers sandboxes' resolvers ask by default: every IPv4 `nameserver` of a
/// resolv.conf (loopback ones too: the service asks them from the host's namespace).
pub fn host_name_servers(resolv: &str) -> Vec<std::net::SocketAddr> {
    resolv
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_unspecified())
        .map(|a| std::net::SocketAddr::from((a, 53)))
        .collect()
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), NetworkError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetworkError::Run {
            program: program.to_string(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetworkError::Run {
                program: program.to_string(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Run {
            program: program.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetworkError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    run("ip", args, None)
}

/// The host's part, shared by all sandboxes: forwarding on (recording that it was off), the
/// links masqueraded, nothing they start reaching the host, and a chain per link (see
/// [`link_rules`]). Kept when it exists: other sandboxes' chains are in it.
fn ensure_host_nat() -> Result<(), NetworkError> {
    let forwarding = |what| move |source| NetworkError::Forwarding { what, source };
    let state = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map_err(forwarding("reading it"))?;
    if state.trim() == "0" {
        std::fs::write(FORWARDING_WAS_OFF, b"").map_err(forwarding("recording it was off"))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(forwarding("turning it on"))?;
    }
    if run("nft", &["list", "table", "ip", "ember"], None).is_ok() {
        return Ok(());
    }
    run("nft", &["-f", "-"], Some(&rules::host_table()))
}

/// What sandbox networks left on this host: namespaces, host-side veths and the host's NAT
/// table (for a soak's check once every sandbox is gone; empty when clean).
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for id in sandbox_namespaces() {
        found.push(format!("network namespace {} remains", netns_name(&id)));
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Host veths are `em` and 12 alphanumerics (see `host_veth`).
            if name.len() == 14
                && name.starts_with("em")
                && name[2..].chars().all(|c| c.is_ascii_alphanumeric())
            {
                found.push(format!("host link {name} remains"));
            }
        }
    }
    if run("nft", &["list", "table", "ip", "ember"], None).is_ok() {
        found.push("the host's nftables table `ip ember` remains".to_string());
    }
    found
}

/// Removes the host's table once no sandbox namespace is left, and turns IPv4 forwarding
/// back off if it was off before. The caller holds [`HOST_NETWORK`].
fn drop_host_nat_if_unused() {
    if !sandbox_namespaces().is_empty() {
        return;
    }
    let _ = run("nft", &["delete", "table", "ip", "ember"], None);
    if Path::new(FORWARDING_WAS_OFF).exists() {
        match std::fs::write("/proc/sys/net/ipv4/ip_forward", "0") {
            Ok(()) => {
                let _ = std::fs::remove_file(FORWARDING_WAS_OFF);
            }
            Err(e) => log::warn!("cannot turn IPv4 forwarding back off: {e}"),
        }
    }
}

/// Creates sandbox `id`'s namespace for `mode` (slot `slot` for egress), with the TAP owned by
/// the jail's user. On failure nothing is left behind.
pub fn create(
    id: &str,
    mode: &NetworkMode,
    slot: Option<u32>,
    owner: (u32, u32),
) -> Result<(), NetworkError> {
    let _host = HOST_NETWORK.lock().unwrap_or_else(|p| p.into_inner());
    let result = create_inner(id, mode, slot, owner);
    if result.is_err() {
        remove_locked(id);
    }
    result
}

fn create_inner(
    id: &str,
    mode: &NetworkMode,
    slot: Option<u32>,
    (uid, gid): (u32, u32),
) -> Result<(), NetworkError> {
    let ns = netns_name(id);
    ip(&["netns", "add", &ns])?;
    let (uid, gid) = (uid.to_string(), gid.to_string());
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &ns, "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "vnet_hdr", "user", &uid,
        "group", &gid,
    ])?;
    // The same MAC in every namespace too: a restored guest's ARP cache stays right.
    ip(&["-n", &ns, "link", "set", TAP_NAME, "address", TAP_MAC])?;
    let tap_cidr = format!("{TAP_ADDRESS}/{TAP_PREFIX}");
    ip(&["-n", &ns, "addr", "add", &tap_cidr, "dev", TAP_NAME])?;
    ip(&["-n", &ns, "link", "set", TAP_NAME, "up"])?;
    let Some(policy) = mode.policy() else {
        return Ok(());
    };
    let reach = Reach::of(&policy);
    let slot = slot.ok_or(NetworkError::NoSlot)?;
    ensure_host_nat()?;
    let veth = host_veth(id);
    let (host_addr, ns_addr) = link_addresses(slot);
    ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        UPLINK_NAME,
        "netns",
        &ns,
    ])?;
    ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth])?;
    ip(&["link", "set", &veth, "up"])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{ns_addr}/30"),
        "dev",
        UPLINK_NAME,
    ])?;
    ip(&["-n", &ns, "link", "set", UPLINK_NAME, "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &host_addr.to_string(),
    ])?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ],
        None,
    )?;
    run(
        "ip",
        &["netns", "exec", &ns, "nft", "-f", "-"],
        Some(&rules::sandbox_table(&reach, &[])),
    )?;
    run(
        "nft",
        &["-f", "-"],
        Some(&rules::link_rules(&veth, &reach, &[])),
    )
}

/// Replaces the policy of sandbox `id`'s egress network, in its namespace and on the host,
/// `names` being the addresses its allowed names resolve to now.
pub fn apply_policy(id: &str, reach: &Reach, names: &[Ipv4Addr]) -> Result<(), NetworkError> {
    let _host = HOST_NETWORK.lock().unwrap_or_else(|p| p.into_inner());
    run(
        "ip",
        &["netns", "exec", &netns_name(id), "nft", "-f", "-"],
        Some(&rules::sandbox_table(reach, names)),
    )?;
    run(
        "nft",
        &["-f", "-"],
        Some(&rules::link_rules(&host_veth(id), reach, names)),
    )
}

/// Adds and removes addresses of sandbox `id`'s name sets (namespace and host).
pub fn change_names(
    id: &str,
    added: &[Ipv4Addr],
    removed: &[Ipv4Addr],
) -> Result<(), NetworkError> {
    let veth = host_veth(id);
    run(
        "ip",
        &["netns", "exec", &netns_name(id), "nft", "-f", "-"],
        Some(&rules::names_change(
            "ip sandbox",
            rules::SANDBOX_NAMES_SET,
            added,
            removed,
        )),
    )?;
    run(
        "nft",
        &["-f", "-"],
        Some(&rules::names_change(
            "ip ember",
            &rules::link_names_set(&veth),
            added,
            removed,
        )),
    )
}

/// Removes sandbox `id`'s namespace (its veth and TAP go with it) and its chain in the host's
/// table; nothing if there is none.
pub fn remove(id: &str) {
    let _host = HOST_NETWORK.lock().unwrap_or_else(|p| p.into_inner());
    remove_locked(id);
}

fn remove_locked(id: &str) {
    let veth = host_veth(id);
    let _ = run("nft", &["-f", "-"], Some(&rules::unlink(&veth)));
    if netns_path(id).exists() {
        if let Err(e) = ip(&["netns", "del", &netns_name(id)]) {
            log::warn!("sandbox {id}: cannot remove its network namespace: {e}");
        }
    }
    // A veth whose namespace never got its peer.
    if Path::new("/sys/class/net").join(&veth).exists() {
        let _ = ip(&["link", "del", &veth]);
    }
    drop_host_nat_if_unused();
}

/// Removes the namespaces of sandboxes not in `live` (left by a crash or a killed service).
pub fn remove_stale(live: &HashSet<String>) {
    let _host = HOST_NETWORK.lock().unwrap_or_else(|p| p.into_inner());
    for id in sandbox_namespaces() {
        if !live.contains(&id) {
            log::info!("removing the network of sandbox {id}, which is gone");
            remove_locked(&id);
        }
    }
    drop_host_nat_if_unused();
}

/// The sandbox ids that have a namespace on this host (`/run/netns/ember-ID`).
fn sandbox_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_prefix(NETNS_PREFIX).map(str::to_string)
        })
        .collect()
}

/// The lowest slot not in `used`.
pub fn free_slot(used: &HashSet<u32>) -> Option<u32> {
    (0..MAX_SLOTS).find(|slot| !used.contains(slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_print() {
        let c: Cidr = "10.1.2.0/24".parse().unwrap();
        assert_eq!((c.address, c.prefix_len), (Ipv4Addr::new(10, 1, 2, 0), 24));
        assert_eq!(c.to_string(), "10.1.2.0/24");
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix_len, 32);
        for bad in [
            "10.1.2.0/33",
            "10.1.2/24",
            "x/8",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let mode: NetworkMode =
            serde_json::from_str(r#"{"mode":"egress","allow":["10.0.0.0/8","1.2.3.4"]}"#).unwrap();
        assert_eq!(
            mode,
            NetworkMode::Egress {
                allow: Some(vec![
                    "10.0.0.0/8".parse().unwrap(),
                    "1.2.3.4/32".parse().unwrap()
                ]),
                deny: Vec::new(),
            }
        );
        assert!(serde_json::from_str::<NetworkMode>(r#"{"mode":"none","allow":[]}"#).is_err());
        assert!(serde_json::from_str::<NetworkMode>(r#"{"mode":"bridge"}"#).is_err());
        assert!(
            serde_json::from_str::<NetworkMode>(r#"{"mode":"egress","allow":["300.0.0.1"]}"#)
                .is_err()
        );
    }

    #[test]
    fn resolvers_ask_the_hosts_name_servers() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver ::1\nnameserver 10.0.0.2\nnameserver 0.0.0.0\n";
        assert_eq!(
            host_name_servers(conf),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "10.0.0.2:53".parse().unwrap()
            ]
        );
        assert!(host_name_servers("").is_empty());
    }

    #[test]
    fn names_and_addresses_fit() {
        assert_eq!(host_veth("sb-5f1e3a9c05f0"), "em5f1e3a9c05f0");
        assert!(host_veth("sb-5f1e3a9c05f0").len() <= 15);
        assert_eq!(
            link_addresses(0),
            (Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 2))
        );
        assert_eq!(
            link_addresses(MAX_SLOTS - 1),
            (
                Ipv4Addr::new(10, 200, 255, 253),
                Ipv4Addr::new(10, 200, 255, 254)
            )
        );
        let used: HashSet<u32> = [0, 1, 3].into();
        assert_eq!(free_slot(&used), Some(2));
    }
}
