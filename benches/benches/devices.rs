//! Per-request device costs on the guest's queues: parsing and checking a virtio-block
//! request chain (header, directions, memory ranges, disk bounds), and a vsock tx packet
//! (header read from guest memory, checked, 4 KiB payload copied out) against a plain copy
//! of the same bytes out of guest memory (the bound).

use std::io::Write as _;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_devices::virtio::block::request::{parse_request, status_descriptor};
use ember_devices::virtio::block::Disk;
use ember_devices::virtio::vsock::packet::{Header, PacketChain, Segments, HDR_SIZE};
use ember_vmm::memory::create_guest_memory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

fn block(c: &mut Criterion) {
    let mem = create_guest_memory(16 << 20).expect("guest memory");
    let path = std::env::temp_dir().join(format!("ember-bench-{}-disk", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&vec![0u8; 1 << 20]))
        .expect("disk image");
    let disk = Disk::open(&path, false, "bench").expect("disk");
    // A read of 8 sectors: header (type 0 = IN, sector 16), one 4 KiB buffer, status byte.
    let mut header = [0u8; 16];
    header[8..].copy_from_slice(&16u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(0x1000))
        .expect("header");
    let chain = [
        Descriptor::new(0x1000, 16, VIRTQ_DESC_F_NEXT, 1),
        Descriptor::new(0x2000, 4096, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        Descriptor::new(0x3000, 1, VIRTQ_DESC_F_WRITE, 0),
    ];
    let mut group = c.benchmark_group("block_request");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse + check a 3-descriptor read", |b| {
        b.iter(|| {
            let status = status_descriptor(&chain, &mem).expect("status");
            parse_request(std::hint::black_box(&chain), status, &mem, &disk).expect("valid")
        })
    });
    group.finish();
    let _ = std::fs::remove_file(&path);
}

fn vsock(c: &mut Criterion) {
    let mem = create_guest_memory(16 << 20).expect("guest memory");
    let header = Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1024,
        dst_port: 52,
        len: 4096,
        type_: 1,
        op: 5,
        flags: 0,
        buf_alloc: 256 << 10,
        fwd_cnt: 0,
    };
    mem.write_slice(&header.to_bytes(), GuestAddress(0x1000))
        .expect("header");
    mem.write_slice(&[0x42u8; 4096], GuestAddress(0x2000))
        .expect("payload");
    let mut segs = Segments::default();
    segs.push(GuestAddress(0x1000), HDR_SIZE as u32);
    segs.push(GuestAddress(0x2000), 4096);
    let mut payload = vec![0u8; 4096];
    let mut group = c.benchmark_group("vsock_tx_packet_4KiB");
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("header read + check + payload copy", |b| {
        b.iter(|| {
            let hdr = segs.read_header(&mem).expect("header");
            hdr.check(segs.len() - HDR_SIZE as u64).expect("valid");
            segs.read_at(&mem, HDR_SIZE as u64, &mut payload)
                .expect("payload");
            std::hint::black_box(&payload);
        })
    });
    group.bench_function("copy 4 KiB out of guest memory (bound)", |b| {
        b.iter(|| {
            mem.read_slice(&mut payload, GuestAddress(0x2000))
                .expect("copy");
            std::hint::black_box(&payload);
        })
    });
    group.finish();
}

criterion_group!(benches, block, vsock);
criterion_main!(benches);
