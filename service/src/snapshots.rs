//! Snapshots through the API: save a sandbox, list and delete snapshots, fork N sandboxes
//! from one.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ember_client::responses::{SandboxList, SnapshotList, SnapshotTaken};
use ember_client::types::{ErrorDocument, ForkBody, SnapshotBody, SnapshotInfo};
use ember_snapshot_store::{Manifest, ManifestError, StoreError};

use super::error::ApiError;
use super::sandbox::{self, NewSandbox, SandboxState};
use super::{check_env_map, check_timeout, control, parse_body, AppState, JsonBody};
use ember_remote::LazySnapshot;
use ember_sandbox::control::{ControlRequest, PartialOrigin, WorkerOrigin};
use ember_vmm::RestoreMode;

pub(crate) const MAX_FORK: u32 = 16;

/// Refuses an egress network for a snapshot whose guest has no network device.
pub fn check_network(
    snapshot: &str,
    had_network: bool,
    network: Option<&super::network::NetworkMode>,
) -> Result<(), ApiError> {
    if !had_network && matches!(network, Some(super::network::NetworkMode::Egress { .. })) {
        return Err(ApiError::conflict(format!(
            "snapshot {snapshot} is of a sandbox without a network device; restore it with \
             network mode `none`"
        )));
    }
    Ok(())
}

fn store_error(id: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::Manifest(ManifestError::NotFound { .. }) => ApiError::not_found("snapshot", id),
        e => ApiError::internal(format!("snapshot {id}: {e}")),
    }
}

async fn load_manifest(state: &Arc<AppState>, id: &str) -> Result<Manifest, ApiError> {
    if !sandbox::valid_id(id) {
        return Err(ApiError::not_found("snapshot", id));
    }
    let store = state.store.clone();
    let owned = id.to_string();
    tokio::task::spawn_blocking(move || store.load_manifest(&owned))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| store_error(id, e))
}

/// Snapshot `id`'s manifest from this host's store. A snapshot only in the remote tier is
/// fetched whole first for a `file` or `eager` restore; for the others only what the VMM
/// reads before the guest runs and the working set are, and the rest is served while the
/// guest runs (the returned [`LazySnapshot`]).
async fn load_or_prepare(
    state: &Arc<AppState>,
    id: &str,
    mode: RestoreMode,
) -> Result<(Manifest, Option<Arc<LazySnapshot>>), ApiError> {
    match (load_manifest(state, id).await, &state.remote) {
        (Err(e), Some(tier)) if e.status == StatusCode::NOT_FOUND => {
            if matches!(mode, RestoreMode::File | RestoreMode::Eager) {
                let bytes = tier.fetch(state.store.clone(), id).await?;
                crate::remote_cache::record_fetched(state, id, bytes).await;
                return Ok((load_manifest(state, id).await?, None));
            }
            let lazy = tier.prepare_lazy(state.store.clone(), id).await?;
            Ok((lazy.manifest(), Some(lazy)))
        }
        (result, tier) => {
            if let (Ok(_), Some(tier)) = (&result, tier) {
                tier.cache.touch(id);
            }
            result.map(|manifest| (manifest, None))
        }
    }
}

/// The snapshot as the API shows it, with whether its memory is materialised for `file`
/// restores and, with a remote tier, where it is.
async fn describe(state: &Arc<AppState>, id: &str) -> Result<SnapshotInfo, ApiError> {
    let info = match (load_manifest(state, id).await, &state.remote) {
        (Ok(manifest), tier) => {
            let mut info = snapshot_info(&manifest);
            info.memory_materialised = Some(state.mem_cache.cache.contains(&manifest.memory));
            if let Some(tier) = tier {
                let placement = tier.placement(id).await;
                info.remote = Some(placement.name().to_string());
                info.local = Some(true);
                if let super::remote::Placement::PushFailed(why) = placement {
                    info.remote_error = Some(why);
                }
            }
            info
        }
        (Err(e), Some(tier)) if e.status == StatusCode::NOT_FOUND => {
            // Only in the remote: shown from its manifest there.
            let remote = tier.remote.clone();
            let owned = id.to_string();
            let manifest = tokio::task::spawn_blocking(move || remote.manifest(&owned))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(super::remote::api_error)?;
            let mut info = snapshot_info(&manifest);
            info.memory_materialised = Some(false);
            info.remote = Some(super::remote::Placement::Remote.name().to_string());
            info.local = Some(false);
            info
        }
        (Err(e), _) => return Err(e),
    };
    Ok(info)
}

/// A snapshot as the API and `ember snapshots` show it.
pub fn snapshot_info(m: &Manifest) -> SnapshotInfo {
    SnapshotInfo {
        id: m.id.clone(),
        name: m.name.clone(),
        created: format_utc(m.created_unix_ms),
        created_unix_ms: m.created_unix_ms,
        memory_bytes: m.memory.size_bytes,
        memory_mib: m.memory.size_bytes as f64 / f64::from(1u32 << 20),
        vcpus: m.metadata.get("vcpus").and_then(|v| v.parse().ok()),
        parent: m.parent.clone(),
        disks: m.disks.len(),
        network: m.metadata.contains_key("net_mac"),
        memory_materialised: None,
        remote: None,
        local: None,
        remote_error: None,
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, to the second (beyond the year 9999:
/// the milliseconds themselves).
pub fn format_utc(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(
            || format!("{unix_ms} ms after 1970"),
            |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// What a sandbox restored from a snapshot is: its origin, vCPUs and memory (the
/// snapshot's), and whether its guest has a network device.
pub struct RestoreSpec {
    pub origin: WorkerOrigin,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub had_network: bool,
    /// The runtime image its guest ran over (its disk is a copy-on-write view of it).
    pub image: crate::runtimes::Image,
    /// The snapshot is being fetched from the remote tier: its VMMs get the pages this
    /// host lacks from it.
    pub partial: Option<Arc<LazySnapshot>>,
}

/// The restore of snapshot `id` in `mode` (default `auto`).
pub async fn restore_spec(
    state: &Arc<AppState>,
    id: &str,
    mode: Option<ember_vmm::RestoreMode>,
) -> Result<RestoreSpec, ApiError> {
    let mode = mode.unwrap_or_default();
    let (manifest, partial) = load_or_prepare(state, id, mode).await?;
    let inconsistent = |what: &str| {
        ApiError::internal(format!("snapshot {id}: its manifest has no usable {what}"))
    };
    let vcpus = manifest
        .metadata
        .get("vcpus")
        .and_then(|v| v.parse::<u8>().ok())
        .ok_or_else(|| inconsistent("vCPU count"))?;
    let mem_mib =
        u32::try_from(manifest.memory.size_bytes >> 20).map_err(|_| inconsistent("memory size"))?;
    Ok(RestoreSpec {
        origin: WorkerOrigin::Restore {
            snapshot: id.to_string(),
            mode,
            partial: partial.as_ref().map(|lazy| {
                Box::new(PartialOrigin {
                    manifest: lazy.manifest(),
                    working_set: lazy.working_set().to_vec(),
                    page_timeout_ms: state
                        .remote
                        .as_ref()
                        .map_or(60_000, |tier| tier.page_timeout().as_millis() as u64),
                })
            }),
        },
        vcpus,
        mem_mib,
        had_network: manifest.metadata.contains_key("net_mac"),
        image: state.config.runtimes.for_snapshot(id, &manifest.metadata)?,
        partial,
    })
}

#[utoipa::path(post, path = "/sandboxes/{id}/snapshots", tag = "snapshots", operation_id = "create_snapshot",
    params(crate::api::SandboxId),
    request_body(content = Option<SnapshotBody>, description = "Optional: a name, `diff`, `stop`"),
    responses(
        (status = 201, description = "Saved in the store", body = SnapshotTaken),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox is not running, the name is taken, or a diff has no parent", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 500, description = "The VMM or the store failed", body = ErrorDocument),
        (status = 502, description = "The VMM did not answer", body = ErrorDocument)))]
/// `POST /sandboxes/{id}/snapshots` `{name?, diff?, stop?}`
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: SnapshotBody = parse_body(body)?;
    let name = match body.name {
        Some(name) if !sandbox::valid_id(&name) => {
            return Err(ApiError::bad_request(format!(
                "snapshot name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)"
            )))
        }
        Some(name) => name,
        None => sandbox::random_id("snap"),
    };
    let sandbox = state.sandbox(&id)?;
    let before = sandbox.state();
    if !matches!(before, SandboxState::Running | SandboxState::Paused) {
        sandbox.require_running()?;
    }
    if state.store.load_manifest(&name).is_ok() {
        return Err(ApiError::conflict(format!(
            "a snapshot named {name:?} exists already"
        )));
    }
    if body.diff && sandbox.restored_from().is_none() && !has_parent(&sandbox) {
        return Err(ApiError::conflict(
            "a diff snapshot needs a parent: this sandbox was booted and never saved",
        ));
    }
    if body.stop {
        // Its VMM exits once the snapshot is saved: that is not a failure.
        sandbox.update(|r| r.state = SandboxState::Stopped);
    }
    // A snapshot holding no agent connection restores without a vsock transport reset.
    sandbox.forget_agent().await;
    let reply = control(
        &sandbox,
        ControlRequest::Snapshot {
            id: name.clone(),
            diff: body.diff,
            stop: body.stop,
            labels: sandbox
                .record()
                .runtime
                .as_ref()
                .map(crate::runtimes::Runtimes::labels)
                .unwrap_or_default(),
        },
    )
    .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            if body.stop {
                sandbox.update(|r| r.state = before);
            }
            return Err(e);
        }
    };
    // The VMM wrote the snapshot into its staging folder; it is a snapshot once the service
    // has verified and taken it in.
    let ingest_start = std::time::Instant::now();
    let report = super::ingest::snapshot(&state.store, &sandbox, &name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let ingest_ms = ingest_start.elapsed().as_secs_f64() * 1e3;
    log::info!(
        "sandbox {id}: snapshot {name} ingested in {ingest_ms:.1} ms: {} objects ({} bytes)          copied, {} present",
        report.objects_copied,
        report.bytes_copied,
        report.objects_present
    );
    let took_ms = reply.snapshot.map(|s| s.took_ms + ingest_ms);
    sandbox.update(|r| r.last_snapshot = Some(name.clone()));
    state
        .mem_cache
        .materialise_later(state.store.clone(), name.clone());
    state.metrics.record_snapshot(took_ms);
    if let Some(tier) = state.remote.as_ref() {
        if tier.policy == super::remote::PushPolicy::Always {
            tier.push_later(state.store.clone(), name.clone());
        }
    }
    let taken = SnapshotTaken {
        snapshot: describe(&state, &name).await?,
        took_ms,
        sandbox: sandbox.info(),
    };
    Ok((StatusCode::CREATED, axum::Json(taken)).into_response())
}

fn has_parent(sandbox: &sandbox::Sandbox) -> bool {
    sandbox.record().last_snapshot.is_some()
}

/// The `{id}` of a snapshot in a path.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)] // Only describes the parameter.
pub struct SnapshotId(String);

#[utoipa::path(get, path = "/snapshots", tag = "snapshots", operation_id = "list_snapshots",
    responses(
        (status = 200, description = "The snapshots in this host's store", body = SnapshotList),
        (status = 500, description = "The store could not be read", body = ErrorDocument)))]
/// `GET /snapshots`
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let ids = store.list_manifests()?;
        Ok::<_, StoreError>(
            ids.iter()
                .filter_map(|id| store.load_manifest(id).ok())
                .map(|m| snapshot_info(&m))
                .collect::<Vec<_>>(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("listing snapshots: {e}")))?;
    Ok(axum::Json(SnapshotList { snapshots: rows }).into_response())
}

#[utoipa::path(get, path = "/snapshots/{id}", tag = "snapshots", operation_id = "get_snapshot",
    params(SnapshotId),
    responses(
        (status = 200, description = "The snapshot (from the remote tier if only it has it)", body = SnapshotInfo),
        (status = 404, description = "No such snapshot", body = ErrorDocument),
        (status = 500, description = "The store could not be read", body = ErrorDocument),
        (status = 502, description = "The remote tier failed", body = ErrorDocument),
        (status = 503, description = "The remote tier is unreachable", body = ErrorDocument)))]
/// `GET /snapshots/{id}`
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(describe(&state, &id).await?).into_response())
}

#[utoipa::path(delete, path = "/snapshots/{id}", tag = "snapshots", operation_id = "delete_snapshot",
    params(SnapshotId),
    responses(
        (status = 204, description = "Deleted (here and in the remote tier)"),
        (status = 404, description = "No such snapshot", body = ErrorDocument),
        (status = 409, description = "Live sandboxes restored from it still run", body = ErrorDocument),
        (status = 500, description = "The store failed", body = ErrorDocument),
        (status = 502, description = "The remote tier failed", body = ErrorDocument),
        (status = 503, description = "The remote tier is unreachable", body = ErrorDocument)))]
/// `DELETE /snapshots/{id}`: refused (409) while live sandboxes restored from it run, since
/// their memory may still be loading from its objects; afterwards a background GC reclaims
/// the space only it used.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !sandbox::valid_id(&id) {
        return Err(ApiError::not_found("snapshot", &id));
    }
    let users = live_sandboxes_restored_from(&state, &id);
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "snapshot {id:?} is in use by the live sandboxes {}, restored from it: delete \
             them first",
            users.join(", ")
        )));
    }
    // With a remote tier the snapshot goes there first (its packs at the next remote GC): a
    // remote that cannot be reached refuses the delete, rather than leave a copy there that
    // the next create would bring back.
    let remote = match &state.remote {
        Some(tier) => {
            let had = tier.delete(&id).await?;
            tier.cache.forget(&id);
            had
        }
        None => false,
    };
    let store = state.store.clone();
    let owned = id.clone();
    let local = tokio::task::spawn_blocking(move || store.delete_manifest(&owned))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| store_error(&id, e));
    match local {
        Err(e) if !(remote && e.status == StatusCode::NOT_FOUND) => return Err(e),
        Ok(()) => state.gc.request(),
        Err(_) => {}
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/snapshots/{id}/push", tag = "snapshots", operation_id = "push_snapshot",
    params(SnapshotId),
    responses(
        (status = 202, description = "Pushing in the background", body = SnapshotInfo),
        (status = 404, description = "No such snapshot", body = ErrorDocument),
        (status = 409, description = "This service has no remote tier", body = ErrorDocument),
        (status = 500, description = "The store could not be read", body = ErrorDocument)))]
/// `POST /snapshots/{id}/push`: pushes a snapshot of this host's store to the remote tier in
/// the background (`GET /snapshots/{id}` follows it).
pub async fn push(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some(tier) = state.remote.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_remote",
            "this service has no remote tier: start it with --remote s3://BUCKET/PREFIX",
        ));
    };
    load_manifest(&state, &id).await?;
    tier.push_later(state.store.clone(), id.clone());
    let mut out = describe(&state, &id).await?;
    out.remote = Some(super::remote::Placement::Pushing.name().to_string());
    Ok((StatusCode::ACCEPTED, axum::Json(out)).into_response())
}

/// Ids of the sandboxes restored from `snapshot` whose VMM may still run, sorted.
pub(crate) fn live_sandboxes_restored_from(state: &AppState, snapshot: &str) -> Vec<String> {
    let mut ids: Vec<String> = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|s| s.state().is_live() && s.restored_from().as_deref() == Some(snapshot))
        .map(|s| s.id.clone())
        .collect();
    ids.sort();
    ids
}

#[utoipa::path(post, path = "/snapshots/{id}/fork", tag = "snapshots", operation_id = "fork_snapshot",
    params(SnapshotId),
    request_body = ForkBody,
    responses(
        (status = 201, description = "The clones, running", body = SandboxList),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such snapshot", body = ErrorDocument),
        (status = 409, description = "An egress network for a snapshot whose guest had no network device", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 429, description = "The service has no room for `count` more sandboxes (then none is started)", body = ErrorDocument),
        (status = 500, description = "A clone failed to start", body = ErrorDocument),
        (status = 502, description = "The remote tier failed", body = ErrorDocument),
        (status = 503, description = "The remote tier is unreachable", body = ErrorDocument)))]
/// `POST /snapshots/{id}/fork` `{count}`: `count` sandboxes restored from one snapshot, at
/// once. If any fails, the others are deleted again and the error says why.
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: ForkBody = parse_body(body)?;
    if body.count == 0 || body.count > MAX_FORK {
        return Err(ApiError::bad_request(format!(
            "`count` must be between 1 and {MAX_FORK}"
        )));
    }
    check_env_map(&body.env)?;
    let timeout = check_timeout(body.timeout_s.unwrap_or(super::DEFAULT_TIMEOUT_S))?;
    let RestoreSpec {
        origin,
        vcpus,
        mem_mib,
        had_network,
        image,
        partial,
    } = restore_spec(&state, &id, body.restore_mode).await?;
    check_network(&id, had_network, body.network.as_ref())?;
    super::ports::check(&body.ports).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let network = body
        .network
        .clone()
        .unwrap_or(super::network::NetworkMode::None {});
    super::network::update::check_mode(&network)?;
    super::check_limits(
        body.disk_limits.as_ref(),
        body.net_limits.as_ref(),
        &network,
    )?;
    // All or nothing: a fork the service has no room for is refused before any clone starts.
    sandbox::check_room(
        &state,
        &state.sandboxes.lock().unwrap_or_else(|p| p.into_inner()),
        body.count as usize,
    )?;
    let starts = (0..body.count).map(|_| {
        let state = state.clone();
        let new = NewSandbox {
            origin: origin.clone(),
            vcpus,
            mem_mib,
            timeout,
            env: body.env.clone(),
            disk_rate_limit: body.disk_limits.unwrap_or_default(),
            net_rate_limits: body.net_limits.unwrap_or_default(),
            network: network.clone(),
            restored_nic: had_network,
            ports: body.ports.clone(),
            partial: partial.clone(),
            image: image.clone(),
            lifecycle: crate::lifecycle::Lifecycle::stop_at(timeout),
            continues: None,
        };
        tokio::spawn(async move { sandbox::create(&state, new).await })
    });
    let results = futures_util::future::join_all(starts).await;
    let mut created = Vec::new();
    let mut failure = None;
    for result in results {
        match result {
            Ok(Ok(sandbox)) => created.push(sandbox),
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(ApiError::internal(e.to_string())),
        }
    }
    if let Some(e) = failure {
        for sandbox in created {
            sandbox
                .stop("its fork failed", state.cgroups.as_ref())
                .await;
        }
        return Err(e);
    }
    let sandboxes = created.iter().map(|s| s.info()).collect();
    Ok((StatusCode::CREATED, axum::Json(SandboxList { sandboxes })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(999), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_868_799_000), "2000-02-29T23:59:59Z");
        assert_eq!(format_utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(format_utc(4_107_542_400_000), "2100-03-01T00:00:00Z");
        assert_eq!(format_utc(u64::MAX), "18446744073709551615 ms after 1970");
    }
}
