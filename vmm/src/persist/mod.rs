//! Saving and restoring VM state.
//!
//! Each stateful component has a `State` type (plain data, serde) and save/restore functions;
//! the VM's whole state is one value encoded in the versioned state format below, its virtio
//! devices keyed by device id. [`migrate`] reads the previous format.

pub mod migrate;
pub mod restore;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Identifies an ember VM-state blob.
pub const STATE_MAGIC: [u8; 8] = *b"EMBRVMST";
/// The state format this ember writes. A new major version changes the payload's shape
/// (older blobs are migrated where [`migrate`] knows how, otherwise refused, never misread); a
/// new minor version only adds what older readers of the same major may ignore.
pub const STATE_FORMAT: StateVersion = StateVersion { major: 4, minor: 0 };
/// No sane VM state is larger (vCPU state is a few KiB per vCPU; memory is stored elsewhere).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8;
const CHECKSUM_LEN: usize = 32;

/// A state format's version, `major.minor`, stored as two little-endian `u16`s (so formats up
/// to 3, which stored one `u32`, read as `3.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateVersion {
    pub major: u16,
    pub minor: u16,
}

impl StateVersion {
    fn to_bytes(self) -> [u8; 4] {
        let [a, b] = self.major.to_le_bytes();
        let [c, d] = self.minor.to_le_bytes();
        [a, b, c, d]
    }

    fn from_bytes(bytes: [u8; 4]) -> StateVersion {
        StateVersion {
            major: u16::from_le_bytes([bytes[0], bytes[1]]),
            minor: u16::from_le_bytes([bytes[2], bytes[3]]),
        }
    }

    /// Whether this ember reads blobs of version `self` without migrating them.
    pub fn is_readable(self) -> bool {
        self.major == STATE_FORMAT.major
    }
}

impl std::fmt::Display for StateVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Errors reading or writing a VM-state blob.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    #[error("VM state is truncated: {len} bytes, the header alone needs {needed}")]
    TooShort { len: usize, needed: usize },
    #[error("not an ember VM state (magic {found:02x?}, expected {STATE_MAGIC:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error("VM state format {found} is not supported: this ember writes {STATE_FORMAT} and reads {STATE_FORMAT} and {}", migrate::MIGRATES_FROM)]
    UnsupportedVersion { found: StateVersion },
    #[error(
        "VM state declares a {declared}-byte payload, larger than the {MAX_STATE_BYTES}-byte bound"
    )]
    TooLarge { declared: u64 },
    #[error("VM state is truncated or has trailing bytes: the header declares {declared} payload bytes, the blob holds {actual}")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error(
        "VM state checksum mismatch (stored {stored}, computed {computed}): the blob is corrupt"
    )]
    Checksum { stored: String, computed: String },
    #[error("cannot encode VM state: {0}")]
    Encode(postcard::Error),
    #[error("cannot decode VM state payload: {0}")]
    Decode(postcard::Error),
}

/// Why a VM could not be saved into the store or built from a snapshot in it.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The VM or the snapshot cannot be saved or restored as asked; the text says why.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] ember_snapshot_store::StoreError),
    #[error(transparent)]
    StateFormat(#[from] StateFormatError),
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
    #[error(transparent)]
    VmState(#[from] vm::VmStateError),
    #[error(transparent)]
    VcpuState(#[from] vcpu::VcpuStateError),
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error(transparent)]
    CpuModel(#[from] crate::arch::x86_64::cpu_model::CpuModelError),
    #[error(transparent)]
    RestoreMemory(#[from] crate::restore_memory::RestoreMemoryError),
    #[error("the rootfs overlay: {0}")]
    Overlay(#[source] restore::OverlayError),
    /// Building the restored VM's devices failed.
    #[error(transparent)]
    Devices(Box<crate::VmmError>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::VmmError> for PersistError {
    fn from(e: crate::VmmError) -> PersistError {
        PersistError::Devices(Box::new(e))
    }
}

/// Encodes `state` as: magic, format version (u32 LE), payload length (u64 LE), payload
/// (postcard), BLAKE3 of everything before the checksum.
pub fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFormatError> {
    let payload = postcard::to_stdvec(state).map_err(StateFormatError::Encode)?;
    if payload.len() as u64 > MAX_STATE_BYTES {
        return Err(StateFormatError::TooLarge {
            declared: payload.len() as u64,
        });
    }
    Ok(seal_state(&payload))
}

/// Wraps an encoded payload in the state envelope (magic, version, length, checksum). Fuzzing
/// uses it to reach the payload decoder with arbitrary bytes.
pub fn seal_state(payload: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    blob.extend_from_slice(&STATE_MAGIC);
    blob.extend_from_slice(&STATE_FORMAT.to_bytes());
    blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    blob.extend_from_slice(payload);
    let checksum = blake3::hash(&blob);
    blob.extend_from_slice(checksum.as_bytes());
    blob
}

/// Checks and decodes a blob written by [`encode_state`] in this ember's state format (of
/// any minor version).
pub fn decode_state<T: DeserializeOwned>(blob: &[u8]) -> Result<T, StateFormatError> {
    let (version, payload) = open_state(blob)?;
    if !version.is_readable() {
        return Err(StateFormatError::UnsupportedVersion { found: version });
    }
    postcard::from_bytes(payload).map_err(StateFormatError::Decode)
}

/// Checks a state blob's envelope (magic, length, checksum) and returns its format version
/// and payload.
pub fn open_state(blob: &[u8]) -> Result<(StateVersion, &[u8]), StateFormatError> {
    if blob.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(StateFormatError::TooShort {
            len: blob.len(),
            needed: HEADER_LEN + CHECKSUM_LEN,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&blob[..8]);
    if magic != STATE_MAGIC {
        return Err(StateFormatError::BadMagic { found: magic });
    }
    let version = StateVersion::from_bytes([blob[8], blob[9], blob[10], blob[11]]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&blob[12..20]);
    let declared = u64::from_le_bytes(len_bytes);
    if declared > MAX_STATE_BYTES {
        return Err(StateFormatError::TooLarge { declared });
    }
    let actual = (blob.len() - HEADER_LEN - CHECKSUM_LEN) as u64;
    if declared != actual {
        return Err(StateFormatError::LengthMismatch { declared, actual });
    }
    let (body, stored) = blob.split_at(blob.len() - CHECKSUM_LEN);
    let computed = blake3::hash(body);
    if computed.as_bytes() != stored {
        return Err(StateFormatError::Checksum {
            stored: hex(stored),
            computed: computed.to_hex().to_string(),
        });
    }
    Ok((version, &body[HEADER_LEN..]))
}

/// Seals `payload` as format `version`: how tests and fuzzing reach the migration of older
/// formats and their refusal.
pub fn seal_state_as(version: StateVersion, payload: &[u8]) -> Vec<u8> {
    let mut blob = seal_state(payload);
    blob[8..12].copy_from_slice(&version.to_bytes());
    let end = blob.len() - CHECKSUM_LEN;
    let checksum = blake3::hash(&blob[..end]);
    blob[end..].copy_from_slice(checksum.as_bytes());
    blob
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        regs: kvm_bindings::kvm_regs,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        let regs = kvm_bindings::kvm_regs {
            rip: 0x100_0000,
            rsp: 0x8ff0,
            rflags: 2,
            ..Default::default()
        };
        Sample {
            name: "vm".into(),
            regs,
            values: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trips() {
        let blob = encode_state(&sample()).unwrap();
        assert_eq!(&blob[..8], b"EMBRVMST");
        assert_eq!(decode_state::<Sample>(&blob).unwrap(), sample());
    }

    #[test]
    fn rejects_wrong_magic_version_truncation_trailing_bytes_and_corruption() {
        let blob = encode_state(&sample()).unwrap();

        let mut bad = blob.clone();
        bad[0] ^= 0xff;
        assert!(matches!(
            decode_state::<Sample>(&bad),
            Err(StateFormatError::BadMagic { .. })
        ));

        let payload = &blob[HEADER_LEN..blob.len() - CHECKSUM_LEN];
        let bad = seal_state_as(
            StateVersion {
                major: 99,
                minor: 0,
            },
            payload,
        );
        let err = decode_state::<Sample>(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                StateFormatError::UnsupportedVersion {
                    found: StateVersion {
                        major: 99,
                        minor: 0
                    }
                }
            ),
            "{err}"
        );

        for cut in [0, 10, HEADER_LEN + CHECKSUM_LEN - 1, blob.len() - 1] {
            let err = decode_state::<Sample>(&blob[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StateFormatError::TooShort { .. } | StateFormatError::LengthMismatch { .. }
                ),
                "cut at {cut}: {err}"
            );
        }

        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(
            decode_state::<Sample>(&longer),
            Err(StateFormatError::LengthMismatch { .. })
        ));

        let mut flipped = blob.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        // A damaged header is caught by the checksum too, before its version is believed.
        let mut damaged_version = blob.clone();
        damaged_version[8] = 99;
        assert!(matches!(
            decode_state::<Sample>(&damaged_version),
            Err(StateFormatError::Checksum { .. })
        ));
        let err = decode_state::<Sample>(&flipped).unwrap_err();
        assert!(matches!(err, StateFormatError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"));
    }

    #[test]
    fn rejects_absurd_declared_lengths_before_reading_them() {
        let mut blob = encode_state(&sample()).unwrap();
        blob[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_state::<Sample>(&blob),
            Err(StateFormatError::TooLarge { .. })
        ));
    }
}
