//! The remote tier against a real S3-compatible server (moto, on loopback).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_s3, RemoteTestServer};
use ember_remote::{RemoteError, RemoteGcOptions, RemoteOptions};
use ember_snapshot_store::{Manifest, MemoryRef, ObjectKind, Store, StoreOptions, PAGE_SIZE};

const PAGES: usize = 256;

fn memory(seed: u64) -> Vec<u8> {
    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 5 == 0 {
            continue;
        }
        for b in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
    }
    mem
}

fn snapshot(store: &Store, id: &str, mem: &[u8]) {
    let mut w = store.writer().unwrap();
    let map = w.put_memory(mem, 2).unwrap();
    let map_chunks = map.store(&mut w).unwrap();
    let state = w.put(ObjectKind::VmState, id.as_bytes()).unwrap();
    let memory = MemoryRef {
        size_bytes: map.size_bytes(),
        page_size: PAGE_SIZE as u32,
        map_chunks,
    };
    w.commit(&Manifest::new(id, state, memory)).unwrap();
}

fn restore(store: &Store, id: &str) -> Vec<u8> {
    let m = store.load_manifest(id).unwrap();
    let map = store.load_memory_map(&m).unwrap();
    let mut out = vec![0u8; map.size_bytes() as usize];
    map.restore_into(store, &mut out).unwrap();
    out
}

fn host(dir: &tempfile::TempDir, name: &str) -> Arc<Store> {
    let options = StoreOptions {
        map_packs: false,
        ..StoreOptions::default()
    };
    Arc::new(Store::open_with(dir.path().join(name), options).unwrap())
}

fn small_packs() -> RemoteOptions {
    RemoteOptions {
        pack_target_bytes: 256 << 10,
        ..RemoteOptions::default()
    }
}

#[test]
fn a_snapshot_pushed_from_one_host_is_fetched_whole_by_another_and_uploaded_once() {
    let s3 = start_s3();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (host(&dir, "a"), host(&dir, "b"), host(&dir, "c"));
    let remote = s3.remote("share", small_packs());
    let mem = memory(1);
    snapshot(&a, "installed", &mem);
    let pushed = remote.push(&a, "installed").unwrap();
    assert!(
        pushed.objects_uploaded as usize >= PAGES * 4 / 5,
        "{pushed:?}"
    );
    assert!(pushed.packs_uploaded > 1, "{pushed:?}");
    // The remote's traffic counters (a service's metrics) saw at least the pushed objects.
    let traffic = remote.traffic();
    assert!(
        traffic.bytes_uploaded >= pushed.bytes_uploaded && traffic.requests > 0,
        "{traffic:?} after {pushed:?}"
    );
    assert!(remote.has_snapshot("installed").unwrap());

    // Host B has nothing: everything comes from the remote, verified, in few downloads.
    let other = s3.remote("share", RemoteOptions::default());
    let fetched = other.fetch(&b, "installed").unwrap();
    assert_eq!(
        fetched.objects_fetched, pushed.objects_uploaded,
        "{fetched:?}"
    );
    assert!(fetched.requests <= pushed.packs_uploaded + 2, "{fetched:?}");
    let traffic = other.traffic();
    assert!(
        traffic.bytes_downloaded >= fetched.bytes_fetched && traffic.bytes_uploaded == 0,
        "{traffic:?} after {fetched:?}"
    );
    assert_eq!(restore(&b, "installed"), mem);

    // Host C made the same install: its push uploads nothing but what differs (its state).
    snapshot(&c, "installed-on-c", &mem);
    let again = other.push(&c, "installed-on-c").unwrap();
    assert_eq!(again.objects_uploaded, 1, "{again:?}");
    // Pushing again is harmless and uploads nothing.
    assert_eq!(remote.push(&a, "installed").unwrap().objects_uploaded, 0);
    assert_eq!(
        remote.list_snapshots().unwrap(),
        vec!["installed".to_string(), "installed-on-c".to_string()]
    );
}

#[test]
fn a_corrupt_remote_object_is_reported_and_never_stored() {
    let s3 = start_s3();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (host(&dir, "a"), host(&dir, "b"));
    let remote = s3.remote("corrupt", small_packs());
    snapshot(&a, "s", &memory(2));
    remote.push(&a, "s").unwrap();
    // Damage one pack in the bucket (its index, and so its name, stay as they were).
    let listing = s3.list("corrupt/packs/");
    let pack = listing
        .split("<Key>")
        .filter_map(|s| s.split("</Key>").next())
        .find(|k| k.ends_with(".pack"))
        .expect("a pack in the bucket")
        .to_string();
    s3.flip_byte(&pack, 5000);
    let err = s3
        .remote("corrupt", RemoteOptions::default())
        .fetch(&b, "s")
        .unwrap_err();
    assert!(matches!(err, RemoteError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(".pack"), "{err}");
    assert!(b.load_manifest("s").is_err());
}

#[test]
fn an_unreachable_remote_fails_within_its_deadline_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = host(&dir, "a");
    snapshot(&a, "s", &memory(3));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let remote = ember_remote::Remote::open(
        "s3://nowhere/x",
        RemoteOptions {
            request_timeout: Duration::from_secs(2),
            s3_settings: vec![
                ("aws_endpoint".into(), format!("http://127.0.0.1:{port}")),
                ("aws_allow_http".into(), "true".into()),
                ("aws_region".into(), "us-east-1".into()),
                ("aws_access_key_id".into(), "x".into()),
                ("aws_secret_access_key".into(), "x".into()),
            ],
            ..RemoteOptions::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    let err = remote.push(&a, "s").unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("s3://nowhere/x"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let err = remote.fetch(&a, "t").unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[test]
fn gc_spares_packs_in_their_grace_period_and_frees_what_no_manifest_names() {
    let s3 = start_s3();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (host(&dir, "a"), host(&dir, "b"));
    let remote = s3.remote("gc", small_packs());
    snapshot(&a, "keep", &memory(4));
    snapshot(&a, "drop", &memory(5));
    remote.push(&a, "keep").unwrap();
    remote.push(&a, "drop").unwrap();
    // "drop" deleted: its packs look exactly like those of a push in flight on another
    // host (uploaded, no manifest yet). Within the grace period they stay.
    remote.delete_snapshot("drop").unwrap();
    let spared = remote.gc(&RemoteGcOptions::default()).unwrap();
    assert_eq!(spared.packs_removed, 0, "{spared:?}");
    assert!(spared.packs_in_grace > 0, "{spared:?}");
    // Past it they go; "keep" still fetches whole.
    let freed = remote
        .gc(&RemoteGcOptions {
            grace: Duration::ZERO,
        })
        .unwrap();
    assert_eq!(freed.packs_removed, spared.packs_in_grace, "{freed:?}");
    assert!(freed.bytes_removed > 0);
    let fresh = s3.remote("gc", RemoteOptions::default());
    fresh.fetch(&b, "keep").unwrap();
    assert_eq!(restore(&b, "keep"), memory(4));
    assert!(matches!(
        fresh.fetch(&b, "drop").unwrap_err(),
        RemoteError::NotFound { .. }
    ));
}

#[test]
fn a_lazy_restore_fetches_its_working_set_first_and_the_rest_by_coalesced_windows() {
    let s3 = start_s3();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (host(&dir, "a"), host(&dir, "b"));
    let remote = s3.remote("lazy", small_packs());
    let mem = memory(6);
    snapshot(&a, "s", &mem);
    let working_set = vec![3u64, 4, 100, 7];
    a.save_working_set("s", &working_set, 2).unwrap();
    remote.push(&a, "s").unwrap();

    let other = Arc::new(s3.remote("lazy", RemoteOptions::default()));
    let lazy = other.prepare_lazy(&b, "s").unwrap();
    assert_eq!(lazy.working_set(), &working_set[..]);
    // Before the guest runs: state, map and the four working-set pages, nothing else.
    let prepared = lazy.report();
    assert!(prepared.objects_fetched <= 7, "{prepared:?}");
    assert!(b.load_manifest("s").is_err(), "not a local snapshot yet");
    // What the lazy snapshot answers for page `i`: its content, or None for a zero page.
    let page = |i: usize| {
        Some(mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec()).filter(|_| !i.is_multiple_of(5))
    };

    // Eight threads ask for pages of one window at once: one download serves them all.
    std::thread::scope(|scope| {
        for i in 0..8 {
            let (lazy, b, page) = (&lazy, &b, &page);
            scope.spawn(move || {
                assert!(lazy.page(b, 11 + i).unwrap() == page(11 + i as usize));
            });
        }
    });
    assert_eq!(lazy.report().requests, prepared.requests + 1);
    for i in 0..PAGES {
        assert!(lazy.page(&b, i as u64).unwrap() == page(i), "page {i}");
    }
    let on_demand = lazy.report();
    // One download per window of a pack (small packs here: one window each).
    assert!(
        on_demand.requests - prepared.requests <= (PAGES * PAGE_SIZE / (256 << 10)) as u64 + 2,
        "{on_demand:?}"
    );

    // Completing it makes it a local snapshot, whole, with nothing downloaded twice.
    let rest = lazy.complete(&b).unwrap();
    assert_eq!(rest.objects_fetched, 0, "{rest:?}");
    assert_eq!(restore(&b, "s"), mem);
    drop(lazy);
    // A third host completes one without a single page asked for: the same windows, all.
    let c = host(&dir, "c");
    let bulk = other.prepare_lazy(&c, "s").unwrap();
    let done = bulk.complete(&c).unwrap();
    assert!(
        done.requests <= on_demand.requests - prepared.requests,
        "{done:?}"
    );
    assert_eq!(restore(&c, "s"), mem);
    assert_eq!(
        c.load_working_set("s").unwrap().map(|w| w.pages),
        Some(working_set.clone()),
        "the remote's working set is kept with it"
    );
    drop(bulk);
    // The working set was pushed with it, and goes with its manifest.
    other.delete_snapshot("s").unwrap();
    assert!(other.working_set("s").unwrap().is_none());
}

#[test]
fn a_lazy_restore_never_serves_a_corrupt_page_and_says_which_object() {
    let s3 = start_s3();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (host(&dir, "a"), host(&dir, "b"));
    let remote = s3.remote("lazy-bad", small_packs());
    let mem = memory(7);
    snapshot(&a, "s", &mem);
    remote.push(&a, "s").unwrap();
    let listing = s3.list("lazy-bad/packs/");
    let packs: Vec<String> = listing
        .split("<Key>")
        .filter_map(|s| s.split("</Key>").next())
        .filter(|k| k.ends_with(".pack"))
        .map(str::to_string)
        .collect();
    for pack in &packs {
        s3.flip_byte(pack, 5000);
    }
    let other = Arc::new(s3.remote("lazy-bad", RemoteOptions::default()));
    // Damage the state or a map and the preparation fails; damage pages and those fail.
    match other.prepare_lazy(&b, "s") {
        Err(err) => assert!(matches!(err, RemoteError::Corrupt { .. }), "{err}"),
        Ok(lazy) => {
            let failures: Vec<RemoteError> = (0..PAGES as u64)
                .filter_map(|i| lazy.page(&b, i).err())
                .collect();
            assert!(!failures.is_empty());
            for err in &failures {
                assert!(matches!(err, RemoteError::Corrupt { .. }), "{err}");
                assert!(err.to_string().contains(".pack"), "{err}");
            }
            assert!(lazy.complete(&b).is_err());
        }
    }
    assert!(b.load_manifest("s").is_err());
}
