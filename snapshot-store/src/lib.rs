//! ember's content-addressed snapshot store: guest memory pages and disk chunks, named by
//! their BLAKE3 hash, deduplicated within and across snapshots. It knows nothing about KVM
//! or devices: it stores bytes.
//!
//! Layout under the root directory:
//!
//! ```text
//! packs/<pack-id>.pack   append-only object data, one writer each, immutable once sealed
//! packs/<pack-id>.idx    written when the pack is sealed
//! manifests/<snapshot>   one per snapshot: checksum line + JSON (see [`Manifest`])
//! store.lock             flock: writers and readers shared, GC exclusive
//! ```
//!
//! Formats (integers little-endian):
//!
//! ```text
//! pack      := "EMBPACK\0" version:u32=1 reserved:u32  record*
//! record    := hash:[32] stored_len:u32 raw_len:u32 flags:u8  data:[stored_len]
//! idx       := "EMBIDX\0\0" version:u32=1 reserved:u32 count:u64 pack_len:u64
//!              entry{count}, sorted by hash, unique   blake3(everything before):[32]
//! entry     := hash:[32] offset:u64 stored_len:u32 raw_len:u32 flags:u8  (offset of data)
//! flags     := bit 0 zstd; bits 4..=6 ObjectKind (blob, page, disk chunk, map chunk, state)
//! map chunk := "EMBMAP\0\x01" count:u32 reserved:u32  hash:[32]{count}  (zero = zero page)
//! manifest  := blake3-hex(json) "\n" json
//! ```
//!
//! The remote tier (`ember-remote`) keeps the same formats in an S3-compatible bucket:
//!
//! ```text
//! PREFIX/packs/<name>.pack   as above; <name> is the BLAKE3 (hex) of the pack's index
//! PREFIX/packs/<name>.idx    as above, so an index fetched is checked against its name
//! PREFIX/manifests/<id>      as above, `packs` naming remote packs; written after them
//! ```
//!
//! Untrusted writers (a jailed VMM) never write the store: they write a staging store of their
//! own over it ([`Store::open_staging`]), which the store's owner verifies and takes in
//! ([`Store::ingest`]).
//!
//! Crash safety: a writer appends to its own pack (holding an `flock` on it), then fsyncs
//! it, writes the index under a temporary name, fsyncs, renames and fsyncs the directory.
//! A manifest is saved (temporary file, fsync, hard link, directory fsync) only after
//! checking that everything it references is in a sealed pack. A killed writer leaves at
//! most a pack without an index, which readers ignore and GC removes.
//!
//! Writing a snapshot:
//!
//! ```no_run
//! # fn main() -> Result<(), ember_snapshot_store::StoreError> {
//! use ember_snapshot_store::{Manifest, MemoryRef, ObjectKind, Store};
//! let store = Store::open("/var/lib/ember/store")?;
//! let guest_memory = vec![0u8; 1 << 20];
//! let mut w = store.writer()?;
//! let map = w.put_memory(&guest_memory, 2)?;
//! let chunks = map.store(&mut w)?;
//! let state = w.put(ObjectKind::VmState, b"vcpu and device state")?;
//! let memory = MemoryRef { size_bytes: map.size_bytes(), page_size: 4096, map_chunks: chunks };
//! w.commit(&Manifest::new("snap-1", state, memory))?;
//! # Ok(()) }
//! ```
//!
//! Restoring reads the manifest, [`Store::load_memory_map`], and then
//! [`Store::read_page_into`] per faulting page.

mod fsutil;
mod hash;
mod maintenance;
mod manifest;
mod manifests;
mod map;
mod mem_cache;
mod pack;
mod portable;
mod staging;
mod store;
mod working_set;
mod writer;

pub use hash::{Hash, HashError};
pub use maintenance::{
    GcHold, GcOptions, GcReport, Problem, ProblemKind, StoreStats, VerifyReport,
};
pub use manifest::{
    validate_id, DiskRef, Manifest, ManifestError, MemoryRef, MANIFEST_FORMAT_VERSION,
    MAX_MANIFEST_SIZE,
};
pub use map::{DiskMap, MapError, MemoryMap, PageRef, MAP_CHUNK_ENTRIES, PAGE_SIZE};
pub use mem_cache::{
    CacheEntry, CacheMiss, CachedMemory, EvictReport, Materialised, MemCache, MemCacheError,
};
pub use pack::{ObjectKind, PackError, MAX_OBJECT_SIZE};
pub use portable::{decode_pack_index, BuiltPack, PackBuilder, PackEntry, StoredObject};
pub use staging::{IngestLimits, IngestReport, StagingError};
pub use store::{
    ObjectLocation, RefreshReport, Result, SnapshotIndexing, Store, StoreError, StoreOptions,
};
pub use working_set::{MalformedWorkingSet, RecordedWorkingSet, MAX_WORKING_SET_PAGES};
pub use writer::{hash_pages, PackWriter, WriteStats};
