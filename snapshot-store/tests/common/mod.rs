//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ember_snapshot_store::{
    Hash, Manifest, MemoryMap, MemoryRef, ObjectKind, PackWriter, Store, PAGE_SIZE,
};

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `pages` pages: every `zero_every`-th page zero, the rest random from `seed`.
pub fn memory(pages: usize, zero_every: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut mem = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
        if zero_every == 0 || i % zero_every != 0 {
            rng.fill(page);
        }
    }
    mem
}

/// Stores a map and a state blob with `w` and returns the manifest (not saved).
pub fn manifest_for(w: &mut PackWriter<'_>, id: &str, map: &MemoryMap) -> Manifest {
    let chunks = map.store(w).unwrap();
    let state = w
        .put(ObjectKind::VmState, format!("state of {id}").as_bytes())
        .unwrap();
    Manifest::new(
        id,
        state,
        MemoryRef {
            size_bytes: map.size_bytes(),
            page_size: PAGE_SIZE as u32,
            map_chunks: chunks,
        },
    )
}

/// Writes a full snapshot of `mem` and commits it.
pub fn snapshot(store: &Store, id: &str, mem: &[u8]) -> Manifest {
    let mut w = store.writer().unwrap();
    let map = w.put_memory(mem, 2).unwrap();
    let m = manifest_for(&mut w, id, &map);
    w.commit(&m).unwrap();
    m
}

/// Restores a snapshot's memory eagerly.
pub fn restore(store: &Store, id: &str) -> Vec<u8> {
    let m = store.load_manifest(id).unwrap();
    let map = store.load_memory_map(&m).unwrap();
    let mut out = vec![0u8; map.size_bytes() as usize];
    map.restore_into(store, &mut out).unwrap();
    out
}

/// Flips one bit of a file at `offset`.
pub fn flip_byte(path: &std::path::Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, offset).unwrap();
}

/// Any page's hash in a map.
pub fn some_page(map: &MemoryMap) -> Hash {
    map.pages
        .iter()
        .find_map(|p| match p {
            ember_snapshot_store::PageRef::Object(h) => Some(*h),
            _ => None,
        })
        .unwrap()
}
