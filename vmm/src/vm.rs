//! The KVM VM: creation with the x86 platform pieces (TSS, identity map, in-kernel
//! PIC/IOAPIC/LAPIC, PIT), guest memory registration, per-vCPU set-up and interrupt wiring.

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::cpuid::{normalize_cpuid, CpuidError};
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::arch::x86_64::regs::{setup_boot_vcpu, RegsError};
use crate::memory::{register_guest_memory, GuestMemoryMmap, MemoryError};

/// The KVM API version ember speaks.
pub const KVM_API_VERSION: i32 = 12;

/// Errors of VM and vCPU creation.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version is {0}, ember needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set the KVM TSS address to {KVM_TSS_ADDR:#x}: {0}")]
    TssAddress(kvm_ioctls::Error),
    #[error("cannot set the KVM identity map address to {KVM_IDENTITY_MAP_ADDR:#x}: {0}")]
    IdentityMap(kvm_ioctls::Error),
    #[error("cannot create the in-kernel interrupt controllers: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("cannot get KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the CPUID of vCPU {index}: {source}")]
    Cpuid { index: u8, source: CpuidError },
    #[error("cannot set the CPUID of vCPU {index}: {source}")]
    SetCpuid {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up the boot state of vCPU {index}: {source}")]
    BootState { index: u8, source: RegsError },
    #[error("cannot register the irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register the ioeventfd at {addr:#x} (datamatch {datamatch}): {source}")]
    Ioeventfd {
        addr: u64,
        datamatch: u32,
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with its platform devices and the supported CPUID it was created with.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
}

/// Opens `/dev/kvm` and checks its API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM: TSS and identity map pages, IRQ chip, PIT with a dummy speaker port.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(VmError::IdentityMap)?;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            crate::arch::x86_64::cpuid::offer_tsc_deadline(&mut supported_cpuid);
        }
        Ok(Vm {
            fd,
            supported_cpuid,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers all of `mem` with KVM.
    ///
    /// # Safety
    ///
    /// `mem` (or a clone sharing its regions) must outlive this VM and all its vCPUs.
    pub unsafe fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        // SAFETY: forwarded to the caller.
        unsafe { register_guest_memory(&self.fd, mem) }.map_err(VmError::Memory)
    }

    /// Registers all of `mem` with KVM's dirty page logging on (again: this also clears the
    /// log).
    ///
    /// # Safety
    ///
    /// As [`Vm::register_memory`].
    pub unsafe fn register_memory_logging_dirty(
        &self,
        mem: &GuestMemoryMmap,
    ) -> Result<(), VmError> {
        // SAFETY: forwarded to the caller.
        unsafe { crate::memory::register_guest_memory_with(&self.fd, mem, true) }
            .map_err(VmError::Memory)
    }

    /// Creates vCPU `index` of `count` with its CPUID, at the 64-bit kernel `entry`.
    pub fn create_boot_vcpu(&self, index: u8, count: u8, entry: u64) -> Result<VcpuFd, VmError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| VmError::CreateVcpu { index, source })?;
        let mut cpuid = self.supported_cpuid.clone();
        normalize_cpuid(&mut cpuid, index, count)
            .map_err(|source| VmError::Cpuid { index, source })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|source| VmError::SetCpuid { index, source })?;
        setup_boot_vcpu(&vcpu, entry).map_err(|source| VmError::BootState { index, source })?;
        Ok(vcpu)
    }

    /// The CPU model vCPU 0 of `count` gets here (what this host's KVM can offer).
    pub fn cpu_model(
        &self,
        count: u8,
    ) -> Result<crate::arch::x86_64::cpu_model::CpuModel, VmError> {
        let mut cpuid = self.supported_cpuid.clone();
        normalize_cpuid(&mut cpuid, 0, count)
            .map_err(|source| VmError::Cpuid { index: 0, source })?;
        Ok(crate::arch::x86_64::cpu_model::CpuModel::of(
            cpuid.as_slice(),
        ))
    }

    /// Makes writes to `evt` raise `gsi`.
    pub fn register_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes 4-byte guest writes of `datamatch` to MMIO `addr` signal `evt` in the kernel.
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd {
                addr,
                datamatch,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::regs::write_boot_tables;
    use crate::memory::create_guest_memory;

    #[test]
    fn creates_a_vm_with_memory_vcpus_and_wiring() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let mem = create_guest_memory(64 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let kvm = open_kvm().unwrap();
        let vm = Vm::new(&kvm).unwrap();
        // SAFETY: `mem` is declared before `vm` and so outlives it.
        unsafe { vm.register_memory(&mem) }.unwrap();
        let vcpus: Vec<VcpuFd> = (0..2)
            .map(|i| vm.create_boot_vcpu(i, 2, 0x100_0000).unwrap())
            .collect();
        assert_eq!(vcpus[1].get_regs().unwrap().rip, 0x100_0000);
        let cpuid = vcpus[1].get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1);

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irq(&irq, 5).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_mmio_notify(&notify, 0xd000_0050, 0).unwrap();
    }
}
