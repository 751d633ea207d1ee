//! Content hashes: BLAKE3, 32 bytes, shown and parsed as 64 lowercase hex digits.

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Errors of this module: a string that is not a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// Not 64 characters long.
    #[error("invalid hash {text:?}: expected 64 hex digits, got {len} characters")]
    Length {
        /// The offending text (cut to 80 characters).
        text: String,
        /// Its length in characters.
        len: usize,
    },
    /// A character that is not a hex digit.
    #[error("invalid hash {text:?}: {ch:?} at {pos} is not a hex digit")]
    Digit {
        /// The offending text.
        text: String,
        /// The character.
        ch: char,
        /// Its byte position.
        pos: usize,
    },
}

/// The BLAKE3 hash of an object's raw (uncompressed) bytes: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The all-zero value. Never the hash of real data in practice; map chunks use it to
    /// mean "zero page / zero chunk".
    pub const ZERO: Hash = Hash([0; 32]);

    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether this is [`Hash::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }

    /// Writes the 64 hex digits into `out` (no allocation).
    pub(crate) fn hex_into(&self, out: &mut [u8; 64]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut buf = [0u8; 64];
        self.hex_into(&mut buf);
        buf.iter().map(|&b| char::from(b)).collect()
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        self.hex_into(&mut buf);
        // The digits are ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl FromStr for Hash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Hash, HashError> {
        let shown = || s.chars().take(80).collect::<String>();
        if s.len() != 64 {
            return Err(HashError::Length {
                text: shown(),
                len: s.chars().count(),
            });
        }
        let mut out = [0u8; 32];
        for (pos, ch) in s.char_indices() {
            let v = ch.to_digit(16).ok_or_else(|| HashError::Digit {
                text: shown(),
                ch,
                pos,
            })?;
            // `to_digit(16)` is below 16, and `s` has 64 one-byte characters here.
            out[pos / 2] |= (v as u8) << if pos % 2 == 0 { 4 } else { 0 };
        }
        Ok(Hash(out))
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        self.hex_into(&mut buf);
        s.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        struct HexVisitor;
        impl Visitor<'_> for HexVisitor {
            type Value = Hash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a BLAKE3 hash as 64 hex digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Hash, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(HexVisitor)
    }
}

/// A `Hasher` for maps keyed by [`Hash`]: the key is already uniformly random, so its first
/// eight bytes are the hash. (Keys are BLAKE3 outputs of stored data; crafting collisions
/// on 64 bits needs about 2^32 BLAKE3 evaluations per collision, far more work than it
/// could cost the store.)
#[derive(Default, Clone, Copy)]
pub(crate) struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `Hash` derives `Hash` over `[u8; 32]`, which writes a length prefix (8 bytes) and
        // then the 32 bytes in one call; fold everything to stay correct for any caller.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

/// Build-hasher for `HashMap<Hash, _>` / `HashSet<Hash>`.
pub(crate) type HashBuild = BuildHasherDefault<PrefixHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"ember");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, h.to_hex());
        assert_eq!(s.parse::<Hash>().unwrap(), h);
        assert_eq!(s.to_uppercase().parse::<Hash>().unwrap(), h);
        assert_eq!(format!("{h:?}"), format!("Hash({s})"));
    }

    #[test]
    fn bad_hex_rejected() {
        let e = "abc".parse::<Hash>().unwrap_err();
        assert!(e.to_string().contains("\"abc\""), "{e}");
        let mut s = Hash::of(b"x").to_string();
        s.replace_range(10..11, "g");
        let e = s.parse::<Hash>().unwrap_err();
        assert!(e.to_string().contains("'g' at 10"), "{e}");
        // Multi-byte characters must not panic.
        let s = "é".repeat(32);
        assert!(s.parse::<Hash>().is_err());
    }

    #[test]
    fn serde_as_hex_string() {
        let h = Hash::of(b"y");
        let j = serde_json::to_string(&h).unwrap();
        assert_eq!(j, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<Hash>(&j).unwrap(), h);
        assert!(serde_json::from_str::<Hash>("\"00\"").is_err());
        assert!(serde_json::from_str::<Hash>("12").is_err());
    }
}
