//! What a soak looks for once its cycles are done: anything the service left behind.

use std::path::Path;

/// Mounts in this mount namespace, but `/run/netns` itself: `ip netns add` makes that folder a
/// (shared) mount point the first time and leaves it, one per host, not one per sandbox (a
/// namespace left behind is its own mount below it, and is counted).
pub(super) fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo").map_or(0, |m| counted_mounts(&m))
}

pub(super) fn counted_mounts(mountinfo: &str) -> usize {
    mountinfo
        .lines()
        .filter(|line| line.split(' ').nth(4) != Some("/run/netns"))
        .count()
}

/// What the cycles left: VMM processes of this service, sandbox records, sockets and
/// overlays in its state directory, cgroups of its sandboxes.
pub(super) fn leftovers(state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let spec_prefix = state_dir.join("sandboxes");
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.get(1).map(String::as_str) == Some("vmm")
                && args.iter().any(|a| Path::new(a).starts_with(&spec_prefix))
            {
                found.push(format!(
                    "VMM process {} still runs",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    for (dir, what) in [
        (state_dir.join("sandboxes"), "sandbox folder"),
        (state_dir.join("run"), "socket"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                found.push(format!("{what} {} remains", entry.path().display()));
            }
        }
    }
    let cgroups = Path::new("/sys/fs/cgroup/ember-sandboxes")
        .join(ember_service::cgroup::service_folder(state_dir));
    if let Ok(entries) = std::fs::read_dir(&cgroups) {
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            found.push(format!("cgroup {} remains", entry.path().display()));
        }
    }
    found.extend(temporary_files(&state_dir.join("store")));
    found
}

/// The store's temporary files (`.NAME….tmp…`, written before a rename) under `dir`.
pub(super) fn temporary_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            found.extend(temporary_files(&path));
        } else if name.starts_with('.') && name.contains(".tmp") {
            found.push(format!("temporary file {} remains", path.display()));
        }
    }
    found
}
