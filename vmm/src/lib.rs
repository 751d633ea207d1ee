//! ember's virtual machine monitor, as a library: KVM, guest memory, the boot, vCPUs, the
//! devices, and snapshots into a content-addressed store.
//!
//! The API:
//! - [`VmConfig`] describes a guest (kernel, rootfs, vCPUs, memory, vsock, network) and
//!   [`VmmOptions`] the host side (console, rate limits, the memory cache);
//! - [`Vmm::build`] boots one (paused until [`Vmm::resume`]); [`Vmm::pause`], [`Vmm::wait`],
//!   [`Vmm::shutdown`] follow its life, [`run`] does all of it for a foreground guest;
//! - [`Vmm::snapshot`] and [`Vmm::snapshot_as`] save it into an [`ember_snapshot_store::Store`];
//!   [`Vmm::restore`] builds a VM from a snapshot in any [`RestoreMode`];
//! - [`probe`] says whether this host's KVM can run Linux at all.
//!
//! Commands run in a guest through its agent (the `ember-agent` crate) over the vsock socket
//! of [`VsockConfig`]. `examples/sandbox_lifecycle.rs` boots, runs a command, saves and
//! restores in a few dozen lines.
//!
//! The modules marked hidden are internals that ember's own benchmarks and fuzz targets
//! reach into; they are not part of the API and change without notice.

mod config;
mod device_manager;
pub mod probe;
pub mod timeline;
mod vmm;

#[doc(hidden)]
pub mod arch;
#[doc(hidden)]
pub mod kernel;
#[doc(hidden)]
pub mod lazy;
#[doc(hidden)]
pub mod memory;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod persist;
#[doc(hidden)]
pub mod restore_memory;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod stall;
#[doc(hidden)]
pub mod vcpu;
#[doc(hidden)]
pub mod vm;

pub use crate::config::{
    format_mac, parse_mac, GuestIpv4, NetConfig, NetRateLimits, PartialSnapshot, RateLimit,
    VmConfig, VmmOptions, VsockConfig,
};
pub use crate::lazy::FAULT_BUCKET_MS;
pub use crate::metrics::{IoStats, NetIo, RunReport};
pub use crate::snapshot::{RestoreMode, SnapshotKind, UnknownRestoreMode};
pub use crate::timeline::Milestone;
pub use crate::vmm::{run, run_reported, run_with, ExitReason, Vmm, VmmError, MAX_VCPUS};
