//! Materialised snapshot memory: a snapshot's guest RAM as one sparse local file that a
//! restore maps `MAP_PRIVATE` as guest memory, so the host kernel serves first touches from
//! the page cache, clones share clean pages, and nothing is copied or hashed up front.
//!
//! The store stays the source of truth; this is a cache beside it, keyed by content (the
//! memory map's identity, [`MemCache::key_of`]), so snapshots with identical memory share one
//! file and a re-used snapshot id can never meet a stale file.
//!
//! ```text
//! <dir>/<key>.mem    guest RAM, page i at offset i*4096; zero pages are holes
//! <dir>/<key>.json   its record: size, and the identity (device, inode, ctime) it had when
//!                    written; its modification time is the entry's last use (LRU)
//! ```
//!
//! Every page is read from the store and verified against its hash as the file is written
//! (temporary name, fsync, rename, directory fsync; the record last). A restore maps the file
//! only if it still has the recorded size and identity: any write, truncation or replacement
//! changes its ctime, so a damaged file is never mapped and the restore falls back to the
//! store. A restoring VMM holds a shared `flock` on the file while it maps it; eviction
//! takes the exclusive lock without waiting and skips files in use.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::hash::Hash;
use crate::manifest::{Manifest, MemoryRef};
use crate::map::{PageRef, PAGE_SIZE};
use crate::store::{Store, StoreError};

const RECORD_VERSION: u32 = 1;
/// How old a temporary or record-less file must be before eviction takes it for abandoned
/// (a materialisation in progress is younger).
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// Pages gathered into one `pwrite` while materialising.
const WRITE_RUN_PAGES: usize = 64;

/// Errors of the memory cache.
#[derive(Debug, thiserror::Error)]
pub enum MemCacheError {
    /// A file-system operation on the cache failed.
    #[error("memory cache: cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the snapshot's pages from the store failed (a page that does not verify
    /// included): nothing was materialised.
    #[error("memory cache: cannot materialise snapshot {id} from the store: {source}")]
    Store {
        /// The snapshot.
        id: String,
        /// The cause.
        #[source]
        source: StoreError,
    },
}

/// Why a snapshot's memory cannot be mapped from the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheMiss {
    /// Never materialised (or evicted).
    #[error("not materialised in {0}")]
    Absent(PathBuf),
    /// The file no longer has the size it was written with.
    #[error("{path} is {got} bytes, the snapshot's memory is {expected}")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Its size now.
        got: u64,
        /// The memory size.
        expected: u64,
    },
    /// The file was written, truncated or replaced after it was materialised.
    #[error("{0} changed after it was materialised (its identity differs from its record)")]
    Changed(PathBuf),
    /// Its record does not decode.
    #[error("the record {path} is unusable: {reason}")]
    BadRecord {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process is evicting it right now.
    #[error("{0} is being evicted")]
    Evicting(PathBuf),
    /// It could not be opened, stat'ed or locked.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The record beside each materialised file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    size: u64,
    dev: u64,
    ino: u64,
    ctime_ns: i128,
    /// Pages written (the rest are holes).
    pages: u64,
}

impl Record {
    fn identity_of(meta: &fs::Metadata) -> (u64, u64, i128) {
        (
            meta.dev(),
            meta.ino(),
            i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        )
    }
}

/// A materialised memory file, open read-only and locked shared for as long as it lives.
#[derive(Debug)]
pub struct CachedMemory {
    /// The file (map it `MAP_PRIVATE`; never write it).
    pub file: File,
    /// Where it is.
    pub path: PathBuf,
    /// Guest memory size, as recorded and checked.
    pub size: u64,
}

/// What [`MemCache::materialise`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialised {
    /// The file.
    pub path: PathBuf,
    /// Pages written (0 when it was already there).
    pub pages_written: u64,
    /// Whether it was there already and intact.
    pub already: bool,
    /// How long it took.
    pub took: Duration,
}

/// What [`MemCache::evict_to`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Entries removed (their keys).
    pub evicted: Vec<String>,
    /// Entries over the bound that were kept because a VMM maps them.
    pub busy: usize,
    /// Bytes the cache occupies afterwards (allocated blocks).
    pub bytes: u64,
}

/// One entry as [`MemCache::entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The content key.
    pub key: String,
    /// Bytes allocated on disk (holes excluded).
    pub allocated: u64,
    /// Last use.
    pub used: SystemTime,
}

/// A folder of materialised snapshot memories. Guest memory is private: the folder is
/// its owner's only (0700, files 0600), or also one group's, that of the VMMs that map it
/// ([`MemCache::readable_by_group`]: 0750, files 0640).
#[derive(Debug, Clone)]
pub struct MemCache {
    dir: PathBuf,
    access: fsutil::Access,
}

impl MemCache {
    /// The cache in `dir` (created when the first file is materialised).
    pub fn new(dir: impl Into<PathBuf>) -> MemCache {
        MemCache {
            dir: dir.into(),
            access: fsutil::Access::default(),
        }
    }

    /// As [`MemCache::new`], what it writes readable by group `gid` too.
    pub fn readable_by_group(dir: impl Into<PathBuf>, gid: u32) -> MemCache {
        MemCache {
            dir: dir.into(),
            access: fsutil::Access { group: Some(gid) },
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The content key of a snapshot's memory: BLAKE3 over the size, page size and the
    /// memory map's chunk hashes, which name every page.
    pub fn key_of(memory: &MemoryRef) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"ember-memory-v1\0");
        h.update(&memory.size_bytes.to_le_bytes());
        h.update(&memory.page_size.to_le_bytes());
        for chunk in &memory.map_chunks {
            h.update(chunk.as_bytes());
        }
        Hash(*h.finalize().as_bytes()).to_hex()
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.mem")),
            self.dir.join(format!("{key}.json")),
        )
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MemCacheError {
        let path = path.to_path_buf();
        move |source| MemCacheError::Io { what, path, source }
    }

    fn read_record(path: &Path) -> Result<Record, CacheMiss> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheMiss::Absent(path.with_extension("mem")))
            }
            Err(source) => {
                return Err(CacheMiss::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| CacheMiss::BadRecord {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if record.version != RECORD_VERSION {
            return Err(CacheMiss::BadRecord {
                path: path.to_path_buf(),
                reason: format!(
                    "version {} (this ember reads {RECORD_VERSION})",
                    record.version
                ),
            });
        }
        Ok(record)
    }

    /// Opens the materialised memory of `memory` for mapping, checked against its record,
    /// and holds a shared lock on it (so it is not evicted while mapped).
    pub fn open(&self, memory: &MemoryRef) -> Result<CachedMemory, CacheMiss> {
        let (mem_path, record_path) = self.paths(&Self::key_of(memory));
        let record = Self::read_record(&record_path)?;
        let io_miss = |source| CacheMiss::Io {
            path: mem_path.clone(),
            source,
        };
        let file = match File::open(&mem_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheMiss::Absent(mem_path))
            }
            Err(e) => return Err(io_miss(e)),
        };
        if !fsutil::try_lock_shared(&file).map_err(io_miss)? {
            return Err(CacheMiss::Evicting(mem_path));
        }
        let meta = file.metadata().map_err(io_miss)?;
        if meta.len() != memory.size_bytes || record.size != memory.size_bytes {
            return Err(CacheMiss::WrongSize {
                path: mem_path,
                got: meta.len(),
                expected: memory.size_bytes,
            });
        }
        if Record::identity_of(&meta) != (record.dev, record.ino, record.ctime_ns) {
            return Err(CacheMiss::Changed(mem_path));
        }
        Ok(CachedMemory {
            file,
            path: mem_path,
            size: memory.size_bytes,
        })
    }

    /// Whether `memory` is materialised and intact (without keeping it locked).
    pub fn contains(&self, memory: &MemoryRef) -> bool {
        self.open(memory).is_ok()
    }

    /// Marks the entry of `memory` as just used (for LRU eviction); best effort.
    pub fn touch(&self, memory: &MemoryRef) {
        let (_, record_path) = self.paths(&Self::key_of(memory));
        if let Ok(file) = OpenOptions::new().write(true).open(&record_path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }

    /// Writes the memory of snapshot `manifest` into the cache from `store`, verifying every
    /// page against its hash. Nothing is done if it is already there and intact; a damaged
    /// entry is replaced.
    pub fn materialise(
        &self,
        store: &Store,
        manifest: &Manifest,
    ) -> Result<Materialised, MemCacheError> {
        let start = Instant::now();
        let key = Self::key_of(&manifest.memory);
        let (mem_path, record_path) = self.paths(&key);
        if self.contains(&manifest.memory) {
            self.touch(&manifest.memory);
            return Ok(Materialised {
                path: mem_path,
                pages_written: 0,
                already: true,
                took: start.elapsed(),
            });
        }
        fs::create_dir_all(&self.dir).map_err(Self::io("create", &self.dir))?;
        self.access
            .apply_to_dir(&self.dir)
            .map_err(Self::io("set the access of", &self.dir))?;
        let store_err = |source| MemCacheError::Store {
            id: manifest.id.clone(),
            source,
        };
        let map = store.load_memory_map(manifest).map_err(store_err)?;
        let tmp = self.dir.join(format!(
            ".{key}.tmp-{}-{}",
            std::process::id(),
            start.elapsed().as_nanos()
        ));
        let written = (|| {
            let file = self
                .access
                .create_new()
                .open(&tmp)
                .map_err(Self::io("create", &tmp))?;
            self.access
                .apply(&file)
                .map_err(Self::io("set the access of", &tmp))?;
            // Held while writing, so eviction never removes a file being written.
            fsutil::lock(&file, fsutil::LockMode::Exclusive).map_err(Self::io("lock", &tmp))?;
            file.set_len(map.size_bytes())
                .map_err(Self::io("size", &tmp))?;
            let pages = write_pages(&file, &tmp, store, &map.pages).map_err(|e| match e {
                WriteError::Store(source) => store_err(source),
                WriteError::Io(e) => e,
            })?;
            file.sync_all().map_err(Self::io("fsync", &tmp))?;
            fs::rename(&tmp, &mem_path).map_err(Self::io("rename into", &mem_path))?;
            fsutil::sync_dir(&self.dir).map_err(Self::io("fsync", &self.dir))?;
            let meta = file.metadata().map_err(Self::io("stat", &mem_path))?;
            let (dev, ino, ctime_ns) = Record::identity_of(&meta);
            Ok(Record {
                version: RECORD_VERSION,
                size: map.size_bytes(),
                dev,
                ino,
                ctime_ns,
                pages,
            })
        })();
        let record = match written {
            Ok(record) => record,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let json = serde_json::to_vec(&record).map_err(|e| MemCacheError::Io {
            what: "encode",
            path: record_path.clone(),
            source: io::Error::other(e),
        })?;
        let record_tmp = self
            .dir
            .join(format!(".{key}.json.tmp-{}", std::process::id()));
        fsutil::write_atomic_with(&record_tmp, &record_path, &json, Some(&self.access))
            .map_err(Self::io("write", &record_path))?;
        Ok(Materialised {
            path: mem_path,
            pages_written: record.pages,
            already: false,
            took: start.elapsed(),
        })
    }

    /// Every entry, least recently used first.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, MemCacheError> {
        let listing = match fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("list", &self.dir)(e)),
        };
        let mut entries = Vec::new();
        for item in listing {
            let item = item.map_err(Self::io("list", &self.dir))?;
            let name = item.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if key.starts_with('.') {
                continue;
            }
            let (mem_path, record_path) = self.paths(key);
            let used = fs::metadata(&record_path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let allocated = fs::metadata(&mem_path).map_or(0, |m| m.blocks() * 512);
            entries.push(CacheEntry {
                key: key.to_string(),
                allocated,
                used,
            });
        }
        entries.sort_by_key(|e| e.used);
        Ok(entries)
    }

    /// Removes least recently used entries until the cache holds at most `limit` bytes,
    /// skipping entries a VMM maps; also removes what an interrupted materialisation left.
    pub fn evict_to(&self, limit: u64) -> Result<EvictReport, MemCacheError> {
        self.remove_abandoned_temporaries();
        let entries = self.entries()?;
        let mut bytes: u64 = entries.iter().map(|e| e.allocated).sum();
        let mut report = EvictReport::default();
        for entry in entries {
            if bytes <= limit {
                break;
            }
            let (mem_path, record_path) = self.paths(&entry.key);
            if let Ok(file) = File::open(&mem_path) {
                if !fsutil::try_lock_exclusive(&file).map_err(Self::io("lock", &mem_path))? {
                    report.busy += 1;
                    continue;
                }
            }
            // The record first: without it the file is never mapped.
            for path in [&record_path, &mem_path] {
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Self::io("remove", path)(e)),
                }
            }
            bytes = bytes.saturating_sub(entry.allocated);
            report.evicted.push(entry.key);
        }
        report.bytes = bytes;
        Ok(report)
    }

    /// Removes what an interrupted materialisation left (temporary files, a memory file
    /// whose record was never written) once it is older than [`ABANDONED_AFTER`] and no
    /// writer holds it.
    fn remove_abandoned_temporaries(&self) {
        let Ok(listing) = fs::read_dir(&self.dir) else {
            return;
        };
        for item in listing.flatten() {
            let path = item.path();
            let name = item.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let orphan = name.strip_suffix(".mem").is_some_and(|key| {
                !key.starts_with('.') && !self.dir.join(format!("{key}.json")).exists()
            });
            if !name.starts_with('.') && !orphan {
                continue;
            }
            let old = item
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > ABANDONED_AFTER);
            if !old {
                continue;
            }
            // A writer holds its temporary file locked; one nobody holds was abandoned.
            if let Ok(file) = File::open(&path) {
                if fsutil::try_lock_exclusive(&file).unwrap_or(false) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
}

enum WriteError {
    Store(StoreError),
    Io(MemCacheError),
}

/// Writes every stored page of `pages` at its offset (zero pages stay holes), reading each
/// from the store with its hash verified; runs of consecutive pages go out in one write.
fn write_pages(
    file: &File,
    path: &Path,
    store: &Store,
    pages: &[PageRef],
) -> Result<u64, WriteError> {
    let mut run = vec![0u8; WRITE_RUN_PAGES * PAGE_SIZE];
    let mut run_start = 0usize;
    let mut run_len = 0usize;
    let mut written = 0u64;
    let flush = |run: &[u8], start: usize| {
        file.write_all_at(run, (start * PAGE_SIZE) as u64)
            .map_err(|e| WriteError::Io(MemCache::io("write", path)(e)))
    };
    for (index, page) in pages.iter().enumerate() {
        let PageRef::Object(hash) = page else {
            continue;
        };
        if run_len == WRITE_RUN_PAGES || (run_len > 0 && run_start + run_len != index) {
            flush(&run[..run_len * PAGE_SIZE], run_start)?;
            run_len = 0;
        }
        if run_len == 0 {
            run_start = index;
        }
        let slot = &mut run[run_len * PAGE_SIZE..(run_len + 1) * PAGE_SIZE];
        let slot: &mut [u8; PAGE_SIZE] = slot.try_into().map_err(|_| {
            WriteError::Io(MemCache::io("fill", path)(io::Error::other("page slot")))
        })?;
        store
            .read_page_into(hash, slot)
            .map_err(WriteError::Store)?;
        run_len += 1;
        written += 1;
    }
    if run_len > 0 {
        flush(&run[..run_len * PAGE_SIZE], run_start)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
