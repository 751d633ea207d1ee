//! ember's virtual machine monitor.
//!
//! `ember run` calls [`run`] with a [`VmConfig`]; finer control (pause, resume, boot time)
//! goes through [`Vmm`].

pub mod arch;
pub mod config;
pub mod device_manager;
pub mod kernel;
pub mod lazy;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod probe;
pub mod restore_memory;
pub mod snapshot;
pub mod stall;
pub mod timeline;
pub mod vcpu;
pub mod vm;
pub mod vmm;

pub use crate::config::{
    format_mac, parse_mac, GuestIpv4, NetConfig, NetRateLimits, RateLimit, VmConfig, VmmOptions,
    VsockConfig,
};
pub use crate::metrics::RunReport;
pub use crate::snapshot::{RestoreMode, SnapshotKind, UnknownRestoreMode};
pub use crate::timeline::Milestone;
pub use crate::vmm::{run, run_reported, run_with, ExitReason, Vmm, VmmError, MAX_VCPUS};
