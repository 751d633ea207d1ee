//! `ember snapshots` and `ember store stats|verify|gc`: the real `ember` binary against a real
//! store on disk, filled through the `ember_snapshot_store` API. Host-only (no KVM).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ember_snapshot_store::{
    Hash, Manifest, MemoryMap, MemoryRef, ObjectKind, PageRef, Store, PAGE_SIZE,
};
use serde_json::Value;

/// A fresh directory under the target dir for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("store-cli-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ember(args: &[&str], store: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .arg("--store")
        .arg(store)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    eprintln!(
        "$ ember {} --store {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        store.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

const PAGES: usize = 64;

/// Guest memory of `PAGES` pages: every 8th page zero, the rest random.
fn base_memory() -> Vec<u8> {
    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
    for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
        if i % 8 != 0 {
            fill(page, i as u64 + 1);
        }
    }
    mem
}

/// Saves a snapshot of `mem` (and optionally a disk image) as `id`.
fn save(
    store: &Store,
    id: &str,
    mem: &[u8],
    vcpus: u32,
    parent: Option<&str>,
    disk: Option<&[u8]>,
) -> (Manifest, MemoryMap) {
    let mut w = store.writer().unwrap();
    let map = w.put_memory(mem, 2).unwrap();
    let chunks = map.store(&mut w).unwrap();
    let state = w
        .put(ObjectKind::VmState, format!("state of {id}").as_bytes())
        .unwrap();
    let mut m = Manifest::new(
        id,
        state,
        MemoryRef {
            size_bytes: map.size_bytes(),
            page_size: PAGE_SIZE as u32,
            map_chunks: chunks,
        },
    );
    m.metadata.insert("vcpus".into(), vcpus.to_string());
    m.parent = parent.map(str::to_string);
    if let Some(image) = disk {
        let chunk_size = 16 * 1024;
        let dmap = w
            .put_disk(&mut &image[..], image.len() as u64, chunk_size)
            .unwrap();
        m.disks.push(ember_snapshot_store::DiskRef {
            name: "rootfs".into(),
            size: image.len() as u64,
            chunk_size,
            map_chunks: dmap.store(&mut w).unwrap(),
        });
    }
    w.commit(&m).unwrap();
    (m, map)
}

/// A store with "alpha" (2 vCPUs) and "beta" (1 vCPU, parent alpha, one disk), beta's memory
/// being alpha's with 4 pages changed: they share 52 of their 56 stored pages.
fn two_snapshots(dir: &Path) -> (Store, MemoryMap, MemoryMap) {
    let store = Store::open(dir).unwrap();
    let mem = base_memory();
    let (_, alpha) = save(&store, "alpha", &mem, 2, None, None);
    let mut changed = mem.clone();
    for i in [1usize, 2, 3, 5] {
        fill(
            &mut changed[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            1000 + i as u64,
        );
    }
    let mut disk = vec![0u8; 64 * 1024];
    fill(&mut disk[..20 * 1024], 77);
    let (_, beta) = save(&store, "beta", &changed, 1, Some("alpha"), Some(&disk));
    (store, alpha, beta)
}

fn stats_json(dir: &Path) -> Value {
    let out = ember(&["store", "stats", "--json"], dir);
    assert!(out.status.success());
    json(&out)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn snapshots_are_listed_as_a_table_and_as_json() {
    let dir = scratch("list");
    let (_store, _, _) = two_snapshots(&dir);

    let out = ember(&["snapshots"], &dir);
    assert!(out.status.success());
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("ID"), "{text}");
    let alpha: Vec<&str> = lines[1].split_whitespace().collect();
    let beta: Vec<&str> = lines[2].split_whitespace().collect();
    // id, created, memory (number, "MiB"), vcpus, parent, disks
    assert_eq!(alpha[0], "alpha", "{text}");
    assert!(alpha[1].ends_with('Z') && alpha[1].contains('T'), "{text}");
    assert_eq!(&alpha[2..], ["0.25", "MiB", "2", "-", "0"], "{text}");
    assert_eq!(beta[0], "beta", "{text}");
    assert_eq!(&beta[2..], ["0.25", "MiB", "1", "alpha", "1"], "{text}");

    let out = ember(&["snapshots", "--json"], &dir);
    assert!(out.status.success());
    let v = json(&out);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], "alpha");
    assert_eq!(list[0]["vcpus"], 2);
    assert_eq!(list[0]["parent"], Value::Null);
    assert_eq!(list[0]["disks"], 0);
    assert_eq!(n(&list[0], "memory_bytes"), (PAGES * PAGE_SIZE) as u64);
    assert_eq!(list[0]["memory_mib"].as_f64().unwrap(), 0.25);
    assert_eq!(list[1]["id"], "beta");
    assert_eq!(list[1]["vcpus"], 1);
    assert_eq!(list[1]["parent"], "alpha");
    assert_eq!(list[1]["disks"], 1);
    let created = list[1]["created"].as_str().unwrap();
    assert_eq!(created.len(), "2024-01-01T00:00:00Z".len(), "{created}");
    let ms = n(&list[1], "created_unix_ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        ms <= now_ms && now_ms - ms < 10 * 60 * 1000,
        "{ms} vs {now_ms}"
    );
}

#[test]
fn an_empty_or_missing_store_lists_nothing_and_is_not_created() {
    let dir = scratch("empty");
    Store::open(&dir).unwrap();
    let out = ember(&["snapshots"], &dir);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "");
    let out = ember(&["snapshots", "--json"], &dir);
    assert!(out.status.success());
    assert_eq!(json(&out), Value::Array(vec![]));

    let missing = dir.join("not-there");
    let out = ember(&["snapshots"], &missing);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "");
    assert!(stderr(&out).contains("not-there"), "{}", stderr(&out));
    for args in [
        &["store", "stats"][..],
        &["store", "verify"],
        &["store", "gc"],
    ] {
        assert!(ember(args, &missing).status.success());
    }
    assert!(!missing.exists(), "a read-only command created the store");

    let out = ember(&["snapshots", "delete", "x"], &missing);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("ember: no snapshot \"x\""));
    assert!(!missing.exists());
}

#[test]
fn stats_show_deduplication_across_snapshots() {
    let dir = scratch("stats");
    let (store, alpha, beta) = two_snapshots(&dir);
    let v = stats_json(&dir);
    let logical = n(&v, "logical_bytes");
    let stored = n(&v, "stored_bytes");
    assert_eq!(n(&v, "snapshots"), 2);
    assert_eq!(
        logical,
        2 * (PAGES * PAGE_SIZE) as u64 + 64 * 1024,
        "memory of both plus beta's disk"
    );
    // 56 + 4 distinct pages, a bit of disk, maps and states, plus pack headers.
    assert!(stored < logical, "{stored} >= {logical}");
    let distinct_pages = 60 * PAGE_SIZE as u64;
    assert!(stored > distinct_pages, "{stored}");
    assert!(stored < distinct_pages + 64 * 1024, "{stored}");
    let ratio = v["dedup_ratio"].as_f64().unwrap();
    assert!(
        (ratio - logical as f64 / stored as f64).abs() < 1e-9,
        "{ratio}"
    );
    assert!(ratio > 1.0);
    assert_eq!(n(&v, "zero_pages"), 16, "8 zero pages in each");
    assert_eq!(n(&v, "packs"), 2, "one pack per writer");
    assert_eq!(n(&v, "unique_objects") as usize, store.object_count());
    let pages = |m: &MemoryMap| {
        m.pages
            .iter()
            .filter(|p| matches!(p, PageRef::Object(_)))
            .count()
    };
    assert_eq!(pages(&alpha) + pages(&beta), 112);

    // The text form shows the same figures.
    let out = ember(&["store", "stats"], &dir);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains(&format!("logical bytes:  {logical} ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("stored bytes:   {stored} ")),
        "{text}"
    );
    assert!(text.contains(&format!("{ratio:.2}x")), "{text}");
    assert!(text.contains("snapshots:      2"), "{text}");
}

/// A page that only `map` has, not `other`.
fn page_only_in(map: &MemoryMap, other: &MemoryMap) -> Hash {
    map.pages
        .iter()
        .find_map(|p| match p {
            PageRef::Object(h) if !other.pages.contains(p) => Some(*h),
            _ => None,
        })
        .unwrap()
}

#[test]
fn verify_passes_then_names_a_corrupted_object_and_its_pack() {
    let dir = scratch("verify");
    let (store, alpha, beta) = two_snapshots(&dir);
    let out = ember(&["store", "verify"], &dir);
    assert!(out.status.success());
    assert!(stdout(&out).contains("all good"), "{}", stdout(&out));
    let out = ember(&["store", "verify", "--json"], &dir);
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["clean"], true);
    assert_eq!(n(&v, "snapshots_checked"), 2);
    assert_eq!(n(&v, "objects_checked") as usize, store.object_count());

    // Flip one byte inside a page that only alpha uses.
    let victim = page_only_in(&alpha, &beta);
    let loc = store.locate(&victim).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&loc.pack)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, loc.offset + 100).unwrap();
        b[0] ^= 0x01;
        f.write_all_at(&b, loc.offset + 100).unwrap();
    }
    let out = ember(&["store", "verify"], &dir);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let hex = victim.to_hex();
    let line = text
        .lines()
        .find(|l| l.starts_with("corrupt object"))
        .unwrap_or_else(|| panic!("no corrupt object line in {text}"));
    assert!(line.contains(&hex), "{line}");
    assert!(line.contains(&loc.pack.display().to_string()), "{line}");
    // The snapshot that uses it is named too.
    assert!(
        text.lines()
            .any(|l| l.contains("missing object") && l.contains(&hex) && l.contains("alpha")),
        "{text}"
    );
    assert!(stderr(&out).starts_with("ember: "), "{}", stderr(&out));

    let out = ember(&["store", "verify", "--json"], &dir);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["clean"], false);
    let problems = v["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["kind"] == "corrupt object"
        && p["hash"] == hex.as_str()
        && p["pack"] == loc.pack.display().to_string().as_str()));
}

#[test]
fn delete_then_gc_reclaims_the_objects_only_the_deleted_snapshot_used() {
    let dir = scratch("gc");
    let (_store, alpha, beta) = two_snapshots(&dir);
    let before = stats_json(&dir);

    let out = ember(&["snapshots", "delete", "beta"], &dir);
    assert!(out.status.success());
    assert!(stdout(&out).contains("beta"));
    let out = ember(&["snapshots", "--json"], &dir);
    let list = json(&out);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["alpha"]);

    // Deleting leaves the objects until gc.
    let after_delete = stats_json(&dir);
    assert_eq!(n(&after_delete, "snapshots"), 1);
    assert_eq!(n(&after_delete, "stored_bytes"), n(&before, "stored_bytes"));

    let out = ember(&["store", "gc", "--json"], &dir);
    assert!(out.status.success());
    let g = json(&out);
    assert_eq!(n(&g, "snapshots"), 1);
    assert!(n(&g, "objects_removed") > 0, "{g}");
    assert!(n(&g, "bytes_reclaimed") > 0, "{g}");

    let after = stats_json(&dir);
    assert!(
        n(&after, "stored_bytes") < n(&before, "stored_bytes"),
        "{before} -> {after}"
    );
    // What left the pack files is part of what gc says it reclaimed (which also counts
    // the removed index files).
    let dropped = n(&before, "stored_bytes") - n(&after, "stored_bytes");
    assert!(dropped <= n(&g, "bytes_reclaimed"), "{dropped} {g}");
    assert_eq!(n(&after, "packs"), 1, "beta's pack held nothing alpha uses");

    // Alpha is intact: everything verifies and its pages are still there.
    let fresh = Store::open(&dir).unwrap();
    assert!(fresh.verify().unwrap().is_clean());
    assert!(fresh.contains(&page_only_in(&alpha, &beta)));
    assert!(!fresh.contains(&page_only_in(&beta, &alpha)));

    // Text gc on a clean store reclaims nothing.
    let out = ember(&["store", "gc"], &dir);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("reclaimed 0.00 MiB"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn delete_errors_are_one_clear_line() {
    let dir = scratch("delete-errors");
    let _ = two_snapshots(&dir);
    for (id, says) in [
        ("nope", "no snapshot \"nope\""),
        ("../alpha", "invalid snapshot id"),
    ] {
        let out = ember(&["snapshots", "delete", id], &dir);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.starts_with("ember: "), "{err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Nothing was deleted.
    assert_eq!(
        json(&ember(&["snapshots", "--json"], &dir))
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn an_unreadable_manifest_is_reported_and_the_rest_still_listed() {
    let dir = scratch("bad-manifest");
    let _ = two_snapshots(&dir);
    std::fs::write(dir.join("manifests/broken"), b"not a manifest").unwrap();
    let out = ember(&["snapshots"], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("alpha") && stdout(&out).contains("beta"));
    assert!(stderr(&out).contains("\"broken\""), "{}", stderr(&out));
    let out = ember(&["store", "verify"], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("bad manifest"), "{}", stdout(&out));
}

#[test]
fn a_directory_that_is_not_a_store_is_refused_and_left_alone() {
    let dir = scratch("not-a-store");
    std::fs::write(dir.join("precious.txt"), b"x").unwrap();
    for args in [&["snapshots"][..], &["store", "gc"], &["store", "stats"]] {
        let out = ember(args, &dir);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out).contains("is not a snapshot store"),
            "{}",
            stderr(&out)
        );
    }
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(names.len(), 1);
}
