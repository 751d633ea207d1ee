//! What kind of KVM this host has, and whether it can run a Linux guest.
//!
//! `/dev/kvm` is not always hardware virtualization: on some hosts it is backed by PVM
//! (`kvm_pvm`), which runs an unmodified Linux guest only through KVM's instruction emulator
//! and fails within a minute (xrstor, cmpxchg16b). ember classifies the host first so that
//! it can say so plainly instead of failing deep inside a boot.

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// How `/dev/kvm` is provided on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// The CPU exposes VT-x or AMD-V: Linux guests run at native speed.
    Hardware,
    /// `/dev/kvm` exists but is backed by PVM; the CPU has neither `vmx` nor `svm`.
    PvmBacked,
    /// `/dev/kvm` exists but the CPU shows no `vmx`/`svm` and no known backend module.
    UnknownBackend,
    /// There is no `/dev/kvm` on this host.
    Absent,
}

impl KvmKind {
    /// Whether an unmodified Linux guest can run here.
    pub fn runs_linux(self) -> bool {
        matches!(self, KvmKind::Hardware)
    }

    /// A short, stable label for reports.
    pub fn label(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware",
            KvmKind::PvmBacked => "PVM-backed",
            KvmKind::UnknownBackend => "unknown backend",
            KvmKind::Absent => "absent",
        }
    }
}

/// The facts the classification is made from, kept so reports can show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub dev_kvm: bool,
    pub cpu_vmx: bool,
    pub cpu_svm: bool,
    pub kvm_pvm_module: bool,
    pub kvm_intel_module: bool,
    pub kvm_amd_module: bool,
}

impl HostFacts {
    /// Reads the facts from this host's `/proc` and `/sys`.
    pub fn read() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_sources(Path::new("/dev/kvm").exists(), &cpuinfo, |module| {
            Path::new("/sys/module").join(module).exists()
        })
    }

    /// Builds the facts from given sources (a unit test feeds fake ones).
    pub fn from_sources(dev_kvm: bool, cpuinfo: &str, has_module: impl Fn(&str) -> bool) -> Self {
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|line| line.starts_with("flags"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, flags)| flags.split_whitespace().collect())
            .unwrap_or_default();
        HostFacts {
            dev_kvm,
            cpu_vmx: flags.contains(&"vmx"),
            cpu_svm: flags.contains(&"svm"),
            kvm_pvm_module: has_module("kvm_pvm"),
            kvm_intel_module: has_module("kvm_intel"),
            kvm_amd_module: has_module("kvm_amd"),
        }
    }

    pub fn kind(&self) -> KvmKind {
        if !self.dev_kvm {
            KvmKind::Absent
        } else if self.cpu_vmx || self.cpu_svm {
            KvmKind::Hardware
        } else if self.kvm_pvm_module {
            KvmKind::PvmBacked
        } else {
            KvmKind::UnknownBackend
        }
    }
}

/// Errors of the real-mode probe guest.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version is {0}, ember needs 12")]
    ApiVersion(i32),
    #[error("cannot create a VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot allocate probe guest memory: {0}")]
    Memory(String),
    #[error("cannot register probe guest memory with KVM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("cannot create a vCPU: {0}")]
    CreateVcpu(kvm_ioctls::Error),
    #[error("cannot set vCPU registers: {0}")]
    Registers(kvm_ioctls::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error("probe guest stopped with an unexpected exit: {0}")]
    UnexpectedExit(String),
    #[error("probe guest wrote {got:?} to port {port:#x}, expected {expected:?}")]
    WrongOutput {
        port: u16,
        got: Vec<u8>,
        expected: Vec<u8>,
    },
}

/// The port the probe guest writes to (COM1's data register).
pub const PROBE_PORT: u16 = 0x3f8;
/// What the probe guest writes there, one byte per `out`.
pub const PROBE_MESSAGE: &[u8] = b"ok";

/// What running the probe guest showed.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub output: Vec<u8>,
    pub exits: u32,
    pub elapsed: Duration,
}

/// Runs a real-mode guest that writes [`PROBE_MESSAGE`] to [`PROBE_PORT`] and halts.
///
/// This works on every KVM backend (PVM included): it proves `/dev/kvm` answers, that a VM
/// and a vCPU can be created and that guest port I/O reaches the VMM.
pub fn run_probe_guest() -> Result<ProbeReport, ProbeError> {
    const CODE_ADDR: u64 = 0x1000;
    // mov dx, 0x3f8; mov al, 'o'; out dx, al; mov al, 'k'; out dx, al; hlt
    let code: [u8; 10] = [0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0xf4];

    let start = Instant::now();
    let kvm = Kvm::new().map_err(ProbeError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(ProbeError::ApiVersion(version));
    }
    // Declared before the VM so that it is dropped after it: KVM must never see the
    // mapping disappear while the slot is registered.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(CODE_ADDR), 0x1000)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let vm = kvm.create_vm().map_err(ProbeError::CreateVm)?;
    mem.write_slice(&code, GuestAddress(CODE_ADDR))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let host_addr = mem
        .get_host_address(GuestAddress(CODE_ADDR))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: CODE_ADDR,
        memory_size: 0x1000,
        userspace_addr: host_addr as u64,
        flags: 0,
    };
    // SAFETY: the region is exactly the 4 KiB mapping owned by `mem`, which is declared before
    // `vm` and therefore outlives it and its vCPU.
    unsafe { vm.set_user_memory_region(region) }.map_err(ProbeError::SetMemory)?;

    let mut vcpu = vm.create_vcpu(0).map_err(ProbeError::CreateVcpu)?;
    let mut sregs = vcpu.get_sregs().map_err(ProbeError::Registers)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(ProbeError::Registers)?;
    let mut regs = vcpu.get_regs().map_err(ProbeError::Registers)?;
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(ProbeError::Registers)?;

    let mut output = Vec::new();
    let mut exits = 0u32;
    loop {
        exits += 1;
        match vcpu.run().map_err(ProbeError::Run)? {
            VcpuExit::IoOut(port, data) if port == PROBE_PORT => output.extend_from_slice(data),
            VcpuExit::Hlt => break,
            other => return Err(ProbeError::UnexpectedExit(format!("{other:?}"))),
        }
        if exits > 16 {
            return Err(ProbeError::UnexpectedExit(format!(
                "{exits} exits without hlt"
            )));
        }
    }
    if output != PROBE_MESSAGE {
        return Err(ProbeError::WrongOutput {
            port: PROBE_PORT,
            got: output,
            expected: PROBE_MESSAGE.to_vec(),
        });
    }
    Ok(ProbeReport {
        output,
        exits,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_FLAGS: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
    const AMD_FLAGS: &str = "flags\t\t: fpu svm sse2 hypervisor\n";
    const PVM_FLAGS: &str = "flags\t\t: fpu sse2 hypervisor\n";

    #[test]
    fn classifies_hardware_pvm_unknown_and_absent() {
        let none = |_: &str| false;
        let pvm = |m: &str| m == "kvm_pvm";
        assert_eq!(
            HostFacts::from_sources(true, INTEL_FLAGS, none).kind(),
            KvmKind::Hardware
        );
        assert_eq!(
            HostFacts::from_sources(true, AMD_FLAGS, none).kind(),
            KvmKind::Hardware
        );
        assert_eq!(
            HostFacts::from_sources(true, PVM_FLAGS, pvm).kind(),
            KvmKind::PvmBacked
        );
        assert_eq!(
            HostFacts::from_sources(true, PVM_FLAGS, none).kind(),
            KvmKind::UnknownBackend
        );
        assert_eq!(
            HostFacts::from_sources(false, AMD_FLAGS, none).kind(),
            KvmKind::Absent
        );
        assert!(KvmKind::Hardware.runs_linux());
        assert!(!KvmKind::PvmBacked.runs_linux());
    }

    #[test]
    fn flag_matching_is_by_whole_word() {
        // "svm_lock" or "vmx_foo" style words must not count as svm/vmx.
        let facts = HostFacts::from_sources(true, "flags : svm_lock vmxfoo\n", |_| false);
        assert!(!facts.cpu_svm && !facts.cpu_vmx);
    }
}
