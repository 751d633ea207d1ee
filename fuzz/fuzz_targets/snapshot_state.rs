//! A snapshot's VM state blob, as a restore reads it from the store: magic, version, length,
//! checksum, then the vCPU, VM and device states. A damaged or hostile blob must be refused
//! with an error, never a panic or a huge allocation.
#![no_main]

use ember_vmm::persist::{decode_state, seal_state};
use ember_vmm::snapshot::VmSnapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_state::<VmSnapshot>(data);
    // The same bytes in a valid envelope, so the decoder behind the checksum is reached too.
    let _ = decode_state::<VmSnapshot>(&seal_state(data));
});
