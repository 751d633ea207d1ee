//! The Intel MultiProcessor Specification (1.4) table, so an SMP guest finds its CPUs, its
//! I/O APIC and its interrupt routing without ACPI.
//!
//! Layout, all in the EBDA ([`EBDA_START`]..[`EBDA_END`]), which the e820 map reserves: the
//! 16-byte floating pointer, then the configuration table (header and entries).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_END, EBDA_START, IOAPIC_ADDR, IRQ_MAX};
use crate::memory::GuestMemoryMmap;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
const IO_INTERRUPTS: usize = IRQ_MAX as usize + 1;
const LOCAL_INTERRUPTS: usize = 2;
/// Bytes taken by everything but the processor entries.
const FIXED_LEN: usize = FLOATING_POINTER_LEN
    + HEADER_LEN
    + SMALL_ENTRY_LEN // bus
    + SMALL_ENTRY_LEN // I/O APIC
    + SMALL_ENTRY_LEN * IO_INTERRUPTS
    + SMALL_ENTRY_LEN * LOCAL_INTERRUPTS;

const SPEC_REVISION: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Family 6 signature; feature flags FPU and on-chip APIC.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus".
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// Errors of MP table creation.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    #[error("an MP table for {count} CPUs needs {needed} bytes; the EBDA has room for {max} CPUs")]
    TooManyCpus { count: u8, needed: usize, max: u8 },
    #[error("cannot write the {len}-byte MP table at guest address {addr:#x}: {source}")]
    Write {
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
}

/// Most CPUs whose MP table fits the EBDA.
pub const fn max_cpus() -> u8 {
    let room = (EBDA_END - EBDA_START) as usize - FIXED_LEN;
    let max = room / PROCESSOR_LEN;
    if max > u8::MAX as usize {
        u8::MAX
    } else {
        max as u8
    }
}

/// Size of the whole MP table (pointer included) for `num_cpus` CPUs.
pub const fn table_len(num_cpus: u8) -> usize {
    FIXED_LEN + PROCESSOR_LEN * num_cpus as usize
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP table for `num_cpus` CPUs (APIC ids 0..n, I/O APIC id n) placed at
/// guest address `base`.
pub fn mptable_bytes(base: u32, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    let max = max_cpus();
    if num_cpus > max {
        return Err(MpTableError::TooManyCpus {
            count: num_cpus,
            needed: table_len(num_cpus),
            max,
        });
    }
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus belong to the CPUs.
    let config_addr = base + FLOATING_POINTER_LEN as u32;

    // Entries first: the header needs their length and count.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IO_INTERRUPTS as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    let config_len = (HEADER_LEN + entries.len()) as u16;
    let mut config = Vec::with_capacity(usize::from(config_len));
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&config_len.to_le_bytes());
    config.push(SPEC_REVISION);
    config.push(0); // checksum, patched below
    config.extend_from_slice(b"EMBER   "); // OEM id, 8 bytes
    config.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&APIC_ADDR.to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(config.len(), HEADER_LEN);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(FLOATING_POINTER_LEN + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_addr.to_le_bytes());
    table.push(1); // length in 16-byte units
    table.push(SPEC_REVISION);
    table.push(0); // checksum, patched below
    table.extend_from_slice(&[0; 5]); // default configuration 0: the table is present; no IMCR
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP table for `num_cpus` CPUs at [`EBDA_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MpTableError> {
    let table = mptable_bytes(EBDA_START as u32, num_cpus)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|source| MpTableError::Write {
            addr: EBDA_START,
            len: table.len(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn pointer_and_table_checksums_are_zero() {
        for cpus in [1u8, 2, 4, max_cpus()] {
            let table = mptable_bytes(EBDA_START as u32, cpus).unwrap();
            assert_eq!(table.len(), table_len(cpus));
            assert_eq!(sum(&table[..16]), 0, "{cpus} CPUs: pointer");
            assert_eq!(sum(&table[16..]), 0, "{cpus} CPUs: config table");
            assert!(EBDA_START + table.len() as u64 <= EBDA_END);
        }
    }

    #[test]
    fn pointer_points_at_the_config_table() {
        let table = mptable_bytes(EBDA_START as u32, 2).unwrap();
        assert_eq!(&table[0..4], b"_MP_");
        assert_eq!(u32_at(&table, 4), EBDA_START as u32 + 16);
        assert_eq!((table[8], table[9]), (1, 4));
        assert_eq!(&table[16..20], b"PCMP");
        assert_eq!(usize::from(u16_at(&table, 20)), table.len() - 16);
        assert_eq!(u32_at(&table, 16 + 36), APIC_ADDR);
        // 2 CPUs + bus + I/O APIC + 24 I/O interrupts + 2 local interrupts.
        assert_eq!(u16_at(&table, 16 + 34), 2 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_interrupts() {
        let cpus = 3u8;
        let table = mptable_bytes(EBDA_START as u32, cpus).unwrap();
        let mut at = 16 + HEADER_LEN;
        for cpu in 0..cpus {
            let e = &table[at..at + PROCESSOR_LEN];
            assert_eq!((e[0], e[1]), (ENTRY_PROCESSOR, cpu));
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTSTRAP != 0, cpu == 0);
            at += PROCESSOR_LEN;
        }
        assert_eq!(
            &table[at..at + 8],
            &[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']
        );
        at += 8;
        assert_eq!(&table[at..at + 4], &[ENTRY_IOAPIC, cpus, IOAPIC_VERSION, 1]);
        assert_eq!(u32_at(&table, at + 4), IOAPIC_ADDR);
        at += 8;
        for irq in 0..24u8 {
            assert_eq!(
                &table[at..at + 8],
                &[ENTRY_IO_INTERRUPT, 0, 0, 0, 0, irq, cpus, irq]
            );
            at += 8;
        }
        assert_eq!(
            &table[at..at + 8],
            &[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]
        );
        at += 8;
        assert_eq!(
            &table[at..at + 8],
            &[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]
        );
        assert_eq!(at + 8, table.len());
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(matches!(mptable_bytes(0, 0), Err(MpTableError::NoCpus)));
        let too_many = max_cpus() + 1;
        assert!(matches!(
            mptable_bytes(0, too_many),
            Err(MpTableError::TooManyCpus { count, .. }) if count == too_many
        ));
        assert!(max_cpus() >= 32);
    }

    #[test]
    fn table_is_written_into_guest_memory() {
        let mem = create_guest_memory(16 << 20).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
