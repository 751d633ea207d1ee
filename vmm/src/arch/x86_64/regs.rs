//! The vCPU state a 64-bit Linux entry expects: registers, long mode system registers with an
//! identity map, FPU, boot MSRs and the LAPIC's local interrupt pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled (bit 11), default memory type write-back (6): what firmware leaves a
/// guest, which otherwise disables MTRRs and, with them, PAT.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = 1 << 11 | 6;

/// Page table entry bits: present, writable, and (in a PDE) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Offsets of the LAPIC's LVT LINT0/LINT1 registers and the delivery mode field.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors of boot state set-up.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the {what} at guest address {addr:#x}: {source}")]
    WriteTable {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot get the vCPU's {what}: {source}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set the vCPU's {what}: {source}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the MSR list of {0} entries")]
    MsrList(usize),
    #[error("KVM set {set} of {expected} boot MSRs; MSR {first_failed:#x} was refused")]
    MsrsPartial {
        set: usize,
        expected: usize,
        first_failed: u32,
    },
}

/// General purpose registers at the 64-bit entry: `rip` = entry, `rsi` = zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// FPU state after `fninit` with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs Linux expects zeroed (or, for MISC_ENABLE, with fast strings) at entry.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

fn write_table<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    value: T,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::WriteTable { what, addr, source })
}

/// Writes the boot GDT, an empty IDT and the identity map of the first GiB (2 MiB pages).
/// These are shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in gdt::boot_gdt().iter().enumerate() {
        write_table(mem, "GDT", GDT_ADDR + 8 * i as u64, *entry)?;
    }
    write_table(mem, "IDT", IDT_ADDR, 0u64)?;
    write_table(mem, "PML4", PML4_ADDR, PDPTE_ADDR | PTE_PRESENT_RW)?;
    write_table(mem, "PDPTE", PDPTE_ADDR, PDE_ADDR | PTE_PRESENT_RW)?;
    for i in 0..512u64 {
        write_table(
            mem,
            "PDE",
            PDE_ADDR + 8 * i,
            (i << 21) | PDE_HUGE | PTE_PRESENT_RW,
        )?;
    }
    Ok(())
}

/// Turns `sregs` (as KVM reports them) into long mode with the boot GDT and identity map.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = gdt::boot_gdt();
    let code = gdt::segment_from_descriptor(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = gdt::segment_from_descriptor(gdt[DATA_INDEX as usize], DATA_INDEX);
    let tss = gdt::segment_from_descriptor(gdt[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as std::os::raw::c_char;
    }
}

/// Sets LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as a PC's firmware does.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let value = lapic_reg(lapic, offset);
        set_lapic_reg(
            lapic,
            offset,
            (value & !APIC_DELIVERY_MODE_MASK) | (mode << 8),
        );
    }
}

/// Sets the boot MSRs on `vcpu`, failing if KVM refuses any of them.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList(entries.len()))?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| RegsError::Set {
        what: "MSRs",
        source,
    })?;
    if set != entries.len() {
        return Err(RegsError::MsrsPartial {
            set,
            expected: entries.len(),
            first_failed: entries[set].index,
        });
    }
    Ok(())
}

/// Puts `vcpu` at the 64-bit kernel entry `entry`: MSRs, registers, long mode, FPU, LAPIC.
/// The tables from [`write_boot_tables`] must already be in guest memory.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    set_boot_msrs(vcpu)?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|source| RegsError::Set {
            what: "registers",
            source,
        })?;
    let sregs = vcpu.get_sregs().map_err(|source| RegsError::Get {
        what: "system registers",
        source,
    })?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(|source| RegsError::Set {
            what: "system registers",
            source,
        })?;
    vcpu.set_fpu(&boot_fpu()).map_err(|source| RegsError::Set {
        what: "FPU",
        source,
    })?;
    let mut lapic = vcpu.get_lapic().map_err(|source| RegsError::Get {
        what: "LAPIC",
        source,
    })?;
    set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(|source| RegsError::Set {
        what: "LAPIC",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn regs_point_at_entry_stack_and_zero_page() {
        let regs = boot_regs(0x100_0200);
        assert_eq!(regs.rip, 0x100_0200);
        assert_eq!(regs.rflags, 2);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(regs.rax, 0);
    }

    #[test]
    fn fpu_and_msrs() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
        let msrs = boot_msr_entries();
        assert_eq!(msrs.len(), 11);
        let misc = msrs
            .iter()
            .find(|m| m.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data, 1);
        let mtrr = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806, "MTRRs enabled, default write-back");
        assert!(msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_MISC_ENABLE && m.index != MSR_MTRR_DEF_TYPE)
            .all(|m| m.data == 0));
    }

    #[test]
    fn identity_map_covers_the_first_gib() {
        let mem = create_guest_memory(64 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPTE_ADDR | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_ADDR)).unwrap();
        assert_eq!(pdpte, PDE_ADDR | 3);
        for i in [0u64, 1, 8, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_ADDR + 8 * i)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PDE {i}");
        }
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, gdt::boot_gdt()[1]);
        let idt: u64 = mem.read_obj(GuestAddress(IDT_ADDR)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn sregs_are_long_mode() {
        let sregs = long_mode_sregs(kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        });
        assert_eq!(sregs.cr0, CR0_PE | CR0_ET | CR0_PG);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x8, 1));
        assert_eq!((sregs.ds.selector, sregs.ss.selector), (0x10, 0x10));
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (GDT_ADDR, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (IDT_ADDR, 7));
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, some vector: only the delivery mode must change.
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0720);
        set_lapic_reg(&mut lapic, APIC_LVT_LINT1, 0x0001_0000);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0720);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x0001_0400);
    }

    #[test]
    fn kvm_accepts_the_boot_state() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        setup_boot_vcpu(&vcpu, 0x100_0000).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x100_0000);
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.efer & EFER_LMA, EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
    }
}
