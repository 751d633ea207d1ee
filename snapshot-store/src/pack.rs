//! On-disk formats of pack files (`packs/<id>.pack`) and their indexes (`packs/<id>.idx`).
//!
//! A pack is append-only and written by one writer; once its index exists it is sealed and
//! never modified again (GC only ever unlinks whole packs). All integers are little-endian.
//!
//! ```text
//! pack  := "EMBPACK\0" version:u32=1 reserved:u32=0  record*
//! record:= hash:[32] stored_len:u32 raw_len:u32 flags:u8  data:[stored_len]
//! idx   := "EMBIDX\0\0" version:u32=1 reserved:u32=0 count:u64 pack_len:u64
//!          entry{count} (sorted by hash, no duplicates)  blake3(all bytes before):[32]
//! entry := hash:[32] offset:u64 stored_len:u32 raw_len:u32 flags:u8   (offset = data start)
//! flags := bit 0: zstd-compressed; bits 4..=6: ObjectKind; other bits zero
//! ```
//!
//! The record headers duplicate the index entries so that a pack is self-describing
//! (verify cross-checks them; an index could be rebuilt from a pack).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::hash::Hash;

/// Largest object the store accepts (raw bytes).
pub const MAX_OBJECT_SIZE: usize = 64 << 20;
/// Largest index file accepted when loading.
pub(crate) const MAX_IDX_FILE: u64 = 1 << 30;

pub(crate) const PACK_MAGIC: &[u8; 8] = b"EMBPACK\0";
pub(crate) const IDX_MAGIC: &[u8; 8] = b"EMBIDX\0\0";
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const PACK_HEADER_LEN: usize = 16;
pub(crate) const RECORD_HEADER_LEN: usize = 41;
pub(crate) const IDX_HEADER_LEN: usize = 32;
pub(crate) const IDX_ENTRY_LEN: usize = 49;
pub(crate) const IDX_TRAILER_LEN: usize = 32;

pub(crate) const FLAG_ZSTD: u8 = 1;
const KIND_SHIFT: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_ZSTD | (0x7 << KIND_SHIFT);

/// Errors of this module: a pack or index that cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Wrong magic bytes.
    #[error("{path}: not an ember {what} file (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// "pack" or "pack index".
        what: &'static str,
    },
    /// A format version this build does not read.
    #[error(
        "{path}: unsupported {what} format version {version} (this build reads {FORMAT_VERSION})"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// "pack" or "pack index".
        what: &'static str,
        /// The version found.
        version: u32,
    },
    /// The file's length disagrees with its header.
    #[error("{path}: {what} is {len} bytes long, expected {expected}")]
    Length {
        /// The file.
        path: PathBuf,
        /// "pack" or "pack index".
        what: &'static str,
        /// Actual length.
        len: u64,
        /// Expected length (or the bound it exceeds).
        expected: u64,
    },
    /// The index's trailing checksum does not match its contents.
    #[error("{path}: pack index checksum mismatch (file is corrupt or truncated)")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// An index entry is impossible (out of bounds, unsorted, unknown flags, ...).
    #[error("{path}: index entry {index} ({hash}): {reason}")]
    BadEntry {
        /// The file.
        path: PathBuf,
        /// Entry number.
        index: u64,
        /// The entry's hash.
        hash: Hash,
        /// What is wrong.
        reason: String,
    },
}

/// What an object is; recorded in its flags. Objects are named by content alone, so the
/// same bytes stored as two kinds are one object (the first kind written is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// Anything else.
    Blob = 0,
    /// A 4 KiB guest memory page.
    Page = 1,
    /// A chunk of a disk image.
    DiskChunk = 2,
    /// A chunk of a memory or disk map.
    MapChunk = 3,
    /// Serialized vCPU/device state.
    VmState = 4,
}

impl ObjectKind {
    pub(crate) fn from_flags(flags: u8) -> Option<ObjectKind> {
        Some(match (flags >> KIND_SHIFT) & 0x7 {
            0 => ObjectKind::Blob,
            1 => ObjectKind::Page,
            2 => ObjectKind::DiskChunk,
            3 => ObjectKind::MapChunk,
            4 => ObjectKind::VmState,
            _ => return None,
        })
    }

    pub(crate) fn flags(self, compressed: bool) -> u8 {
        ((self as u8) << KIND_SHIFT) | if compressed { FLAG_ZSTD } else { 0 }
    }
}

/// One object's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdxEntry {
    pub hash: Hash,
    /// Offset of the data (after the record header) in the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl IdxEntry {
    pub(crate) fn compressed(&self) -> bool {
        self.flags & FLAG_ZSTD != 0
    }
}

pub(crate) fn pack_header() -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

pub(crate) fn record_header(e: &IdxEntry) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..32].copy_from_slice(e.hash.as_bytes());
    h[32..36].copy_from_slice(&e.stored_len.to_le_bytes());
    h[36..40].copy_from_slice(&e.raw_len.to_le_bytes());
    h[40] = e.flags;
    h
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn read_hash(b: &[u8], at: usize) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[at..at + 32]);
    Hash(h)
}

/// Checks a pack's header (`bytes` is at least the start of the pack).
pub(crate) fn check_pack_header(path: &Path, bytes: &[u8]) -> Result<(), PackError> {
    if bytes.len() < PACK_HEADER_LEN {
        return Err(PackError::Length {
            path: path.to_owned(),
            what: "pack",
            len: bytes.len() as u64,
            expected: PACK_HEADER_LEN as u64,
        });
    }
    if &bytes[..8] != PACK_MAGIC {
        return Err(PackError::BadMagic {
            path: path.to_owned(),
            what: "pack",
        });
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(PackError::Version {
            path: path.to_owned(),
            what: "pack",
            version,
        });
    }
    Ok(())
}

/// Serializes an index; `entries` must be sorted by hash without duplicates.
pub(crate) fn encode_idx(entries: &[IdxEntry], pack_len: u64) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(IDX_HEADER_LEN + entries.len() * IDX_ENTRY_LEN + IDX_TRAILER_LEN);
    out.extend_from_slice(IDX_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&pack_len.to_le_bytes());
    for e in entries {
        out.extend_from_slice(e.hash.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.push(e.flags);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Parses and validates an index read from `path`: returns the pack length it seals and
/// its entries. Never panics on any input.
pub(crate) fn decode_idx(path: &Path, bytes: &[u8]) -> Result<(u64, Vec<IdxEntry>), PackError> {
    let len = bytes.len() as u64;
    let min = (IDX_HEADER_LEN + IDX_TRAILER_LEN) as u64;
    if len < min {
        return Err(PackError::Length {
            path: path.to_owned(),
            what: "pack index",
            len,
            expected: min,
        });
    }
    if &bytes[..8] != IDX_MAGIC {
        return Err(PackError::BadMagic {
            path: path.to_owned(),
            what: "pack index",
        });
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(PackError::Version {
            path: path.to_owned(),
            what: "pack index",
            version,
        });
    }
    let count = read_u64(bytes, 16);
    let pack_len = read_u64(bytes, 24);
    let expected = count
        .checked_mul(IDX_ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(min));
    if expected != Some(len) {
        return Err(PackError::Length {
            path: path.to_owned(),
            what: "pack index",
            len,
            expected: expected.unwrap_or(u64::MAX),
        });
    }
    let body = bytes.len() - IDX_TRAILER_LEN;
    if blake3::hash(&bytes[..body]).as_bytes() != &bytes[body..] {
        return Err(PackError::Checksum {
            path: path.to_owned(),
        });
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut prev: Option<Hash> = None;
    for (i, raw) in bytes[IDX_HEADER_LEN..body]
        .chunks_exact(IDX_ENTRY_LEN)
        .enumerate()
    {
        let e = IdxEntry {
            hash: read_hash(raw, 0),
            offset: read_u64(raw, 32),
            stored_len: read_u32(raw, 40),
            raw_len: read_u32(raw, 44),
            flags: raw[48],
        };
        let bad = |reason: String| PackError::BadEntry {
            path: path.to_owned(),
            index: i as u64,
            hash: e.hash,
            reason,
        };
        if prev.is_some_and(|p| p >= e.hash) {
            return Err(bad("entries not sorted by hash or duplicated".into()));
        }
        prev = Some(e.hash);
        if e.flags & !KNOWN_FLAGS != 0 || ObjectKind::from_flags(e.flags).is_none() {
            return Err(bad(format!("unknown flags {:#04x}", e.flags)));
        }
        if e.raw_len as usize > MAX_OBJECT_SIZE {
            return Err(bad(format!(
                "raw length {} exceeds the object bound {MAX_OBJECT_SIZE}",
                e.raw_len
            )));
        }
        if !e.compressed() && e.stored_len != e.raw_len {
            return Err(bad(format!(
                "uncompressed object with stored length {} != raw length {}",
                e.stored_len, e.raw_len
            )));
        }
        if e.compressed() && e.stored_len > e.raw_len {
            return Err(bad(format!(
                "compressed length {} exceeds raw length {}",
                e.stored_len, e.raw_len
            )));
        }
        let first = (PACK_HEADER_LEN + RECORD_HEADER_LEN) as u64;
        let end = e.offset.checked_add(u64::from(e.stored_len));
        if e.offset < first || end.is_none_or(|end| end > pack_len) {
            return Err(bad(format!(
                "offset {} + length {} outside the pack's data ({first}..{pack_len})",
                e.offset, e.stored_len
            )));
        }
        entries.push(e);
    }
    Ok((pack_len, entries))
}

/// Reads and decodes `packs/<id>.idx`.
pub(crate) fn read_idx(path: &Path) -> Result<(u64, Vec<IdxEntry>), PackError> {
    let io = |source| PackError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_IDX_FILE {
        return Err(PackError::Length {
            path: path.to_owned(),
            what: "pack index",
            len,
            expected: MAX_IDX_FILE,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_IDX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode_idx(path, &bytes)
}

/// A sealed pack's bytes: mapped (the fast path of a process that trusts the store's files),
/// or read on demand with `pread` (a process that must not die if someone truncates a pack
/// behind the store's back: a truncated mapping faults with SIGBUS, a short read is an error).
pub(crate) enum PackBytes {
    Mapped(Mmap),
    Read { file: File, len: u64 },
}

impl PackBytes {
    /// The pack's length when it was opened.
    pub(crate) fn len(&self) -> u64 {
        match self {
            PackBytes::Mapped(map) => map.len() as u64,
            PackBytes::Read { len, .. } => *len,
        }
    }

    /// The bytes `[offset, offset + len)`: borrowed from the mapping, or read into `buf`.
    /// `None` if they lie outside the pack or cannot be read (the file shrank).
    pub(crate) fn get<'a>(
        &'a self,
        offset: u64,
        len: usize,
        buf: &'a mut Vec<u8>,
    ) -> Option<&'a [u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len() {
            return None;
        }
        match self {
            PackBytes::Mapped(map) => {
                map.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
            }
            PackBytes::Read { file, .. } => {
                use std::os::unix::fs::FileExt;
                buf.clear();
                buf.resize(len, 0);
                file.read_exact_at(buf, offset).ok()?;
                Some(&buf[..])
            }
        }
    }
}

/// Opens a sealed pack after checking its length against its index and its header; `map`
/// chooses [`PackBytes::Mapped`] over [`PackBytes::Read`].
pub(crate) fn open_sealed_pack(
    path: &Path,
    pack_len: u64,
    map: bool,
) -> Result<PackBytes, PackError> {
    let io = |source| PackError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len != pack_len {
        return Err(PackError::Length {
            path: path.to_owned(),
            what: "pack",
            len,
            expected: pack_len,
        });
    }
    let bytes = if map {
        // SAFETY: the mapping is read-only and private to this process. A sealed pack is
        // never written again by the store (writers only append to their own unsealed pack;
        // GC only unlinks sealed packs, which leaves existing mappings valid), so the bytes
        // behind the mapping do not change while it lives. Only a process that trusts every
        // writer of the store's files maps them (see `StoreOptions::map_packs`).
        PackBytes::Mapped(unsafe { Mmap::map(&file) }.map_err(io)?)
    } else {
        PackBytes::Read { file, len }
    };
    let mut header = Vec::new();
    let head = bytes
        .get(0, PACK_HEADER_LEN.min(len as usize), &mut header)
        .ok_or_else(|| io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)))?;
    check_pack_header(path, head)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, offset: u64, len: u32) -> IdxEntry {
        IdxEntry {
            hash: Hash([n; 32]),
            offset,
            stored_len: len,
            raw_len: len,
            flags: ObjectKind::Page.flags(false),
        }
    }

    #[test]
    fn idx_round_trip_and_rejections() {
        let p = Path::new("/x/p.idx");
        let first = (PACK_HEADER_LEN + RECORD_HEADER_LEN) as u64;
        let es = [entry(1, first, 10), entry(2, first + 10 + 41, 5)];
        let pack_len = first + 10 + 41 + 5;
        let bytes = encode_idx(&es, pack_len);
        assert_eq!(decode_idx(p, &bytes).unwrap(), (pack_len, es.to_vec()));

        // Every truncation is rejected, never a panic.
        for cut in 0..bytes.len() {
            let e = decode_idx(p, &bytes[..cut]).unwrap_err();
            assert!(e.to_string().contains("/x/p.idx"), "{e}");
        }
        // Every single-byte flip is rejected.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode_idx(p, &b).is_err(), "flip at {i} accepted");
        }
        // Valid checksum but entries out of bounds / unsorted.
        let bad = encode_idx(&[entry(1, first, 10)], first + 5);
        assert!(matches!(
            decode_idx(p, &bad),
            Err(PackError::BadEntry { .. })
        ));
        let bad = encode_idx(&[es[1], es[0]], pack_len);
        let e = decode_idx(p, &bad).unwrap_err();
        assert!(e.to_string().contains("sorted"), "{e}");
        let mut odd = es[0];
        odd.flags = 0x80;
        let e = decode_idx(p, &encode_idx(&[odd], pack_len)).unwrap_err();
        assert!(e.to_string().contains("flags"), "{e}");
        // Huge count must not overflow or allocate.
        let mut b = bytes.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_idx(p, &b), Err(PackError::Length { .. })));
    }

    #[test]
    fn pack_header_checks() {
        let p = Path::new("/x/p.pack");
        check_pack_header(p, &pack_header()).unwrap();
        assert!(check_pack_header(p, b"EMB").is_err());
        let mut h = pack_header();
        h[8] = 9;
        let e = check_pack_header(p, &h).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
    }
}
