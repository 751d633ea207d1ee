//! The service's memory cache: every snapshot's guest RAM materialised as a local file
//! (`STATE_DIR/mem-cache`), so restores map it instead of copying pages out of the store.
//!
//! The service, never a VMM, writes it: in the background right after a snapshot is saved,
//! and after a restore that found its snapshot not materialised (a snapshot from before the
//! cache, or one evicted). VMMs see the folder read-only. After each write the least recently
//! used entries go until the cache fits `--mem-cache-bytes`; entries a VMM maps stay.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ember_snapshot_store::{MemCache, Store};

/// The default bound on the cache: 8 GiB of allocated blocks.
pub const DEFAULT_MEM_CACHE_BYTES: u64 = 8 << 30;

/// The cache, its bound and what is being written.
pub struct MemoryCache {
    pub cache: MemCache,
    pub limit_bytes: u64,
    in_flight: Mutex<HashSet<String>>,
    pub materialised: AtomicU64,
    pub evicted: AtomicU64,
    pub failed: AtomicU64,
}

impl MemoryCache {
    /// The cache in `dir`, readable by the jailed VMMs' group `jail_gid` (if they are
    /// jailed) and nobody else.
    pub fn new(dir: PathBuf, limit_bytes: u64, jail_gid: Option<u32>) -> MemoryCache {
        MemoryCache {
            cache: match jail_gid {
                Some(gid) => MemCache::readable_by_group(dir, gid),
                None => MemCache::new(dir),
            },
            limit_bytes,
            in_flight: Mutex::default(),
            materialised: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Materialises snapshot `id` in the background (once at a time per snapshot), then
    /// evicts down to the bound; an entry already there is only marked used.
    pub fn materialise_later(self: &Arc<Self>, store: Arc<Store>, id: String) {
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.materialise_now(&store, &id);
            this.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    fn materialise_now(&self, store: &Store, id: &str) {
        let manifest = match store.load_manifest(id) {
            Ok(manifest) => manifest,
            Err(e) => {
                log::warn!("snapshot {id}: not materialising its memory: {e}");
                return;
            }
        };
        if self.cache.contains(&manifest.memory) {
            self.cache.touch(&manifest.memory);
            return;
        }
        // The snapshot's pack was written by a VMM: index the packs its manifest lists.
        let result = store
            .index_snapshot(&manifest)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                self.cache
                    .materialise(store, &manifest)
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(done) => {
                self.materialised.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "snapshot {id}: memory materialised in {:.1} ms ({} pages) at {}",
                    done.took.as_secs_f64() * 1e3,
                    done.pages_written,
                    done.path.display()
                );
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                log::warn!("snapshot {id}: restores will read the store: {e}");
            }
        }
        match self.cache.evict_to(self.limit_bytes) {
            Ok(report) => {
                self.evicted
                    .fetch_add(report.evicted.len() as u64, Ordering::Relaxed);
                if !report.evicted.is_empty() || report.busy > 0 {
                    log::info!(
                        "memory cache: evicted {} entries, {} in use kept, {} bytes held",
                        report.evicted.len(),
                        report.busy,
                        report.bytes
                    );
                }
            }
            Err(e) => log::warn!("memory cache: eviction failed: {e}"),
        }
    }
}
