//! The snapshot store's hot paths, each beside the bound that limits it on this machine:
//! hashing pages (BLAKE3) and writing them into a store against a plain memory copy of the
//! same bytes; reading a page back with its hash checked (the restore fault path) against a
//! 4 KiB copy; saving and loading a 256 MiB guest's memory map; opening a store for a
//! restore in a store of one snapshot against one of 25 (it should not grow with the store);
//! ingesting a staged snapshot against writing the same pages.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;

use ember_snapshot_store::{
    hash_pages, IngestLimits, Manifest, MemoryMap, MemoryRef, ObjectKind, PageRef, Store,
    StoreOptions, PAGE_SIZE,
};

/// `count` distinct pages (no two equal, none zero).
fn distinct_pages(count: usize) -> Vec<u8> {
    distinct_pages_seeded(count, 0x9e37_79b9_7f4a_7c15)
}

/// `count` distinct pages from `seed` (different seeds: different pages).
fn distinct_pages_seeded(count: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; count * PAGE_SIZE];
    let mut x: u64 = seed | 1;
    for word in data.chunks_exact_mut(8) {
        // xorshift: cheap, and every page differs.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    data
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ember-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hashing(c: &mut Criterion) {
    const PAGES: usize = 4096;
    let data = distinct_pages(PAGES);
    let mut group = c.benchmark_group("pages_16MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(20);
    let mut copy = vec![0u8; data.len()];
    group.bench_function("memcpy (bound)", |b| {
        b.iter(|| copy.copy_from_slice(std::hint::black_box(&data)))
    });
    group.bench_function("blake3 hash, 1 thread", |b| {
        b.iter(|| hash_pages(std::hint::black_box(&data), 1).unwrap())
    });
    group.bench_function("blake3 hash, 2 threads", |b| {
        b.iter(|| hash_pages(std::hint::black_box(&data), 2).unwrap())
    });
    group.bench_function("store put (new store, sealed pack, fsync)", |b| {
        b.iter_batched(
            || TempDir::new("put"),
            |dir| {
                let store = Store::open(&dir.0).unwrap();
                let mut writer = store.writer().unwrap();
                writer.put_pages(&data, 2).unwrap();
                writer.finish().unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });
    // What a jailed VMM's snapshot costs the service on top: the staged pages read back,
    // verified on every core and written into the shared store (all new here: a booted
    // sandbox's first snapshot).
    group.bench_function(
        "ingest of a staged snapshot (read, verify, copy, fsync)",
        |b| {
            let limits = IngestLimits {
                memory_bytes: (PAGES * PAGE_SIZE) as u64,
                max_disks: 0,
                max_disk_bytes: 0,
                max_staged_bytes: 64 << 20,
            };
            b.iter_batched(
                || {
                    let dir = TempDir::new("ingest");
                    let shared = Arc::new(Store::open(dir.0.join("shared")).unwrap());
                    let staged = dir.0.join("staged");
                    let staging =
                        Store::open_staging(&staged, shared.clone(), StoreOptions::default())
                            .unwrap();
                    save_snapshot(&staging, "s", PAGES, 0x9e37_79b9_7f4a_7c15);
                    (dir, shared, staged)
                },
                |(dir, shared, staged)| {
                    shared.ingest(&staged, "s", &limits).unwrap();
                    dir
                },
                BatchSize::PerIteration,
            )
        },
    );
    group.finish();
}

fn reading(c: &mut Criterion) {
    const PAGES: usize = 4096;
    let data = distinct_pages(PAGES);
    let dir = TempDir::new("read");
    let store = Store::open(&dir.0).unwrap();
    let mut writer = store.writer().unwrap();
    let refs = writer.put_pages(&data, 2).unwrap();
    writer.finish().unwrap();
    store.refresh().unwrap();
    let hashes: Vec<_> = refs
        .iter()
        .filter_map(|r| match r {
            PageRef::Object(h) => Some(*h),
            PageRef::Zero => None,
        })
        .collect();
    // A scattered order, as faults come.
    let order: Vec<usize> = (0..hashes.len())
        .map(|i| (i * 2654435761) % hashes.len())
        .collect();

    let mut group = c.benchmark_group("page_4KiB");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let mut buf = [0u8; PAGE_SIZE];
    let mut next = 0usize;
    group.bench_function("copy from memory (bound)", |b| {
        b.iter(|| {
            next = (next + 1) % order.len();
            let at = order[next] * PAGE_SIZE;
            buf.copy_from_slice(&data[at..at + PAGE_SIZE]);
            std::hint::black_box(&buf);
        })
    });
    group.bench_function("store read + verify (restore fault path)", |b| {
        b.iter(|| {
            next = (next + 1) % order.len();
            store
                .read_page_into(&hashes[order[next]], &mut buf)
                .unwrap();
            std::hint::black_box(&buf);
        })
    });
    group.finish();
}

fn memory_maps(c: &mut Criterion) {
    // A 256 MiB guest: 65536 pages, a quarter of them stored objects, the rest zero.
    let data = distinct_pages(16384);
    let dir = TempDir::new("maps");
    let store = Store::open(&dir.0).unwrap();
    let mut writer = store.writer().unwrap();
    let mut pages = writer.put_pages(&data, 2).unwrap();
    pages.resize(65536, PageRef::Zero);
    let map = MemoryMap::new(pages);
    let chunks = map.store(&mut writer).unwrap();
    writer.finish().unwrap();
    store.refresh().unwrap();

    let mut group = c.benchmark_group("memory_map_256MiB");
    group.sample_size(20);
    group.bench_function("save (new store)", |b| {
        b.iter_batched(
            || TempDir::new("map-save"),
            |dir| {
                let store = Store::open(&dir.0).unwrap();
                let mut writer = store.writer().unwrap();
                map.store(&mut writer).unwrap();
                writer.finish().unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("load + verify", |b| {
        b.iter(|| MemoryMap::load(&store, &chunks).unwrap())
    });
    group.finish();
}

/// Saves a snapshot of `pages` distinct pages from `seed` as `id` (one writer: its own pack).
fn save_snapshot(store: &Store, id: &str, pages: usize, seed: u64) {
    let mut writer = store.writer().unwrap();
    let refs = writer
        .put_pages(&distinct_pages_seeded(pages, seed), 2)
        .unwrap();
    let map = MemoryMap::new(refs);
    let map_chunks = map.store(&mut writer).unwrap();
    let state = writer.put(ObjectKind::VmState, id.as_bytes()).unwrap();
    let memory = MemoryRef {
        size_bytes: map.size_bytes(),
        page_size: PAGE_SIZE as u32,
        map_chunks,
    };
    writer.commit(&Manifest::new(id, state, memory)).unwrap();
}

fn opening_for_restore(c: &mut Criterion) {
    const PAGES: usize = 512;
    let mut group = c.benchmark_group("open_store_for_restore");
    group.sample_size(20);
    for snapshots in [1u64, 25] {
        let dir = TempDir::new(&format!("open-{snapshots}"));
        {
            let store = Store::open(&dir.0).unwrap();
            for i in 0..snapshots {
                save_snapshot(&store, &format!("snap-{i}"), PAGES, 0x1000 + i);
            }
        }
        group.bench_function(
            format!("index the whole store ({snapshots} snapshots)"),
            |b| {
                b.iter(|| {
                    let store = Store::open(&dir.0).unwrap();
                    let m = store.load_manifest("snap-0").unwrap();
                    std::hint::black_box((store, m))
                })
            },
        );
        group.bench_function(
            format!("index the snapshot's packs ({snapshots} snapshots)"),
            |b| {
                b.iter(|| {
                    let store = Store::open_unindexed(&dir.0, StoreOptions::default()).unwrap();
                    let m = store.load_manifest("snap-0").unwrap();
                    store.index_snapshot(&m).unwrap();
                    std::hint::black_box((store, m))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, hashing, reading, memory_maps, opening_for_restore);
criterion_main!(benches);
