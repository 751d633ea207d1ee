//! Pushing a local snapshot: upload the objects the remote lacks as new packs (each pack,
//! then its index), then the manifest naming the remote packs that hold everything.

use std::collections::{BTreeSet, HashSet};

use bytes::Bytes;
use ember_snapshot_store::{Hash, Manifest, PackBuilder, PageRef, Store};

use crate::{Remote, Result};

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Objects uploaded, and their stored bytes.
    pub objects_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Packs uploaded.
    pub packs_uploaded: u64,
    /// Objects the remote had already (from this host or another).
    pub objects_present: u64,
}

/// Every object snapshot `m` needs, each once: its state and maps, then memory pages in
/// guest order, then disk chunks.
pub(crate) fn referenced_objects(
    store: &Store,
    m: &Manifest,
) -> ember_snapshot_store::Result<Vec<Hash>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |h: &Hash| {
        if seen.insert(*h) {
            out.push(*h);
        }
    };
    m.direct_objects().for_each(&mut add);
    for page in &store.load_memory_map(m)?.pages {
        if let PageRef::Object(h) = page {
            add(h);
        }
    }
    for disk in &m.disks {
        for h in store.load_disk_map(disk)?.chunks.iter().flatten() {
            add(h);
        }
    }
    Ok(out)
}

impl Remote {
    /// Pushes local snapshot `id` (idempotent: a push cut short is finished by the next).
    pub fn push(&self, local: &Store, id: &str) -> Result<PushReport> {
        let manifest = local.load_manifest(id).map_err(self.local())?;
        let objects = referenced_objects(local, &manifest).map_err(self.local())?;
        self.block_on(self.load_indexes(None))?;
        let mut report = PushReport::default();
        let mut packs: BTreeSet<String> = BTreeSet::new();
        let mut builder = PackBuilder::new();
        for hash in &objects {
            if let Some(found) = self.locate(hash) {
                packs.insert(found.pack.to_string());
                report.objects_present += 1;
                continue;
            }
            let object = local.read_stored(hash).map_err(self.local())?;
            // A damaged local object never leaves this host.
            object.verify(local.root()).map_err(self.local())?;
            report.objects_uploaded += 1;
            report.bytes_uploaded += object.bytes.len() as u64;
            builder.push(&object);
            if builder.len() >= self.options.pack_target_bytes {
                let full = std::mem::take(&mut builder);
                packs.insert(self.upload_pack(full)?);
                report.packs_uploaded += 1;
            }
        }
        if !builder.is_empty() {
            packs.insert(self.upload_pack(builder)?);
            report.packs_uploaded += 1;
        }
        let remote_manifest = Manifest {
            packs: packs.into_iter().collect(),
            ..manifest
        };
        let bytes = remote_manifest
            .to_bytes()
            .map_err(|e| self.local()(e.into()))?;
        // The working set goes before the manifest: a host that finds the manifest finds the
        // pages to fetch first too.
        self.push_working_set(local, id)?;
        let key = self.manifest_key(id);
        self.block_on(self.put(&key, Bytes::from(bytes)))?;
        Ok(report)
    }

    /// Uploads the working set recorded here for snapshot `id`, if there is one (replacing
    /// the remote's: a working set is advisory, the latest is the best); `Ok(false)` if none.
    pub fn push_working_set(&self, local: &Store, id: &str) -> Result<bool> {
        let Some(recorded) = local.load_working_set(id).map_err(self.local())? else {
            return Ok(false);
        };
        let key = self.working_set_key(id);
        self.block_on(self.put(&key, Bytes::from(recorded.encode())))?;
        Ok(true)
    }

    /// Uploads a pack, then its index (a pack without an index is unfinished to readers);
    /// returns its name.
    fn upload_pack(&self, builder: PackBuilder) -> Result<String> {
        let built = builder.finish();
        let name = built.name.clone();
        let pack_key = self.key(&["packs", &format!("{name}.pack")]);
        let index_key = self.key(&["packs", &format!("{name}.idx")]);
        let index = Bytes::from(built.index);
        self.block_on(async {
            self.put(&pack_key, Bytes::from(built.pack)).await?;
            self.put(&index_key, index.clone()).await
        })?;
        // What was just uploaded is found by the rest of this push.
        let origin = std::path::PathBuf::from(format!("{}/{index_key}", self.url));
        let (pack_len, entries) = ember_snapshot_store::decode_pack_index(&origin, &index)
            .map_err(|e| self.corrupt(index_key.as_ref(), e.to_string()))?;
        self.lock_index().add_pack(&name, pack_len, entries);
        Ok(name)
    }
}
