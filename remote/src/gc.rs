//! Remote GC: packs no remote manifest names are removed, but only once they are older than a
//! grace period, so a push in flight on another host (its packs uploaded, its manifest not
//! yet) is never broken.

use std::collections::HashSet;
use std::time::Duration;

use crate::index::valid_pack_name;
use crate::{Remote, RemoteError, Result};

#[derive(Debug, Clone)]
pub struct RemoteGcOptions {
    /// Packs younger than this are kept even if no manifest names them.
    pub grace: Duration,
}

impl Default for RemoteGcOptions {
    fn default() -> RemoteGcOptions {
        RemoteGcOptions {
            grace: Duration::from_secs(3600),
        }
    }
}

/// What a remote GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteGcReport {
    pub manifests: usize,
    /// Manifests that could not be read (named, with why): skipped.
    pub unreadable: Vec<String>,
    pub packs_kept: usize,
    /// Unnamed packs kept because they are younger than the grace period.
    pub packs_in_grace: usize,
    pub packs_removed: usize,
    pub bytes_removed: u64,
}

impl Remote {
    /// Removes the packs (and their indexes) no manifest names and older than the grace.
    pub fn gc(&self, options: &RemoteGcOptions) -> Result<RemoteGcReport> {
        let mut report = RemoteGcReport::default();
        let mut named: HashSet<String> = HashSet::new();
        for id in self.list_snapshots()? {
            report.manifests += 1;
            match self.manifest(&id) {
                Ok(m) => named.extend(m.packs),
                Err(e @ (RemoteError::Corrupt { .. } | RemoteError::NotFound { .. })) => {
                    report.unreadable.push(format!("{id}: {e}"));
                }
                Err(e) => return Err(e),
            }
        }
        let listed = self.block_on(self.list(&self.key(&["packs"])))?;
        let now = std::time::SystemTime::now();
        let mut removed = Vec::new();
        for meta in &listed {
            let Some(file) = meta.location.filename() else {
                continue;
            };
            let Some(name) = file
                .strip_suffix(".pack")
                .or_else(|| file.strip_suffix(".idx"))
            else {
                continue;
            };
            if !valid_pack_name(name) || named.contains(name) {
                report.packs_kept += usize::from(file.ends_with(".idx"));
                continue;
            }
            let modified: std::time::SystemTime = meta.last_modified.into();
            let age = now.duration_since(modified).unwrap_or_default();
            if age < options.grace {
                report.packs_in_grace += usize::from(file.ends_with(".idx"));
                continue;
            }
            removed.push((meta.location.clone(), meta.size, file.ends_with(".pack")));
        }
        // Indexes first: a pack whose index is gone is invisible, never half there.
        removed.sort_by_key(|(_, _, is_pack)| *is_pack);
        for (key, size, is_pack) in removed {
            use object_store::ObjectStoreExt;
            self.block_on(self.request("DELETE", &key, self.bucket.delete(&key)))?;
            if is_pack {
                report.packs_removed += 1;
                report.bytes_removed += size;
            }
        }
        self.forget_indexes();
        Ok(report)
    }
}
