//! Whole-store operations: statistics, verification and garbage collection.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::path::PathBuf;

use crate::fsutil::{self, LockMode};
use crate::hash::{Hash, HashBuild};
use crate::manifest::Manifest;
use crate::map::PageRef;
use crate::pack::{self, IdxEntry, ObjectKind, PACK_HEADER_LEN, RECORD_HEADER_LEN};
use crate::store::{self, decompress_exact, Store, StoreError};
use crate::writer::PackWriter;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Errors of this module are [`StoreError`]s; problems found by `verify` are reported, not
/// raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A pack or its index cannot be loaded.
    UnreadablePack,
    /// An object's stored bytes do not match its hash (or its record header).
    CorruptObject,
    /// A manifest references an object no sealed pack holds.
    MissingObject,
    /// A manifest cannot be loaded.
    BadManifest,
    /// A manifest's memory or disk map cannot be loaded.
    BadMap,
}

/// One problem found by [`Store::verify`].
#[derive(Debug, Clone)]
pub struct Problem {
    /// What kind.
    pub kind: ProblemKind,
    /// The object concerned.
    pub hash: Option<Hash>,
    /// The pack concerned.
    pub pack: Option<PathBuf>,
    /// The snapshot concerned.
    pub manifest: Option<String>,
    /// Details.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if let Some(m) = &self.manifest {
            write!(f, " snapshot {m:?}")?;
        }
        if let Some(h) = &self.hash {
            write!(f, " object {h}")?;
        }
        if let Some(p) = &self.pack {
            write!(f, " pack {}", p.display())?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// What [`Store::verify`] checked and found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Sealed packs checked.
    pub packs_checked: usize,
    /// Objects re-hashed.
    pub objects_checked: u64,
    /// Stored bytes read.
    pub bytes_checked: u64,
    /// Manifests checked.
    pub manifests_checked: usize,
    /// Packs without an index (left by a crashed or running writer; not a problem).
    pub orphan_packs: Vec<String>,
    /// Everything wrong.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// No problems.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Store-wide figures from [`Store::stats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// Snapshots.
    pub manifests: usize,
    /// Sum over snapshots of memory size plus disk sizes.
    pub logical_bytes: u64,
    /// Distinct objects in sealed packs.
    pub unique_objects: usize,
    /// Sealed packs.
    pub packs: usize,
    /// Bytes of sealed pack files.
    pub stored_bytes: u64,
    /// Zero pages over all snapshots' memory maps (not stored).
    pub zero_pages: u64,
    /// `logical_bytes / stored_bytes` (0 when nothing is stored).
    pub dedup_ratio: f64,
}

/// GC tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct GcOptions {
    /// A pack whose live bytes are below this fraction of its data is rewritten (live
    /// objects copied to a new pack, the old one removed).
    pub rewrite_below_live_fraction: f64,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            rewrite_below_live_fraction: 0.5,
        }
    }
}

/// Holds GC off while it lives (see [`Store::hold_gc`]).
#[derive(Debug)]
pub struct GcHold {
    _lock: fsutil::LockGuard,
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Snapshots traced.
    pub manifests: usize,
    /// Distinct objects reachable from them.
    pub live_objects: usize,
    /// Packs kept as they were.
    pub packs_kept: usize,
    /// Packs removed because nothing in them was live.
    pub packs_deleted: usize,
    /// Mostly-dead packs whose live objects were copied to a new pack before removal.
    pub packs_rewritten: usize,
    /// Objects copied by rewrites.
    pub objects_copied: u64,
    /// Objects dropped (dead, or duplicates of an object kept elsewhere).
    pub objects_removed: u64,
    /// Bytes of pack and index files removed.
    pub bytes_removed: u64,
    /// Bytes of new packs written by rewrites.
    pub bytes_written: u64,
    /// Packs without an index removed (left by crashed writers).
    pub orphans_removed: usize,
    /// Packs without an index skipped because a live writer holds them.
    pub orphans_skipped: usize,
    /// Temporary files removed.
    pub temps_removed: usize,
    /// Packs left untouched because they could not be read (see `verify`).
    pub packs_unreadable: Vec<String>,
    /// Packs left untouched because a live object in them is corrupt.
    pub packs_with_corrupt_objects: Vec<String>,
    /// Snapshots whose manifest is corrupt (it can never be restored), moved to
    /// `quarantine/` so that GC goes on without them; their objects are collected.
    pub manifests_quarantined: Vec<String>,
}

enum Fate {
    Keep,
    Delete,
    Rewrite,
}

impl Store {
    /// Store-wide figures (loads every manifest and memory map).
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats::default();
        {
            let idx = self.read_index();
            s.unique_objects = idx.objects.len();
            s.packs = idx.packs.len();
            s.stored_bytes = idx.packs.iter().map(|p| p.bytes.len()).sum();
        }
        for id in self.list_manifests()? {
            let m = self.load_manifest(&id)?;
            s.manifests += 1;
            s.logical_bytes += m.memory.size_bytes + m.disks.iter().map(|d| d.size).sum::<u64>();
            s.zero_pages += self.load_memory_map(&m)?.zero_pages() as u64;
        }
        s.dedup_ratio = if s.stored_bytes == 0 {
            0.0
        } else {
            s.logical_bytes as f64 / s.stored_bytes as f64
        };
        Ok(s)
    }

    /// Re-hashes every object of every sealed pack and checks that everything every
    /// manifest references exists. Problems are reported, not returned as errors.
    pub fn verify(&self) -> Result<VerifyReport> {
        let _lock = self.lock(LockMode::Shared)?;
        self.refresh_locked()?;
        let mut report = VerifyReport::default();
        let scan = store::scan_packs(&self.packs_dir)?;
        report.orphan_packs = scan.orphans;
        let mut present: HashSet<Hash, HashBuild> = HashSet::default();
        let mut buf = Vec::new();
        for id in &scan.sealed {
            let (sealed, entries) =
                match store::load_pack(&self.packs_dir, id, self.options.map_packs) {
                    Ok(p) => p,
                    Err(e) => {
                        report.problems.push(Problem {
                            kind: ProblemKind::UnreadablePack,
                            hash: None,
                            pack: Some(store::pack_path(&self.packs_dir, id)),
                            manifest: None,
                            detail: e.to_string(),
                        });
                        continue;
                    }
                };
            report.packs_checked += 1;
            for e in &entries {
                report.objects_checked += 1;
                report.bytes_checked += u64::from(e.stored_len);
                match check_object(&sealed.bytes, e, &mut buf) {
                    Ok(()) => {
                        present.insert(e.hash);
                    }
                    Err(detail) => report.problems.push(Problem {
                        kind: ProblemKind::CorruptObject,
                        hash: Some(e.hash),
                        pack: Some(sealed.path.clone()),
                        manifest: None,
                        detail: detail.to_string(),
                    }),
                }
            }
        }
        for id in self.list_manifests()? {
            report.manifests_checked += 1;
            let problem = |kind, hash, detail: String| Problem {
                kind,
                hash,
                pack: None,
                manifest: Some(id.clone()),
                detail,
            };
            let m = match self.load_manifest(&id) {
                Ok(m) => m,
                Err(e) => {
                    report
                        .problems
                        .push(problem(ProblemKind::BadManifest, None, e.to_string()));
                    continue;
                }
            };
            let missing = |h: &Hash, what: &str, report: &mut VerifyReport| {
                if !present.contains(h) {
                    report.problems.push(problem(
                        ProblemKind::MissingObject,
                        Some(*h),
                        format!("{what} missing or corrupt"),
                    ));
                }
            };
            missing(&m.vm_state, "vm state", &mut report);
            for h in &m.memory.map_chunks {
                missing(h, "memory map chunk", &mut report);
            }
            for h in m.disks.iter().flat_map(|d| &d.map_chunks) {
                missing(h, "disk map chunk", &mut report);
            }
            match self.load_memory_map(&m) {
                Ok(map) => {
                    let mut seen = HashSet::<Hash, HashBuild>::default();
                    for p in &map.pages {
                        if let PageRef::Object(h) = p {
                            if seen.insert(*h) {
                                missing(h, "memory page", &mut report);
                            }
                        }
                    }
                }
                Err(e) => report
                    .problems
                    .push(problem(ProblemKind::BadMap, None, e.to_string())),
            }
            for d in &m.disks {
                match self.load_disk_map(d) {
                    Ok(map) => {
                        for h in map.chunks.iter().flatten() {
                            missing(h, "disk chunk", &mut report);
                        }
                    }
                    Err(e) => report.problems.push(problem(
                        ProblemKind::BadMap,
                        None,
                        format!("disk {:?}: {e}", d.name),
                    )),
                }
            }
        }
        Ok(report)
    }

    /// Keeps GC from starting until the hold is dropped (a GC under way is waited for): for
    /// objects written ahead of the manifest that will name them, as a restore from a remote
    /// tier writes a snapshot's first pages while the rest are still arriving.
    pub fn hold_gc(&self) -> Result<GcHold> {
        Ok(GcHold {
            _lock: self.lock(LockMode::Shared)?,
        })
    }

    /// Garbage-collects with default options; see [`Store::gc_with`].
    pub fn gc(&self) -> Result<GcReport> {
        self.gc_with(&GcOptions::default())
    }

    /// Under the exclusive store lock (waits for writers to finish): marks every object
    /// reachable from a manifest, deletes packs with nothing live, rewrites mostly-dead
    /// packs (live objects copied to a new sealed pack first, then the old pack removed),
    /// and removes packs without an index that no writer holds, and temporary files.
    /// A manifest that is corrupt (checksum, JSON, format: it can never be restored) is moved
    /// to `quarantine/`, reported, and GC goes on without it. If any other manifest cannot be
    /// fully traced (an I/O error, an object missing from the packs) GC removes nothing and
    /// fails.
    pub fn gc_with(&self, opts: &GcOptions) -> Result<GcReport> {
        let _lock = self.lock(LockMode::Exclusive)?;
        self.refresh_locked()?;
        let mut report = GcReport::default();

        // Mark.
        let mut live: HashSet<Hash, HashBuild> = HashSet::default();
        for id in self.list_manifests()? {
            let abort = |e: StoreError| StoreError::GcAborted(Box::new(e));
            let m = match self.load_manifest(&id) {
                Ok(m) => m,
                Err(StoreError::Manifest(e)) if e.is_corrupt() => {
                    log::warn!("snapshot store gc: quarantining snapshot {id:?}: {e}");
                    self.quarantine_manifest(&id).map_err(abort)?;
                    report.manifests_quarantined.push(id);
                    continue;
                }
                Err(e) => return Err(abort(e)),
            };
            self.mark(&m, &mut live).map_err(abort)?;
            report.manifests += 1;
        }
        report.live_objects = live.len();

        // Decide each sealed pack's fate.
        let scan = store::scan_packs(&self.packs_dir)?;
        let mut packs: Vec<(String, Vec<IdxEntry>, u64, Fate)> = Vec::new();
        for id in &scan.sealed {
            let (pack_len, entries) = match pack::read_idx(&store::idx_path(&self.packs_dir, id)) {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("snapshot store gc: leaving unreadable pack alone: {e}");
                    report.packs_unreadable.push(id.clone());
                    continue;
                }
            };
            let data = pack_len.saturating_sub(PACK_HEADER_LEN as u64).max(1);
            let live_bytes: u64 = entries
                .iter()
                .filter(|e| live.contains(&e.hash))
                .map(|e| u64::from(e.stored_len) + RECORD_HEADER_LEN as u64)
                .sum();
            let fate = if live_bytes == 0 {
                Fate::Delete
            } else if (live_bytes as f64) < opts.rewrite_below_live_fraction * data as f64 {
                Fate::Rewrite
            } else {
                Fate::Keep
            };
            packs.push((id.clone(), entries, pack_len, fate));
        }
        let mut covered: HashSet<Hash, HashBuild> = HashSet::default();
        for (_, entries, _, fate) in &packs {
            if matches!(fate, Fate::Keep) {
                covered.extend(entries.iter().map(|e| e.hash));
            }
        }

        // Copy live objects out of packs being rewritten.
        let mut remove: Vec<(String, Vec<IdxEntry>)> = Vec::new();
        let mut writer = PackWriter::for_gc(self)?;
        let mut buf = Vec::new();
        for (id, entries, pack_len, fate) in packs {
            match fate {
                Fate::Keep => report.packs_kept += 1,
                Fate::Delete => {
                    report.packs_deleted += 1;
                    remove.push((id, entries));
                }
                Fate::Rewrite => {
                    let path = store::pack_path(&self.packs_dir, &id);
                    let bytes = pack::open_sealed_pack(&path, pack_len, self.options.map_packs)?;
                    let mut record = Vec::new();
                    let mut ok = true;
                    for e in entries
                        .iter()
                        .filter(|e| live.contains(&e.hash) && !covered.contains(&e.hash))
                    {
                        if let Err(detail) = check_object(&bytes, e, &mut buf) {
                            log::warn!(
                                "snapshot store gc: live object {} in {} is corrupt ({detail}); keeping the pack",
                                e.hash,
                                path.display()
                            );
                            ok = false;
                            break;
                        }
                        let Some(stored) = bytes.get(e.offset, e.stored_len as usize, &mut record)
                        else {
                            ok = false;
                            break;
                        };
                        if writer.copy_stored(e, stored)? {
                            report.objects_copied += 1;
                        }
                    }
                    if ok {
                        report.packs_rewritten += 1;
                        remove.push((id, entries));
                    } else {
                        report.packs_kept += 1;
                        report.packs_with_corrupt_objects.push(id);
                    }
                }
            }
        }
        // The copies are sealed (and durable) before anything is removed.
        let written = writer.finish()?;
        report.bytes_written = written.bytes_written;

        for (id, entries) in &remove {
            report.objects_removed += entries.len() as u64;
            // Index first: a crash in between leaves an orphan pack, removed next time.
            for path in [
                store::idx_path(&self.packs_dir, id),
                store::pack_path(&self.packs_dir, id),
            ] {
                report.bytes_removed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|source| StoreError::Io { path, source })?;
            }
        }
        report.objects_removed = report.objects_removed.saturating_sub(report.objects_copied);

        // Orphans: packs without an index whose writer is gone (it held an flock).
        for id in &scan.orphans {
            let path = store::pack_path(&self.packs_dir, id);
            let Ok(file) = File::open(&path) else {
                continue;
            };
            match fsutil::try_lock_exclusive(&file) {
                Ok(true) => {
                    report.bytes_removed += file.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(&path).map_err(|source| StoreError::Io { path, source })?;
                    report.orphans_removed += 1;
                }
                Ok(false) => report.orphans_skipped += 1,
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        }
        // Temporary files: nobody writes while GC holds the lock exclusively.
        let mut temps = scan.temps;
        if let Ok(rd) = fs::read_dir(&self.manifests_dir) {
            temps.extend(rd.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
            }));
        }
        for t in temps {
            if fs::remove_file(&t).is_ok() {
                report.temps_removed += 1;
            }
        }
        for dir in [&self.packs_dir, &self.manifests_dir] {
            fsutil::sync_dir(dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        self.refresh_locked()?;
        Ok(report)
    }

    /// Adds everything `m` references to `live`.
    /// Moves manifest `id` out of `manifests/` into `quarantine/` (kept for inspection,
    /// never listed or restored again).
    fn quarantine_manifest(&self, id: &str) -> Result<()> {
        let from = self.manifest_path(id)?;
        let dir = self.root.join("quarantine");
        let io = |path: &std::path::Path, source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let to = dir.join(id);
        fs::rename(&from, &to).map_err(|e| io(&from, e))?;
        crate::fsutil::sync_dir(&self.manifests_dir).map_err(|e| io(&self.manifests_dir, e))
    }

    fn mark(&self, m: &Manifest, live: &mut HashSet<Hash, HashBuild>) -> Result<()> {
        live.extend(m.direct_objects().copied());
        let mem = self.load_memory_map(m)?;
        live.extend(mem.pages.iter().filter_map(|p| match p {
            PageRef::Zero => None,
            PageRef::Object(h) => Some(*h),
        }));
        for d in &m.disks {
            live.extend(self.load_disk_map(d)?.chunks.into_iter().flatten());
        }
        Ok(())
    }
}

/// What is wrong with one object of a pack.
#[derive(Debug, thiserror::Error)]
enum ObjectDefect {
    #[error("record header before start of pack")]
    HeaderBeforeStart,
    #[error("record outside the pack or unreadable")]
    Outside,
    #[error("record header at offset {0} does not match the index entry")]
    HeaderMismatch(u64),
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    #[error(transparent)]
    Decompress(#[from] store::DecompressError),
    #[error("content does not match its hash")]
    Hash,
}

/// Checks one object of a mapped pack: record header, bounds, decompression, hash.
fn check_object(
    pack: &pack::PackBytes,
    e: &IdxEntry,
    buf: &mut Vec<u8>,
) -> Result<(), ObjectDefect> {
    let start = e
        .offset
        .checked_sub(RECORD_HEADER_LEN as u64)
        .ok_or(ObjectDefect::HeaderBeforeStart)?;
    let mut record = Vec::new();
    let bytes = pack
        .get(
            start,
            RECORD_HEADER_LEN + e.stored_len as usize,
            &mut record,
        )
        .ok_or(ObjectDefect::Outside)?;
    let (header, stored) = bytes.split_at(RECORD_HEADER_LEN);
    if header != pack::record_header(e) {
        return Err(ObjectDefect::HeaderMismatch(start));
    }
    if ObjectKind::from_flags(e.flags).is_none() {
        return Err(ObjectDefect::UnknownFlags(e.flags));
    }
    let data: &[u8] = if e.compressed() {
        buf.clear();
        buf.reserve(e.raw_len as usize);
        decompress_exact(stored, buf, e.raw_len as usize)?;
        buf
    } else {
        stored
    };
    if Hash::of(data) != e.hash {
        return Err(ObjectDefect::Hash);
    }
    Ok(())
}
