//! cgroups v2 limits per sandbox: each VMM process starts inside its own cgroup (under
//! `ember-sandboxes/SERVICE/` beside the service's, where SERVICE is named after the
//! service's state directory: a service removing the leftovers of its previous run never
//! touches another service's sandboxes), which caps its memory (the guest's RAM plus a
//! stated overhead, no swap), its CPU time (its vCPUs' worth) and its tasks. A guest that
//! fills its RAM, or a compromised VMM that allocates or spawns without end, stays inside.
//!
//! A service started in a cgroup of its own that holds processes (a systemd unit with
//! `Delegate=yes`) moves itself into a leaf, `service/`, so that its cgroup may hand the
//! controllers down. Without a cgroup v2 hierarchy with the memory, cpu and pids controllers
//! (a v1 host, a container without delegation) the service refuses to start unless told
//! `--allow-no-cgroup-limits`, and then says so once and runs sandboxes without limits.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Memory a VMM process needs besides the guest's RAM: its binary and heap, KVM's and the
/// kernel's page tables for the guest, device buffers, the store's caches during a snapshot.
pub const MEMORY_OVERHEAD_MIB: u64 = 160;
/// Tasks a VMM process may have: one thread per vCPU (at most 32) and a dozen of its own.
pub const PIDS_MAX: u32 = 64;
/// The CPU period `cpu.max` is expressed in (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The name of the cgroup folder, under `ember-sandboxes/`, of the sandboxes of the service
/// whose state directory is `state_dir`.
pub fn service_folder(state_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canonical = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let hash = blake3::hash(canonical.as_os_str().as_bytes());
    format!("service-{}", &hash.to_hex()[..16])
}

/// The folder holding the sandboxes' cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

/// One sandbox's cgroup, open for moving a process into it.
#[derive(Debug)]
pub struct SandboxCgroup {
    procs: OwnedFd,
}

impl SandboxCgroup {
    /// The raw `cgroup.procs` descriptor: writing "0" to it moves the writing process in
    /// (what the VMM's child does before it runs `ember-vmm`).
    pub fn procs_fd(&self) -> i32 {
        self.procs.as_raw_fd()
    }
}

/// What failed setting up or using the sandboxes' cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy at {}: {source}", mount.display())]
    NoHierarchy {
        mount: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {controller} controller is not available in {} (has: {available})", mount.display())]
    MissingController {
        controller: &'static str,
        mount: PathBuf,
        available: String,
    },
    #[error("reading /proc/self/cgroup: {0}")]
    OwnCgroup(#[source] std::io::Error),
    #[error("this process is not in a cgroup v2 hierarchy")]
    NotInHierarchy,
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// `mkdir` of `path`, which may exist already.
fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Limits the cgroup at `path` to `quota_us` of CPU time per period, with a burst of as much
/// again where the kernel has `cpu.max.burst` (5.14 and later). A sandbox's start is bursty: the
/// vCPU runs flat out while the VMM's own threads restore devices and answer the first
/// connection, and under a bare quota the cgroup was throttled for 10-65 ms of every restore
/// in the lab. The burst spends only CPU time the sandbox saved while it was idle (a pooled
/// VMM waiting for its sandbox saves a full quota), so over time it still gets `quota_us` per
/// period.
fn set_cpu_limit(path: &Path, quota_us: u64) -> Result<(), CgroupError> {
    let burst_file = path.join("cpu.max.burst");
    let cpu_max = format!("{quota_us} {CPU_PERIOD_US}");
    let Ok(current_burst) = std::fs::read_to_string(&burst_file) else {
        return write(&path.join("cpu.max"), &cpu_max);
    };
    // The kernel refuses a burst above the quota, so a burst the new quota would fall below
    // is lowered first. Each write tops the saved time up by one quota, never over
    // quota + burst, so rewriting the same limits at assignment keeps what a pooled VMM saved.
    let burst = quota_us.to_string();
    if current_burst.trim().parse::<u64>().unwrap_or(0) > quota_us {
        write(&burst_file, &burst)?;
    }
    write(&path.join("cpu.max"), &cpu_max)?;
    write(&burst_file, &burst)
}

impl Cgroups {
    /// Finds the cgroup v2 hierarchy at `mount` (normally `/sys/fs/cgroup`), enables the
    /// controllers for the service's children and makes `ember-sandboxes/SERVICE/` for the
    /// service whose state directory is `state_dir`.
    pub fn detect(mount: &Path, state_dir: &Path) -> Result<Cgroups, CgroupError> {
        let controllers =
            std::fs::read_to_string(mount.join("cgroup.controllers")).map_err(|source| {
                CgroupError::NoHierarchy {
                    mount: mount.to_path_buf(),
                    source,
                }
            })?;
        for wanted in CONTROLLERS {
            if !controllers.split_whitespace().any(|c| c == wanted) {
                return Err(CgroupError::MissingController {
                    controller: wanted,
                    mount: mount.to_path_buf(),
                    available: controllers.trim().to_string(),
                });
            }
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::OwnCgroup)?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or(CgroupError::NotInHierarchy)?;
        let base = mount.join(own.trim().trim_start_matches('/'));
        let enable: String = CONTROLLERS.iter().map(|c| format!("+{c} ")).collect();
        // The service's own cgroup hands the controllers down: allowed for the root cgroup,
        // or one without processes of its own. In a delegated cgroup that holds the service
        // (EBUSY: "no internal processes"), the service moves into a leaf of it first.
        let subtree = base.join("cgroup.subtree_control");
        if let Err(e) = write(&subtree, enable.trim()) {
            match &e {
                CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                }
                _ => return Err(e),
            }
            let leaf = base.join("service");
            make_dir(&leaf)?;
            write(&leaf.join("cgroup.procs"), "0")?;
            log::info!(
                "moved the service into {} so that its cgroup can delegate to sandboxes",
                leaf.display()
            );
            write(&subtree, enable.trim())?;
        }
        let all = base.join("ember-sandboxes");
        make_dir(&all)?;
        write(&all.join("cgroup.subtree_control"), enable.trim())?;
        let root = all.join(service_folder(state_dir));
        make_dir(&root)?;
        write(&root.join("cgroup.subtree_control"), enable.trim())?;
        Ok(Cgroups { root })
    }

    /// Where the sandboxes' cgroups are.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes sandbox `id`'s cgroup with its limits.
    pub fn create(&self, id: &str, mem_mib: u32, vcpus: u8) -> Result<SandboxCgroup, CgroupError> {
        let path = self.root.join(id);
        std::fs::create_dir(&path).map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        let result = self.set_limits(id, mem_mib, vcpus).and_then(|()| {
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(path.join("cgroup.procs"))
                .map_err(|source| CgroupError::Open {
                    path: path.join("cgroup.procs"),
                    source,
                })?;
            Ok(OwnedFd::from(procs))
        });
        match result {
            Ok(procs) => Ok(SandboxCgroup { procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    /// Writes the limits of a sandbox of `mem_mib` and `vcpus` into its cgroup (when it is
    /// made, and when a warm-pool VMM made for no sandbox in particular is given one).
    pub fn set_limits(&self, id: &str, mem_mib: u32, vcpus: u8) -> Result<(), CgroupError> {
        let path = self.root.join(id);
        let memory = (u64::from(mem_mib) + MEMORY_OVERHEAD_MIB) << 20;
        write(&path.join("memory.max"), &memory.to_string())?;
        // No swap: the limit is the memory the sandbox holds (absent without swap support).
        let swap = path.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        set_cpu_limit(&path, u64::from(vcpus.max(1)) * CPU_PERIOD_US)?;
        write(&path.join("pids.max"), &PIDS_MAX.to_string())
    }

    /// Kills every process in sandbox `id`'s cgroup at once (`cgroup.kill`): no process can
    /// escape by forking or by changing how it reacts to signals.
    pub fn kill(&self, id: &str) {
        let file = self.root.join(id).join("cgroup.kill");
        if let Err(e) = std::fs::write(&file, "1") {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot write {}: {e}", file.display());
            }
        }
    }

    /// Removes sandbox `id`'s cgroup, killing whatever is still in it first (waits up to a
    /// second for the kernel to notice the last process left).
    /// How many times sandbox `id`'s processes were killed for going over its memory limit
    /// (`oom_kill` in its `memory.events`), with that limit in bytes.
    pub fn oom_kills(&self, id: &str) -> Option<(u64, u64)> {
        let path = self.root.join(id);
        let events = std::fs::read_to_string(path.join("memory.events")).ok()?;
        let kills = events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())?;
        let limit = std::fs::read_to_string(path.join("memory.max"))
            .ok()
            .and_then(|m| m.trim().parse().ok())
            .unwrap_or(0);
        Some((kills, limit))
    }

    pub fn remove(&self, id: &str) {
        self.kill(id);
        let path = self.root.join(id);
        for _ in 0..20 {
            match std::fs::remove_dir(&path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
        log::warn!("cannot remove the cgroup {}", path.display());
    }

    /// Removes the cgroups of sandboxes not in `live` (left by a service that died), killing
    /// what still runs in them.
    pub fn remove_stale(&self, live: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || live.contains(&name) {
                continue;
            }
            self.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_state_directory_has_its_own_sandbox_folder() {
        let a = service_folder(Path::new("/var/lib/ember-a"));
        assert_eq!(a, service_folder(Path::new("/var/lib/ember-a")));
        assert_ne!(a, service_folder(Path::new("/var/lib/ember-b")));
        assert!(a.starts_with("service-") && a.len() == "service-".len() + 16);
    }

    use super::*;

    #[test]
    fn a_host_without_cgroup_v2_is_reported_not_fatal() {
        let dir = std::env::temp_dir().join(format!("ember-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Cgroups::detect(&dir, &dir).unwrap_err();
        assert!(err.to_string().contains("no cgroup v2 hierarchy"), "{err}");
        std::fs::write(dir.join("cgroup.controllers"), "cpu io\n").unwrap();
        let err = Cgroups::detect(&dir, &dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("memory controller is not available"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cpu_limit_gets_a_burst_where_the_kernel_has_one() {
        let dir = std::env::temp_dir().join(format!("ember-cg-burst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_cpu_limit(&dir, 200_000).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert!(!dir.join("cpu.max.burst").exists());

        std::fs::write(dir.join("cpu.max.burst"), "0\n").unwrap();
        set_cpu_limit(&dir, 200_000).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("cpu.max.burst"), "200000");
        set_cpu_limit(&dir, 100_000).unwrap();
        assert_eq!(read("cpu.max"), "100000 100000");
        assert_eq!(read("cpu.max.burst"), "100000");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
