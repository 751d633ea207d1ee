use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;

use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::block::Disk;

const CS: u32 = 4096;

/// Base content: differs between neighbouring bytes and between chunks.
fn pattern(offset: u64) -> u8 {
    ((offset % 251) as u8) ^ ((offset >> 12) as u8).wrapping_mul(37)
}

fn base_image(size: u64) -> TempFile {
    let f = TempFile::new_with_prefix(std::env::temp_dir().join("ember-cow-base-")).unwrap();
    let data: Vec<u8> = (0..size).map(pattern).collect();
    f.as_file().write_all_at(&data, 0).unwrap();
    f
}

/// A path under the temp dir that does not exist yet; removed (if it exists) on drop.
struct ScratchPath(PathBuf);

impl ScratchPath {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "ember-cow-{tag}-{}-{}-{nanos}.overlay",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        assert!(!path.exists());
        ScratchPath(path)
    }
}

impl Drop for ScratchPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Setup {
    base: TempFile,
    overlay: ScratchPath,
    disk: CowDisk,
}

fn setup(size: u64, chunk_size: u32) -> Setup {
    let base = base_image(size);
    let overlay = ScratchPath::new("ov");
    let disk = CowDisk::create(base.as_path(), &overlay.0, chunk_size).unwrap();
    Setup {
        base,
        overlay,
        disk,
    }
}

fn read(d: &CowDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.read_at(&mut v, offset).unwrap();
    v
}

fn read_all(d: &CowDisk) -> Vec<u8> {
    read(d, 0, d.size() as usize)
}

fn base_bytes(s: &Setup) -> Vec<u8> {
    std::fs::read(s.base.as_path()).unwrap()
}

fn original(size: u64) -> Vec<u8> {
    (0..size).map(pattern).collect()
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn cow_disk_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<CowDisk>();
    check::<Disk>();
}

#[test]
fn create_checks_the_chunk_size() {
    let base = base_image(8192);
    for bad in [0, 1, 512, 1000, 2048, 4095, 4097, 12288, 3 << 20, u32::MAX] {
        let overlay = ScratchPath::new("bad-chunk");
        let err = CowDisk::create(base.as_path(), &overlay.0, bad).unwrap_err();
        assert!(
            matches!(err, BlockError::ChunkSize(c) if c == bad),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
        assert!(!overlay.0.exists(), "no overlay for a bad chunk size");
    }
    for good in [4096, 8192, COW_CHUNK_SIZE, 1 << 20, 1 << 31] {
        let overlay = ScratchPath::new("good-chunk");
        let d = CowDisk::create(base.as_path(), &overlay.0, good).unwrap();
        assert_eq!(d.chunk_size(), good);
        assert_eq!(d.chunk_count(), 8192u64.div_ceil(u64::from(good)));
    }
}

#[test]
fn create_refuses_an_existing_overlay() {
    let base = base_image(8192);
    let existing = base_image(100);
    let err = CowDisk::create(base.as_path(), existing.as_path(), CS).unwrap_err();
    match &err {
        BlockError::OverlayCreate { path, source } => {
            assert_eq!(path, existing.as_path());
            assert_eq!(source.kind(), ErrorKind::AlreadyExists);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err
        .to_string()
        .contains(&existing.as_path().display().to_string()));
    // Left alone: neither truncated nor removed.
    assert_eq!(std::fs::read(existing.as_path()).unwrap(), original(100));

    // The base itself is an existing file too.
    assert!(matches!(
        CowDisk::create(base.as_path(), base.as_path(), CS),
        Err(BlockError::OverlayCreate { .. })
    ));
    assert_eq!(std::fs::read(base.as_path()).unwrap(), original(8192));
}

#[test]
fn create_errors_for_a_bad_base() {
    let overlay = ScratchPath::new("bad-base");
    let missing = std::env::temp_dir().join("ember-cow-definitely-missing-base.img");
    let err = CowDisk::create(&missing, &overlay.0, CS).unwrap_err();
    assert!(
        matches!(&err, BlockError::Open { path, read_only: true, .. } if *path == missing),
        "{err}"
    );
    assert!(!overlay.0.exists());

    let err = CowDisk::create(&std::env::temp_dir(), &overlay.0, CS).unwrap_err();
    assert!(
        matches!(err, BlockError::NotAFile(_) | BlockError::Open { .. }),
        "{err}"
    );
    assert!(!overlay.0.exists());

    // An overlay in a directory that does not exist.
    let base = base_image(4096);
    let nowhere = missing.join("overlay");
    assert!(matches!(
        CowDisk::create(base.as_path(), &nowhere, CS),
        Err(BlockError::OverlayCreate { .. })
    ));
}

#[test]
fn fresh_disk_reads_the_base_and_has_a_sparse_overlay() {
    let size = 10 * u64::from(COW_CHUNK_SIZE);
    let s = setup(size, COW_CHUNK_SIZE);
    let d = &s.disk;
    assert_eq!(d.size(), size);
    assert_eq!(d.chunk_size(), COW_CHUNK_SIZE);
    assert_eq!(d.chunk_count(), 10);
    assert_eq!(d.chunk_len(9), COW_CHUNK_SIZE);
    assert_eq!(d.chunk_len(10), 0);
    assert_eq!(d.base_path(), s.base.as_path());
    assert_eq!(d.overlay_path(), s.overlay.0);
    assert!(d.written_chunks().is_empty());
    assert_eq!(d.written_chunk_count(), 0);

    let meta = std::fs::metadata(&s.overlay.0).unwrap();
    assert_eq!(meta.len(), size);
    // Sparse: (almost) no blocks allocated.
    assert!(meta.blocks() * 512 < size / 2, "{} blocks", meta.blocks());

    assert_eq!(read_all(d), original(size));
    assert_eq!(read(d, 12345, 100_000), original(size)[12345..112_345]);
    let mut chunk = vec![0xee; 3];
    d.read_chunk(4, &mut chunk).unwrap();
    assert_eq!(chunk, original(size)[4 * 65536..5 * 65536]);
}

#[test]
fn partial_write_copies_the_chunk_up() {
    let s = setup(8 * u64::from(CS), CS);
    let d = &s.disk;
    let data = fill(100, 7);
    d.write_at(&data, 2 * 4096 + 1000).unwrap();
    assert_eq!(d.written_chunks(), vec![2]);
    assert!(d.is_written(2));
    assert!(!d.is_written(1) && !d.is_written(3));

    let mut expected = original(8 * 4096);
    expected[2 * 4096 + 1000..2 * 4096 + 1100].copy_from_slice(&data);
    assert_eq!(read_all(d), expected);
    // The overlay holds the whole chunk: the copied-up base around the new bytes.
    let mut ov = vec![0u8; 4096];
    File::open(&s.overlay.0)
        .unwrap()
        .read_exact_at(&mut ov, 2 * 4096)
        .unwrap();
    assert_eq!(ov, expected[2 * 4096..3 * 4096]);

    // A second write to the now-present chunk goes straight to the overlay.
    let more = fill(10, 99);
    d.write_at(&more, 2 * 4096).unwrap();
    expected[2 * 4096..2 * 4096 + 10].copy_from_slice(&more);
    assert_eq!(read_all(d), expected);
    assert_eq!(d.written_chunks(), vec![2]);
    assert_eq!(base_bytes(&s), original(8 * 4096));
}

#[test]
fn whole_chunk_write_needs_no_copy_up() {
    let s = setup(4 * u64::from(CS), CS);
    let data = fill(4096, 3);
    s.disk.write_at(&data, 4096).unwrap();
    assert_eq!(s.disk.written_chunks(), vec![1]);
    assert_eq!(read(&s.disk, 4096, 4096), data);
    assert_eq!(read(&s.disk, 0, 4096), original(4096));
}

#[test]
fn writes_spanning_chunk_boundaries() {
    let size = 16 * u64::from(CS);
    let s = setup(size, CS);
    let d = &s.disk;
    let mut expected = original(size);

    // From the middle of chunk 1 to the middle of chunk 4: two partial ends, two whole chunks.
    let off = 4096 + 3000;
    let data = fill(3 * 4096 + 500, 11);
    d.write_at(&data, off).unwrap();
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert_eq!(d.written_chunks(), vec![1, 2, 3, 4]);
    assert_eq!(read_all(d), expected);

    // Exactly across one boundary: the last byte of chunk 9 and the first of chunk 10.
    d.write_at(&[0xab, 0xcd], 10 * 4096 - 1).unwrap();
    expected[10 * 4096 - 1] = 0xab;
    expected[10 * 4096] = 0xcd;
    assert_eq!(d.written_chunks(), vec![1, 2, 3, 4, 9, 10]);

    // Ending exactly on a boundary does not touch the next chunk.
    d.write_at(&fill(96, 5), 13 * 4096 - 96).unwrap();
    expected[13 * 4096 - 96..13 * 4096].copy_from_slice(&fill(96, 5));
    assert_eq!(d.written_chunks(), vec![1, 2, 3, 4, 9, 10, 12]);

    assert_eq!(read_all(d), expected);
    // Reads spanning present and absent chunks.
    assert_eq!(
        read(d, 8 * 4096 + 7, 3 * 4096),
        expected[8 * 4096 + 7..11 * 4096 + 7]
    );
    assert_eq!(base_bytes(&s), original(size));
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_writes_match_a_model_and_never_touch_the_base() {
    let size = 37 * u64::from(CS) + 1234;
    let s = setup(size, CS);
    let d = &s.disk;
    let before = base_bytes(&s);
    let mut model = original(size);
    let mut touched = BTreeSet::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300u32 {
        let offset = rng.below(size);
        let len = rng.below((size - offset).min(3 * 4096 + 17)) as usize + 1;
        let len = len.min((size - offset) as usize);
        let data = fill(len, round as u8);
        d.write_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        for c in offset / 4096..=(offset + len as u64 - 1) / 4096 {
            touched.insert(c);
        }

        let roff = rng.below(size);
        let rlen = rng.below((size - roff).min(5 * 4096)) as usize;
        assert_eq!(
            read(d, roff, rlen),
            model[roff as usize..roff as usize + rlen],
            "round {round}: read {rlen} at {roff}"
        );
    }
    assert_eq!(read_all(d), model);
    assert_eq!(d.written_chunks(), touched.into_iter().collect::<Vec<_>>());
    d.sync_data().unwrap();
    assert_eq!(base_bytes(&s), before);
    assert_eq!(before, original(size));
}

#[test]
fn read_chunk_load_chunk_round_trip() {
    let size = 20 * u64::from(CS) + 777;
    let s = setup(size, CS);
    let d = &s.disk;
    d.write_at(&fill(13_000, 1), 3 * 4096 + 5).unwrap();
    d.write_at(&fill(50, 2), 11 * 4096).unwrap();
    d.write_at(&fill(700, 3), 20 * 4096 + 77).unwrap(); // the short last chunk
    let written = d.written_chunks();
    assert_eq!(written, vec![3, 4, 5, 6, 11, 20]);

    // Capture, as a snapshot would.
    let captured: Vec<(u64, Vec<u8>)> = written
        .iter()
        .map(|&i| {
            let mut buf = Vec::new();
            d.read_chunk(i, &mut buf).unwrap();
            assert_eq!(buf.len(), d.chunk_len(i) as usize);
            (i, buf)
        })
        .collect();
    assert_eq!(captured.last().unwrap().1.len(), 777);

    // Restore into a fresh disk over the same base.
    let overlay = ScratchPath::new("restore");
    let restored = CowDisk::create(s.base.as_path(), &overlay.0, CS).unwrap();
    for (i, data) in &captured {
        restored.load_chunk(*i, data).unwrap();
    }
    assert_eq!(restored.written_chunks(), written);
    assert_eq!(read_all(&restored), read_all(d));
    // And they stay independent afterwards.
    restored.write_at(&[1, 2, 3], 0).unwrap();
    assert_eq!(read(d, 0, 3), original(3));
    assert_eq!(base_bytes(&s), original(size));
}

#[test]
fn load_chunk_overrides_and_checks_its_input() {
    let s = setup(3 * u64::from(CS) + 1000, CS);
    let d = &s.disk;
    // Loading over a written chunk replaces it entirely.
    d.write_at(&[9; 10], 4096).unwrap();
    d.load_chunk(1, &fill(4096, 42)).unwrap();
    assert_eq!(read(d, 4096, 4096), fill(4096, 42));

    let err = d.load_chunk(0, &[0; 4095]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = d.load_chunk(3, &[0; 4096]).unwrap_err(); // the last chunk is 1000 bytes
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = d.load_chunk(4, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = d.load_chunk(u64::MAX, &[0; 4096]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(d.written_chunks(), vec![1]);

    d.load_chunk(3, &fill(1000, 8)).unwrap();
    assert_eq!(d.written_chunks(), vec![1, 3]);
    assert_eq!(read(d, 3 * 4096, 1000), fill(1000, 8));
}

#[test]
fn two_disks_over_one_base_are_isolated() {
    let size = 8 * u64::from(COW_CHUNK_SIZE);
    let base = base_image(size);
    let (oa, ob) = (ScratchPath::new("a"), ScratchPath::new("b"));
    let a = CowDisk::create(base.as_path(), &oa.0, COW_CHUNK_SIZE).unwrap();
    let b = CowDisk::create(base.as_path(), &ob.0, COW_CHUNK_SIZE).unwrap();

    a.write_at(&fill(5000, 1), 70_000).unwrap();
    b.write_at(&fill(5000, 2), 72_000).unwrap();
    b.write_at(&fill(10, 3), 300_000).unwrap();

    let mut ea = original(size);
    ea[70_000..75_000].copy_from_slice(&fill(5000, 1));
    let mut eb = original(size);
    eb[72_000..77_000].copy_from_slice(&fill(5000, 2));
    eb[300_000..300_010].copy_from_slice(&fill(10, 3));
    assert_eq!(read_all(&a), ea);
    assert_eq!(read_all(&b), eb);
    assert_eq!(a.written_chunks(), vec![1]);
    assert_eq!(b.written_chunks(), vec![1, 4]);
    assert_eq!(std::fs::read(base.as_path()).unwrap(), original(size));
}

#[test]
fn out_of_range_accesses_are_errors() {
    let size = 4 * u64::from(CS) + 100;
    let s = setup(size, CS);
    let d = &s.disk;
    let mut buf = [0u8; 8];
    for offset in [size - 7, size, size + 1, u64::MAX - 3, u64::MAX] {
        let err = d.read_at(&mut buf, offset).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "read at {offset}");
        let err = d.write_at(&buf, offset).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "write at {offset}");
    }
    // Nothing was written by the failed writes.
    assert!(d.written_chunks().is_empty());
    // Up to the end exactly is fine, and so is an empty access at the end.
    d.read_at(&mut buf, size - 8).unwrap();
    d.write_at(&buf, size - 8).unwrap();
    d.read_at(&mut [], size).unwrap();
    d.write_at(&[], size).unwrap();
    assert_eq!(
        d.read_at(&mut [], size + 1).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );

    let mut chunk = Vec::new();
    assert_eq!(
        d.read_chunk(5, &mut chunk).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        d.read_chunk(u64::MAX, &mut chunk).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert!(!d.is_written(u64::MAX));
    assert_eq!(d.chunk_len(u64::MAX), 0);
}

#[test]
fn short_last_chunk() {
    let size = 3 * u64::from(CS) + 1000;
    let s = setup(size, CS);
    let d = &s.disk;
    assert_eq!(d.size(), size);
    assert_eq!(d.chunk_count(), 4);
    assert_eq!(d.chunk_len(2), 4096);
    assert_eq!(d.chunk_len(3), 1000);
    assert_eq!(d.chunk_len(4), 0);

    let mut chunk = Vec::new();
    d.read_chunk(3, &mut chunk).unwrap();
    assert_eq!(chunk, original(size)[3 * 4096..]);

    // Partial write into the short chunk copies up its 1000 bytes only.
    d.write_at(&[0x5a; 10], size - 10).unwrap();
    let mut expected = original(size);
    expected[size as usize - 10..].fill(0x5a);
    assert_eq!(read_all(d), expected);
    assert_eq!(d.written_chunks(), vec![3]);
    assert_eq!(std::fs::metadata(&s.overlay.0).unwrap().len(), size);

    // A write covering the whole short chunk on a fresh disk.
    let overlay = ScratchPath::new("short");
    let e = CowDisk::create(s.base.as_path(), &overlay.0, CS).unwrap();
    e.write_at(&fill(1000, 4), 3 * 4096).unwrap();
    assert_eq!(read(&e, 3 * 4096, 1000), fill(1000, 4));
    assert_eq!(read(&e, 0, 3 * 4096), original(3 * 4096));
    assert_eq!(e.written_chunks(), vec![3]);

    // A base smaller than one chunk.
    let tiny = setup(100, COW_CHUNK_SIZE);
    assert_eq!(tiny.disk.chunk_count(), 1);
    assert_eq!(tiny.disk.chunk_len(0), 100);
    tiny.disk.write_at(&[1], 50).unwrap();
    let mut expected = original(100);
    expected[50] = 1;
    assert_eq!(read_all(&tiny.disk), expected);
}

#[test]
fn empty_base() {
    let s = setup(0, CS);
    assert_eq!(s.disk.size(), 0);
    assert_eq!(s.disk.chunk_count(), 0);
    s.disk.read_at(&mut [], 0).unwrap();
    assert!(s.disk.write_at(&[0], 0).is_err());
    assert!(s.disk.written_chunks().is_empty());
}

#[test]
fn overlay_is_removed_on_drop_unless_kept() {
    let s = setup(8192, CS);
    let path = s.overlay.0.clone();
    s.disk.write_at(&[1; 100], 10).unwrap();
    assert!(path.exists());
    drop(s.disk);
    assert!(!path.exists());

    let kept = setup(8192, CS);
    kept.disk.write_at(&[7; 100], 4096).unwrap();
    kept.disk.remove_overlay_on_drop(false);
    drop(kept.disk);
    // Still there, with the written chunk (ScratchPath removes it at the end of the test).
    let ov = std::fs::read(&kept.overlay.0).unwrap();
    assert_eq!(ov.len(), 8192);
    assert_eq!(ov[4096..4196], [7; 100]);

    // Turned off and on again: removed.
    let again = setup(4096, CS);
    again.disk.remove_overlay_on_drop(false);
    again.disk.remove_overlay_on_drop(true);
    drop(again.disk);
    assert!(!again.overlay.0.exists());

    // Already gone: dropping does not complain or panic.
    let gone = setup(4096, CS);
    std::fs::remove_file(&gone.overlay.0).unwrap();
    drop(gone.disk);
}

#[test]
fn concurrent_reader_sees_whole_chunks() {
    // The snapshot side reads chunks from another thread while the guest writes: each chunk
    // it reads is either all base or all new data, never a copy-up in progress.
    let chunks = 64u64;
    let s = setup(chunks * u64::from(CS), CS);
    let d = &s.disk;
    let orig = original(chunks * 4096);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for c in 0..chunks {
                // Partial writes, so each one is a copy-up.
                d.write_at(&[0xff; 512], c * 4096 + 1024).unwrap();
            }
        });
        scope.spawn(|| {
            let mut buf = Vec::new();
            for _ in 0..20 {
                let written = d.written_chunks();
                for c in 0..chunks {
                    d.read_chunk(c, &mut buf).unwrap();
                    let base = &orig[(c * 4096) as usize..][..4096];
                    let mut new = base.to_vec();
                    new[1024..1536].fill(0xff);
                    assert!(buf == base || buf == new, "chunk {c} is torn");
                    if written.contains(&c) {
                        assert_eq!(buf, new, "chunk {c} listed as written");
                    }
                }
            }
        });
    });
    assert_eq!(d.written_chunks(), (0..chunks).collect::<Vec<_>>());
}

#[test]
fn disk_over_a_cow_disk() {
    let size = 6 * u64::from(COW_CHUNK_SIZE) + 512 + 100;
    let base = base_image(size);
    let overlay = ScratchPath::new("disk");
    let disk = Disk::open_cow(base.as_path(), &overlay.0, "cow-disk").unwrap();
    assert!(!disk.read_only());
    assert!(disk.file().is_none());
    // The capacity is rounded down to whole sectors; the CoW disk keeps the full size.
    assert_eq!(disk.sectors(), 6 * 128 + 1);
    assert_eq!(disk.size(), size - 100);
    let cow = disk.cow().unwrap();
    assert_eq!(cow.size(), size);
    assert_eq!(cow.chunk_size(), COW_CHUNK_SIZE);
    assert_eq!(cow.overlay_path(), overlay.0);
    let mut id = b"cow-disk".to_vec();
    id.resize(20, 0);
    assert_eq!(disk.id().to_vec(), id);

    disk.write_at(&[0x11; 1024], 65536 - 512).unwrap();
    disk.sync_data().unwrap();
    let mut buf = vec![0u8; 2048];
    disk.read_at(&mut buf, 65536 - 1024).unwrap();
    let mut expected = original(size)[65536 - 1024..65536 + 1024].to_vec();
    expected[512..1536].fill(0x11);
    assert_eq!(buf, expected);
    assert_eq!(cow.written_chunks(), vec![0, 1]);

    // Disk bounds are the guest-visible capacity, checked before the CoW disk's.
    let end = disk.size();
    assert_eq!(
        disk.read_at(&mut [0; 1], end).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        disk.write_at(&[0; 1], end).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(std::fs::read(base.as_path()).unwrap(), original(size));

    // An existing overlay path is refused.
    assert!(matches!(
        Disk::open_cow(base.as_path(), base.as_path(), "x"),
        Err(BlockError::OverlayCreate { .. })
    ));

    drop(disk);
    assert!(!overlay.0.exists());

    // from_cow keeps a custom chunk size.
    let overlay = ScratchPath::new("from");
    let cow = CowDisk::create(base.as_path(), &overlay.0, 8192).unwrap();
    let disk = Disk::from_cow(std::sync::Arc::new(cow), "y");
    assert_eq!(disk.cow().unwrap().chunk_size(), 8192);
}

#[test]
fn raw_disk_read_write_and_bounds() {
    let img = base_image(4096 + 100);
    let disk = Disk::open(img.as_path(), false, "raw").unwrap();
    assert!(disk.cow().is_none());
    assert!(disk.file().is_some());
    assert_eq!(disk.size(), 4096);
    disk.write_at(&[1, 2, 3], 10).unwrap();
    let mut buf = [0u8; 3];
    disk.read_at(&mut buf, 10).unwrap();
    assert_eq!(buf, [1, 2, 3]);
    disk.sync_data().unwrap();
    // Past the capacity: refused, and the file does not grow.
    assert_eq!(
        disk.write_at(&[0; 8], 4096 - 4).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        disk.read_at(&mut [0; 8], u64::MAX).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(std::fs::metadata(img.as_path()).unwrap().len(), 4196);

    let ro = Disk::open(img.as_path(), true, "ro").unwrap();
    assert_eq!(
        ro.write_at(&[0; 1], 0).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    ro.read_at(&mut buf, 10).unwrap();
    assert_eq!(buf, [1, 2, 3]);
}

/// A snapshot's chunks: chunk i is filled with byte `i + 100`; `fail` makes reads error.
struct SnapshotChunks {
    reads: std::sync::Mutex<Vec<u64>>,
    fail: bool,
}

impl ChunkSource for SnapshotChunks {
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.lock().unwrap().push(index);
        if self.fail {
            return Err(io::Error::other(format!(
                "chunk {index} is corrupt in the store"
            )));
        }
        buf.fill(index as u8 + 100);
        Ok(())
    }
}

fn snapshot_chunks(fail: bool) -> Arc<SnapshotChunks> {
    Arc::new(SnapshotChunks {
        reads: std::sync::Mutex::new(Vec::new()),
        fail,
    })
}

#[test]
fn lazy_chunks_load_on_first_read_once_and_survive_writes() {
    let mut s = setup(8 * u64::from(CS), CS);
    let source = snapshot_chunks(false);
    s.disk.load_lazily(source.clone(), [1, 3]).unwrap();
    assert_eq!(s.disk.pending_chunks(), vec![1, 3]);
    assert!(s.disk.written_chunks().is_empty());
    assert!(
        source.reads.lock().unwrap().is_empty(),
        "nothing is read up front"
    );

    // A read spanning chunks 0..2 gets the base, then the snapshot's chunk 1.
    let got = read(&s.disk, u64::from(CS) - 2, 4);
    let base = base_bytes(&s);
    assert_eq!(&got[..2], &base[CS as usize - 2..CS as usize]);
    assert_eq!(&got[2..], &[101, 101]);
    assert_eq!(s.disk.pending_chunks(), vec![3]);
    assert_eq!(s.disk.written_chunks(), vec![1]);
    // Read again: from the overlay, not the source.
    assert_eq!(read(&s.disk, u64::from(CS), 3), vec![101; 3]);
    assert_eq!(*source.reads.lock().unwrap(), vec![1]);

    // A partial write to a pending chunk splices into the snapshot's content, not the base's.
    s.disk.write_at(&[7, 7], 3 * u64::from(CS) + 10).unwrap();
    let chunk3 = read(&s.disk, 3 * u64::from(CS), CS as usize);
    assert_eq!(&chunk3[..10], &[103; 10]);
    assert_eq!(&chunk3[10..12], &[7, 7]);
    assert_eq!(&chunk3[12..], &vec![103; CS as usize - 12][..]);
    assert!(s.disk.pending_chunks().is_empty());
    assert_eq!(s.disk.written_chunks(), vec![1, 3]);
    // Untouched chunks are still the base's and the base is unchanged.
    assert_eq!(
        read(&s.disk, 5 * u64::from(CS), 4),
        base[5 * CS as usize..][..4].to_vec()
    );
    assert_eq!(base_bytes(&s), original(8 * u64::from(CS)));
}

#[test]
fn a_failing_chunk_source_is_an_io_error_and_stays_pending() {
    let mut s = setup(4 * u64::from(CS), CS);
    s.disk.load_lazily(snapshot_chunks(true), [2]).unwrap();
    let mut buf = vec![0u8; 16];
    let err = s.disk.read_at(&mut buf, 2 * u64::from(CS)).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(s.disk.write_at(&[1], 2 * u64::from(CS)).is_err());
    assert_eq!(s.disk.pending_chunks(), vec![2], "never marked loaded");
    // Other chunks still work.
    s.disk.write_at(&[9; 4], 0).unwrap();
    assert_eq!(read(&s.disk, 0, 4), vec![9; 4]);
}

#[test]
fn load_lazily_checks_its_input() {
    let mut s = setup(4 * u64::from(CS), CS);
    assert!(
        s.disk.load_lazily(snapshot_chunks(false), [4]).is_err(),
        "past the end"
    );
    s.disk.write_at(&[1; 4], 0).unwrap();
    assert!(
        s.disk.load_lazily(snapshot_chunks(false), [0]).is_err(),
        "already written"
    );
    s.disk.load_lazily(snapshot_chunks(false), [1]).unwrap();
    assert_eq!(s.disk.pending_chunks(), vec![1]);
}
