//! Reading VM state written in an older state format.
//!
//! Format 3 (ember before the state format had a minor version) kept the virtio transports as
//! a list in slot order: the root disk's if the VM had a rootfs, then the vsock device's if it
//! had one, then the network device's if it had one. Format 4 keys them by device id; the
//! rest is unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ember_devices::serial::SerialSnapshot;
use ember_devices::virtio::mmio::MmioTransportState;
use serde::Deserialize;

use super::vcpu::VcpuState;
use super::vm::VmState;
use super::{open_state, StateFormatError, StateVersion};
use crate::device_manager::{NET_DEVICE, ROOTFS_DEVICE, VSOCK_DEVICE};
use crate::snapshot::{BaseImage, VmSnapshot};

/// The older formats this ember migrates.
pub const MIGRATES_FROM: StateVersion = StateVersion { major: 3, minor: 0 };

/// A VM's state as format 3 stored it.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct VmSnapshotV3 {
    vcpu_count: u8,
    mem_bytes: u64,
    rootfs: Option<PathBuf>,
    read_only_rootfs: bool,
    rootfs_base: Option<BaseImage>,
    vsock_cid: Option<u32>,
    net_mac: Option<[u8; 6]>,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SerialSnapshot,
    virtio: Vec<MmioTransportState>,
}

/// Errors migrating an older state.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Format(#[from] StateFormatError),
    #[error(
        "VM state format {MIGRATES_FROM} lists {listed} virtio devices, but its VM had {expected} \
         ({ids:?})"
    )]
    DeviceCount {
        listed: usize,
        expected: usize,
        ids: Vec<&'static str>,
    },
}

/// A snapshot's VM state, from a blob in this ember's format or one it migrates.
pub fn load_vm_snapshot(blob: &[u8]) -> Result<VmSnapshot, MigrateError> {
    let (version, payload) = open_state(blob)?;
    if version.is_readable() {
        return Ok(postcard::from_bytes(payload).map_err(StateFormatError::Decode)?);
    }
    if version.major != MIGRATES_FROM.major {
        return Err(StateFormatError::UnsupportedVersion { found: version }.into());
    }
    let old: VmSnapshotV3 = postcard::from_bytes(payload).map_err(StateFormatError::Decode)?;
    log::info!(
        "VM state format {version} migrated to {}",
        super::STATE_FORMAT
    );
    from_v3(old)
}

fn from_v3(old: VmSnapshotV3) -> Result<VmSnapshot, MigrateError> {
    let ids: Vec<&'static str> = [
        old.rootfs.is_some().then_some(ROOTFS_DEVICE),
        old.vsock_cid.is_some().then_some(VSOCK_DEVICE),
        old.net_mac.is_some().then_some(NET_DEVICE),
    ]
    .into_iter()
    .flatten()
    .collect();
    if ids.len() != old.virtio.len() {
        return Err(MigrateError::DeviceCount {
            listed: old.virtio.len(),
            expected: ids.len(),
            ids,
        });
    }
    let virtio: BTreeMap<String, MmioTransportState> = ids
        .iter()
        .map(|id| id.to_string())
        .zip(old.virtio)
        .collect();
    Ok(VmSnapshot {
        vcpu_count: old.vcpu_count,
        mem_bytes: old.mem_bytes,
        rootfs: old.rootfs,
        read_only_rootfs: old.read_only_rootfs,
        rootfs_base: old.rootfs_base,
        vsock_cid: old.vsock_cid,
        net_mac: old.net_mac,
        vm: old.vm,
        vcpus: old.vcpus,
        serial: old.serial,
        virtio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::{encode_state, seal_state_as, STATE_FORMAT};

    fn transport(device_type: u32) -> MmioTransportState {
        MmioTransportState {
            device_type,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: true,
            interrupt_status: 0,
            queues: Vec::new(),
        }
    }

    fn serial() -> SerialSnapshot {
        SerialSnapshot {
            baud_divisor_low: 12,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 1,
            line_control: 3,
            line_status: 0x60,
            modem_control: 0,
            modem_status: 0,
            scratch: 0,
            in_buffer: Vec::new(),
        }
    }

    fn vm_state() -> VmState {
        VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        }
    }

    /// A format-3 state of a VM with a rootfs and a network device (no vsock): block (2),
    /// then net (1).
    fn format_3(virtio: Vec<MmioTransportState>) -> Vec<u8> {
        let old = VmSnapshotV3 {
            vcpu_count: 1,
            mem_bytes: 256 << 20,
            rootfs: Some("/images/rootfs.ext4".into()),
            read_only_rootfs: false,
            rootfs_base: None,
            vsock_cid: None,
            net_mac: Some([6, 0, 0, 0, 0, 1]),
            vm: vm_state(),
            vcpus: Vec::new(),
            serial: serial(),
            virtio,
        };
        seal_state_as(MIGRATES_FROM, &postcard::to_stdvec(&old).unwrap())
    }

    #[test]
    fn a_format_3_state_is_migrated_with_its_devices_keyed_by_id() {
        let snap = load_vm_snapshot(&format_3(vec![transport(2), transport(1)])).unwrap();
        let types: Vec<(&str, u32)> = snap
            .virtio
            .iter()
            .map(|(id, t)| (id.as_str(), t.device_type))
            .collect();
        assert_eq!(types, [(NET_DEVICE, 1), (ROOTFS_DEVICE, 2)]);
        assert_eq!(snap.net_mac, Some([6, 0, 0, 0, 0, 1]));
        assert_eq!(snap.serial, serial());
    }

    #[test]
    fn a_format_3_state_whose_devices_do_not_fit_its_vm_is_refused() {
        let err = load_vm_snapshot(&format_3(vec![transport(2)])).unwrap_err();
        assert!(
            err.to_string()
                .contains("lists 1 virtio devices, but its VM had 2"),
            "{err}"
        );
    }

    #[test]
    fn formats_neither_read_nor_migrated_are_refused_naming_both_versions() {
        for major in [2, 5] {
            let blob = seal_state_as(StateVersion { major, minor: 0 }, b"whatever");
            let err = load_vm_snapshot(&blob).unwrap_err().to_string();
            assert!(
                err.contains(&format!("format {major}.0 is not supported"))
                    && err.contains(&format!("writes {STATE_FORMAT}"))
                    && err.contains(&MIGRATES_FROM.to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn the_current_format_round_trips() {
        let snap = VmSnapshot {
            vcpu_count: 1,
            mem_bytes: 128 << 20,
            rootfs: None,
            read_only_rootfs: false,
            rootfs_base: None,
            vsock_cid: Some(3),
            net_mac: None,
            vm: vm_state(),
            vcpus: Vec::new(),
            serial: serial(),
            virtio: [(VSOCK_DEVICE.to_string(), transport(19))].into(),
        };
        let loaded = load_vm_snapshot(&encode_state(&snap).unwrap()).unwrap();
        assert_eq!(loaded.virtio, snap.virtio);
        assert_eq!(loaded.vsock_cid, Some(3));
    }
}
