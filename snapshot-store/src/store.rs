//! The store: a root directory of packs and manifests, an in-memory index of every sealed
//! pack, and the read paths.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::fsutil::{self, LockGuard, LockMode};
use crate::hash::{Hash, HashBuild};
use crate::manifest::{Manifest, ManifestError};
use crate::map::{MapError, PAGE_SIZE};
use crate::pack::{self, IdxEntry, ObjectKind, PackError, FLAG_ZSTD, MAX_OBJECT_SIZE};
use crate::writer::PackWriter;

/// Errors of the store (other modules' errors are wrapped).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A pack or pack index is unusable.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// A manifest is unusable, or a snapshot id is invalid or unknown.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A memory or disk map is inconsistent.
    #[error(transparent)]
    Map(#[from] MapError),
    /// No sealed pack holds this object.
    #[error("working set of snapshot {id} ({path}) is unusable: {reason}")]
    WorkingSet {
        id: String,
        path: PathBuf,
        reason: String,
    },
    /// A staged snapshot was refused or could not be taken over.
    #[error(transparent)]
    Staging(#[from] crate::staging::StagingError),
    #[error("object {0} not found in the store")]
    NotFound(Hash),
    /// The stored bytes do not hash to the object's name (or do not decompress).
    #[error("object {hash} in pack {pack} is corrupt: {reason}")]
    Corrupt {
        /// The object.
        hash: Hash,
        /// The pack file.
        pack: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An object over [`MAX_OBJECT_SIZE`].
    #[error("object of {len} bytes exceeds the {max}-byte object bound")]
    ObjectTooLarge {
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// `read_page_into` on an object that is not 4096 bytes.
    #[error("object {hash} is {len} bytes, not a 4096-byte page")]
    NotAPage {
        /// The object.
        hash: Hash,
        /// Its raw length.
        len: u64,
    },
    /// A memory region that is not a whole number of pages.
    #[error("memory region of {len} bytes is not a multiple of 4096")]
    Unaligned {
        /// Its length.
        len: u64,
    },
    /// A disk image shorter than announced.
    #[error("disk image ended after {got} of {expected} bytes")]
    ShortImage {
        /// Bytes read.
        got: u64,
        /// Size announced.
        expected: u64,
    },
    /// A manifest names an object that the store does not hold in a sealed pack.
    #[error("snapshot {manifest:?} references {what} {hash}, which is not in any sealed pack")]
    MissingReference {
        /// The snapshot id.
        manifest: String,
        /// The missing object.
        hash: Hash,
        /// What the manifest uses it for.
        what: &'static str,
    },
    /// The zstd compressor could not be set up.
    #[error("cannot set up zstd compression at level {level}: {source}")]
    Compression {
        /// The level asked for.
        level: i32,
        /// The cause.
        source: io::Error,
    },
    /// GC found a manifest it cannot fully trace, so it removed nothing.
    #[error("gc aborted, nothing removed: {0}")]
    GcAborted(Box<StoreError>),
}

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Per-`Store` (per-process) write settings. Readers handle every setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// zstd level for objects this store writes; `None` stores everything raw. An object is
    /// stored compressed only when that makes it smaller.
    pub compress_level: Option<i32>,
    /// Also compress pages (off by default so restore copies pages straight from the
    /// mapped pack without decompressing).
    pub compress_pages: bool,
    /// A writer seals its pack and starts another past this size.
    pub pack_target_size: u64,
    /// Map sealed packs (fast reads) rather than read them with `pread`. Only for a process
    /// that trusts every writer of the store's files: a pack truncated behind a mapping
    /// kills the reader with SIGBUS, where a read fails with an error naming the pack.
    pub map_packs: bool,
    /// Files this store writes are readable by this group too (mode 0640, directories
    /// 0750); without one, by their owner only (0600, 0700), whatever the umask.
    pub group: Option<u32>,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            compress_level: None,
            compress_pages: false,
            pack_target_size: 256 << 20,
            map_packs: true,
            group: None,
        }
    }
}

/// What [`Store::refresh`] found.
#[derive(Debug, Default)]
pub struct RefreshReport {
    /// Sealed packs newly loaded.
    pub added: usize,
    /// Packs gone from disk (removed by GC) and dropped from the index.
    pub removed: usize,
    /// Packs whose index or pack file is unusable: left out of the index (their objects
    /// read as `NotFound`); `verify` reports them too.
    pub rejected: Vec<PackError>,
}

/// How [`Store::index_snapshot`] made a snapshot's objects findable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotIndexing {
    /// Only the packs its manifest lists are indexed; this many were not indexed before.
    Listed {
        /// Packs loaded by this call.
        loaded: usize,
    },
    /// The whole store was indexed, for this reason (an older manifest without a pack list,
    /// or a listed pack is gone).
    WholeStore {
        /// Why.
        reason: String,
    },
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectLocation {
    /// The pack file.
    pub pack: PathBuf,
    /// Offset of the stored bytes in the pack.
    pub offset: u64,
    /// Stored length.
    pub stored_len: u32,
    /// Raw length.
    pub raw_len: u32,
    /// Whether the stored bytes are zstd-compressed.
    pub compressed: bool,
    /// The kind recorded when it was first written.
    pub kind: ObjectKind,
}

pub(crate) struct SealedPack {
    pub id: String,
    pub path: PathBuf,
    pub bytes: pack::PackBytes,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Loc {
    pub pack: u32,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

/// Every sealed pack this process knows, and hash → location.
#[derive(Default)]
pub(crate) struct Index {
    pub packs: Vec<SealedPack>,
    pub ids: HashMap<String, usize>,
    pub objects: HashMap<Hash, Loc, HashBuild>,
}

impl Index {
    /// Adds a pack unless already present; the first location of an object wins.
    pub(crate) fn add(&mut self, pack: SealedPack, entries: &[IdxEntry]) -> bool {
        if self.ids.contains_key(&pack.id) {
            return false;
        }
        let n = self.packs.len();
        self.ids.insert(pack.id.clone(), n);
        self.packs.push(pack);
        self.objects.reserve(entries.len());
        for e in entries {
            self.objects.entry(e.hash).or_insert(Loc {
                pack: n as u32,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                flags: e.flags,
            });
        }
        true
    }

    fn locate(&self, hash: &Hash) -> Option<(Loc, &SealedPack)> {
        let loc = *self.objects.get(hash)?;
        Some((loc, self.packs.get(loc.pack as usize)?))
    }
}

/// The packs directory's contents.
pub(crate) struct DirScan {
    /// Ids with an `.idx` (sorted: ids start with their creation time).
    pub sealed: Vec<String>,
    /// Ids with a `.pack` and no `.idx`.
    pub orphans: Vec<String>,
    /// Leftover temporary files.
    pub temps: Vec<PathBuf>,
}

pub(crate) fn valid_pack_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
}

pub(crate) fn scan_packs(dir: &Path) -> Result<DirScan> {
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut idx = HashSet::new();
    let mut packs = Vec::new();
    let mut temps = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            temps.push(entry.path());
        } else if let Some(id) = name.strip_suffix(".idx").filter(|id| valid_pack_id(id)) {
            idx.insert(id.to_owned());
        } else if let Some(id) = name.strip_suffix(".pack").filter(|id| valid_pack_id(id)) {
            packs.push(id.to_owned());
        }
    }
    let mut orphans: Vec<String> = packs.into_iter().filter(|p| !idx.contains(p)).collect();
    orphans.sort();
    let mut sealed: Vec<String> = idx.into_iter().collect();
    sealed.sort();
    Ok(DirScan {
        sealed,
        orphans,
        temps,
    })
}

pub(crate) fn pack_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.pack"))
}

pub(crate) fn idx_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.idx"))
}

/// Loads one sealed pack (mapped if `map`).
pub(crate) fn load_pack(
    dir: &Path,
    id: &str,
    map: bool,
) -> Result<(SealedPack, Vec<IdxEntry>), PackError> {
    let (pack_len, entries) = pack::read_idx(&idx_path(dir, id))?;
    let path = pack_path(dir, id);
    let bytes = pack::open_sealed_pack(&path, pack_len, map)?;
    Ok((
        SealedPack {
            id: id.to_owned(),
            path,
            bytes,
        },
        entries,
    ))
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Why a stored object would not decompress to its length.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecompressError {
    #[error("zstd: {0}")]
    Zstd(#[source] std::io::Error),
    #[error("decompressed to {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
}

/// Decompresses `src` into `dst`, which must end up exactly full. Reuses a per-thread
/// context.
pub(crate) fn decompress_exact<C>(
    src: &[u8],
    dst: &mut C,
    expected: usize,
) -> Result<(), DecompressError>
where
    C: zstd::zstd_safe::WriteBuf + ?Sized,
{
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(DecompressError::Zstd)?),
        };
        let got = d
            .decompress_to_buffer(src, dst)
            .map_err(DecompressError::Zstd)?;
        if got != expected {
            return Err(DecompressError::Length { got, expected });
        }
        Ok(())
    })
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary-file name unique to this process and call.
pub(crate) fn tmp_name(stem: &str) -> String {
    format!(
        ".{stem}.{}.{}.tmp",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A content-addressed snapshot store rooted at a directory. `Sync`: share it between
/// threads (each writer borrows it).
pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) packs_dir: PathBuf,
    pub(crate) manifests_dir: PathBuf,
    pub(crate) options: StoreOptions,
    pub(crate) index: RwLock<Index>,
    /// Serializes index changes against a refresh's scan-then-swap (so a refresh that
    /// scanned before a writer sealed cannot drop the writer's pack), and remembers which
    /// unusable packs were already logged. Lock order: this, then `index`.
    pub(crate) refresh_mutex: Mutex<HashSet<String>>,
    /// A staging store's read-only store underneath: objects and manifests not found here
    /// are looked for there, and writers deduplicate against it (see
    /// [`Store::open_staging`]).
    pub(crate) base: Option<Arc<Store>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idx = self.read_index();
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("packs", &idx.packs.len())
            .field("objects", &idx.objects.len())
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store at `root` with default options.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(root, StoreOptions::default())
    }

    /// Opens (creating if needed) the store at `root` and loads every sealed pack's index.
    /// Unusable packs are logged and left out (see [`RefreshReport::rejected`]).
    pub fn open_with(root: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let store = Store::open_unindexed(root, options)?;
        store.refresh()?;
        Ok(store)
    }

    /// Opens (creating if needed) the store at `root` without indexing any pack: opening
    /// costs the same whatever the store holds. Nothing is found in it until
    /// [`Store::index_snapshot`] (what a restore needs) or [`Store::refresh`] (everything);
    /// a writer refreshes when it starts, so snapshots still deduplicate against the whole
    /// store.
    pub fn open_unindexed(root: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let root = root.as_ref().to_owned();
        let packs_dir = root.join("packs");
        let manifests_dir = root.join("manifests");
        let access = fsutil::Access {
            group: options.group,
        };
        for dir in [&root, &packs_dir, &manifests_dir] {
            fsutil::ensure_dir(dir, &access).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let store = Store {
            root,
            packs_dir,
            manifests_dir,
            options,
            index: RwLock::new(Index::default()),
            refresh_mutex: Mutex::new(HashSet::new()),
            base: None,
        };
        Ok(store)
    }

    /// Who may read the files this store writes.
    pub(crate) fn access(&self) -> fsutil::Access {
        fsutil::Access {
            group: self.options.group,
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The write options.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    pub(crate) fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        // The index is only ever replaced or extended whole-entry, so a panic elsewhere
        // cannot leave it half-updated.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn refresh_guard(&self) -> MutexGuard<'_, HashSet<String>> {
        self.refresh_mutex.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the store lock (`store.lock`): shared for writers, exclusive for GC.
    pub(crate) fn lock(&self, mode: LockMode) -> Result<LockGuard> {
        let path = self.root.join("store.lock");
        fsutil::lock_path(&path, mode).map_err(|source| StoreError::Io { path, source })
    }

    /// Starts a writer. It holds the store lock shared until it is finished or dropped, so
    /// GC waits for it; it first refreshes the index so it never dedupes against a pack GC
    /// removed. Do not run [`Store::gc`] on the same thread while a writer is alive (it
    /// would wait for that writer forever).
    pub fn writer(&self) -> Result<PackWriter<'_>> {
        if let Some(base) = &self.base {
            base.refresh()?;
        }
        let lock = self.lock(LockMode::Shared)?;
        self.refresh_locked()?;
        PackWriter::new(self, lock)
    }

    /// Picks up packs sealed (and drops packs removed) by other processes since the last
    /// refresh.
    pub fn refresh(&self) -> Result<RefreshReport> {
        let _lock = self.lock(LockMode::Shared)?;
        self.refresh_locked()
    }

    pub(crate) fn refresh_locked(&self) -> Result<RefreshReport> {
        let mut warned = self.refresh_guard();
        let scan = scan_packs(&self.packs_dir)?;
        let on_disk: HashSet<&str> = scan.sealed.iter().map(String::as_str).collect();
        let (removed, new_ids) = {
            let idx = self.read_index();
            let removed = idx
                .packs
                .iter()
                .filter(|p| !on_disk.contains(p.id.as_str()))
                .count();
            let new_ids: Vec<String> = scan
                .sealed
                .iter()
                .filter(|id| !idx.ids.contains_key(*id))
                .cloned()
                .collect();
            (removed, new_ids)
        };
        struct Found {
            added: usize,
            removed: usize,
            rejected: Vec<(String, PackError)>,
        }
        let mut report = Found {
            added: 0,
            removed,
            rejected: Vec::new(),
        };
        if removed > 0 {
            // Rare (after a GC): rebuild from scratch so objects that also live in a
            // surviving pack point there.
            let mut fresh = Index::default();
            for id in &scan.sealed {
                match load_pack(&self.packs_dir, id, self.options.map_packs) {
                    Ok((p, es)) => {
                        fresh.add(p, &es);
                    }
                    Err(e) => report.rejected.push((id.clone(), e)),
                }
            }
            report.added = new_ids
                .iter()
                .filter(|id| fresh.ids.contains_key(*id))
                .count();
            *self.write_index() = fresh;
        } else {
            let mut loaded = Vec::new();
            for id in &new_ids {
                match load_pack(&self.packs_dir, id, self.options.map_packs) {
                    Ok(p) => loaded.push(p),
                    Err(e) => report.rejected.push((id.clone(), e)),
                }
            }
            let mut idx = self.write_index();
            for (p, es) in loaded {
                if idx.add(p, &es) {
                    report.added += 1;
                }
            }
        }
        for (id, e) in &report.rejected {
            if warned.insert(id.clone()) {
                log::warn!("snapshot store: ignoring unusable pack: {e}");
            }
        }
        Ok(RefreshReport {
            added: report.added,
            removed: report.removed,
            rejected: report.rejected.into_iter().map(|(_, e)| e).collect(),
        })
    }

    /// Makes everything snapshot `m` references findable, indexing only the packs its
    /// manifest lists when they are all still there (O(snapshot), not O(store)), and the
    /// whole store otherwise. Packs already indexed are kept.
    pub fn index_snapshot(&self, m: &Manifest) -> Result<SnapshotIndexing> {
        let _lock = self.lock(LockMode::Shared)?;
        let whole_store = |reason: String| -> Result<SnapshotIndexing> {
            self.refresh_locked()?;
            Ok(SnapshotIndexing::WholeStore { reason })
        };
        if m.packs.is_empty() {
            return whole_store(format!("snapshot {:?} lists no packs", m.id));
        }
        let loaded = {
            // Holding the refresh mutex keeps a concurrent refresh from swapping the index
            // between the check below and the additions.
            let _guard = self.refresh_guard();
            let wanted: Vec<&String> = {
                let idx = self.read_index();
                m.packs
                    .iter()
                    .filter(|id| !idx.ids.contains_key(id.as_str()))
                    .collect()
            };
            wanted
                .into_iter()
                .map(|id| load_pack(&self.packs_dir, id, self.options.map_packs))
                .collect::<std::result::Result<Vec<_>, PackError>>()
                .map(|loaded| {
                    let mut idx = self.write_index();
                    let count = loaded.len();
                    for (pack, entries) in loaded {
                        idx.add(pack, &entries);
                    }
                    count
                })
        };
        match loaded {
            Ok(loaded) => Ok(SnapshotIndexing::Listed { loaded }),
            Err(e) => whole_store(format!("a pack snapshot {:?} lists is unusable: {e}", m.id)),
        }
    }

    /// Whether a sealed pack holds `hash`.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.read_index().objects.contains_key(hash)
            || self.base.as_ref().is_some_and(|base| base.contains(hash))
    }

    /// Number of distinct objects in sealed packs.
    pub fn object_count(&self) -> usize {
        self.read_index().objects.len()
    }

    /// Where `hash` is stored.
    pub fn locate(&self, hash: &Hash) -> Option<ObjectLocation> {
        let idx = self.read_index();
        let Some((loc, pack)) = idx.locate(hash) else {
            return self.base.as_ref().and_then(|base| base.locate(hash));
        };
        Some(ObjectLocation {
            pack: pack.path.clone(),
            offset: loc.offset,
            stored_len: loc.stored_len,
            raw_len: loc.raw_len,
            compressed: loc.flags & FLAG_ZSTD != 0,
            kind: ObjectKind::from_flags(loc.flags).unwrap_or(ObjectKind::Blob),
        })
    }

    /// Reads an object, verifying that it hashes to `hash`.
    pub fn read(&self, hash: &Hash) -> Result<Vec<u8>> {
        let idx = self.read_index();
        let Some((loc, pack)) = idx.locate(hash) else {
            return match &self.base {
                Some(base) => base.read(hash),
                None => Err(StoreError::NotFound(*hash)),
            };
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            hash: *hash,
            pack: pack.path.clone(),
            reason,
        };
        let mut scratch = Vec::new();
        let stored = stored_bytes(pack, &loc, &mut scratch)
            .ok_or_else(|| corrupt("outside the pack or unreadable".into()))?;
        let data = if loc.flags & FLAG_ZSTD != 0 {
            let mut out = Vec::with_capacity(loc.raw_len as usize);
            decompress_exact(stored, &mut out, loc.raw_len as usize)
                .map_err(|e| corrupt(e.to_string()))?;
            out
        } else {
            stored.to_vec()
        };
        if Hash::of(&data) != *hash {
            return Err(corrupt("content does not match its hash".into()));
        }
        Ok(data)
    }

    /// An object's stored bytes (compressed or not), unverified.
    pub(crate) fn stored_bytes_of(&self, hash: &Hash) -> Result<Vec<u8>> {
        let idx = self.read_index();
        let Some((loc, pack)) = idx.locate(hash) else {
            return match &self.base {
                Some(base) => base.stored_bytes_of(hash),
                None => Err(StoreError::NotFound(*hash)),
            };
        };
        let mut scratch = Vec::new();
        stored_bytes(pack, &loc, &mut scratch)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| StoreError::Corrupt {
                hash: *hash,
                pack: pack.path.clone(),
                reason: "outside the pack or unreadable".into(),
            })
    }

    /// Reads a page into `buf`, verifying its hash: the restore fault path. Uncompressed
    /// pages are copied from the mapped pack without allocating. On error `buf` is zeroed.
    pub fn read_page_into(&self, hash: &Hash, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        let result = self.read_page_inner(hash, buf);
        if result.is_err() {
            buf.fill(0);
        }
        result
    }

    fn read_page_inner(&self, hash: &Hash, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        let idx = self.read_index();
        let Some((loc, pack)) = idx.locate(hash) else {
            return match &self.base {
                Some(base) => base.read_page_inner(hash, buf),
                None => Err(StoreError::NotFound(*hash)),
            };
        };
        if loc.raw_len as usize != PAGE_SIZE {
            return Err(StoreError::NotAPage {
                hash: *hash,
                len: u64::from(loc.raw_len),
            });
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            hash: *hash,
            pack: pack.path.clone(),
            reason,
        };
        let mut scratch = Vec::new();
        let stored = stored_bytes(pack, &loc, &mut scratch)
            .ok_or_else(|| corrupt("outside the pack or unreadable".into()))?;
        if loc.flags & FLAG_ZSTD != 0 {
            decompress_exact(stored, &mut buf[..], PAGE_SIZE)
                .map_err(|e| corrupt(e.to_string()))?;
        } else if stored.len() == PAGE_SIZE {
            buf.copy_from_slice(stored);
        } else {
            return Err(corrupt(format!("stored length {}", stored.len())));
        }
        if blake3::hash(buf).as_bytes() != hash.as_bytes() {
            return Err(corrupt("content does not match its hash".into()));
        }
        Ok(())
    }
}

/// An object's stored bytes: borrowed from a mapped pack, or read into `buf`.
fn stored_bytes<'a>(pack: &'a SealedPack, loc: &Loc, buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    pack.bytes.get(loc.offset, loc.stored_len as usize, buf)
}

/// Bound check shared by the writer.
pub(crate) fn check_object_len(len: usize) -> Result<()> {
    if len > MAX_OBJECT_SIZE {
        return Err(StoreError::ObjectTooLarge {
            len: len as u64,
            max: MAX_OBJECT_SIZE as u64,
        });
    }
    Ok(())
}
