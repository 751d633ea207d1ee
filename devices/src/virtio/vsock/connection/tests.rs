use std::io::{Read, Write};

use super::*;
use crate::virtio::vsock::packet::MAX_PKT_LEN;

const CID: u64 = 3;

fn ports() -> ConnKey {
    ConnKey {
        local_port: 52,
        peer_port: 5000,
    }
}

fn request(buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 52,
        len: 0,
        type_: TYPE_STREAM,
        op: Op::Request as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A guest-initiated connection (response already produced) and the host end of its socket.
fn established(buf_alloc: u32) -> (Connection, UnixStream) {
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut c = Connection::new_peer(ours, ports(), &request(buf_alloc, 0));
    let mut scratch = vec![0u8; MAX_PKT_LEN as usize];
    let out = c.produce(4096, &mut scratch).unwrap();
    assert_eq!(out.op, Op::Response);
    (c, host)
}

fn produce_all(c: &mut Connection, room: usize) -> Vec<(Outgoing, Vec<u8>)> {
    let mut scratch = vec![0u8; MAX_PKT_LEN as usize];
    let mut v = Vec::new();
    while let Some(o) = c.produce(room, &mut scratch) {
        v.push((o, scratch[..o.len].to_vec()));
        assert!(v.len() < 10_000);
    }
    v
}

#[test]
fn host_to_guest_never_exceeds_the_guest_credit() {
    let (mut c, mut host) = established(10_000);
    assert_eq!(c.peer_credit(), 10_000);
    host.write_all(&[7u8; 50_000]).unwrap();
    c.on_event(EventSet::IN).unwrap();
    let out = produce_all(&mut c, 4096);
    let data: usize = out
        .iter()
        .filter(|(o, _)| o.op == Op::Rw)
        .map(|(o, _)| o.len)
        .sum();
    assert_eq!(data, 10_000);
    assert!(out.iter().all(|(o, _)| o.len <= 4096));
    assert_eq!(c.peer_credit(), 0);
    // Out of credit: the device asks for an update and reads nothing more.
    assert_eq!(out.last().unwrap().0.op, Op::CreditRequest);
    assert!(!c.wants_rx());
    // The guest consumed 6000 bytes.
    let mut update = request(10_000, 6000);
    update.op = Op::CreditUpdate as u16;
    c.update_peer_credit(&update);
    assert_eq!(c.peer_credit(), 6000);
    assert!(c.wants_rx());
    let out = produce_all(&mut c, 65536);
    assert_eq!(out[0].0.len, 6000);
    // A lying guest (fwd_cnt beyond what it received) gets no credit at all.
    update.fwd_cnt = 1_000_000;
    c.update_peer_credit(&update);
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn credit_wraps_around_u32() {
    let (mut c, mut host) = established(100);
    c.rx_cnt = Wrapping(u32::MAX - 10);
    c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
    host.write_all(&[1u8; 300]).unwrap();
    c.on_event(EventSet::IN).unwrap();
    let out = produce_all(&mut c, 4096);
    assert_eq!(out[0].0.len, 100);
    assert_eq!(c.rx_cnt, Wrapping(89));
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn guest_to_host_is_bounded_and_credit_updates_follow_the_host() {
    let (mut c, mut host) = established(65536);
    host.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; MAX_PKT_LEN as usize];
    // Fill the host socket and our buffer up to exactly the advertised credit.
    let mut sent = 0usize;
    loop {
        // A guest that heard of every byte the host consumed.
        let credit = CONN_BUF_ALLOC as usize - (sent - c.fwd_cnt.0 as usize);
        if credit == 0 {
            break;
        }
        let n = credit.min(chunk.len());
        c.recv_rw(&chunk[..n]).unwrap();
        sent += n;
        assert!(c.buffered() <= CONN_BUF_ALLOC as usize);
        if sent > 64 << 20 {
            panic!("the host socket never filled up");
        }
    }
    assert_eq!(c.buffered(), CONN_BUF_ALLOC as usize);
    // One byte more is a protocol violation.
    assert!(matches!(
        c.recv_rw(&[1]),
        Err(ConnError::CreditExceeded { len: 1, .. })
    ));
    assert_eq!(c.interest(), Some(EventSet::IN | EventSet::OUT));
    // The host drains: fwd_cnt grows and a credit update is owed.
    let mut sink = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < sent {
        match host.read(&mut sink) {
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.on_event(EventSet::OUT).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    c.on_event(EventSet::OUT).unwrap();
    assert_eq!(c.buffered(), 0);
    assert_eq!(c.fwd_cnt.0 as usize, sent);
    assert!(c.wants_rx());
    let out = produce_all(&mut c, 4096);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.op, Op::CreditUpdate);
    let h = c.header(CID, out[0].0);
    assert_eq!(h.fwd_cnt as usize, sent);
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    assert!(!c.wants_rx());
}

#[test]
fn small_progress_sends_no_credit_update_but_requests_do() {
    let (mut c, mut host) = established(65536);
    c.recv_rw(b"hello").unwrap();
    let mut b = [0u8; 5];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert!(!c.wants_rx());
    c.recv_credit_request();
    let out = produce_all(&mut c, 4096);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.op, Op::CreditUpdate);
    assert_eq!(c.header(CID, out[0].0).fwd_cnt, 5);
}

#[test]
fn data_before_response_or_after_shutdown_is_refused() {
    let (ours, _host) = UnixStream::pair().unwrap();
    let mut c = Connection::new_local(ours, ports());
    assert_eq!(c.state(), State::Connecting);
    assert!(matches!(
        c.recv_rw(b"x"),
        Err(ConnError::NotEstablished { len: 1 })
    ));
    let (mut c, _host) = established(4096);
    c.recv_shutdown(SHUTDOWN_SEND).unwrap();
    assert!(matches!(
        c.recv_rw(b"xy"),
        Err(ConnError::DataAfterShutdown { len: 2 })
    ));
}

#[test]
fn host_initiated_response_writes_ok_line() {
    let (ours, mut host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let key = ConnKey {
        local_port: 1024,
        peer_port: 52,
    };
    let mut c = Connection::new_local(ours, key);
    assert_eq!(c.interest(), None);
    let out = produce_all(&mut c, 4096);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.op, Op::Request);
    let h = c.header(CID, out[0].0);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (2, CID, 1024, 52)
    );
    c.recv_response().unwrap();
    c.recv_rw(b"data").unwrap();
    let mut b = [0u8; 12];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"OK 1024\ndata");
    // The OK line is not guest data.
    assert_eq!(c.fwd_cnt.0, 4);
}

#[test]
fn shutdowns_both_ways_end_in_a_reset() {
    let (mut c, mut host) = established(65536);
    // Host half-closes: the guest hears SHUTDOWN(SEND) after the data.
    host.write_all(b"bye").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    c.on_event(EventSet::IN).unwrap();
    let out = produce_all(&mut c, 4096);
    assert_eq!(out[0].0.op, Op::Rw);
    assert_eq!(out[0].1, b"bye");
    assert_eq!(out[1].0.op, Op::Shutdown);
    assert_eq!(out[1].0.flags, SHUTDOWN_SEND);
    assert_eq!(out.len(), 2);
    assert!(!c.is_closed());
    // The guest still sends, then shuts down its side: the host sees EOF, then the device
    // resets the finished connection.
    c.recv_rw(b"reply").unwrap();
    c.recv_shutdown(SHUTDOWN_SEND).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"reply");
    let out = produce_all(&mut c, 4096);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.op, Op::Rst);
    assert!(c.is_closed());
}

#[test]
fn guest_full_shutdown_flushes_then_resets() {
    let (mut c, mut host) = established(65536);
    c.recv_rw(b"last words").unwrap();
    c.recv_shutdown(SHUTDOWN_BOTH).unwrap();
    assert_eq!(produce_all(&mut c, 4096)[0].0.op, Op::Rst);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
}

#[test]
fn host_close_is_a_full_shutdown_and_write_errors_reset() {
    let (mut c, host) = established(65536);
    drop(host);
    c.on_event(EventSet::IN | EventSet::HANG_UP).unwrap();
    let out = produce_all(&mut c, 4096);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.op, Op::Shutdown);
    assert_eq!(out[0].0.flags, SHUTDOWN_BOTH);
    assert_eq!(c.interest(), None);
    assert!(matches!(
        c.recv_rw(b"x"),
        Err(ConnError::Io { op: "write", .. })
    ));
}

#[test]
fn guest_rcv_shutdown_stops_reading() {
    let (mut c, mut host) = established(65536);
    c.recv_shutdown(SHUTDOWN_RCV).unwrap();
    host.write_all(b"unwanted").unwrap();
    c.on_event(EventSet::IN).unwrap();
    assert!(produce_all(&mut c, 4096).is_empty());
    assert_eq!(c.interest(), None);
}
