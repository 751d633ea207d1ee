//! What a VM is built from: the guest's description ([`VmConfig`], its disk, network and
//! vsock) and the host-side options ([`VmmOptions`]), each checked before anything is built.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub use ember_devices::rate_limiter::RateLimit;
pub use ember_devices::virtio::net::NetRateLimits;
use ember_devices::virtio::vsock::{MAX_UDS_PATH_LEN, MIN_GUEST_CID};

use crate::arch::x86_64::mptable::{self};
use crate::memory::check_mem_size;
use crate::vmm::{VmmError, MAX_VCPUS};

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Disk image exposed as the first virtio-block device (`/dev/vda`) and used as root.
    pub rootfs: Option<PathBuf>,
    pub read_only_rootfs: bool,
    /// With a rootfs: keep it unmodified and send the guest's writes to a private
    /// copy-on-write overlay created at this path (removed with the VM). Snapshots capture
    /// the overlay's chunks.
    pub rootfs_overlay: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Appended to the default command line (a `-- args` part goes to init).
    pub cmdline_extra: Option<String>,
    /// A virtio-vsock device with a Unix-socket back-end.
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on a TAP interface (`eth0` in the guest); none: no network at all.
    pub net: Option<NetConfig>,
}

/// A virtio-net device on the TAP interface `tap` (in the VMM's network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface; attached with virtio headers (`IFF_VNET_HDR`), created if missing.
    pub tap: String,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The guest's IPv4 set-up, given to its kernel on the command line (`ip=`) so the
    /// interface is up before init; `None` leaves `eth0` to the guest.
    pub ipv4: Option<GuestIpv4>,
}

/// A static IPv4 set-up for the guest's `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestIpv4 {
    pub address: std::net::Ipv4Addr,
    /// Network prefix length, 1 to 32.
    pub prefix_len: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Name server, written by the kernel to `/proc/net/pnp`.
    pub dns: Option<std::net::Ipv4Addr>,
}

impl GuestIpv4 {
    /// The kernel's `ip=` parameter: `client::gateway:netmask::eth0:off[:dns]`.
    pub fn kernel_parameter(&self) -> String {
        let netmask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len)));
        let gateway = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        let mut param = format!("ip={}::{gateway}:{netmask}::eth0:off", self.address);
        if let Some(dns) = self.dns {
            param.push_str(&format!(":{dns}"));
        }
        param
    }
}

impl NetConfig {
    /// Checks the TAP name, the MAC and the address.
    pub fn validate(&self) -> Result<(), VmmError> {
        let invalid = |why: String| VmmError::NetConfig(why);
        let name_ok = !self.tap.is_empty()
            && self.tap.len() < ember_devices::virtio::net::IFNAMSIZ
            && !self.tap.contains(['/', ' ', '\0', ':']);
        if !name_ok {
            return Err(invalid(format!(
                "TAP name {:?} is not an interface name (1 to 15 bytes, no '/', ':', space or NUL)",
                self.tap
            )));
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(invalid(format!(
                "MAC {} is not a unicast address",
                format_mac(&self.mac)
            )));
        }
        if let Some(ip) = &self.ipv4 {
            if !(1..=32).contains(&ip.prefix_len) {
                return Err(invalid(format!(
                    "prefix length /{} is not 1 to 32",
                    ip.prefix_len
                )));
            }
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A virtio-vsock device whose host side is the Unix socket `uds_path`.
///
/// Host-initiated connections: connect to `uds_path`, write `CONNECT <guest port>\n`, read
/// `OK <host port>\n`, then the stream is the connection. Guest-initiated connections to CID 2
/// port `P` reach whatever listens on the Unix socket `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more; `u32::MAX` is reserved).
    pub guest_cid: u32,
    /// Where the device listens; a stale socket there is replaced.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the CID and that the path fits a Unix socket address.
    pub fn validate(&self) -> Result<(), VmmError> {
        if u64::from(self.guest_cid) < MIN_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(VmmError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH_LEN {
            return Err(VmmError::VsockPath {
                path: self.uds_path.display().to_string(),
                len,
            });
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks the numbers before anything is allocated.
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::VcpuCount(self.vcpus));
        }
        debug_assert!(MAX_VCPUS <= mptable::max_cpus());
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if self.rootfs_overlay.is_some() && (self.rootfs.is_none() || self.read_only_rootfs) {
            return Err(VmmError::Overlay(
                "a copy-on-write overlay needs a rootfs that is not read-only".into(),
            ));
        }
        check_mem_size(self.mem_bytes()).map_err(VmmError::Memory)
    }

    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }
}

/// Host-side options that are not part of the guest's description.
pub struct VmmOptions {
    /// Where the guest's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// When boot time is measured from (the boot timer reports the time to userspace).
    pub start: Instant,
    /// Limits on the root disk's bytes and requests per second (none by default): one guest
    /// must not starve the host's disk.
    pub disk_rate_limit: RateLimit,
    /// Limits on the network device's traffic each way (none by default): one guest must not
    /// starve the host's network.
    pub net_rate_limits: NetRateLimits,
    /// Where restores look for a snapshot's materialised memory (`file` and `auto` modes).
    pub mem_cache: Option<ember_snapshot_store::MemCache>,
    /// A queue of `net.tap` already opened elsewhere (a service opens it in the sandbox's
    /// network namespace and hands it over); without it the VMM opens `net.tap` itself.
    pub tap_fd: Option<std::os::fd::OwnedFd>,
    /// A restore of a snapshot the store holds only in part (one being fetched from a
    /// remote tier): its manifest, and where the pages the store lacks come from.
    pub partial: Option<PartialSnapshot>,
}

/// A snapshot whose manifest, state, maps and disk chunks are in the store but not all of
/// its memory pages: those come from `missing_pages`, each checked against its hash.
pub struct PartialSnapshot {
    pub manifest: ember_snapshot_store::Manifest,
    /// The pages to load first (the store has them).
    pub working_set: Vec<u64>,
    pub missing_pages: std::sync::Arc<dyn crate::lazy::PageSource>,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            serial_out: Box::new(std::io::stdout()),
            start: Instant::now(),
            disk_rate_limit: RateLimit::default(),
            net_rate_limits: NetRateLimits::default(),
            mem_cache: None,
            tap_fd: None,
            partial: None,
        }
    }
}
