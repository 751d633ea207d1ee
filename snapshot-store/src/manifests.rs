//! Manifests in a store: saved once each (every object they reference checked to be there
//! first), loaded and checked, listed, deleted; and the maps they point at.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::fsutil::{self, LockMode};
use crate::hash::Hash;
use crate::manifest::{self, DiskRef, Manifest, ManifestError, MAX_MANIFEST_SIZE};
use crate::map::{self, DiskMap, MapError, MemoryMap, PageRef, PAGE_SIZE};
use crate::store::{tmp_name, Index, Result, Store, StoreError};

impl Store {
    pub(crate) fn manifest_path(&self, id: &str) -> Result<PathBuf> {
        manifest::validate_id(id)?;
        Ok(self.manifests_dir.join(id))
    }

    /// Saves a snapshot's manifest after checking that every object it references (state,
    /// map chunks, and every page and disk chunk behind the maps) is in a sealed pack.
    /// Snapshot ids are write-once: saving over an existing id fails.
    /// The manifest written lists the packs holding those objects (see [`Manifest::packs`]).
    pub fn save_manifest(&self, m: &Manifest) -> Result<()> {
        let path = self.manifest_path(&m.id)?;
        let _lock = self.lock(LockMode::Shared)?;
        let packs = self.check_references(m)?;
        let m = &Manifest {
            packs: packs.into_iter().collect(),
            ..m.clone()
        };
        let bytes = manifest::encode(m)?;
        let tmp = self.manifests_dir.join(tmp_name(&m.id));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let result = (|| {
            let mut f = self.access().create_new().open(&tmp).map_err(io(&tmp))?;
            self.access().apply(&f).map_err(io(&tmp))?;
            io::Write::write_all(&mut f, &bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            // A hard link never replaces an existing manifest, and is atomic.
            fs::hard_link(&tmp, &path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    StoreError::Manifest(ManifestError::Exists {
                        id: m.id.clone(),
                        path: path.clone(),
                    })
                } else {
                    io(&path)(source)
                }
            })
        })();
        let _ = fs::remove_file(&tmp);
        result?;
        fsutil::sync_dir(&self.manifests_dir).map_err(io(&self.manifests_dir))
    }

    /// Checks that everything `m` references is in a sealed pack; returns those packs' ids.
    pub(crate) fn check_references(&self, m: &Manifest) -> Result<BTreeSet<String>> {
        let missing = |hash: &Hash, what| StoreError::MissingReference {
            manifest: m.id.clone(),
            hash: *hash,
            what,
        };
        // Packs by their position in the index; the ids are looked up once at the end.
        let mut used: HashSet<u32> = HashSet::new();
        {
            let idx = self.read_index();
            let direct = std::iter::once((&m.vm_state, "vm state"))
                .chain(m.memory.map_chunks.iter().map(|h| (h, "memory map chunk")))
                .chain(
                    m.disks
                        .iter()
                        .flat_map(|d| &d.map_chunks)
                        .map(|h| (h, "disk map chunk")),
                );
            for (h, what) in direct {
                note_reference(&idx, self.base.as_deref(), &mut used, h)
                    .ok_or_else(|| missing(h, what))?;
            }
        }
        let mem = self.load_memory_map(m)?;
        let disks = m
            .disks
            .iter()
            .map(|d| self.load_disk_map(d))
            .collect::<Result<Vec<_>>>()?;
        let idx = self.read_index();
        let base = self.base.as_deref();
        for p in &mem.pages {
            if let PageRef::Object(h) = p {
                note_reference(&idx, base, &mut used, h)
                    .ok_or_else(|| missing(h, "memory page"))?;
            }
        }
        for h in disks.iter().flat_map(|d| d.chunks.iter().flatten()) {
            note_reference(&idx, base, &mut used, h).ok_or_else(|| missing(h, "disk chunk"))?;
        }
        Ok(used
            .into_iter()
            .filter_map(|n| idx.packs.get(n as usize).map(|p| p.id.clone()))
            .collect())
    }

    /// Loads snapshot `id`'s manifest.
    pub fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let path = self.manifest_path(id)?;
        let io = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                ManifestError::NotFound {
                    id: id.to_owned(),
                    path: path.clone(),
                }
            } else {
                ManifestError::Io {
                    path: path.clone(),
                    source,
                }
            }
        };
        let file = match (File::open(&path), &self.base) {
            (Err(e), Some(base)) if e.kind() == io::ErrorKind::NotFound => {
                return base.load_manifest(id)
            }
            (file, _) => file.map_err(io)?,
        };
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge {
                path,
                len,
                max: MAX_MANIFEST_SIZE,
            }
            .into());
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(MAX_MANIFEST_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Ok(manifest::decode(&path, id, &bytes)?)
    }

    /// Every snapshot id, sorted.
    pub fn list_manifests(&self) -> Result<Vec<String>> {
        let io = |source| StoreError::Io {
            path: self.manifests_dir.clone(),
            source,
        };
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.manifests_dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if let Some(name) = entry.file_name().to_str() {
                if manifest::validate_id(name).is_ok() {
                    ids.push(name.to_owned());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Deletes snapshot `id` (its objects become garbage for the next GC unless shared).
    pub fn delete_manifest(&self, id: &str) -> Result<()> {
        let path = self.manifest_path(id)?;
        fs::remove_file(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                StoreError::Manifest(ManifestError::NotFound {
                    id: id.to_owned(),
                    path: path.clone(),
                })
            } else {
                StoreError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        fsutil::sync_dir(&self.manifests_dir).map_err(|source| StoreError::Io {
            path: self.manifests_dir.clone(),
            source,
        })?;
        self.delete_working_set(id)
    }

    /// Loads a snapshot's memory map, checking it against the manifest's memory size.
    pub fn load_memory_map(&self, m: &Manifest) -> Result<MemoryMap> {
        if m.memory.page_size as usize != PAGE_SIZE {
            return Err(MapError::PageSize(u64::from(m.memory.page_size)).into());
        }
        if !m.memory.size_bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MapError::UnalignedSize(m.memory.size_bytes).into());
        }
        let pages = m.memory.size_bytes / PAGE_SIZE as u64;
        map::check_chunk_count("memory", m.memory.map_chunks.len(), pages)?;
        let map = MemoryMap::load(self, &m.memory.map_chunks)?;
        if map.pages.len() as u64 != pages {
            return Err(MapError::EntryCount {
                what: "memory",
                got: map.pages.len() as u64,
                expected: pages,
            }
            .into());
        }
        Ok(map)
    }

    /// Loads one of a snapshot's disk maps.
    pub fn load_disk_map(&self, d: &DiskRef) -> Result<DiskMap> {
        DiskMap::load(self, d.size, d.chunk_size, &d.map_chunks)
    }
}

/// Notes the pack of a referenced object in `used`: `None` when neither this store nor its
/// base (whose packs a staging manifest does not list) has it.
fn note_reference(
    idx: &Index,
    base: Option<&Store>,
    used: &mut HashSet<u32>,
    hash: &Hash,
) -> Option<()> {
    match idx.objects.get(hash) {
        Some(loc) => {
            used.insert(loc.pack);
            Some(())
        }
        None => base.filter(|b| b.contains(hash)).map(|_| ()),
    }
}
