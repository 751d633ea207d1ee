//! ember's content-addressed snapshot store (memory pages and disk blocks, deduplicated).
//! The store itself arrives with the snapshot work; this crate keeps its place in the
//! workspace so that its edge (no KVM, no devices) is fixed from the start.
