//! The service's side of the remote tier (`--remote s3://BUCKET/PREFIX`): snapshots pushed in
//! the background after they are taken (`--push always`) or on request, snapshots missing
//! here fetched before a restore, remote manifests deleted with their snapshots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::http::StatusCode;
use ember_remote::{LazySnapshot, Remote, RemoteError};
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
    /// How long a restore from the remote runs before the rest of its snapshot is fetched.
    rest_after: Duration,
    /// The snapshots this host fetched, within `--remote-cache-bytes`.
    pub cache: crate::remote_cache::RemoteCache,
    placements: Mutex<HashMap<String, Placement>>,
    /// Snapshots being restored from the remote: concurrent restores of one share its
    /// downloads.
    partial: Mutex<HashMap<String, Weak<LazySnapshot>>>,
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
    pub fn new(
        remote: Remote,
        policy: PushPolicy,
        rest_after: Duration,
        cache: crate::remote_cache::RemoteCache,
    ) -> RemoteTier {
        RemoteTier {
            remote: Arc::new(remote),
            policy,
            rest_after,
            cache,
            placements: Mutex::new(HashMap::new()),
            partial: Mutex::new(HashMap::new()),
        }
    }

    /// How long a VMM waits for one page over its page channel: a download of its window,
    /// perhaps behind another one.
    pub fn page_timeout(&self) -> Duration {
        self.remote.request_deadline() * 2 + Duration::from_secs(5)
    }

    /// Prepares a restore of snapshot `id`, which this host does not have, from the remote
    /// (see [`Remote::prepare_lazy`]); a restore of it already under way is shared.
    pub async fn prepare_lazy(
        &self,
        store: Arc<Store>,
        id: &str,
    ) -> Result<Arc<LazySnapshot>, ApiError> {
        if let Some(live) = lock(&self.partial).get(id).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let start = std::time::Instant::now();
        let owned = id.to_string();
        let lazy = self
            .blocking("preparing", id, move |remote| {
                remote.prepare_lazy(&store, &owned)
            })
            .await?;
        let report = lazy.report();
        log::info!(
            "snapshot {id}: restoring from {}: {} objects, {} bytes in {} requests before \
             the guest runs ({} working-set pages) in {:.1} ms; the rest on demand",
            self.remote.url(),
            report.objects_fetched,
            report.bytes_fetched,
            report.requests,
            lazy.working_set().len(),
            start.elapsed().as_secs_f64() * 1e3
        );
        let lazy = Arc::new(lazy);
        lock(&self.partial).insert(id.to_string(), Arc::downgrade(&lazy));
        self.placements().insert(id.to_string(), Placement::Remote);
        Ok(lazy)
    }

    /// Hands a VMM restoring `lazy` its page channel (on `stdin`, the VMM's control socket
    /// to the service) and serves it on a thread of its own until the VMM closes it.
    pub fn serve_pages(
        store: Arc<Store>,
        lazy: Arc<LazySnapshot>,
        stdin: &std::os::unix::net::UnixStream,
        sandbox: &str,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (service_end, vmm_end) = std::os::unix::net::UnixStream::pair()?;
        stdin.send_with_fd(&b"p"[..], vmm_end.as_raw_fd())?;
        drop(vmm_end);
        let sandbox = sandbox.to_string();
        std::thread::Builder::new()
            .name(format!("pages-{sandbox}"))
            .spawn(move || {
                let served = ember_sandbox::page_channel::serve(service_end, |index| {
                    lazy.page(&store, index).inspect_err(|e| {
                        log::warn!("sandbox {sandbox}: guest page {index}: {e}");
                    })
                });
                match served {
                    Ok(n) => log::debug!("sandbox {sandbox}: page channel closed ({n} pages)"),
                    Err(e) => log::warn!("sandbox {sandbox}: page channel: {e}"),
                }
            })?;
        Ok(())
    }

    /// Fetches the rest of `lazy` in the background and saves it in `store`, once; later
    /// restores of it on this host are local (and it is materialised for `file` ones).
    pub fn complete_later(
        self: &Arc<Self>,
        store: Arc<Store>,
        lazy: Arc<LazySnapshot>,
        done: impl FnOnce(u64) + Send + 'static,
    ) {
        if !lazy.start_completing() {
            return;
        }
        let tier = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(tier.rest_after).await;
            let id = lazy.manifest().id;
            let start = std::time::Instant::now();
            let worker = lazy.clone();
            let result = tokio::task::spawn_blocking(move || worker.complete(&store)).await;
            match result {
                Ok(Ok(rest)) => {
                    let total = lazy.report();
                    log::info!(
                        "snapshot {id}: the rest fetched from {} in {:.1} s ({} objects, {} \
                         bytes); {} bytes in {} requests in all, now local",
                        tier.remote.url(),
                        start.elapsed().as_secs_f64(),
                        rest.objects_fetched,
                        rest.bytes_fetched,
                        total.bytes_fetched,
                        total.requests
                    );
                    done(total.bytes_fetched);
                }
                Ok(Err(e)) => log::warn!("snapshot {id}: fetching the rest failed: {e}"),
                Err(e) => log::warn!("snapshot {id}: fetching the rest ended: {e}"),
            }
            let mut partial = lock(&tier.partial);
            if partial
                .get(&id)
                .is_some_and(|w| w.ptr_eq(&Arc::downgrade(&lazy)))
            {
                partial.remove(&id);
            }
        });
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

    /// Pushes the working set just recorded for snapshot `id` in the background, if the
    /// remote has the snapshot: other hosts' restores of it then fetch those pages first.
    pub fn push_working_set_later(self: &Arc<Self>, store: Arc<Store>, id: String) {
        let tier = self.clone();
        tokio::spawn(async move {
            if tier.placement(&id).await != Placement::Remote {
                return;
            }
            let remote = tier.remote.clone();
            let owned = id.clone();
            match tokio::task::spawn_blocking(move || remote.push_working_set(&store, &owned)).await
            {
                Ok(Ok(_)) => log::info!("snapshot {id}: working set pushed"),
                Ok(Err(e)) => log::warn!("snapshot {id}: pushing its working set failed: {e}"),
                Err(e) => log::warn!("snapshot {id}: pushing its working set ended: {e}"),
            }
        });
    }

    /// Runs `work` on the remote off the async threads; `what` names it in an error.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        id: &str,
        work: impl FnOnce(&Arc<Remote>) -> Result<T, RemoteError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let remote = self.remote.clone();
        tokio::task::spawn_blocking(move || work(&remote))
            .await
            .map_err(|e| ApiError::internal(format!("{what} snapshot {id}: {e}")))?
            .map_err(api_error)
    }

    /// Fetches snapshot `id` into `store` (it is not there); the bytes downloaded.
    pub async fn fetch(&self, store: Arc<Store>, id: &str) -> Result<u64, ApiError> {
        let start = std::time::Instant::now();
        let owned = id.to_string();
        let report = self
            .blocking("fetching", id, move |remote| remote.fetch(&store, &owned))
            .await?;
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
        Ok(report.bytes_fetched)
    }

    /// Deletes snapshot `id`'s remote manifest; `Ok(false)` if the remote did not have it.
    pub async fn delete(&self, id: &str) -> Result<bool, ApiError> {
        let owned = id.to_string();
        let had = self
            .blocking("deleting", id, move |remote| {
                let had = remote.has_snapshot(&owned)?;
                if had {
                    remote.delete_snapshot(&owned)?;
                }
                Ok(had)
            })
            .await?;
        self.placements().remove(id);
        Ok(had)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
