//! Lazy guest memory for restores: pages arrive on first touch through userfaultfd.
//!
//! Guest RAM is registered with a userfaultfd before the vCPUs start; a handler thread serves
//! each missing-page fault from a [`PageSource`] (the snapshot store) with `UFFDIO_COPY`, or
//! `UFFDIO_ZEROPAGE` for pages that were all zeros. Faults come from the vCPUs (through KVM,
//! in kernel mode) and from device emulation alike. A prefetch thread may load a recorded
//! working set in the background; the handler records the order of the pages it serves so the
//! next restore can prefetch them.

use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ember_devices::GuestMemoryMmap;

/// Guest pages are served at this granularity.
pub const PAGE_SIZE: usize = 4096;

/// Where restored pages come from.
pub trait PageSource: Send + Sync {
    /// Fills `buf` with guest page `index` (guest physical address / 4 KiB, counted over the
    /// guest's RAM regions in order) and returns `true`, or returns `false` for an all-zero page
    /// (leaving `buf` alone). An error stops the VM.
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError>;
}

/// Why a [`PageSource`] could not give a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("page {index} is beyond the snapshot's {pages} pages")]
    BeyondSnapshot { index: u64, pages: usize },
    #[error("guest page {index} came as a zero page; its snapshot holds {hash}")]
    ZeroForObject { index: u64, hash: String },
    #[error("guest page {index} came with content that does not match its hash {hash}")]
    WrongContent { index: u64, hash: String },
    #[error(transparent)]
    Store(#[from] ember_snapshot_store::StoreError),
    /// A source of another kind failed (a process serving pages over a channel).
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
}

/// Why the fault handler stopped (and with it the VM).
#[derive(Debug, thiserror::Error)]
enum FaultError {
    #[error("setting up the fault loop: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("waiting for faults: {0}")]
    Wait(#[source] std::io::Error),
    #[error("reading a fault: {0}")]
    Read(#[source] userfaultfd::Error),
    #[error("fault at {addr:#x} outside guest memory")]
    Outside { addr: u64 },
    #[error("guest page {index}: {source}")]
    Page {
        index: u64,
        #[source]
        source: PageError,
    },
    #[error("placing guest page at {addr:#x}: {source}")]
    Place {
        addr: u64,
        #[source]
        source: userfaultfd::Error,
    },
}

/// Errors setting up lazy memory.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("cannot create a userfaultfd (is /dev/userfaultfd accessible?): {0}")]
    Create(userfaultfd::Error),
    #[error("cannot register guest memory {addr:#x}+{len:#x} with userfaultfd: {source}")]
    Register {
        addr: u64,
        len: u64,
        source: userfaultfd::Error,
    },
    #[error("cannot set up the fault handler's event loop: {0}")]
    Epoll(std::io::Error),
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("reading guest page {index} for an eager restore failed: {source}")]
    EagerRead {
        index: u64,
        #[source]
        source: PageError,
    },
    #[error("guest page {index} is outside guest memory")]
    OutOfRange { index: u64 },
}

/// Counters of a lazy restore.
#[derive(Debug, Default)]
pub struct LazyStats {
    /// Faults answered with page data.
    pub faults_copied: AtomicU64,
    /// Faults answered with a zero page.
    pub faults_zero: AtomicU64,
    /// Pages loaded by the prefetch thread before anyone touched them.
    pub prefetched: AtomicU64,
    /// When the faults came.
    pub timeline: FaultTimeline,
}

/// How finely [`FaultTimeline`] counts.
pub const FAULT_BUCKET_MS: u64 = 20;
/// How long after the restore [`FaultTimeline`] counts (later faults are only totalled).
const FAULT_TIMELINE_BUCKETS: usize = 3000;

/// Faults served on demand, counted per [`FAULT_BUCKET_MS`] since the handler started (the
/// first minute): how a restored guest's demand for memory dies down.
#[derive(Debug)]
pub struct FaultTimeline {
    started: std::time::Instant,
    buckets: Box<[AtomicU32]>,
}

impl Default for FaultTimeline {
    fn default() -> Self {
        FaultTimeline {
            started: std::time::Instant::now(),
            buckets: (0..FAULT_TIMELINE_BUCKETS)
                .map(|_| AtomicU32::new(0))
                .collect(),
        }
    }
}

impl FaultTimeline {
    /// Counts one fault, now.
    pub fn record(&self) {
        let bucket = self.started.elapsed().as_millis() as u64 / FAULT_BUCKET_MS;
        if let Some(b) = self.buckets.get(bucket as usize) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far, without the trailing empty buckets.
    pub fn counts(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        while counts.last() == Some(&0) {
            counts.pop();
        }
        counts
    }
}

impl LazyStats {
    pub fn faults(&self) -> u64 {
        self.faults_copied.load(Ordering::Relaxed) + self.faults_zero.load(Ordering::Relaxed)
    }
}

/// One guest RAM region as the handler sees it.
#[derive(Debug, Clone, Copy)]
struct Region {
    host: u64,
    len: u64,
    first_page: u64,
}

#[derive(Clone)]
struct Layout(Arc<Vec<Region>>);

impl Layout {
    fn of(mem: &GuestMemoryMmap) -> Layout {
        let mut first_page = 0;
        let regions = mem
            .iter()
            .map(|r| {
                let region = Region {
                    host: r.as_ptr() as u64,
                    len: r.len(),
                    first_page,
                };
                first_page += r.len() / PAGE_SIZE as u64;
                region
            })
            .collect();
        Layout(Arc::new(regions))
    }

    fn page_of(&self, host_addr: u64) -> Option<(u64, u64)> {
        let page_addr = host_addr & !(PAGE_SIZE as u64 - 1);
        self.0
            .iter()
            .find(|r| page_addr >= r.host && page_addr < r.host + r.len)
            .map(|r| {
                (
                    r.first_page + (page_addr - r.host) / PAGE_SIZE as u64,
                    page_addr,
                )
            })
    }

    fn addr_of(&self, index: u64) -> Option<u64> {
        self.0.iter().find_map(|r| {
            let pages = r.len / PAGE_SIZE as u64;
            (index >= r.first_page && index < r.first_page + pages)
                .then(|| r.host + (index - r.first_page) * PAGE_SIZE as u64)
        })
    }

    fn total_pages(&self) -> u64 {
        self.0.iter().map(|r| r.len / PAGE_SIZE as u64).sum()
    }
}

/// Copies one page into place; `Ok(false)` when it was already there (EEXIST).
fn place_page(uffd: &Uffd, addr: u64, data: Option<&[u8; PAGE_SIZE]>) -> Result<bool, FaultError> {
    let result = match data {
        // SAFETY: `addr` is a page-aligned address inside a guest RAM region registered with
        // this userfaultfd (found through `Layout`), and `buf` is a full page of readable memory.
        Some(buf) => unsafe {
            uffd.copy(
                buf.as_ptr() as *const c_void,
                addr as *mut c_void,
                PAGE_SIZE,
                true,
            )
        },
        // SAFETY: as above; zeropage maps the shared zero page at `addr`.
        None => unsafe { uffd.zeropage(addr as *mut c_void, PAGE_SIZE, true) },
    };
    match result {
        Ok(_) => Ok(true),
        Err(userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno))
            if errno as i32 == libc::EEXIST =>
        {
            // Someone (the prefetcher or a racing fault) placed it first: wake any waiter.
            uffd.wake(addr as *mut c_void, PAGE_SIZE)
                .map_err(|source| FaultError::Place { addr, source })?;
            Ok(false)
        }
        Err(source) => Err(FaultError::Place { addr, source }),
    }
}

/// A running lazy restore: dropping it stops the handler and prefetch threads (only do that
/// once the vCPUs are stopped; an unanswered fault would block forever).
pub struct LazyMemory {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
    prefetchers: Vec<JoinHandle<()>>,
    stats: Arc<LazyStats>,
    recorded: Arc<Mutex<Option<Vec<u64>>>>,
    /// Written (with the reason stored in `failure`) when serving a page failed.
    pub error_evt: EventFd,
    failure: Arc<Mutex<Option<String>>>,
}

impl LazyMemory {
    /// Registers all of `mem` (freshly created, never touched) and starts serving faults from
    /// `source`. `prefetch` lists pages to load in the background, in order.
    pub fn start(
        mem: &GuestMemoryMmap,
        source: Arc<dyn PageSource>,
        prefetch: Vec<u64>,
    ) -> Result<LazyMemory, LazyError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(LazyError::Create)?;
        let layout = Layout::of(mem);
        for r in layout.0.iter() {
            uffd.register(r.host as *mut c_void, r.len as usize)
                .map_err(|source| LazyError::Register {
                    addr: r.host,
                    len: r.len,
                    source,
                })?;
        }
        let uffd = Arc::new(uffd);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(LazyError::Epoll)?;
        let error_evt = EventFd::new(EFD_NONBLOCK).map_err(LazyError::Epoll)?;
        let stats = Arc::new(LazyStats::default());
        let recorded = Arc::new(Mutex::new(Some(Vec::new())));
        let failure = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));

        let handler = {
            let (uffd, layout, source, stats) =
                (uffd.clone(), layout.clone(), source.clone(), stats.clone());
            let (recorded, failure) = (recorded.clone(), failure.clone());
            let stop = stop.try_clone().map_err(LazyError::Epoll)?;
            let error_evt = error_evt.try_clone().map_err(LazyError::Epoll)?;
            ember_seccomp::spawn_filtered(
                "ember-uffd".into(),
                ember_seccomp::ThreadKind::MemoryFaults,
                move || {
                    if let Err(reason) =
                        serve_faults(&uffd, &layout, source.as_ref(), &stats, &recorded, &stop)
                    {
                        log::error!("lazy restore stopped: {reason}");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(reason.to_string());
                        let _ = error_evt.write(1);
                    }
                },
            )
            .map_err(|source| LazyError::Spawn {
                what: "userfaultfd handler",
                source,
            })?
        };
        let mut lazy = LazyMemory {
            stop,
            stopping,
            handler: Some(handler),
            prefetchers: Vec::new(),
            stats,
            recorded,
            error_evt,
            failure,
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (i, share) in prefetch_shares(prefetch, threads).into_iter().enumerate() {
            let (uffd, layout, source, stats, stopping) = (
                uffd.clone(),
                layout.clone(),
                source.clone(),
                lazy.stats.clone(),
                lazy.stopping.clone(),
            );
            // On failure `lazy` is dropped, which stops the threads already started.
            let thread = ember_seccomp::spawn_filtered(
                format!("ember-prefetch{i}"),
                ember_seccomp::ThreadKind::MemoryFaults,
                move || prefetch_runs(&uffd, &layout, source.as_ref(), &stats, &stopping, share),
            )
            .map_err(|source| LazyError::Spawn {
                what: "prefetch",
                source,
            })?;
            lazy.prefetchers.push(thread);
        }
        Ok(lazy)
    }

    /// Waits until the prefetch threads (if any) have loaded their pages.
    pub fn finish_prefetch(&mut self) {
        for h in self.prefetchers.drain(..) {
            let _ = h.join();
        }
    }

    pub fn stats(&self) -> &LazyStats {
        &self.stats
    }

    /// Stops recording and returns the pages faulted so far, in first-touch order (the working
    /// set to prefetch next time).
    pub fn take_recorded(&self) -> Vec<u64> {
        self.recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default()
    }

    /// Why serving a page failed, once `error_evt` fired.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        log::info!(
            "lazy memory: {} faults served ({} with a zero page), {} pages prefetched",
            self.stats.faults(),
            self.stats.faults_zero.load(Ordering::Relaxed),
            self.stats.prefetched.load(Ordering::Relaxed)
        );
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.write(1);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        for h in self.prefetchers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Pages per `UFFDIO_COPY` when prefetching (one call per run of neighbouring pages: the
/// per-call cost, not the copy, dominates a 4 KiB page).
const PREFETCH_RUN_PAGES: usize = 64;

/// At most this many prefetch threads: reading, verifying and placing pages is CPU work, and
/// the restore's own thread keeps working meanwhile.
const MAX_PREFETCH_THREADS: usize = 2;

/// Splits a working set into one share per prefetch thread (`threads` cores, at most
/// [`MAX_PREFETCH_THREADS`]): sorted, without duplicates, in contiguous slices of nearly equal
/// size, so runs of neighbouring pages stay whole except at the cuts. No share is empty.
fn prefetch_shares(mut pages: Vec<u64>, threads: usize) -> Vec<Vec<u64>> {
    pages.sort_unstable();
    pages.dedup();
    if pages.is_empty() {
        return Vec::new();
    }
    let n = threads.clamp(1, MAX_PREFETCH_THREADS).min(pages.len());
    let each = pages.len().div_ceil(n);
    pages.chunks(each).map(<[u64]>::to_vec).collect()
}

/// Loads `pages` (sorted, without duplicates: a [`prefetch_shares`] share) in bulk, in runs of
/// neighbouring pages, each read from `source` and placed with one `UFFDIO_COPY`. Pages the
/// guest touched first are skipped (EEXIST); read errors are left to the fault handler, which
/// reports them if the page is really needed.
fn prefetch_runs(
    uffd: &Uffd,
    layout: &Layout,
    source: &dyn PageSource,
    stats: &LazyStats,
    stopping: &AtomicBool,
    pages: Vec<u64>,
) {
    let mut buf = vec![0u8; PREFETCH_RUN_PAGES * PAGE_SIZE];
    let mut i = 0;
    while i < pages.len() && !stopping.load(Ordering::Relaxed) {
        // A run: consecutive indices that are also contiguous in the host mapping.
        let first = pages[i];
        let Some(base) = layout.addr_of(first) else {
            i += 1;
            continue;
        };
        let mut len = 1;
        while len < PREFETCH_RUN_PAGES
            && i + len < pages.len()
            && pages[i + len] == first + len as u64
            && layout.addr_of(first + len as u64) == Some(base + (len * PAGE_SIZE) as u64)
        {
            len += 1;
        }
        let mut readable = true;
        for (k, chunk) in buf.chunks_exact_mut(PAGE_SIZE).take(len).enumerate() {
            let page: &mut [u8; PAGE_SIZE] = chunk.try_into().expect("chunks are pages");
            match source.read_page(first + k as u64, page) {
                Ok(true) => {}
                Ok(false) => page.fill(0),
                Err(_) => readable = false,
            }
        }
        if readable {
            stats.prefetched.fetch_add(
                place_run(uffd, base, &buf[..len * PAGE_SIZE]),
                Ordering::Relaxed,
            );
        }
        i += len;
    }
}

/// Copies a run of pages into place, stepping over pages already there; returns how many
/// pages it placed.
fn place_run(uffd: &Uffd, base: u64, data: &[u8]) -> u64 {
    let mut done = 0usize;
    let mut placed = 0u64;
    while done < data.len() {
        let rest = &data[done..];
        let dst = base + done as u64;
        // SAFETY: `dst..dst + rest.len()` lies inside one guest RAM region registered with
        // this userfaultfd (the run was built from `Layout`), and `rest` is readable memory of
        // exactly that length.
        let result = unsafe {
            uffd.copy(
                rest.as_ptr() as *const c_void,
                dst as *mut c_void,
                rest.len(),
                true,
            )
        };
        match result {
            Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => {
                done += n;
                placed += (n / PAGE_SIZE) as u64;
            }
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                // Faulted in meanwhile: wake any waiter and go on after it.
                let _ = uffd.wake(dst as *mut c_void, PAGE_SIZE);
                done += PAGE_SIZE;
            }
            Ok(_) | Err(_) => break,
        }
    }
    placed
}

fn serve_faults(
    uffd: &Uffd,
    layout: &Layout,
    source: &dyn PageSource,
    stats: &LazyStats,
    recorded: &Mutex<Option<Vec<u64>>>,
    stop: &EventFd,
) -> Result<(), FaultError> {
    const UFFD: u64 = 0;
    const STOP: u64 = 1;
    let epoll = Epoll::new().map_err(FaultError::Epoll)?;
    for (fd, data) in [(uffd.as_raw_fd(), UFFD), (stop.as_raw_fd(), STOP)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
            .map_err(FaultError::Epoll)?;
    }
    let mut buf = [0u8; PAGE_SIZE];
    let mut ready = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FaultError::Wait(e)),
        };
        if ready[..n].iter().any(|e| e.data() == STOP) {
            return Ok(());
        }
        // Drain every pending event (the fd is non-blocking).
        while let Some(event) = uffd.read_event().map_err(FaultError::Read)? {
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let Some((index, page_addr)) = layout.page_of(addr as u64) else {
                return Err(FaultError::Outside { addr: addr as u64 });
            };
            let has_data = source
                .read_page(index, &mut buf)
                .map_err(|source| FaultError::Page { index, source })?;
            if place_page(uffd, page_addr, has_data.then_some(&buf))? {
                let counter = if has_data {
                    &stats.faults_copied
                } else {
                    &stats.faults_zero
                };
                counter.fetch_add(1, Ordering::Relaxed);
                stats.timeline.record();
                if let Some(list) = recorded.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    list.push(index);
                }
            }
        }
    }
}

/// Copies every page from `source` into `mem` before the vCPUs start (the eager restore, for
/// comparison with the lazy one).
pub fn load_eagerly(mem: &GuestMemoryMmap, source: &dyn PageSource) -> Result<u64, LazyError> {
    let layout = Layout::of(mem);
    let mut buf = [0u8; PAGE_SIZE];
    let mut copied = 0;
    for index in 0..layout.total_pages() {
        let addr = layout
            .addr_of(index)
            .ok_or(LazyError::OutOfRange { index })?;
        if source
            .read_page(index, &mut buf)
            .map_err(|source| LazyError::EagerRead { index, source })?
        {
            // SAFETY: `addr` is the start of a page inside a guest RAM mapping owned by `mem`
            // (from `Layout`), which stays mapped for this call; no vCPU runs yet.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, PAGE_SIZE) };
            copied += 1;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    /// Page n is filled with byte n % 251 + 1, except every 4th page, which is zero.
    struct Pattern {
        fail_at: Option<u64>,
    }

    impl PageSource for Pattern {
        fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError> {
            if Some(index) == self.fail_at {
                return Err(PageError::Source(
                    format!("object for page {index} is corrupt").into(),
                ));
            }
            if index.is_multiple_of(4) {
                return Ok(false);
            }
            buf.fill((index % 251) as u8 + 1);
            Ok(true)
        }
    }

    fn byte_at(mem: &GuestMemoryMmap, page: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(page * PAGE_SIZE as u64 + 17))
            .unwrap()
    }

    #[test]
    fn serves_faults_with_data_and_zero_pages_and_records_them() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let lazy =
            LazyMemory::start(&mem, Arc::new(Pattern { fail_at: None }), Vec::new()).unwrap();
        assert_eq!(byte_at(&mem, 5), 6);
        assert_eq!(byte_at(&mem, 8), 0);
        assert_eq!(byte_at(&mem, 5), 6, "a served page stays");
        // The handler wakes the faulting thread before it updates its counters.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while lazy.stats().faults() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(lazy.stats().faults_copied.load(Ordering::Relaxed), 1);
        assert_eq!(lazy.stats().faults_zero.load(Ordering::Relaxed), 1);
        assert_eq!(lazy.take_recorded(), vec![5, 8]);
        while lazy.stats().timeline.counts().iter().sum::<u32>() < 2
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(lazy.stats().timeline.counts().iter().sum::<u32>(), 2);
    }

    #[test]
    fn the_fault_timeline_counts_by_time_and_drops_the_empty_tail() {
        let timeline = FaultTimeline::default();
        assert!(timeline.counts().is_empty());
        timeline.record();
        timeline.record();
        std::thread::sleep(std::time::Duration::from_millis(3 * FAULT_BUCKET_MS));
        timeline.record();
        let counts = timeline.counts();
        assert_eq!(counts.iter().sum::<u32>(), 3);
        assert!(counts.len() >= 3, "{counts:?}");
        assert_ne!(counts.last(), Some(&0));
    }

    #[test]
    fn the_working_set_is_split_into_sorted_contiguous_shares() {
        let pages = vec![9, 1, 5, 5, 3, 7];
        assert_eq!(
            prefetch_shares(pages.clone(), 2),
            vec![vec![1, 3, 5], vec![7, 9]]
        );
        assert_eq!(prefetch_shares(pages.clone(), 1), vec![vec![1, 3, 5, 7, 9]]);
        assert_eq!(prefetch_shares(pages, 64).len(), MAX_PREFETCH_THREADS);
        assert_eq!(prefetch_shares(vec![4], 2), vec![vec![4]]);
        assert!(prefetch_shares(Vec::new(), 2).is_empty());
    }

    #[test]
    fn prefetch_loads_pages_before_they_are_touched() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let pages: Vec<u64> = (1..200).collect();
        let lazy = LazyMemory::start(&mem, Arc::new(Pattern { fail_at: None }), pages).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lazy.stats().prefetched.load(Ordering::Relaxed) < 199
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for page in 1..200u64 {
            let expected = if page.is_multiple_of(4) {
                0
            } else {
                (page % 251) as u8 + 1
            };
            assert_eq!(byte_at(&mem, page), expected);
        }
        assert_eq!(lazy.stats().faults(), 0, "prefetched pages need no fault");
    }

    #[test]
    fn a_failing_source_is_reported_not_hung() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let lazy =
            LazyMemory::start(&mem, Arc::new(Pattern { fail_at: Some(3) }), Vec::new()).unwrap();
        let mem2 = mem.clone();
        // The touching thread blocks forever (as a vCPU would); the VMM learns of the failure.
        std::thread::spawn(move || byte_at(&mem2, 3));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lazy.error_evt.read().is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let failure = lazy.failure().expect("the failure is reported");
        assert!(
            failure.contains("guest page 3") && failure.contains("corrupt"),
            "{failure}"
        );
        std::mem::forget(lazy); // a thread is still blocked on a fault that will never be served
    }

    #[test]
    fn eager_load_copies_everything() {
        let mem = create_guest_memory(8 << 20).unwrap();
        let copied = load_eagerly(&mem, &Pattern { fail_at: None }).unwrap();
        assert_eq!(copied, 2048 - 512);
        assert_eq!(byte_at(&mem, 7), 8);
        assert_eq!(byte_at(&mem, 12), 0);
    }
}
