//! A copy-on-write view of a shared, read-only base image.
//!
//! The disk is split into fixed-size chunks. Every chunk starts out "absent": it reads from the
//! base image. The first write to a chunk copies it up into a private, sparse overlay file (the
//! whole chunk, with the new data spliced in) and marks it present in a bitmap; from then on the
//! chunk reads from and writes to the overlay. The base is opened read-only and never written,
//! so any number of sandboxes can share it, and the bitmap says exactly which chunks a guest
//! changed, which is what a snapshot of the disk needs to store.
//!
//! A disk restored from a snapshot need not copy the snapshot's chunks in before the guest runs:
//! [`CowDisk::load_lazily`] marks them *pending* behind a [`ChunkSource`], and each is copied
//! into the overlay on its first read or write (the same copy-up as for a first write, from the
//! snapshot instead of the base).
//!
//! Requests come from the event-loop thread while snapshot code may read the bitmap and the
//! chunks from another, so [`CowDisk`] is `Sync`: the bitmap is atomic and a chunk is marked
//! present only once its data is in the overlay (a concurrent reader sees either the base
//! content or the overlay's). Writers (guest writes, [`CowDisk::load_chunk`]) are serialized by
//! a mutex so that two copy-ups of the same chunk cannot race.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::BlockError;

/// Default chunk size of a copy-on-write disk: the unit of copy-up and of snapshot capture.
pub const COW_CHUNK_SIZE: u32 = 64 * 1024;

/// Chunk sizes must be a multiple of this (and a power of two).
const MIN_CHUNK_SIZE: u32 = 4096;

/// Where the chunks of a restored snapshot come from (the snapshot store, verified).
pub trait ChunkSource: Send + Sync {
    /// Fills `buf` (exactly the chunk's length) with chunk `index`'s content.
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Chunks that belong to the disk but are still in a [`ChunkSource`], not the overlay.
struct PendingChunks {
    source: Arc<dyn ChunkSource>,
    /// One bit per chunk: set while the chunk's content is only in `source`.
    bits: Vec<AtomicU64>,
}

/// Where a chunk's current content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkHome {
    Base,
    Overlay,
    Pending,
}

/// A copy-on-write disk: a read-only base image plus a private overlay file holding the chunks
/// written since creation (or loaded from a snapshot). See the module documentation.
///
/// The overlay is a scratch file owned by the disk: by default it is deleted when the
/// `CowDisk` is dropped (see [`CowDisk::remove_overlay_on_drop`]).
pub struct CowDisk {
    base: File,
    overlay: File,
    base_path: PathBuf,
    overlay_path: PathBuf,
    size: u64,
    chunk_size: u32,
    chunk_count: u64,
    /// One bit per chunk: set once the chunk's current content is in the overlay.
    present: Vec<AtomicU64>,
    /// Serializes writers; holds a reusable chunk-sized buffer for copy-ups.
    write_lock: Mutex<Vec<u8>>,
    remove_on_drop: AtomicBool,
    /// Chunks of a restored snapshot not loaded yet (see [`CowDisk::load_lazily`]).
    pending: Option<PendingChunks>,
}

impl fmt::Debug for CowDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CowDisk")
            .field("base_path", &self.base_path)
            .field("overlay_path", &self.overlay_path)
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunk_count", &self.chunk_count)
            .field("written_chunks", &self.written_chunk_count())
            .field(
                "remove_on_drop",
                &self.remove_on_drop.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl CowDisk {
    /// Opens `base` read-only and creates `overlay` (which must not exist yet) as a sparse
    /// file of the base's size. `chunk_size` must be a power of two and a multiple of 4096
    /// ([`COW_CHUNK_SIZE`] is the usual choice). The disk's size is the base's size.
    pub fn create(base: &Path, overlay: &Path, chunk_size: u32) -> Result<CowDisk, BlockError> {
        if chunk_size < MIN_CHUNK_SIZE || !chunk_size.is_power_of_two() {
            return Err(BlockError::ChunkSize(chunk_size));
        }
        let mut base_file =
            OpenOptions::new()
                .read(true)
                .open(base)
                .map_err(|source| BlockError::Open {
                    path: base.to_owned(),
                    read_only: true,
                    source,
                })?;
        let meta = base_file.metadata().map_err(|source| BlockError::Size {
            path: base.to_owned(),
            source,
        })?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile(base.to_owned()));
        }
        // Seeking to the end also works for block devices, whose metadata length is 0.
        let size = base_file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: base.to_owned(),
                source,
            })?;

        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(|source| BlockError::OverlayCreate {
                path: overlay.to_owned(),
                source,
            })?;
        if let Err(source) = overlay_file.set_len(size) {
            // We created it, so it is ours to remove.
            drop(overlay_file);
            if let Err(e) = std::fs::remove_file(overlay) {
                crate::guest_warn!(
                    "cannot remove the overlay {} after failing to size it: {e}",
                    overlay.display()
                );
            }
            return Err(BlockError::OverlaySize {
                path: overlay.to_owned(),
                size,
                source,
            });
        }

        let chunk_count = size.div_ceil(u64::from(chunk_size));
        let words = chunk_count.div_ceil(64);
        let present = (0..words).map(|_| AtomicU64::new(0)).collect();
        Ok(CowDisk {
            base: base_file,
            overlay: overlay_file,
            base_path: base.to_owned(),
            overlay_path: overlay.to_owned(),
            size,
            chunk_size,
            chunk_count,
            present,
            write_lock: Mutex::new(Vec::new()),
            remove_on_drop: AtomicBool::new(true),
            pending: None,
        })
    }

    /// Size of the disk in bytes (the base image's size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size of a chunk in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks, the last one possibly short.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    /// Length of chunk `index` in bytes: [`CowDisk::chunk_size`], except for a last chunk that
    /// the size does not fill; 0 for an index past the end.
    pub fn chunk_len(&self, index: u64) -> u32 {
        if index >= self.chunk_count {
            return 0;
        }
        let start = index * u64::from(self.chunk_size);
        // `start < size` since `index < chunk_count`; the result is at most `chunk_size`.
        (self.size - start).min(u64::from(self.chunk_size)) as u32
    }

    /// The read-only base image.
    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// The overlay file holding the written chunks.
    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }

    /// Whether dropping the disk deletes the overlay file (the default is yes). Turn it off to
    /// keep the overlay, e.g. to inspect it.
    pub fn remove_overlay_on_drop(&self, yes: bool) {
        self.remove_on_drop.store(yes, Ordering::Relaxed);
    }

    /// Whether chunk `index` lives in the overlay.
    pub fn is_written(&self, index: u64) -> bool {
        if index >= self.chunk_count {
            return false;
        }
        let word = &self.present[(index / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (index % 64)) != 0
    }

    /// Marks chunk `index` (in range) as living in the overlay. Call only once its data is
    /// there.
    fn mark_written(&self, index: u64) {
        self.present[(index / 64) as usize].fetch_or(1 << (index % 64), Ordering::Release);
    }

    /// Declares `chunks` (a restored snapshot's) as part of the disk, their content to come
    /// from `source` on first use instead of being copied in now. Only for a fresh disk: a
    /// chunk already in the overlay, or an index past the end, is an `InvalidInput` error.
    pub fn load_lazily(
        &mut self,
        source: Arc<dyn ChunkSource>,
        chunks: impl IntoIterator<Item = u64>,
    ) -> io::Result<()> {
        let bits: Vec<AtomicU64> = (0..self.present.len()).map(|_| AtomicU64::new(0)).collect();
        for index in chunks {
            if index >= self.chunk_count || self.is_written(index) {
                return Err(invalid_input(format!(
                    "copy-on-write disk {}: cannot load chunk {index} lazily ({} chunks, {} \
                     written)",
                    self.overlay_path.display(),
                    self.chunk_count,
                    self.written_chunk_count()
                )));
            }
            bits[(index / 64) as usize].fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
        self.pending = Some(PendingChunks { source, bits });
        Ok(())
    }

    /// Whether chunk `index` still waits in the [`ChunkSource`].
    pub fn is_pending(&self, index: u64) -> bool {
        match &self.pending {
            Some(p) if index < self.chunk_count => {
                p.bits[(index / 64) as usize].load(Ordering::Acquire) & (1 << (index % 64)) != 0
            }
            _ => false,
        }
    }

    /// Indices of the chunks still waiting in the [`ChunkSource`], ascending.
    pub fn pending_chunks(&self) -> Vec<u64> {
        self.pending
            .as_ref()
            .map(|p| set_bits(&p.bits))
            .unwrap_or_default()
    }

    fn home(&self, index: u64) -> ChunkHome {
        if self.is_written(index) {
            ChunkHome::Overlay
        } else if self.is_pending(index) {
            ChunkHome::Pending
        } else if self.is_written(index) {
            // Loaded between the two checks: a chunk is marked written before it stops being
            // pending, so it is never seen as neither.
            ChunkHome::Overlay
        } else {
            ChunkHome::Base
        }
    }

    /// Copies pending chunk `index` into the overlay (`scratch` is the writers' buffer, so the
    /// caller holds the write lock). Nothing to do if it is no longer pending.
    fn load_pending(&self, index: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
        let Some(pending) = &self.pending else {
            return Ok(());
        };
        if self.is_written(index) || !self.is_pending(index) {
            return Ok(());
        }
        scratch.clear();
        scratch.resize(self.chunk_len(index) as usize, 0);
        pending.source.read_chunk(index, scratch)?;
        self.overlay
            .write_all_at(scratch, index * u64::from(self.chunk_size))?;
        self.mark_written(index);
        pending.bits[(index / 64) as usize].fetch_and(!(1 << (index % 64)), Ordering::Release);
        Ok(())
    }

    /// Indices of the chunks in the overlay (written by the guest or loaded), ascending.
    pub fn written_chunks(&self) -> Vec<u64> {
        set_bits(&self.present)
    }

    /// Number of chunks in the overlay.
    pub fn written_chunk_count(&self) -> u64 {
        self.present
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Checks that `[offset, offset + len)` lies inside the disk.
    fn check_range(&self, op: &str, offset: u64, len: usize) -> io::Result<()> {
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len));
        match end {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(invalid_input(format!(
                "copy-on-write disk {}: {op} of {len} bytes at offset {offset} is beyond its \
                 end ({} bytes)",
                self.overlay_path.display(),
                self.size
            ))),
        }
    }

    /// Calls `f(chunk index, offset in the disk, range in buf)` for each chunk-sized piece of
    /// `[offset, offset + len)`, which must be in range.
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let chunk = u64::from(self.chunk_size);
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let index = pos / chunk;
            let within = pos % chunk;
            // At most `chunk_size`, so it fits in usize.
            let n = ((chunk - within) as usize).min(len - done);
            f(index, pos, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`: each chunk from the overlay if it was written,
    /// else from the base (a pending chunk is loaded into the overlay first). A range past the
    /// end is an `InvalidInput` error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range("read", offset, buf.len())?;
        self.for_each_piece(offset, buf.len(), |index, pos, range| {
            let file = match self.home(index) {
                ChunkHome::Overlay => &self.overlay,
                ChunkHome::Base => &self.base,
                ChunkHome::Pending => {
                    let mut scratch = self
                        .write_lock
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    self.load_pending(index, &mut scratch)?;
                    &self.overlay
                }
            };
            file.read_exact_at(&mut buf[range], pos)
        })
    }

    /// Writes `buf` at `offset` into the overlay. A chunk written for the first time is copied
    /// up from the base first unless the write covers all of it; it is marked written only
    /// once its data is in the overlay. A range past the end is an `InvalidInput` error.
    ///
    /// If an error stops a write spanning several chunks, the chunks before it hold the new
    /// data, like a partial write to a raw disk.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range("write", offset, buf.len())?;
        let mut scratch = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.for_each_piece(offset, buf.len(), |index, pos, range| {
            let data = &buf[range];
            if self.is_pending(index) {
                self.load_pending(index, &mut scratch)?;
            }
            if self.is_written(index) {
                return self.overlay.write_all_at(data, pos);
            }
            let chunk_start = index * u64::from(self.chunk_size);
            let chunk_len = self.chunk_len(index) as usize;
            if data.len() == chunk_len {
                // Covers the whole chunk: nothing to copy up.
                self.overlay.write_all_at(data, chunk_start)?;
            } else {
                // Copy-up: the base chunk with the new data spliced in, in one write.
                scratch.resize(chunk_len, 0);
                self.base.read_exact_at(&mut scratch[..], chunk_start)?;
                let within = (pos - chunk_start) as usize;
                scratch[within..within + data.len()].copy_from_slice(data);
                self.overlay.write_all_at(&scratch[..], chunk_start)?;
            }
            self.mark_written(index);
            Ok(())
        })
    }

    /// Makes the overlay's data durable (the base is never written).
    pub fn sync_data(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }

    /// Reads chunk `index`'s current content into `buf`, which is resized to
    /// [`CowDisk::chunk_len`]. An index past the end is an `InvalidInput` error.
    pub fn read_chunk(&self, index: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        if index >= self.chunk_count {
            return Err(invalid_input(format!(
                "copy-on-write disk {}: chunk {index} is past the last one ({} chunks)",
                self.overlay_path.display(),
                self.chunk_count
            )));
        }
        buf.clear();
        buf.resize(self.chunk_len(index) as usize, 0);
        self.read_at(buf, index * u64::from(self.chunk_size))
    }

    /// Writes a whole chunk into the overlay and marks it written, e.g. when restoring a
    /// snapshot. `data.len()` must equal [`CowDisk::chunk_len`] of `index`, else (or for an
    /// index past the end) this is an `InvalidInput` error.
    pub fn load_chunk(&self, index: u64, data: &[u8]) -> io::Result<()> {
        if index >= self.chunk_count {
            return Err(invalid_input(format!(
                "copy-on-write disk {}: cannot load chunk {index}, past the last one ({} \
                 chunks)",
                self.overlay_path.display(),
                self.chunk_count
            )));
        }
        let expected = self.chunk_len(index) as usize;
        if data.len() != expected {
            return Err(invalid_input(format!(
                "copy-on-write disk {}: chunk {index} is {expected} bytes, got {}",
                self.overlay_path.display(),
                data.len()
            )));
        }
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.overlay
            .write_all_at(data, index * u64::from(self.chunk_size))?;
        self.mark_written(index);
        Ok(())
    }
}

/// Indices of the set bits of a bitmap, ascending.
fn set_bits(words: &[AtomicU64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, word) in words.iter().enumerate() {
        let mut bits = word.load(Ordering::Acquire);
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            out.push(w as u64 * 64 + bit);
            bits &= bits - 1;
        }
    }
    out
}

impl Drop for CowDisk {
    fn drop(&mut self) {
        if !self.remove_on_drop.load(Ordering::Relaxed) {
            return;
        }
        match std::fs::remove_file(&self.overlay_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => crate::guest_warn!(
                "cannot remove the copy-on-write overlay {}: {e}",
                self.overlay_path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
