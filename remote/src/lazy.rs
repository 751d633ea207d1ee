//! Restoring a snapshot this host lacks without downloading it whole first.
//!
//! [`Remote::prepare_lazy`] fetches what a restore reads before its guest runs (manifest,
//! state, maps, disk chunks) and the pages of the working set recorded for the snapshot, in
//! a few large parallel ranges, into the local store. The guest's other pages arrive on
//! demand ([`LazySnapshot::page`]): a page's whole neighbourhood in its pack (a window of
//! [`WINDOW_BYTES`]) comes with one ranged download, concurrent requests for one window wait
//! for the same download, and every object is verified against its hash before it is kept.
//! [`LazySnapshot::complete`] then fetches the rest and saves the snapshot locally, so later
//! restores on this host need no remote at all.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ember_snapshot_store::{GcHold, Hash, PageRef, Store, StoredObject};

use crate::fetch::{FetchReport, SnapshotHead};
use crate::index::RemoteObject;
use crate::{Remote, RemoteError, Result};

/// Bytes of a pack one on-demand download covers (aligned; packs keep a snapshot's pages in
/// guest order, so a window holds a page's neighbours).
pub const WINDOW_BYTES: u64 = 1 << 20;

/// Working-set objects closer than this in a pack are fetched with what lies between them.
const WORKING_SET_GAP_BYTES: u64 = 1 << 20;

/// Windows [`LazySnapshot::complete`] downloads before it stores what they held.
const COMPLETE_BATCH_WINDOWS: usize = 64;
/// Neighbouring windows [`LazySnapshot::complete`] asks for in one download.
const BULK_RUN_WINDOWS: usize = 8;

/// What preparing a lazy restore fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareReport {
    /// The manifest, maps, state and disk chunks, and the working set's pages.
    pub fetched: FetchReport,
    /// Pages in the recorded working set (0: none was pushed).
    pub working_set_pages: usize,
}

/// A window: its pack and its number in it.
type WindowKey = (Arc<str>, u64);

/// A download of one window, which other requests for the same window wait on.
#[derive(Default)]
struct Window {
    /// `Some(true)` once its objects are kept, `Some(false)` if the download failed.
    outcome: Mutex<Option<bool>>,
    done: Condvar,
}

impl Window {
    fn finish(&self, ok: bool) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
        self.done.notify_all();
    }

    fn wait(&self) -> bool {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        while outcome.is_none() {
            outcome = self.done.wait(outcome).unwrap_or_else(|p| p.into_inner());
        }
        outcome.unwrap_or(false)
    }
}

/// A snapshot being restored from the remote: serves its pages, fetching them as asked.
pub struct LazySnapshot {
    remote: Arc<Remote>,
    head: SnapshotHead,
    working_set: Vec<u64>,
    /// The memory's objects by remote pack, in offset order: what a window download takes.
    by_pack: HashMap<Arc<str>, Vec<RemoteObject>>,
    /// Verified objects fetched on demand, until [`LazySnapshot::complete`] stores them.
    fetched: Mutex<HashMap<Hash, StoredObject>>,
    windows: Mutex<HashMap<WindowKey, Arc<Window>>>,
    report: Mutex<FetchReport>,
    /// What [`Remote::prepare_lazy`] fetched, before any VMM ran.
    prepared: FetchReport,
    /// Objects written before the manifest that names them must survive a local GC: held
    /// until [`LazySnapshot::complete`] saved the manifest.
    gc_hold: Mutex<Option<GcHold>>,
    completing: AtomicBool,
}

impl Remote {
    /// Prepares a lazy restore of snapshot `id` into `local` (see the module's comment).
    pub fn prepare_lazy(self: &Arc<Self>, local: &Store, id: &str) -> Result<LazySnapshot> {
        let gc_hold = local.hold_gc().map_err(self.local())?;
        let mut writer = local.writer().map_err(self.local())?;
        let mut report = PrepareReport::default();
        let head = self.fetch_head(local, &mut writer, id, &mut report.fetched)?;
        let working_set = match self.working_set(id) {
            Ok(recorded) => recorded.map(|r| r.pages).unwrap_or_default(),
            // Advisory: a damaged one costs speed, not the restore.
            Err(e) if !e.is_unavailable() => {
                log::warn!("snapshot {id}: not using its remote working set: {e}");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        report.working_set_pages = working_set.len();
        let mut by_pack = self.memory_objects_by_pack(local, &head, id)?;
        let ws_hashes: HashSet<Hash> = working_set
            .iter()
            .filter_map(
                |&page| match head.memory.pages.get(usize::try_from(page).ok()?) {
                    Some(PageRef::Object(hash)) => Some(*hash),
                    _ => None,
                },
            )
            .collect();
        let mut first: Vec<Hash> = head.disk_chunks.clone();
        first.extend(with_gaps_filled(&by_pack, &ws_hashes));
        self.fetch_objects(local, &mut writer, &first, &mut report.fetched, false)?;
        writer.finish().map_err(self.local())?;
        // What the guest may still fault on: the memory objects not fetched above.
        for objects in by_pack.values_mut() {
            objects.retain(|o| !local.contains(&o.entry.hash));
        }
        by_pack.retain(|_, objects| !objects.is_empty());
        Ok(LazySnapshot {
            remote: self.clone(),
            head,
            working_set,
            by_pack,
            fetched: Mutex::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
            prepared: report.fetched.clone(),
            report: Mutex::new(report.fetched),
            gc_hold: Mutex::new(Some(gc_hold)),
            completing: AtomicBool::new(false),
        })
    }
}

impl Remote {
    /// The memory objects of `head` that `local` lacks, by remote pack, in offset order.
    fn memory_objects_by_pack(
        &self,
        local: &Store,
        head: &SnapshotHead,
        id: &str,
    ) -> Result<HashMap<Arc<str>, Vec<RemoteObject>>> {
        let mut by_pack: HashMap<Arc<str>, Vec<RemoteObject>> = HashMap::new();
        let mut seen = HashSet::new();
        for hash in head.memory_objects() {
            if !seen.insert(hash) || local.contains(&hash) {
                continue;
            }
            let found = self.locate(&hash).ok_or_else(|| {
                self.corrupt(
                    self.manifest_key(id).as_ref(),
                    format!("page object {hash} is in none of the packs it lists"),
                )
            })?;
            by_pack.entry(found.pack.clone()).or_default().push(found);
        }
        for objects in by_pack.values_mut() {
            objects.sort_by_key(|o| o.entry.offset);
        }
        Ok(by_pack)
    }
}

/// The objects of `wanted` and those lying between two of them in a pack with less than
/// [`WORKING_SET_GAP_BYTES`] between: a working set scattered over a pack then downloads as
/// a few long ranges, and what lies between (pages the guest is likely to touch next) comes
/// with it instead of being skipped and fetched again later.
fn with_gaps_filled(
    by_pack: &HashMap<Arc<str>, Vec<RemoteObject>>,
    wanted: &HashSet<Hash>,
) -> Vec<Hash> {
    let mut out = Vec::new();
    for objects in by_pack.values() {
        let mut last_wanted: Option<usize> = None;
        for (i, object) in objects.iter().enumerate() {
            if !wanted.contains(&object.entry.hash) {
                continue;
            }
            if let Some(prev) = last_wanted {
                let prev_end =
                    objects[prev].entry.offset + u64::from(objects[prev].entry.stored_len);
                if object.entry.offset.saturating_sub(prev_end) < WORKING_SET_GAP_BYTES {
                    out.extend(objects[prev + 1..i].iter().map(|o| o.entry.hash));
                }
            }
            out.push(object.entry.hash);
            last_wanted = Some(i);
        }
    }
    out
}

impl LazySnapshot {
    /// The snapshot's manifest as a local store would keep it.
    pub fn manifest(&self) -> ember_snapshot_store::Manifest {
        self.head.local_manifest()
    }

    /// The pages its restores touched first, as recorded on whichever host pushed them.
    pub fn working_set(&self) -> &[u64] {
        &self.working_set
    }

    /// True the first time it is called: the caller is the one to [`LazySnapshot::complete`]
    /// it.
    pub fn start_completing(&self) -> bool {
        !self.completing.swap(true, Ordering::SeqCst)
    }

    /// What was fetched before any VMM ran: the snapshot's head, its disk chunks and its
    /// working set's pages.
    pub fn prepared(&self) -> &FetchReport {
        &self.prepared
    }

    /// Everything fetched so far.
    pub fn report(&self) -> FetchReport {
        lock(&self.report).clone()
    }

    /// Guest page `index`'s content (`None`: an all-zero page), from what was fetched, from
    /// `local`, or downloaded now with its window.
    pub fn page(&self, local: &Store, index: u64) -> Result<Option<Vec<u8>>> {
        let hash = match usize::try_from(index)
            .ok()
            .and_then(|i| self.head.memory.pages.get(i))
        {
            Some(PageRef::Object(hash)) => *hash,
            Some(PageRef::Zero) => return Ok(None),
            None => {
                return Err(self.remote.corrupt(
                    &self.head.manifest.id,
                    format!(
                        "page {index} asked for, beyond its {} pages",
                        self.head.memory.pages.len()
                    ),
                ))
            }
        };
        if let Some(content) = self.kept(local, &hash)? {
            return Ok(Some(content));
        }
        let object = self.remote.locate(&hash).ok_or_else(|| {
            self.remote.corrupt(
                &self.head.manifest.id,
                format!("page object {hash} is in no pack"),
            )
        })?;
        let key = (object.pack.clone(), object.entry.offset / WINDOW_BYTES);
        self.ensure_window(&key)?;
        self.kept(local, &hash)?.map(Some).ok_or_else(|| {
            self.remote.corrupt(
                &format!("packs/{}.pack", key.0),
                format!("its index lists {hash} but the download of its window lacked it"),
            )
        })
    }

    /// Makes sure window `key` was downloaded: by this call, or by the one already doing it
    /// (whose outcome this one waits for).
    fn ensure_window(&self, key: &WindowKey) -> Result<()> {
        if let Some(window) = self.claim(key) {
            let fetched = self.fetch_windows(&key.0, key.1, 1);
            self.settle(std::slice::from_ref(key), &[window], fetched.is_ok());
            return fetched;
        }
        let window = lock(&self.windows).get(key).cloned();
        match window {
            // Failed and forgotten meanwhile: try it here.
            None => self.ensure_window(key),
            Some(window) if window.wait() => Ok(()),
            Some(_) => Err(RemoteError::RangeFailed {
                remote: self.remote.url.clone(),
                key: format!("packs/{}.pack", key.0),
            }),
        }
    }

    /// Window `key`, if no one has downloaded it or is downloading it: the caller does now.
    fn claim(&self, key: &WindowKey) -> Option<Arc<Window>> {
        let mut windows = lock(&self.windows);
        if windows.contains_key(key) {
            return None;
        }
        let window = Arc::new(Window::default());
        windows.insert(key.clone(), window.clone());
        Some(window)
    }

    /// Ends the downloads of `keys` (claimed as `windows`): waiters learn how it went, and a
    /// failed window can be claimed again.
    fn settle(&self, keys: &[WindowKey], windows: &[Arc<Window>], ok: bool) {
        if !ok {
            let mut map = lock(&self.windows);
            for key in keys {
                map.remove(key);
            }
        }
        for window in windows {
            window.finish(ok);
        }
    }

    /// Downloads `run` (consecutive windows of one pack) with as few requests as windows
    /// no one else claimed allow.
    fn fetch_run(&self, run: &[WindowKey]) -> Result<()> {
        let mut at = 0;
        while at < run.len() {
            let mut claimed = Vec::new();
            while let Some(window) = run.get(at + claimed.len()).and_then(|k| self.claim(k)) {
                claimed.push(window);
            }
            if claimed.is_empty() {
                self.ensure_window(&run[at])?;
                at += 1;
                continue;
            }
            let keys = &run[at..at + claimed.len()];
            let fetched = self.fetch_windows(&keys[0].0, keys[0].1, claimed.len() as u64);
            self.settle(keys, &claimed, fetched.is_ok());
            fetched?;
            at += claimed.len();
        }
        Ok(())
    }

    /// Object `hash`'s content if it was fetched already or `local` has it.
    fn kept(&self, local: &Store, hash: &Hash) -> Result<Option<Vec<u8>>> {
        if let Some(object) = lock(&self.fetched).get(hash) {
            let origin = PathBuf::from(&self.remote.url);
            // Verified when fetched; decompressed (and checked again: cheap) per request.
            return object
                .verify(&origin)
                .map(Some)
                .map_err(|e| self.remote.local()(e));
        }
        if local.contains(hash) {
            return local.read(hash).map(Some).map_err(self.remote.local());
        }
        Ok(None)
    }

    /// Downloads `count` windows of `pack` from window `first` in one request: the memory
    /// objects that start in them, verified.
    fn fetch_windows(&self, pack: &Arc<str>, first: u64, count: u64) -> Result<()> {
        let objects = self.by_pack.get(pack).map_or(&[][..], Vec::as_slice);
        let (from, to) = (first * WINDOW_BYTES, (first + count) * WINDOW_BYTES);
        let first = objects.partition_point(|o| o.entry.offset < from);
        let last = objects.partition_point(|o| o.entry.offset < to);
        let objects = &objects[first..last];
        let (Some(start), Some(end)) = (
            objects.first().map(|o| o.entry.offset),
            objects
                .iter()
                .map(|o| o.entry.offset + u64::from(o.entry.stored_len))
                .max(),
        ) else {
            return Ok(());
        };
        let key = self.remote.key(&["packs", &format!("{pack}.pack")]);
        let bytes = self.remote.block_on(self.remote.request(
            "GET",
            &key,
            self.remote.bucket_get_range(&key, start..end),
        ))?;
        let origin = PathBuf::from(format!("{}/{key}", self.remote.url));
        let mut verified = Vec::with_capacity(objects.len());
        for object in objects {
            let stored = self.remote.cut(&key, &bytes, start, object)?;
            // A damaged object is never kept, so never served.
            stored
                .verify(&origin)
                .map_err(|e| self.remote.damaged(&key, e))?;
            verified.push(stored);
        }
        {
            let mut report = lock(&self.report);
            report.requests += 1;
            report.bytes_fetched += bytes.len() as u64;
            report.objects_fetched += verified.len() as u64;
        }
        let mut fetched = lock(&self.fetched);
        for object in verified {
            fetched.insert(object.hash, object);
        }
        Ok(())
    }

    /// Fetches every page not fetched yet and saves the snapshot in `local` (the objects
    /// fetched on demand included): later restores of it on this host are local ones. The
    /// downloads are the same windows the guest's faults ask for, a few at once in pack
    /// order: a fault in a window being fetched here waits for that download rather than
    /// making its own. What arrives is stored a batch at a time, so the objects held in
    /// memory stay bounded.
    pub fn complete(&self, local: &Store) -> Result<FetchReport> {
        let before = self.report();
        let mut keys: Vec<WindowKey> = self
            .by_pack
            .iter()
            .flat_map(|(pack, objects)| {
                objects
                    .iter()
                    .map(|o| (pack.clone(), o.entry.offset / WINDOW_BYTES))
            })
            .collect();
        keys.sort();
        keys.dedup();
        // Runs of neighbouring windows, each one download where no fault got there first.
        let mut runs: Vec<&[WindowKey]> = Vec::new();
        let mut start = 0;
        for i in 1..=keys.len() {
            let joins = keys.get(i).is_some_and(|k| {
                k.0 == keys[i - 1].0 && k.1 == keys[i - 1].1 + 1 && i - start < BULK_RUN_WINDOWS
            });
            if !joins {
                runs.push(&keys[start..i]);
                start = i;
            }
        }
        let threads = self.remote.options.parallel_fetches.clamp(1, 8);
        let runs_per_batch = (COMPLETE_BATCH_WINDOWS / BULK_RUN_WINDOWS).max(1);
        for batch in runs.chunks(runs_per_batch) {
            let next = AtomicUsize::new(0);
            let failure: Mutex<Option<RemoteError>> = Mutex::new(None);
            std::thread::scope(|scope| {
                for _ in 0..threads.min(batch.len()) {
                    scope.spawn(|| {
                        while let Some(run) = batch.get(next.fetch_add(1, Ordering::Relaxed)) {
                            if lock(&failure).is_some() {
                                return;
                            }
                            if let Err(e) = self.fetch_run(run) {
                                lock(&failure).get_or_insert(e);
                            }
                        }
                    });
                }
            });
            if let Some(e) = lock(&failure).take() {
                return Err(e);
            }
            self.store_fetched(local)?;
        }
        // Objects fetched on demand for windows this pass did not list (none, normally).
        self.store_fetched(local)?;
        local
            .writer()
            .and_then(|writer| writer.commit(&self.head.local_manifest()))
            .map_err(self.remote.local())?;
        self.remote.keep_working_set(local, &self.head.manifest.id);
        lock(&self.gc_hold).take();
        let after = self.report();
        Ok(FetchReport {
            objects_fetched: after.objects_fetched - before.objects_fetched,
            bytes_fetched: after.bytes_fetched - before.bytes_fetched,
            requests: after.requests - before.requests,
            objects_present: 0,
        })
    }

    /// Writes the objects fetched so far into `local` (sealed: readable there at once), and
    /// stops holding them here.
    fn store_fetched(&self, local: &Store) -> Result<()> {
        let kept: Vec<StoredObject> = lock(&self.fetched).values().cloned().collect();
        if kept.is_empty() {
            return Ok(());
        }
        let origin = PathBuf::from(&self.remote.url);
        let mut writer = local.writer().map_err(self.remote.local())?;
        for object in &kept {
            writer
                .put_stored(object, &origin)
                .map_err(self.remote.local())?;
        }
        writer.finish().map_err(self.remote.local())?;
        let mut fetched = lock(&self.fetched);
        for object in &kept {
            fetched.remove(&object.hash);
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(offset: u64, len: u32) -> RemoteObject {
        RemoteObject::at("p", offset, len)
    }

    #[test]
    fn a_scattered_working_set_takes_what_lies_close_between_its_pages() {
        let page = 4096u32;
        // Objects every page up to 64 KiB, then one 2 MiB further on.
        let mut objects: Vec<RemoteObject> =
            (0..16).map(|i| object(i * u64::from(page), page)).collect();
        objects.push(object(64 * 1024 + (2 << 20), page));
        let hash = |i: usize| objects[i].entry.hash;
        let wanted: HashSet<Hash> = [hash(0), hash(8), hash(16)].into();
        let by_pack = HashMap::from([(Arc::from("p"), objects.clone())]);
        let got: HashSet<Hash> = with_gaps_filled(&by_pack, &wanted).into_iter().collect();
        // 0..=8 close together: all of them; 16 is far: only itself; 9..16 never asked for.
        let expected: HashSet<Hash> = (0..=8).map(hash).chain([hash(16)]).collect();
        assert_eq!(got, expected);
        // Nothing wanted, nothing taken.
        assert!(with_gaps_filled(&by_pack, &HashSet::new()).is_empty());
    }
}
