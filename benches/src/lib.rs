//! ember benchmarks.
