//! Snapshots of a whole VM into the content-addressed store, and the page and chunk sources
//! that serve a restored VM's memory and disk from it.

use std::path::PathBuf;
use std::sync::Arc;

use ember_devices::serial::SerialSnapshot;
use ember_devices::virtio::block::ChunkSource;
use ember_devices::virtio::mmio::MmioTransportState;
use ember_snapshot_store::{DiskMap, Hash, MemoryMap, PageRef, Store, PAGE_SIZE};
use serde::{Deserialize, Serialize};

use crate::lazy::{PageError, PageSource};
use crate::persist::vcpu::VcpuState;
use crate::persist::vm::VmState;

/// Everything but guest memory and disks: stored as one object in the versioned state format
/// (`persist::encode_state`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpu_count: u8,
    pub mem_bytes: u64,
    /// The disk the block device was backed by (read-only disks only, for now).
    pub rootfs: Option<PathBuf>,
    pub read_only_rootfs: bool,
    /// With a copy-on-write rootfs: the base image it was over (its chunks are in the
    /// manifest's `rootfs` disk map; chunks the map leaves out come from this image).
    pub rootfs_base: Option<BaseImage>,
    /// The guest CID of the vsock device, if there was one.
    pub vsock_cid: Option<u32>,
    /// The guest's MAC address, if it had a network device.
    pub net_mac: Option<[u8; 6]>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// The virtio-mmio transports' states by device id (`rootfs`, `vsock`, `net`).
    pub virtio: std::collections::BTreeMap<String, MmioTransportState>,
}

/// What identifies a base image cheaply (hashing gigabytes per snapshot would not be): a
/// restore refuses a base whose size or modification time changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    pub size: u64,
    pub modified_unix_ns: i128,
}

impl BaseImage {
    pub fn of(path: &std::path::Path) -> std::io::Result<BaseImage> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(BaseImage {
            size: meta.len(),
            modified_unix_ns: i128::from(meta.mtime()) * 1_000_000_000
                + i128::from(meta.mtime_nsec()),
        })
    }
}

/// Which pages a snapshot hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every page of guest memory.
    Full,
    /// Only the pages written since the VM's parent snapshot (the one it was restored from
    /// or last saved to), found through KVM's dirty page log and the devices' write bitmap;
    /// every other page is taken from the parent's map.
    Diff,
}

/// The snapshot a running VM's memory equals, but for the pages dirtied since. Its memory
/// map is at hand, or (after a `file` restore, which never needs it to run) read from the
/// store when a diff snapshot first asks for it.
#[derive(Debug)]
pub struct SnapshotBase {
    pub id: String,
    map: Option<MemoryMap>,
    /// Where a deferred map is read from.
    manifest: Option<Box<ember_snapshot_store::Manifest>>,
}

impl SnapshotBase {
    /// A base whose map is at hand.
    pub fn loaded(id: impl Into<String>, map: MemoryMap) -> SnapshotBase {
        SnapshotBase {
            id: id.into(),
            map: Some(map),
            manifest: None,
        }
    }

    /// A base whose map is read from the store on first use.
    pub fn deferred(manifest: ember_snapshot_store::Manifest) -> SnapshotBase {
        SnapshotBase {
            id: manifest.id.clone(),
            map: None,
            manifest: Some(Box::new(manifest)),
        }
    }

    /// The base's memory map (read from `store` the first time if it was deferred).
    pub fn map(&mut self, store: &Store) -> Result<&MemoryMap, ember_snapshot_store::StoreError> {
        let map = match (self.map.take(), &self.manifest) {
            (Some(map), _) => map,
            (None, Some(manifest)) => store.load_memory_map(manifest)?,
            (None, None) => MemoryMap::new(Vec::new()),
        };
        Ok(self.map.insert(map))
    }
}

/// How a restored VM gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RestoreMode {
    /// `File` when the snapshot's memory is materialised in the memory cache, else
    /// `Prefetch`.
    #[default]
    Auto,
    /// The snapshot's materialised memory file is mapped `MAP_PRIVATE` as guest RAM: the
    /// host kernel serves first touches from the page cache and nothing is copied up front.
    /// Falls back to `Prefetch` (and logs why) when the file is missing or damaged.
    File,
    /// Pages are copied in on first touch (userfaultfd); the VM runs at once.
    Lazy,
    /// Every page is copied before the vCPUs start.
    Eager,
    /// As `Lazy`, and the snapshot's recorded working set (if any) is loaded in bulk in the
    /// background from the start; without one, this restore's touched pages can be recorded
    /// for the next (`Vmm::take_working_set`).
    Prefetch,
}

impl RestoreMode {
    /// Every mode, as written.
    pub const NAMES: &'static str = "auto, file, prefetch, lazy or eager";

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Auto => "auto",
            RestoreMode::File => "file",
            RestoreMode::Lazy => "lazy",
            RestoreMode::Eager => "eager",
            RestoreMode::Prefetch => "prefetch",
        }
    }
}

impl std::fmt::Display for RestoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A restore mode name that is not one of [`RestoreMode::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown restore mode {0:?} ({names})", names = RestoreMode::NAMES)]
pub struct UnknownRestoreMode(pub String);

impl std::str::FromStr for RestoreMode {
    type Err = UnknownRestoreMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(RestoreMode::Auto),
            "file" => Ok(RestoreMode::File),
            "lazy" => Ok(RestoreMode::Lazy),
            "eager" => Ok(RestoreMode::Eager),
            "prefetch" => Ok(RestoreMode::Prefetch),
            other => Err(UnknownRestoreMode(other.to_string())),
        }
    }
}

/// Serves guest pages from a snapshot's memory map (each read verifies the page's hash).
pub struct StorePages {
    pub store: Arc<Store>,
    pub map: MemoryMap,
    /// Where pages the store lacks come from (a partial snapshot's); each is checked against
    /// the map's hash here, whoever sent it.
    pub missing: Option<Arc<dyn PageSource>>,
}

impl PageSource for StorePages {
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.map.pages.get(i))
            .ok_or(PageError::BeyondSnapshot {
                index,
                pages: self.map.pages.len(),
            })?;
        match entry {
            PageRef::Zero => Ok(false),
            PageRef::Object(hash) => match &self.missing {
                Some(missing) if !self.store.contains(hash) => {
                    if !missing.read_page(index, buf)? {
                        return Err(PageError::ZeroForObject {
                            index,
                            hash: hash.to_string(),
                        });
                    }
                    if Hash::of(&buf[..]) != *hash {
                        return Err(PageError::WrongContent {
                            index,
                            hash: hash.to_string(),
                        });
                    }
                    Ok(true)
                }
                _ => {
                    self.store.read_page_into(hash, buf)?;
                    Ok(true)
                }
            },
        }
    }
}

/// Serves a restored copy-on-write disk's chunks from the store (each verified against its
/// hash), on the guest's first access to each.
pub struct StoreChunks {
    pub store: Arc<Store>,
    pub map: DiskMap,
}

impl StoreChunks {
    /// The chunks the snapshot holds (the others are the base image's).
    pub fn stored_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.map
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| i as u64)
    }

    /// The object holding chunk `index`, if the snapshot stored it.
    pub fn hash_of(&self, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.map.chunks.get(index).copied().flatten()
    }
}

impl ChunkSource for StoreChunks {
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let hash = self.hash_of(index).ok_or_else(|| {
            std::io::Error::other(format!("disk chunk {index} is not in the snapshot"))
        })?;
        let data = self
            .store
            .read(&hash)
            .map_err(|e| std::io::Error::other(format!("disk chunk {index}: {e}")))?;
        if data.len() != buf.len() {
            return Err(std::io::Error::other(format!(
                "disk chunk {index} ({hash}) holds {} bytes, the disk's chunk is {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_pages_serves_zero_and_stored_pages_and_refuses_others() {
        let dir = std::env::temp_dir().join(format!("ember-snap-test-{}", std::process::id()));
        let store = Arc::new(Store::open(&dir).unwrap());
        let mut writer = store.writer().unwrap();
        let mut memory = vec![0u8; 3 * PAGE_SIZE];
        memory[PAGE_SIZE..2 * PAGE_SIZE].fill(7);
        let map = writer.put_memory(&memory, 1).unwrap();
        writer.finish().unwrap();
        let pages = StorePages {
            store,
            map,
            missing: None,
        };
        let mut buf = [1u8; PAGE_SIZE];
        assert!(!pages.read_page(0, &mut buf).unwrap());
        assert!(pages.read_page(1, &mut buf).unwrap());
        assert_eq!(buf, [7u8; PAGE_SIZE]);
        let beyond = pages.read_page(3, &mut buf).unwrap_err();
        assert!(
            matches!(beyond, PageError::BeyondSnapshot { index: 3, .. }),
            "{beyond}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    /// Sends each page filled with one byte, whatever the snapshot holds.
    struct Filled(u8);

    impl PageSource for Filled {
        fn read_page(&self, _index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError> {
            buf.fill(self.0);
            Ok(self.0 != 0)
        }
    }

    #[test]
    fn pages_the_store_lacks_come_from_elsewhere_and_are_checked_against_their_hash() {
        let dir = std::env::temp_dir().join(format!("ember-snap-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (whole, partial) = (dir.join("whole"), dir.join("partial"));
        let full = Store::open(&whole).unwrap();
        let mut writer = full.writer().unwrap();
        let mut memory = vec![0u8; 3 * PAGE_SIZE];
        memory[PAGE_SIZE..2 * PAGE_SIZE].fill(7);
        memory[2 * PAGE_SIZE..].fill(9);
        let map = writer.put_memory(&memory, 1).unwrap();
        writer.finish().unwrap();
        // This store has page 2's content only.
        let store = Arc::new(Store::open(&partial).unwrap());
        let mut writer = store.writer().unwrap();
        writer.put_page(&[9u8; PAGE_SIZE]).unwrap();
        writer.finish().unwrap();
        let pages = |source: u8| StorePages {
            store: store.clone(),
            map: map.clone(),
            missing: Some(Arc::new(Filled(source))),
        };
        let mut buf = [1u8; PAGE_SIZE];
        // The right content is taken; the store's own pages never go elsewhere.
        assert!(pages(7).read_page(1, &mut buf).unwrap());
        assert_eq!(buf, [7u8; PAGE_SIZE]);
        assert!(pages(5).read_page(2, &mut buf).unwrap());
        assert_eq!(buf, [9u8; PAGE_SIZE]);
        // Wrong content, or a zero page for a stored one, is refused.
        let wrong = pages(5).read_page(1, &mut buf).unwrap_err();
        assert!(
            matches!(wrong, PageError::WrongContent { index: 1, .. }),
            "{wrong}"
        );
        let zero = pages(0).read_page(1, &mut buf).unwrap_err();
        assert!(
            matches!(zero, PageError::ZeroForObject { index: 1, .. }),
            "{zero}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
