//! vCPU state: everything KVM keeps per vCPU that a restored guest needs to continue exactly.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring one vCPU; each names the KVM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU state: {call} failed: {source}")]
    Kvm {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU state: cannot build a list of {count} MSRs: {reason}")]
    MsrList { count: usize, reason: String },
    #[error("vCPU state: KVM accepted only {set} of {total} MSRs (first refused: {index:#x})")]
    MsrsRefused {
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU state: the saved CPUID is malformed: {0}")]
    Cpuid(String),
}

fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { call, source }
}

/// The legacy FPU/SSE state (`kvm_fpu` has no serde support of its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        // Saved vectors of the wrong length (a corrupt or foreign state) leave zeros.
        for (dst, src) in f.fpr.iter_mut().zip(&self.fpr) {
            *dst = *src;
        }
        for (dst, src) in f.xmm.iter_mut().zip(&self.xmm) {
            *dst = *src;
        }
        f
    }
}

/// One vCPU's complete state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR KVM would report for this vCPU.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

/// Reads the MSRs in `indices`; MSRs this vCPU refuses are left out (KVM stops a batch at the
/// first one it cannot read, so the rest are retried past it).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuStateError::MsrList {
            count: entries.len(),
            reason: format!("{e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        saved.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the refused MSR (if any) and continue after it.
        let consumed = if read < batch.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(saved)
}

/// Saves a vCPU that is not running. `msr_indices` is the host's MSR list
/// (`Kvm::get_msr_index_list`).
pub fn save_vcpu(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?);
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        index,
        cpuid,
        tsc_khz,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Restores `state` into a freshly created vCPU (before it first runs). The order matters:
/// CPUID first (it decides which MSRs and XSAVE features exist), events last.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|e| VcpuStateError::Cpuid(format!("{e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        // Keeps the guest's TSC rate where the host can scale it; otherwise the guest's clock
        // source recalibrates (kvmclock tolerates it).
        if let Err(e) = fd.set_tsc_khz(khz) {
            log::warn!("vCPU {}: cannot set the TSC to {khz} kHz: {e}", state.index);
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_fpu(&state.fpu.to_kvm())
        .map_err(kvm("KVM_SET_FPU"))?;
    // SAFETY: `xsave` is a complete `kvm_xsave` (the legacy 4 KiB layout this vCPU saved with
    // KVM_GET_XSAVE); KVM reads exactly that many bytes.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| VcpuStateError::MsrList {
            count: chunk.len(),
            reason: format!("{e:?}"),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(VcpuStateError::MsrsRefused {
                set,
                total: chunk.len(),
                index: chunk[set].index,
            });
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 7,
            ..Default::default()
        };
        f.xmm[3] = [9; 16];
        f.fpr[7] = [1; 16];
        assert_eq!(FpuState::from(&f).to_kvm().xmm[3], [9; 16]);
        assert_eq!(
            FpuState::from(&f),
            FpuState::from(&FpuState::from(&f).to_kvm())
        );
    }

    #[test]
    fn a_short_fpu_vector_does_not_panic() {
        let state = FpuState {
            fpr: vec![[1; 16]],
            xmm: vec![],
            ..Default::default()
        };
        assert_eq!(state.to_kvm().fpr[0], [1; 16]);
    }

    /// Save then restore a real (never run) vCPU on this host's KVM: every call is accepted and
    /// the registers come back.
    #[test]
    fn save_and_restore_a_real_vcpu() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fd.set_cpuid2(&cpuid).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1234_5678;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();
        let msr_list = kvm.get_msr_index_list().unwrap();
        let state = save_vcpu(&fd, 0, msr_list.as_slice()).unwrap();
        assert!(!state.msrs.is_empty());

        let blob = crate::persist::encode_state(&state).unwrap();
        let decoded: VcpuState = crate::persist::decode_state(&blob).unwrap();

        let other = vm.create_vcpu(1).unwrap();
        restore_vcpu(&other, &decoded).unwrap();
        assert_eq!(other.get_regs().unwrap().rip, 0x1234_5678);
    }
}
