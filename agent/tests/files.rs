//! The files requests of `CAP_FILES` (listings, `lstat`, removal, renames, directories as
//! tar streams both ways, watches) through the agent's server and the host's client, over
//! `UnixStream` pairs, on scratch folders of this machine.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::client::{AgentClient, ClientError, WatchNext};
use ember_agent::protocol::{
    decode, read_frame, write_frame, ErrorKind, FileType, RemoteError, Request, RequestBody,
    Response, ResponseBody, WatchEvent, WatchKind, CAP_FILES, PROTOCOL_VERSION,
};
use ember_agent::server::{serve_connection, ServerConfig};
use ember_agent::tarball::{self, ExtractOptions};

/// A client connected to a fresh server on its own thread.
fn pair() -> AgentClient {
    let (host, guest) = UnixStream::pair().unwrap();
    let config = Arc::new(ServerConfig::new(|| {}));
    std::thread::spawn(move || serve_connection(guest, config));
    let client = AgentClient::new(host).unwrap();
    let info = client.hello().unwrap();
    assert!(info.capabilities.iter().any(|c| c == CAP_FILES), "{info:?}");
    client
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("agent-files-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn remote(err: ClientError) -> RemoteError {
    match err {
        ClientError::Remote(remote) => remote,
        other => panic!("expected an error from the agent, got {other:?}"),
    }
}

#[test]
fn listings_and_lstat_describe_entries_without_following_symlinks() {
    let client = pair();
    let dir = scratch("list");
    std::fs::write(dir.join("b.txt"), b"12345").unwrap();
    std::fs::set_permissions(dir.join("b.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::create_dir(dir.join("a-dir")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("c-link")).unwrap();
    std::fs::write(dir.join(OsStr::from_bytes(b"d-\xff")), b"").unwrap();

    let (entries, truncated) = client.list_dir(s(&dir), 100).unwrap();
    assert!(!truncated);
    let names: Vec<&[u8]> = entries.iter().map(|e| &e.name[..]).collect();
    assert_eq!(names, [&b"a-dir"[..], b"b.txt", b"c-link", b"d-\xff"]);
    assert_eq!(entries[0].file_type, FileType::Dir);
    assert_eq!(entries[1].file_type, FileType::File);
    assert_eq!(entries[1].size, 5);
    assert_eq!(entries[1].mode & 0o7777, 0o640);
    assert_eq!(entries[2].file_type, FileType::Symlink);
    assert_eq!(entries[2].link_target, b"/etc");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((now_ms - entries[1].mtime_unix_ms()).abs() < 60_000);

    let (some, truncated) = client.list_dir(s(&dir), 2).unwrap();
    assert!(truncated);
    assert_eq!(some.len(), 2);

    let link = client.lstat(s(&dir.join("c-link"))).unwrap();
    assert_eq!(link.file_type, FileType::Symlink);
    assert_eq!(link.name, b"c-link");
    assert_eq!(client.lstat("/").unwrap().name, b"/");

    let err = remote(client.list_dir(s(&dir.join("b.txt")), 10).unwrap_err());
    assert_eq!(
        (err.kind, err.errno),
        (ErrorKind::InvalidInput, Some(libc::ENOTDIR))
    );
    let err = remote(client.list_dir(s(&dir.join("missing")), 10).unwrap_err());
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("missing"), "{}", err.message);
    let err = remote(client.lstat(s(&dir.join("missing"))).unwrap_err());
    assert_eq!(err.kind, ErrorKind::NotFound);
    let err = remote(client.lstat("relative").unwrap_err());
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn removal_keeps_to_its_tree_and_renames_refuse_to_overwrite_unless_asked() {
    let client = pair();
    let dir = scratch("remove");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("sub/deeper/f"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("sub/escape")).unwrap();

    let err = remote(client.remove(s(&tree), false).unwrap_err());
    assert_eq!(err.errno, Some(libc::ENOTEMPTY), "{err:?}");
    assert!(err.message.contains("not empty"), "{}", err.message);
    client.remove(s(&tree), true).unwrap();
    assert!(!tree.exists());
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");

    // A symlink to a folder: the link goes, the folder stays.
    std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
    client.remove(s(&dir.join("link")), true).unwrap();
    assert!(outside.join("keep").exists());
    std::fs::create_dir(dir.join("empty")).unwrap();
    client.remove(s(&dir.join("empty")), false).unwrap();
    client.remove(s(&outside.join("keep")), false).unwrap();
    assert!(!outside.join("keep").exists());
    let err = remote(client.remove(s(&dir.join("missing")), true).unwrap_err());
    assert_eq!(err.kind, ErrorKind::NotFound);
    for root in ["/", "//", "/."] {
        let err = remote(client.remove(root, true).unwrap_err());
        assert_eq!(err.kind, ErrorKind::InvalidInput, "{root}");
        assert!(err.message.contains("root"), "{}", err.message);
    }

    std::fs::write(dir.join("a"), b"a").unwrap();
    std::fs::write(dir.join("b"), b"b").unwrap();
    let err = remote(
        client
            .rename(s(&dir.join("a")), s(&dir.join("b")), false)
            .unwrap_err(),
    );
    assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err:?}");
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"b");
    client
        .rename(s(&dir.join("a")), s(&dir.join("c")), false)
        .unwrap();
    client
        .rename(s(&dir.join("c")), s(&dir.join("b")), true)
        .unwrap();
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"a");
    assert!(!dir.join("a").exists() && !dir.join("c").exists());
    let err = remote(
        client
            .rename(s(&dir.join("missing")), s(&dir.join("x")), false)
            .unwrap_err(),
    );
    assert_eq!(err.kind, ErrorKind::NotFound);
    let err = remote(client.rename("/", s(&dir.join("x")), false).unwrap_err());
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Relative path → (kind, content or target) of every entry under `root`.
fn tree(root: &Path) -> BTreeMap<Vec<u8>, ember_testkit::tree::Entry> {
    ember_testkit::tree::contents(root, 0)
}

#[test]
fn directories_travel_as_tar_streams_both_ways_beyond_the_window() {
    let client = pair();
    let dir = scratch("tar");
    let source = dir.join("source");
    std::fs::create_dir_all(source.join("nested/deeper")).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(source.join("big.bin"), &big).unwrap();
    std::fs::write(source.join("nested/deeper/x.txt"), b"x\n").unwrap();
    std::fs::write(source.join(OsStr::from_bytes(b"\xe9t\xe9")), b"latin-1").unwrap();
    std::os::unix::fs::symlink("nested/deeper/x.txt", source.join("link")).unwrap();

    // Guest → host: the archive the agent streams.
    let mut archive = Vec::new();
    let len = client.read_tar(s(&source), &mut archive).unwrap();
    assert_eq!(len, archive.len() as u64);
    let fetched = dir.join("fetched");
    tarball::extract(&archive[..], &fetched, ExtractOptions { mode_mask: 0o777 }).unwrap();
    assert_eq!(tree(&source), tree(&fetched));

    // Host → guest: an archive made here, extracted by the agent into a new folder.
    let (_, made) = tarball::write_tree(&source, Vec::new()).unwrap();
    let copy = dir.join("copy/of/source");
    let summary = client.write_tar(s(&copy), &made[..]).unwrap();
    assert_eq!(
        (summary.files, summary.dirs, summary.symlinks, summary.bytes),
        (3, 2, 1, 3_000_000 + 2 + 7)
    );
    assert_eq!(tree(&source), tree(&copy));

    // Not a folder, or missing.
    let err = remote(
        client
            .read_tar(s(&source.join("big.bin")), Vec::new())
            .unwrap_err(),
    );
    assert_eq!(err.errno, Some(libc::ENOTDIR));
    let err = remote(
        client
            .read_tar(s(&dir.join("missing")), Vec::new())
            .unwrap_err(),
    );
    assert_eq!(err.kind, ErrorKind::NotFound);
    // A broken archive is refused as input.
    let err = remote(client.write_tar(s(&copy), &[0x41u8; 3000][..]).unwrap_err());
    assert_eq!(err.kind, ErrorKind::InvalidInput, "{err:?}");
    // The connection serves on.
    assert_eq!(client.lstat(s(&copy)).unwrap().file_type, FileType::Dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A raw tar entry whose name is written as given.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], data: &[u8]) {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name);
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = kind;
    header[157..157 + link.len()].copy_from_slice(link);
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

#[test]
fn hostile_archives_are_refused_by_the_agent_and_write_nothing_outside() {
    let client = pair();
    let dir = scratch("hostile");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = dir.join("target");
    let absolute = outside.join("abs");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            {
                let mut a = Vec::new();
                raw_entry(&mut a, b"../outside/climb", b'0', b"", b"pwned");
                a
            },
            "`..`",
        ),
        (
            {
                let mut a = Vec::new();
                raw_entry(&mut a, absolute.as_os_str().as_bytes(), b'0', b"", b"pwned");
                a
            },
            "absolute",
        ),
        (
            {
                let mut a = Vec::new();
                raw_entry(&mut a, b"link", b'2', outside.as_os_str().as_bytes(), b"");
                raw_entry(&mut a, b"link/through", b'0', b"", b"pwned");
                a
            },
            "symlink",
        ),
    ];
    for (mut archive, why) in cases {
        archive.extend_from_slice(&[0; 1024]);
        let err = remote(client.write_tar(s(&target), &archive[..]).unwrap_err());
        assert_eq!(err.kind, ErrorKind::InvalidInput, "{why}: {err:?}");
        assert!(err.message.contains(why), "{why}: {}", err.message);
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "{why}: something was written outside"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_download_whose_writer_fails_is_cancelled_and_the_connection_serves_on() {
    struct FailAfter(usize);
    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 < buf.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let client = pair();
    let dir = scratch("cancel");
    for i in 0..8 {
        std::fs::write(dir.join(format!("f{i}")), vec![i as u8; 1 << 20]).unwrap();
    }
    let err = client.read_tar(s(&dir), FailAfter(100_000)).unwrap_err();
    assert!(matches!(err, ClientError::Local { .. }), "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");
    // The agent's side ended: the next requests are answered at once.
    let started = Instant::now();
    assert!(client.list_dir(s(&dir), 100).unwrap().0.len() == 8);
    let mut archive = Vec::new();
    client.read_tar(s(&dir), &mut archive).unwrap();
    assert!(archive.len() > 8 << 20);
    assert!(started.elapsed() < Duration::from_secs(20));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Events until `done` says the wanted ones came (or 10 s passed).
fn events_until(
    watch: &mut ember_agent::client::Watch,
    mut done: impl FnMut(&[WatchEvent]) -> bool,
) -> Vec<WatchEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !done(&seen) {
        assert!(Instant::now() < deadline, "events so far: {seen:#?}");
        match watch.next(Duration::from_millis(100)).unwrap() {
            WatchNext::Event(event) => seen.push(event),
            WatchNext::Idle => {}
            WatchNext::Ended => break,
        }
    }
    seen
}

fn has(events: &[WatchEvent], kind: WatchKind, path: &Path, is_dir: bool) -> bool {
    events
        .iter()
        .any(|e| e.kind == kind && e.path == path.as_os_str().as_bytes() && e.is_dir == is_dir)
}

/// Held by the tests that watch: one counts this process's inotify instances.
static WATCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// inotify instances this process holds.
fn inotify_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.as_os_str().as_bytes() == b"anon_inode:inotify")
        })
        .count()
}

#[test]
fn a_watch_reports_creates_modifies_deletes_and_renames_and_ends_when_dropped() {
    let _alone = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
    let client = pair();
    let dir = scratch("watch");
    let before = inotify_fds();
    let mut watch = client.watch(s(&dir), true).unwrap();
    let file = dir.join("new.txt");
    std::fs::write(&file, b"one").unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(b"two")
        .unwrap();
    // A folder made with content at once: its content is announced when it is followed.
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("sub/deeper/inner"), b"x").unwrap();
    std::fs::rename(&file, dir.join("renamed.txt")).unwrap();
    std::fs::remove_file(dir.join("renamed.txt")).unwrap();
    let inner = dir.join("sub/deeper/inner");
    let events = events_until(&mut watch, |seen| {
        has(seen, WatchKind::Delete, &dir.join("renamed.txt"), false)
            && has(seen, WatchKind::Create, &inner, false)
    });
    assert!(has(&events, WatchKind::Create, &file, false), "{events:#?}");
    assert!(has(&events, WatchKind::Modify, &file, false), "{events:#?}");
    assert!(
        has(&events, WatchKind::Create, &dir.join("sub"), true),
        "{events:#?}"
    );
    let rename = events
        .iter()
        .find(|e| e.kind == WatchKind::Rename)
        .expect("a rename event");
    assert_eq!(rename.from, file.as_os_str().as_bytes());
    assert_eq!(rename.path, dir.join("renamed.txt").as_os_str().as_bytes());

    // Changes in the followed subfolder come too.
    std::fs::write(dir.join("sub/deeper/later"), b"later").unwrap();
    let events = events_until(&mut watch, |seen| {
        has(
            seen,
            WatchKind::Create,
            &dir.join("sub/deeper/later"),
            false,
        )
    });
    assert!(!events.is_empty());

    assert!(inotify_fds() > before);
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(5);
    while inotify_fds() > before {
        assert!(
            Instant::now() < deadline,
            "the agent kept watching after the host dropped its watch"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Watching a file, or nothing: errors before the stream starts.
    let err = remote(
        client
            .watch(s(&dir.join("sub/deeper/later")), false)
            .err()
            .unwrap(),
    );
    assert_eq!(err.errno, Some(libc::ENOTDIR));
    let err = remote(client.watch(s(&dir.join("missing")), false).err().unwrap());
    assert_eq!(err.kind, ErrorKind::NotFound);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_watch_ends_when_its_folder_goes_and_a_reader_that_stalls_gets_an_overflow() {
    let _alone = WATCHING.lock().unwrap_or_else(|e| e.into_inner());
    let client = pair();
    let dir = scratch("watch-overflow");
    let watched = dir.join("watched");
    std::fs::create_dir(&watched).unwrap();
    let mut watch = client.watch(s(&watched), false).unwrap();
    // Far more events than the window holds while the host reads nothing.
    let long = "n".repeat(200);
    for i in 0..6000 {
        std::fs::write(watched.join(format!("{long}-{i}")), b"").unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let events = events_until(&mut watch, |seen| {
        seen.iter().any(|e| e.kind == WatchKind::Overflow)
    });
    let overflow = events
        .iter()
        .find(|e| e.kind == WatchKind::Overflow)
        .unwrap();
    assert!(overflow.dropped > 0, "{overflow:?}");
    assert!(events.len() < 6000 * 2, "{}", events.len());
    std::fs::remove_dir_all(&watched).unwrap();
    let events = events_until(&mut watch, |seen| {
        seen.iter()
            .any(|e| e.kind == WatchKind::Delete && e.path == watched.as_os_str().as_bytes())
    });
    assert!(!events.is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match watch.next(Duration::from_millis(100)).unwrap() {
            WatchNext::Ended => break,
            _ => assert!(Instant::now() < deadline, "the watch did not end"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An agent from before `CAP_FILES` (in an older snapshot): it says hello without the
/// capability and answers anything else with a protocol error.
fn old_agent(mut guest: UnixStream) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut requests = 0;
        while let Ok(Some(payload)) = read_frame(&mut guest) {
            requests += 1;
            let request: Request = match decode(&payload) {
                Ok(request) => request,
                Err(_) => continue,
            };
            let body = match request.body {
                RequestBody::Hello { .. } => ResponseBody::Hello {
                    agent_version: "0.0.9".into(),
                    protocol_version: PROTOCOL_VERSION,
                    capabilities: vec!["exec".into(), "resync".into()],
                },
                _ => ResponseBody::Error(RemoteError::new(ErrorKind::Protocol, "unknown")),
            };
            if write_frame(
                &mut guest,
                &Response {
                    id: request.id,
                    body,
                },
            )
            .is_err()
            {
                break;
            }
        }
        requests
    })
}

#[test]
fn an_agent_without_the_files_capability_is_not_asked() {
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = old_agent(guest);
    let client = AgentClient::new(host).unwrap();
    client.hello().unwrap();
    let errors = [
        client.list_dir("/", 10).unwrap_err(),
        client.lstat("/").unwrap_err(),
        client.remove("/tmp/x", false).unwrap_err(),
        client.rename("/a", "/b", false).unwrap_err(),
        client.read_tar("/", Vec::new()).unwrap_err(),
        client.write_tar("/tmp", &[][..]).unwrap_err(),
        client.watch("/", true).err().unwrap(),
    ];
    for err in errors {
        let ClientError::Unsupported { capability, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*capability, CAP_FILES);
    }
    drop(client);
    assert_eq!(agent.join().unwrap(), 1, "only the hello was sent");
}
