use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::chain::ChainError;

const MEM_SIZE: usize = 1 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn hdr(op: u16, len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1000,
        dst_port: 52,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 7,
    }
}

/// Builds the chain `parts` ((addr, len, flags)) and returns its validated segments.
fn segments(
    mem: &GuestMemoryMmap,
    parts: &[(u64, u32, u16)],
    dir: Direction,
) -> Result<Segments, ChainError> {
    let descs: Vec<RawDescriptor> = parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == parts.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
        })
        .collect();
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    Segments::from_chain(chain, mem, dir)
}

#[test]
fn header_round_trip_and_layout() {
    let h = Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0xaabb_ccdd,
        dst_port: 9,
        len: 5,
        type_: 1,
        op: 5,
        flags: 3,
        buf_alloc: 0x1_0000,
        fwd_cnt: 0xffff_fffe,
    };
    let b = h.to_bytes();
    assert_eq!(b.len(), 44);
    assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[16..20], &0xaabb_ccddu32.to_le_bytes());
    assert_eq!(&b[28..30], &1u16.to_le_bytes());
    assert_eq!(&b[30..32], &5u16.to_le_bytes());
    assert_eq!(&b[40..44], &0xffff_fffeu32.to_le_bytes());
    assert_eq!(Header::from_bytes(&b), h);
}

#[test]
fn check_rejects_bad_headers() {
    assert_eq!(hdr(1, 0).check(0).unwrap(), Op::Request);
    assert_eq!(hdr(5, 100).check(100).unwrap(), Op::Rw);
    for op in 1..=7 {
        assert!(hdr(op, 0).check(0).is_ok());
    }
    assert!(matches!(hdr(0, 0).check(0), Err(PacketError::UnknownOp(0))));
    assert!(matches!(hdr(8, 0).check(0), Err(PacketError::UnknownOp(8))));
    assert!(matches!(
        hdr(5, 101).check(100),
        Err(PacketError::LenPastChain {
            len: 101,
            available: 100
        })
    ));
    assert!(matches!(
        hdr(5, MAX_PKT_LEN + 1).check(u64::MAX),
        Err(PacketError::LenTooLarge { .. })
    ));
    assert!(matches!(
        hdr(5, u32::MAX).check(u64::MAX),
        Err(PacketError::LenTooLarge { .. })
    ));
    let mut seqpacket = hdr(1, 0);
    seqpacket.type_ = 2;
    assert!(matches!(
        seqpacket.check(0),
        Err(PacketError::UnsupportedType(2))
    ));
    // Messages carry the offending values.
    assert!(hdr(5, 101)
        .check(100)
        .unwrap_err()
        .to_string()
        .contains("101"));
}

#[test]
fn reset_reply_swaps_addresses() {
    let r = hdr(5, 10).reset_reply();
    assert_eq!(
        (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (2, 3, 52, 1000)
    );
    assert_eq!((r.op, r.len, r.type_), (Op::Rst as u16, 0, TYPE_STREAM));
}

#[test]
fn segments_read_and_write_across_descriptors() {
    let m = mem();
    let data: Vec<u8> = (0..100u8).collect();
    m.write_slice(&data[..10], GuestAddress(0x1_0000)).unwrap();
    m.write_slice(&data[10..], GuestAddress(0x2_0000)).unwrap();
    let s = segments(
        &m,
        &[(0x1_0000, 10, 0), (0x3_0000, 0, 0), (0x2_0000, 90, 0)],
        Direction::Read,
    )
    .unwrap();
    assert_eq!(s.len(), 100);
    let mut buf = vec![0u8; 20];
    s.read_at(&m, 5, &mut buf).unwrap();
    assert_eq!(buf, data[5..25]);
    let mut all = vec![0u8; 100];
    s.read_at(&m, 0, &mut all).unwrap();
    assert_eq!(all, data);
    assert!(matches!(
        s.read_at(&m, 90, &mut buf),
        Err(ChainError::TooShort {
            have: 100,
            need: 110
        })
    ));
    assert!(matches!(
        s.read_at(&m, u64::MAX, &mut buf),
        Err(ChainError::TooShort { .. })
    ));

    let w = segments(
        &m,
        &[(0x4_0000, 44, W), (0x5_0000, 4096, W)],
        Direction::Write,
    )
    .unwrap();
    let h = hdr(5, 3);
    assert_eq!(w.write_packet(&m, &h, b"abc").unwrap(), 47);
    let mut back = [0u8; HDR_SIZE];
    m.read_slice(&mut back, GuestAddress(0x4_0000)).unwrap();
    assert_eq!(Header::from_bytes(&back), h);
    let mut p = [0u8; 3];
    m.read_slice(&mut p, GuestAddress(0x5_0000)).unwrap();
    assert_eq!(&p, b"abc");
    assert!(matches!(
        w.write_packet(&m, &h, &vec![0u8; 4097]),
        Err(PacketError::Chain(ChainError::TooShort { .. }))
    ));
    assert_eq!(w.read_header(&m).unwrap(), h);
}

#[test]
fn segments_reject_bad_descriptors() {
    let m = mem();
    // Direction.
    assert!(matches!(
        segments(&m, &[(0x1_0000, 44, 0), (0x2_0000, 10, W)], Direction::Read),
        Err(ChainError::Direction { .. })
    ));
    assert!(matches!(
        segments(&m, &[(0x1_0000, 44, 0)], Direction::Write),
        Err(ChainError::Direction { .. })
    ));
    // Outside memory, straddling the end, wrapping.
    assert!(matches!(
        segments(&m, &[(MEM_SIZE as u64, 44, 0)], Direction::Read),
        Err(ChainError::OutsideMemory { .. })
    ));
    assert!(matches!(
        segments(&m, &[(MEM_SIZE as u64 - 10, 44, W)], Direction::Write),
        Err(ChainError::OutsideMemory { .. })
    ));
    assert!(matches!(
        segments(&m, &[(u64::MAX - 5, 44, 0)], Direction::Read),
        Err(ChainError::OutsideMemory { .. })
    ));
    // A header that does not fit the chain.
    let short = segments(&m, &[(0x1_0000, 20, 0), (0x2_0000, 20, 0)], Direction::Read).unwrap();
    assert!(matches!(
        short.read_header(&m),
        Err(PacketError::Chain(ChainError::TooShort {
            have: 40,
            need: 44
        }))
    ));
    assert_eq!(short.payload_room(), 0);
}

#[test]
fn broken_chains_are_rejected() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    // Descriptor 0 points at itself: a loop.
    let looped = [RawDescriptor::from(SplitDescriptor::new(
        0x1_0000,
        44,
        VRING_DESC_F_NEXT as u16,
        0,
    ))];
    let chain = vq.build_multiple_desc_chains(&looped).unwrap();
    assert!(matches!(
        Segments::from_chain(chain, &m, Direction::Read),
        Err(ChainError::BrokenChain { .. })
    ));
    // `next` out of the table.
    let out = [RawDescriptor::from(SplitDescriptor::new(
        0x1_0000,
        44,
        VRING_DESC_F_NEXT as u16,
        200,
    ))];
    let chain = vq.build_multiple_desc_chains(&out).unwrap();
    assert!(matches!(
        Segments::from_chain(chain, &m, Direction::Read),
        Err(ChainError::BrokenChain { .. })
    ));
}

#[test]
fn ops_from_wire() {
    assert_eq!(Op::from_wire(3), Some(Op::Rst));
    assert_eq!(Op::from_wire(7), Some(Op::CreditRequest));
    assert_eq!(Op::from_wire(0), None);
    assert_eq!(Op::from_wire(u16::MAX), None);
}
