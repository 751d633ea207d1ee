//! ember's emulated devices. Each device lives in its own folder; the VMM composes them.
//!
//! Everything in this crate treats the guest as hostile: register accesses, descriptor chains
//! and request headers are validated, and malformed input is logged and answered with an error
//! status (or ignored) instead of panicking.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod irq;
pub mod log_limit;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

pub use boot_timer::{
    BootMarks, BootTimer, GuestMilestone, GuestMilestones, BOOT_TIMER_MAGIC, BOOT_TIMER_PORT,
    BOOT_TIMER_PORT_LEN,
};
pub use bus::{Bus, BusDevice, BusError};
pub use i8042::I8042;
pub use irq::IrqLine;
pub use serial::Serial;

/// Guest memory as seen by devices: mmap-backed with a dirty bitmap, so every device write that
/// goes through vm-memory is tracked (needed for snapshots / live migration).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
