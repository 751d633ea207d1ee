//! `ember-vmm --spec FILE --jail-probe` (internal): what a VMM can see and do from inside its
//! jail. It enters the spec's jail exactly as the VMM does, then looks around and prints one
//! JSON object; the jail's tests read it.

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct JailProbe {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// `CapEff` of /proc/self/status, hex.
    pub effective_capabilities: String,
    pub hostname: String,
    /// What `/` holds.
    pub root_entries: Vec<String>,
    /// Processes this one can see in /proc.
    pub visible_processes: usize,
    /// Network interfaces (/proc/net/dev).
    pub interfaces: Vec<String>,
    /// Of the paths asked about, those that exist here.
    pub reachable_paths: Vec<PathBuf>,
    /// Of the paths asked about, those this process can change: a file that opens for
    /// writing, a folder a new file can be made in (and is removed from again).
    pub writable_paths: Vec<PathBuf>,
    /// The outcome of connecting to the address asked about.
    pub connect: Option<String>,
    pub environment_variables: usize,
    /// Open file descriptors (besides the one reading /proc/self/fd).
    pub open_fds: Vec<i32>,
    /// Whether /dev/kvm opens for reading and writing (the VMM needs it).
    pub kvm_opens: bool,
}

pub fn run(paths: &[PathBuf], connect: Option<&str>) -> i32 {
    let probe = look_around(paths, connect);
    match serde_json::to_string(&probe) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("ember-vmm: jail probe: {e}");
            1
        }
    }
}

fn look_around(paths: &[PathBuf], connect: Option<&str>) -> JailProbe {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective_capabilities = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let names = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let interfaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    let fds = names("/proc/self/fd");
    JailProbe {
        // SAFETY: these calls take no arguments and cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        pid: std::process::id(),
        effective_capabilities,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        root_entries: names("/"),
        visible_processes: names("/proc")
            .iter()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .count(),
        interfaces,
        reachable_paths: paths
            .iter()
            .filter(|p| Path::new(p).symlink_metadata().is_ok())
            .cloned()
            .collect(),
        writable_paths: paths.iter().filter(|p| writable(p)).cloned().collect(),
        connect: connect.map(|addr| match std::net::TcpStream::connect(addr) {
            Ok(_) => "connected".to_string(),
            Err(e) => e.to_string(),
        }),
        environment_variables: std::env::vars_os().count(),
        // The listing itself held one more descriptor, gone now.
        open_fds: fds
            .iter()
            .filter_map(|n| n.parse().ok())
            .filter(|fd: &i32| {
                // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
                unsafe { libc::fcntl(*fd, libc::F_GETFD) >= 0 }
            })
            .collect(),
        kvm_opens: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
    }
}

/// Whether `path` can be written: a file opened for writing (without truncating or changing
/// it), a folder a file can be created in.
fn writable(path: &Path) -> bool {
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            let probe = path.join(format!(".jail-probe-{}", std::process::id()));
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .is_ok();
            if made {
                let _ = std::fs::remove_file(&probe);
            }
            made
        }
        Ok(_) => std::fs::OpenOptions::new().write(true).open(path).is_ok(),
        Err(_) => false,
    }
}
