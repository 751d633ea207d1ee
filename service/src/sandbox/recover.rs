//! Sandboxes a previous run of the service left, and the ones whose time is up.

use super::*;

/// Loads the sandboxes a previous run of the service left: those whose VMM still answers
/// are adopted, the others are reported as failed.
pub async fn recover(state: &Arc<AppState>) {
    let root = state.config.state_dir.join("sandboxes");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.join(crate::pool::POOLED_MARKER).exists() {
            // A warm-pool VMM of an earlier run that never got a sandbox: it ended with that
            // run's pipes.
            let id = entry.file_name().to_string_lossy().into_owned();
            crate::pool::discard(state, &id);
            continue;
        }
        let record: SandboxRecord = match std::fs::read(dir.join("sandbox.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("ignoring {}: {e}", dir.display());
                continue;
            }
        };
        let sandbox = Arc::new(Sandbox::new(dir, record.clone()));
        if record.state.is_live() {
            let process = record.pid.and_then(|pid| sandbox.hold_process(pid));
            let alive = process.as_ref().is_some_and(|p| p.is_alive());
            let answer = if alive {
                sandbox
                    .control(ControlRequest::Status, Duration::from_secs(5))
                    .await
                    .ok()
            } else {
                None
            };
            match answer {
                Some(reply) if reply.ok => {
                    let paused = reply.state.as_deref() == Some("paused");
                    sandbox.update(|r| {
                        r.state = if paused {
                            SandboxState::Paused
                        } else {
                            SandboxState::Running
                        }
                    });
                    log::info!("adopted sandbox {} (pid {:?})", record.id, record.pid);
                    if let Err(e) = sandbox.open_ports(&[]).await {
                        log::warn!("sandbox {}: {e}", record.id);
                    }
                    if let Err(e) = sandbox.start_resolver(state, true).await {
                        log::warn!("sandbox {}: its name server: {e}", record.id);
                    }
                    if let Some(process) = process {
                        watch_adopted(sandbox.clone(), process, state.cgroups.clone());
                    }
                }
                _ => sandbox.fail(format!(
                    "its VMM process (pid {}) was gone when the service started: {}",
                    record.pid.map(|p| p.to_string()).unwrap_or("-".into()),
                    log_tail(&sandbox.dir)
                )),
            }
        }
        state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id.clone(), sandbox);
    }
    // Cgroups of sandboxes that are not live any more (their VMM died with a service that
    // was not there to clean up).
    if let Some(cgroups) = &state.cgroups {
        let live: Vec<String> = state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.state().is_live())
            .map(|s| s.id.clone())
            .collect();
        cgroups.remove_stale(&live);
    }
}

/// An adopted VMM is not this process's child: poll whether it lives.
fn watch_adopted(
    sandbox: Arc<Sandbox>,
    process: Arc<Process>,
    cgroups: Option<crate::cgroup::Cgroups>,
) {
    let pid = process.pid();
    tokio::spawn(async move {
        while process.is_alive() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(cgroups) = cgroups {
            let id = sandbox.id.clone();
            let _ = tokio::task::spawn_blocking(move || cgroups.remove(&id)).await;
        }
        // As for a VMM this service started: its ports and network go with it.
        sandbox.close_ports();
        if sandbox.record().net.is_some() {
            let id = sandbox.id.clone();
            let _ = tokio::task::spawn_blocking(move || network::remove(&id)).await;
        }
        sandbox.fail(format!(
            "the VMM process (pid {pid}) ended: {}",
            log_tail(&sandbox.dir)
        ));
        sandbox.forget_agent().await;
    });
}

/// Stops sandboxes whose time is up; runs for the life of the service.
pub async fn reap_expired(state: Arc<AppState>) {
    let acting: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = unix_ms();
        let due: Vec<(Arc<Sandbox>, &'static str)> = state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| {
                !acting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&s.id)
            })
            .filter_map(|s| crate::lifecycle::due(s, now).map(|why| (s.clone(), why)))
            .collect();
        remove_ended(&state, now);
        for (sandbox, reason) in due {
            // One action per sandbox at a time (a snapshot can outlast this loop's period).
            acting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sandbox.id.clone());
            let state = state.clone();
            let acting = acting.clone();
            tokio::spawn(async move {
                let id = sandbox.id.clone();
                crate::lifecycle::act(state, sandbox, reason).await;
                acting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            });
        }
    }
}

/// Deletes the stopped and failed sandboxes that ended more than the retention period ago:
/// their records, logs and disks (their snapshots stay).
pub(crate) fn remove_ended(state: &AppState, now: u64) {
    let retention = state.config.retention.as_millis() as u64;
    let ended: Vec<Arc<Sandbox>> = {
        let mut sandboxes = state.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = sandboxes
            .values()
            .filter(|s| {
                let r = s.record();
                !r.state.is_live()
                    && r.ended_unix_ms
                        .is_some_and(|ended| now.saturating_sub(ended) >= retention)
            })
            .map(|s| s.id.clone())
            .collect();
        ids.iter().filter_map(|id| sandboxes.remove(id)).collect()
    };
    for sandbox in ended {
        log::info!(
            "sandbox {}: deleted {:?} after it ended (--retention-s)",
            sandbox.id,
            state.config.retention
        );
        sandbox.remove_from_disk();
    }
}
