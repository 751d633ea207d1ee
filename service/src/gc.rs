//! Reclaiming the store's space once snapshots are deleted.
//!
//! `DELETE /snapshots/{id}` removes only the manifest; the objects it alone used stay in their
//! packs until a GC. A long-running service that creates and deletes snapshots all day would
//! otherwise grow its store without bound, so every deletion asks for a GC, run in the
//! background by one task. Requests made while a GC runs fold into one more run after it.
//!
//! GC takes the store lock exclusively, so it waits for VMMs writing a snapshot and holds off
//! restores for the moment it runs. Objects a live sandbox may still need are safe because a
//! snapshot that live sandboxes were restored from cannot be deleted (see
//! `snapshots::delete`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use ember_snapshot_store::Store;

/// The background GC's trigger and what it has done so far.
#[derive(Default)]
pub struct StoreGc {
    wanted: Notify,
    pub runs: AtomicU64,
    pub failures: AtomicU64,
    pub bytes_reclaimed: AtomicU64,
}

impl StoreGc {
    /// Asks for a GC soon; cheap, never waits.
    pub fn request(&self) {
        // One stored permit at most: requests during a run make exactly one more run.
        self.wanted.notify_one();
    }

    /// Runs GCs as they are requested, for the life of the service.
    pub async fn run(self: Arc<Self>, store: Arc<Store>) {
        loop {
            self.wanted.notified().await;
            let store = store.clone();
            let report = tokio::task::spawn_blocking(move || store.gc()).await;
            self.runs.fetch_add(1, Ordering::Relaxed);
            match report {
                Ok(Ok(report)) => {
                    let freed = report.bytes_removed.saturating_sub(report.bytes_written);
                    self.bytes_reclaimed.fetch_add(freed, Ordering::Relaxed);
                    log::info!(
                        "store gc: {} snapshots traced, {} packs deleted, {} rewritten, \
                         {freed} bytes reclaimed",
                        report.manifests,
                        report.packs_deleted,
                        report.packs_rewritten
                    );
                    for id in &report.manifests_quarantined {
                        log::warn!(
                            "store gc: snapshot {id} is corrupt and was moved to the store's \
                             quarantine/"
                        );
                    }
                }
                Ok(Err(e)) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    log::warn!("store gc failed (the store is unchanged where it failed): {e}");
                }
                Err(e) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    log::warn!("store gc did not finish: {e}");
                }
            }
        }
    }
}
