//! The files API end to end in a booted sandbox (`vmtest_*`: hardware KVM or the lab):
//! listings, stat, removal, renames, folders as tar streams both ways (through curl and
//! `ember cp -r`), watches, and `ember files`.

mod common;
use common::service::{text, Service};

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// `sh -c script` in the sandbox; its stdout, after checking it exited 0.
fn sh(service: &Service, id: &str, script: &str) -> String {
    let result = service.sh(id, script);
    assert_eq!(result["exit_code"], 0, "{script}: {result}");
    result["stdout"].as_str().unwrap_or_default().to_string()
}

/// Relative path → (kind, content or target, permission bits) of every entry under `root`.
fn tree(root: &Path) -> BTreeMap<Vec<u8>, ember_testkit::tree::Entry> {
    ember_testkit::tree::contents(root, 0o777)
}

/// A host folder with a nested folder, a symlink, a 5 MB file and a file whose name is not
/// UTF-8.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("nested/deeper")).unwrap();
    std::fs::write(root.join("nested/deeper/leaf.txt"), b"leaf\n").unwrap();
    let big: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::fs::write(
        root.join(OsStr::from_bytes(b"caf\xe9.txt")),
        b"latin-1 name\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("nested/deeper/leaf.txt", root.join("link")).unwrap();
    let script = root.join("nested/run.sh");
    std::fs::write(&script, b"#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// `GET` into a host file with curl: the HTTP status.
fn download(service: &Service, uri: &str, out: &Path) -> u16 {
    let run = Command::new("curl")
        .args(["-sS", "--max-time", "600", "--unix-socket"])
        .arg(&service.socket)
        .args(["-w", "%{http_code}", "-o"])
        .arg(out)
        .arg(format!("http://ember{uri}"))
        .output()
        .expect("run curl");
    text(&run.stdout).trim().parse().unwrap_or(0)
}

/// A running `curl` of a watch: its NDJSON records arrive on the channel.
struct Watching {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
}

impl Watching {
    fn start(service: &Service, id: &str, path: &str) -> Watching {
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--unix-socket"])
            .arg(&service.socket)
            .arg(format!(
                "http://ember/sandboxes/{id}/files/watch?path={path}&recursive=true"
            ))
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("run curl");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a watch line is not JSON ({e}): {line}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Watching { child, lines }
    }

    /// Records until `done` says the wanted ones came.
    fn until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(record) => seen.push(record),
                Err(_) => panic!("no {what} within 120 s; the watch said: {seen:#?}"),
            }
        }
        seen
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has(records: &[Value], kind: &str, path: &str, is_dir: bool) -> bool {
    records
        .iter()
        .any(|r| r["type"] == kind && r["path"] == path && r["is_dir"] == is_dir)
}

#[test]
fn vmtest_files_api_lists_removes_renames_moves_trees_as_tar_and_watches() {
    let service = Service::start("files");
    let id = service.create(json!({}));
    let host = service.state.join("host-files");
    std::fs::create_dir_all(&host).unwrap();

    // Listings and stat.
    sh(
        &service,
        &id,
        "mkdir -p /root/ft/sub/deeper && printf hello > /root/ft/a.txt && chmod 640 /root/ft/a.txt \
         && ln -s a.txt /root/ft/link && touch /root/ft/sub/deeper/f",
    );
    let listing = service.call(
        "GET",
        &format!("/sandboxes/{id}/files/list?path=/root/ft"),
        None,
        200,
    );
    assert_eq!(listing["path"], "/root/ft");
    assert_eq!(listing["truncated"], false, "{listing}");
    let entries = listing["entries"].as_array().unwrap();
    let names: Vec<&str> = entries
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.txt", "link", "sub"], "{listing}");
    assert_eq!(entries[0]["type"], "file");
    assert_eq!(entries[0]["size"], 5);
    assert_eq!(entries[0]["mode"], "640");
    assert!(entries[0]["mtime_unix_ms"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(entries[1]["type"], "symlink");
    assert_eq!(entries[1]["target"], "a.txt");
    assert_eq!(entries[2]["type"], "dir");
    let some = service.call(
        "GET",
        &format!("/sandboxes/{id}/files/list?path=/root/ft&limit=2"),
        None,
        200,
    );
    assert_eq!(some["truncated"], true, "{some}");
    assert_eq!(some["entries"].as_array().unwrap().len(), 2);
    let stat = service.call(
        "GET",
        &format!("/sandboxes/{id}/files/stat?path=/root/ft/link"),
        None,
        200,
    );
    assert_eq!(
        (&stat["type"], &stat["name"]),
        (&json!("symlink"), &json!("link"))
    );
    let files = format!("/sandboxes/{id}/files");
    service.refuse(
        "GET",
        &format!("{files}/stat?path=/root/ft/nothing"),
        None,
        404,
        "not_found",
    );
    service.refuse(
        "GET",
        &format!("{files}/list?path=/root/ft/a.txt"),
        None,
        409,
        "not_a_directory",
    );
    service.refuse(
        "GET",
        &format!("{files}/list?path=/root/none"),
        None,
        404,
        "not_found",
    );

    // Removal: a folder with content needs `recursive`; a symlink in it to a folder outside
    // is removed, never followed; the root is refused.
    sh(
        &service,
        &id,
        "mkdir -p /root/keep && echo kept > /root/keep/f && ln -s /root/keep /root/ft/sub/escape",
    );
    service.refuse(
        "DELETE",
        &format!("{files}?path=/root/ft/sub"),
        None,
        409,
        "not_empty",
    );
    let (status, _) = service.curl(
        "DELETE",
        &format!("{files}?path=/root/ft/sub&recursive=true"),
        None,
    );
    assert_eq!(status, 204);
    assert_eq!(
        sh(
            &service,
            &id,
            "cat /root/keep/f; test -e /root/ft/sub || echo gone"
        ),
        "kept\ngone\n"
    );
    service.refuse(
        "DELETE",
        &format!("{files}?path=/&recursive=true"),
        None,
        400,
        "invalid_path",
    );
    let (status, _) = service.curl("DELETE", &format!("{files}?path=/root/ft/link"), None);
    assert_eq!(status, 204);
    service.refuse(
        "DELETE",
        &format!("{files}?path=/root/ft/link"),
        None,
        404,
        "not_found",
    );

    // Renames: an existing destination only with `overwrite`.
    sh(&service, &id, "echo other > /root/ft/b.txt");
    let rename = |body: Value| (format!("{files}/rename"), body.to_string());
    let (uri, body) = rename(json!({"from": "/root/ft/a.txt", "to": "/root/ft/b.txt"}));
    service.refuse("POST", &uri, Some(&body), 409, "already_exists");
    let renamed = service.call(
        "POST",
        &uri,
        Some(json!({"from": "/root/ft/a.txt", "to": "/root/ft/b.txt", "overwrite": true})),
        200,
    );
    assert_eq!(
        renamed,
        json!({"from": "/root/ft/a.txt", "to": "/root/ft/b.txt"})
    );
    assert_eq!(
        sh(&service, &id, "cat /root/ft/b.txt; ls /root/ft"),
        "hellob.txt\n"
    );

    // A folder tree into the sandbox as a tar (PUT), and back out (GET), identical.
    let source = host.join("source");
    make_tree(&source);
    let (_, archive) = ember_agent::tarball::write_tree(&source, Vec::new()).unwrap();
    let started = Instant::now();
    let (status, answer) =
        service.upload("PUT", &format!("{files}/tar?path=/root/up/here"), &archive);
    assert_eq!(status, 201, "{answer}\n{}", service.log());
    let extracted: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (
            &extracted["files"],
            &extracted["dirs"],
            &extracted["symlinks"],
            &extracted["bytes"]
        ),
        (
            &json!(4),
            &json!(2),
            &json!(1),
            &json!(5_000_000 + 5 + 13 + 19)
        ),
        "{extracted}"
    );
    eprintln!(
        "tar upload of {} bytes: {:.1?}",
        archive.len(),
        started.elapsed()
    );
    let guest_sum = sh(
        &service,
        &id,
        "sha256sum /root/up/here/big.bin | cut -c1-64",
    );
    let host_sum = sha256(&std::fs::read(source.join("big.bin")).unwrap());
    assert_eq!(guest_sum.trim(), host_sum);
    assert_eq!(sh(&service, &id, "/root/up/here/nested/run.sh"), "ran\n");
    let listed = service.call(
        "GET",
        &format!("{files}/list?path=/root/up/here"),
        None,
        200,
    );
    let latin = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name_base64"].is_string())
        .unwrap_or_else(|| panic!("no entry with a non-UTF-8 name: {listed}"));
    assert_eq!(latin["name_base64"], "Y2Fm6S50eHQ=", "{latin}");
    let fetched_tar = host.join("fetched.tar");
    let started = Instant::now();
    assert_eq!(
        download(
            &service,
            &format!("{files}/tar?path=/root/up/here"),
            &fetched_tar
        ),
        200
    );
    eprintln!("tar download: {:.1?}", started.elapsed());
    let fetched = host.join("fetched");
    let bytes = std::fs::read(&fetched_tar).unwrap();
    ember_agent::tarball::extract(&bytes[..], &fetched, Default::default()).unwrap();
    assert_eq!(tree(&source), tree(&fetched));
    service.refuse(
        "GET",
        &format!("{files}/tar?path=/root/up/here/big.bin"),
        None,
        409,
        "not_a_directory",
    );

    // A hostile archive: refused, nothing written outside its folder.
    let mut hostile = Vec::new();
    raw_entry(&mut hostile, b"../../escaped", b"pwned");
    hostile.extend_from_slice(&[0; 1024]);
    let (status, answer) = service.upload(
        "PUT",
        &format!("{files}/tar?path=/root/hostile/in"),
        &hostile,
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("`..`"), "{answer}");
    assert_eq!(
        sh(&service, &id, "test -e /root/escaped || echo safe"),
        "safe\n"
    );

    // `ember cp -r` both ways: a host folder in, and the sandbox's folder out again.
    let dest = format!("{id}:/root/cp/tree");
    let out = service.ember(&["cp", "-r", source.to_str().unwrap(), &dest]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("copied 4 files"),
        "{}",
        text(&out.stderr)
    );
    let back = host.join("back");
    let out = service.ember(&["cp", "-r", &dest, back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(tree(&source), tree(&back));
    // A folder without -r is refused; a file with -r is copied as a file.
    let out = service.ember(&["cp", source.to_str().unwrap(), &dest]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("-r"), "{}", text(&out.stderr));
    let single = host.join("single.txt");
    let out = service.ember(&[
        "cp",
        "-r",
        &format!("{id}:/root/ft/b.txt"),
        single.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&single).unwrap(), b"hello");

    // `ember files`.
    let out = service.ember(&["files", "ls", &format!("{id}:/root/cp/tree")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ls = text(&out.stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("l ") && l.ends_with("link -> nested/deeper/leaf.txt")),
        "{ls}"
    );
    assert!(
        ls.lines()
            .any(|l| l.starts_with('-') && l.contains(" 5000000 ") && l.ends_with("big.bin")),
        "{ls}"
    );
    let out = service.ember(&["files", "stat", &format!("{id}:/root/cp/nothing")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let out = service.ember(&[
        "files",
        "mv",
        &format!("{id}:/root/cp/tree/big.bin"),
        "/root/cp/big.bin",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = service.ember(&["files", "rm", &format!("{id}:/root/cp/tree")]);
    assert!(!out.status.success(), "a folder with content needs -r");
    let out = service.ember(&["files", "rm", "-r", &format!("{id}:/root/cp/tree")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sh(&service, &id, "ls /root/cp"), "big.bin\n");

    // Watches: what a command does under a folder arrives as events; a client that goes away
    // ends the watch in the guest (the agent, PID 1, holds no inotify descriptor after).
    sh(&service, &id, "mkdir -p /root/w");
    let watch = Watching::start(&service, &id, "/root/w");
    watch.until("watching", |seen| {
        seen.iter().any(|r| r["type"] == "watching")
    });
    assert_eq!(
        sh(&service, &id, "ls -l /proc/1/fd | grep -c inotify || true").trim(),
        "1"
    );
    sh(
        &service,
        &id,
        // The pause lets the watch follow the new folder before files change in it.
        "mkdir /root/w/sub && sleep 2 && echo one > /root/w/sub/f && echo two >> /root/w/sub/f \
         && mv /root/w/sub/f /root/w/sub/g && rm /root/w/sub/g && echo top > /root/w/top \
         && rm /root/w/top",
    );
    let records = watch.until("the last delete", |seen| {
        has(seen, "delete", "/root/w/top", false)
    });
    eprintln!("watch records: {records:#?}");
    assert!(has(&records, "create", "/root/w/sub", true), "{records:#?}");
    assert!(
        has(&records, "create", "/root/w/top", false),
        "{records:#?}"
    );
    assert!(
        has(&records, "modify", "/root/w/top", false),
        "{records:#?}"
    );
    // In the followed subfolder.
    assert!(
        has(&records, "create", "/root/w/sub/f", false),
        "{records:#?}"
    );
    assert!(
        has(&records, "modify", "/root/w/sub/f", false),
        "{records:#?}"
    );
    assert!(
        has(&records, "delete", "/root/w/sub/g", false),
        "{records:#?}"
    );
    let rename = records
        .iter()
        .find(|r| r["type"] == "rename")
        .expect("a rename");
    assert_eq!(
        (&rename["from"], &rename["path"]),
        (&json!("/root/w/sub/f"), &json!("/root/w/sub/g"))
    );
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = sh(&service, &id, "ls -l /proc/1/fd | grep -c inotify || true");
        if held.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent still watches after its client went away: {held}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    service.refuse(
        "GET",
        &format!("{files}/watch?path=/root/ft/b.txt"),
        None,
        409,
        "not_a_directory",
    );
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A raw tar entry (a regular file) whose name is written as given.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name);
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}
