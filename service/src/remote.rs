//! The service's side of the remote tier (`--remote s3://BUCKET/PREFIX`): snapshots pushed in
//! the background after they are taken (`--push always`) or on request, snapshots missing
//! here fetched before a restore, remote manifests deleted with their snapshots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use ember_remote::{Remote, RemoteError};
use ember_snapshot_store::Store;

use crate::error::ApiError;

/// When snapshots are pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushPolicy {
    /// As soon as each snapshot is taken.
    Always,
    /// Only on `POST /snapshots/{id}/push`.
    OnRequest,
}

/// Where a snapshot is, as `GET /snapshots/{id}` shows it (`remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Only in this host's store.
    Local,
    /// Being pushed.
    Pushing,
    /// In the remote (and perhaps here too).
    Remote,
    /// The last push failed, for this reason.
    PushFailed(String),
}

impl Placement {
    pub fn name(&self) -> &'static str {
        match self {
            Placement::Local => "local",
            Placement::Pushing => "pushing",
            Placement::Remote => "remote",
            Placement::PushFailed(_) => "push_failed",
        }
    }
}

pub struct RemoteTier {
    pub remote: Arc<Remote>,
    pub policy: PushPolicy,
    placements: Mutex<HashMap<String, Placement>>,
}

/// The API's answer to a remote failure: 503 when it cannot be reached or is too slow, 502
/// when it answers with something damaged, 404 for a snapshot it does not have.
pub fn api_error(e: RemoteError) -> ApiError {
    let message = e.to_string();
    match e {
        RemoteError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
        e if e.is_unavailable() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "remote_unavailable",
            message,
        ),
        RemoteError::Local { .. } => ApiError::internal(message),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "remote_failed", message),
    }
}

impl RemoteTier {
    pub fn new(remote: Remote, policy: PushPolicy) -> RemoteTier {
        RemoteTier {
            remote: Arc::new(remote),
            policy,
            placements: Mutex::new(HashMap::new()),
        }
    }

    fn placements(&self) -> std::sync::MutexGuard<'_, HashMap<String, Placement>> {
        self.placements.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where snapshot `id` is known to be, without asking the remote.
    pub fn known_placement(&self, id: &str) -> Option<Placement> {
        self.placements().get(id).cloned()
    }

    /// Where snapshot `id` is: asks the remote when this service has not pushed it itself.
    pub async fn placement(&self, id: &str) -> Placement {
        if let Some(known) = self.known_placement(id) {
            return known;
        }
        let remote = self.remote.clone();
        let owned = id.to_string();
        match tokio::task::spawn_blocking(move || remote.has_snapshot(&owned)).await {
            Ok(Ok(true)) => {
                self.placements().insert(id.to_string(), Placement::Remote);
                Placement::Remote
            }
            Ok(Ok(false)) => Placement::Local,
            Ok(Err(e)) => {
                log::warn!("snapshot {id}: cannot ask the remote: {e}");
                Placement::Local
            }
            Err(_) => Placement::Local,
        }
    }

    /// Starts pushing snapshot `id` in the background (unless a push of it is under way).
    pub fn push_later(self: &Arc<Self>, store: Arc<Store>, id: String) {
        {
            let mut placements = self.placements();
            if placements.get(&id) == Some(&Placement::Pushing) {
                return;
            }
            placements.insert(id.clone(), Placement::Pushing);
        }
        let tier = self.clone();
        tokio::spawn(async move {
            let remote = tier.remote.clone();
            let owned = id.clone();
            let start = std::time::Instant::now();
            let result = tokio::task::spawn_blocking(move || remote.push(&store, &owned)).await;
            let placement = match result {
                Ok(Ok(report)) => {
                    log::info!(
                        "snapshot {id} pushed to {} in {:.1} s: {} objects ({} bytes) in {} \
                         packs uploaded, {} there already",
                        tier.remote.url(),
                        start.elapsed().as_secs_f64(),
                        report.objects_uploaded,
                        report.bytes_uploaded,
                        report.packs_uploaded,
                        report.objects_present
                    );
                    Placement::Remote
                }
                Ok(Err(e)) => {
                    log::warn!("snapshot {id}: push failed: {e}");
                    Placement::PushFailed(e.to_string())
                }
                Err(e) => Placement::PushFailed(format!("the push task ended: {e}")),
            };
            tier.placements().insert(id, placement);
        });
    }

    /// Fetches snapshot `id` into `store` (it is not there).
    pub async fn fetch(&self, store: Arc<Store>, id: &str) -> Result<(), ApiError> {
        let remote = self.remote.clone();
        let owned = id.to_string();
        let start = std::time::Instant::now();
        let report = tokio::task::spawn_blocking(move || remote.fetch(&store, &owned))
            .await
            .map_err(|e| ApiError::internal(format!("fetching snapshot {id}: {e}")))?
            .map_err(api_error)?;
        log::info!(
            "snapshot {id} fetched from {} in {:.1} s: {} objects, {} bytes in {} requests \
             ({} here already)",
            self.remote.url(),
            start.elapsed().as_secs_f64(),
            report.objects_fetched,
            report.bytes_fetched,
            report.requests,
            report.objects_present
        );
        self.placements().insert(id.to_string(), Placement::Remote);
        Ok(())
    }

    /// Deletes snapshot `id`'s remote manifest; `Ok(false)` if the remote did not have it.
    pub async fn delete(&self, id: &str) -> Result<bool, ApiError> {
        let remote = self.remote.clone();
        let owned = id.to_string();
        let had = tokio::task::spawn_blocking(move || {
            let had = remote.has_snapshot(&owned)?;
            if had {
                remote.delete_snapshot(&owned)?;
            }
            Ok::<_, RemoteError>(had)
        })
        .await
        .map_err(|e| ApiError::internal(format!("deleting snapshot {id}: {e}")))?
        .map_err(api_error)?;
        self.placements().remove(id);
        Ok(had)
    }
}
