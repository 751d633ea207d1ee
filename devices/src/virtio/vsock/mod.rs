//! virtio-vsock (device type 19) with a Unix-socket back-end ("hybrid vsock").
//!
//! The guest sees a regular virtio-vsock device with stream sockets only. The host side is one
//! Unix socket per VM, at the path given to [`Vsock::new`]:
//!
//! - **host-initiated**: a host client connects to `<uds_path>` and writes `CONNECT <port>\n`.
//!   The device allocates a host port (1024 upward), asks the guest for a connection to
//!   `<port>` and answers `OK <host port>\n` once the guest accepts; then bytes flow both ways.
//!   If the guest refuses (nobody listens) or the line is malformed, the client is closed.
//! - **guest-initiated**: a guest connection to CID 2 port `P` is connected to the Unix socket
//!   `<uds_path>_P`; without a listener there the guest gets a reset.
//!
//! Flow control follows the virtio credit scheme in both directions, with a fixed per-connection
//! budget: the guest can never make the device buffer more than [`CONN_BUF_ALLOC`] bytes per
//! connection, and host writers are back-pressured by their socket (the device only reads what
//! the guest has room for).
//!
//! Layout: `packet.rs` (the 44-byte header and descriptor-chain access), `connection.rs` (one
//! connection's state machine and credit accounting), `muxer.rs` (the Unix-socket side:
//! listener, CONNECT handshake, connection table, epoll interest), `device.rs` (the
//! [`VirtioDevice`](crate::virtio::VirtioDevice), its queues and event-loop integration).

mod connection;
mod device;
mod muxer;
pub mod packet;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use device::{Vsock, VSOCK_CONFIG_SIZE, VSOCK_QUEUE_SIZE};

/// The CID the host has (the guest connects to it).
pub const HOST_CID: u64 = 2;
/// Lowest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Receive buffer the device advertises for each connection (guest→host bytes it holds while
/// the host socket is not accepting them).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections (either direction) alive at once; more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest `CONNECT <port>\n` line accepted from a host client (newline included).
pub const MAX_CONNECT_LINE: usize = 32;
/// Host clients that connected but did not finish their CONNECT line; the oldest is dropped
/// when more arrive.
pub const MAX_PENDING_CLIENTS: usize = 32;
/// How long a host client may take to send its CONNECT line, and the guest to answer a
/// host-initiated connection request. Checked lazily, whenever the device has other work.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest Unix socket path (`sun_path` holds 108 bytes including the terminating NUL).
pub const MAX_UDS_PATH_LEN: usize = 107;

/// Errors from creating a [`Vsock`] device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or out of range.
    #[error("guest CID {0} is invalid: it must be at least {MIN_GUEST_CID} and below 2^32 - 1")]
    InvalidCid(u64),
    /// The Unix socket path does not fit `sun_path`.
    #[error(
        "vsock socket path {path} is {len} bytes long; Unix sockets allow at most \
         {MAX_UDS_PATH_LEN}"
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Something other than a socket is in the way.
    #[error("vsock socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("failed to create the vsock {what} eventfd: {source}")]
    EventFd {
        /// Which eventfd.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}
