//! The parts of the `ember` binary (`src/main.rs` is its command line). A library so that the
//! fuzz targets can reach the service's request handling.

pub mod doctor;
pub mod remote;
pub mod run;
pub mod service;
pub mod store_cmd;
