//! ember's in-process benchmarks live in `benches/`; end-to-end boot and restore figures come
//! from `cargo xtask bench`.
