//! Integration tests of the snapshot store on real files in temporary directories.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::{flip_byte, manifest_for, memory, restore, snapshot, some_page, Rng};
use ember_snapshot_store::{
    validate_id, DiskMap, DiskRef, Hash, Manifest, ManifestError, MemoryMap, MemoryRef, ObjectKind,
    PageRef, ProblemKind, SnapshotIndexing, Store, StoreError, StoreOptions, MAX_OBJECT_SIZE,
    PAGE_SIZE,
};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn objects_and_pages_round_trip() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    let blob = b"hello ember".to_vec();
    let h = w.put(ObjectKind::Blob, &blob).unwrap();
    assert_eq!(h, Hash::of(&blob));
    let empty = w.put(ObjectKind::Blob, &[]).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    Rng::new(1).fill(&mut page);
    let p = w.put_page(&page).unwrap();
    assert_eq!(p, PageRef::Object(Hash::of(&page)));
    // Not readable before sealing.
    assert!(matches!(store.read(&h), Err(StoreError::NotFound(x)) if x == h));
    let stats = w.finish().unwrap();
    assert_eq!(stats.objects_written, 3);
    assert_eq!(stats.packs_sealed, 1);

    assert_eq!(store.read(&h).unwrap(), blob);
    assert_eq!(store.read(&empty).unwrap(), Vec::<u8>::new());
    let PageRef::Object(ph) = p else { panic!() };
    let mut out = [0u8; PAGE_SIZE];
    store.read_page_into(&ph, &mut out).unwrap();
    assert_eq!(out, page);
    assert_eq!(store.read(&ph).unwrap(), page.to_vec());
    // A non-page object through the page path is refused.
    let e = store.read_page_into(&h, &mut out).unwrap_err();
    assert!(matches!(e, StoreError::NotAPage { len: 11, .. }), "{e}");
    let missing = Hash::of(b"never stored");
    let e = store.read(&missing).unwrap_err();
    assert!(e.to_string().contains(&missing.to_string()), "{e}");

    // A fresh instance sees the same.
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(again.read(&h).unwrap(), blob);
    assert!(again.verify().unwrap().is_clean());
}

#[test]
fn compression_round_trip_and_raw_fallback() {
    let dir = tmp();
    let opts = StoreOptions {
        compress_level: Some(3),
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    let mut w = store.writer().unwrap();
    let text: Vec<u8> = b"ember snapshot "
        .iter()
        .cycle()
        .take(100_000)
        .copied()
        .collect();
    let mut noise = vec![0u8; 50_000];
    Rng::new(7).fill(&mut noise);
    let th = w.put(ObjectKind::DiskChunk, &text).unwrap();
    let nh = w.put(ObjectKind::DiskChunk, &noise).unwrap();
    // Pages stay raw by default even when compressible.
    let page = [0x5a_u8; PAGE_SIZE];
    let PageRef::Object(ph) = w.put_page(&page).unwrap() else {
        panic!()
    };
    w.finish().unwrap();

    let t = store.locate(&th).unwrap();
    assert!(
        t.compressed && (t.stored_len as usize) < text.len() / 10,
        "{t:?}"
    );
    assert!(!store.locate(&nh).unwrap().compressed);
    assert!(!store.locate(&ph).unwrap().compressed);
    assert_eq!(store.locate(&ph).unwrap().kind, ObjectKind::Page);
    assert_eq!(store.read(&th).unwrap(), text);
    assert_eq!(store.read(&nh).unwrap(), noise);

    // With compress_pages, a compressible page is stored compressed and still reads back.
    let opts = StoreOptions {
        compress_level: Some(1),
        compress_pages: true,
        ..StoreOptions::default()
    };
    let store2 = Store::open_with(dir.path(), opts).unwrap();
    let mut w = store2.writer().unwrap();
    let page2 = [0x33_u8; PAGE_SIZE];
    let PageRef::Object(ph2) = w.put_page(&page2).unwrap() else {
        panic!()
    };
    w.finish().unwrap();
    assert!(store2.locate(&ph2).unwrap().compressed);
    let mut out = [0u8; PAGE_SIZE];
    store2.read_page_into(&ph2, &mut out).unwrap();
    assert_eq!(out, page2);
    assert!(store2.verify().unwrap().is_clean());
}

#[test]
fn object_bound_enforced() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    let big = vec![1u8; MAX_OBJECT_SIZE + 1];
    let e = w.put(ObjectKind::Blob, &big).unwrap_err();
    assert!(matches!(e, StoreError::ObjectTooLarge { .. }), "{e}");
    assert!(
        e.to_string().contains(&(MAX_OBJECT_SIZE + 1).to_string()),
        "{e}"
    );
    let e = w.put_pages(&[0u8; 100], 1).unwrap_err();
    assert!(matches!(e, StoreError::Unaligned { len: 100 }), "{e}");
}

#[test]
fn zero_pages_are_not_stored() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(256, 2, 3); // half the pages zero
    let mut w = store.writer().unwrap();
    let refs = w.put_pages(&mem, 2).unwrap();
    assert_eq!(w.put_page(&[0; PAGE_SIZE]).unwrap(), PageRef::Zero);
    let stats = w.finish().unwrap();
    assert_eq!(refs.iter().filter(|r| **r == PageRef::Zero).count(), 128);
    assert_eq!(stats.zero_pages, 129);
    assert_eq!(stats.objects_written, 128);
    assert_eq!(store.object_count(), 128);
}

#[test]
fn dedup_within_and_across_writers() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    let mut page = [0u8; PAGE_SIZE];
    Rng::new(9).fill(&mut page);
    // The same page 10 times within one region, and again with put_page.
    let region: Vec<u8> = page.iter().copied().cycle().take(10 * PAGE_SIZE).collect();
    w.put_pages(&region, 2).unwrap();
    w.put_page(&page).unwrap();
    w.put(ObjectKind::Blob, b"x").unwrap();
    w.put(ObjectKind::Blob, b"x").unwrap();
    let s = w.finish().unwrap();
    // 9 repeats in the region, the put_page, the second blob.
    assert_eq!((s.objects_written, s.objects_deduplicated), (2, 11));

    // A second writer (after the first sealed) writes nothing new.
    let mut w = store.writer().unwrap();
    w.put_page(&page).unwrap();
    w.put(ObjectKind::Page, &page).unwrap();
    let s = w.finish().unwrap();
    assert_eq!(
        (s.objects_written, s.objects_deduplicated, s.packs_sealed),
        (0, 2, 0)
    );
    // No empty pack left behind.
    let packs = fs::read_dir(dir.path().join("packs")).unwrap().count();
    assert_eq!(packs, 2, "one .pack and one .idx");
}

#[test]
fn similar_snapshots_store_only_the_difference() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let pages = 4096; // 16 MiB
    let mem1 = memory(pages, 4, 11);
    let mut mem2 = mem1.clone();
    // Change 5 % of the pages.
    let mut rng = Rng::new(12);
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < pages / 20 {
        let i = (rng.next() as usize) % pages;
        if changed.insert(i) {
            rng.fill(&mut mem2[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
    }
    snapshot(&store, "one", &mem1);
    let before = store.stats().unwrap();
    let mut w = store.writer().unwrap();
    let map = w.put_memory(&mem2, 2).unwrap();
    let m = manifest_for(&mut w, "two", &map);
    let s = w.commit(&m).unwrap();
    let after = store.stats().unwrap();
    let changed_pages = changed.len() as u64;
    // New pages, plus the few map chunks and the state blob that changed.
    assert_eq!(s.objects_written, changed_pages + 2 + 1, "{s:?}");
    let grew = after.stored_bytes - before.stored_bytes;
    assert!(
        grew < (changed_pages + 8) * (PAGE_SIZE as u64 + 100) + 200_000,
        "store grew by {grew} bytes for {changed_pages} changed pages"
    );
    assert_eq!(after.manifests, 2);
    assert_eq!(after.logical_bytes, 2 * (pages * PAGE_SIZE) as u64);
    assert!(after.dedup_ratio > 2.0, "{after:?}");
    assert_eq!(
        after.zero_pages,
        2 * (pages as u64 / 4) - count_zeroed(&mem2, &mem1)
    );
    assert_eq!(restore(&store, "one"), mem1);
    assert_eq!(restore(&store, "two"), mem2);
}

/// Pages that were zero in `old` and are no longer zero in `new`.
fn count_zeroed(new: &[u8], old: &[u8]) -> u64 {
    new.chunks(PAGE_SIZE)
        .zip(old.chunks(PAGE_SIZE))
        .filter(|(n, o)| o.iter().all(|&b| b == 0) && n.iter().any(|&b| b != 0))
        .count() as u64
}

#[test]
fn diff_snapshot_with_updates() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(3000, 3, 21);
    let base = snapshot(&store, "base", &mem);
    let parent = store.load_memory_map(&base).unwrap();

    // The "VMM" dirtied pages 5, 2048 and 2999 and zeroed page 1.
    let mut expected = mem.clone();
    let mut w = store.writer().unwrap();
    let mut updates = Vec::new();
    for (i, seed) in [(5u64, 1u64), (2048, 2), (2999, 3)] {
        let mut page = [0u8; PAGE_SIZE];
        Rng::new(100 + seed).fill(&mut page);
        expected[i as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page);
        updates.push((i, w.put_page(&page).unwrap()));
    }
    expected[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
    updates.push((1, PageRef::Zero));
    let map = MemoryMap::with_updates(&parent, updates).unwrap();
    let mut m = manifest_for(&mut w, "diff", &map);
    m.parent = Some("base".into());
    let s = w.commit(&m).unwrap();
    // 3 pages, the 2 map chunks that changed (of 2), the state.
    assert_eq!(s.objects_written, 3 + 2 + 1, "{s:?}");
    assert_eq!(restore(&store, "diff"), expected);
    assert_eq!(restore(&store, "base"), mem);
    assert!(MemoryMap::with_updates(&parent, [(3000, PageRef::Zero)]).is_err());
}

#[test]
fn manifest_round_trip_list_delete() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(10, 2, 5);
    let mut w = store.writer().unwrap();
    let map = w.put_memory(&mem, 1).unwrap();
    let disk_img: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
    let disk = w
        .put_disk(&mut disk_img.as_slice(), disk_img.len() as u64, 65536)
        .unwrap();
    let mut m = manifest_for(&mut w, "snap-a", &map);
    m.name = Some("with a disk".into());
    m.metadata = BTreeMap::from([("image".into(), "python".into())]);
    m.disks.push(DiskRef {
        name: "rootfs".into(),
        size: disk.size,
        chunk_size: disk.chunk_size,
        map_chunks: disk.store(&mut w).unwrap(),
    });
    w.commit(&m).unwrap();

    let saved = store.load_manifest("snap-a").unwrap();
    assert!(
        !saved.packs.is_empty(),
        "the saved manifest lists its packs"
    );
    assert_eq!(
        Manifest {
            packs: Vec::new(),
            ..saved
        },
        m
    );
    assert_eq!(store.list_manifests().unwrap(), vec!["snap-a".to_string()]);
    let e = store.save_manifest(&m).unwrap_err();
    assert!(
        matches!(e, StoreError::Manifest(ManifestError::Exists { .. })),
        "{e}"
    );

    let loaded = store.load_disk_map(&m.disks[0]).unwrap();
    assert_eq!(loaded, disk);
    let out = tempfile::tempfile().unwrap();
    loaded.write_to(&store, &out).unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut &out, &mut back).unwrap();
    assert_eq!(back, disk_img);

    store.delete_manifest("snap-a").unwrap();
    assert!(store.list_manifests().unwrap().is_empty());
    let e = store.load_manifest("snap-a").unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    let e = store.delete_manifest("snap-a").unwrap_err();
    assert!(e.to_string().contains("snap-a"), "{e}");
}

#[test]
fn disk_with_zero_chunks_and_short_image() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut img = vec![0u8; 10 * 4096 + 100];
    img[4096 * 3] = 1;
    img[10 * 4096 + 99] = 2;
    let mut w = store.writer().unwrap();
    let d = w
        .put_disk(&mut img.as_slice(), img.len() as u64, 4096)
        .unwrap();
    assert_eq!(d.chunks.len(), 11);
    assert_eq!(d.chunks.iter().filter(|c| c.is_some()).count(), 2);
    assert_eq!(w.stats().zero_chunks, 9);
    let e = w
        .put_disk(&mut &img[..5000], img.len() as u64, 4096)
        .unwrap_err();
    assert!(matches!(e, StoreError::ShortImage { got: 5000, .. }), "{e}");
    let e = w.put_disk(&mut img.as_slice(), 10, 0).unwrap_err();
    assert!(e.to_string().contains("chunk size 0"), "{e}");
    let chunks = d.store(&mut w).unwrap();
    w.finish().unwrap();
    let back = DiskMap::load(&store, d.size, d.chunk_size, &chunks).unwrap();
    let f = tempfile::tempfile().unwrap();
    back.write_to(&store, &f).unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut out).unwrap();
    assert_eq!(out, img);
    // The wrong geometry is caught.
    assert!(DiskMap::load(&store, d.size * 3, d.chunk_size, &chunks).is_err());
}

#[test]
fn manifest_with_missing_objects_is_refused() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    let map = MemoryMap::new(vec![PageRef::Object(Hash::of(b"not a stored page"))]);
    let m = manifest_for(&mut w, "bad", &map);
    // Objects of an unsealed pack do not count.
    let e = store.save_manifest(&m).unwrap_err();
    assert!(matches!(e, StoreError::MissingReference { .. }), "{e}");
    w.finish().unwrap();
    let e = store.save_manifest(&m).unwrap_err();
    match &e {
        StoreError::MissingReference {
            manifest,
            what,
            hash,
        } => {
            assert_eq!(manifest, "bad");
            assert_eq!(*what, "memory page");
            assert_eq!(*hash, Hash::of(b"not a stored page"));
        }
        other => panic!("{other}"),
    }
    assert!(store.list_manifests().unwrap().is_empty());
    // A manifest whose "map chunk" is some other object is rejected too.
    let mut w = store.writer().unwrap();
    let blob = w.put(ObjectKind::Blob, b"not a map").unwrap();
    w.finish().unwrap();
    let m2 = Manifest::new(
        "bad2",
        blob,
        MemoryRef {
            size_bytes: 4096,
            page_size: 4096,
            map_chunks: vec![blob],
        },
    );
    let e = store.save_manifest(&m2).unwrap_err();
    assert!(e.to_string().contains("map chunk"), "{e}");
    let mut m3 = m2.clone();
    m3.memory.size_bytes = 5000;
    let e = store.save_manifest(&m3).unwrap_err();
    assert!(e.to_string().contains("5000"), "{e}");
}

#[test]
fn corrupt_pack_byte_is_detected() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(64, 0, 31);
    let m = snapshot(&store, "s", &mem);
    let map = store.load_memory_map(&m).unwrap();
    let victim = some_page(&map);
    let loc = store.locate(&victim).unwrap();
    flip_byte(&loc.pack, loc.offset + 100);

    // A store that maps the pack after the flip (the same holds for the open one, whose
    // mapping is shared with the page cache).
    let store = Store::open(dir.path()).unwrap();
    let e = store.read(&victim).unwrap_err();
    match &e {
        StoreError::Corrupt { hash, pack, .. } => {
            assert_eq!(*hash, victim);
            assert_eq!(*pack, loc.pack);
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(&victim.to_string()), "{e}");
    let mut buf = [1u8; PAGE_SIZE];
    let e = store.read_page_into(&victim, &mut buf).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { hash, .. } if hash == victim),
        "{e}"
    );
    assert_eq!(buf, [0u8; PAGE_SIZE], "buffer cleared on error");

    let report = store.verify().unwrap();
    assert!(!report.is_clean());
    let corrupt: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::CorruptObject)
        .collect();
    assert_eq!(corrupt.len(), 1, "{:?}", report.problems);
    assert_eq!(corrupt[0].hash, Some(victim));
    assert_eq!(corrupt[0].pack.as_deref(), Some(loc.pack.as_path()));
    // The snapshot that uses it is reported too.
    assert!(report
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::MissingObject
            && p.manifest.as_deref() == Some("s")
            && p.hash == Some(victim)));
    // Every other page still reads.
    for p in map.pages.iter().filter_map(|p| match p {
        PageRef::Object(h) if *h != victim => Some(h),
        _ => None,
    }) {
        store.read_page_into(p, &mut buf).unwrap();
    }
}

#[test]
fn corrupt_record_header_is_detected_by_verify() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    let h = w.put(ObjectKind::Blob, b"some object").unwrap();
    w.finish().unwrap();
    let loc = store.locate(&h).unwrap();
    flip_byte(&loc.pack, loc.offset - 2); // inside the record header
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].detail.contains("record header"));
    assert_eq!(report.problems[0].hash, Some(h));
}

#[test]
fn bad_idx_files_are_rejected_naming_the_file() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let good = snapshot(&store, "good", &memory(8, 0, 41));
    let mut w = store.writer().unwrap();
    let h = w
        .put(ObjectKind::Blob, b"in the pack whose index breaks")
        .unwrap();
    w.finish().unwrap();
    let idx = store.locate(&h).unwrap().pack.with_extension("idx");
    let original = fs::read(&idx).unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            original[..original.len() - 10].to_vec(),
            "bytes long",
        ),
        (
            "garbage",
            b"this is not an index at all, just some text.".repeat(3),
            "bad magic",
        ),
        ("empty", Vec::new(), "bytes long"),
        (
            "bad checksum",
            {
                let mut b = original.clone();
                let n = b.len();
                b[n - 40] ^= 1;
                b
            },
            "checksum",
        ),
        (
            "bad version",
            {
                let mut b = original.clone();
                b[8] = 2;
                b
            },
            "version 2",
        ),
    ];
    for (what, bytes, needle) in cases {
        fs::write(&idx, &bytes).unwrap();
        let fresh = Store::open(dir.path()).unwrap();
        let report = fresh.refresh().unwrap();
        assert_eq!(report.rejected.len(), 1, "{what}");
        let msg = report.rejected[0].to_string();
        assert!(msg.contains(&idx.display().to_string()), "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
        // The object is simply not there; other packs are unaffected.
        assert!(matches!(fresh.read(&h), Err(StoreError::NotFound(_))));
        assert_eq!(restore(&fresh, "good").len(), 8 * PAGE_SIZE);
        let v = fresh.verify().unwrap();
        assert!(v
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::UnreadablePack
                && p.detail.contains(&idx.display().to_string())));
        // GC leaves an unreadable pack alone.
        let g = fresh.gc().unwrap();
        assert_eq!(g.packs_unreadable.len(), 1, "{what}");
        assert!(idx.exists());
    }
    fs::write(&idx, &original).unwrap();
    let fresh = Store::open(dir.path()).unwrap();
    assert!(fresh.contains(&h));
    let _ = good;

    // A pack shorter than its index says is rejected too.
    let pack = idx.with_extension("pack");
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let report = Store::open(dir.path()).unwrap().refresh().unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0]
        .to_string()
        .contains(&pack.display().to_string()));
}

#[test]
fn bad_manifest_files_are_rejected_naming_the_file() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    snapshot(&store, "m", &memory(4, 0, 51));
    let path = dir.path().join("manifests/m");
    let original = fs::read(&path).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (original[..original.len() / 2].to_vec(), "checksum mismatch"),
        (Vec::new(), "no checksum line"),
        (b"garbage\n{}".to_vec(), "not a BLAKE3"),
        (vec![b'x'; 17 << 20], "bound"),
        (
            {
                let mut b = original.clone();
                let n = b.len();
                b[n - 5] ^= 1;
                b
            },
            "checksum mismatch",
        ),
    ];
    for (bytes, needle) in cases {
        fs::write(&path, &bytes).unwrap();
        let e = store.load_manifest("m").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(needle), "{msg}");
        let v = store.verify().unwrap();
        assert!(v
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::BadManifest));
    }
    // A corrupt manifest can never be restored: GC moves it aside, reports it and goes on
    // (it would otherwise stop every later GC), and the snapshot is no longer listed.
    fs::write(&path, &original[..original.len() / 2]).unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.manifests_quarantined, ["m"]);
    assert!(!path.exists());
    assert!(dir.path().join("quarantine/m").exists());
    assert!(!store.list_manifests().unwrap().contains(&"m".to_string()));
    assert!(store.gc().unwrap().manifests_quarantined.is_empty());
}

#[test]
fn hostile_snapshot_ids_are_rejected() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    for id in [
        "../escape",
        "/etc/passwd",
        "..",
        ".",
        ".hidden",
        "a/b",
        "",
        "x\0y",
        "sp ace",
    ] {
        assert!(validate_id(id).is_err());
        let e = store.load_manifest(id).unwrap_err();
        assert!(
            matches!(e, StoreError::Manifest(ManifestError::InvalidId { .. })),
            "{id:?}: {e}"
        );
        assert!(store.delete_manifest(id).is_err());
        let m = Manifest::new(
            id,
            Hash::of(b""),
            MemoryRef {
                size_bytes: 0,
                page_size: 4096,
                map_chunks: vec![],
            },
        );
        let e = store.save_manifest(&m).unwrap_err();
        assert!(e.to_string().contains("invalid snapshot id"), "{e}");
    }
    // Stray files in manifests/ that are not valid ids are not listed.
    fs::write(dir.path().join("manifests/.x.tmp"), b"").unwrap();
    assert!(store.list_manifests().unwrap().is_empty());
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}

#[test]
fn writer_dropped_without_finish_leaves_store_intact() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(100, 3, 61);
    snapshot(&store, "kept", &mem);
    let packs_before = fs::read_dir(dir.path().join("packs")).unwrap().count();
    {
        let mut w = store.writer().unwrap();
        w.put_pages(&memory(600, 0, 62), 2).unwrap();
        // Dropped: an error path in the VMM.
    }
    assert_eq!(
        fs::read_dir(dir.path().join("packs")).unwrap().count(),
        packs_before,
        "the unsealed pack is removed"
    );
    assert_eq!(restore(&store, "kept"), mem);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn gc_removes_garbage_and_keeps_live_objects() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let keep = memory(300, 5, 71);
    let drop_ = memory(300, 5, 72);
    snapshot(&store, "keep", &keep);
    snapshot(&store, "drop", &drop_);
    // Objects never referenced by any manifest.
    let mut w = store.writer().unwrap();
    let loose = w.put(ObjectKind::Blob, b"loose object").unwrap();
    w.finish().unwrap();
    // A pack that is mostly dead: a few live pages and many dead ones.
    let mixed = {
        let mut mem = memory(200, 0, 73);
        mem[..PAGE_SIZE * 2].copy_from_slice(&memory(2, 0, 74));
        mem
    };
    let mut w = store.writer().unwrap();
    w.put_pages(&mixed, 2).unwrap();
    w.finish().unwrap();
    let small = memory(2, 0, 74); // its pages live in the mixed pack only
    snapshot(&store, "small", &small);
    let small_page = Hash::of(&small[..PAGE_SIZE]);
    let mixed_pack = store.locate(&small_page).unwrap().pack;
    let drop_page = Hash::of(&drop_[PAGE_SIZE..2 * PAGE_SIZE]);
    let before = store.stats().unwrap();
    store.delete_manifest("drop").unwrap();

    let report = store.gc().unwrap();
    assert_eq!(report.manifests, 2);
    assert!(report.packs_deleted >= 2, "{report:?}"); // "drop" and the loose object's pack
    assert_eq!(report.packs_rewritten, 1, "{report:?}");
    assert_eq!(report.objects_copied, 2, "{report:?}");
    assert!(!mixed_pack.exists());
    assert!(!store.contains(&loose));
    assert!(!store.contains(&drop_page));
    assert!(store.contains(&small_page));
    assert_ne!(store.locate(&small_page).unwrap().pack, mixed_pack);
    assert_eq!(restore(&store, "keep"), keep);
    assert_eq!(restore(&store, "small"), small);
    let after = store.stats().unwrap();
    assert!(
        after.stored_bytes < before.stored_bytes / 2,
        "{before:?} {after:?}"
    );
    assert!(store.verify().unwrap().is_clean());
    // Another instance agrees after a refresh.
    let other = Store::open(dir.path()).unwrap();
    assert_eq!(restore(&other, "small"), small);
    // A second GC finds nothing to do.
    let again = store.gc().unwrap();
    assert_eq!(
        (again.packs_deleted, again.packs_rewritten),
        (0, 0),
        "{again:?}"
    );
}

#[test]
fn reader_keeps_working_across_gc_in_another_instance() {
    let dir = tmp();
    let reader = Store::open(dir.path()).unwrap();
    let gcer = Store::open(dir.path()).unwrap();
    let mem = memory(50, 0, 81);
    let m = snapshot(&gcer, "gone", &mem);
    reader.refresh().unwrap();
    let map = reader.load_memory_map(&m).unwrap();
    gcer.delete_manifest("gone").unwrap();
    gcer.gc().unwrap();
    // The reader's mapping of the unlinked pack stays valid until it refreshes.
    let mut out = vec![0u8; mem.len()];
    map.restore_into(&reader, &mut out).unwrap();
    assert_eq!(out, mem);
    let r = reader.refresh().unwrap();
    assert_eq!(r.removed, 1);
    assert!(matches!(
        reader.read(&some_page(&map)),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn refresh_sees_packs_sealed_by_another_instance() {
    let dir = tmp();
    let a = Store::open(dir.path()).unwrap();
    let b = Store::open(dir.path()).unwrap();
    let mut w = a.writer().unwrap();
    let h = w.put(ObjectKind::Blob, b"from a").unwrap();
    w.finish().unwrap();
    assert!(!b.contains(&h));
    let r = b.refresh().unwrap();
    assert_eq!((r.added, r.removed), (1, 0));
    assert_eq!(b.read(&h).unwrap(), b"from a");
    // A writer refreshes on start, so it dedupes against the other instance's pack.
    let mut w = b.writer().unwrap();
    w.put(ObjectKind::Blob, b"from a").unwrap();
    assert_eq!(w.finish().unwrap().objects_written, 0);
}

#[test]
fn concurrent_writers_from_threads() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let shared = memory(500, 4, 91); // every thread stores these pages too
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let store = &store;
            let shared = &shared;
            s.spawn(move || {
                for round in 0..3u64 {
                    let mut mem = shared.clone();
                    mem.extend(memory(100, 0, 1000 + t * 10 + round));
                    snapshot(store, &format!("t{t}-r{round}"), &mem);
                }
            });
        }
    });
    assert_eq!(store.list_manifests().unwrap().len(), 12);
    for t in 0..4u64 {
        for round in 0..3u64 {
            let mut mem = shared.clone();
            mem.extend(memory(100, 0, 1000 + t * 10 + round));
            assert_eq!(restore(&store, &format!("t{t}-r{round}")), mem);
        }
    }
    let v = store.verify().unwrap();
    assert!(v.is_clean(), "{:?}", v.problems);
    // The shared pages were stored at most once per concurrent writer, not once per round.
    let stats = store.stats().unwrap();
    assert!(stats.unique_objects < 375 + 1200 + 100, "{stats:?}");
    let g = store.gc().unwrap();
    assert!(store.verify().unwrap().is_clean(), "{g:?}");
}

#[test]
fn packs_roll_over_at_the_target_size() {
    let dir = tmp();
    let opts = StoreOptions {
        pack_target_size: 256 * 1024,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path(), opts).unwrap();
    let mem = memory(400, 0, 95); // 1.6 MiB
    let mut w = store.writer().unwrap();
    let map = w.put_memory(&mem, 2).unwrap();
    let m = manifest_for(&mut w, "rolled", &map);
    let s = w.commit(&m).unwrap();
    assert!(s.packs_sealed >= 6, "{s:?}");
    assert_eq!(restore(&store, "rolled"), mem);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn empty_memory_snapshot() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let m = snapshot(&store, "empty", &[]);
    assert!(m.memory.map_chunks.is_empty());
    assert_eq!(restore(&store, "empty"), Vec::<u8>::new());
    // All-zero memory stores nothing but the map and the state.
    let mut w = store.writer().unwrap();
    let map = w.put_memory(&vec![0u8; 3000 * PAGE_SIZE], 2).unwrap();
    let m = manifest_for(&mut w, "zeros", &map);
    let s = w.commit(&m).unwrap();
    assert_eq!(s.zero_pages, 3000);
    assert!(s.objects_written <= 3, "{s:?}");
    assert_eq!(restore(&store, "zeros"), vec![0u8; 3000 * PAGE_SIZE]);
}

#[test]
fn gc_keeps_a_pack_whose_live_object_is_corrupt() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    // One pack: many dead pages and the two live pages of "small".
    let mut w = store.writer().unwrap();
    w.put_pages(&memory(100, 0, 201), 1).unwrap();
    let small = memory(2, 0, 202);
    let map = w.put_memory(&small, 1).unwrap();
    let m = manifest_for(&mut w, "small", &map);
    w.commit(&m).unwrap();
    let live = Hash::of(&small[..PAGE_SIZE]);
    let loc = store.locate(&live).unwrap();
    flip_byte(&loc.pack, loc.offset + 7);
    let report = store.gc().unwrap();
    assert_eq!(report.packs_rewritten, 0, "{report:?}");
    assert_eq!(report.packs_with_corrupt_objects.len(), 1, "{report:?}");
    assert!(loc.pack.exists());
    // The healthy live page is readable (possibly from a copy).
    let other = Hash::of(&small[PAGE_SIZE..]);
    let mut buf = [0u8; PAGE_SIZE];
    store.read_page_into(&other, &mut buf).unwrap();
    assert_eq!(&buf[..], &small[PAGE_SIZE..]);
}

#[test]
fn a_restore_indexes_only_the_packs_its_snapshot_lists_and_falls_back_to_the_whole_store() {
    let dir = tmp();
    let store = Store::open(dir.path()).unwrap();
    let base = memory(64, 4, 1);
    snapshot(&store, "a", &base);
    // b shares a's pages (stored once, in a's pack) and adds its own.
    let mut b_mem = base.clone();
    b_mem.extend(memory(32, 0, 2));
    snapshot(&store, "b", &b_mem);
    for i in 0..5 {
        snapshot(&store, &format!("other-{i}"), &memory(64, 0, 10 + i));
    }
    let everything = store.object_count();
    let a = store.load_manifest("a").unwrap();
    let b = store.load_manifest("b").unwrap();
    assert!(
        b.packs.len() >= 2 && a.packs.iter().all(|p| b.packs.contains(p)),
        "b lists its own pack and a's: {:?} / {:?}",
        b.packs,
        a.packs
    );

    let fresh = Store::open_unindexed(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(fresh.object_count(), 0, "opening indexes nothing");
    assert_eq!(
        fresh.index_snapshot(&b).unwrap(),
        SnapshotIndexing::Listed {
            loaded: b.packs.len()
        }
    );
    assert!(
        fresh.object_count() < everything / 2,
        "only b's packs are indexed"
    );
    assert_eq!(restore(&fresh, "b"), b_mem, "and they hold all of b");
    let other = store.load_manifest("other-0").unwrap();
    assert!(!fresh.contains(&other.vm_state));
    assert_eq!(
        fresh.index_snapshot(&b).unwrap(),
        SnapshotIndexing::Listed { loaded: 0 }
    );
    // A writer still deduplicates against the whole store.
    drop(fresh.writer().unwrap());
    assert_eq!(fresh.object_count(), everything);

    // A manifest from before pack lists: the whole store.
    let unlisted = Manifest {
        packs: Vec::new(),
        ..b.clone()
    };
    let fresh = Store::open_unindexed(dir.path(), StoreOptions::default()).unwrap();
    match fresh.index_snapshot(&unlisted).unwrap() {
        SnapshotIndexing::WholeStore { reason } => assert!(reason.contains("lists no packs")),
        other => panic!("{other:?}"),
    }
    assert_eq!(fresh.object_count(), everything);

    // Deleting a and collecting rewrites a's pack (b's shared pages move to a new pack):
    // b's list now names a pack that is gone, and the restore indexes the whole store.
    store.delete_manifest("a").unwrap();
    store
        .gc_with(&ember_snapshot_store::GcOptions {
            rewrite_below_live_fraction: 1.0,
        })
        .unwrap();
    assert!(a
        .packs
        .iter()
        .all(|p| !dir.path().join("packs").join(format!("{p}.idx")).exists()));
    let fresh = Store::open_unindexed(dir.path(), StoreOptions::default()).unwrap();
    match fresh.index_snapshot(&b).unwrap() {
        SnapshotIndexing::WholeStore { reason } => {
            assert!(reason.contains("unusable"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(restore(&fresh, "b"), b_mem);
}

/// A store that reads its packs (`map_packs: false`, the service's) survives a pack truncated
/// behind its back after it opened it: reads fail naming the pack, verification reports it,
/// GC goes on, and other snapshots still read. (Mapped, the same truncation is a SIGBUS.)
#[test]
fn a_pack_truncated_behind_a_reading_store_is_an_error_not_a_crash() {
    let dir = tmp();
    let options = StoreOptions {
        map_packs: false,
        pack_target_size: 1,
        ..Default::default()
    };
    let store = Store::open_with(dir.path(), options.clone()).unwrap();
    let victim = snapshot(&store, "victim", &memory(64, 0, 61));
    let other_mem = memory(64, 0, 62);
    let other = snapshot(&store, "other", &other_mem);
    let page = some_page(&store.load_memory_map(&victim).unwrap());
    let reader = Store::open_with(dir.path(), options).unwrap();
    let pack = reader.locate(&page).unwrap().pack;
    assert!(
        !other
            .packs
            .iter()
            .any(|p| pack.ends_with(format!("{p}.pack"))),
        "the two snapshots share a pack"
    );

    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut buf = [0u8; 4096];
    let err = reader
        .read_page_into(&page, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&pack.display().to_string()), "{err}");
    let report = reader.verify().unwrap();
    assert!(!report.problems.is_empty());
    reader.gc().unwrap();
    assert_eq!(restore(&reader, "other"), other_mem);
}
