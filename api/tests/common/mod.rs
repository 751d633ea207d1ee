//! Helpers shared by the VM test binaries (each includes this module).

use std::collections::HashSet;
use std::path::Path;

/// The page objects (hashes) of snapshot `id`'s memory in the store at `store_dir`; zero
/// pages are left out.
pub fn memory_objects(store_dir: &Path, id: &str) -> HashSet<String> {
    let store = ember_snapshot_store::Store::open(store_dir).unwrap();
    let manifest = store.load_manifest(id).unwrap();
    store
        .load_memory_map(&manifest)
        .unwrap()
        .pages
        .iter()
        .filter_map(|p| match p {
            ember_snapshot_store::PageRef::Object(hash) => Some(hash.to_string()),
            ember_snapshot_store::PageRef::Zero => None,
        })
        .collect()
}
