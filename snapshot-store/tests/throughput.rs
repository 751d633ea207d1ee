//! `put_pages` on 64 MiB of mixed zero / random / duplicate pages, with the throughput
//! printed (run with `--nocapture`; figures from a debug build are far below release).

mod common;

use std::time::Instant;

use common::{memory, restore, snapshot, Rng};
use ember_snapshot_store::{hash_pages, Store, PAGE_SIZE};

#[test]
fn put_pages_64_mib_mixed() {
    let pages = 16384; // 64 MiB
                       // A third zero, a third unique random, a third copies of 64 "library" pages.
    let mut mem = memory(pages, 3, 5);
    let mut rng = Rng::new(6);
    let library = memory(64, 0, 7);
    for i in (1..pages).step_by(3) {
        let src = (rng.next() as usize % 64) * PAGE_SIZE;
        mem[i * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&library[src..][..PAGE_SIZE]);
    }
    let mib = mem.len() as f64 / (1 << 20) as f64;

    let t = Instant::now();
    let refs = hash_pages(&mem, 2).unwrap();
    let hash_s = t.elapsed().as_secs_f64();
    assert_eq!(refs.len(), pages);

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let t = Instant::now();
    let mut w = store.writer().unwrap();
    let got = w.put_pages(&mem, 2).unwrap();
    let put_s = t.elapsed().as_secs_f64();
    let stats = w.finish().unwrap();
    let total_s = t.elapsed().as_secs_f64();
    assert_eq!(got, refs);
    assert!(stats.objects_written < 5500 + 64, "{stats:?}");
    assert!(stats.zero_pages >= 5461, "{stats:?}");

    // The restore fault path.
    let t = Instant::now();
    let mut buf = [0u8; PAGE_SIZE];
    let mut n = 0;
    for r in &got {
        if let ember_snapshot_store::PageRef::Object(h) = r {
            store.read_page_into(h, &mut buf).unwrap();
            n += 1;
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    // Again, with the pack's pages already mapped.
    let t = Instant::now();
    for r in &got {
        if let ember_snapshot_store::PageRef::Object(h) = r {
            store.read_page_into(h, &mut buf).unwrap();
        }
    }
    let reread_s = t.elapsed().as_secs_f64();
    // The hash check alone, for comparison.
    let t = Instant::now();
    let mut acc = 0u8;
    for page in mem.chunks(PAGE_SIZE).take(n) {
        acc ^= ember_snapshot_store::Hash::of(page).0[0];
    }
    let hash_one_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    std::hint::black_box(acc);

    println!(
        "throughput ({} build): hash_pages {:.0} MiB/s; put_pages {:.0} MiB/s; \
         put_pages+finish(fsync) {:.0} MiB/s; read_page_into {:.2} us/page first touch, {:.2} us/page mapped (BLAKE3 of one page alone: {hash_one_us:.2} us); {stats:?}",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        mib / hash_s,
        mib / put_s,
        mib / total_s,
        read_s * 1e6 / n as f64,
        reread_s * 1e6 / n as f64,
    );

    // Sanity: it restores.
    let _ = snapshot(&store, "big", &mem[..PAGE_SIZE * 4096]);
    assert_eq!(restore(&store, "big"), &mem[..PAGE_SIZE * 4096]);
}
