//! Saving and restoring VM state.
//!
//! Each stateful component has a `State` type (plain data, serde) and save/restore functions;
//! the VM's whole state is one value encoded in the versioned state format below.

pub mod restore;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Identifies an ember VM-state blob.
pub const STATE_MAGIC: [u8; 8] = *b"EMBRVMST";
/// Bumped whenever a `State` type changes shape; older blobs are rejected, not misread.
pub const STATE_FORMAT_VERSION: u32 = 3;
/// No sane VM state is larger (vCPU state is a few KiB per vCPU; memory is stored elsewhere).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8;
const CHECKSUM_LEN: usize = 32;

/// Errors reading or writing a VM-state blob.
#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    #[error("VM state is truncated: {len} bytes, the header alone needs {needed}")]
    TooShort { len: usize, needed: usize },
    #[error("not an ember VM state (magic {found:02x?}, expected {STATE_MAGIC:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error("VM state format version {found} is not supported (this ember reads version {STATE_FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
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
    blob.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
    blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    blob.extend_from_slice(payload);
    let checksum = blake3::hash(&blob);
    blob.extend_from_slice(checksum.as_bytes());
    blob
}

/// Checks and decodes a blob written by [`encode_state`].
pub fn decode_state<T: DeserializeOwned>(blob: &[u8]) -> Result<T, StateFormatError> {
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
    let version = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]);
    if version != STATE_FORMAT_VERSION {
        return Err(StateFormatError::UnsupportedVersion { found: version });
    }
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
    postcard::from_bytes(&body[HEADER_LEN..]).map_err(StateFormatError::Decode)
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

        let mut bad = blob.clone();
        bad[8] = 99;
        assert!(matches!(
            decode_state::<Sample>(&bad),
            Err(StateFormatError::UnsupportedVersion { found: 99 })
        ));

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
