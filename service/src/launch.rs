//! Starting a sandbox's VMM process (`ember-vmm`): its spec and log in the sandbox's folder,
//! its own process group and cgroup, only the environment a VMM reads. Used for every
//! sandbox the warm pool cannot serve, and by the pool itself to start VMMs ahead of time.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::cgroup::CgroupError;
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

/// What failed starting a VMM process, or preparing or assigning a pooled one.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot write the spec {}: {source}", path.display())]
    Spec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the jail: {0}")]
    Jail(#[source] std::io::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the pooled VMM's stdin socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot open the sandbox's TAP: {0}")]
    Tap(#[source] super::network::NetworkError),
    #[error("cannot hand the pooled VMM its sandbox: {0}")]
    Assign(#[source] std::io::Error),
}

/// Writes `spec` as `dir/spec.json`.
pub fn write_spec(dir: &Path, spec: &WorkerSpec) -> Result<(), LaunchError> {
    let path = dir.join("spec.json");
    let text = serde_json::to_vec_pretty(spec).map_err(|e| LaunchError::Spec {
        path: path.clone(),
        source: e.into(),
    })?;
    super::access::write_private(&path, &text).map_err(|source| LaunchError::Spec { path, source })
}

/// Starts `ember-vmm --spec dir/spec.json` for `spec` (`pooled`: a warm-pool VMM that waits
/// on its stdin for its sandbox), logging to `dir/vmm.log`, in a cgroup of its own made for
/// `spec`'s size. Its stdout is a pipe; its stdin a Unix socket, whose other end is returned:
/// a pooled VMM's assignment goes down it, and the VMM's first agent connection comes back
/// up it (see [`receive_agent_connection`]).
pub fn spawn_vmm(
    state: &AppState,
    dir: &Path,
    spec: &WorkerSpec,
    pooled: bool,
) -> Result<(tokio::process::Child, UnixStream), LaunchError> {
    let (service_end, vmm_end) = UnixStream::pair().map_err(LaunchError::Socket)?;
    write_spec(dir, spec)?;
    let log_path = dir.join("vmm.log");
    let log = super::access::private_file(&log_path).map_err(|source| LaunchError::File {
        path: log_path,
        source,
    })?;
    let cgroup = match &state.cgroups {
        Some(cgroups) => Some(cgroups.create(&spec.sandbox_id, spec.mem_mib, spec.vcpus)?),
        None => None,
    };
    let mut command = tokio::process::Command::new(&state.config.vmm_program);
    command
        .arg("--spec")
        .arg(dir.join("spec.json"))
        .stdin(Stdio::from(OwnedFd::from(vmm_end)))
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
    let spawned = command.spawn().map_err(|source| LaunchError::Spawn {
        program: state.config.vmm_program.clone(),
        source,
    });
    if spawned.is_err() {
        if let Some(cgroups) = &state.cgroups {
            cgroups.remove(&spec.sandbox_id);
        }
    }
    spawned.map(|child| (child, service_end))
}

/// How long the service waits for an agent connection its VMM said it passed.
const AGENT_CONNECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Receives the agent connection a VMM passed on `stdin` (its stdin's other end) after it
/// said so in its ready line: a connected Unix stream socket, checked to be one (a VMM is not
/// trusted to send what it says). `None`, with the reason logged, when none came; the
/// service then connects itself.
pub fn receive_agent_connection(stdin: &UnixStream, id: &str) -> Option<UnixStream> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let received = stdin
        .set_read_timeout(Some(AGENT_CONNECTION_WAIT))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let mut byte = [0u8; 1];
            stdin.recv_with_fd(&mut byte[..]).map_err(|e| e.to_string())
        });
    let fd = match received {
        Ok((1, Some(file))) => OwnedFd::from(file),
        Ok((_, _)) => {
            log::warn!("sandbox {id}: the VMM said it passed its agent connection but sent none");
            return None;
        }
        Err(e) => {
            log::warn!("sandbox {id}: receiving the VMM's agent connection: {e}");
            return None;
        }
    };
    match is_unix_stream_socket(&fd) {
        true => Some(UnixStream::from(fd)),
        false => {
            log::warn!("sandbox {id}: the VMM passed something other than a Unix stream socket");
            None
        }
    }
}

fn is_unix_stream_socket(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let option = |name: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes into `value`, an int it owns.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}
