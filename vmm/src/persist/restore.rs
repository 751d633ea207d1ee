//! Building a VM from a snapshot: its memory (mapped, prefetched, lazy or eager), disks as
//! overlays over the store's chunks, devices and vCPUs in their saved state, paused.

use std::sync::Arc;

use ember_devices::virtio::block::CowDisk;

use crate::arch::x86_64::cpu_model::CpuModel;
use crate::config::*;
use crate::device_manager::*;
use crate::persist::snapshot::*;
use crate::persist::PersistError;
use crate::snapshot::{BaseImage, RestoreMode, SnapshotBase, StoreChunks, VmSnapshot};
use crate::vm::{open_kvm, Vm};
use crate::vmm::*;
use ember_snapshot_store::{DiskRef, Manifest, SnapshotIndexing, Store};

/// A fresh overlay over `base_path` whose chunks are a snapshot's rootfs map (chunks the map
/// leaves out are the base image's, which must be the one the snapshot was taken over). The
/// snapshot's chunks are not copied now: each loads from the store on the guest's first use.
fn restore_overlay(
    store: &Arc<Store>,
    disk: &DiskRef,
    base: &BaseImage,
    base_path: &std::path::Path,
    overlay: &std::path::Path,
) -> Result<(Arc<CowDisk>, Arc<StoreChunks>), OverlayError> {
    let now = BaseImage::of(base_path).map_err(|source| OverlayError::Base {
        path: base_path.to_path_buf(),
        source,
    })?;
    if &now != base {
        return Err(OverlayError::BaseChanged {
            path: base_path.to_path_buf(),
            then: format!("{base:?}"),
            now: format!("{now:?}"),
        });
    }
    let map = store.load_disk_map(disk)?;
    let mut cow = CowDisk::create(base_path, overlay, map.chunk_size)?;
    if cow.size() != map.size {
        return Err(OverlayError::Size {
            map: map.size,
            base: cow.size(),
        });
    }
    let chunks = Arc::new(StoreChunks {
        store: store.clone(),
        map,
    });
    cow.load_lazily(chunks.clone(), chunks.stored_chunks())
        .map_err(OverlayError::Lazy)?;
    Ok((Arc::new(cow), chunks))
}

/// Why a snapshot's rootfs overlay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{}: {source}", path.display())]
    Base {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the base image {} changed since the snapshot ({then} then, {now} now)", path.display())]
    BaseChanged {
        path: std::path::PathBuf,
        then: String,
        now: String,
    },
    #[error(transparent)]
    Store(#[from] ember_snapshot_store::StoreError),
    #[error(transparent)]
    Block(#[from] ember_devices::virtio::block::BlockError),
    #[error("the disk map is for {map} bytes, the base image has {base}")]
    Size { map: u64, base: u64 },
    #[error("serving its chunks lazily: {0}")]
    Lazy(#[source] std::io::Error),
}

/// Whether a snapshot's guest held no vsock connections (snapshots that did not record it
/// are taken to have held some).
fn held_no_vsock_connections(manifest: &Manifest) -> bool {
    manifest
        .metadata
        .get(VSOCK_CONNECTIONS_KEY)
        .is_some_and(|count| count == "0")
}

impl Vmm {
    /// Builds a VM from snapshot `id`, paused; `resume` runs it. `config` gives the host side
    /// (vsock socket path); the guest's shape (vCPUs, memory, disk) comes from the snapshot.
    pub fn restore(
        config: &VmConfig,
        store: Arc<Store>,
        id: &str,
        mut options: VmmOptions,
        mode: RestoreMode,
    ) -> Result<Vmm, VmmError> {
        let fail = |source: PersistError| VmmError::Restore {
            id: id.to_string(),
            source: Box::new(source),
        };
        let refuse = |reason: String| fail(PersistError::Refused(reason));
        let timeline = Arc::new(crate::timeline::Timeline::new(options.start));
        let phase = |what: &str| timeline.mark(what);
        let partial = options.partial.take();
        let manifest = match &partial {
            Some(partial) if partial.manifest.id != id => {
                return Err(refuse(format!(
                    "the partial snapshot given is {:?}",
                    partial.manifest.id
                )))
            }
            Some(partial) => partial.manifest.clone(),
            None => store.load_manifest(id).map_err(|e| fail(e.into()))?,
        };
        match store
            .index_snapshot(&manifest)
            .map_err(|e| fail(e.into()))?
        {
            SnapshotIndexing::Listed { loaded } => {
                log::debug!("restore {id}: indexed the {loaded} packs its manifest lists")
            }
            SnapshotIndexing::WholeStore { reason } => {
                log::info!("restore {id}: indexed the whole store ({reason})")
            }
        }
        let blob = store.read(&manifest.vm_state).map_err(|e| fail(e.into()))?;
        let snap: VmSnapshot =
            crate::persist::migrate::load_vm_snapshot(&blob).map_err(|e| fail(e.into()))?;
        phase("manifest_read");
        // The memory map itself is read only where memory comes from the store (the map's
        // length is checked against the manifest's size when it is read).
        if manifest.memory.size_bytes != snap.mem_bytes
            || snap.vcpus.len() != usize::from(snap.vcpu_count)
        {
            return Err(refuse(format!(
                "the snapshot is inconsistent: {} bytes of memory for {} bytes of RAM, {} vCPU states for {} vCPUs",
                manifest.memory.size_bytes,
                snap.mem_bytes,
                snap.vcpus.len(),
                snap.vcpu_count
            )));
        }
        let mut config = config.clone();
        config.vcpus = snap.vcpu_count;
        config.mem_mib =
            u32::try_from(snap.mem_bytes >> 20).map_err(|_| refuse("memory size".into()))?;
        // The disk's path is the caller's (a service's spec) whenever it gives one, never
        // taken on trust from the state a VMM wrote; a restore without one (the CLI's) uses
        // the recorded path. Either way the base image must be the one the snapshot was
        // taken over (its size and modification time are checked).
        config.rootfs = match (&snap.rootfs, &config.rootfs) {
            (None, _) => None,
            (Some(_), Some(given)) => Some(given.clone()),
            (Some(recorded), None) => Some(recorded.clone()),
        };
        config.read_only_rootfs = snap.read_only_rootfs;
        // Where the rootfs overlay goes (restored below, once the working set is loading).
        let overlay_plan = match (&snap.rootfs_base, &config.rootfs) {
            (Some(base), Some(path)) => {
                let overlay = config.rootfs_overlay.clone().ok_or_else(|| {
                    refuse(
                        "the snapshot's rootfs has an overlay: give the restore a path for it"
                            .into(),
                    )
                })?;
                let disk = manifest
                    .disks
                    .iter()
                    .find(|d| d.name == ROOTFS_DISK)
                    .ok_or_else(|| refuse("the manifest has no rootfs disk map".into()))?;
                Some((disk, base, path, overlay))
            }
            _ => {
                config.rootfs_overlay = None;
                None
            }
        };
        if snap.vsock_cid.is_some() != config.vsock.is_some() {
            return Err(refuse(
                "the snapshot's vsock device needs a vsock socket (and only then)".into(),
            ));
        }
        if snap.net_mac.is_some() != config.net.is_some() {
            return Err(refuse(
                "the snapshot's network device needs a TAP (and only then)".into(),
            ));
        }
        config.validate()?;

        // Memory first: a working set starts loading now, while the disk overlay, the VM
        // and its devices are put together.
        let kvm = open_kvm()?;
        let restored = crate::restore_memory::restore_memory(
            &manifest,
            &store,
            options.mem_cache.as_ref(),
            mode,
            partial.as_ref(),
        )
        .map_err(|e| fail(e.into()))?;
        let (mem, lazy) = (restored.mem, restored.lazy);
        log::debug!("restore {id}: memory in mode {}", restored.mode);
        phase("memory_mapped");
        let overlay = match overlay_plan {
            Some((disk, base, path, overlay)) => Some(
                restore_overlay(&store, disk, base, path, &overlay)
                    .map_err(|e| fail(PersistError::Overlay(e)))?,
            ),
            None => None,
        };
        phase("disk_overlay_restored");
        let vm = Vm::new(&kvm)?;
        // Refused before any vCPU exists: a guest cannot be told that a feature it was
        // given is gone.
        let host_model = vm.cpu_model(snap.vcpu_count)?;
        let cpu_model = match manifest.metadata.get(CPU_MODEL_KEY) {
            Some(recorded) => {
                let model = CpuModel::decode(recorded).map_err(|e| fail(e.into()))?;
                model
                    .check_against(&host_model)
                    .map_err(|e| fail(e.into()))?;
                model
            }
            // Saved before models were recorded: assume what this host offers.
            None => host_model,
        };
        // Logging dirty pages from the start makes the next snapshot of this VM a possible
        // diff against this one.
        // SAFETY: as in `build`: `mem` outlives the VM and its vCPUs inside the Vmm.
        unsafe { vm.register_memory_logging_dirty(&mem) }?;
        phase("vm_created");
        let (overlay, rootfs_chunks) = overlay.unzip();
        let devices = attach_devices(&vm, &mem, &config, options, Some(&snap), overlay)
            .map_err(|e| fail(e.into()))?;
        phase("devices_attached");
        // The working set was loading while the VM was put together; let it finish before
        // the guest's clocks are set (REAP's finding: loading it in one go beats racing the
        // guest for it, which on few cores mostly steals the vCPU's time). The VM clock and
        // the vCPUs' TSCs are restored only after that wait, right before the vCPUs run:
        // restored earlier, the guest would find that much time gone at its first
        // instruction (in the lab the agent's first answer after a prefetch restore came in
        // 150-180 ms this way, 210-850 ms with the clocks set before a 0.5-1.4 s wait).
        let mut lazy = lazy;
        if let Some(lazy) = lazy.as_mut() {
            lazy.finish_prefetch();
        }
        phase("working_set_loaded");
        crate::persist::vm::restore_vm(vm.fd(), &snap.vm).map_err(|e| fail(e.into()))?;
        phase("vm_state_restored");

        let mut fds = Vec::with_capacity(snap.vcpus.len());
        for state in &snap.vcpus {
            let index = state.index;
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|e| refuse(format!("creating vCPU {index}: {e}")))?;
            crate::persist::vcpu::restore_vcpu(&fd, state).map_err(|e| fail(e.into()))?;
            fds.push((index, fd));
        }
        // Connections do not survive a snapshot: a guest that held some is told so (its
        // listening sockets stay, and host clients connect again). Only now, with the
        // interrupt controllers and LAPICs restored, can the event's interrupt reach the
        // guest (restoring the irqchip would clear a line raised earlier, and the driver
        // would not see the event until some other vsock interrupt). A snapshot that held
        // only listeners needs no reset: host clients connect at once.
        if let Some(vsock) = &devices.vsock {
            let mut vsock = lock_or_recover(vsock);
            if held_no_vsock_connections(&manifest) {
                vsock.resume_without_reset();
            } else {
                vsock.send_transport_reset();
            }
        }
        phase("devices_built");
        let base = match restored.map {
            Some(map) => SnapshotBase::loaded(id, map),
            None => SnapshotBase::deferred(manifest),
        };
        let mut vmm = Vmm::assemble(config, vm, mem, lazy, Some(base), devices, fds)?;
        vmm.rootfs_chunks = rootfs_chunks;
        vmm.timeline = timeline;
        vmm.cpu_model = cpu_model;
        vmm.restore_mode = Some(restored.mode);
        vmm.mapped_memory = restored.mapped;
        Ok(vmm)
    }
}
