//! Snapshot and restore end to end (`vmtest_*`: hardware KVM or the lab).

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
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ember")
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
}
