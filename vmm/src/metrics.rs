//! Figures about one VM run: how fast it started and what it cost the host in memory.

use std::time::Duration;

use ember_devices::GuestMilestones;

/// What a run measured. Times are from `VmmOptions::start`, except `guest`'s.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunReport {
    /// Until the vCPUs were told to run (the first `KVM_RUN` follows at once).
    pub to_first_run_us: u64,
    /// Until the guest's init wrote the boot timer ("userspace reached"), if it did.
    pub to_userspace_us: Option<u64>,
    /// The guest's own account of its boot, by its clock (its kernel log's).
    pub guest: GuestMilestones,
    /// When the guest's clock started, on this report's clock: the agent's start by both
    /// clocks ties them. What lies between `to_first_run_us` and this is the guest kernel's
    /// boot before its clock runs.
    pub guest_clock_started_us: Option<u64>,
    /// Until the guest ended.
    pub total_us: u64,
    /// Resident memory of the VMM process outside guest RAM, measured as the guest ended.
    pub vmm_rss_bytes: u64,
    /// Resident guest RAM at that moment.
    pub guest_rss_bytes: u64,
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Splits this process's resident memory into (outside `guest`, inside `guest`), where
/// `guest` lists host address ranges `[start, end)` of guest RAM.
pub fn resident_split(guest: &[(u64, u64)]) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(split_smaps(&smaps, guest))
}

/// [`resident_split`] over the text of an smaps file.
pub fn split_smaps(smaps: &str, guest: &[(u64, u64)]) -> (u64, u64) {
    let (mut outside, mut inside) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = parse_range(first) {
            // A mapping belongs to guest RAM when it lies within one of the guest ranges.
            in_guest = guest.iter().any(|&(gs, ge)| start >= gs && end <= ge);
            continue;
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            if in_guest {
                inside += kib * 1024;
            } else {
                outside += kib * 1024;
            }
        }
    }
    (outside, inside)
}

fn parse_range(word: &str) -> Option<(u64, u64)> {
    let (start, end) = word.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42   /usr/bin/ember
Size:               1024 kB
Rss:                 600 kB
Pss:                 600 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               40000 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0
Rss:                 132 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn splits_guest_ram_from_the_rest() {
        let guest = [(0x7f00_0000_0000, 0x7f00_1000_0000)];
        assert_eq!(
            split_smaps(SMAPS, &guest),
            ((600 + 132) * 1024, 40000 * 1024)
        );
        assert_eq!(split_smaps(SMAPS, &[]), ((600 + 40000 + 132) * 1024, 0));
    }

    #[test]
    fn reads_this_process() {
        let (outside, inside) = resident_split(&[]).unwrap();
        assert!(outside > 0);
        assert_eq!(inside, 0);
    }
}

/// The guest's traffic through its devices since its VMM made them (a restored VM starts from
/// zero): the root disk's requests and the network device's frames (headers excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IoStats {
    pub disk: Option<ember_devices::virtio::block::BlockStats>,
    pub net: Option<NetIo>,
}

/// A network device's frames each way (`rx`: to the guest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetIo {
    pub rx_bytes: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
}
