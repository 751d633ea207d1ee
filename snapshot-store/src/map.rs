//! Memory maps (one [`PageRef`] per guest page) and disk maps (one optional hash per chunk),
//! stored in the store itself as map-chunk objects so identical stretches dedupe across
//! snapshots.
//!
//! ```text
//! map chunk := "EMBMAP\0\x01" count:u32 reserved:u32=0  entry{count}
//! entry     := hash:[32]   (all zero = zero page / zero chunk)
//! ```
//! A map of `n` entries is split into chunks of [`MAP_CHUNK_ENTRIES`]; only the last may be
//! shorter (and none is empty).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::hash::Hash;
use crate::pack::{ObjectKind, MAX_OBJECT_SIZE};
use crate::store::{Store, StoreError};
use crate::writer::PackWriter;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Entries per map chunk.
pub const MAP_CHUNK_ENTRIES: usize = 2048;
const MAP_MAGIC: &[u8; 8] = b"EMBMAP\0\x01";
const MAP_HEADER_LEN: usize = 16;

/// Errors of this module: maps that are inconsistent or cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A map chunk object does not decode.
    #[error("map chunk {hash}: {reason}")]
    BadChunk {
        /// The chunk's hash.
        hash: Hash,
        /// What is wrong.
        reason: String,
    },
    /// The chunks hold a different number of entries than the map's size requires.
    #[error("{what} map has {got} entries, its size requires {expected}")]
    EntryCount {
        /// "memory" or "disk".
        what: &'static str,
        /// Entries found.
        got: u64,
        /// Entries required.
        expected: u64,
    },
    /// An update past the end of the map.
    #[error("page index {index} is outside the memory map ({pages} pages)")]
    PageOutOfRange {
        /// The index.
        index: u64,
        /// The map's page count.
        pages: u64,
    },
    /// A page size other than 4096.
    #[error("unsupported page size {0} (only 4096)")]
    PageSize(u64),
    /// A memory size that is not a whole number of pages.
    #[error("memory size {0} is not a multiple of the 4096-byte page size")]
    UnalignedSize(u64),
    /// A disk chunk size of 0 or over the object bound.
    #[error("disk chunk size {0} must be between 1 and {MAX_OBJECT_SIZE} bytes")]
    ChunkSize(u64),
    /// A destination buffer of the wrong size.
    #[error("destination is {got} bytes, the map describes {expected}")]
    DestinationSize {
        /// Its length.
        got: u64,
        /// The map's size.
        expected: u64,
    },
    /// A stored chunk whose length does not fit its place in the disk map.
    #[error("disk chunk {index} ({hash}) is {got} bytes, expected {expected}")]
    DiskChunkLength {
        /// Chunk index.
        index: u64,
        /// Its hash.
        hash: Hash,
        /// Its length.
        got: u64,
        /// The length its position requires.
        expected: u64,
    },
}

/// One guest page: all zeros (not stored), or an object in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageRef {
    /// An all-zero page.
    Zero,
    /// A stored page.
    Object(Hash),
}

impl PageRef {
    fn to_entry(self) -> Option<Hash> {
        match self {
            PageRef::Zero => None,
            PageRef::Object(h) => Some(h),
        }
    }
}

/// Guest memory as a list of page references, one per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    /// Always [`PAGE_SIZE`].
    pub page_size: u32,
    /// One per guest page.
    pub pages: Vec<PageRef>,
}

impl MemoryMap {
    /// A map of the given pages.
    pub fn new(pages: Vec<PageRef>) -> MemoryMap {
        MemoryMap {
            page_size: PAGE_SIZE as u32,
            pages,
        }
    }

    /// A map of `page_count` zero pages.
    pub fn zeroed(page_count: usize) -> MemoryMap {
        MemoryMap::new(vec![PageRef::Zero; page_count])
    }

    /// Guest memory size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.pages.len() as u64 * u64::from(self.page_size)
    }

    /// How many pages are zero pages.
    pub fn zero_pages(&self) -> usize {
        self.pages.iter().filter(|p| **p == PageRef::Zero).count()
    }

    /// A diff snapshot's map: `parent` with the pages in `updates` replaced. The pages an
    /// update names must already be in the store (put them with the same writer that stores
    /// the new map).
    pub fn with_updates(
        parent: &MemoryMap,
        updates: impl IntoIterator<Item = (u64, PageRef)>,
    ) -> Result<MemoryMap, MapError> {
        let mut map = parent.clone();
        let pages = map.pages.len() as u64;
        for (index, page) in updates {
            let slot = usize::try_from(index)
                .ok()
                .and_then(|i| map.pages.get_mut(i))
                .ok_or(MapError::PageOutOfRange { index, pages })?;
            *slot = page;
        }
        Ok(map)
    }

    /// Stores the map as map-chunk objects with `writer`; returns their hashes in order
    /// (for [`crate::MemoryRef::map_chunks`]).
    pub fn store(&self, writer: &mut PackWriter<'_>) -> Result<Vec<Hash>, StoreError> {
        store_entries(writer, self.pages.iter().map(|p| p.to_entry()))
    }

    /// Loads a map from its chunks, checking every chunk's format. The page count is
    /// whatever the chunks hold; [`Store::load_memory_map`] also checks it against a
    /// manifest's size.
    pub fn load(store: &Store, chunks: &[Hash]) -> Result<MemoryMap, StoreError> {
        MemoryMap::load_with(chunks, |h| store.read(h))
    }

    /// As [`MemoryMap::load`], each chunk's verified content given by `read` (chunks fetched
    /// from elsewhere, not yet in a store).
    pub fn load_with(
        chunks: &[Hash],
        read: impl FnMut(&Hash) -> Result<Vec<u8>, StoreError>,
    ) -> Result<MemoryMap, StoreError> {
        let entries = load_entries(chunks, read)?;
        Ok(MemoryMap::new(
            entries
                .into_iter()
                .map(|e| e.map_or(PageRef::Zero, PageRef::Object))
                .collect(),
        ))
    }

    /// Reads every page into `dst` (which must be exactly [`MemoryMap::size_bytes`] long):
    /// an eager restore. Zero pages are written as zeros.
    pub fn restore_into(&self, store: &Store, dst: &mut [u8]) -> Result<(), StoreError> {
        if dst.len() as u64 != self.size_bytes() {
            return Err(MapError::DestinationSize {
                got: dst.len() as u64,
                expected: self.size_bytes(),
            }
            .into());
        }
        for (page, out) in self.pages.iter().zip(dst.chunks_exact_mut(PAGE_SIZE)) {
            let len = out.len() as u64;
            // `chunks_exact_mut` yields whole pages only, so this never fails.
            let Ok(out) = <&mut [u8; PAGE_SIZE]>::try_from(out) else {
                return Err(MapError::PageSize(len).into());
            };
            match page {
                PageRef::Zero => out.fill(0),
                PageRef::Object(h) => store.read_page_into(h, out)?,
            }
        }
        Ok(())
    }
}

/// A disk image as a list of chunk hashes (`None` = an all-zero chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMap {
    /// Image size in bytes.
    pub size: u64,
    /// Chunk size in bytes; the last chunk may be shorter.
    pub chunk_size: u32,
    /// `ceil(size / chunk_size)` entries.
    pub chunks: Vec<Option<Hash>>,
}

impl DiskMap {
    /// How many chunks a disk of `size` bytes has.
    pub fn chunk_count(size: u64, chunk_size: u32) -> Result<u64, MapError> {
        if chunk_size == 0 || chunk_size as usize > MAX_OBJECT_SIZE {
            return Err(MapError::ChunkSize(u64::from(chunk_size)));
        }
        Ok(size.div_ceil(u64::from(chunk_size)))
    }

    /// The length chunk `index` must have.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(u64::from(self.chunk_size));
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }

    /// Stores the map as map-chunk objects with `writer`.
    pub fn store(&self, writer: &mut PackWriter<'_>) -> Result<Vec<Hash>, StoreError> {
        store_entries(writer, self.chunks.iter().copied())
    }

    /// Loads a disk map and checks its entry count against `size` and `chunk_size`.
    pub fn load(
        store: &Store,
        size: u64,
        chunk_size: u32,
        map_chunks: &[Hash],
    ) -> Result<DiskMap, StoreError> {
        DiskMap::load_with(size, chunk_size, map_chunks, |h| store.read(h))
    }

    /// As [`DiskMap::load`], each chunk's verified content given by `read`.
    pub fn load_with(
        size: u64,
        chunk_size: u32,
        map_chunks: &[Hash],
        read: impl FnMut(&Hash) -> Result<Vec<u8>, StoreError>,
    ) -> Result<DiskMap, StoreError> {
        let expected = DiskMap::chunk_count(size, chunk_size)?;
        check_chunk_count("disk", map_chunks.len(), expected)?;
        let chunks = load_entries(map_chunks, read)?;
        if chunks.len() as u64 != expected {
            return Err(MapError::EntryCount {
                what: "disk",
                got: chunks.len() as u64,
                expected,
            }
            .into());
        }
        Ok(DiskMap {
            size,
            chunk_size,
            chunks,
        })
    }

    /// Writes the image to `file` (set to `size` bytes; zero chunks are left as holes).
    pub fn write_to(&self, store: &Store, file: &File) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: format!("disk image being restored (fd of size {})", self.size).into(),
            source,
        };
        file.set_len(0).map_err(io)?;
        file.set_len(self.size).map_err(io)?;
        for (i, chunk) in self.chunks.iter().enumerate() {
            let Some(hash) = chunk else { continue };
            let data = store.read(hash)?;
            let expected = self.chunk_len(i as u64);
            if data.len() as u64 != expected {
                return Err(MapError::DiskChunkLength {
                    index: i as u64,
                    hash: *hash,
                    got: data.len() as u64,
                    expected,
                }
                .into());
            }
            file.write_all_at(&data, i as u64 * u64::from(self.chunk_size))
                .map_err(io)?;
        }
        Ok(())
    }
}

/// Checks that `chunks` map chunks can hold `entries` entries.
pub(crate) fn check_chunk_count(
    what: &'static str,
    chunks: usize,
    entries: u64,
) -> Result<(), MapError> {
    let needed = entries.div_ceil(MAP_CHUNK_ENTRIES as u64);
    if chunks as u64 != needed {
        return Err(MapError::EntryCount {
            what,
            got: (chunks as u64).saturating_mul(MAP_CHUNK_ENTRIES as u64),
            expected: entries,
        });
    }
    Ok(())
}

fn encode_chunk(entries: &[Option<Hash>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAP_HEADER_LEN + entries.len() * 32);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.as_ref().unwrap_or(&Hash::ZERO).as_bytes());
    }
    out
}

/// Decodes one map chunk into `out`. Never panics.
pub(crate) fn decode_chunk(
    hash: &Hash,
    bytes: &[u8],
    out: &mut Vec<Option<Hash>>,
) -> Result<(), MapError> {
    let bad = |reason: String| MapError::BadChunk {
        hash: *hash,
        reason,
    };
    if bytes.len() < MAP_HEADER_LEN || &bytes[..8] != MAP_MAGIC {
        return Err(bad(format!(
            "not a map chunk (bad magic, {} bytes)",
            bytes.len()
        )));
    }
    let mut w = [0u8; 4];
    w.copy_from_slice(&bytes[8..12]);
    let count = u32::from_le_bytes(w) as usize;
    if count == 0 || count > MAP_CHUNK_ENTRIES {
        return Err(bad(format!(
            "entry count {count} outside 1..={MAP_CHUNK_ENTRIES}"
        )));
    }
    if bytes.len() != MAP_HEADER_LEN + count * 32 {
        return Err(bad(format!(
            "{} bytes long, {count} entries need {}",
            bytes.len(),
            MAP_HEADER_LEN + count * 32
        )));
    }
    out.extend(bytes[MAP_HEADER_LEN..].chunks_exact(32).map(|e| {
        let mut h = [0u8; 32];
        h.copy_from_slice(e);
        let h = Hash(h);
        (!h.is_zero()).then_some(h)
    }));
    Ok(())
}

fn store_entries(
    writer: &mut PackWriter<'_>,
    entries: impl Iterator<Item = Option<Hash>>,
) -> Result<Vec<Hash>, StoreError> {
    let mut hashes = Vec::new();
    let mut buf = Vec::with_capacity(MAP_CHUNK_ENTRIES);
    let mut flush = |buf: &mut Vec<Option<Hash>>, hashes: &mut Vec<Hash>| {
        let h = writer.put(ObjectKind::MapChunk, &encode_chunk(buf))?;
        hashes.push(h);
        buf.clear();
        Ok::<(), StoreError>(())
    };
    for e in entries {
        buf.push(e);
        if buf.len() == MAP_CHUNK_ENTRIES {
            flush(&mut buf, &mut hashes)?;
        }
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut hashes)?;
    }
    Ok(hashes)
}

fn load_entries(
    chunks: &[Hash],
    mut read: impl FnMut(&Hash) -> Result<Vec<u8>, StoreError>,
) -> Result<Vec<Option<Hash>>, StoreError> {
    // Capped: the chunk list comes from a manifest, and a chunk may be listed many times.
    let mut out = Vec::with_capacity(chunks.len().saturating_mul(MAP_CHUNK_ENTRIES).min(1 << 20));
    for (i, h) in chunks.iter().enumerate() {
        let before = out.len();
        let bytes = read(h)?;
        decode_chunk(h, &bytes, &mut out)?;
        let n = out.len() - before;
        if n != MAP_CHUNK_ENTRIES && i + 1 != chunks.len() {
            return Err(MapError::BadChunk {
                hash: *h,
                reason: format!(
                    "chunk {i} of {} holds {n} entries; only the last may hold fewer than {MAP_CHUNK_ENTRIES}",
                    chunks.len()
                ),
            }
            .into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_codec() {
        let es = vec![Some(Hash::of(b"a")), None, Some(Hash::of(b"b"))];
        let bytes = encode_chunk(&es);
        let h = Hash::of(&bytes);
        let mut out = Vec::new();
        decode_chunk(&h, &bytes, &mut out).unwrap();
        assert_eq!(out, es);
        for cut in 0..bytes.len() {
            assert!(decode_chunk(&h, &bytes[..cut], &mut Vec::new()).is_err());
        }
        let mut b = bytes.clone();
        b[8] = 0;
        let e = decode_chunk(&h, &b, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains(&h.to_string()), "{e}");
    }

    #[test]
    fn updates() {
        let parent = MemoryMap::zeroed(4);
        let p = PageRef::Object(Hash::of(b"p"));
        let m = MemoryMap::with_updates(&parent, [(2, p)]).unwrap();
        assert_eq!(
            m.pages,
            vec![PageRef::Zero, PageRef::Zero, p, PageRef::Zero]
        );
        let e = MemoryMap::with_updates(&parent, [(4, p)]).unwrap_err();
        assert!(e.to_string().contains("page index 4"), "{e}");
        assert!(MemoryMap::with_updates(&parent, [(u64::MAX, p)]).is_err());
    }

    #[test]
    fn disk_geometry() {
        assert_eq!(DiskMap::chunk_count(10, 4).unwrap(), 3);
        assert!(DiskMap::chunk_count(10, 0).is_err());
        let d = DiskMap {
            size: 10,
            chunk_size: 4,
            chunks: vec![None; 3],
        };
        assert_eq!((d.chunk_len(0), d.chunk_len(2), d.chunk_len(3)), (4, 2, 0));
    }
}
