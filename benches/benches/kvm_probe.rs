//! The cost of the smallest KVM round trip ember makes: open /dev/kvm, create a VM with 4 KiB
//! of memory and one vCPU, run a real-mode guest to its first port write and `hlt`.
//! It works on every KVM backend (PVM included), so it also serves as a baseline for the
//! boot figures measured in the lab.

use criterion::{criterion_group, criterion_main, Criterion};
use ember_vmm::probe::run_probe_guest;

fn probe_guest(c: &mut Criterion) {
    c.bench_function("kvm_probe_guest_create_run_destroy", |b| {
        b.iter(|| run_probe_guest().expect("probe guest"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = probe_guest
}
criterion_main!(benches);
