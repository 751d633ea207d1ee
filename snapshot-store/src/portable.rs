//! Objects and packs as bytes, for copying a store's objects to another place that keeps the
//! same pack format (the remote tier): read an object as it is stored, build a pack and its
//! index in memory, parse an index fetched from elsewhere, and take a fetched object in only
//! after verifying it.

use std::path::Path;

use crate::hash::Hash;
use crate::pack::{self, IdxEntry, ObjectKind, PackError, FLAG_ZSTD};
use crate::store::{self, Result, Store, StoreError};
use crate::writer::PackWriter;

/// One object as a pack stores it: possibly compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub hash: Hash,
    /// Kind and compression bits, as in a pack index.
    pub flags: u8,
    /// Length of the content.
    pub raw_len: u32,
    /// The stored bytes.
    pub bytes: Vec<u8>,
}

impl StoredObject {
    /// What kind of object it is (a blob if the flags name no known kind).
    pub fn kind(&self) -> ObjectKind {
        ObjectKind::from_flags(self.flags).unwrap_or(ObjectKind::Blob)
    }

    /// Its content, decompressed if need be and checked against its hash; `origin` names
    /// where it came from in the error.
    pub fn verify(&self, origin: &Path) -> Result<Vec<u8>> {
        let corrupt = |reason: String| StoreError::Corrupt {
            hash: self.hash,
            pack: origin.to_owned(),
            reason,
        };
        store::check_object_len(self.raw_len as usize)?;
        let content = if self.flags & FLAG_ZSTD != 0 {
            let mut out = Vec::with_capacity(self.raw_len as usize);
            store::decompress_exact(&self.bytes, &mut out, self.raw_len as usize)
                .map_err(|e| corrupt(e.to_string()))?;
            out
        } else if self.bytes.len() == self.raw_len as usize {
            self.bytes.clone()
        } else {
            return Err(corrupt(format!(
                "{} stored bytes for {} raw",
                self.bytes.len(),
                self.raw_len
            )));
        };
        if Hash::of(&content) != self.hash {
            return Err(corrupt("content does not match its hash".into()));
        }
        Ok(content)
    }
}

impl Store {
    /// Reads an object as it is stored (not decompressed, not verified: see
    /// [`StoredObject::verify`]).
    pub fn read_stored(&self, hash: &Hash) -> Result<StoredObject> {
        let located = self.locate(hash).ok_or(StoreError::NotFound(*hash))?;
        let bytes = self.stored_bytes_of(hash)?;
        Ok(StoredObject {
            hash: *hash,
            flags: located.kind.flags(located.compressed),
            raw_len: located.raw_len,
            bytes,
        })
    }
}

impl PackWriter<'_> {
    /// Takes in an object fetched from elsewhere, verifying it first; its stored bytes are
    /// kept as they are. `Ok(false)`: the store (or this writer) had it already.
    pub fn put_stored(&mut self, object: &StoredObject, origin: &Path) -> Result<bool> {
        if self.known(&object.hash) {
            return Ok(false);
        }
        object.verify(origin)?;
        let entry = IdxEntry {
            hash: object.hash,
            offset: 0,
            stored_len: object.bytes.len() as u32,
            raw_len: object.raw_len,
            flags: object.flags,
        };
        self.copy_stored(&entry, &object.bytes)
    }
}

/// One object's place in a pack, as a pack index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub hash: Hash,
    /// Where its stored bytes start in the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
}

/// Parses a pack index fetched from elsewhere (`name` names it in errors): the length of the
/// pack it seals and its entries, sorted by hash. Never panics on any input.
pub fn decode_pack_index(name: &Path, bytes: &[u8]) -> Result<(u64, Vec<PackEntry>), PackError> {
    let (len, entries) = pack::decode_idx(name, bytes)?;
    Ok((
        len,
        entries
            .into_iter()
            .map(|e| PackEntry {
                hash: e.hash,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                flags: e.flags,
            })
            .collect(),
    ))
}

/// A pack built in memory from stored objects.
#[derive(Debug)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<IdxEntry>,
}

/// A finished [`PackBuilder`]: the pack, its index, and a name derived from its content (the
/// index's BLAKE3, hex): the same objects make the same pack, and so the same name.
#[derive(Debug)]
pub struct BuiltPack {
    pub name: String,
    pub pack: Vec<u8>,
    pub index: Vec<u8>,
    pub objects: usize,
}

impl Default for PackBuilder {
    fn default() -> PackBuilder {
        PackBuilder::new()
    }
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder {
            bytes: pack::pack_header().to_vec(),
            entries: Vec::new(),
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it holds no object.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends an object (the caller skips duplicates).
    pub fn push(&mut self, object: &StoredObject) {
        let mut entry = IdxEntry {
            hash: object.hash,
            offset: 0,
            stored_len: object.bytes.len() as u32,
            raw_len: object.raw_len,
            flags: object.flags,
        };
        self.bytes.extend_from_slice(&pack::record_header(&entry));
        entry.offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(&object.bytes);
        self.entries.push(entry);
    }

    /// The pack, its index and its name. Objects are laid out in the order they were pushed
    /// (a working set first stays first); the index is sorted by hash.
    pub fn finish(mut self) -> BuiltPack {
        self.entries.sort_unstable_by_key(|e| e.hash);
        let index = pack::encode_idx(&self.entries, self.bytes.len() as u64);
        BuiltPack {
            name: Hash::of(&index).to_hex(),
            pack: self.bytes,
            index,
            objects: self.entries.len(),
        }
    }
}
