//! A writer process killed half-way: earlier snapshots stay readable, verify stays clean
//! and GC removes the orphan pack.

mod common;

use std::process::Command;

use common::{memory, restore, snapshot};
use ember_snapshot_store::{ObjectKind, Store};

const CHILD_ENV: &str = "EMBER_SNAPSHOT_STORE_CRASH_DIR";

/// Runs only as the child of `killed_writer_leaves_the_store_consistent`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&dir).unwrap();
    let mut w = store.writer().unwrap();
    w.put_pages(&memory(1024, 5, 7), 2).unwrap(); // > the write buffer: reaches the file
    w.put(ObjectKind::VmState, b"half-written").unwrap();
    // Die without sealing, unwinding or running destructors.
    std::process::abort();
}

#[test]
fn killed_writer_leaves_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mem = memory(200, 3, 1);
    snapshot(&store, "before-crash", &mem);

    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must die");

    let orphans: Vec<_> = std::fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .flatten()
        .filter(|e| {
            let p = e.path();
            p.extension().is_some_and(|x| x == "pack") && !p.with_extension("idx").exists()
        })
        .collect();
    assert_eq!(
        orphans.len(),
        1,
        "the crash leaves one pack without an index"
    );
    assert!(orphans[0].metadata().unwrap().len() > 1 << 20);

    let r = store.refresh().unwrap();
    assert_eq!((r.added, r.rejected.len()), (0, 0));
    assert_eq!(restore(&store, "before-crash"), mem);
    let v = store.verify().unwrap();
    assert!(v.is_clean(), "{:?}", v.problems);
    assert_eq!(v.orphan_packs.len(), 1);
    assert_eq!(store.list_manifests().unwrap(), vec!["before-crash"]);

    let g = store.gc().unwrap();
    assert_eq!(g.orphans_removed, 1, "{g:?}");
    assert!(!orphans[0].path().exists());
    assert_eq!(restore(&store, "before-crash"), mem);
    let v = store.verify().unwrap();
    assert!(v.is_clean() && v.orphan_packs.is_empty(), "{v:?}");
}
