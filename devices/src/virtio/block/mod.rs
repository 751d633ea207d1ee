//! virtio-block over a raw disk image file or a copy-on-write view of a shared base image.
//!
//! `device.rs` holds the [`Block`] device (features, config space, activation, event loop
//! integration); `request.rs` parses and executes descriptor chains and is callable without an
//! event loop; `disk.rs` wraps the backing store, either a raw file or a [`CowDisk`]
//! (`cow.rs`: a read-only base plus a private overlay of the chunks the guest wrote).

mod cow;
mod device;
mod disk;
pub mod request;

use std::io;
use std::path::PathBuf;

pub use cow::{ChunkSource, CowDisk, COW_CHUNK_SIZE};
pub use device::{Block, BLOCK_CONFIG_SIZE, BLOCK_QUEUE_SIZE};
pub use disk::{BlockStats, Disk};
pub use request::SECTOR_SIZE;

/// Errors from creating a [`Block`] device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("failed to open disk image {path} (read_only={read_only}): {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The size of the disk image could not be determined.
    #[error("failed to get the size of disk image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The rate limiter's retry timer could not be created.
    #[error("failed to create the rate limiter's timer: {0}")]
    Timer(#[source] io::Error),
    /// The disk image is not a regular file (or block device).
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The copy-on-write overlay file could not be created (it must not exist yet).
    #[error("failed to create the copy-on-write overlay {path}: {source}")]
    OverlayCreate {
        /// The overlay path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The copy-on-write overlay file could not be given the base image's size.
    #[error(
        "failed to set the size of the copy-on-write overlay {path} to {size} bytes: {source}"
    )]
    OverlaySize {
        /// The overlay path.
        path: PathBuf,
        /// The size it should have had.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A copy-on-write chunk size that is not a power of two multiple of 4096.
    #[error(
        "copy-on-write chunk size {0} is invalid: it must be a power of two and a multiple of 4096"
    )]
    ChunkSize(u32),
    /// The activation eventfd could not be created.
    #[error("failed to create the block activation eventfd: {0}")]
    EventFd(#[source] io::Error),
}
