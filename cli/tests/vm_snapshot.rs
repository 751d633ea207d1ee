//! Snapshot and restore end to end (`vmtest_*`: hardware KVM or the lab).

mod common;
use common::{memory_objects, output_within, start_s3, COMMAND_LIMIT};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn artifact(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set; run VM tests through `cargo xtask test`"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ember(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ember");
    output_within(child, COMMAND_LIMIT)
}

struct TempStore(PathBuf);

impl TempStore {
    fn new(name: &str) -> TempStore {
        let dir = std::env::temp_dir().join(format!("ember-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempStore(dir)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Python process in its own session (so nothing the agent does to finished commands
/// touches it) that counts in memory and writes its count to /tmp (a tmpfs) five times a
/// second.
const COUNTER: &str = "setsid python3 -c 'import time\ni = 0\nwhile True:\n    i += 1\n    \
                       open(\"/tmp/count\", \"w\").write(str(i))\n    time.sleep(0.2)\n' \
                       > /dev/null 2>&1 < /dev/null & \
                       for i in $(seq 1 120); do [ -s /tmp/count ] && break; sleep 0.5; done; \
                       sleep 1; cat /tmp/count";

fn count_of(out: &Output) -> u64 {
    text(&out.stdout).trim().parse().unwrap_or_else(|_| {
        panic!(
            "no count in stdout {:?}; stderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn packs(store: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    packs.sort();
    packs
}

#[test]
fn vmtest_a_process_keeps_running_across_snapshot_and_restore() {
    let store = TempStore::new("continue");
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    let before = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--read-only-rootfs",
        "--vcpus",
        "2",
        "--store",
        store.path(),
        "--snapshot-on-exit",
        "counter",
        "--",
        "sh",
        "-c",
        COUNTER,
    ]);
    assert!(before.status.success(), "stderr:\n{}", text(&before.stderr));
    assert!(
        text(&before.stderr).contains("saved snapshot counter"),
        "{}",
        text(&before.stderr)
    );
    let count_before = count_of(&before);
    assert!(count_before >= 2, "the counter barely ran: {count_before}");

    // The VM is gone; a new VMM continues it from the store, memory arriving on demand.
    let after = ember(&[
        "restore",
        "counter",
        "--store",
        store.path(),
        "--mode",
        "lazy",
        "--",
        "sh",
        "-c",
        // The counting process is still there (no procps in the image: look in /proc).
        // python3 reads from the disk through the restored block queue.
        "sleep 2; python3 -c 'pass' && grep -s -l 'tmp/count' /proc/[0-9]*/cmdline > /dev/null \
         && cat /tmp/count",
    ]);
    assert!(after.status.success(), "stderr:\n{}", text(&after.stderr));
    let count_after = count_of(&after);
    assert!(
        count_after > count_before,
        "the counter did not continue: {count_before} before, {count_after} after"
    );
    assert!(
        text(&after.stderr).contains("pages served on demand"),
        "{}",
        text(&after.stderr)
    );

    // Restoring twice from the same snapshot starts from the same point each time.
    let again = ember(&[
        "restore",
        "counter",
        "--store",
        store.path(),
        "--eager",
        "--",
        "cat",
        "/tmp/count",
    ]);
    assert!(again.status.success(), "stderr:\n{}", text(&again.stderr));
    let count_again = count_of(&again);
    assert!(
        count_again >= count_before && count_again < count_after + 50,
        "{count_again}"
    );
}

#[test]
fn vmtest_a_corrupt_object_fails_the_restore_naming_it() {
    let store = TempStore::new("corrupt");
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    let out = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--read-only-rootfs",
        "--store",
        store.path(),
        "--snapshot-on-exit",
        "victim",
        "--",
        "true",
    ]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    // Flip one byte in the middle of the (largest) pack: some page object is now damaged.
    let pack = packs(&store.0)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();

    let out = ember(&[
        "restore",
        "victim",
        "--store",
        store.path(),
        "--eager",
        "--",
        "true",
    ]);
    assert!(
        !out.status.success(),
        "a corrupt snapshot restored:\n{}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("corrupt") || stderr.contains("mismatch"),
        "{stderr}"
    );
    // `ember store verify` finds it too, and names the object.
    let verify = ember(&["store", "verify", "--store", store.path()]);
    assert!(!verify.status.success(), "verify passed a flipped byte");
    let report = format!("{}{}", text(&verify.stdout), text(&verify.stderr));
    assert!(report.contains("corrupt object"), "{report}");
}

/// Boots the bundled rootfs (read-only) and saves it as snapshot `id` after `script`.
fn boot_and_save(store: &TempStore, id: &str, script: &str) -> Output {
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    let out = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--read-only-rootfs",
        "--store",
        store.path(),
        "--snapshot-on-exit",
        id,
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    out
}

/// `ember restore ID ARGS… -- sh -c SCRIPT`, which must succeed.
fn restore_ok(store: &TempStore, id: &str, args: &[&str], script: &str) -> Output {
    let mut argv = vec!["restore", id, "--store", store.path()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--", "sh", "-c", script]);
    let out = ember(&argv);
    assert!(
        out.status.success(),
        "ember {argv:?} failed; stderr:\n{}",
        text(&out.stderr)
    );
    out
}

/// The number in "… N <what> …" on ember's stderr.
fn logged_count(out: &Output, what: &str) -> u64 {
    let stderr = text(&out.stderr);
    stderr
        .lines()
        .filter_map(|line| {
            let end = line.find(what)?;
            line[..end].split_whitespace().last()?.parse().ok()
        })
        .next_back()
        .unwrap_or_else(|| panic!("no \"{what}\" in stderr:\n{stderr}"))
}

#[test]
fn vmtest_diff_snapshots_store_only_dirty_pages_and_snapshots_share_objects() {
    let store = TempStore::new("diff");
    boot_and_save(&store, "base", "true");

    // A full snapshot of the same sandbox a few seconds later shares most of its pages. Here
    // a restore, an exec and the agent's work lie between the two, which rewrite ~2 MiB of
    // the ~20 MiB of non-zero pages (the stricter check, two snapshots of one running
    // sandbox ≥ 90 % shared, is in vm_service.rs).
    restore_ok(&store, "base", &["--snapshot-on-exit", "later"], "sleep 3");
    let (base, later) = (
        memory_objects(&store.0, "base"),
        memory_objects(&store.0, "later"),
    );
    let shared = later.intersection(&base).count();
    eprintln!("{shared} of {} memory objects shared", later.len());
    assert!(
        shared * 10 >= later.len() * 8,
        "only {shared} of {} memory objects shared",
        later.len()
    );

    // A diff snapshot after writing 8 MiB to a tmpfs stores about those pages, not memory.
    let write = "head -c 8388608 /dev/urandom > /tmp/blob && sha256sum /tmp/blob";
    let out = restore_ok(
        &store,
        "base",
        &["--snapshot-on-exit", "dirty", "--diff"],
        write,
    );
    let sum_before = text(&out.stdout);
    let dirty = logged_count(&out, "pages written since base");
    assert!(
        (2048..8192).contains(&dirty),
        "{dirty} dirty pages for 8 MiB written (of 65536)"
    );
    let added: usize = memory_objects(&store.0, "dirty")
        .difference(&memory_objects(&store.0, "base"))
        .count();
    assert!(
        added as u64 <= dirty,
        "{added} new objects for {dirty} dirty pages"
    );
    let manifest = ember_snapshot_store::Store::open(&store.0)
        .unwrap()
        .load_manifest("dirty")
        .unwrap();
    assert_eq!(manifest.parent.as_deref(), Some("base"));

    // The diff restores exactly, and a diff of a diff works too.
    let out = restore_ok(
        &store,
        "dirty",
        &["--snapshot-on-exit", "dirty2", "--diff"],
        "sha256sum /tmp/blob; echo more > /tmp/more",
    );
    assert_eq!(text(&out.stdout), sum_before);
    let out = restore_ok(
        &store,
        "dirty2",
        &["--mode", "lazy"],
        "sha256sum /tmp/blob; cat /tmp/more",
    );
    assert_eq!(text(&out.stdout), format!("{sum_before}more\n"));

    // The store checks out.
    let verify = ember(&["store", "verify", "--store", store.path()]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
}

#[test]
fn vmtest_prefetching_the_working_set_removes_most_faults() {
    let store = TempStore::new("prefetch");
    boot_and_save(&store, "ws", "python3 -c 'print(1)'");
    let script = "python3 -c 'print(2)'";
    let lazy = restore_ok(&store, "ws", &["--mode", "lazy"], script);
    let lazy_faults = logged_count(&lazy, "pages served on demand");
    // The first prefetch-mode restore records the working set, the next ones load it.
    let first = restore_ok(&store, "ws", &["--mode", "prefetch"], script);
    assert!(
        text(&first.stderr).contains("recorded a working set"),
        "{}",
        text(&first.stderr)
    );
    // A second one adds what the first still needed on demand (if it was more than 2 %).
    restore_ok(&store, "ws", &["--mode", "prefetch"], script);
    let warm = restore_ok(&store, "ws", &["--mode", "prefetch"], script);
    let warm_faults = logged_count(&warm, "pages served on demand");
    let prefetched = logged_count(&warm, "prefetched");
    assert_eq!(text(&warm.stdout), "2\n");
    assert!(prefetched > 0, "nothing prefetched");
    assert!(
        warm_faults * 10 <= lazy_faults,
        "prefetch left {warm_faults} faults of {lazy_faults}"
    );
}

#[test]
fn vmtest_four_clones_of_one_snapshot_run_at_once_with_their_own_randomness_and_clock() {
    let store = TempStore::new("clones");
    boot_and_save(&store, "parent", "echo ready > /tmp/marker");
    let script = "cat /tmp/marker; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                  date +%s";
    // Old enough that a guest clock simply continued from the snapshot would be behind.
    std::thread::sleep(std::time::Duration::from_secs(10));
    let restored_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let spawned = std::time::Instant::now();
    let clones: Vec<_> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_ember"))
                .args([
                    "restore",
                    "parent",
                    "--store",
                    store.path(),
                    "--",
                    "sh",
                    "-c",
                    script,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a clone")
        })
        .collect();
    let outputs: Vec<Output> = clones
        .into_iter()
        .map(|c| output_within(c, COMMAND_LIMIT.saturating_sub(spawned.elapsed())))
        .collect();
    let mut randoms = std::collections::HashSet::new();
    for out in &outputs {
        assert!(
            out.status.success(),
            "a clone failed:\n{}",
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.first(), Some(&"ready"), "{stdout}");
        assert_eq!(lines.get(1).map(|l| l.len()), Some(32), "{stdout}");
        randoms.insert(lines[1].to_string());
        let guest_time: u64 = lines[2].parse().expect("date +%s");
        let host_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            guest_time + 3 >= restored_at && guest_time <= host_time + 3,
            "guest clock {guest_time}, host {restored_at}..{host_time}"
        );
    }
    assert_eq!(randoms.len(), 4, "clones shared randomness: {randoms:?}");
}

#[test]
fn vmtest_three_cycles_keep_memory_and_disk_exact() {
    let store = TempStore::new("cycles");
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    let base_before = std::fs::metadata(&rootfs).unwrap().modified().unwrap();
    // Each cycle writes a random file to the disk (/root) and one to memory (/tmp, a tmpfs),
    // then prints the hashes of everything written so far; the next cycle, restored from the
    // snapshot, first checks them with the page cache dropped (so the disk is really read).
    let cycle = |i: usize| {
        format!(
            "set -e; echo 3 > /proc/sys/vm/drop_caches; \
             cd /root && sha256sum -c /tmp/sums >&2 2>/dev/null || [ {i} = 0 ]; \
             head -c 300000 /dev/urandom > /root/disk{i}; head -c 300000 /dev/urandom > /tmp/mem{i}; \
             sync; sha256sum /root/disk* /tmp/mem* | tee /tmp/sums"
        )
    };
    let first = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--cow",
        "--store",
        store.path(),
        "--snapshot-on-exit",
        "c0",
        "--",
        "sh",
        "-c",
        &cycle(0),
    ]);
    assert!(first.status.success(), "stderr:\n{}", text(&first.stderr));
    let mut sums = text(&first.stdout);
    for i in 1..=3 {
        let mut args = vec!["--snapshot-on-exit".to_string(), format!("c{i}")];
        if i % 2 == 0 {
            args.push("--diff".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = restore_ok(&store, &format!("c{}", i - 1), &args, &cycle(i));
        let now = text(&out.stdout);
        assert!(
            now.starts_with(&sums) || sums.lines().all(|l| now.contains(l)),
            "cycle {i} lost data:\nbefore:\n{sums}\nnow:\n{now}"
        );
        assert_eq!(now.lines().count(), 2 * (i + 1), "{now}");
        sums = now;
    }
    let last = restore_ok(
        &store,
        "c3",
        &["--mode", "eager"],
        "echo 3 > /proc/sys/vm/drop_caches; sha256sum /root/disk* /tmp/mem*",
    );
    assert_eq!(text(&last.stdout), sums);
    // The shared base image was never written.
    assert_eq!(
        std::fs::metadata(&rootfs).unwrap().modified().unwrap(),
        base_before
    );
    // A booted VM's writes to the bundled image's overlay are gone after it ends.
    let fresh = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--cow",
        "--",
        "sh",
        "-c",
        "ls /root/disk0 2>&1 || true",
    ]);
    assert!(
        text(&fresh.stdout).contains("No such file"),
        "{}",
        text(&fresh.stdout)
    );
}

#[test]
fn vmtest_sigkill_in_the_middle_of_a_snapshot_leaves_the_store_usable() {
    let store = TempStore::new("sigkill");
    boot_and_save(&store, "good", "echo kept > /tmp/kept");
    let sealed_before = packs(&store.0).len();

    // A snapshot with ~64 MiB of fresh pages to write takes a while; kill ember while the
    // new pack is still being written (it exists, its index does not yet).
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "restore",
            "good",
            "--store",
            store.path(),
            "--snapshot-on-exit",
            "torn",
            "--",
            "sh",
            "-c",
            "head -c 67108864 /dev/urandom > /tmp/big",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    // Drained as it comes (a full pipe would stall ember), and shown if the kill missed.
    let mut stderr = child.stderr.take().expect("ember's stderr");
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let killed_mid_write = loop {
        let unsealed = packs(&store.0)
            .into_iter()
            .any(|p| !p.with_extension("idx").exists() && p.metadata().is_ok_and(|m| m.len() > 0));
        if unsealed {
            child.kill().expect("SIGKILL ember");
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    if !killed_mid_write {
        // Still running at the deadline: end it, so its status and words can be shown.
        let _ = child.kill();
    }
    let status = child.wait();
    let said = said.join().unwrap_or_default();
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        killed_mid_write,
        "never saw the snapshot's pack being written; ember ended ({status:?}) saying:\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    );

    // The torn snapshot does not exist, the store verifies, the earlier snapshot restores.
    let list = ember(&["snapshots", "--store", store.path()]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert!(
        !text(&list.stdout).contains("torn"),
        "{}",
        text(&list.stdout)
    );
    assert!(
        text(&list.stdout).contains("good"),
        "{}",
        text(&list.stdout)
    );
    let verify = ember(&["store", "verify", "--store", store.path()]);
    assert!(
        verify.status.success(),
        "verify after SIGKILL:\n{}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    let out = restore_ok(&store, "good", &[], "cat /tmp/kept");
    assert_eq!(text(&out.stdout), "kept\n");
    // gc removes the torn pack; what is left is the sealed ones.
    let gc = ember(&["store", "gc", "--store", store.path()]);
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    assert!(packs(&store.0).len() >= sealed_before);
}

/// The snapshot's manifest as JSON (after its checksum line).
fn manifest_json(store: &TempStore, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(store.0.join("manifests").join(id)).unwrap();
    let (_, json) = text.split_once('\n').unwrap();
    serde_json::from_str(json).unwrap()
}

/// The materialised memory files beside the store (`mem-cache`, the default).
fn memory_files(store: &TempStore) -> Vec<PathBuf> {
    let dir = store.0.parent().unwrap().join("mem-cache");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "mem"));
    files
}

#[test]
fn vmtest_file_restores_map_the_materialised_memory_and_fall_back_from_a_damaged_file() {
    // Its own folder: the memory cache goes beside the store.
    let root = TempStore::new("file-mode");
    std::fs::create_dir_all(&root.0).unwrap();
    let store = TempStore(root.0.join("store"));
    let out = boot_and_save(&store, "mapped", "echo kept > /tmp/marker");
    assert!(
        text(&out.stderr).contains("materialised its memory"),
        "{}",
        text(&out.stderr)
    );
    // The agent connection was closed before the snapshot: it held only listeners.
    assert_eq!(
        manifest_json(&store, "mapped")["metadata"]["vsock_connections"],
        "0"
    );
    let files = memory_files(&store);
    assert_eq!(files.len(), 1, "{files:?}");

    // The default restore maps the file, and records a working set from it.
    let first = restore_ok(&store, "mapped", &[], "cat /tmp/marker");
    assert_eq!(text(&first.stdout), "kept\n");
    let stderr = text(&first.stderr);
    assert!(stderr.contains("memory: file"), "{stderr}");
    assert!(stderr.contains("recorded a working set"), "{stderr}");

    // A truncated file is never mapped: the restore reads the store, says why, and
    // materialises the memory again for the next one.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    file.set_len(4096).unwrap();
    drop(file);
    let fallback = restore_ok(&store, "mapped", &[], "cat /tmp/marker");
    assert_eq!(text(&fallback.stdout), "kept\n");
    let stderr = text(&fallback.stderr);
    assert!(stderr.contains("not mapping its memory file"), "{stderr}");
    assert!(stderr.contains("memory: prefetch"), "{stderr}");
    assert!(stderr.contains("materialised its memory"), "{stderr}");
    let again = restore_ok(&store, "mapped", &["--mode", "file"], "cat /tmp/marker");
    assert_eq!(text(&again.stdout), "kept\n");
    assert!(text(&again.stderr).contains("memory: file"));

    // A snapshot of a file-restored VM (a diff against the mapped one) restores exactly.
    restore_ok(
        &store,
        "mapped",
        &["--snapshot-on-exit", "child", "--diff"],
        "echo more >> /tmp/marker",
    );
    let child = restore_ok(&store, "child", &[], "cat /tmp/marker");
    assert_eq!(text(&child.stdout), "kept\nmore\n");
    assert!(text(&child.stderr).contains("memory: file"));
}

#[test]
fn vmtest_a_snapshot_holding_a_connection_restores_through_a_transport_reset() {
    let store = TempStore::new("held");
    let socket = std::env::temp_dir().join(format!("ember-held-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    let child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "run",
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs,
            "--read-only-rootfs",
            "--store",
            store.path(),
            "--vsock-socket",
            socket.to_str().unwrap(),
            "--snapshot-on-exit",
            "held",
            "--",
            "sh",
            "-c",
            // Long enough for the test to open its own connection to the agent.
            "for i in $(seq 1 100); do [ -e /tmp/go ] && break; sleep 0.2; done; echo held",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A second agent client that stays connected through the snapshot.
    let deadline = std::time::Instant::now() + COMMAND_LIMIT;
    let held = loop {
        if let Ok(client) = ember_agent::client::AgentClient::connect_uds(&socket, 52) {
            if client.hello().is_ok() {
                break client;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no agent on {socket:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let touch = held
        .exec_collect(ember_agent::protocol::ExecRequest::new([
            "/bin/touch",
            "/tmp/go",
        ]))
        .expect("touch /tmp/go through the held connection");
    assert!(
        matches!(touch.status, ember_agent::protocol::ExitStatus::Code(0)),
        "{:?}",
        touch.status
    );
    let out = output_within(child, COMMAND_LIMIT);
    drop(held);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let recorded = manifest_json(&store, "held")["metadata"]["vsock_connections"].clone();
    assert_ne!(recorded, "0", "the held connection was not counted");
    // Its restore resets the guest's connections and reaches the agent again.
    let restored = restore_ok(&store, "held", &[], "echo after");
    assert_eq!(text(&restored.stdout), "after\n");
}

#[test]
fn vmtest_ember_run_and_restore_share_a_snapshot_through_a_remote_tier() {
    let mut s3 = start_s3("ember-share");
    let url = s3.url("cli");
    let (a, b) = (TempStore::new("remote-a"), TempStore::new("remote-b"));
    let (kernel, rootfs) = (artifact("EMBER_KERNEL"), artifact("EMBER_ROOTFS"));
    // Host A saves a sandbox that wrote a file (to its disk's overlay), and pushes it.
    let saved = ember(&[
        "run",
        "--kernel",
        &kernel,
        "--rootfs",
        &rootfs,
        "--cow",
        "--store",
        a.path(),
        "--snapshot-on-exit",
        "shared",
        "--remote",
        &url,
        "--",
        "sh",
        "-c",
        "echo made on a > /root/mark",
    ]);
    let said = text(&saved.stderr);
    assert!(saved.status.success(), "{said}");
    assert!(said.contains(&format!("shared pushed to {url}")), "{said}");

    // Host B has nothing: the restore fetches what the VMM reads first, the guest's pages
    // as it touches them, and the rest after the command, so the snapshot is then local.
    let restored = ember(&[
        "restore",
        "shared",
        "--store",
        b.path(),
        "--remote",
        &url,
        "--",
        "cat",
        "/root/mark",
    ]);
    let said = text(&restored.stderr);
    assert!(restored.status.success(), "{said}");
    assert_eq!(text(&restored.stdout), "made on a\n");
    assert!(
        said.contains("before the guest runs") && said.contains("now local"),
        "{said}"
    );
    assert!(b.0.join("manifests/shared").exists(), "{said}");
    assert!(!memory_objects(&b.0, "shared").is_empty());

    // With the remote gone, B restores from its own store.
    s3.kill();
    let again = ember(&[
        "restore",
        "shared",
        "--store",
        b.path(),
        "--",
        "cat",
        "/root/mark",
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), "made on a\n");
}
