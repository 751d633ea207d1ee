//! Files of a snapshot store as a damaged disk or another writer could leave them: a manifest
//! and a working set, read through the store's own API. Bad files must be reported with an
//! error naming them, never a panic.
#![no_main]

use std::sync::OnceLock;

use ember_snapshot_store::Store;
use libfuzzer_sys::fuzz_target;

fn store() -> &'static (Store, std::path::PathBuf) {
    static STORE: OnceLock<(Store, std::path::PathBuf)> = OnceLock::new();
    STORE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ember-fuzz-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = Store::open(&root).expect("a fuzz store");
        (store, root)
    })
}

fuzz_target!(|data: &[u8]| {
    let (store, root) = store();
    std::fs::write(root.join("manifests").join("fuzzed"), data).unwrap();
    if let Ok(manifest) = store.load_manifest("fuzzed") {
        // The packs it lists are names under `packs/` (absent here: the whole-store fallback).
        let _ = store.index_snapshot(&manifest);
    }
    let working_sets = root.join("workingsets");
    std::fs::create_dir_all(&working_sets).unwrap();
    std::fs::write(working_sets.join("fuzzed"), data).unwrap();
    let _ = store.load_working_set("fuzzed");
});
