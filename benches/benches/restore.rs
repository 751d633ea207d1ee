//! The restore fault path, beside its bound: a guest page served on first touch through
//! userfaultfd (the touching thread blocks, the handler thread fills the page with
//! `UFFDIO_COPY`) against a bare loop of `UFFDIO_COPY` calls with no fault and no handler;
//! the same fault path with the page read from a real store and its hash checked.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_snapshot_store::{MemoryMap, PageRef, Store};
use ember_vmm::lazy::{LazyMemory, PageError, PageSource, PAGE_SIZE};
use ember_vmm::memory::create_guest_memory;
use ember_vmm::snapshot::StorePages;
use userfaultfd::UffdBuilder;
use vm_memory::GuestMemoryBackend;

/// Pages touched per measured batch (16 MiB).
const PAGES: usize = 4096;

/// Every page holds its index (never zero), generated, not read from anywhere.
struct Generated;

impl PageSource for Generated {
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError> {
        buf.fill((index % 251) as u8 + 1);
        Ok(true)
    }
}

/// Touches every page of a fresh lazily-served memory once; returns the time it took.
fn touch_all(source: Arc<dyn PageSource>, pages: usize) -> Duration {
    let mem = create_guest_memory((pages * PAGE_SIZE) as u64).expect("guest memory");
    let lazy = LazyMemory::start(&mem, source, Vec::new()).expect("userfaultfd");
    let region = mem.iter().next().expect("one region");
    let base = region.as_ptr();
    let start = Instant::now();
    let mut sum = 0u64;
    for page in 0..pages {
        // SAFETY: the byte lies inside the region's mapping, which `mem` keeps alive; the
        // read faults and blocks until the handler thread has placed the page.
        sum += u64::from(unsafe { std::ptr::read_volatile(base.add(page * PAGE_SIZE)) });
    }
    let took = start.elapsed();
    assert!(sum > 0);
    drop(lazy);
    took
}

/// `UFFDIO_COPY` of every page of a fresh registered mapping, one call per page, with no
/// fault to wait for: the kernel's share of serving a fault.
fn copy_loop(pages: usize) -> Duration {
    let len = pages * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(true)
        .create()
        .expect("userfaultfd");
    uffd.register(addr, len).expect("register");
    let page = [7u8; PAGE_SIZE];
    let start = Instant::now();
    for i in 0..pages {
        // SAFETY: the destination page lies inside the registered mapping above and is still
        // missing; the source is a readable page.
        unsafe {
            uffd.copy(
                page.as_ptr() as *const c_void,
                (addr as *mut u8).add(i * PAGE_SIZE) as *mut c_void,
                PAGE_SIZE,
                true,
            )
        }
        .expect("UFFDIO_COPY");
    }
    let took = start.elapsed();
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(addr, len) };
    took
}

/// A store holding `pages` distinct pages and the map of a guest made of them.
fn store_with_pages(dir: &std::path::Path, pages: usize) -> (Arc<Store>, MemoryMap) {
    let store = Arc::new(Store::open(dir).expect("store"));
    let mut data = vec![0u8; pages * PAGE_SIZE];
    for (i, chunk) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
        chunk[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        chunk[8..].fill(0x5a);
    }
    let mut writer = store.writer().expect("writer");
    let refs = writer.put_pages(&data, 2).expect("put");
    writer.finish().expect("seal");
    assert!(refs.iter().all(|r| matches!(r, PageRef::Object(_))));
    (store, MemoryMap::new(refs))
}

fn faults(c: &mut Criterion) {
    let mut group = c.benchmark_group("restore_fault_4KiB");
    group.throughput(Throughput::Elements(PAGES as u64));
    group.sample_size(20);
    group.bench_function("UFFDIO_COPY loop, no fault (bound)", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| copy_loop(PAGES)).sum())
    });
    group.bench_function("fault served, generated page", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| touch_all(Arc::new(Generated), PAGES))
                .sum()
        })
    });
    let dir = std::env::temp_dir().join(format!("ember-bench-{}-faults", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, map) = store_with_pages(&dir, PAGES);
    group.bench_function("fault served from the store (read + verify)", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let source = StorePages {
                        store: store.clone(),
                        map: map.clone(),
                        missing: None,
                    };
                    touch_all(Arc::new(source), PAGES)
                })
                .sum()
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, faults);
criterion_main!(benches);
