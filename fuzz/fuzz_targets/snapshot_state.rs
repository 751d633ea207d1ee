//! A snapshot's VM state blob, as a restore reads it from the store: magic, version, length,
//! checksum, then the vCPU, VM and device states (this format, or the previous one migrated). A damaged or hostile blob must be refused
//! with an error, never a panic or a huge allocation.
#![no_main]

use ember_vmm::persist::migrate::{load_vm_snapshot, MIGRATES_FROM};
use ember_vmm::persist::{seal_state, seal_state_as};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = load_vm_snapshot(data);
    // The same bytes in a valid envelope, so the decoders behind the checksum are reached
    // too: this format's, and the migration of the previous one.
    let _ = load_vm_snapshot(&seal_state(data));
    let _ = load_vm_snapshot(&seal_state_as(MIGRATES_FROM, data));
});
