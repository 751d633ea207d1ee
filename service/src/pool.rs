//! The warm pool (`ember serve --warm-pool N`): N `ember-vmm --pooled` processes started
//! ahead of time, each already jailed, in its cgroup and its store opened, waiting on stdin
//! for the sandbox it will run. A sandbox takes one instead of starting a process while its
//! request waits; the pool refills in the background.
//!
//! Each pooled VMM is made for a sandbox id chosen when it starts, so its folders, jail
//! mounts and cgroup are that sandbox's from the beginning; what only the request knows
//! (size, origin, limits, network) reaches it as a [`PoolAssignment`] line on a Unix socket,
//! with the TAP queue of a sandbox that has a network attached (opened by the service in the
//! sandbox's namespace; the VMM's jail keeps an empty one of its own), and the cgroup's
//! limits are rewritten to the sandbox's size. One that died while idle is replaced, never
//! assigned; a burst larger than the pool starts processes as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use tokio::process::Child;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::launch::LaunchError;
use super::sandbox::{base_spec, random_id, VMM_DIR};
use super::AppState;
use ember_sandbox::control::{PoolAssignment, WorkerSpec};

/// The marker file in a pooled VMM's sandbox folder until it is given a sandbox: a service
/// that restarts removes such folders (their VMMs end when its pipes close).
pub const POOLED_MARKER: &str = "pooled";

/// A pooled VMM waiting for its sandbox.
pub struct IdleVmm {
    pub id: String,
    pub child: Child,
    /// The service's end of the VMM's stdin, a Unix socket (so a TAP queue can go with the
    /// assignment, and the agent connection can come back).
    stdin: UnixStream,
}

impl IdleVmm {
    /// Gives the VMM its sandbox: the cgroup's limits for `spec`'s size, then the
    /// assignment on its stdin, with the sandbox's TAP queue (opened here, in the sandbox's
    /// network namespace) when it has a network.
    pub async fn assign(
        self,
        state: &AppState,
        spec: &WorkerSpec,
    ) -> Result<(Child, UnixStream), LaunchError> {
        if let Some(cgroups) = &state.cgroups {
            cgroups.set_limits(&self.id, spec.mem_mib, spec.vcpus)?;
        }
        let tap = match &spec.net {
            Some(net) => Some(
                super::network::open_tap_queue(&self.id, &net.tap)
                    .await
                    .map_err(LaunchError::Tap)?,
            ),
            None => None,
        };
        let mut line = serde_json::to_string(&PoolAssignment::of(spec))
            .map_err(|e| LaunchError::Assign(e.into()))?;
        line.push('\n');
        let socket = self.stdin;
        let socket = tokio::task::spawn_blocking(move || {
            send_assignment(&socket, line.as_bytes(), tap).map(|()| socket)
        })
        .await
        .map_err(|e| LaunchError::Assign(std::io::Error::other(e)))?
        .map_err(LaunchError::Assign)?;
        let dir = state.config.state_dir.join("sandboxes").join(&self.id);
        let _ = std::fs::remove_file(dir.join(POOLED_MARKER));
        Ok((self.child, socket))
    }
}

/// Writes `line` to a pooled VMM's stdin socket, `tap` attached to its first bytes.
fn send_assignment(socket: &UnixStream, line: &[u8], tap: Option<OwnedFd>) -> std::io::Result<()> {
    let sent = match &tap {
        Some(fd) => socket
            .send_with_fd(line, fd.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
        None => 0,
    };
    // The descriptor is the VMM's now (or lost with it); the service's copy closes here.
    drop(tap);
    let mut socket = socket;
    socket.write_all(&line[sent..])
}

/// The pool and its counters (`/metrics`).
pub struct WarmPool {
    target: usize,
    idle: Mutex<VecDeque<IdleVmm>>,
    refill: tokio::sync::Notify,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Pooled VMMs found dead while idle (and replaced).
    pub died_idle: AtomicU64,
}

impl WarmPool {
    pub fn new(target: usize) -> WarmPool {
        WarmPool {
            target,
            idle: Mutex::new(VecDeque::new()),
            refill: tokio::sync::Notify::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            died_idle: AtomicU64::new(0),
        }
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// The pids of the idle VMMs.
    pub fn idle_pids(&self) -> Vec<u32> {
        self.lock().iter().filter_map(|v| v.child.id()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<IdleVmm>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle VMM that is still alive, if there is one (counted as a hit or a miss); the
    /// pool refills behind it.
    pub fn take(&self, state: &AppState) -> Option<IdleVmm> {
        let taken = loop {
            let Some(mut vmm) = self.lock().pop_front() else {
                break None;
            };
            match vmm.child.try_wait() {
                Ok(None) => break Some(vmm),
                _ => {
                    self.died_idle.fetch_add(1, Ordering::Relaxed);
                    log::warn!("pooled VMM {} ended while idle; replacing it", vmm.id);
                    discard(state, &vmm.id);
                }
            }
        };
        let counter = if taken.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.refill.notify_one();
        taken
    }

    /// Keeps `target` VMMs idle until the service stops.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>) {
        loop {
            while self.lock().len() < self.target {
                match start_pooled(&state) {
                    Ok(vmm) => self.lock().push_back(vmm),
                    Err(e) => {
                        log::warn!("warm pool: cannot start a VMM: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                }
            }
            self.refill.notified().await;
        }
    }
}

/// Starts a pooled VMM for a fresh sandbox id, with a network-less sandbox's folders and
/// jail.
fn start_pooled(state: &AppState) -> Result<IdleVmm, LaunchError> {
    let id = random_id("sb");
    let dir = state.config.state_dir.join("sandboxes").join(&id);
    let run = state.config.state_dir.join("run").join(&id);
    let made = (|| {
        let file_error = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| LaunchError::File { path, source }
        };
        super::access::private_dir(&dir).map_err(file_error(&dir))?;
        for d in [dir.join(VMM_DIR), run.clone()] {
            std::fs::create_dir_all(&d).map_err(file_error(&d))?;
        }
        let marker = dir.join(POOLED_MARKER);
        std::fs::write(&marker, b"").map_err(file_error(&marker))?;
        // The sandbox's own paths; its size and origin come with the assignment.
        let mut spec = base_spec(state, &id);
        if let Some(ids) = state.config.jail {
            spec.jail = Some(
                ids.prepare(&spec, &dir, &dir.join(VMM_DIR), &run)
                    .map_err(LaunchError::Jail)?,
            );
        }
        let (child, stdin) = super::launch::spawn_vmm(state, &dir, &spec, true)?;
        Ok(IdleVmm {
            id: id.clone(),
            child,
            stdin,
        })
    })();
    if made.is_err() {
        discard(state, &id);
    }
    made
}

/// Removes what a pooled VMM that will never run a sandbox left: its folders and cgroup.
pub fn discard(state: &AppState, id: &str) {
    let _ = std::fs::remove_dir_all(state.config.state_dir.join("sandboxes").join(id));
    let _ = std::fs::remove_dir_all(state.config.state_dir.join("run").join(id));
    if let Some(cgroups) = &state.cgroups {
        let _ = std::fs::write(cgroups.root().join(id).join("cgroup.kill"), "1");
        cgroups.remove(id);
    }
}
