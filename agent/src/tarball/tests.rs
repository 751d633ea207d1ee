use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// A fresh scratch folder under the system's temporary folder.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-tarball-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a tree holds, for comparing two: relative path → (kind, content or target, mode).
fn describe(root: &Path) -> BTreeMap<Vec<u8>, ember_testkit::tree::Entry> {
    ember_testkit::tree::contents(root, 0o7777)
}

fn make_tree(root: &Path) {
    let long = "n".repeat(150);
    std::fs::create_dir_all(root.join("nested/deeper")).unwrap();
    std::fs::write(root.join("nested/deeper/leaf.txt"), b"leaf\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(
        root.join(OsStr::from_bytes(b"caf\xe9-latin1")),
        b"not utf-8\n",
    )
    .unwrap();
    std::fs::write(root.join(format!("nested/{long}")), b"long name\n").unwrap();
    std::os::unix::fs::symlink("nested/deeper/leaf.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink(format!("/{long}/{long}"), root.join("long-target")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("outward")).unwrap();
    let script = root.join("nested/run.sh");
    std::fs::write(&script, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::create_dir(root.join("locked")).unwrap();
    std::fs::write(root.join("locked/inside"), b"x").unwrap();
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
}

#[test]
fn a_tree_round_trips_with_symlinks_long_and_non_utf8_names() {
    let dir = scratch("round-trip");
    let source = dir.join("source");
    make_tree(&source);
    // A FIFO is skipped, not read (it would block).
    let fifo = CString::new(source.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let (written, archive) = write_tree(&source, Vec::new()).unwrap();
    assert_eq!(written.files, 7, "{written:?}");
    assert_eq!(written.dirs, 3, "{written:?}");
    assert_eq!(written.symlinks, 3, "{written:?}");
    assert_eq!(written.skipped, 1, "{written:?}");
    assert_eq!(written.bytes, 1_500_000 + 5 + 10 + 10 + 10 + 1);

    let copy = dir.join("copy/made/here");
    let extracted = extract(&archive[..], &copy, ExtractOptions::default()).unwrap();
    assert_eq!(
        extracted,
        TarSummary {
            skipped: 0,
            ..written
        }
    );
    std::fs::remove_file(source.join("fifo")).unwrap();
    assert_eq!(describe(&source), describe(&copy));
    // Modification times travel too (whole seconds).
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(
        secs(mtime(&source.join("big.bin"))),
        secs(mtime(&copy.join("big.bin")))
    );
    // Extracting again over the copy replaces what is there.
    extract(&archive[..], &copy, ExtractOptions::default()).unwrap();
    assert_eq!(describe(&source), describe(&copy));
    for root in [&source, &copy] {
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_host_mask_drops_set_uid_bits() {
    let dir = scratch("mask");
    let source = dir.join("source");
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("suid"), b"x").unwrap();
    std::fs::set_permissions(source.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (_, archive) = write_tree(&source, Vec::new()).unwrap();
    let out = dir.join("out");
    extract(&archive[..], &out, ExtractOptions { mode_mask: 0o777 }).unwrap();
    let mode = std::fs::metadata(out.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One raw entry: a header whose name is written as given (the builder refuses `..` and
/// absolute paths, which is what these tests need to send).
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn finish(mut archive: Vec<u8>) -> Vec<u8> {
    archive.extend_from_slice(&[0; 1024]);
    archive
}

#[test]
fn hostile_entries_are_refused_and_nothing_leaves_the_target() {
    use tar::EntryType::{Regular, Symlink};
    let dir = scratch("hostile");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"untouched").unwrap();
    let target = dir.join("target");
    let outside_bytes = outside.as_os_str().as_bytes();

    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut climb = Vec::new();
    raw_entry(&mut climb, b"../outside/victim", Regular, b"", b"pwned");
    cases.push(("dot-dot", climb, "`..`"));
    let mut deep_climb = Vec::new();
    raw_entry(
        &mut deep_climb,
        b"a/b/../../../outside/victim",
        Regular,
        b"",
        b"pwned",
    );
    cases.push(("deep dot-dot", deep_climb, "`..`"));
    let mut absolute = Vec::new();
    let victim = outside.join("victim");
    raw_entry(
        &mut absolute,
        victim.as_os_str().as_bytes(),
        Regular,
        b"",
        b"pwned",
    );
    cases.push(("absolute", absolute, "absolute"));
    let mut through = Vec::new();
    raw_entry(&mut through, b"escape", Symlink, outside_bytes, b"");
    raw_entry(&mut through, b"escape/victim", Regular, b"", b"pwned");
    cases.push(("through a symlink", through, "symlink"));
    let mut nested_through = Vec::new();
    raw_entry(
        &mut nested_through,
        b"d/escape",
        Symlink,
        b"../../outside",
        b"",
    );
    raw_entry(
        &mut nested_through,
        b"d/escape/sub/new",
        Regular,
        b"",
        b"pwned",
    );
    cases.push(("through a nested symlink", nested_through, "symlink"));
    for (what, archive, why) in cases {
        std::fs::remove_dir_all(&target).ok();
        let err =
            extract(&finish(archive)[..], &target, ExtractOptions::default()).expect_err(what);
        assert!(err.to_string().contains(why), "{what}: {err}");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"untouched");
        assert!(!outside.join("sub").exists(), "{what}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1, "{what}");
    }

    // A symlink already in the target, then a file of the same name: the symlink is
    // replaced, never written through.
    std::fs::remove_dir_all(&target).ok();
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), target.join("planted")).unwrap();
    let mut replace = Vec::new();
    raw_entry(&mut replace, b"planted", Regular, b"", b"new content");
    // And a symlink entry followed by a file entry of its name.
    raw_entry(
        &mut replace,
        b"twice",
        Symlink,
        victim.as_os_str().as_bytes(),
        b"",
    );
    raw_entry(&mut replace, b"twice", Regular, b"", b"second");
    let summary = extract(&finish(replace)[..], &target, ExtractOptions::default()).unwrap();
    assert_eq!(summary.files, 2);
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"untouched");
    assert_eq!(
        std::fs::read(target.join("planted")).unwrap(),
        b"new content"
    );
    assert!(std::fs::symlink_metadata(target.join("planted"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(target.join("twice")).unwrap(), b"second");

    // A file entry where a folder is: refused, the folder kept.
    std::fs::create_dir(target.join("folder")).unwrap();
    let mut over_dir = Vec::new();
    raw_entry(&mut over_dir, b"folder", Regular, b"", b"x");
    let err = extract(&finish(over_dir)[..], &target, ExtractOptions::default()).unwrap_err();
    assert!(err.to_string().contains("\"folder\""), "{err}");
    assert!(target.join("folder").is_dir());

    // Hard links, devices and FIFOs are skipped and counted.
    let mut odd = Vec::new();
    raw_entry(&mut odd, b"hard", tar::EntryType::Link, b"/etc/shadow", b"");
    raw_entry(&mut odd, b"dev", tar::EntryType::Char, b"", b"");
    raw_entry(&mut odd, b"pipe", tar::EntryType::Fifo, b"", b"");
    let summary = extract(&finish(odd)[..], &target, ExtractOptions::default()).unwrap();
    assert_eq!(summary.skipped, 3);
    assert!(!target.join("hard").exists() && !target.join("dev").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_broken_archive_is_a_read_error() {
    let dir = scratch("broken");
    let garbage = vec![0x5a; 4096];
    let err = extract(&garbage[..], &dir.join("t"), ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, TarError::Read { .. }), "{err}");
    // Cut inside a file's content.
    let mut archive = Vec::new();
    raw_entry(&mut archive, b"f", tar::EntryType::Regular, b"", &[1; 2000]);
    archive.truncate(1024);
    let err = extract(&archive[..], &dir.join("t"), ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, TarError::Read { .. }), "{err}");
    let err = write_tree(&dir.join("missing"), Vec::new()).unwrap_err();
    assert!(matches!(err, TarError::OpenRoot { .. }), "{err}");
    std::fs::write(dir.join("file"), b"").unwrap();
    let err = write_tree(&dir.join("file"), Vec::new()).unwrap_err();
    assert!(matches!(err, TarError::NotADirectory { .. }), "{err}");
    // /proc/kcore's size is the address space's, not its content's: never archived.
    for pseudo in ["/proc", "/proc/self", "/sys"] {
        let err = write_tree(Path::new(pseudo), Vec::new()).unwrap_err();
        assert!(
            matches!(err, TarError::PseudoFilesystem { .. }),
            "{pseudo}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
