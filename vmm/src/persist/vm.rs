//! VM-wide KVM state: the interrupt controllers, the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring VM-wide state; each names the KVM call that failed.
#[derive(Debug, thiserror::Error)]
#[error("VM state: {call} failed: {source}")]
pub struct VmStateError {
    call: &'static str,
    source: kvm_ioctls::Error,
}

fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { call, source }
}

/// The in-kernel devices' state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn read_chip(fd: &VmFd, chip_id: u32, call: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm(call))?;
    Ok(chip)
}

/// Saves the VM-wide state of a VM whose vCPUs are paused.
pub fn save_vm(fd: &VmFd) -> Result<VmState, VmStateError> {
    Ok(VmState {
        pic_master: read_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: read_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: read_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores VM-wide state into a VM created with an in-kernel irqchip and PIT, before its
/// vCPUs are restored.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    fd.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // The clock value, advanced by the wall-clock time since the snapshot where the saving
    // host's KVM recorded its wall clock (KVM_CLOCK_REALTIME): the guest's kvmclock is then
    // current from its first instruction. KVM_SET_CLOCK accepts no other flag back.
    let realtime = state.clock.flags & KVM_CLOCK_REALTIME != 0;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: if realtime { KVM_CLOCK_REALTIME } else { 0 },
        realtime: if realtime { state.clock.realtime } else { 0 },
        ..Default::default()
    };
    match fd.set_clock(&clock) {
        Ok(()) => {}
        // A host kernel older than the flag refuses it: restore the plain value there.
        Err(_) if realtime => {
            let plain = kvm_clock_data {
                clock: state.clock.clock,
                ..Default::default()
            };
            fd.set_clock(&plain).map_err(kvm("KVM_SET_CLOCK"))?;
        }
        Err(e) => return Err(kvm("KVM_SET_CLOCK")(e)),
    }
    fd.set_irqchip(&state.pic_master)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
    fd.set_irqchip(&state.pic_slave)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
    fd.set_irqchip(&state.ioapic)
        .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};

    #[test]
    fn save_and_restore_a_real_vm() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        let state = save_vm(&vm).unwrap();
        let blob = crate::persist::encode_state(&state).unwrap();
        let decoded: VmState = crate::persist::decode_state(&blob).unwrap();

        let other = kvm.create_vm().unwrap();
        other.create_irq_chip().unwrap();
        other
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .unwrap();
        restore_vm(&other, &decoded).unwrap();
        let again = save_vm(&other).unwrap();
        assert_eq!(again.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        // SAFETY: both unions were filled by KVM_GET_IRQCHIP for the IOAPIC, so the `ioapic`
        // member is the active one.
        let (a, b) = unsafe { (again.ioapic.chip.ioapic, state.ioapic.chip.ioapic) };
        assert_eq!(a.base_address, b.base_address);
    }
}
