//! Recorded working sets: the guest pages a restored snapshot touched until its first command
//! finished, in first-touch order. A later restore of the same snapshot loads them in bulk
//! before the guest asks (REAP-style prefetch).
//!
//! One file per snapshot under `workingsets/`: magic, the number of restores it was recorded
//! from (u32, then 4 zero bytes), page count, the pages as little-endian u64s, and a BLAKE3
//! checksum of everything before it (files of the first format, without the restore count,
//! are read as recorded from one). Written atomically; a working set is advisory, so a damaged
//! one is reported and the restore falls back to plain lazy loading.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::fsutil;
use crate::manifest::validate_id;
use crate::store::{Result, Store, StoreError};

const MAGIC: &[u8; 8] = b"EMBRWST2";
/// The first format's magic: no restore count.
const MAGIC_V1: &[u8; 8] = b"EMBRWSET";
/// Bound on a working set's length (1 Mi pages = 4 GiB of touched memory).
pub const MAX_WORKING_SET_PAGES: usize = 1 << 20;

/// A snapshot's recorded working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedWorkingSet {
    /// Guest page numbers, in first-touch order.
    pub pages: Vec<u64>,
    /// How many restores' touched pages it is the union of.
    pub restores: u32,
}

/// What is wrong with a working set's bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("malformed working set: {0}")]
pub struct MalformedWorkingSet(pub String);

impl RecordedWorkingSet {
    /// Its bytes as a store keeps them (and a remote tier too).
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_pages(&self.pages, self.restores)
    }

    fn encode_pages(pages: &[u64], restores: u32) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(24 + pages.len() * 8 + 32);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&restores.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 4]);
        bytes.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        for page in pages {
            bytes.extend_from_slice(&page.to_le_bytes());
        }
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        bytes
    }

    /// Reads [`RecordedWorkingSet::encode`]'s bytes (or the first format's), checked; the
    /// error says what is wrong with them.
    pub fn decode(bytes: &[u8]) -> std::result::Result<RecordedWorkingSet, MalformedWorkingSet> {
        let bad = |reason: &str| MalformedWorkingSet(reason.to_string());
        let header = match bytes.get(..8) {
            Some(magic) if magic == MAGIC => 16,
            Some(magic) if magic == MAGIC_V1 => 8,
            _ => return Err(bad("wrong magic or too short")),
        };
        if bytes.len() < header + 8 + 32 {
            return Err(bad("too short"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch"));
        }
        let restores = match header {
            16 => u32::from_le_bytes(body[8..12].try_into().unwrap_or_default()),
            _ => 1,
        };
        let count = u64::from_le_bytes(body[header..header + 8].try_into().unwrap_or_default());
        let listed = &body[header + 8..];
        if count > MAX_WORKING_SET_PAGES as u64 || listed.len() as u64 != count * 8 {
            return Err(MalformedWorkingSet(format!(
                "declares {count} pages but holds {} bytes of them",
                listed.len()
            )));
        }
        Ok(RecordedWorkingSet {
            pages: listed
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            restores,
        })
    }
}

impl Store {
    fn working_set_path(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        Ok(self.root().join("workingsets").join(id))
    }

    /// Saves the working set recorded for snapshot `id` from `restores` restores, replacing an
    /// earlier one.
    pub fn save_working_set(&self, id: &str, pages: &[u64], restores: u32) -> Result<()> {
        let path = self.working_set_path(id)?;
        let fail = |reason: String| StoreError::WorkingSet {
            id: id.to_string(),
            path: path.clone(),
            reason,
        };
        if pages.len() > MAX_WORKING_SET_PAGES {
            return Err(fail(format!(
                "{} pages is above the bound of {MAX_WORKING_SET_PAGES}",
                pages.len()
            )));
        }
        // Only a snapshot that exists gets one (and `delete_manifest` removes it).
        self.load_manifest(id)?;
        let dir = path.parent().map(PathBuf::from).unwrap_or_default();
        fsutil::ensure_dir(&dir, &self.access()).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let bytes = RecordedWorkingSet::encode_pages(pages, restores);
        let tmp = dir.join(format!(".{id}.tmp-{}", std::process::id()));
        fsutil::write_atomic_with(&tmp, &path, &bytes, Some(&self.access())).map_err(|source| {
            StoreError::Io {
                path: path.clone(),
                source,
            }
        })
    }

    /// The working set recorded for snapshot `id`: `Ok(None)` if none was recorded, an error
    /// if the file is damaged.
    pub fn load_working_set(&self, id: &str) -> Result<Option<RecordedWorkingSet>> {
        let path = self.working_set_path(id)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        RecordedWorkingSet::decode(&bytes)
            .map(Some)
            .map_err(|e| StoreError::WorkingSet {
                id: id.to_string(),
                path,
                reason: e.0,
            })
    }

    /// Forgets snapshot `id`'s working set (a missing one is fine).
    pub fn delete_working_set(&self, id: &str) -> Result<()> {
        let path = self.working_set_path(id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{RecordedWorkingSet, MAGIC_V1};
    use crate::{Manifest, MemoryRef, Store};

    fn store_with_snapshot(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ember-ws-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let mut w = store.writer().unwrap();
        let map = w.put_memory(&vec![1u8; 8192], 1).unwrap();
        let state = w.put(crate::ObjectKind::VmState, b"state").unwrap();
        let map_chunks = map.store(&mut w).unwrap();
        let m = Manifest::new(
            "snap",
            state,
            MemoryRef {
                size_bytes: map.size_bytes(),
                page_size: 4096,
                map_chunks,
            },
        );
        w.commit(&m).unwrap();
        (store, dir)
    }

    #[test]
    fn round_trips_and_is_removed_with_its_snapshot() {
        let (store, dir) = store_with_snapshot("rt");
        assert_eq!(store.load_working_set("snap").unwrap(), None);
        store.save_working_set("snap", &[5, 1, 9], 1).unwrap();
        let recorded = |pages: Vec<u64>, restores| Some(RecordedWorkingSet { pages, restores });
        assert_eq!(
            store.load_working_set("snap").unwrap(),
            recorded(vec![5, 1, 9], 1)
        );
        store.save_working_set("snap", &[2], 3).unwrap();
        assert_eq!(
            store.load_working_set("snap").unwrap(),
            recorded(vec![2], 3)
        );
        assert!(store.save_working_set("nosuch", &[1], 1).is_err());
        store.delete_manifest("snap").unwrap();
        assert_eq!(store.load_working_set("snap").unwrap(), None);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn damage_is_reported_not_trusted() {
        let (store, dir) = store_with_snapshot("dmg");
        store.save_working_set("snap", &[5, 1, 9], 1).unwrap();
        let path = dir.join("workingsets/snap");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = store.load_working_set("snap").unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(store.load_working_set("snap").is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_working_set_of_the_first_format_reads_as_recorded_from_one_restore() {
        let (store, dir) = store_with_snapshot("v1");
        std::fs::create_dir_all(dir.join("workingsets")).unwrap();
        let mut bytes = MAGIC_V1.to_vec();
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(&3u64.to_le_bytes());
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        std::fs::write(dir.join("workingsets/snap"), &bytes).unwrap();
        assert_eq!(
            store.load_working_set("snap").unwrap(),
            Some(RecordedWorkingSet {
                pages: vec![7, 3],
                restores: 1
            })
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
