//! Manifests: one file per snapshot under `manifests/<snapshot-id>`.
//!
//! On disk: the first line is the BLAKE3 (hex) of the bytes that follow it, then the JSON
//! of [`Manifest`]. Reading rejects a bad checksum, truncation, a file over
//! [`MAX_MANIFEST_SIZE`], an unknown `format_version` and a manifest whose `id` differs from
//! its file name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hash::Hash;

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// Largest manifest file accepted (and written).
pub const MAX_MANIFEST_SIZE: u64 = 16 << 20;
/// Longest snapshot id.
pub const MAX_ID_LEN: usize = 64;

/// Errors of this module. Every variant names the snapshot id or the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A snapshot id that could name something outside `manifests/`, or is otherwise invalid.
    #[error("invalid snapshot id {id:?}: expected 1-{MAX_ID_LEN} characters from [A-Za-z0-9._-], not starting with '.'")]
    InvalidId {
        /// The id (cut to 100 characters).
        id: String,
    },
    /// No manifest with that id.
    #[error("snapshot {id:?} not found ({path})")]
    NotFound {
        /// The id.
        id: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A snapshot with that id already exists (ids are write-once).
    #[error("snapshot {id:?} already exists ({path})")]
    Exists {
        /// The id.
        id: String,
        /// Its file.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is over the size bound.
    #[error("{path}: manifest is {len} bytes, more than the {max}-byte bound")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// No checksum line (empty or truncated file).
    #[error("{path}: manifest has no checksum line (empty or truncated)")]
    NoChecksumLine {
        /// The file.
        path: PathBuf,
    },
    /// The first line is not a hash.
    #[error("{path}: manifest checksum line is not a BLAKE3 hex hash: {reason}")]
    BadChecksumLine {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The JSON does not match the checksum (corrupt or truncated).
    #[error("{path}: manifest checksum mismatch (recorded {recorded}, contents hash to {actual}): corrupt or truncated")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum line.
        recorded: Hash,
        /// The hash of the contents.
        actual: Hash,
    },
    /// The JSON does not parse as a manifest.
    #[error("{path}: manifest JSON is invalid: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A format version this build cannot read.
    #[error("{path}: unsupported manifest format version {version} (this build reads {MANIFEST_FORMAT_VERSION})")]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u64,
    },
    /// The manifest's `id` is not its file name.
    #[error("{path}: manifest id {id:?} does not match its file name")]
    IdMismatch {
        /// The file.
        path: PathBuf,
        /// The id inside.
        id: String,
    },
    /// A pack named by the manifest has an id no pack can have (it would name a path
    /// outside the store's `packs/`).
    #[error("{path}: manifest names an invalid pack id {id:?}")]
    BadPackId {
        /// The file.
        path: PathBuf,
        /// The id (cut to 100 characters).
        id: String,
    },
    /// Serializing produced more than the size bound.
    #[error(
        "manifest {id:?} serializes to {len} bytes, more than the {MAX_MANIFEST_SIZE}-byte bound"
    )]
    EncodeTooLarge {
        /// The snapshot id.
        id: String,
        /// The encoded length.
        len: usize,
    },
    /// Serialization failed.
    #[error("manifest {id:?}: cannot serialize: {source}")]
    Encode {
        /// The snapshot id.
        id: String,
        /// The cause.
        source: serde_json::Error,
    },
}

impl ManifestError {
    /// Whether the manifest file is there but its contents are damaged (it can never be
    /// read), as opposed to missing, unreachable or refused by name.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            ManifestError::TooLarge { .. }
                | ManifestError::NoChecksumLine { .. }
                | ManifestError::BadChecksumLine { .. }
                | ManifestError::Checksum { .. }
                | ManifestError::Json { .. }
        )
    }
}

/// Guest memory of a snapshot: its size and the map chunks of its [`crate::MemoryMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRef {
    /// Guest memory size in bytes (a multiple of `page_size`).
    pub size_bytes: u64,
    /// Always 4096 in this format version.
    pub page_size: u32,
    /// The memory map's chunks, in order.
    pub map_chunks: Vec<Hash>,
}

/// One disk of a snapshot: its geometry and the map chunks of its [`crate::DiskMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    /// The disk's name in the VM (free text, never used as a path).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// The disk map's chunks, in order.
    pub map_chunks: Vec<Hash>,
}

/// A snapshot: everything needed to restore a microVM, by reference into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT_VERSION`].
    pub format_version: u32,
    /// The snapshot id (also the file name); see [`validate_id`].
    pub id: String,
    /// A human name.
    pub name: Option<String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The snapshot this one was derived from (informational: maps are always complete).
    pub parent: Option<String>,
    /// The serialized vCPU and device state object.
    pub vm_state: Hash,
    /// Guest memory.
    pub memory: MemoryRef,
    /// Disks.
    pub disks: Vec<DiskRef>,
    /// Free-form key/values.
    pub metadata: BTreeMap<String, String>,
    /// The packs that held every object this snapshot references when it was saved
    /// (sorted; filled in by [`crate::Store::save_manifest`]). A restore indexes only these
    /// instead of the whole store ([`crate::Store::index_snapshot`]): packs never change and
    /// their ids are never reused, so while all of them exist they hold everything the
    /// snapshot needs; if one is gone (a GC rewrote it) the restore indexes the whole store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<String>,
}

impl Manifest {
    /// A manifest with the current format version and time, no name, parent, disks or
    /// metadata.
    pub fn new(id: impl Into<String>, vm_state: Hash, memory: MemoryRef) -> Manifest {
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            id: id.into(),
            name: None,
            created_unix_ms,
            parent: None,
            vm_state,
            memory,
            disks: Vec::new(),
            metadata: BTreeMap::new(),
            packs: Vec::new(),
        }
    }

    /// Every object the manifest names directly (state and map chunks), not the pages and
    /// chunks behind the maps.
    pub fn direct_objects(&self) -> impl Iterator<Item = &Hash> {
        std::iter::once(&self.vm_state)
            .chain(self.memory.map_chunks.iter())
            .chain(self.disks.iter().flat_map(|d| d.map_chunks.iter()))
    }

    /// The manifest as a store keeps it on disk (checksum line, then JSON): for copying it
    /// elsewhere.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ManifestError> {
        encode(self)
    }

    /// Reads a manifest of snapshot `id` kept elsewhere as [`Manifest::to_bytes`] wrote it,
    /// with every check a store's own manifests get; `origin` names it in errors.
    pub fn from_bytes(origin: &Path, id: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        decode(origin, id, bytes)
    }
}

/// Checks a snapshot id: 1 to 64 characters from `[A-Za-z0-9._-]`, not starting with a dot
/// (so never `.`, `..`, a hidden or temporary file, or anything with a `/`).
pub fn validate_id(id: &str) -> Result<(), ManifestError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::InvalidId {
            id: id.chars().take(100).collect(),
        })
    }
}

/// The file bytes of `m`.
pub(crate) fn encode(m: &Manifest) -> Result<Vec<u8>, ManifestError> {
    validate_id(&m.id)?;
    let json = serde_json::to_vec_pretty(m).map_err(|source| ManifestError::Encode {
        id: m.id.clone(),
        source,
    })?;
    let mut out = Vec::with_capacity(json.len() + 65);
    out.extend_from_slice(Hash::of(&json).to_hex().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&json);
    if out.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(ManifestError::EncodeTooLarge {
            id: m.id.clone(),
            len: out.len(),
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
struct VersionProbe {
    format_version: u64,
}

/// Parses the file bytes of manifest `id` read from `path`. Never panics.
pub(crate) fn decode(path: &Path, id: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
    if bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(ManifestError::TooLarge {
            path: path.to_owned(),
            len: bytes.len() as u64,
            max: MAX_MANIFEST_SIZE,
        });
    }
    let nl =
        bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| ManifestError::NoChecksumLine {
                path: path.to_owned(),
            })?;
    let line = std::str::from_utf8(&bytes[..nl]).map_err(|_| ManifestError::BadChecksumLine {
        path: path.to_owned(),
        reason: "not UTF-8".into(),
    })?;
    let recorded: Hash =
        line.trim_end_matches('\r')
            .parse()
            .map_err(|e: crate::hash::HashError| ManifestError::BadChecksumLine {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
    let json = &bytes[nl + 1..];
    let actual = Hash::of(json);
    if actual != recorded {
        return Err(ManifestError::Checksum {
            path: path.to_owned(),
            recorded,
            actual,
        });
    }
    let json_err = |source| ManifestError::Json {
        path: path.to_owned(),
        source,
    };
    let probe: VersionProbe = serde_json::from_slice(json).map_err(json_err)?;
    if probe.format_version != u64::from(MANIFEST_FORMAT_VERSION) {
        return Err(ManifestError::Version {
            path: path.to_owned(),
            version: probe.format_version,
        });
    }
    let m: Manifest = serde_json::from_slice(json).map_err(json_err)?;
    if m.id != id {
        return Err(ManifestError::IdMismatch {
            path: path.to_owned(),
            id: m.id,
        });
    }
    if let Some(bad) = m.packs.iter().find(|p| !crate::store::valid_pack_id(p)) {
        return Err(ManifestError::BadPackId {
            path: path.to_owned(),
            id: bad.chars().take(100).collect(),
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            "snap-1",
            Hash::of(b"state"),
            MemoryRef {
                size_bytes: 8192,
                page_size: 4096,
                map_chunks: vec![Hash::of(b"map")],
            },
        );
        m.name = Some("first".into());
        m.parent = Some("snap-0".into());
        m.disks.push(DiskRef {
            name: "rootfs".into(),
            size: 1 << 20,
            chunk_size: 65536,
            map_chunks: vec![Hash::of(b"dmap")],
        });
        m.metadata.insert("k".into(), "v".into());
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = encode(&m).unwrap();
        assert_eq!(bytes[64], b'\n');
        let p = Path::new("/s/manifests/snap-1");
        assert_eq!(decode(p, "snap-1", &bytes).unwrap(), m);
        let e = decode(p, "other", &bytes).unwrap_err();
        assert!(matches!(e, ManifestError::IdMismatch { .. }), "{e}");
    }

    #[test]
    fn corrupt_and_truncated_rejected() {
        let bytes = encode(&sample()).unwrap();
        let p = Path::new("/s/manifests/snap-1");
        for cut in 0..bytes.len() {
            let e = decode(p, "snap-1", &bytes[..cut]).unwrap_err();
            assert!(e.to_string().contains("/s/manifests/snap-1"), "{e}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(decode(p, "snap-1", &b).is_err(), "flip at {i} accepted");
        }
        let mut b = bytes.clone();
        b.truncate(bytes.len() - 3);
        let e = decode(p, "snap-1", &b).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn unknown_version_rejected() {
        let mut m = sample();
        m.format_version = 7;
        let bytes = encode(&m).unwrap();
        let e = decode(Path::new("/m/snap-1"), "snap-1", &bytes).unwrap_err();
        assert!(e.to_string().contains("version 7"), "{e}");
    }

    #[test]
    fn checksummed_but_wrong_json_rejected() {
        let json = br#"{"format_version":1,"id":"snap-1"}"#;
        let mut b = Hash::of(json).to_hex().into_bytes();
        b.push(b'\n');
        b.extend_from_slice(json);
        let e = decode(Path::new("/m/snap-1"), "snap-1", &b).unwrap_err();
        assert!(matches!(e, ManifestError::Json { .. }), "{e}");
    }

    #[test]
    fn pack_list_round_trips_is_optional_and_never_names_a_path() {
        let mut m = sample();
        m.packs = vec!["0193a1b2c3d4e5f60718293a4b5c6d7e8f9a".into()];
        let p = Path::new("/s/manifests/snap-1");
        assert_eq!(decode(p, "snap-1", &encode(&m).unwrap()).unwrap(), m);
        // Manifests written before the list existed still read, with an empty list.
        let bytes = encode(&sample()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("\"packs\""));
        assert!(decode(p, "snap-1", &bytes).unwrap().packs.is_empty());
        for bad in ["../../etc/passwd", "", "A", "a/b", &"a".repeat(65)] {
            m.packs = vec![bad.to_string()];
            let e = decode(p, "snap-1", &encode(&m).unwrap()).unwrap_err();
            assert!(
                matches!(e, ManifestError::BadPackId { .. })
                    && e.to_string().contains("invalid pack id"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn ids() {
        for ok in ["a", "snap-1", "A.b_c-9", &"x".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "a\\b",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
