//! Per-vCPU CPUID: KVM's supported CPUID with the topology of this VM written in, and the
//! guest CPU model chosen on purpose:
//!
//! - **TSC-deadline timer offered** ([`offer_tsc_deadline`]) where KVM emulates it (it is
//!   not in KVM's supported CPUID: a VMM must ask). Without it the guest calibrates its LAPIC
//!   timer against the PIT and programs it in periodic-count mode; with it, each timer is one
//!   MSR write and the PIT is never touched: far fewer exits, which under nested
//!   virtualisation are the most expensive thing a guest does.
//! - **MTRR and PAT kept** (KVM reports them) and MTRRs enabled at boot with write-back as
//!   the default type (`regs::boot_msr_entries`); PAT keeps KVM's reset value. A guest that
//!   finds MTRRs disabled skips PAT set-up and maps everything uncached-minus.
//! - **Asynchronous page faults hidden** ([`KVM_ASYNC_PF_FEATURES`]).
//! - **kvmclock kept**: the guest's clocksource, stopped and restarted cleanly around
//!   pauses and snapshots (`KVM_KVMCLOCK_CTRL`), and moved on by the time a snapshot lay in
//!   the store (`KVM_CLOCK_REALTIME`). The command line's `tsc=reliable` spares the guest's
//!   clocksource watchdog, which would otherwise keep reading a second clock.
//!
//! The topology is simple: one package, one thread per core, one core per vCPU, APIC id =
//! vCPU index. The KVM leaves (0x4000_0000..) are kept as KVM reports them, but for
//! asynchronous page faults.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
/// KVM's paravirtual feature leaf (`KVM_CPUID_FEATURES`).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// `KVM_FEATURE_ASYNC_PF` (4), `KVM_FEATURE_ASYNC_PF_VMEXIT` (10), `KVM_FEATURE_ASYNC_PF_INT`
/// (14). With them, a guest whose page is not in host memory yet (every page of a lazy
/// restore) is told to schedule something else and woken by a "page ready" interrupt later.
/// A snapshot can then hold guest tasks waiting for wake-ups the restored VM will never send
/// (they hang), and on AMD hosts the "page ready" interrupt has been seen to make vCPUs exit
/// in a storm. Without them a vCPU just waits the few microseconds until its page is served.
pub const KVM_ASYNC_PF_FEATURES: u32 = 1 << 4 | 1 << 10 | 1 << 14;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24, the TSC-deadline mode of the LAPIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_UNITS: u32 = 8;

/// Topology level types of leaves 0xb and 0x1f.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors of CPUID normalisation.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("vCPU index {index} is not below the vCPU count {count}")]
    InvalidVcpu { index: u8, count: u8 },
    #[error("cannot add CPUID leaf {leaf:#x} subleaf {subleaf}: the CPUID table is full")]
    TableFull { leaf: u32, subleaf: u32 },
}

/// The CPU vendor as CPUID leaf 0 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor string from leaf 0.
pub fn vendor(cpuid: &CpuId) -> CpuVendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == LEAF_VENDOR) else {
        return CpuVendor::Other;
    };
    let mut name = [0u8; 12];
    name[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    }
}

/// Number of APIC id bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

fn entries_mut(cpuid: &mut CpuId, leaf: u32) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(move |e| e.function == leaf)
}

/// Replaces an x2APIC topology leaf (0xb or 0x1f), if KVM reported it, with: SMT level of
/// one thread, core level of `count` cores, then the terminating invalid level.
fn write_topology_leaf(
    cpuid: &mut CpuId,
    leaf: u32,
    apic_id: u32,
    count: u32,
) -> Result<(), CpuidError> {
    if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
        return Ok(());
    }
    cpuid.retain(|e| e.function != leaf);
    let levels = [
        // (shift to the next level's id, logical processors at this level, level type)
        (0, 1, LEVEL_TYPE_SMT),
        (id_bits(count), count, LEVEL_TYPE_CORE),
        (0, 0, 0),
    ];
    for (subleaf, (shift, processors, kind)) in levels.into_iter().enumerate() {
        let subleaf = subleaf as u32;
        let entry = kvm_cpuid_entry2 {
            function: leaf,
            index: subleaf,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: processors,
            ecx: (kind << 8) | subleaf,
            edx: apic_id,
            ..Default::default()
        };
        cpuid
            .push(entry)
            .map_err(|_| CpuidError::TableFull { leaf, subleaf })?;
    }
    Ok(())
}

/// Offers the TSC-deadline timer in leaf 1 (call only where KVM has
/// `KVM_CAP_TSC_DEADLINE_TIMER`: it emulates the mode but does not list it as supported).
pub fn offer_tsc_deadline(cpuid: &mut CpuId) {
    for e in entries_mut(cpuid, LEAF_FEATURES) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// Writes vCPU `index` of `count` into `cpuid` (a copy of KVM's supported CPUID).
pub fn normalize_cpuid(cpuid: &mut CpuId, index: u8, count: u8) -> Result<(), CpuidError> {
    if index >= count {
        return Err(CpuidError::InvalidVcpu { index, count });
    }
    let apic_id = u32::from(index);
    let n = u32::from(count);
    let vendor = vendor(cpuid);

    for e in entries_mut(cpuid, LEAF_FEATURES) {
        e.ebx = (e.ebx & 0xff) | (CLFLUSH_LINE_UNITS << 8) | (n << 16) | (apic_id << 24);
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if n > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
    }

    if vendor != CpuVendor::Amd {
        for e in entries_mut(cpuid, LEAF_CACHE_PARAMS) {
            if e.eax & 0x1f == 0 {
                continue; // no more caches
            }
            let level = (e.eax >> 5) & 0x7;
            // Private L1/L2 per core (one thread each); L3 and beyond shared by all vCPUs.
            let sharing = if level <= 2 { 0 } else { (n - 1).min(0xfff) };
            let cores = (n - 1).min(0x3f);
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
        }
    }

    for e in entries_mut(cpuid, LEAF_KVM_FEATURES) {
        e.eax &= !KVM_ASYNC_PF_FEATURES;
    }

    write_topology_leaf(cpuid, LEAF_TOPOLOGY, apic_id, n)?;
    write_topology_leaf(cpuid, LEAF_TOPOLOGY_V2, apic_id, n)?;

    if vendor == CpuVendor::Amd {
        for e in entries_mut(cpuid, LEAF_EXT_FEATURES) {
            if n > 1 {
                e.ecx |= EXT1_ECX_CMP_LEGACY;
            } else {
                e.ecx &= !EXT1_ECX_CMP_LEGACY;
            }
        }
        for e in entries_mut(cpuid, LEAF_EXT_SIZES) {
            // NC (cores - 1) in [7:0], APIC id bits for the core in [15:12].
            e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
        }
        for e in entries_mut(cpuid, LEAF_EXT_APIC_ID) {
            e.eax = apic_id;
            // Compute unit id = core, one thread per compute unit.
            e.ebx = (e.ebx & !0xffff) | apic_id;
            // Node 0, one node per package.
            e.ecx &= !0x7ff;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        entry(0, 0, 0x1f, word(0), word(8), word(4))
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    fn intel() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"GenuineIntel"),
            entry(1, 0, 0x906ea, 0x0010_0800, 0x7ffa_3203, 0x1f8b_fbff),
            // L1d (level 1, type 1), L3 (level 3, type 3), terminator.
            entry(4, 0, 0x1c00_4121, 0, 0, 0),
            entry(4, 1, 0x1c03_c163, 0, 0, 0),
            entry(4, 2, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            // KVM's features as a recent host reports them: kvmclock (0, 3), async PF (4),
            // PV EOI (6), async PF VM exit (10), async PF interrupt (14) and more.
            entry(0x4000_0001, 0, 0x0100_7ef9, 0, 0, 0),
        ])
        .unwrap()
    }

    fn amd() -> CpuId {
        CpuId::from_entries(&[
            vendor_leaf(b"AuthenticAMD"),
            entry(1, 0, 0x00a2_0f10, 0x0010_0800, 0x7ed8_320b, 0x178b_fbff),
            entry(0x8000_0001, 0, 0, 0, 0x7590_0000, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0x0000_700f, 0),
            entry(0x8000_001e, 0, 0x10, 0x0000_0105, 0x0000_0300, 0),
        ])
        .unwrap()
    }

    #[test]
    fn vendors_are_recognised() {
        assert_eq!(vendor(&intel()), CpuVendor::Intel);
        assert_eq!(vendor(&amd()), CpuVendor::Amd);
        assert_eq!(
            vendor(&CpuId::from_entries(&[vendor_leaf(b"VIA VIA VIA ")]).unwrap()),
            CpuVendor::Other
        );
        assert_eq!(vendor(&CpuId::new(0).unwrap()), CpuVendor::Other);
    }

    #[test]
    fn id_bits_rounds_up() {
        let got: Vec<u32> = [1, 2, 3, 4, 5, 8, 9, 255]
            .into_iter()
            .map(id_bits)
            .collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4, 8]);
    }

    #[test]
    fn leaf1_has_apic_id_count_clflush_and_hypervisor() {
        let mut cpuid = intel();
        normalize_cpuid(&mut cpuid, 3, 4).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!((leaf1.ebx >> 8) & 0xff, 8);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);

        let mut single = intel();
        normalize_cpuid(&mut single, 0, 1).unwrap();
        assert_eq!(find(&single, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn intel_cache_leaf_counts_cores_and_sharing() {
        let mut cpuid = intel();
        normalize_cpuid(&mut cpuid, 0, 4).unwrap();
        let l1 = find(&cpuid, 4, 0);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.eax & 0x3fff, 0x0121);
        let l3 = find(&cpuid, 4, 1);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&cpuid, 4, 2).eax, 0);
    }

    #[test]
    fn topology_leaf_has_one_thread_per_core() {
        let mut cpuid = intel();
        normalize_cpuid(&mut cpuid, 2, 3).unwrap();
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
        assert!(cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xb)
            .all(|e| e.flags == 1));
        // Leaf 0x1f was not reported, so it is not invented.
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn kvm_leaves_keep_all_but_asynchronous_page_faults() {
        let before = find(&intel(), 0x4000_0000, 0);
        let features = find(&intel(), 0x4000_0001, 0).eax;
        let mut cpuid = intel();
        normalize_cpuid(&mut cpuid, 1, 2).unwrap();
        assert_eq!(find(&cpuid, 0x4000_0000, 0), before);
        let now = find(&cpuid, 0x4000_0001, 0).eax;
        assert_eq!(
            now & KVM_ASYNC_PF_FEATURES,
            0,
            "async PF still offered: {now:#x}"
        );
        assert_eq!(now, features & !(1 << 4 | 1 << 10 | 1 << 14));
        // kvmclock and the rest are kept.
        assert_ne!(now & (1 << 3), 0);
    }

    #[test]
    fn amd_leaves_count_cores() {
        let mut cpuid = amd();
        normalize_cpuid(&mut cpuid, 5, 6).unwrap();
        let sizes = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 5);
        assert_eq!((sizes.ecx >> 12) & 0xf, 3);
        let ext = find(&cpuid, 0x8000_001e, 0);
        assert_eq!(ext.eax, 5);
        assert_eq!(ext.ebx & 0xffff, 5);
        assert_eq!(ext.ecx & 0x7ff, 0);
        assert_ne!(find(&cpuid, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
        assert_eq!(find(&cpuid, 1, 0).ebx >> 24, 5);
    }

    #[test]
    fn bad_index_is_an_error() {
        let mut cpuid = intel();
        assert!(matches!(
            normalize_cpuid(&mut cpuid, 2, 2),
            Err(CpuidError::InvalidVcpu { index: 2, count: 2 })
        ));
    }

    #[test]
    fn host_cpuid_normalises_and_kvm_accepts_it() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let vm = kvm.create_vm().unwrap();
        for index in 0..2u8 {
            let mut cpuid = supported.clone();
            normalize_cpuid(&mut cpuid, index, 2).unwrap();
            let vcpu = vm.create_vcpu(u64::from(index)).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
        }
    }
}
