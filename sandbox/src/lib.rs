//! One sandbox's VMM process and what drives a VM from the host side without the service.
//!
//! Owns:
//! - [`worker`]: `ember-vmm`, the process the service starts per sandbox (boot or restore,
//!   jail, control socket);
//! - [`control`]: the typed protocol between the service and that process (its spec, pool
//!   assignment, control requests, events);
//! - [`session`]: a foreground VM with one command through the agent (`ember run`,
//!   `ember restore`), and the helpers the VMM process shares with it;
//! - [`page_channel`]: pages a restore from the remote tier gets from the service;
//! - [`defaults`]: where kernel, rootfs, store and memory cache come from when not given.
//!
//! Must not depend on an async runtime, the HTTP stack or the bench's chart library: the
//! jailed VMM process links this crate and nothing of the service.

pub mod control;
pub mod defaults;
pub mod jail_probe;
pub mod page_channel;
pub mod session;
pub mod worker;
