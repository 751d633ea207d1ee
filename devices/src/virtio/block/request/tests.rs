use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::tempfile::TempFile;

use super::*;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = 0x1000;
const STATUS: u64 = 0x1100;
const DATA: u64 = 0x10_0000;
const DISK_SIZE: u64 = 1 << 20;
const POISON: u8 = 0xaa;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Setup {
    mem: GuestMemoryMmap,
    file: TempFile,
    disk: Disk,
}

fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn setup_with(read_only: bool, size: u64) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let file = TempFile::new_with_prefix(std::env::temp_dir().join("ember-blk-test-")).unwrap();
    let data: Vec<u8> = (0..size).map(pattern).collect();
    file.as_file().write_all_at(&data, 0).unwrap();
    let disk = Disk::open(file.as_path(), read_only, "ember-disk-0").unwrap();
    Setup { mem, file, disk }
}

/// A copy-on-write disk over a base holding `pattern`; `file` is the base. The overlay sits
/// next to it and is removed when the disk is dropped.
fn setup_cow(size: u64) -> Setup {
    let mut s = setup_with(true, size);
    let overlay = s.file.as_path().with_extension("overlay");
    s.disk = Disk::open_cow(s.file.as_path(), &overlay, "ember-cow-0").unwrap();
    s
}

fn setup(read_only: bool) -> Setup {
    setup_with(read_only, DISK_SIZE)
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A well-formed chain at descriptor indices `first..`: NEXT links added automatically.
fn chain_at(first: u16, parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let i = i as u16;
            if usize::from(i) + 1 < parts.len() {
                raw(addr, len, flags | VRING_DESC_F_NEXT as u16, first + i + 1)
            } else {
                raw(addr, len, flags, 0)
            }
        })
        .collect()
}

fn chain(parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    chain_at(0, parts)
}

fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Outcome of submitting one chain: `(used length, status byte)`; the used length is `None`
/// when nothing was added to the used ring.
fn submit(s: &Setup, descs: &[RawDescriptor]) -> (Option<u32>, u8) {
    s.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
    let vq = MockSplitQueue::new(&s.mem, QSIZE);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let used_any = process_queue(&mut q, &s.mem, &s.disk);
    let used_idx = vq.used().idx().load();
    assert_eq!(used_any, used_idx == 1);
    let len = (used_idx == 1).then(|| {
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.id(), 0);
        elem.len()
    });
    let status: u8 = s.mem.read_obj(GuestAddress(STATUS)).unwrap();
    (len, status)
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn file_bytes(s: &Setup, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    s.file.as_file().read_exact_at(&mut v, offset).unwrap();
    v
}

/// Header, then `data`, then the status byte.
fn request(data: &[(u64, u32, u16)]) -> Vec<(u64, u32, u16)> {
    let mut v = vec![(HDR, 16, R)];
    v.extend_from_slice(data);
    v.push((STATUS, 1, W));
    v
}

#[test]
fn write_then_read_round_trip() {
    let s = setup(false);
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    s.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();

    // OUT: two 4 KiB data descriptors at sector 8.
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 8);
    let descs = chain(&request(&[(DATA, 4096, R), (DATA + 4096, 4096, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_OK));
    assert_eq!(file_bytes(&s, 8 * 512, 8192), payload);
    // Neighbouring sectors untouched.
    assert_eq!(file_bytes(&s, 8 * 512 - 1, 1), vec![pattern(8 * 512 - 1)]);
    assert_eq!(
        file_bytes(&s, 8 * 512 + 8192, 1),
        vec![pattern(8 * 512 + 8192)]
    );

    // IN: read it back into different buffers, split 512 + 7680.
    let back = DATA + 0x10000;
    write_header(&s.mem, VIRTIO_BLK_T_IN, 8);
    let descs = chain(&request(&[(back, 512, W), (back + 0x1000, 7680, W)]));
    assert_eq!(submit(&s, &descs), (Some(8192 + 1), STATUS_OK));
    let mut got = guest_bytes(&s.mem, back, 512);
    got.extend(guest_bytes(&s.mem, back + 0x1000, 7680));
    assert_eq!(got, payload);

    // The device wrote through vm-memory: the dirty bitmap saw it.
    let region = s.mem.find_region(GuestAddress(back)).unwrap();
    assert!(region.bitmap().dirty_at(back as usize));
    assert!(region.bitmap().dirty_at((back + 0x1000 + 7679) as usize));
}

#[test]
fn large_read_is_copied_in_chunks() {
    let s = setup(false);
    let len = 3 * COPY_CHUNK as u32 + 512;
    write_header(&s.mem, VIRTIO_BLK_T_IN, 1);
    let descs = chain(&request(&[(DATA, len, W)]));
    assert_eq!(submit(&s, &descs), (Some(len + 1), STATUS_OK));
    assert_eq!(
        guest_bytes(&s.mem, DATA, len as usize),
        file_bytes(&s, 512, len as usize)
    );
}

#[test]
fn last_sector_is_accessible() {
    let s = setup(false);
    let last = DISK_SIZE / 512 - 1;
    write_header(&s.mem, VIRTIO_BLK_T_IN, last);
    let descs = chain(&request(&[(DATA, 512, W)]));
    assert_eq!(submit(&s, &descs), (Some(513), STATUS_OK));
}

#[test]
fn flush() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
    let descs = chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_OK));

    let ro = setup(true);
    write_header(&ro.mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(submit(&ro, &descs), (Some(1), STATUS_OK));
}

#[test]
fn get_id() {
    let s = setup(false);
    s.mem.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
    write_header(&s.mem, VIRTIO_BLK_T_GET_ID, 0);
    let descs = chain(&request(&[(DATA, 20, W)]));
    assert_eq!(submit(&s, &descs), (Some(21), STATUS_OK));
    let mut expected = b"ember-disk-0".to_vec();
    expected.resize(20, 0);
    assert_eq!(guest_bytes(&s.mem, DATA, 20), expected);
    assert_eq!(guest_bytes(&s.mem, DATA + 20, 1), vec![0xff]);

    // Long ids are truncated to 20 bytes, with no terminator.
    let d = Disk::open(s.file.as_path(), false, "0123456789abcdefghijKLMN").unwrap();
    assert_eq!(d.id(), b"0123456789abcdefghij");

    // A GET_ID whose buffer is read-only is an I/O error.
    let descs = chain(&request(&[(DATA, 20, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn unknown_request_type_is_unsupported() {
    let s = setup(false);
    for t in [2u32, 11, 13, 0xdead_beef] {
        write_header(&s.mem, t, 0);
        let descs = chain(&request(&[(DATA, 512, W)]));
        assert_eq!(submit(&s, &descs), (Some(1), STATUS_UNSUPP), "type {t}");
    }
}

#[test]
fn descriptor_loop_completes_with_zero_length() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    let descs = [
        raw(HDR, 16, n, 1),
        raw(DATA, 512, W | n, 2),
        raw(STATUS, 1, W | n, 1),
    ];
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    // A self-loop on the head.
    let descs = [raw(HDR, 16, n, 0)];
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
}

#[test]
fn next_out_of_range_completes_with_zero_length() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let n = VRING_DESC_F_NEXT as u16;
    let descs = [raw(HDR, 16, n, 1), raw(DATA, 512, W | n, QSIZE + 100)];
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    let descs = [raw(HDR, 16, n, u16::MAX)];
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
}

#[test]
fn head_index_out_of_range_is_dropped() {
    let s = setup(false);
    let vq = MockSplitQueue::new(&s.mem, QSIZE);
    vq.avail()
        .ring()
        .ref_at(0)
        .unwrap()
        .store(u16::to_le(QSIZE + 3));
    vq.avail().idx().store(u16::to_le(1));
    let mut q: Queue = vq.create_queue().unwrap();
    // Nothing can be completed (the used ring only takes in-range heads), but no panic.
    assert!(!process_queue(&mut q, &s.mem, &s.disk));
    assert_eq!(q.next_avail(), 1);
}

#[test]
fn avail_index_too_far_ahead_stops_processing() {
    let s = setup(false);
    let vq = MockSplitQueue::new(&s.mem, QSIZE);
    vq.avail().idx().store(u16::to_le(QSIZE + 5));
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(!process_queue(&mut q, &s.mem, &s.disk));
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn bad_indirect_table_completes_with_zero_length() {
    let s = setup(false);
    // Indirect table length not a multiple of 16, and one pointing outside memory.
    for (addr, len) in [(DATA, 17u32), (u64::MAX - 8, 64)] {
        let descs = [raw(addr, len, VRING_DESC_F_INDIRECT as u16, 0)];
        assert_eq!(submit(&s, &descs), (Some(0), POISON));
    }
}

#[test]
fn data_outside_guest_memory_is_an_io_error() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    // Entirely outside, and straddling the end of memory.
    for addr in [MEM_SIZE as u64 + 0x1000, MEM_SIZE as u64 - 256] {
        let descs = chain(&request(&[(addr, 512, W)]));
        assert_eq!(
            submit(&s, &descs),
            (Some(1), STATUS_IOERR),
            "addr {addr:#x}"
        );
    }
    // OUT from outside memory.
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 0);
    let descs = chain(&request(&[(MEM_SIZE as u64, 512, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    assert_eq!(
        file_bytes(&s, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn header_outside_guest_memory_is_an_io_error() {
    let s = setup(false);
    let descs = chain(&[(MEM_SIZE as u64 + 16, 16, R), (STATUS, 1, W)]);
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn wrapping_data_address_is_an_io_error() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let descs = chain(&request(&[(u64::MAX - 511, 1024, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    let descs = chain(&request(&[(u64::MAX, 0xffff_fe00, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn bad_header_is_an_io_error() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    // Write-only header.
    let descs = chain(&request(&[(DATA, 512, W)]));
    let mut bad = descs.clone();
    bad[0] = raw(HDR, 16, W | VRING_DESC_F_NEXT as u16, 1);
    assert_eq!(submit(&s, &bad), (Some(1), STATUS_IOERR));
    // Header too short.
    let descs = chain(&[(HDR, 15, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn wrong_data_direction_is_an_io_error() {
    let s = setup(false);
    s.mem
        .write_slice(&[0x55; 1024], GuestAddress(DATA))
        .unwrap();

    // IN with a device-readable data buffer: guest memory must stay unchanged.
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let descs = chain(&request(&[(DATA, 512, W), (DATA + 512, 512, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    assert_eq!(guest_bytes(&s.mem, DATA, 1024), vec![0x55; 1024]);

    // OUT with a device-writable data buffer: the file must stay unchanged.
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 0);
    let descs = chain(&request(&[(DATA, 512, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    assert_eq!(
        file_bytes(&s, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn sector_past_the_end_is_an_io_error() {
    let s = setup(false);
    let sectors = DISK_SIZE / 512;
    for (sector, len) in [
        (sectors, 512u32),
        (sectors - 1, 1024),
        (u64::MAX / 1024, 512),
    ] {
        write_header(&s.mem, VIRTIO_BLK_T_IN, sector);
        let descs = chain(&request(&[(DATA, len, W)]));
        assert_eq!(
            submit(&s, &descs),
            (Some(1), STATUS_IOERR),
            "sector {sector}"
        );
    }
}

#[test]
fn offset_overflow_is_an_io_error() {
    let s = setup(false);
    // sector * 512 overflows.
    let sector = u64::MAX / 512 + 1;
    write_header(&s.mem, VIRTIO_BLK_T_IN, sector);
    let descs = chain(&request(&[(DATA, 512, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    // sector * 512 fits, + len does not.
    let sector = u64::MAX / 512;
    write_header(&s.mem, VIRTIO_BLK_T_OUT, sector);
    let descs = chain(&request(&[(DATA, 1024, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));

    let err = parse_request(
        &chain(&request(&[(DATA, 1024, R)]))
            .into_iter()
            .map(SplitDescriptor::from)
            .collect::<Vec<_>>(),
        GuestAddress(STATUS),
        &s.mem,
        &s.disk,
    )
    .unwrap_err();
    assert!(matches!(err, RequestError::OffsetOverflow { .. }), "{err}");
}

#[test]
fn unaligned_length_is_an_io_error() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let descs = chain(&request(&[(DATA, 100, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 0);
    let descs = chain(&request(&[(DATA, 512, R), (DATA + 512, 10, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn write_to_read_only_disk_is_an_io_error() {
    let s = setup(true);
    assert!(s.disk.read_only());
    s.mem.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 0);
    let descs = chain(&request(&[(DATA, 512, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    assert_eq!(
        file_bytes(&s, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
    // Reads still work.
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    let descs = chain(&request(&[(DATA, 512, W)]));
    assert_eq!(submit(&s, &descs), (Some(513), STATUS_OK));
}

#[test]
fn missing_or_unusable_status_completes_with_zero_length() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 0);
    // Header only.
    let descs = chain(&[(HDR, 16, R)]);
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    // Last descriptor device-readable (the data buffer, no status at all).
    let descs = chain(&[(HDR, 16, R), (DATA, 512, R)]);
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    // Zero-length status.
    let descs = chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]);
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    // Status outside guest memory.
    let descs = chain(&[(HDR, 16, R), (DATA, 512, R), (MEM_SIZE as u64, 1, W)]);
    assert_eq!(submit(&s, &descs), (Some(0), POISON));
    // Nothing was written to the disk by any of these.
    assert_eq!(
        file_bytes(&s, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn several_chains_in_one_drain() {
    let s = setup(false);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 2);
    let vq = MockSplitQueue::new(&s.mem, QSIZE);
    // Three chains sharing the header; each reads one sector into its own buffer.
    let mut descs = Vec::new();
    for i in 0..3u64 {
        let first = descs.len() as u16;
        descs.extend(chain_at(
            first,
            &[
                (HDR, 16, R),
                (DATA + i * 0x1000, 512, W),
                (STATUS + i, 1, W),
            ],
        ));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(process_queue(&mut q, &s.mem, &s.disk));
    assert_eq!(vq.used().idx().load(), 3);
    for i in 0..3u64 {
        let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (i as u32 * 3, 513));
        assert_eq!(
            s.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            STATUS_OK
        );
        assert_eq!(
            guest_bytes(&s.mem, DATA + i * 0x1000, 512),
            file_bytes(&s, 1024, 512)
        );
    }
    // Nothing left: a second drain does nothing.
    assert!(!process_queue(&mut q, &s.mem, &s.disk));
}

#[test]
fn unaligned_image_size_is_rounded_down() {
    let s = setup_with(false, 4096 + 100);
    assert_eq!(s.disk.sectors(), 8);
    write_header(&s.mem, VIRTIO_BLK_T_IN, 8);
    let descs = chain(&request(&[(DATA, 512, W)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
}

#[test]
fn write_then_read_over_a_cow_disk() {
    let s = setup_cow(DISK_SIZE);
    let overlay = s.disk.cow().unwrap().overlay_path().to_owned();
    let base_before = file_bytes(&s, 0, DISK_SIZE as usize);
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8 | 1).collect();
    s.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();

    // OUT: 8 KiB at sector 124, across the boundary of the first two 64 KiB chunks.
    write_header(&s.mem, VIRTIO_BLK_T_OUT, 124);
    let descs = chain(&request(&[(DATA, 4096, R), (DATA + 4096, 4096, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_OK));
    let cow = s.disk.cow().unwrap();
    assert_eq!(cow.written_chunks(), vec![0, 1]);

    // FLUSH syncs the overlay.
    write_header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
    let descs = chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_OK));

    // IN: the written sectors plus one base sector on each side.
    let back = DATA + 0x10000;
    write_header(&s.mem, VIRTIO_BLK_T_IN, 123);
    let descs = chain(&request(&[(back, 9216, W)]));
    assert_eq!(submit(&s, &descs), (Some(9216 + 1), STATUS_OK));
    let got = guest_bytes(&s.mem, back, 9216);
    assert_eq!(got[..512], base_before[123 * 512..124 * 512]);
    assert_eq!(got[512..8704], payload[..]);
    assert_eq!(got[8704..], base_before[140 * 512..141 * 512]);

    // A read of an untouched chunk comes from the base.
    write_header(&s.mem, VIRTIO_BLK_T_IN, 1000);
    let descs = chain(&request(&[(back, 4096, W)]));
    assert_eq!(submit(&s, &descs), (Some(4097), STATUS_OK));
    assert_eq!(
        guest_bytes(&s.mem, back, 4096),
        base_before[1000 * 512..1000 * 512 + 4096]
    );

    // Past the end: an I/O error, nothing written.
    write_header(&s.mem, VIRTIO_BLK_T_OUT, DISK_SIZE / 512);
    let descs = chain(&request(&[(DATA, 512, R)]));
    assert_eq!(submit(&s, &descs), (Some(1), STATUS_IOERR));
    assert_eq!(s.disk.cow().unwrap().written_chunks(), vec![0, 1]);

    // The base never changed; the overlay goes with the disk.
    assert_eq!(file_bytes(&s, 0, DISK_SIZE as usize), base_before);
    assert!(overlay.exists());
    drop(s.disk);
    assert!(!overlay.exists());
}

#[test]
fn a_rate_limited_queue_stops_at_the_limit_and_loses_no_request() {
    let s = setup(false);
    let vq = MockSplitQueue::new(&s.mem, QSIZE);
    // Five reads of one sector each: header, data, status (529 bytes of descriptors).
    let descs: Vec<RawDescriptor> = (0..5u16)
        .flat_map(|i| {
            chain_at(
                i * 3,
                &[
                    (HDR, 16, R),
                    (DATA + u64::from(i) * 512, 512, W),
                    (STATUS, 1, W),
                ],
            )
        })
        .collect();
    write_header(&s.mem, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    // 600 bytes a second: the first chain fits the bucket, the second takes it into debt,
    // the third must wait.
    let mut limiter = RateLimiter::new(crate::rate_limiter::RateLimit {
        bytes_per_sec: Some(600),
        ops_per_sec: None,
    });
    let outcome = process_queue_limited(&mut q, &s.mem, &s.disk, &mut limiter);
    assert_eq!(
        outcome,
        QueueOutcome {
            used_any: true,
            throttled: true
        }
    );
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(limiter.throttled(), 1);
    assert!(limiter.wait_time() > std::time::Duration::from_millis(500));
    // Retried later (here: without a limit), the chain held back and the rest complete, each
    // once, in order.
    let outcome = process_queue_limited(&mut q, &s.mem, &s.disk, &mut RateLimiter::unlimited());
    assert!(outcome.used_any && !outcome.throttled);
    assert_eq!(vq.used().idx().load(), 5);
    let ids: Vec<u32> = (0..5)
        .map(|i| vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(ids, [0, 3, 6, 9, 12]);
    let mut sector = [0u8; 512];
    s.mem
        .read_slice(&mut sector, GuestAddress(DATA + 4 * 512))
        .unwrap();
    assert!(sector
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(i as u64)));
}
