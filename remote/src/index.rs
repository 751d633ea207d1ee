//! What the remote's packs hold: their indexes, fetched once each (and kept on disk when the
//! remote has a cache folder), checked against their content-derived names.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ember_snapshot_store::{decode_pack_index, Hash, PackEntry};

use crate::{Remote, RemoteError, Result};

/// An object's place in the remote.
#[derive(Debug, Clone)]
pub(crate) struct RemoteObject {
    pub pack: Arc<str>,
    pub entry: PackEntry,
}

impl RemoteObject {
    /// An uncompressed object of `len` bytes at `offset` in `pack`, its hash made from the
    /// offset (distinct per offset): for tests of how objects are grouped into downloads.
    #[cfg(test)]
    pub(crate) fn at(pack: &str, offset: u64, len: u32) -> RemoteObject {
        RemoteObject {
            pack: Arc::from(pack),
            entry: PackEntry {
                hash: Hash::of(&offset.to_le_bytes()),
                offset,
                stored_len: len,
                raw_len: len,
                flags: 0,
            },
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct RemoteIndex {
    /// Pack name → the length its index seals.
    pub packs: HashMap<Arc<str>, u64>,
    pub objects: HashMap<Hash, RemoteObject>,
}

impl RemoteIndex {
    pub(crate) fn add_pack(&mut self, name: &str, pack_len: u64, entries: Vec<PackEntry>) {
        let pack: Arc<str> = Arc::from(name);
        self.packs.insert(pack.clone(), pack_len);
        for entry in entries {
            self.objects.entry(entry.hash).or_insert(RemoteObject {
                pack: pack.clone(),
                entry,
            });
        }
    }
}

/// A pack name: the hex BLAKE3 of its index.
pub(crate) fn valid_pack_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Remote {
    /// Loads the indexes of `names` (every pack in the remote when None) not loaded yet.
    pub(crate) async fn load_indexes(&self, names: Option<&[String]>) -> Result<()> {
        let wanted: Vec<String> = match names {
            Some(names) => names.to_vec(),
            None => self
                .list(&self.key(&["packs"]))
                .await?
                .into_iter()
                .filter_map(|meta| {
                    meta.location
                        .filename()
                        .and_then(|f| f.strip_suffix(".idx"))
                        .map(str::to_string)
                })
                .collect(),
        };
        for name in wanted {
            if self.lock_index().packs.contains_key(name.as_str()) {
                continue;
            }
            if !valid_pack_name(&name) {
                if names.is_some() {
                    return Err(self.corrupt(&name, "not a pack name".into()));
                }
                continue;
            }
            let bytes = self.index_bytes(&name).await?;
            let origin = PathBuf::from(format!("{}/packs/{name}.idx", self.url));
            let (pack_len, entries) = decode_pack_index(&origin, &bytes)
                .map_err(|e| self.corrupt(&format!("packs/{name}.idx"), e.to_string()))?;
            self.lock_index().add_pack(&name, pack_len, entries);
        }
        Ok(())
    }

    /// A pack's index: from the cache folder, or fetched (and cached); either way checked
    /// against its name.
    async fn index_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let cached = self
            .options
            .cache_dir
            .as_ref()
            .map(|dir| dir.join("indexes").join(format!("{name}.idx")));
        if let Some(bytes) = cached.as_ref().and_then(|path| std::fs::read(path).ok()) {
            if Hash::of(&bytes).to_hex() == name {
                return Ok(bytes);
            }
        }
        let key = self.key(&["packs", &format!("{name}.idx")]);
        let bytes = self.get(&key).await?.to_vec();
        if Hash::of(&bytes).to_hex() != name {
            return Err(self.corrupt(key.as_ref(), "its content does not match its name".into()));
        }
        if let Some(path) = cached {
            if let Err(e) = write_cached(&path, &bytes) {
                log::warn!("cannot cache {}: {e}", path.display());
            }
        }
        Ok(bytes)
    }

    pub(crate) fn lock_index(&self) -> std::sync::MutexGuard<'_, RemoteIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the remote holds `hash`, if a loaded index lists it.
    pub(crate) fn locate(&self, hash: &Hash) -> Option<RemoteObject> {
        self.lock_index().objects.get(hash).cloned()
    }

    pub(crate) fn corrupt(&self, key: &str, reason: String) -> RemoteError {
        RemoteError::Corrupt {
            remote: self.url.clone(),
            key: key.to_string(),
            reason,
        }
    }

    /// Forgets every loaded index (after a GC removed packs).
    pub(crate) fn forget_indexes(&self) {
        *self.lock_index() = RemoteIndex::default();
    }
}

/// Writes a cache file whole or not at all.
fn write_cached(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
