//! The raw disk image behind a block device.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::Path;

use super::request::SECTOR_SIZE;
use super::BlockError;

/// Length of the device ID returned by `VIRTIO_BLK_T_GET_ID`.
pub const DISK_ID_LEN: usize = 20;

/// An opened raw image: the file, its usable size and the device ID string.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; DISK_ID_LEN],
}

impl Disk {
    /// Opens `path` read-write (or read-only). The capacity is the file size rounded down to a
    /// whole sector; `id` is truncated to 20 bytes and zero-padded.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                read_only,
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: path.to_owned(),
            source,
        })?;
        let is_block_dev = {
            use std::os::unix::fs::FileTypeExt;
            meta.file_type().is_block_device()
        };
        if !meta.is_file() && !is_block_dev {
            return Err(BlockError::NotAFile(path.to_owned()));
        }
        // Seeking to the end also works for block devices, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} \
                 bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id_bytes = id.as_bytes();
        if id_bytes.len() > DISK_ID_LEN {
            log::warn!(
                "block device id {id:?} is {} bytes; truncating it to {DISK_ID_LEN}",
                id_bytes.len()
            );
        }
        let mut id_buf = [0u8; DISK_ID_LEN];
        let n = id_bytes.len().min(DISK_ID_LEN);
        id_buf[..n].copy_from_slice(&id_bytes[..n]);
        Ok(Disk {
            file,
            sectors: size / SECTOR_SIZE,
            read_only,
            id: id_buf,
        })
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Capacity in bytes (a whole number of sectors).
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Whether guest writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The zero-padded device ID.
    pub fn id(&self) -> &[u8; DISK_ID_LEN] {
        &self.id
    }
}
