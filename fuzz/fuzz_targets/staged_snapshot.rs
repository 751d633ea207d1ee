//! A snapshot staged by a compromised VMM: a real staged snapshot (its pack, pack index and
//! manifest) edited as the input says, with the index's and the manifest's checksums made
//! right again on request (so the edits reach what lies behind them), then ingested into a
//! shared store. A bad staged snapshot must be refused with an error, never a panic, and
//! nothing it holds may be saved unless it verifies.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ember_snapshot_store::{
    Hash, IngestLimits, Manifest, MemoryRef, ObjectKind, Store, StoreOptions, PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

const PAGES: usize = 16;
const ID: &str = "staged";

struct Setup {
    shared: Arc<Store>,
    /// The staged snapshot's files: (path under the staging folder, bytes).
    template: Vec<(PathBuf, Vec<u8>)>,
    work: PathBuf,
}

fn memory(seed: u8) -> Vec<u8> {
    let mut mem = vec![0u8; PAGES * PAGE_SIZE];
    for (i, b) in mem.iter_mut().enumerate() {
        // Every fourth page stays zero.
        if (i / PAGE_SIZE) % 4 != 0 {
            *b = (i as u8).wrapping_mul(31) ^ seed ^ (i / PAGE_SIZE) as u8;
        }
    }
    mem
}

fn snapshot(store: &Store, id: &str, mem: &[u8]) {
    let mut w = store.writer().expect("a writer");
    let map = w.put_memory(mem, 1).expect("memory");
    let map_chunks = map.store(&mut w).expect("map");
    let state = w.put(ObjectKind::VmState, id.as_bytes()).expect("state");
    let memory = MemoryRef {
        size_bytes: map.size_bytes(),
        page_size: PAGE_SIZE as u32,
        map_chunks,
    };
    w.commit(&Manifest::new(id, state, memory)).expect("commit");
}

fn files(dir: &Path, under: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).expect("a staging folder") {
        let path = entry.expect("an entry").path();
        let rel = under.join(path.file_name().expect("a name"));
        if path.is_dir() {
            files(&path, &rel, out);
        } else if !rel.ends_with("store.lock") {
            out.push((rel, std::fs::read(&path).expect("a staged file")));
        }
    }
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // On a tmpfs where there is one: every input seals packs and saves manifests, fsyncs
        // included.
        let tmp = Some(Path::new("/dev/shm"))
            .filter(|p| p.is_dir())
            .map_or_else(std::env::temp_dir, Path::to_path_buf);
        let root = tmp.join(format!("ember-fuzz-staged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let shared = Arc::new(Store::open(root.join("shared")).expect("a shared store"));
        snapshot(&shared, "base", &memory(1));
        let staged = root.join("template");
        {
            let staging = Store::open_staging(&staged, shared.clone(), StoreOptions::default())
                .expect("a staging store");
            let mut mem = memory(1);
            mem[PAGE_SIZE + 7] ^= 0x55;
            snapshot(&staging, ID, &mem);
        }
        let mut template = Vec::new();
        files(&staged, Path::new(""), &mut template);
        template.sort();
        Setup {
            shared,
            template,
            work: root.join("work"),
        }
    })
}

/// Makes a file's checksum right again: a pack index's trailing BLAKE3, a manifest's first line.
fn reseal(path: &Path, bytes: &mut Vec<u8>) {
    if path.extension().is_some_and(|e| e == "idx") && bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let sum = *Hash::of(&bytes[..body]).as_bytes();
        bytes[body..].copy_from_slice(&sum);
    } else if path.starts_with("manifests") {
        if let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let json = bytes[nl + 1..].to_vec();
            *bytes = Hash::of(&json).to_hex().into_bytes();
            bytes.push(b'\n');
            bytes.extend_from_slice(&json);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let mut staged = setup.template.clone();
    // Edits: [file, flags, offset (u16 le), length, bytes…]; flags bit 0 truncates the file
    // at the offset instead of writing; the input's last byte, if odd, reseals every file.
    let mut rest = data;
    while let [file, flags, lo, hi, len, tail @ ..] = rest {
        let (_, bytes) = &mut staged[usize::from(*file) % setup.template.len()];
        let offset = usize::from(u16::from_le_bytes([*lo, *hi])) % (bytes.len() + 1);
        let take = usize::from(*len).min(tail.len());
        if flags & 1 == 1 {
            bytes.truncate(offset);
        } else {
            let end = (offset + take).min(bytes.len());
            bytes[offset..end].copy_from_slice(&tail[..end - offset]);
        }
        rest = &tail[take..];
    }
    if data.last().is_some_and(|b| b & 1 == 1) {
        for (path, bytes) in &mut staged {
            reseal(path, bytes);
        }
    }
    let _ = std::fs::remove_dir_all(&setup.work);
    for (path, bytes) in &staged {
        let path = setup.work.join(path);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("a folder");
        std::fs::write(&path, bytes).expect("a staged file");
    }
    let limits = IngestLimits {
        memory_bytes: (PAGES * PAGE_SIZE) as u64,
        max_disks: 1,
        max_disk_bytes: 1 << 20,
        max_staged_bytes: 1 << 20,
    };
    if setup.shared.ingest(&setup.work, ID, &limits).is_ok() {
        // What was saved restores, every page verified, exactly as the staged snapshot
        // (edited or not) said.
        let m = setup.shared.load_manifest(ID).expect("the ingested manifest");
        let map = setup.shared.load_memory_map(&m).expect("its memory map");
        let mut out = vec![0u8; map.size_bytes() as usize];
        map.restore_into(&setup.shared, &mut out).expect("its memory");
        setup.shared.delete_manifest(ID).expect("forget it for the next input");
    }
});
