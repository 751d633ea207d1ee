//! Where a restored VM's guest memory comes from: the snapshot's materialised file mapped
//! `MAP_PRIVATE` (`file`), or fresh memory filled from the store through userfaultfd
//! (`lazy`, `prefetch`) or before the vCPUs run (`eager`). `auto` is `file` when the
//! snapshot is materialised, else `prefetch`.

use std::sync::Arc;

use ember_snapshot_store::{CachedMemory, Manifest, MemCache, MemoryMap, Store};

use crate::config::PartialSnapshot;
use crate::lazy::{load_eagerly, LazyError, LazyMemory};
use crate::memory::{
    create_guest_memory, disable_huge_pages, map_guest_memory_from_file, GuestMemoryMmap,
    MemoryError,
};
use crate::snapshot::{RestoreMode, StorePages};

/// Errors of setting up a restored VM's memory.
#[derive(Debug, thiserror::Error)]
pub enum RestoreMemoryError {
    #[error("guest memory: {0}")]
    Memory(#[source] MemoryError),
    #[error("the snapshot's memory map: {0}")]
    Map(#[source] ember_snapshot_store::StoreError),
    #[error("serving memory from the store: {0}")]
    Lazy(#[source] LazyError),
    #[error("loading memory from the store: {0}")]
    Eager(#[source] LazyError),
}

/// A restored VM's memory and what serves it.
pub struct RestoredMemory {
    pub mem: GuestMemoryMmap,
    /// The userfaultfd handler (`lazy` and `prefetch`).
    pub lazy: Option<LazyMemory>,
    /// The mapped file (`file`), locked against eviction while it lives.
    pub mapped: Option<CachedMemory>,
    /// The mode the restore ended up in (never `Auto`).
    pub mode: RestoreMode,
    /// The snapshot's memory map, where it had to be read (every mode but `file`).
    pub map: Option<MemoryMap>,
}

/// Sets up the memory of a restore of `manifest` asked to run in `mode`; `partial` when the
/// store holds the snapshot only in part (then its memory is always served lazily).
pub fn restore_memory(
    manifest: &Manifest,
    store: &Arc<Store>,
    cache: Option<&MemCache>,
    mode: RestoreMode,
    partial: Option<&PartialSnapshot>,
) -> Result<RestoredMemory, RestoreMemoryError> {
    let id = &manifest.id;
    let size = manifest.memory.size_bytes;
    if partial.is_none() && matches!(mode, RestoreMode::Auto | RestoreMode::File) {
        match cache.map(|c| c.open(&manifest.memory)) {
            Some(Ok(mapped)) => {
                let mem = map_guest_memory_from_file(size, &mapped.file)
                    .map_err(RestoreMemoryError::Memory)?;
                log::debug!("restore {id}: memory mapped from {}", mapped.path.display());
                // The pages an earlier restore needed are mapped up front: the guest's
                // first touches then find them without a host page fault each.
                if let Ok(Some(working_set)) = store.load_working_set(id) {
                    let populated = crate::memory::populate(&mem, &working_set.pages);
                    log::debug!(
                        "restore {id}: {populated} of {} working-set pages mapped ahead",
                        working_set.pages.len()
                    );
                }
                return Ok(RestoredMemory {
                    mem,
                    lazy: None,
                    mapped: Some(mapped),
                    mode: RestoreMode::File,
                    map: None,
                });
            }
            // For `auto` a snapshot not yet materialised is the normal case.
            Some(Err(ember_snapshot_store::CacheMiss::Absent(_))) if mode == RestoreMode::Auto => {}
            Some(Err(miss)) => {
                log::warn!("restore {id}: not mapping its memory file, using the store: {miss}")
            }
            None if mode == RestoreMode::File => {
                log::warn!("restore {id}: no memory cache is configured; using the store")
            }
            None => {}
        }
    }
    let mode = match (mode, partial) {
        // Loading all of a partial snapshot up front would download it whole first.
        (RestoreMode::Eager, Some(_)) => RestoreMode::Prefetch,
        (RestoreMode::Auto | RestoreMode::File, _) => RestoreMode::Prefetch,
        (other, _) => other,
    };
    let map = store
        .load_memory_map(manifest)
        .map_err(RestoreMemoryError::Map)?;
    let mem = create_guest_memory(size).map_err(RestoreMemoryError::Memory)?;
    disable_huge_pages(&mem).map_err(RestoreMemoryError::Memory)?;
    let source = StorePages {
        store: store.clone(),
        map: map.clone(),
        missing: partial.map(|p| p.missing_pages.clone()),
    };
    let lazy = match mode {
        RestoreMode::Eager => {
            load_eagerly(&mem, &source).map_err(RestoreMemoryError::Eager)?;
            None
        }
        _ => {
            let prefetch = if let (RestoreMode::Prefetch, Some(partial)) = (mode, partial) {
                partial.working_set.clone()
            } else if mode == RestoreMode::Prefetch {
                match store.load_working_set(id) {
                    Ok(recorded) => recorded.map(|r| r.pages).unwrap_or_default(),
                    Err(e) => {
                        log::warn!("restore {id}: not prefetching: {e}");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            if !prefetch.is_empty() {
                log::debug!(
                    "restore {id}: prefetching a working set of {} pages",
                    prefetch.len()
                );
            }
            Some(
                LazyMemory::start(&mem, Arc::new(source), prefetch)
                    .map_err(RestoreMemoryError::Lazy)?,
            )
        }
    };
    Ok(RestoredMemory {
        mem,
        lazy,
        mapped: None,
        mode,
        map: Some(map),
    })
}
