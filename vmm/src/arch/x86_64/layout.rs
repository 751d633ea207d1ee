//! Where things live in the guest's physical address space.
//!
//! Everything the VMM writes before the first instruction runs sits in the first MiB, in RAM
//! that the e820 map either reports as usable (the kernel may reuse it once booted) or as
//! reserved (the MP table). The kernel is loaded at or above [`HIMEM_START`].

/// Global descriptor table: null, 64-bit code, data, TSS.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table: a single empty entry (the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`) the kernel finds through `rsi`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top of the boot stack (`rsp`/`rbp` at entry).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level 4 page map of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory of the boot identity map (512 entries of 2 MiB: the first GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Most bytes the command line may take, its terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table is written here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (640 KiB): the EBDA ends here.
pub const EBDA_END: u64 = 0xa0000;
/// First byte above the legacy hole: the kernel goes at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (I/O APIC, LAPIC, virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap: RAM above [`MMIO_GAP_START`] is placed from here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// The I/O APIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// Base of the virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI the I/O APIC has (24 pins).
pub const IRQ_MAX: u32 = 23;

/// KVM's TSS: three pages just below the identity-map page, inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's EPT identity-map page (needed for real mode on some Intel hosts).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The legacy serial port COM1 and its IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
