//! Saving a running VM into the store: vCPU and device state, memory (all of it, or only the
//! pages written since the snapshot it came from), disks, and the manifest.

use std::sync::Arc;

use crate::config::*;
use crate::memory::GuestMemoryMmap;
use crate::persist::{encode_state, PersistError};
use crate::snapshot::{BaseImage, SnapshotBase, SnapshotKind, VmSnapshot};
use crate::vmm::*;
use ember_snapshot_store::{DiskMap, DiskRef, Manifest, MemoryMap, MemoryRef, ObjectKind, Store};

/// The name of the rootfs in a manifest's disk list.
pub(crate) const ROOTFS_DISK: &str = "rootfs";

/// The manifest metadata key recording the guest's CPU model (its CPUID feature words).
pub const CPU_MODEL_KEY: &str = "cpu_model";

/// The manifest metadata key recording how many vsock connections a snapshot held.
pub const VSOCK_CONNECTIONS_KEY: &str = "vsock_connections";

/// Guest page `index` (numbered over all regions in address order) as a slice of the VMM's
/// mapping.
pub(crate) fn page_bytes(mem: &GuestMemoryMmap, index: u64) -> Option<&[u8; 4096]> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut first = 0u64;
    for region in mem.iter() {
        let pages = region.len() / 4096;
        if index < first + pages {
            let offset = usize::try_from((index - first) * 4096).ok()?;
            // SAFETY: the page lies inside the region's mapping, owned by `mem` for the
            // lifetime of the returned borrow; callers hold the vCPUs paused and the devices
            // locked, so nothing writes it meanwhile.
            let page = unsafe { &*(region.as_ptr().add(offset) as *const [u8; 4096]) };
            return Some(page);
        }
        first += pages;
    }
    None
}

impl Vmm {
    /// Saves the whole VM into `store` as snapshot `id` and returns its manifest. The vCPUs
    /// are paused first and stay paused; the caller resumes or stops the VM.
    pub fn snapshot(&self, store: &Store, id: &str) -> Result<Manifest, VmmError> {
        self.snapshot_as(store, id, SnapshotKind::Full)
    }

    /// As [`Vmm::snapshot`]; a `Diff` hashes only the pages written since the parent snapshot
    /// (an error if this VM has none yet: it was booted and never saved).
    pub fn snapshot_as(
        &self,
        store: &Store,
        id: &str,
        kind: SnapshotKind,
    ) -> Result<Manifest, VmmError> {
        self.snapshot_labelled(store, id, kind, &std::collections::BTreeMap::new())
    }

    /// As [`Vmm::snapshot_as`], with `labels` in the manifest's metadata (what its caller
    /// needs to know to restore it, such as the image it ran); the VMM's own keys (`kind`,
    /// `vcpus`, `kernel`, ...) win over labels of the same name.
    pub fn snapshot_labelled(
        &self,
        store: &Store,
        id: &str,
        kind: SnapshotKind,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Manifest, VmmError> {
        let fail = |source: PersistError| VmmError::Snapshot {
            id: id.to_string(),
            source: Box::new(source),
        };
        let refuse = |reason: String| fail(PersistError::Refused(reason));
        if self.config.rootfs.is_some()
            && !self.config.read_only_rootfs
            && self.rootfs_cow.is_none()
        {
            return Err(refuse(
                "a rootfs written in place cannot be captured; give the VM a copy-on-write \
                 overlay (the default for `ember run`) or a read-only rootfs"
                    .into(),
            ));
        }
        self.pause()?;
        // Whether the restored guest needs a transport reset: only if it held connections.
        let vsock_connections = self.vsock_connections();
        // Devices must not write guest memory while it is hashed: hold every virtio device
        // (the event loop waits on these locks meanwhile).
        let transports: Vec<_> = self
            .transports
            .iter()
            .map(|t| lock_or_recover(&t.transport))
            .collect();
        let devices: Vec<_> = transports.iter().map(|t| t.device()).collect();
        let device_guards: Vec<_> = devices.iter().map(|d| lock_or_recover(d)).collect();

        let vcpus = crate::vcpu::save_all(&self.vcpus)
            .map_err(|e| fail(e.into()))?
            .into_iter()
            .map(|state| {
                Arc::try_unwrap(state).map_err(|_| refuse("a vCPU state is still shared".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let snap = VmSnapshot {
            vcpu_count: self.config.vcpus,
            mem_bytes: self.config.mem_bytes(),
            rootfs: self.config.rootfs.clone(),
            read_only_rootfs: self.config.read_only_rootfs,
            rootfs_base: match (&self.rootfs_cow, &self.config.rootfs) {
                (Some(_), Some(path)) => {
                    Some(BaseImage::of(path).map_err(|e| refuse(format!("the rootfs: {e}")))?)
                }
                _ => None,
            },
            vsock_cid: self.config.vsock.as_ref().map(|v| v.guest_cid),
            net_mac: self.config.net.as_ref().map(|n| n.mac),
            vm: crate::persist::vm::save_vm(self.vm.fd()).map_err(|e| fail(e.into()))?,
            vcpus,
            serial: lock_or_recover(&self.serial).save_state(),
            // The queues' live positions are the devices' (locked above), not the transports'.
            virtio: self
                .transports
                .iter()
                .zip(transports.iter().zip(&device_guards))
                .map(|(attached, (t, d))| {
                    (attached.id.to_string(), t.save_state_with(d.queue_states()))
                })
                .collect(),
        };
        let blob = encode_state(&snap).map_err(|e| fail(e.into()))?;

        let mut base = lock_or_recover(&self.base);
        let mut writer = store.writer().map_err(|e| fail(e.into()))?;
        let pages = match (kind, base.as_mut()) {
            (SnapshotKind::Diff, None) => {
                return Err(refuse(
                    "a diff snapshot needs a parent: take a full snapshot of this VM first".into(),
                ))
            }
            (SnapshotKind::Diff, Some(parent)) => {
                let dirty = crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                    .map_err(|e| fail(e.into()))?;
                let mut pages = parent
                    .map(store)
                    .map_err(|e| refuse(format!("the parent's memory map: {e}")))?
                    .pages
                    .clone();
                for &index in &dirty {
                    let slot = usize::try_from(index)
                        .ok()
                        .filter(|&i| i < pages.len())
                        .ok_or_else(|| refuse(format!("dirty page {index} is beyond memory")))?;
                    let page = page_bytes(&self.mem, index)
                        .ok_or_else(|| refuse(format!("dirty page {index} is not mapped")))?;
                    pages[slot] = writer.put_page(page).map_err(|e| fail(e.into()))?;
                }
                log::info!(
                    "snapshot {id}: {} pages written since {}",
                    dirty.len(),
                    parent.id
                );
                pages
            }
            (SnapshotKind::Full, _) => {
                let threads = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                let mut pages = Vec::new();
                for region in self.mem.iter() {
                    // SAFETY: the region's mapping is owned by `self.mem` and stays mapped for
                    // this call; the vCPUs are paused and every device is locked, so nothing
                    // writes it.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            region.as_ptr() as *const u8,
                            region.len() as usize,
                        )
                    };
                    pages.extend(
                        writer
                            .put_pages(bytes, threads)
                            .map_err(|e| fail(e.into()))?,
                    );
                }
                // From here on, what is written is what the next diff snapshot stores.
                if base.is_some() {
                    crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                        .map_err(|e| fail(e.into()))?;
                } else {
                    // SAFETY: the same memory, registered again with logging on; it outlives
                    // the VM (field order of `Vmm`).
                    unsafe { self.vm.register_memory_logging_dirty(&self.mem) }
                        .map_err(|e| fail(e.into()))?;
                    crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                        .map_err(|e| fail(e.into()))?;
                }
                pages
            }
        };
        let map = MemoryMap::new(pages);
        let state = writer
            .put(ObjectKind::VmState, &blob)
            .map_err(|e| fail(e.into()))?;
        let map_chunks = map.store(&mut writer).map_err(|e| fail(e.into()))?;
        // The overlay's written chunks (the devices are locked: no request is in flight);
        // chunks it never wrote stay the base image's.
        let disks = match &self.rootfs_cow {
            Some(cow) => {
                let mut chunks = vec![None; cow.chunk_count() as usize];
                // Chunks of the snapshot this VM was restored from that the guest has not
                // touched yet are still that snapshot's objects; reading them from the overlay
                // would load them for nothing. (Listed before the written ones: a chunk loaded
                // meanwhile shows in both, and its written content wins.)
                for index in cow.pending_chunks() {
                    let hash = self
                        .rootfs_chunks
                        .as_ref()
                        .and_then(|c| c.hash_of(index))
                        .ok_or_else(|| refuse(format!("rootfs chunk {index} has no source")))?;
                    if let Some(slot) = chunks.get_mut(index as usize) {
                        *slot = Some(hash);
                    }
                }
                let mut buf = Vec::new();
                for index in cow.written_chunks() {
                    cow.read_chunk(index, &mut buf)
                        .map_err(|e| refuse(format!("reading rootfs chunk {index}: {e}")))?;
                    let hash = writer
                        .put(ObjectKind::DiskChunk, &buf)
                        .map_err(|e| fail(e.into()))?;
                    if let Some(slot) = chunks.get_mut(index as usize) {
                        *slot = Some(hash);
                    }
                }
                let disk = DiskMap {
                    size: cow.size(),
                    chunk_size: cow.chunk_size(),
                    chunks,
                };
                vec![DiskRef {
                    name: ROOTFS_DISK.into(),
                    size: disk.size,
                    chunk_size: disk.chunk_size,
                    map_chunks: disk.store(&mut writer).map_err(|e| fail(e.into()))?,
                }]
            }
            None => Vec::new(),
        };
        let mut manifest = Manifest::new(
            id,
            state,
            MemoryRef {
                size_bytes: map.size_bytes(),
                page_size: 4096,
                map_chunks,
            },
        );
        manifest.parent = base.as_ref().map(|b| b.id.clone());
        manifest.disks = disks;
        manifest.metadata.extend(labels.clone());
        manifest.metadata.insert(
            "kind".into(),
            match kind {
                SnapshotKind::Full => "full",
                SnapshotKind::Diff => "diff",
            }
            .into(),
        );
        manifest
            .metadata
            .insert("vcpus".into(), self.config.vcpus.to_string());
        manifest
            .metadata
            .insert(CPU_MODEL_KEY.into(), self.cpu_model.encode());
        if let Some(count) = vsock_connections {
            manifest
                .metadata
                .insert(VSOCK_CONNECTIONS_KEY.into(), count.to_string());
        }
        manifest
            .metadata
            .insert("kernel".into(), self.config.kernel.display().to_string());
        if let Some(net) = &self.config.net {
            manifest
                .metadata
                .insert("net_mac".into(), format_mac(&net.mac));
        }
        let stats = writer.commit(&manifest).map_err(|e| fail(e.into()))?;
        *base = Some(SnapshotBase::loaded(id, map.clone()));
        log::info!(
            "snapshot {id}: {} pages ({} zero), {} new objects, {} bytes written",
            map.pages.len(),
            map.zero_pages(),
            stats.objects_written,
            stats.bytes_written
        );
        Ok(manifest)
    }
}
