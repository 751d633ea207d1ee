//! Where a sandbox's parts come from when nobody says: the kernel and rootfs `cargo xtask`
//! built, the snapshot store, its memory cache, overlay paths and MAC addresses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where `cargo xtask` caches artifacts (kept in step with xtask's `cache_root`).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBER_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("ember");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ember")
}

/// The most recently built `<cache>/<kind>/<key>/<file>`.
fn newest_artifact(kind: &str, file: &str) -> Option<PathBuf> {
    std::fs::read_dir(cache_root().join(kind))
        .ok()?
        .flatten()
        .map(|e| e.path().join(file))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

fn default_artifact(env: &str, kind: &str, file: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| newest_artifact(kind, file))
}

/// The kernel used when none is given: `$EMBER_KERNEL`, else the newest xtask build.
pub fn default_kernel() -> Option<PathBuf> {
    default_artifact("EMBER_KERNEL", "kernel", "vmlinux")
}

/// The rootfs used when none is given: `$EMBER_ROOTFS`, else the newest xtask build.
pub fn default_rootfs() -> Option<PathBuf> {
    default_artifact("EMBER_ROOTFS", "rootfs", "rootfs.ext4")
}

/// The image of `runtime` (`python3.13`, `node22`, ...) used when none is given: the newest
/// `cargo xtask images` build.
pub fn default_runtime_image(runtime: &str) -> Option<PathBuf> {
    newest_artifact(&format!("images/{runtime}"), "rootfs.ext4")
}

/// The image of `runtime` whose inputs hashed to `key` (a snapshot's), if it is still built.
pub fn runtime_image_by_key(runtime: &str, key: &str) -> Option<PathBuf> {
    let path = cache_root()
        .join("images")
        .join(runtime)
        .join(key)
        .join("rootfs.ext4");
    path.exists().then_some(path)
}

/// The snapshot store used when `--store` is not given: `$EMBER_STORE`, else
/// `$HOME/.local/share/ember/store`.
pub fn default_store_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBER_STORE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/ember/store")
}

/// The memory cache of the store at `store_dir` when `--mem-cache` is not given: `mem-cache`
/// beside it (as in a service's state directory).
pub fn default_mem_cache(store_dir: &Path) -> PathBuf {
    store_dir
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("mem-cache")
}

/// A fresh path for a VM's rootfs overlay (the overlay is removed with the VM).
pub fn overlay_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("ember-rootfs-{}-{n}.overlay", std::process::id()))
}

/// Opens the snapshot store at `dir` for the service and the CLI. Its packs are read, not
/// mapped: jailed VMMs can write the store's files, and a pack one of them truncates must be
/// an error for the service (naming the pack), not a SIGBUS that kills it.
pub fn open_store(dir: &Path) -> Result<Arc<ember_snapshot_store::Store>, OpenStoreError> {
    let options = ember_snapshot_store::StoreOptions {
        map_packs: false,
        ..Default::default()
    };
    ember_snapshot_store::Store::open_with(dir, options)
        .map(Arc::new)
        .map_err(|source| OpenStoreError {
            dir: dir.to_path_buf(),
            source,
        })
}

/// A snapshot store that would not open.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the snapshot store {}: {source}", dir.display())]
pub struct OpenStoreError {
    pub dir: PathBuf,
    #[source]
    pub source: ember_snapshot_store::StoreError,
}

/// Opens the store at `dir` without indexing it: what a VMM does, since a restore indexes
/// only the packs its snapshot lists and a snapshot's writer indexes the rest, so a VMM's
/// start does not grow with the store.
pub fn open_store_unindexed(
    dir: &Path,
) -> Result<Arc<ember_snapshot_store::Store>, OpenStoreError> {
    ember_snapshot_store::Store::open_unindexed(dir, Default::default())
        .map(Arc::new)
        .map_err(|source| OpenStoreError {
            dir: dir.to_path_buf(),
            source,
        })
}

/// A random unicast, locally administered MAC (`06:` and five random bytes).
pub fn random_mac() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .to_le_bytes();
    [0x06, random[0], random[1], random[2], random[3], random[4]]
}
