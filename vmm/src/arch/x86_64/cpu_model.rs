//! The guest CPU model a snapshot was taken with: the CPUID feature words ember offered its
//! vCPUs when the guest booted (carried through restores). Recorded in the snapshot's
//! manifest; a restore on a host whose KVM cannot offer one of those features is refused
//! before anything runs, naming the feature (a guest that has started using an instruction
//! cannot be told it is gone). The model is what ember set, not what `KVM_GET_CPUID2`
//! returns: some KVMs (PVM) report the host's own bits there.

use kvm_bindings::kvm_cpuid_entry2;

/// Registers of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The feature words compared: (leaf, subleaf, register, name).
const WORDS: &[(u32, u32, Reg, &str)] = &[
    (0x1, 0, Reg::Ecx, "1.ecx"),
    (0x1, 0, Reg::Edx, "1.edx"),
    (0x7, 0, Reg::Ebx, "7.0.ebx"),
    (0x7, 0, Reg::Ecx, "7.0.ecx"),
    (0x7, 0, Reg::Edx, "7.0.edx"),
    (0xd, 1, Reg::Eax, "d.1.eax"),
    (0x8000_0001, 0, Reg::Ecx, "80000001.ecx"),
    (0x8000_0001, 0, Reg::Edx, "80000001.edx"),
];

/// Bits KVM changes while the guest runs (they follow CR4, the APIC base or MISC_ENABLE),
/// so they say nothing about the host: OSXSAVE, MONITOR, APIC, OSPKE.
const DYNAMIC: &[(&str, u32)] = &[
    ("1.ecx", 1 << 27 | 1 << 3),
    ("1.edx", 1 << 9),
    ("7.0.ecx", 1 << 4),
];

/// Names of the features a guest is most likely to depend on, for the refusal message.
const NAMES: &[(&str, u32, &str)] = &[
    ("1.ecx", 0, "sse3"),
    ("1.ecx", 9, "ssse3"),
    ("1.ecx", 12, "fma"),
    ("1.ecx", 13, "cx16"),
    ("1.ecx", 19, "sse4.1"),
    ("1.ecx", 20, "sse4.2"),
    ("1.ecx", 21, "x2apic"),
    ("1.ecx", 22, "movbe"),
    ("1.ecx", 23, "popcnt"),
    ("1.ecx", 24, "tsc-deadline"),
    ("1.ecx", 25, "aes"),
    ("1.ecx", 26, "xsave"),
    ("1.ecx", 28, "avx"),
    ("1.ecx", 29, "f16c"),
    ("1.ecx", 30, "rdrand"),
    ("1.edx", 12, "mtrr"),
    ("1.edx", 16, "pat"),
    ("1.edx", 25, "sse"),
    ("1.edx", 26, "sse2"),
    ("7.0.ebx", 3, "bmi1"),
    ("7.0.ebx", 5, "avx2"),
    ("7.0.ebx", 8, "bmi2"),
    ("7.0.ebx", 9, "erms"),
    ("7.0.ebx", 16, "avx512f"),
    ("7.0.ebx", 18, "rdseed"),
    ("7.0.ebx", 19, "adx"),
    ("7.0.ebx", 29, "sha"),
    ("7.0.ecx", 9, "vaes"),
    ("7.0.ecx", 10, "vpclmulqdq"),
    ("d.1.eax", 0, "xsaveopt"),
    ("d.1.eax", 1, "xsavec"),
    ("d.1.eax", 3, "xsaves"),
    ("80000001.ecx", 5, "abm"),
    ("80000001.edx", 27, "rdtscp"),
];

/// A refused or unreadable CPU model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    #[error("the snapshot's CPU model {0:?} does not parse (expected WORD=HEX pairs)")]
    Malformed(String),
    #[error(
        "this host's KVM cannot offer CPU features the snapshot's guest was given: {}",
        .0.join(", ")
    )]
    Missing(Vec<String>),
}

/// Feature words by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuModel {
    words: Vec<(&'static str, u32)>,
}

fn read(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .map_or(0, |e| match reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
}

impl CpuModel {
    /// The model of a vCPU's CPUID (dynamic bits left out).
    pub fn of(entries: &[kvm_cpuid_entry2]) -> CpuModel {
        let words = WORDS
            .iter()
            .map(|&(leaf, subleaf, reg, name)| {
                let dynamic = DYNAMIC
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, bits)| *bits);
                (name, read(entries, leaf, subleaf, reg) & !dynamic)
            })
            .collect();
        CpuModel { words }
    }

    /// As written into a manifest: `1.ecx=f6f8320b 1.edx=…`.
    pub fn encode(&self) -> String {
        self.words
            .iter()
            .map(|(name, value)| format!("{name}={value:08x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reads an encoded model; words it does not know are ignored (a newer ember may record
    /// more), words it knows but that are missing count as 0.
    pub fn decode(text: &str) -> Result<CpuModel, CpuModelError> {
        let malformed = || CpuModelError::Malformed(text.to_string());
        let mut pairs = Vec::new();
        for pair in text.split_whitespace() {
            let (name, hex) = pair.split_once('=').ok_or_else(malformed)?;
            let value = u32::from_str_radix(hex, 16).map_err(|_| malformed())?;
            pairs.push((name, value));
        }
        let words = WORDS
            .iter()
            .map(|&(_, _, _, name)| {
                let value = pairs.iter().find(|(n, _)| *n == name).map_or(0, |p| p.1);
                (name, value)
            })
            .collect();
        Ok(CpuModel { words })
    }

    /// Refuses a model (`self`, the snapshot's) with a feature `host` lacks.
    pub fn check_against(&self, host: &CpuModel) -> Result<(), CpuModelError> {
        let mut missing = Vec::new();
        for (name, value) in &self.words {
            let offered = host
                .words
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |w| w.1);
            let lacking = value & !offered;
            for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
                let label = NAMES
                    .iter()
                    .find(|(n, b, _)| n == name && *b == bit)
                    .map_or_else(
                        || format!("CPUID {name}[{bit}]"),
                        |(_, _, feature)| format!("{feature} (CPUID {name}[{bit}])"),
                    );
                missing.push(label);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CpuModelError::Missing(missing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn a_model_round_trips_and_ignores_dynamic_bits() {
        let entries = [
            entry(
                1,
                0,
                0,
                1 << 24 | 1 << 27 | 1 << 28,
                1 << 12 | 1 << 16 | 1 << 9,
            ),
            entry(7, 0, 1 << 5, 0, 0),
        ];
        let model = CpuModel::of(&entries);
        let text = model.encode();
        assert!(text.contains("1.ecx=11000000"), "{text}");
        assert!(text.contains("1.edx=00011000"), "{text}");
        assert_eq!(CpuModel::decode(&text).unwrap(), model);
        assert!(CpuModel::decode("1.ecx=zz").is_err());
        assert!(CpuModel::decode("1.ecx").is_err());
        // Unknown words from a newer ember are ignored.
        assert!(CpuModel::decode("99.eax=1 1.ecx=0").is_ok());
    }

    #[test]
    fn a_host_lacking_a_feature_is_refused_naming_it() {
        let snapshot = CpuModel::of(&[
            entry(1, 0, 0, 1 << 24 | 1 << 28, 0),
            entry(7, 0, 1 << 5, 0, 0),
        ]);
        let same = snapshot.clone();
        assert_eq!(snapshot.check_against(&same), Ok(()));
        let older = CpuModel::of(&[entry(1, 0, 0, 1 << 28, 0), entry(7, 0, 0, 1 << 1, 0)]);
        let err = snapshot.check_against(&older).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("tsc-deadline (CPUID 1.ecx[24])"), "{text}");
        assert!(text.contains("avx2 (CPUID 7.0.ebx[5])"), "{text}");
        // A host offering more is fine.
        assert_eq!(older.check_against(&snapshot).map_err(|_| ()), Err(()));
        let richer = CpuModel::of(&[
            entry(1, 0, 0, u32::MAX, u32::MAX),
            entry(7, 0, u32::MAX, u32::MAX, u32::MAX),
        ]);
        assert_eq!(snapshot.check_against(&richer), Ok(()));
    }
}
