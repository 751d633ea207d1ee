//! Starting a sandbox: its folder, network, cgroup and VMM process, and the wait for its
//! guest's agent.

use super::*;

/// What a new sandbox is made from.
pub struct NewSandbox {
    pub origin: WorkerOrigin,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub disk_rate_limit: ember_vmm::RateLimit,
    pub net_rate_limits: ember_vmm::NetRateLimits,
    pub network: NetworkMode,
    /// Restored from a snapshot whose guest has a network device (which then needs a TAP
    /// whatever the mode).
    pub restored_nic: bool,
    /// Guest ports to expose on the host.
    pub ports: Vec<u16>,
    /// Restored from a snapshot being fetched from the remote tier.
    pub partial: Option<Arc<ember_remote::LazySnapshot>>,
    /// Its runtime's image (a restore's: the one its snapshot ran over).
    pub image: crate::runtimes::Image,
    /// What its timeout and idleness do.
    pub lifecycle: crate::lifecycle::Lifecycle,
    /// The id of the sandbox this one continues (a resume from the snapshot its
    /// `on_timeout` saved): it takes that id, folder and record.
    pub continues: Option<String>,
}

/// The subfolder of a sandbox's folder that belongs to its VMM (overlay, stall reports).
pub const VMM_DIR: &str = "vmm";

/// 429 `too_many_sandboxes` unless `more` sandboxes fit beside the live ones in `sandboxes`
/// (the service's map, locked by the caller).
pub fn check_room(
    state: &AppState,
    sandboxes: &HashMap<String, Arc<Sandbox>>,
    more: usize,
) -> Result<(), ApiError> {
    let live = sandboxes.values().filter(|s| s.state().is_live()).count();
    if live + more > state.config.max_sandboxes {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_sandboxes",
            format!(
                "{live} sandboxes are running and {more} more were asked for; this service \
                 allows {}",
                state.config.max_sandboxes
            ),
        ));
    }
    Ok(())
}

/// Starts a VMM process for a new sandbox and waits until its agent answers.
pub async fn create(state: &Arc<AppState>, new: NewSandbox) -> Result<Arc<Sandbox>, ApiError> {
    let begun = std::time::Instant::now();
    let ms = move || begun.elapsed().as_secs_f64() * 1e3;
    let wants_namespace = new.restored_nic || matches!(new.network, NetworkMode::Egress { .. });
    if wants_namespace && state.config.jail.is_none() {
        return Err(ApiError::bad_request(
            "sandbox networks need the service to run as root (it makes network namespaces, \
             TAPs and nftables rules); this one is not",
        ));
    }
    // Checked again where the sandbox is counted: this early answer spares the work between.
    check_room(
        state,
        &state.sandboxes.lock().unwrap_or_else(|p| p.into_inner()),
        1,
    )?;
    // A warm-pool VMM made ahead of time becomes this sandbox (its id, folders, jail and
    // cgroup included; a network's TAP queue goes to it with the assignment).
    // (Not for a snapshot being fetched from the remote: a pooled VMM's stdin carries its
    // assignment, not a page channel.)
    // (Nor for another runtime than `base`: a pooled VMM's jail holds the base image.)
    let pooled = match new.partial {
        None if new.continues.is_none() && new.image.rootfs == state.config.rootfs => {
            state.pool.as_ref().and_then(|pool| pool.take(state))
        }
        _ => None,
    };
    let id = match (&new.continues, &pooled) {
        (Some(id), _) => id.clone(),
        (None, Some(vmm)) => vmm.id.clone(),
        (None, None) => random_id("sb"),
    };
    let dir = state.config.state_dir.join("sandboxes").join(&id);
    if new.continues.is_some() {
        // What the stopped VMM left (its overlay, sockets) is not this one's.
        let _ = std::fs::remove_dir_all(dir.join(VMM_DIR));
        let _ = std::fs::remove_dir_all(state.config.state_dir.join("run").join(&id));
    }
    crate::access::private_dir(&dir)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
    std::fs::create_dir_all(dir.join(VMM_DIR)).map_err(|e| {
        ApiError::internal(format!(
            "cannot create {}: {e}",
            dir.join(VMM_DIR).display()
        ))
    })?;
    // Its sockets get a folder of their own: a jailed VMM sees that folder, not the others'.
    let run = state.config.state_dir.join("run").join(&id);
    std::fs::create_dir_all(&run)
        .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", run.display())))?;
    let mut spec = WorkerSpec {
        vcpus: new.vcpus,
        mem_mib: new.mem_mib,
        origin: new.origin.clone(),
        disk_rate_limit: new.disk_rate_limit,
        net_rate_limits: new.net_rate_limits,
        // A restored guest keeps the MAC it was saved with; this one is for booted guests.
        net: wants_namespace.then(|| network::worker_net(ember_sandbox::defaults::random_mac())),
        rootfs: new.image.rootfs.clone(),
        ..base_spec(state, &id)
    };
    if let Some(ids) = state.config.jail {
        let mut jail = ids
            .prepare(&spec, &dir, &dir.join(VMM_DIR), &run)
            .map_err(|e| ApiError::internal(format!("cannot prepare the jail: {e}")))?;
        if pooled.is_some() {
            // The pooled VMM's jail, made before this sandbox: a network namespace of its
            // own, the sandbox's TAP queue handed over instead.
            jail.netns = None;
        }
        spec.jail = Some(jail);
    }
    let record = SandboxRecord {
        id: id.clone(),
        created_unix_ms: unix_ms(),
        spec: spec.clone(),
        env: new.env,
        state: SandboxState::Starting,
        failure: None,
        pid: None,
        deadline_unix_ms: unix_ms() + new.timeout.as_millis() as u64,
        ready_ms: None,
        last_snapshot: None,
        net: None,
        ports: Vec::new(),
        timeline: crate::timeline::StartTimeline::accepted(ms()),
        memory: None,
        ended_unix_ms: None,
        remote_fetch: None,
        runtime: Some(new.image.info.clone()),
        lifecycle: new.lifecycle.clone(),
    };
    let sandbox = {
        let mut sandboxes = state.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        // Chosen and taken under one lock. Slots of sandboxes not deleted yet stay taken:
        // their namespaces exist.
        let used: std::collections::HashSet<u32> = sandboxes
            .values()
            .filter_map(|s| s.record().net.and_then(|n| n.slot))
            .collect();
        let egress = matches!(new.network, NetworkMode::Egress { .. });
        let slot = egress.then(|| network::free_slot(&used)).flatten();
        // Counted and inserted under one lock, or concurrent creates all pass the check.
        let refused = check_room(state, &sandboxes, 1).err().or_else(|| {
            (egress && slot.is_none()).then(|| {
                ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "too_many_sandboxes",
                    format!(
                        "all {} sandbox network links are in use",
                        network::MAX_SLOTS
                    ),
                )
            })
        });
        if let Some(e) = refused {
            drop(sandboxes);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&run);
            return Err(e);
        }
        let mut record = record;
        record.net = wants_namespace.then(|| SandboxNet {
            mode: new.network.clone(),
            slot,
        });
        let sandbox = Arc::new(Sandbox::new(dir.clone(), record));
        sandboxes.insert(id.clone(), sandbox.clone());
        sandbox
    };
    sandbox.update(|_| {});
    if let (Some(net), Some(ids)) = (sandbox.record().net, state.config.jail) {
        let sandbox_id = id.clone();
        let made = tokio::task::spawn_blocking(move || {
            network::create(&sandbox_id, &net.mode, net.slot, (ids.uid, ids.gid))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|made| made.map_err(|e| e.to_string()));
        // Its name server answers before the guest's first question.
        let made = match made {
            Ok(()) => sandbox
                .start_resolver(state, false)
                .await
                .map_err(|e| format!("its name server: {e}")),
            Err(why) => Err(why),
        };
        if let Err(why) = made {
            let why = format!("cannot make its network: {why}");
            sandbox.fail(why.clone());
            return Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                format!("sandbox {id} did not start: {why}"),
            ));
        }
    }

    log::debug!(
        "sandbox {id}: folders, jail and network prepared in {:.1} ms",
        ms()
    );
    let started = match start_vmm(state, &sandbox, &spec, pooled, new.partial.clone()).await {
        Ok(ready_ms) => sandbox
            .open_ports(&new.ports)
            .await
            .map(|()| ready_ms)
            .map_err(StartError::from),
        Err(why) => Err(why),
    };
    match started {
        Ok(ready_ms) => {
            let restored = matches!(new.origin, WorkerOrigin::Restore { .. });
            if let WorkerOrigin::Restore { snapshot, .. } = &new.origin {
                // The agent connection (with the clock and entropy resync ahead of the first
                // request) is made now, off the path of the request that comes next (made
                // while the VMM restores, beside the VMM's own probe, it slows both).
                let early = sandbox.clone();
                tokio::spawn(async move {
                    let _ = early.agent().await;
                });
                // A snapshot not materialised yet (saved before the cache, or evicted) is,
                // after this restore, for the next ones; one still arriving from the remote
                // once the rest of it is here, which comes in the background from now on
                // (by the same window downloads the guest's faults use).
                match (&new.partial, &state.remote) {
                    (Some(lazy), Some(tier)) => {
                        let fetched = lazy.report();
                        sandbox.update(|r| {
                            r.remote_fetch = Some(super::RemoteFetch {
                                bytes_before_start: lazy.prepared().bytes_fetched,
                                bytes_before_ready: fetched.bytes_fetched,
                                requests_before_ready: fetched.requests,
                            })
                        });
                        let (state, snapshot) = (state.clone(), snapshot.clone());
                        tier.complete_later(state.store.clone(), lazy.clone(), move |bytes| {
                            state
                                .mem_cache
                                .materialise_later(state.store.clone(), snapshot.clone());
                            tokio::spawn(async move {
                                crate::remote_cache::record_fetched(&state, &snapshot, bytes).await
                            });
                        });
                    }
                    _ => state
                        .mem_cache
                        .materialise_later(state.store.clone(), snapshot.clone()),
                }
            }
            state.metrics.record_start(restored, ready_ms);
            log::info!(
                "sandbox {id} ready in {ready_ms:.1} ms ({}; {:.1} ms since the request)",
                if restored { "restored" } else { "booted" },
                ms()
            );
            Ok(sandbox)
        }
        Err(why) => {
            state.metrics.record_start_failure();
            sandbox.fail(why.to_string());
            if let Some(process) = sandbox.process() {
                let _ = process.signal(libc::SIGKILL);
            }
            Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                format!("sandbox {id} did not start: {why}"),
            ))
        }
    }
}

/// The spec of sandbox `id`'s VMM with what does not depend on the request: the service's
/// kernel, rootfs, store and memory cache, the sandbox's own folders; one vCPU, 256 MiB,
/// a boot, no limits and no network until the caller says otherwise.
pub fn base_spec(state: &AppState, id: &str) -> WorkerSpec {
    let dir = state.config.state_dir.join("sandboxes").join(id);
    // Its sockets get a folder of their own: a jailed VMM sees that folder, not the others'.
    let run = state.config.state_dir.join("run").join(id);
    WorkerSpec {
        sandbox_id: id.to_string(),
        kernel: state.config.kernel.clone(),
        rootfs: state.config.rootfs.clone(),
        vcpus: 1,
        mem_mib: 256,
        origin: WorkerOrigin::Boot,
        store_dir: state.config.store_dir.clone(),
        vsock_socket: run.join("vsock"),
        control_socket: run.join("ctl"),
        // The only part of the sandbox's folder its VMM writes (and, jailed, sees): the
        // record and spec stay the service's.
        overlay: dir.join(VMM_DIR).join("rootfs.overlay"),
        disk_rate_limit: Default::default(),
        net_rate_limits: Default::default(),
        jail: None,
        net: None,
        mem_cache: Some(state.mem_cache.cache.dir().to_path_buf()),
        staging_dir: Some(dir.join(VMM_DIR).join("staging")),
    }
}

/// Why a sandbox did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    #[error("cannot hand the VMM its page channel: {0}")]
    PageChannel(#[source] std::io::Error),
    #[error("the VMM process has no stdout")]
    NoStdout,
    /// The VMM process ended: how, and the end of its log.
    #[error("{reason}")]
    Ended { reason: String },
    #[error("its agent did not answer within {0:?}")]
    NotReady(Duration),
    /// The sandbox was stopped or failed while it started (by a request or its VMM).
    #[error("{reason}")]
    Stopped { reason: String },
    #[error("cannot expose its ports: {0}")]
    Ports(#[from] ports::PortError),
}

/// Starts the sandbox's VMM (or hands `pooled` its assignment) and waits until its agent
/// answers.
async fn start_vmm(
    state: &Arc<AppState>,
    sandbox: &Arc<Sandbox>,
    spec: &WorkerSpec,
    pooled: Option<crate::pool::IdleVmm>,
    partial: Option<Arc<ember_remote::LazySnapshot>>,
) -> Result<f64, StartError> {
    let ((mut child, stdin), step) = match pooled {
        Some(vmm) => {
            // The record keeps the spec the VMM now runs.
            crate::launch::write_spec(&sandbox.dir, spec)?;
            (vmm.assign(state, spec).await?, "vmm_assigned")
        }
        None => (
            crate::launch::spawn_vmm(state, &sandbox.dir, spec, false)?,
            "vmm_spawned",
        ),
    };
    let pid = child.id().unwrap_or(0);
    // Not reaped before the watcher below waits for it: the pidfd names this process.
    sandbox.hold_process(pid);
    sandbox.update(|r| {
        r.pid = Some(pid);
        r.timeline.mark(step);
    });
    // After the process is held: on failure the caller kills it.
    if let Some(lazy) = partial {
        crate::remote::RemoteTier::serve_pages(state.store.clone(), lazy, &stdin, &sandbox.id)
            .map_err(StartError::PageChannel)?;
    }
    let stdout = child.stdout.take().ok_or(StartError::NoStdout)?;

    // Whatever happens next, the watcher reports the VMM's end.
    let (exited_tx, mut exited_rx) = tokio::sync::oneshot::channel::<String>();
    {
        let sandbox = sandbox.clone();
        let cgroups = state.cgroups.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let mut oom = None;
            if let Some(cgroups) = cgroups {
                let id = sandbox.id.clone();
                oom = tokio::task::spawn_blocking(move || {
                    let oom = cgroups.oom_kills(&id);
                    cgroups.remove(&id);
                    oom
                })
                .await
                .ok()
                .flatten();
            }
            let mut code = match &status {
                Ok(s) => describe_vmm_exit(*s),
                Err(e) => e.to_string(),
            };
            if let Some((kills, limit)) = oom.filter(|(kills, _)| *kills > 0) {
                code.push_str(&format!(
                    "; its cgroup's memory limit of {} MiB was hit ({kills} OOM kill(s))",
                    limit >> 20
                ));
            }
            let why = format!(
                "the VMM process (pid {pid}) ended ({code}): {}",
                log_tail(&sandbox.dir)
            );
            sandbox.fail(why.clone());
            sandbox.forget_agent().await;
            // A sandbox whose VMM has ended never runs again: its record stays (to say why)
            // until it is deleted, but its network and exposed ports go now.
            sandbox.close_ports();
            if sandbox.record().net.is_some() {
                let id = sandbox.id.clone();
                let _ = tokio::task::spawn_blocking(move || network::remove(&id)).await;
            }
            let _ = exited_tx.send(why);
        });
    }

    // A VMM's lines are bounded: a compromised VMM cannot grow the service's memory with
    // one endless line (an over-long line is dropped up to its end).
    let mut lines = FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_CONTROL_LINE));
    let ready = async {
        loop {
            tokio::select! {
                line = lines.next() => match line {
                    Some(Ok(line)) => {
                        if let Ok(WorkerEvent::Ready { ready_ms, started_unix_ms, timeline, memory, agent, .. }) =
                            serde_json::from_str(&line)
                        {
                            sandbox.update(|r| {
                                r.timeline.add_vmm(started_unix_ms, &timeline);
                                r.memory = memory;
                            });
                            return Ok((ready_ms, agent));
                        }
                        log::debug!("sandbox {}: VMM says {line}", sandbox.id);
                    }
                    Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                        log::warn!(
                            "sandbox {}: dropped a VMM line over {MAX_CONTROL_LINE} bytes",
                            sandbox.id
                        );
                    }
                    None | Some(Err(LinesCodecError::Io(_))) => {
                        // The process is ending: the watcher has the reason.
                        let reason = (&mut exited_rx).await.unwrap_or_else(|_| "the VMM ended".into());
                        return Err(StartError::Ended { reason });
                    }
                },
                why = &mut exited_rx => {
                    let reason = why.unwrap_or_else(|_| "the VMM ended".into());
                    return Err(StartError::Ended { reason });
                }
            }
        }
    };
    let (ready_ms, agent) = tokio::time::timeout(READY_TIMEOUT, ready)
        .await
        .map_err(|_| StartError::NotReady(READY_TIMEOUT))??;
    let passed = match agent {
        Some(info) => sandbox.adopt_agent(stdin, info).await,
        None => false,
    };
    state.metrics.record_agent_connection(passed);
    // Keep reading (and dropping) the VMM's stdout so it never blocks on a full pipe.
    tokio::spawn(async move {
        while let Some(line) = lines.next().await {
            if let Err(LinesCodecError::Io(_)) = line {
                break;
            }
        }
    });
    sandbox.update(|r| {
        if r.state == SandboxState::Starting {
            r.state = SandboxState::Running;
        }
        r.ready_ms = Some(ready_ms);
    });
    if sandbox.state() != SandboxState::Running {
        let reason = sandbox
            .record()
            .failure
            .unwrap_or_else(|| "the sandbox stopped while starting".into());
        return Err(StartError::Stopped { reason });
    }
    Ok(ready_ms)
}
