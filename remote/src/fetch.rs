//! Fetching a snapshot into a local store: its manifest, the indexes of the packs it lists,
//! then the objects the local store lacks, by ranged downloads of a few large spans, in
//! parallel. Every object is verified against its hash before the local store keeps it; the
//! manifest is saved last.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use ember_snapshot_store::{
    DiskMap, Hash, Manifest, MemoryMap, PackWriter, PageRef, Store, StoreError, StoredObject,
    PAGE_SIZE,
};
use futures_util::StreamExt;

use crate::index::RemoteObject;
use crate::{Remote, RemoteError, Result};

/// Objects this far apart in a pack are fetched by one download (the gap comes along).
const MAX_GAP_BYTES: u64 = 256 << 10;
/// Largest span one download asks for.
const MAX_SPAN_BYTES: u64 = 8 << 20;

/// What a fetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    /// Objects downloaded, verified and stored locally.
    pub objects_fetched: u64,
    /// Bytes downloaded (gaps between objects included).
    pub bytes_fetched: u64,
    /// Ranged downloads made.
    pub requests: u64,
    /// Objects the local store had already.
    pub objects_present: u64,
}

/// A remote snapshot's manifest and maps.
pub(crate) struct SnapshotHead {
    /// As the remote holds it (its packs are the remote's).
    pub manifest: Manifest,
    pub memory: MemoryMap,
    /// Every chunk of every disk map, in map order.
    pub disk_chunks: Vec<Hash>,
}

impl SnapshotHead {
    /// The memory pages' objects, in guest order (zero pages are not stored).
    pub fn memory_objects(&self) -> impl Iterator<Item = Hash> + '_ {
        self.memory.pages.iter().filter_map(|p| match p {
            PageRef::Object(h) => Some(*h),
            PageRef::Zero => None,
        })
    }

    /// The manifest as a local store keeps it (its packs are the store's own).
    pub fn local_manifest(&self) -> Manifest {
        Manifest {
            packs: Vec::new(),
            ..self.manifest.clone()
        }
    }
}

/// One download: a span of a pack and the objects in it.
struct Span {
    pack: Arc<str>,
    start: u64,
    end: u64,
    objects: Vec<RemoteObject>,
}

/// Groups objects into spans: by pack, in offset order, joining neighbours closer than
/// [`MAX_GAP_BYTES`] while a span stays under [`MAX_SPAN_BYTES`].
fn spans(mut objects: Vec<RemoteObject>) -> Vec<Span> {
    objects
        .sort_by(|a, b| (a.pack.as_ref(), a.entry.offset).cmp(&(b.pack.as_ref(), b.entry.offset)));
    let mut out: Vec<Span> = Vec::new();
    for object in objects {
        let start = object.entry.offset;
        let end = start + u64::from(object.entry.stored_len);
        match out.last_mut() {
            Some(span)
                if span.pack == object.pack
                    && start >= span.end
                    && start - span.end <= MAX_GAP_BYTES
                    && end - span.start <= MAX_SPAN_BYTES =>
            {
                span.end = end;
                span.objects.push(object);
            }
            _ => out.push(Span {
                pack: object.pack.clone(),
                start,
                end,
                objects: vec![object],
            }),
        }
    }
    out
}

impl Remote {
    /// Fetches snapshot `id` into `local` (objects it has already are not downloaded). An
    /// error leaves `local` without the snapshot (objects already written are garbage for
    /// its GC).
    pub fn fetch(&self, local: &Store, id: &str) -> Result<FetchReport> {
        let mut writer = local.writer().map_err(self.local())?;
        let mut report = FetchReport::default();
        let head = self.fetch_head(local, &mut writer, id, &mut report)?;
        let mut rest: Vec<Hash> = head.memory_objects().collect();
        rest.extend(head.disk_chunks.iter().copied());
        self.fetch_objects(local, &mut writer, &rest, &mut report, false)?;
        writer
            .commit(&head.local_manifest())
            .map_err(self.local())?;
        self.keep_working_set(local, id);
        Ok(report)
    }

    /// Saves the working set the remote has for snapshot `id` (now in `local`) for the
    /// next restores here; advisory, so a failure is only logged.
    pub(crate) fn keep_working_set(&self, local: &Store, id: &str) {
        let kept = self.working_set(id).and_then(|recorded| match recorded {
            Some(r) => local
                .save_working_set(id, &r.pages, r.restores)
                .map_err(self.local()),
            None => Ok(()),
        });
        if let Err(e) = kept {
            log::warn!("snapshot {id}: not keeping its remote working set: {e}");
        }
    }

    /// Fetches what a restore of snapshot `id` reads before anything else: its manifest, the
    /// indexes of its packs, its state and maps (written to `writer`).
    pub(crate) fn fetch_head(
        &self,
        local: &Store,
        writer: &mut PackWriter<'_>,
        id: &str,
        report: &mut FetchReport,
    ) -> Result<SnapshotHead> {
        ember_snapshot_store::validate_id(id).map_err(|e| self.local()(e.into()))?;
        let manifest = self.block_on(self.fetch_manifest(id))?;
        self.block_on(self.load_indexes(Some(&manifest.packs)))?;
        let direct: Vec<Hash> = manifest.direct_objects().copied().collect();
        let maps = self.fetch_objects(local, writer, &direct, report, true)?;
        let read_map = |h: &Hash| match maps.get(h) {
            Some(content) => Ok(content.clone()),
            None => local.read(h),
        };
        let memory =
            MemoryMap::load_with(&manifest.memory.map_chunks, read_map).map_err(self.local())?;
        if memory.size_bytes() != manifest.memory.size_bytes
            || manifest.memory.page_size as usize != PAGE_SIZE
        {
            return Err(self.corrupt(
                self.manifest_key(id).as_ref(),
                "its memory map does not match its memory size".into(),
            ));
        }
        let mut disk_chunks = Vec::new();
        for disk in &manifest.disks {
            let map = DiskMap::load_with(disk.size, disk.chunk_size, &disk.map_chunks, read_map)
                .map_err(self.local())?;
            disk_chunks.extend(map.chunks.iter().flatten().copied());
        }
        Ok(SnapshotHead {
            manifest,
            memory,
            disk_chunks,
        })
    }

    /// Downloads, verifies and writes the objects of `hashes` that `local` lacks; with
    /// `keep`, returns their contents too (the maps).
    pub(crate) fn fetch_objects(
        &self,
        local: &Store,
        writer: &mut PackWriter<'_>,
        hashes: &[Hash],
        report: &mut FetchReport,
        keep: bool,
    ) -> Result<HashMap<Hash, Vec<u8>>> {
        let mut wanted: BTreeMap<Hash, RemoteObject> = BTreeMap::new();
        for hash in hashes {
            if local.contains(hash) {
                report.objects_present += 1;
                continue;
            }
            if wanted.contains_key(hash) {
                continue;
            }
            let found = self.locate(hash).ok_or_else(|| {
                self.corrupt(
                    "manifests",
                    format!("object {hash} is in none of the packs its manifest lists"),
                )
            })?;
            wanted.insert(*hash, found);
        }
        let spans = spans(wanted.into_values().collect());
        let mut kept = HashMap::new();
        self.block_on(async {
            let downloads = futures_util::stream::iter(spans.into_iter().map(|span| async move {
                let key = self.key(&["packs", &format!("{}.pack", span.pack)]);
                let range = span.start..span.end;
                let bytes = self
                    .request("GET", &key, self.bucket_get_range(&key, range))
                    .await?;
                Ok::<_, RemoteError>((span, key, bytes))
            }))
            .buffer_unordered(self.options.parallel_fetches.max(1));
            futures_util::pin_mut!(downloads);
            while let Some(done) = downloads.next().await {
                let (span, key, bytes) = done?;
                report.requests += 1;
                report.bytes_fetched += bytes.len() as u64;
                let origin = PathBuf::from(format!("{}/{key}", self.url));
                for object in &span.objects {
                    let stored = self.cut(&key, &bytes, span.start, object)?;
                    if keep {
                        let content = stored.verify(&origin).map_err(|e| self.damaged(&key, e))?;
                        kept.insert(stored.hash, content);
                    }
                    writer
                        .put_stored(&stored, &origin)
                        .map_err(|e| self.damaged(&key, e))?;
                    report.objects_fetched += 1;
                }
            }
            Ok::<_, RemoteError>(())
        })?;
        Ok(kept)
    }

    /// Object `object` out of `bytes`, the range of pack `key` from offset `start` (not yet
    /// verified).
    pub(crate) fn cut(
        &self,
        key: &object_store::path::Path,
        bytes: &[u8],
        start: u64,
        object: &RemoteObject,
    ) -> Result<StoredObject> {
        let at = (object.entry.offset - start) as usize;
        let stored = bytes
            .get(at..at + object.entry.stored_len as usize)
            .ok_or_else(|| self.corrupt(key.as_ref(), "shorter than its index says".into()))?;
        Ok(StoredObject {
            hash: object.entry.hash,
            flags: object.entry.flags,
            raw_len: object.entry.raw_len,
            bytes: stored.to_vec(),
        })
    }

    /// A corrupt object is the remote's fault; anything else the local store's.
    pub(crate) fn damaged(&self, key: &object_store::path::Path, e: StoreError) -> RemoteError {
        match e {
            StoreError::Corrupt { hash, reason, .. } => {
                self.corrupt(key.as_ref(), format!("object {hash}: {reason}"))
            }
            e => self.local()(e),
        }
    }

    pub(crate) fn bucket_get_range<'a>(
        &'a self,
        key: &'a object_store::path::Path,
        range: std::ops::Range<u64>,
    ) -> impl std::future::Future<Output = object_store::Result<bytes::Bytes>> + 'a {
        use object_store::ObjectStoreExt;
        async move {
            let bytes = self.bucket.get_range(key, range).await?;
            self.count_download(bytes.len());
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(pack: &str, offset: u64, len: u32) -> RemoteObject {
        RemoteObject::at(pack, offset, len)
    }

    #[test]
    fn neighbours_share_a_download_and_far_or_other_packs_do_not() {
        let got = spans(vec![
            object("b", 100, 4096),
            object("a", 100, 4096),
            object("a", 4196 + 1000, 4096),
            object("a", 10 << 20, 4096),
        ]);
        let shape: Vec<(String, u64, u64, usize)> = got
            .iter()
            .map(|s| (s.pack.to_string(), s.start, s.end, s.objects.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a".into(), 100, 5196 + 4096, 2),
                ("a".into(), 10 << 20, (10 << 20) + 4096, 1),
                ("b".into(), 100, 4196, 1),
            ]
        );
        // A span never grows past the bound, however close its objects are.
        let many: Vec<RemoteObject> = (0..4096u64).map(|i| object("c", i * 4096, 4096)).collect();
        assert!(spans(many)
            .iter()
            .all(|s| s.end - s.start <= MAX_SPAN_BYTES));
    }
}
