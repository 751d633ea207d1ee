//! virtio-block over a raw disk image file.
//!
//! `device.rs` holds the [`Block`] device (features, config space, activation, event loop
//! integration); `request.rs` parses and executes descriptor chains and is callable without an
//! event loop; `disk.rs` wraps the backing file.

mod device;
mod disk;
pub mod request;

use std::io;
use std::path::PathBuf;

pub use device::{Block, BLOCK_CONFIG_SIZE, BLOCK_QUEUE_SIZE};
pub use disk::Disk;
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
    /// The disk image is not a regular file (or block device).
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The activation eventfd could not be created.
    #[error("failed to create the block activation eventfd: {0}")]
    EventFd(#[source] io::Error),
}
