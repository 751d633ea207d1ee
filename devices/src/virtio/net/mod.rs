//! virtio-net (device type 1) over a TAP interface.
//!
//! Two queues, receive and transmit; the guest's MAC address in config space; no control
//! queue, no multiqueue. The TAP takes the guest's own `virtio_net_hdr_v1` (`IFF_VNET_HDR`), so
//! frames are copied as they are. Checksum and TCP segmentation offloads (both ways) are offered
//! only on a TAP that takes them, and the TAP is told which the guest negotiated; what a guest
//! did not negotiate is cleared from the header of each frame it sends, so it cannot ask the host
//! kernel for checksum or segmentation work it never agreed to. Without segmentation offload a
//! frame is at most an Ethernet frame with a VLAN tag; with it, 64 KiB.
//!
//! The guest is not trusted: a transmit chain that is malformed (wrong direction, outside guest
//! memory, looping), shorter than a header and an Ethernet header, or longer than the largest
//! frame is dropped, counted in [`NetStats`] and completed with length 0; a receive chain that
//! is malformed is completed with length 0 and the frame goes to the next one. A frame larger
//! than the receive chain it would go to is dropped. Nothing the guest does panics the device.
//!
//! Rate limits ([`NetRateLimits`]): a token bucket of bytes and one of frames per second in
//! each direction. A frame the guest sends over its limit stays in the transmit ring; one for
//! the guest stays in the device (and the rest in the TAP's queue, where the host kernel drops
//! beyond the queue's length, as a congested link would); a timer resumes each direction when
//! its buckets allow, so nothing the guest does can keep the device busy past its rate.
//!
//! Layout: `tap.rs` (opening the TAP), `device.rs` (the [`VirtioDevice`](crate::virtio::VirtioDevice),
//! its queues and event-loop integration).

mod device;
mod tap;

use std::io;

use serde::{Deserialize, Serialize};

use crate::rate_limiter::RateLimit;

pub use device::{Net, NetStats, NET_CONFIG_SIZE, NET_QUEUE_SIZE};
pub use tap::{Tap, IFNAMSIZ, TUNSETOFFLOAD};

/// Size of `struct virtio_net_hdr_v1` (`num_buffers` included: virtio 1.x always has it).
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// The largest frame without offloads: a 1500-byte MTU, the Ethernet header and a VLAN tag.
pub const MAX_FRAME_LEN: usize = 1500 + ETH_HLEN + 4;
/// The largest frame with segmentation offload: a 64 KiB IP packet, Ethernet header and VLAN
/// tag.
pub const MAX_GSO_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

/// Errors from creating a [`Net`] device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name cannot be an interface name.
    #[error("TAP name {0:?} is not a valid interface name (1 to 15 bytes, no '/', space or NUL)")]
    TapName(String),
    /// Opening or configuring the TAP failed.
    #[error("cannot {what} TAP {tap}: {source}")]
    Tun {
        /// The step that failed.
        what: &'static str,
        /// The TAP's name.
        tap: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("failed to create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A rate limiter's timer could not be created.
    #[error("failed to create the {direction} rate limiter's timer: {source}")]
    Timer {
        /// `receive` or `transmit`.
        direction: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Limits on one guest's network traffic, each direction as the guest sees it (unlimited by
/// default). Operations are frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetRateLimits {
    /// Frames the guest receives (host → guest).
    #[serde(default)]
    pub rx: RateLimit,
    /// Frames the guest sends (guest → host).
    #[serde(default)]
    pub tx: RateLimit,
}

impl NetRateLimits {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.rx.is_limited() || self.tx.is_limited()
    }
}
