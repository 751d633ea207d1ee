use super::*;

#[test]
fn connect_lines() {
    assert_eq!(parse_connect_line(b"CONNECT 52").unwrap(), 52);
    assert_eq!(
        parse_connect_line(b"CONNECT 4294967295\r").unwrap(),
        u32::MAX
    );
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"connect 52",
        b"CONNECT -1",
        b"CONNECT +5",
        b"CONNECT 52 53",
        b"CONNECT 4294967296",
        b"CONNECT \xff",
        b"",
    ] {
        assert!(
            matches!(parse_connect_line(bad), Err(MuxerError::BadConnectLine(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn after_a_transport_reset_ports_start_far_from_the_old_connections() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-mux-").unwrap();
    let mut m = Muxer::new(3, dir.as_path().join("v.sock")).unwrap();
    assert_eq!(m.alloc_local_port(), Some(FIRST_LOCAL_PORT));
    let mut starts = HashSet::new();
    for _ in 0..8 {
        m.move_ports_past_old_connections();
        let port = m.alloc_local_port().unwrap();
        assert!((1 << 20..1 << 31).contains(&port), "{port}");
        starts.insert(port);
    }
    assert!(starts.len() > 1, "every restore starts at the same port");
}

#[test]
fn local_ports_are_unique_and_wrap() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-mux-").unwrap();
    let mut m = Muxer::new(3, dir.as_path().join("v.sock")).unwrap();
    assert_eq!(m.alloc_local_port(), Some(1024));
    assert_eq!(m.alloc_local_port(), Some(1025));
    m.next_local_port = u32::MAX - 1;
    assert_eq!(m.alloc_local_port(), Some(u32::MAX - 1));
    assert_eq!(m.alloc_local_port(), Some(FIRST_LOCAL_PORT));
    // A port in use is skipped.
    let (a, _b) = UnixStream::pair().unwrap();
    let key = ConnKey {
        local_port: 1025,
        peer_port: 9,
    };
    m.conns.insert(key, Connection::new_local(a, key));
    assert_eq!(m.alloc_local_port(), Some(1026));
}

#[test]
fn listen_checks_the_path() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-mux-").unwrap();
    let long = dir.as_path().join("x".repeat(MAX_UDS_PATH_LEN));
    assert!(matches!(
        Muxer::new(3, long),
        Err(VsockError::PathTooLong { .. })
    ));
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        Muxer::new(3, file.clone()),
        Err(VsockError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A stale socket is replaced; drop removes ours.
    let path = dir.as_path().join("v.sock");
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    let m = Muxer::new(3, path.clone()).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(m);
    assert!(!path.exists());
}

#[test]
fn slow_handshakes_are_dropped() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-mux-").unwrap();
    let mut m = Muxer::new(3, dir.as_path().join("v.sock")).unwrap();
    let Some(long_ago) = Instant::now().checked_sub(HANDSHAKE_TIMEOUT * 2) else {
        return;
    };
    // A client that never finishes its CONNECT line.
    let _silent = UnixStream::connect(m.uds_path()).unwrap();
    m.accept();
    assert_eq!(m.pending_count(), 1);
    m.pending[0].since = long_ago;
    // A host-initiated request the guest never answers.
    let (a, mut b) = UnixStream::pair().unwrap();
    let key = ConnKey {
        local_port: 1024,
        peer_port: 52,
    };
    let mut conn = Connection::new_local(a, key);
    conn.created = long_ago;
    m.conns.insert(key, conn);
    // Checked at most once a second.
    m.sweep();
    assert_eq!(m.pending_count(), 1);
    m.last_sweep = long_ago;
    m.sweep();
    assert_eq!(m.pending_count(), 0);
    assert_eq!(m.connection_count(), 0);
    assert_eq!(m.retired.len(), 2);
    // The guest hears a reset for the abandoned request.
    let (hdr, len) = m.next_rx(4096, &mut [0u8; 4096]).unwrap();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port, len),
        (Op::Rst as u16, 1024, 52, 0)
    );
    m.retired.clear();
    let mut buf = Vec::new();
    assert_eq!(b.read_to_end(&mut buf).unwrap(), 0);
}

#[test]
fn peer_paths_and_missing_listeners() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-mux-").unwrap();
    let m = Muxer::new(3, dir.as_path().join("v.sock")).unwrap();
    let p = m.peer_path(52);
    assert!(p.to_str().unwrap().ends_with("v.sock_52"));
    assert!(matches!(
        connect_nonblocking(&p),
        Err(MuxerError::Connect { .. })
    ));
    let _l = UnixListener::bind(&p).unwrap();
    assert!(connect_nonblocking(&p).is_ok());
    let long = PathBuf::from("/".repeat(200));
    assert!(matches!(
        connect_nonblocking(&long),
        Err(MuxerError::PathTooLong(_))
    ));
}
