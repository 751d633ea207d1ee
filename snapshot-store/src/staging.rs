//! Snapshots written by a process the store's owner does not trust (a jailed VMM).
//!
//! The writer sees the shared store read-only. It writes into a staging store of its own
//! ([`Store::open_staging`]): new objects go to the staging store's packs, objects the shared
//! store has already are only referenced, and the manifest is saved there. The store's owner
//! then moves the staging folder out of the writer's reach and [`Store::ingest`]s it: it takes
//! the folder over, reads what the manifest references with bounds checks (never a mapping),
//! verifies every object against its hash, writes the ones it lacks through its own writer and
//! saves the manifest. Nothing the untrusted process wrote becomes a file of the shared store.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::hash::{Hash, HashBuild};
use crate::manifest::Manifest;
use crate::map::{PageRef, PAGE_SIZE};
use crate::pack::ObjectKind;
use crate::store::{Result, Store, StoreError, StoreOptions};
use crate::working_set::MAX_WORKING_SET_PAGES;
use crate::writer::PackWriter;

/// Bound on the entries of a staging folder (packs, indexes, one manifest, temporaries).
const MAX_STAGED_ENTRIES: usize = 4096;

/// What a staged snapshot may hold, from what the owner knows of the sandbox (never from the
/// staged files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimits {
    /// The guest memory size the manifest must state.
    pub memory_bytes: u64,
    /// Most disks, and the largest disk size, the manifest may list.
    pub max_disks: usize,
    pub max_disk_bytes: u64,
    /// Most bytes the staging folder's files may hold together.
    pub max_staged_bytes: u64,
}

/// What an ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Objects read from the staging store, verified and written to this one.
    pub objects_copied: u64,
    /// Their raw bytes.
    pub bytes_copied: u64,
    /// Objects the manifest references that this store had already.
    pub objects_present: u64,
}

/// Why a staged snapshot was refused (besides the store errors reading it).
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("staged snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("staged snapshot {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
}

impl Store {
    /// Opens (creating if needed) a staging store at `root` over `base`, which it only reads:
    /// objects and manifests not found here are looked for in `base`, and writers skip objects
    /// `base` has (they refresh its index when they start).
    pub fn open_staging(
        root: impl AsRef<Path>,
        base: Arc<Store>,
        options: StoreOptions,
    ) -> Result<Store> {
        let mut store = Store::open_unindexed(root, options)?;
        store.base = Some(base);
        store.refresh()?;
        Ok(store)
    }

    /// Ingests snapshot `id` from the staging store at `staged`, which its untrusted writer
    /// can no longer reach by path (the caller moved it). The folder is taken over first
    /// (made this process's, owner-only; anything but directories and regular files, or more
    /// than `limits` allow, is refused), so nothing in it changes but file contents, and every
    /// byte copied is verified after it was read. Afterwards the snapshot is this store's; the
    /// caller removes `staged`.
    pub fn ingest(
        self: &Arc<Self>,
        staged: &Path,
        id: &str,
        limits: &IngestLimits,
    ) -> Result<IngestReport> {
        take_over(staged, limits.max_staged_bytes)?;
        let mut source = Store::open_with(
            staged,
            StoreOptions {
                map_packs: false,
                ..StoreOptions::default()
            },
        )?;
        // The manifest must be the staged one, not a namesake in this store.
        let manifest = source.load_manifest(id)?;
        check_manifest(staged, &manifest, limits)?;
        source.base = Some(self.clone());
        let mut copier = Copier {
            source: &source,
            target: self,
            writer: self.writer()?,
            seen: HashSet::default(),
            report: IngestReport::default(),
        };
        copier.copy_referenced(&manifest)?;
        let Copier { writer, report, .. } = copier;
        writer.commit(&manifest)?;
        Ok(report)
    }
}

impl Store {
    /// Ingests the working set recorded for snapshot `id` into the staging store at
    /// `staged` (out of its writer's reach, as for [`Store::ingest`]), checking its format
    /// and that every page is within the snapshot's `memory_bytes`. `Ok(None)`: none was
    /// recorded.
    pub fn ingest_working_set(
        &self,
        staged: &Path,
        id: &str,
        memory_bytes: u64,
    ) -> Result<Option<usize>> {
        take_over(staged, MAX_WORKING_SET_PAGES as u64 * 8 + 4096)?;
        let source = Store::open_unindexed(staged, StoreOptions::default())?;
        let Some(recorded) = source.load_working_set(id)? else {
            return Ok(None);
        };
        let pages = memory_bytes / PAGE_SIZE as u64;
        if let Some(page) = recorded.pages.iter().find(|&&p| p >= pages) {
            return Err(refused(
                staged,
                format!("its working set names page {page}, beyond the {pages} of the snapshot"),
            ));
        }
        self.save_working_set(id, &recorded.pages, recorded.restores)?;
        Ok(Some(recorded.pages.len()))
    }
}

fn refused(path: &Path, reason: String) -> StoreError {
    StoreError::Staging(StagingError::Refused {
        path: path.to_owned(),
        reason,
    })
}

fn check_manifest(staged: &Path, m: &Manifest, limits: &IngestLimits) -> Result<()> {
    if m.memory.size_bytes != limits.memory_bytes {
        return Err(refused(
            staged,
            format!(
                "its manifest states {} bytes of memory, the sandbox has {}",
                m.memory.size_bytes, limits.memory_bytes
            ),
        ));
    }
    if m.disks.len() > limits.max_disks {
        return Err(refused(
            staged,
            format!(
                "its manifest lists {} disks, at most {} are allowed",
                m.disks.len(),
                limits.max_disks
            ),
        ));
    }
    if let Some(d) = m.disks.iter().find(|d| d.size > limits.max_disk_bytes) {
        return Err(refused(
            staged,
            format!(
                "its manifest lists a disk of {} bytes, above {}",
                d.size, limits.max_disk_bytes
            ),
        ));
    }
    Ok(())
}

/// Copies what a staged manifest references from the staging store into this one.
struct Copier<'a> {
    source: &'a Store,
    target: &'a Store,
    writer: PackWriter<'a>,
    seen: HashSet<Hash, HashBuild>,
    report: IngestReport,
}

impl Copier<'_> {
    fn copy_referenced(&mut self, m: &Manifest) -> Result<()> {
        self.copy(&m.vm_state)?;
        for chunk in &m.memory.map_chunks {
            self.copy(chunk)?;
        }
        // Read through the staging store over this one: verified, wherever each chunk is.
        let memory = self.source.load_memory_map(m)?;
        for page in &memory.pages {
            if let PageRef::Object(hash) = page {
                self.copy(hash)?;
            }
        }
        for disk in &m.disks {
            for chunk in &disk.map_chunks {
                self.copy(chunk)?;
            }
            let map = self.source.load_disk_map(disk)?;
            for hash in map.chunks.iter().flatten() {
                self.copy(hash)?;
            }
        }
        Ok(())
    }

    fn copy(&mut self, hash: &Hash) -> Result<()> {
        if !self.seen.insert(*hash) {
            return Ok(());
        }
        if self.target.contains(hash) {
            self.report.objects_present += 1;
            return Ok(());
        }
        // `read` verifies the content against the hash; the bytes written are those bytes.
        let data = self.source.read(hash)?;
        let kind = self
            .source
            .locate(hash)
            .map_or(ObjectKind::Blob, |l| l.kind);
        self.writer.put_hashed(kind, *hash, &data)?;
        self.report.objects_copied += 1;
        self.report.bytes_copied += data.len() as u64;
        Ok(())
    }
}

/// Makes the staging folder `dir` this process's and owner-only, top down (so that once a
/// folder is checked, its untrusted writer can no longer change what it holds), refusing
/// anything but directories and regular files, and more than `max_bytes` or
/// [`MAX_STAGED_ENTRIES`] in all.
fn take_over(dir: &Path, max_bytes: u64) -> Result<()> {
    let mut budget = Budget {
        bytes: max_bytes,
        entries: MAX_STAGED_ENTRIES,
    };
    take_over_dir(dir, 0, &mut budget)
}

struct Budget {
    bytes: u64,
    entries: usize,
}

fn take_over_dir(dir: &Path, depth: usize, budget: &mut Budget) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| {
            StoreError::Staging(StagingError::Io {
                path: path.clone(),
                source,
            })
        }
    };
    let meta = fs::symlink_metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() || depth > 2 {
        return Err(refused(
            dir,
            "not a directory of a store's shape".to_string(),
        ));
    }
    make_own(dir, &meta, 0o700).map_err(io(dir))?;
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        budget.entries = budget
            .entries
            .checked_sub(1)
            .ok_or_else(|| refused(dir, format!("more than {MAX_STAGED_ENTRIES} entries")))?;
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            take_over_dir(&path, depth + 1, budget)?;
        } else if meta.is_file() {
            budget.bytes = budget.bytes.checked_sub(meta.len()).ok_or_else(|| {
                refused(dir, "its files are larger than the snapshot can be".into())
            })?;
            make_own(&path, &meta, 0o600).map_err(io(&path))?;
        } else {
            return Err(refused(
                &path,
                "neither a directory nor a regular file".into(),
            ));
        }
    }
    Ok(())
}

/// Gives a directory or regular file (checked by the caller, unchanging since: its folder is
/// already this process's) this process's uid and gid, and `mode`.
fn make_own(path: &Path, meta: &fs::Metadata, mode: u32) -> io::Result<()> {
    // SAFETY: geteuid and getegid take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}
