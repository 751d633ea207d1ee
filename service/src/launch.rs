//! Starting a sandbox's VMM process (`ember-vmm`): its spec and log in the sandbox's folder,
//! its own process group and cgroup, only the environment a VMM reads. Used for every
//! sandbox the warm pool cannot serve, and by the pool itself to start VMMs ahead of time.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;

use super::sandbox::VMM_DIR;
use super::AppState;
use ember_sandbox::control::WorkerSpec;

/// The environment variables a VMM process gets from the service (logging, and seccomp's
/// modes for tests and diagnosis).
const VMM_ENVIRONMENT: [&str; 4] = [
    "RUST_LOG",
    "RUST_BACKTRACE",
    "EMBER_SECCOMP",
    "EMBER_SECCOMP_DENY",
];

/// Writes `spec` as `dir/spec.json`.
pub fn write_spec(dir: &Path, spec: &WorkerSpec) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?;
    super::access::write_private(&dir.join("spec.json"), &text)
        .map_err(|e| format!("cannot write the spec: {e}"))
}

/// Starts `ember-vmm --spec dir/spec.json` for `spec` (given an `assignment` socket: a
/// warm-pool VMM that waits on it, as its stdin, for its sandbox), logging to `dir/vmm.log`,
/// in a cgroup of its own made for `spec`'s size. Its stdout is a pipe.
pub fn spawn_vmm(
    state: &AppState,
    dir: &Path,
    spec: &WorkerSpec,
    assignment: Option<UnixStream>,
) -> Result<tokio::process::Child, String> {
    let pooled = assignment.is_some();
    write_spec(dir, spec)?;
    let log = super::access::private_file(&dir.join("vmm.log"))
        .map_err(|e| format!("cannot create the VMM log: {e}"))?;
    let cgroup = match &state.cgroups {
        Some(cgroups) => Some(cgroups.create(&spec.sandbox_id, spec.mem_mib, spec.vcpus)?),
        None => None,
    };
    let mut command = tokio::process::Command::new(&state.config.vmm_program);
    command
        .arg("--spec")
        .arg(dir.join("spec.json"))
        .stdin(match assignment {
            Some(socket) => Stdio::from(OwnedFd::from(socket)),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        // Its own process group: a ^C meant for the service does not reach the sandboxes.
        .process_group(0)
        // Nothing of the service's environment but what a VMM reads; its temporary files
        // (stall reports) go to its own folder.
        .env_clear()
        .env("TMPDIR", dir.join(VMM_DIR))
        .envs(std::env::vars_os().filter(|(name, _)| {
            VMM_ENVIRONMENT
                .iter()
                .any(|kept| name.as_os_str() == std::ffi::OsStr::new(kept))
        }));
    if pooled {
        command.arg("--pooled");
    }
    if let Some(cgroup) = &cgroup {
        let procs = cgroup.procs_fd();
        // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
        // are allowed: one write(2) of a static buffer to a descriptor opened before the fork
        // (it stays open until the spawn returns). Writing "0" moves the child itself, so the
        // VMM never runs outside its cgroup.
        unsafe {
            command.pre_exec(move || {
                if libc::write(procs, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let spawned = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", state.config.vmm_program.display()));
    if spawned.is_err() {
        if let Some(cgroups) = &state.cgroups {
            cgroups.remove(&spec.sandbox_id);
        }
    }
    spawned
}
