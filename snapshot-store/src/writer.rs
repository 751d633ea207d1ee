//! Writing objects: a [`PackWriter`] appends new objects to its own pack file and seals it.
//!
//! Sealing: flush and fsync the pack, write the index to a temporary name, fsync it, rename
//! it to `<id>.idx`, fsync the directory. Until then the pack has no index: readers ignore
//! it and GC removes it once no writer holds its `flock` (a killed writer releases it).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::fsutil::{self, LockGuard};
use crate::hash::{Hash, HashBuild};
use crate::manifest::Manifest;
use crate::map::{DiskMap, MemoryMap, PageRef, PAGE_SIZE};
use crate::pack::{self, IdxEntry, ObjectKind, RECORD_HEADER_LEN};
use crate::store::{self, SealedPack, Store, StoreError};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Pages hashed per batch by [`PackWriter::put_pages`] before they are appended.
const BATCH_PAGES: usize = 4096;
/// Fewest pages worth a thread of their own.
const MIN_PAGES_PER_THREAD: usize = 256;
const WRITE_BUFFER: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What a writer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// New objects appended.
    pub objects_written: u64,
    /// Bytes appended to packs (stored bytes plus record headers).
    pub bytes_written: u64,
    /// Raw (uncompressed) bytes of the new objects.
    pub raw_bytes_written: u64,
    /// Objects not written because the store (or this writer) already had them.
    pub objects_deduplicated: u64,
    /// Zero pages seen (not stored).
    pub zero_pages: u64,
    /// Zero disk chunks seen (not stored).
    pub zero_chunks: u64,
    /// Packs sealed.
    pub packs_sealed: u64,
}

struct OpenPack {
    id: String,
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    entries: Vec<IdxEntry>,
}

/// Appends objects to new packs. Holds the store lock shared (GC waits) until finished or
/// dropped. Dropping it without [`PackWriter::finish`] discards what it wrote.
pub struct PackWriter<'s> {
    store: &'s Store,
    _lock: Option<LockGuard>,
    /// Skip objects the store's index already has (off for GC, which rewrites packs).
    dedup_against_store: bool,
    current: Option<OpenPack>,
    /// Hashes in `current` (objects in sealed packs are in the store's index).
    pending: HashSet<Hash, HashBuild>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    stats: WriteStats,
}

impl std::fmt::Debug for PackWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter")
            .field("pack", &self.current.as_ref().map(|c| &c.path))
            .field("stats", &self.stats)
            .finish()
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn new_pack_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    let rand = Hash(*h.finalize().as_bytes()).to_hex();
    // Time first, so ids sort by creation.
    format!(
        "{:012x}{}",
        (now.as_millis() as u64) & 0xffff_ffff_ffff,
        &rand[..20]
    )
}

impl OpenPack {
    fn create(dir: &Path, access: &fsutil::Access) -> Result<OpenPack> {
        for _ in 0..16 {
            let id = new_pack_id();
            let path = store::pack_path(dir, &id);
            let file = match access.create_new().open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let result = (|| {
                access.apply(&file)?;
                // Marks the pack as live for GC's orphan sweep; released on close or death.
                fsutil::try_lock_exclusive(&file)?;
                let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
                out.write_all(&pack::pack_header())?;
                Ok(out)
            })();
            return match result {
                Ok(out) => Ok(OpenPack {
                    id,
                    path,
                    out,
                    len: pack::PACK_HEADER_LEN as u64,
                    entries: Vec::new(),
                }),
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    Err(io_err(&path)(e))
                }
            };
        }
        Err(io_err(dir)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not pick an unused pack id",
        )))
    }
}

/// Whether a byte slice is all zeros (memcmp against a static zero page).
fn is_zero(data: &[u8]) -> bool {
    data.chunks(PAGE_SIZE).all(|c| c == &ZERO_PAGE[..c.len()])
}

fn page_ref(page: &[u8]) -> PageRef {
    if page == &ZERO_PAGE[..] {
        PageRef::Zero
    } else {
        PageRef::Object(Hash::of(page))
    }
}

/// Hashes whole pages on up to `threads` threads (zero pages detected first), one result
/// per page. `pages.len()` must be a multiple of 4096.
pub fn hash_pages(pages: &[u8], threads: usize) -> Result<Vec<PageRef>> {
    if !pages.len().is_multiple_of(PAGE_SIZE) {
        return Err(StoreError::Unaligned {
            len: pages.len() as u64,
        });
    }
    let mut out = vec![PageRef::Zero; pages.len() / PAGE_SIZE];
    hash_pages_into(pages, threads, &mut out);
    Ok(out)
}

fn hash_pages_into(pages: &[u8], threads: usize, out: &mut [PageRef]) {
    let n = out.len();
    let threads = threads.min(n.div_ceil(MIN_PAGES_PER_THREAD)).clamp(1, 256);
    if threads == 1 {
        for (p, o) in pages.chunks_exact(PAGE_SIZE).zip(out) {
            *o = page_ref(p);
        }
        return;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (ps, os) in pages.chunks(per * PAGE_SIZE).zip(out.chunks_mut(per)) {
            s.spawn(move || {
                for (p, o) in ps.chunks_exact(PAGE_SIZE).zip(os) {
                    *o = page_ref(p);
                }
            });
        }
    });
}

/// Reads until `buf` is full or end of input; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<'s> PackWriter<'s> {
    pub(crate) fn new(store: &'s Store, lock: LockGuard) -> Result<PackWriter<'s>> {
        PackWriter::with_lock(store, Some(lock), true)
    }

    /// A writer for GC: it runs under GC's exclusive lock and must not skip objects that
    /// live only in the packs being rewritten.
    pub(crate) fn for_gc(store: &'s Store) -> Result<PackWriter<'s>> {
        PackWriter::with_lock(store, None, false)
    }

    fn with_lock(
        store: &'s Store,
        lock: Option<LockGuard>,
        dedup_against_store: bool,
    ) -> Result<PackWriter<'s>> {
        let compressor = match store.options.compress_level {
            Some(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| StoreError::Compression { level, source: e })?,
            ),
            None => None,
        };
        Ok(PackWriter {
            store,
            _lock: lock,
            dedup_against_store,
            current: None,
            pending: HashSet::default(),
            compressor,
            scratch: Vec::new(),
            stats: WriteStats::default(),
        })
    }

    /// What this writer has done so far.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Stores an object (unless the store or this writer already has it); returns its hash.
    pub fn put(&mut self, kind: ObjectKind, data: &[u8]) -> Result<Hash> {
        store::check_object_len(data.len())?;
        let hash = Hash::of(data);
        self.put_hashed(kind, hash, data)?;
        Ok(hash)
    }

    /// Stores a page: zero pages are only counted.
    pub fn put_page(&mut self, page: &[u8; PAGE_SIZE]) -> Result<PageRef> {
        let r = page_ref(page);
        match r {
            PageRef::Zero => self.stats.zero_pages += 1,
            PageRef::Object(h) => self.put_hashed(ObjectKind::Page, h, page)?,
        }
        Ok(r)
    }

    /// Stores a memory region page by page: pages are hashed on up to `threads` threads in
    /// batches, then appended in order. Returns one [`PageRef`] per page.
    pub fn put_pages(&mut self, region: &[u8], threads: usize) -> Result<Vec<PageRef>> {
        if !region.len().is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Unaligned {
                len: region.len() as u64,
            });
        }
        let mut refs = vec![PageRef::Zero; region.len() / PAGE_SIZE];
        for (batch, out) in region
            .chunks(BATCH_PAGES * PAGE_SIZE)
            .zip(refs.chunks_mut(BATCH_PAGES))
        {
            hash_pages_into(batch, threads, out);
            for (page, r) in batch.chunks_exact(PAGE_SIZE).zip(out.iter()) {
                match r {
                    PageRef::Zero => self.stats.zero_pages += 1,
                    PageRef::Object(h) => self.put_hashed(ObjectKind::Page, *h, page)?,
                }
            }
        }
        Ok(refs)
    }

    /// [`PackWriter::put_pages`] returning a [`MemoryMap`].
    pub fn put_memory(&mut self, region: &[u8], threads: usize) -> Result<MemoryMap> {
        Ok(MemoryMap::new(self.put_pages(region, threads)?))
    }

    /// Stores a disk image of `size` bytes read from `image` in chunks of `chunk_size`
    /// (all-zero chunks are not stored).
    pub fn put_disk(
        &mut self,
        image: &mut impl Read,
        size: u64,
        chunk_size: u32,
    ) -> Result<DiskMap> {
        let count = DiskMap::chunk_count(size, chunk_size)?;
        let mut map = DiskMap {
            size,
            chunk_size,
            chunks: Vec::new(),
        };
        let mut buf = vec![0u8; chunk_size as usize];
        for i in 0..count {
            let len = map.chunk_len(i) as usize;
            let got = fill(image, &mut buf[..len]).map_err(|source| StoreError::Io {
                path: "disk image being stored".into(),
                source,
            })?;
            if got < len {
                return Err(StoreError::ShortImage {
                    got: i * u64::from(chunk_size) + got as u64,
                    expected: size,
                });
            }
            if is_zero(&buf[..len]) {
                self.stats.zero_chunks += 1;
                map.chunks.push(None);
            } else {
                map.chunks
                    .push(Some(self.put(ObjectKind::DiskChunk, &buf[..len])?));
            }
        }
        Ok(map)
    }

    pub(crate) fn known(&self, hash: &Hash) -> bool {
        self.pending.contains(hash) || (self.dedup_against_store && self.store.contains(hash))
    }

    /// Stores `data`, whose hash the caller computed (or verified) as `hash`.
    pub(crate) fn put_hashed(&mut self, kind: ObjectKind, hash: Hash, data: &[u8]) -> Result<()> {
        if self.known(&hash) {
            self.stats.objects_deduplicated += 1;
            return Ok(());
        }
        let compress = !data.is_empty()
            && self.compressor.is_some()
            && (kind != ObjectKind::Page || self.store.options.compress_pages);
        let mut compressed = false;
        if compress {
            if let Some(c) = self.compressor.as_mut() {
                self.scratch.clear();
                self.scratch.reserve(data.len());
                // Keep the compressed form only if it saves at least 1/32.
                if let Ok(n) = c.compress_to_buffer(data, &mut self.scratch) {
                    compressed = n < data.len() - data.len() / 32;
                }
            }
        }
        let raw_len = data.len() as u32;
        let flags = kind.flags(compressed);
        if compressed {
            let stored = std::mem::take(&mut self.scratch);
            let r = self.append(hash, &stored, raw_len, flags);
            self.scratch = stored;
            r
        } else {
            self.append(hash, data, raw_len, flags)
        }
    }

    /// GC: copies an object's stored bytes verbatim (already verified by the caller).
    pub(crate) fn copy_stored(&mut self, e: &IdxEntry, stored: &[u8]) -> Result<bool> {
        if self.pending.contains(&e.hash) {
            return Ok(false);
        }
        self.append(e.hash, stored, e.raw_len, e.flags)?;
        Ok(true)
    }

    fn append(&mut self, hash: Hash, stored: &[u8], raw_len: u32, flags: u8) -> Result<()> {
        let record = (RECORD_HEADER_LEN + stored.len()) as u64;
        if let Some(cur) = &self.current {
            if !cur.entries.is_empty() && cur.len + record > self.store.options.pack_target_size {
                self.seal()?;
            }
        }
        let cur = match &mut self.current {
            Some(cur) => cur,
            slot @ None => slot.insert(OpenPack::create(
                &self.store.packs_dir,
                &self.store.access(),
            )?),
        };
        let entry = IdxEntry {
            hash,
            offset: cur.len + RECORD_HEADER_LEN as u64,
            stored_len: stored.len() as u32,
            raw_len,
            flags,
        };
        let io = io_err(&cur.path);
        cur.out
            .write_all(&pack::record_header(&entry))
            .map_err(&io)?;
        cur.out.write_all(stored).map_err(&io)?;
        cur.len += record;
        cur.entries.push(entry);
        self.pending.insert(hash);
        self.stats.objects_written += 1;
        self.stats.bytes_written += record;
        self.stats.raw_bytes_written += u64::from(raw_len);
        Ok(())
    }

    /// Seals the current pack (if any) and adds it to the store's index.
    fn seal(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let OpenPack {
            id,
            path,
            out,
            len,
            mut entries,
        } = cur;
        let dir = &self.store.packs_dir;
        let idx = store::idx_path(dir, &id);
        let sealed = (|| {
            let file = out
                .into_inner()
                .map_err(|e| io_err(&path)(e.into_error()))?;
            file.sync_all().map_err(io_err(&path))?;
            entries.sort_unstable_by_key(|e| e.hash);
            let bytes = pack::encode_idx(&entries, len);
            let tmp = dir.join(store::tmp_name(&id));
            fsutil::write_atomic_with(&tmp, &idx, &bytes, Some(&self.store.access()))
                .map_err(io_err(&idx))?;
            Ok::<File, StoreError>(file)
        })();
        let file = match sealed {
            Ok(f) => f,
            Err(e) => {
                if !idx.exists() {
                    let _ = fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        let bytes = pack::open_sealed_pack(&path, len, self.store.options().map_packs)?;
        {
            let _refresh = self.store.refresh_guard();
            self.store
                .write_index()
                .add(SealedPack { id, path, bytes }, &entries);
        }
        // Only now release the pack's lock: it is sealed.
        drop(file);
        self.pending.clear();
        self.stats.packs_sealed += 1;
        Ok(())
    }

    /// Seals what was written; afterwards every object put is readable through the store.
    /// Objects not referenced by a manifest are garbage for the next GC: prefer
    /// [`PackWriter::commit`], which saves the manifest before releasing the lock.
    pub fn finish(mut self) -> Result<WriteStats> {
        self.seal()?;
        Ok(self.stats.clone())
    }

    /// Seals what was written and saves `manifest` while still holding the store lock, so
    /// no GC can run between the two.
    pub fn commit(mut self, manifest: &Manifest) -> Result<WriteStats> {
        self.seal()?;
        self.store.save_manifest(manifest)?;
        Ok(self.stats.clone())
    }
}

impl Drop for PackWriter<'_> {
    fn drop(&mut self) {
        if let Some(cur) = self.current.take() {
            let OpenPack { path, out, .. } = cur;
            drop(out);
            if let Err(e) = fs::remove_file(&path) {
                log::warn!(
                    "snapshot store: cannot remove unsealed pack {}: {e}",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_matches_across_thread_counts() {
        let mut region = vec![0u8; 1000 * PAGE_SIZE];
        for (i, b) in region.iter_mut().enumerate() {
            if !(i / PAGE_SIZE).is_multiple_of(3) {
                *b = (i % 251) as u8 ^ (i / PAGE_SIZE) as u8;
            }
        }
        let one = hash_pages(&region, 1).unwrap();
        for t in [2, 3, 8, 1000] {
            assert_eq!(hash_pages(&region, t).unwrap(), one);
        }
        assert_eq!(one[0], PageRef::Zero);
        assert_eq!(
            one[1],
            PageRef::Object(Hash::of(&region[PAGE_SIZE..2 * PAGE_SIZE]))
        );
        assert!(hash_pages(&region[1..], 2).is_err());
        assert!(hash_pages(&[], 4).unwrap().is_empty());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 10000]));
        let mut v = vec![0u8; 10000];
        v[9999] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn pack_ids_unique_and_valid() {
        let a = new_pack_id();
        let b = new_pack_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(store::valid_pack_id(&a));
    }
}
