//! The disk behind a block device: a raw image file or a copy-on-write view of a base image.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cow::{CowDisk, COW_CHUNK_SIZE};
use super::request::SECTOR_SIZE;
use super::BlockError;

/// Length of the device ID returned by `VIRTIO_BLK_T_GET_ID`.
pub const DISK_ID_LEN: usize = 20;

/// Where a disk's data lives.
#[derive(Debug)]
enum DiskBackend {
    /// A raw image, read and written in place.
    Raw(File),
    /// A read-only base plus a private overlay of written chunks.
    /// Shared so the VMM can read the written chunks for a snapshot while the device (locked,
    /// so idle) holds it.
    Cow(Arc<CowDisk>),
}

/// The guest's completed disk requests since the device was made (not kept in snapshots: a
/// restored disk starts from zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockStats {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
}

#[derive(Debug, Default)]
struct BlockCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
}

/// An opened disk: its backing store, usable size and device ID string.
#[derive(Debug)]
pub struct Disk {
    backend: DiskBackend,
    sectors: u64,
    read_only: bool,
    id: [u8; DISK_ID_LEN],
    counters: BlockCounters,
}

impl Disk {
    /// Opens the raw image `path` read-write (or read-only). The capacity is the file size
    /// rounded down to a whole sector; `id` is truncated to 20 bytes and zero-padded.
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
        Ok(Disk::with_backend(
            DiskBackend::Raw(file),
            path,
            size,
            read_only,
            id,
        ))
    }

    /// A writable copy-on-write disk over the read-only image `base`, writing to the new file
    /// `overlay` (which must not exist; it is deleted when the disk is dropped, see
    /// [`CowDisk::remove_overlay_on_drop`]) in chunks of [`COW_CHUNK_SIZE`]. The capacity is
    /// the base's size rounded down to a whole sector; `id` as for [`Disk::open`].
    pub fn open_cow(base: &Path, overlay: &Path, id: &str) -> Result<Self, BlockError> {
        let cow = CowDisk::create(base, overlay, COW_CHUNK_SIZE)?;
        Ok(Disk::from_cow(Arc::new(cow), id))
    }

    /// A writable disk over an existing copy-on-write disk (e.g. one created with another
    /// chunk size, or with chunks already loaded from a snapshot).
    pub fn from_cow(cow: Arc<CowDisk>, id: &str) -> Self {
        let size = cow.size();
        let base = cow.base_path().to_owned();
        Disk::with_backend(DiskBackend::Cow(cow), &base, size, false, id)
    }

    fn with_backend(
        backend: DiskBackend,
        path: &Path,
        size: u64,
        read_only: bool,
        id: &str,
    ) -> Self {
        if !size.is_multiple_of(SECTOR_SIZE) {
            crate::guest_warn!(
                "disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} \
                 bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id_bytes = id.as_bytes();
        if id_bytes.len() > DISK_ID_LEN {
            crate::guest_warn!(
                "block device id {id:?} is {} bytes; truncating it to {DISK_ID_LEN}",
                id_bytes.len()
            );
        }
        let mut id_buf = [0u8; DISK_ID_LEN];
        let n = id_bytes.len().min(DISK_ID_LEN);
        id_buf[..n].copy_from_slice(&id_bytes[..n]);
        Disk {
            backend,
            sectors: size / SECTOR_SIZE,
            read_only,
            id: id_buf,
            counters: BlockCounters::default(),
        }
    }

    /// Counts one completed guest request (see [`BlockStats`]).
    pub(super) fn count(&self, kind: super::request::RequestType, bytes: u64) {
        use super::request::RequestType;
        let c = &self.counters;
        let (ops, total) = match kind {
            RequestType::In => (&c.read_ops, Some(&c.read_bytes)),
            RequestType::Out => (&c.write_ops, Some(&c.write_bytes)),
            RequestType::Flush => (&c.flush_ops, None),
            _ => return,
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let Some(total) = total {
            total.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> BlockStats {
        let c = &self.counters;
        BlockStats {
            read_ops: c.read_ops.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_ops: c.write_ops.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            flush_ops: c.flush_ops.load(Ordering::Relaxed),
        }
    }

    /// The raw image file, or `None` for a copy-on-write disk (whose data is split between
    /// the base and the overlay: use [`Disk::read_at`] or [`Disk::cow`]).
    pub fn file(&self) -> Option<&File> {
        match &self.backend {
            DiskBackend::Raw(file) => Some(file),
            DiskBackend::Cow(_) => None,
        }
    }

    /// The copy-on-write disk, if this is one.
    pub fn cow(&self) -> Option<&Arc<CowDisk>> {
        match &self.backend {
            DiskBackend::Raw(_) => None,
            DiskBackend::Cow(cow) => Some(cow),
        }
    }

    /// Checks that `[offset, offset + len)` lies inside the guest-visible capacity.
    fn check_range(&self, op: &str, offset: u64, len: usize) -> io::Result<()> {
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "disk {op} of {len} bytes at offset {offset} is beyond its end ({} bytes)",
                    self.size()
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at byte `offset`. A range past the capacity is an
    /// `InvalidInput` error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range("read", offset, buf.len())?;
        match &self.backend {
            DiskBackend::Raw(file) => file.read_exact_at(buf, offset),
            DiskBackend::Cow(cow) => cow.read_at(buf, offset),
        }
    }

    /// Writes `buf` at byte `offset`. A read-only disk gives a `PermissionDenied` error and a
    /// range past the capacity an `InvalidInput` one.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        self.check_range("write", offset, buf.len())?;
        match &self.backend {
            DiskBackend::Raw(file) => file.write_all_at(buf, offset),
            DiskBackend::Cow(cow) => cow.write_at(buf, offset),
        }
    }

    /// Makes previous writes durable (`fdatasync` of the raw file or the overlay).
    pub fn sync_data(&self) -> io::Result<()> {
        match &self.backend {
            DiskBackend::Raw(file) => file.sync_data(),
            DiskBackend::Cow(cow) => cow.sync_data(),
        }
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
