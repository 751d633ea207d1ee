//! `ember doctor`: what kind of KVM this host has and whether ember can run Linux guests.

use ember_vmm::probe::{run_probe_guest, HostFacts, KvmKind};

const LAB_HINT: &str = "run ember inside the lab instead: `cargo xtask lab -- ember …` \
(an L1 VM under QEMU TCG with an SVM-capable CPU, where kvm_amd gives hardware semantics)";

/// Prints the report and returns the process exit code.
pub fn run() -> i32 {
    let facts = HostFacts::read();
    let kind = facts.kind();
    println!(
        "/dev/kvm:        {}",
        if facts.dev_kvm { "present" } else { "absent" }
    );
    println!(
        "cpu flags:       vmx={} svm={}",
        yes_no(facts.cpu_vmx),
        yes_no(facts.cpu_svm)
    );
    println!(
        "kvm modules:     kvm_intel={} kvm_amd={} kvm_pvm={}",
        yes_no(facts.kvm_intel_module),
        yes_no(facts.kvm_amd_module),
        yes_no(facts.kvm_pvm_module)
    );
    println!("kvm kind:        {}", kind.label());

    if facts.dev_kvm {
        match run_probe_guest() {
            Ok(report) => println!(
                "probe guest:     wrote {:?} to port {:#x} and halted ({} exits, {:.2} ms)",
                String::from_utf8_lossy(&report.output),
                ember_vmm::probe::PROBE_PORT,
                report.exits,
                report.elapsed.as_secs_f64() * 1e3
            ),
            Err(err) => {
                println!("probe guest:     FAILED: {err}");
                println!("verdict:         /dev/kvm does not work on this host");
                return 1;
            }
        }
    }

    match kind {
        KvmKind::Hardware => {
            println!("verdict:         hardware KVM: Linux guests can run here");
            0
        }
        KvmKind::PvmBacked => {
            println!(
                "verdict:         this host's /dev/kvm is PVM-backed (module kvm_pvm, no vmx/svm): \
                 it runs an unmodified Linux guest only through KVM's instruction emulator, \
                 which fails (xrstor, cmpxchg16b); {LAB_HINT}"
            );
            2
        }
        KvmKind::UnknownBackend => {
            println!(
                "verdict:         /dev/kvm is present but the CPU shows neither vmx nor svm \
                 and no known backend module is loaded; Linux guests are unlikely to run; {LAB_HINT}"
            );
            2
        }
        KvmKind::Absent => {
            println!("verdict:         no /dev/kvm on this host; {LAB_HINT}");
            3
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
