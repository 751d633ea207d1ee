//! Tests named `vmtest_*` need hardware-KVM semantics: `cargo xtask test` runs them directly
//! on such hosts and inside the lab elsewhere. They fail (never skip) where KVM cannot run Linux.

use ember_vmm::probe::{run_probe_guest, HostFacts, KvmKind, PROBE_MESSAGE};

#[test]
fn vmtest_host_has_hardware_kvm_and_the_probe_guest_runs() {
    let facts = HostFacts::read();
    assert_eq!(
        facts.kind(),
        KvmKind::Hardware,
        "VM tests need hardware KVM (run them through `cargo xtask test`, which uses the lab); facts: {facts:?}"
    );
    let report = run_probe_guest().expect("the probe guest runs");
    assert_eq!(report.output, PROBE_MESSAGE);
}
