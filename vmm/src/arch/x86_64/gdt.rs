//! The boot GDT and the segment registers derived from it.
//!
//! A 64-bit entry needs a flat code segment with L=1, a flat data segment and a TSS
//! descriptor (KVM refuses to enter long mode with an unusable TR on some hosts).

use kvm_bindings::kvm_segment;

/// Index of the 64-bit code segment.
pub const CODE_INDEX: u16 = 1;
/// Index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// Index of the TSS descriptor.
pub const TSS_INDEX: u16 = 3;

/// Access byte (high nibble: P, DPL, S; low nibble: type) and flags (G, D/B, L, AVL),
/// packed as the descriptor stores them: `flags << 12 | access`.
const CODE64_FLAGS: u16 = 0xa09b; // G, L; present, code, execute/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, D/B; present, data, read/write, accessed
const TSS_FLAGS: u16 = 0x808b; // G; present, system, busy 64-bit TSS

/// Builds a segment descriptor from its base, 20-bit limit and packed access/flags.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The boot GDT: null, code, data, TSS.
pub const fn boot_gdt() -> [u64; 4] {
    [
        0,
        descriptor(CODE64_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn bits(entry: u64, shift: u32, width: u32) -> u64 {
    (entry >> shift) & ((1u64 << width) - 1)
}

/// The segment register value KVM needs for the descriptor `entry` at GDT index `index`.
pub fn segment_from_descriptor(entry: u64, index: u16) -> kvm_segment {
    let base = bits(entry, 16, 24) | (bits(entry, 56, 8) << 24);
    let raw_limit = (bits(entry, 0, 16) | (bits(entry, 48, 4) << 16)) as u32;
    let granular = bits(entry, 55, 1) as u8;
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: bits(entry, 40, 4) as u8,
        present,
        dpl: bits(entry, 45, 2) as u8,
        db: bits(entry, 54, 1) as u8,
        s: bits(entry, 44, 1) as u8,
        l: bits(entry, 53, 1) as u8,
        g: granular,
        avl: bits(entry, 52, 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_known_encodings() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = descriptor(0x4093, 0x1234_5678, 0xabcde);
        let seg = segment_from_descriptor(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.selector, 0x28);
        assert_eq!((seg.g, seg.db, seg.l), (0, 1, 0));
    }

    #[test]
    fn code_segment_is_64_bit_and_present() {
        let seg = segment_from_descriptor(boot_gdt()[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.l, seg.db, seg.g, seg.s, seg.present), (1, 0, 1, 1, 1));
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.unusable, 0);

        let data = segment_from_descriptor(boot_gdt()[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 0x3, 1, 0)
        );
        let tss = segment_from_descriptor(boot_gdt()[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment_from_descriptor(0, 0).unusable, 1);
    }
}
