use super::*;
use crate::{Manifest, MemoryRef, ObjectKind};

/// A store holding one snapshot `id` of `pages` pages: page i is filled with byte i+1, except
/// every third page, which is zero.
fn snapshot(root: &Path, id: &str, pages: usize) -> (Store, Manifest, Vec<u8>) {
    let store = Store::open(root).unwrap();
    let mut memory = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        if i % 3 != 0 {
            page.fill(i as u8 + 1);
        }
    }
    let mut w = store.writer().unwrap();
    let map = w.put_memory(&memory, 1).unwrap();
    let chunks = map.store(&mut w).unwrap();
    let state = w.put(ObjectKind::VmState, b"state").unwrap();
    let mem = MemoryRef {
        size_bytes: map.size_bytes(),
        page_size: PAGE_SIZE as u32,
        map_chunks: chunks,
    };
    let manifest = Manifest::new(id, state, mem);
    w.commit(&manifest).unwrap();
    let manifest = store.load_manifest(id).unwrap();
    (store, manifest, memory)
}

#[test]
fn a_materialised_file_holds_the_snapshot_with_zero_pages_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, memory) = snapshot(&dir.path().join("store"), "s1", 300);
    let cache = MemCache::new(dir.path().join("cache"));
    assert!(matches!(
        cache.open(&manifest.memory),
        Err(CacheMiss::Absent(_))
    ));
    let done = cache.materialise(&store, &manifest).unwrap();
    assert!(!done.already);
    assert_eq!(done.pages_written, 200);
    let cached = cache.open(&manifest.memory).unwrap();
    assert_eq!(cached.size, memory.len() as u64);
    assert_eq!(fs::read(&cached.path).unwrap(), memory);
    // 100 zero pages are holes: fewer blocks than the full size.
    let meta = fs::metadata(&cached.path).unwrap();
    assert!(meta.blocks() * 512 <= 200 * PAGE_SIZE as u64 + 64 * 1024);
    // A second materialisation finds it intact.
    drop(cached);
    assert!(cache.materialise(&store, &manifest).unwrap().already);
}

#[test]
fn a_truncated_or_rewritten_file_is_never_opened_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, memory) = snapshot(&dir.path().join("store"), "s1", 64);
    let cache = MemCache::new(dir.path().join("cache"));
    let path = cache.materialise(&store, &manifest).unwrap().path;

    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(PAGE_SIZE as u64).unwrap();
    drop(file);
    assert!(matches!(
        cache.open(&manifest.memory),
        Err(CacheMiss::WrongSize { got, .. }) if got == PAGE_SIZE as u64
    ));
    assert!(!cache.materialise(&store, &manifest).unwrap().already);
    assert_eq!(fs::read(&path).unwrap(), memory);

    // Same size, one byte changed: its ctime moves, so its identity no longer matches.
    std::thread::sleep(Duration::from_millis(20));
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xee], 4096 + 7).unwrap();
    drop(file);
    assert!(matches!(
        cache.open(&manifest.memory),
        Err(CacheMiss::Changed(_))
    ));
    // A replaced file (same bytes, new inode) is refused too.
    let copy = dir.path().join("copy");
    fs::write(&copy, &memory).unwrap();
    fs::rename(&copy, &path).unwrap();
    assert!(matches!(
        cache.open(&manifest.memory),
        Err(CacheMiss::Changed(_))
    ));
    // A record that does not decode.
    let record = path.with_extension("json");
    fs::write(&record, b"{").unwrap();
    assert!(matches!(
        cache.open(&manifest.memory),
        Err(CacheMiss::BadRecord { .. })
    ));
}

#[test]
fn a_page_that_fails_its_hash_materialises_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (_, manifest, _) = snapshot(&root, "s1", 16);
    // Flip a byte in every pack's data area: some stored page no longer verifies.
    for entry in fs::read_dir(root.join("packs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pack") {
            let mut bytes = fs::read(&path).unwrap();
            let at = bytes.len() - 100;
            bytes[at] ^= 0xff;
            fs::write(&path, bytes).unwrap();
        }
    }
    let store = Store::open(&root).unwrap();
    let cache = MemCache::new(dir.path().join("cache"));
    let err = cache.materialise(&store, &manifest).unwrap_err();
    assert!(matches!(err, MemCacheError::Store { .. }), "{err}");
    assert!(cache.entries().unwrap().is_empty());
    let left: Vec<_> = fs::read_dir(cache.dir()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn eviction_goes_least_recently_used_first_and_skips_mapped_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, a, _) = snapshot(&root, "a", 32);
    // Different contents for b and c: their memories differ from a's.
    let mut w = store.writer().unwrap();
    let mut manifests = vec![a];
    for (id, fill) in [("b", 0x5au8), ("c", 0xa5u8)] {
        let memory = vec![fill; 32 * PAGE_SIZE];
        let map = w.put_memory(&memory, 1).unwrap();
        let chunks = map.store(&mut w).unwrap();
        let state = w.put(ObjectKind::VmState, id.as_bytes()).unwrap();
        let mem = MemoryRef {
            size_bytes: map.size_bytes(),
            page_size: PAGE_SIZE as u32,
            map_chunks: chunks,
        };
        manifests.push(Manifest::new(id, state, mem));
    }
    w.commit(&manifests[1]).unwrap();
    let w = store.writer().unwrap();
    w.commit(&manifests[2]).unwrap();
    let cache = MemCache::new(dir.path().join("cache"));
    for m in &manifests {
        cache.materialise(&store, m).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    // a is used again: b is now the least recently used.
    cache.touch(&manifests[0].memory);
    let keys: Vec<String> = manifests
        .iter()
        .map(|m| MemCache::key_of(&m.memory))
        .collect();
    let order: Vec<String> = cache
        .entries()
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        order,
        vec![keys[1].clone(), keys[2].clone(), keys[0].clone()]
    );

    // b is mapped by a VMM (shared lock held): eviction passes it by.
    let held = cache.open(&manifests[1].memory).unwrap();
    let total: u64 = cache.entries().unwrap().iter().map(|e| e.allocated).sum();
    let report = cache.evict_to(total - 1).unwrap();
    assert_eq!(report.busy, 1);
    assert_eq!(report.evicted, vec![keys[2].clone()]);
    assert!(cache.contains(&manifests[0].memory));
    drop(held);
    let report = cache.evict_to(0).unwrap();
    assert_eq!(report.evicted.len(), 2);
    assert_eq!(report.bytes, 0);
    assert!(!cache.contains(&manifests[1].memory));
}

#[test]
fn keys_follow_content_not_snapshot_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (_, a, _) = snapshot(&dir.path().join("s1"), "a", 8);
    let (_, b, _) = snapshot(&dir.path().join("s2"), "b", 8);
    let (_, c, _) = snapshot(&dir.path().join("s3"), "c", 9);
    assert_eq!(MemCache::key_of(&a.memory), MemCache::key_of(&b.memory));
    assert_ne!(MemCache::key_of(&a.memory), MemCache::key_of(&c.memory));
}

#[test]
fn what_an_interrupted_materialisation_left_goes_once_it_is_old() {
    let dir = tempfile::tempdir().unwrap();
    let cache = MemCache::new(dir.path());
    let old = SystemTime::now() - Duration::from_secs(3600);
    let make = |name: &str, age: SystemTime| {
        let path = dir.path().join(name);
        let file = File::create(&path).unwrap();
        file.set_modified(age).unwrap();
        path
    };
    let old_tmp = make(".abc.tmp-1-2", old);
    let old_orphan = make("abc.mem", old);
    let fresh_tmp = make(".def.tmp-1-2", SystemTime::now());
    // A writer still holds this one.
    let held = make(".ghi.tmp-1-2", old);
    let writer = File::open(&held).unwrap();
    fsutil::lock(&writer, fsutil::LockMode::Exclusive).unwrap();
    cache.evict_to(u64::MAX).unwrap();
    assert!(!old_tmp.exists() && !old_orphan.exists());
    assert!(fresh_tmp.exists() && held.exists());
}

#[test]
fn guest_memory_is_readable_by_its_owner_only_or_one_group() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest, _) = snapshot(&dir.path().join("store"), "s1", 8);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let private = MemCache::new(dir.path().join("private"));
    let path = private.materialise(&store, &manifest).unwrap().path;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&path.with_extension("json")), 0o600);
    assert_eq!(mode(private.dir()), 0o700);
    let gid = fs::metadata(dir.path()).unwrap().gid();
    let shared = MemCache::readable_by_group(dir.path().join("shared"), gid);
    let path = shared.materialise(&store, &manifest).unwrap().path;
    assert_eq!(mode(&path), 0o640);
    assert_eq!(fs::metadata(&path).unwrap().gid(), gid);
    assert_eq!(mode(&path.with_extension("json")), 0o640);
    assert_eq!(mode(shared.dir()), 0o750);
}
