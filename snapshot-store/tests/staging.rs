//! Snapshots written by an untrusted process into a staging store over a read-only shared
//! store, then ingested by the store's owner.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{flip_byte, memory, restore, snapshot};
use ember_snapshot_store::{IngestLimits, ObjectKind, Store, StoreError, StoreOptions, PAGE_SIZE};

const PAGES: usize = 64;

fn limits() -> IngestLimits {
    IngestLimits {
        memory_bytes: (PAGES * PAGE_SIZE) as u64,
        max_disks: 1,
        max_disk_bytes: 1 << 30,
        max_staged_bytes: 16 << 20,
    }
}

/// A shared store holding snapshot `base` of `mem`, and a staging folder beside it.
fn shared_with_base(dir: &Path, mem: &[u8]) -> Arc<Store> {
    let shared = Arc::new(Store::open(dir.join("shared")).unwrap());
    snapshot(&shared, "base", mem);
    shared
}

/// What an untrusted writer does: snapshot `mem` as `id` into a staging store over `shared`.
fn stage(shared: &Arc<Store>, staged: &Path, id: &str, mem: &[u8]) {
    let staging = Store::open_staging(staged, shared.clone(), StoreOptions::default()).unwrap();
    snapshot(&staging, id, mem);
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = fs::read_dir(dir.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    packs.sort();
    packs
}

#[test]
fn a_staged_snapshot_holds_only_what_the_shared_store_lacks_and_ingests_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut mem = memory(PAGES, 4, 1);
    let shared = shared_with_base(dir.path(), &mem);
    let shared_packs = pack_files(&dir.path().join("shared"));
    // Three pages changed since the base.
    for page in [1, 2, 3] {
        mem[page * PAGE_SIZE] ^= 0xff;
    }
    let staged = dir.path().join("staged");
    stage(&shared, &staged, "next", &mem);
    // The staging store wrote the three pages, its map chunk and state, nothing of the base;
    // the shared store is untouched and does not know the snapshot yet.
    let staging = Store::open(&staged).unwrap();
    assert_eq!(staging.object_count(), 5);
    assert_eq!(pack_files(&dir.path().join("shared")), shared_packs);
    assert!(shared.load_manifest("next").is_err());

    let moved = dir.path().join("ingest");
    fs::rename(&staged, &moved).unwrap();
    let report = shared.ingest(&moved, "next", &limits()).unwrap();
    assert_eq!(report.objects_copied, 5, "{report:?}");
    assert!(report.objects_present > 0, "{report:?}");
    assert_eq!(restore(&shared, "next"), mem);
    // A fresh reader of the shared store finds all of it in the shared store's own packs.
    let fresh = Store::open(dir.path().join("shared")).unwrap();
    assert_eq!(restore(&fresh, "next"), mem);
    let m = fresh.load_manifest("next").unwrap();
    for pack in &m.packs {
        assert!(dir
            .path()
            .join("shared/packs")
            .join(format!("{pack}.pack"))
            .exists());
    }
}

#[test]
fn an_object_rewritten_in_the_staging_store_is_refused_and_nothing_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 2));
    let staged = dir.path().join("staged");
    stage(&shared, &staged, "forged", &memory(PAGES, 4, 3));
    let pack = pack_files(&staged)[0].clone();
    flip_byte(&pack, 4096);
    let objects_before = Store::open(dir.path().join("shared"))
        .unwrap()
        .object_count();

    let err = shared.ingest(&staged, "forged", &limits()).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(shared.load_manifest("forged").is_err());
    // The other snapshot is whole; no object of the forged one was kept (GC finds none).
    assert_eq!(restore(&shared, "base"), memory(PAGES, 4, 2));
    let report = shared.gc().unwrap();
    let after = Store::open(dir.path().join("shared")).unwrap();
    assert!(after.object_count() <= objects_before, "{report:?}");
}

#[test]
fn only_what_the_manifest_references_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 4));
    let staged = dir.path().join("staged");
    {
        let staging =
            Store::open_staging(&staged, shared.clone(), StoreOptions::default()).unwrap();
        let mut w = staging.writer().unwrap();
        for i in 0..100u32 {
            w.put(ObjectKind::Blob, &i.to_le_bytes().repeat(300))
                .unwrap();
        }
        w.finish().unwrap();
        snapshot(&staging, "lean", &memory(PAGES, 4, 4));
    }
    let report = shared.ingest(&staged, "lean", &limits()).unwrap();
    // Every page was the base's: only the state is new (the map chunk too is the base's).
    assert_eq!(report.objects_copied, 1, "{report:?}");
}

#[test]
fn a_manifest_that_does_not_match_the_sandbox_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 5));
    let staged = dir.path().join("staged");
    stage(&shared, &staged, "big", &memory(PAGES, 4, 6));
    let small = IngestLimits {
        memory_bytes: PAGE_SIZE as u64,
        ..limits()
    };
    let err = shared
        .ingest(&staged, "big", &small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bytes of memory"), "{err}");
    // A staged snapshot larger than the sandbox could write is refused before it is read.
    let tight = IngestLimits {
        max_staged_bytes: 4096,
        ..limits()
    };
    let err = shared
        .ingest(&staged, "big", &tight)
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than"), "{err}");
    // A manifest missing from the staging store is not taken from the shared one.
    let err = shared.ingest(&staged, "base", &limits()).unwrap_err();
    assert!(matches!(err, StoreError::Manifest(_)), "{err}");
}

#[test]
fn links_and_fifos_in_the_staging_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 7));
    for (name, make) in [("symlink", 0), ("fifo", 1), ("linked folder", 2)] {
        let staged = dir.path().join(format!("staged-{make}"));
        stage(&shared, &staged, "s", &memory(PAGES, 4, 8));
        match make {
            0 => std::os::unix::fs::symlink("/etc/passwd", staged.join("packs/x.pack")).unwrap(),
            1 => {
                let path = std::ffi::CString::new(staged.join("manifests/fifo").to_str().unwrap())
                    .unwrap();
                // SAFETY: mkfifo reads a NUL-terminated path we own.
                assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
            }
            _ => {
                fs::rename(staged.join("packs"), dir.path().join("elsewhere")).unwrap();
                std::os::unix::fs::symlink(dir.path().join("elsewhere"), staged.join("packs"))
                    .unwrap();
            }
        }
        let err = shared
            .ingest(&staged, "s", &limits())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("neither a directory nor a regular file"),
            "{name}: {err}"
        );
        assert!(shared.load_manifest("s").is_err(), "{name}");
    }
}

#[test]
fn a_truncated_staged_pack_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 9));
    let staged = dir.path().join("staged");
    stage(&shared, &staged, "cut", &memory(PAGES, 4, 10));
    let pack = pack_files(&staged)[0].clone();
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert!(shared.ingest(&staged, "cut", &limits()).is_err());
    assert!(shared.load_manifest("cut").is_err());
    assert_eq!(restore(&shared, "base"), memory(PAGES, 4, 9));
}

#[test]
fn files_the_store_writes_have_explicit_modes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: getegid takes no arguments and cannot fail.
    let gid = unsafe { libc::getegid() };
    let options = StoreOptions {
        group: Some(gid),
        ..StoreOptions::default()
    };
    let shared = Store::open_with(dir.path().join("g"), options).unwrap();
    snapshot(&shared, "m", &memory(8, 4, 11));
    let private = Store::open(dir.path().join("p")).unwrap();
    snapshot(&private, "m", &memory(8, 4, 11));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for (root, file_mode, dir_mode) in [("g", 0o640, 0o750), ("p", 0o600, 0o700)] {
        let root = dir.path().join(root);
        for d in [root.clone(), root.join("packs"), root.join("manifests")] {
            assert_eq!(mode(&d), dir_mode, "{}", d.display());
        }
        let files = pack_files(&root)
            .into_iter()
            .flat_map(|p| [p.with_extension("idx"), p])
            .chain([root.join("manifests/m")]);
        for f in files {
            assert_eq!(mode(&f), file_mode, "{}", f.display());
            assert_eq!(fs::metadata(&f).unwrap().gid(), gid);
        }
    }
}

#[test]
fn a_staged_working_set_is_checked_against_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let shared = shared_with_base(dir.path(), &memory(PAGES, 4, 12));
    let memory_bytes = (PAGES * PAGE_SIZE) as u64;
    let record = |name: &str, pages: &[u64]| {
        let staged = dir.path().join(name);
        let staging =
            Store::open_staging(&staged, shared.clone(), StoreOptions::default()).unwrap();
        staging.save_working_set("base", pages, 1).unwrap();
        staged
    };
    let good = record("good", &[3, 1, 2]);
    assert_eq!(
        shared
            .ingest_working_set(&good, "base", memory_bytes)
            .unwrap(),
        Some(3)
    );
    assert_eq!(
        shared.load_working_set("base").unwrap().unwrap().pages,
        vec![3, 1, 2]
    );
    let beyond = record("beyond", &[1, PAGES as u64]);
    let err = shared
        .ingest_working_set(&beyond, "base", memory_bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond"), "{err}");
    assert_eq!(
        shared.load_working_set("base").unwrap().unwrap().pages,
        vec![3, 1, 2]
    );
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert_eq!(
        shared
            .ingest_working_set(&empty, "base", memory_bytes)
            .unwrap(),
        None
    );
}
