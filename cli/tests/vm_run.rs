//! `ember run` end to end. Tests named `vmtest_*` boot Linux: `cargo xtask test` runs them on
//! hardware KVM directly and inside the lab elsewhere, with the guest images in `EMBER_KERNEL`,
//! `EMBER_INITRAMFS` and `EMBER_ROOTFS`. They fail, never skip, where Linux cannot run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ember_vmm::probe::HostFacts;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn artifact(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set; run VM tests through `cargo xtask test`"))
}

/// Runs `ember ARGS…` with a time limit and returns its output.
fn ember(args: &[&str]) -> Output {
    ember_with_env(args, &[])
}

/// As [`ember`], with extra environment variables.
fn ember_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).ok();
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).ok();
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ember") {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            child.kill().ok();
            let status = child.wait().expect("reap ember");
            let out = String::from_utf8_lossy(&out_thread.join().unwrap_or_default()).into_owned();
            panic!(
                "ember {args:?} did not finish within {RUN_TIMEOUT:?} ({status}); stdout:\n{out}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean run (guest reset, exit 0) and returns stdout (the guest console).
fn expect_success(out: &Output) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "ember failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn python_on_bundled_rootfs(vcpus: &str) {
    let kernel = artifact("EMBER_KERNEL");
    let rootfs = artifact("EMBER_ROOTFS");
    let out = ember(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--read-only-rootfs",
        "--vcpus",
        vcpus,
        "--init-cmd",
        "python3 -c 'print(44*44)'; echo nproc=$(nproc)",
    ]);
    let console = expect_success(&out);
    assert!(
        console.lines().any(|l| l.trim() == "1936"),
        "no 1936 on the console:\n{console}"
    );
    assert!(
        console.contains(&format!("nproc={vcpus}")),
        "wrong CPU count:\n{console}"
    );
    assert!(
        text(&out.stderr).contains("guest reached userspace"),
        "the boot timer was not logged:\n{}",
        text(&out.stderr)
    );
}

#[test]
fn vmtest_python_runs_on_the_bundled_rootfs_with_one_vcpu() {
    python_on_bundled_rootfs("1");
}

#[test]
fn vmtest_python_runs_on_the_bundled_rootfs_with_two_vcpus() {
    python_on_bundled_rootfs("2");
}

/// A fresh file under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("ember-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Scratch(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_with_initramfs(disk: &Scratch, read_only: bool, script: &str) -> Output {
    run_with_initramfs_opts(disk, read_only, script, &[], &[])
}

/// As [`run_with_initramfs`], with more `ember run` options and environment variables.
fn run_with_initramfs_opts(
    disk: &Scratch,
    read_only: bool,
    script: &str,
    options: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let kernel = artifact("EMBER_KERNEL");
    let initrd = artifact("EMBER_INITRAMFS");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--rootfs",
        disk.path(),
        "--init-cmd",
        script,
    ];
    if read_only {
        args.push("--read-only-rootfs");
    }
    args.extend_from_slice(options);
    ember_with_env(&args, env)
}

#[test]
fn vmtest_a_file_written_in_the_guest_is_on_the_host_disk() {
    let disk = Scratch::new("write.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", disk.path(), "16M"])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let content = "written by the guest: 4242";
    let script = format!(
        "mkdir -p /tmp/disk && mount -t ext4 /dev/vda /tmp/disk && \
         printf '%s\\n' '{content}' > /tmp/disk/hello.txt && sync && umount /tmp/disk && echo WROTE"
    );
    let console = expect_success(&run_with_initramfs(&disk, false, &script));
    assert!(
        console.contains("WROTE"),
        "the guest did not write:\n{console}"
    );
    let read = Command::new("debugfs")
        .args(["-R", "cat /hello.txt", disk.path()])
        .output()
        .unwrap();
    assert_eq!(
        text(&read.stdout),
        format!("{content}\n"),
        "host sees other bytes in {}",
        disk.path()
    );
}

#[test]
fn vmtest_a_read_only_disk_refuses_writes_and_keeps_its_bytes() {
    let disk = Scratch::new("ro.img");
    let pattern: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&disk.0, &pattern).unwrap();
    // ember offers VIRTIO_BLK_F_RO, so the guest kernel marks the disk read-only and refuses
    // the write itself (EPERM: 6.1 ignores `blockdev --setrw` on a read-only disk). The device's
    // own answer to a write that reaches it (VIRTIO_BLK_S_IOERR) is covered by its unit tests.
    let script = "echo ro=$(cat /sys/block/vda/ro); blockdev --setrw /dev/vda; \
                  dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1; echo dd-exit=$?";
    let console = expect_success(&run_with_initramfs(&disk, true, script));
    assert!(
        console.contains("ro=1"),
        "the guest does not see a read-only disk:\n{console}"
    );
    assert!(
        console.contains("dd: error writing '/dev/vda'"),
        "the write was not refused:\n{console}"
    );
    assert!(
        !console.contains("dd-exit=0"),
        "dd reported success:\n{console}"
    );
    assert!(
        std::fs::read(&disk.0).unwrap() == pattern,
        "the read-only disk was modified"
    );
}

#[test]
fn vmtest_a_thread_making_a_forbidden_call_stops_the_vmm_with_the_seccomp_reason() {
    let disk = Scratch::new("seccomp.img");
    std::fs::write(&disk.0, vec![0u8; 1 << 20]).unwrap();
    let seccomp_exit = Some(ember_seccomp::EXIT_SECCOMP);
    // A vCPU thread without KVM_RUN stops the VMM before the guest's first instruction.
    let out = run_with_initramfs_opts(
        &disk,
        false,
        "echo BOOTED",
        &[],
        &[("EMBER_SECCOMP_DENY", "vcpu:ioctl")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), seccomp_exit, "{stderr}");
    assert!(
        stderr.contains("ember: seccomp: the vcpu thread made a forbidden system call: ioctl (16)"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("BOOTED"), "the guest ran");
    // The device thread may read the disk but not write it: the guest boots, and its first
    // write to the disk ends the VMM.
    let out = run_with_initramfs_opts(
        &disk,
        false,
        "echo BOOTED; dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct; echo WROTE",
        &[],
        &[("EMBER_SECCOMP_DENY", "devices:pwrite64,devices:pwritev")],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), seccomp_exit, "{stdout}\n{stderr}");
    assert!(stdout.contains("BOOTED"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("WROTE"), "{stdout}");
    assert!(
        stderr.contains("ember: seccomp: the devices thread made a forbidden system call: pwrite"),
        "{stderr}"
    );
    // Everything else in the suite runs with every filter enforced.
}

#[test]
fn vmtest_a_disk_rate_limit_slows_the_guest_and_loses_no_byte() {
    use sha2::Digest;
    let disk = Scratch::new("limited.img");
    // 8 MiB that no page cache or zero-page shortcut can fake.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..8 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&disk.0, &data).unwrap();
    let expected = format!("{:x}", sha2::Sha256::digest(&data));
    let script = "a=$(cut -d' ' -f1 /proc/uptime); sum=$(sha256sum /dev/vda); \
                  b=$(cut -d' ' -f1 /proc/uptime); echo \"READ $sum\"; echo \"ELAPSED $a $b\"";
    let out = run_with_initramfs_opts(
        &disk,
        true,
        script,
        &["--disk-bytes-per-sec", "1048576"],
        &[],
    );
    let console = expect_success(&out);
    let read = console
        .lines()
        .find_map(|l| l.strip_prefix("READ "))
        .unwrap_or_else(|| panic!("no READ line:\n{console}"));
    assert!(
        read.starts_with(&expected),
        "the guest read other bytes: {read}"
    );
    let times: Vec<f64> = console
        .lines()
        .find_map(|l| l.strip_prefix("ELAPSED "))
        .unwrap_or_else(|| panic!("no ELAPSED line:\n{console}"))
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let elapsed = times[1] - times[0];
    // 8 MiB at 1 MiB/s with a one-second burst takes at least 7 s; unlimited, the lab reads
    // it in well under a second. (A lower bound: a slow lab cannot make it pass wrongly.)
    assert!(
        elapsed >= 5.0,
        "8 MiB read in {elapsed:.2} s under a 1 MiB/s limit"
    );
}

#[test]
fn vmtest_ember_run_fails_clearly_for_a_missing_kernel() {
    let out = ember(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/vmlinux does not exist"),
        "{}",
        text(&out.stderr)
    );
}

/// Not a VM test: on a host whose KVM cannot run Linux, `ember run` refuses at once and says why.
#[test]
fn ember_run_refuses_a_host_whose_kvm_cannot_run_linux() {
    if HostFacts::read().kind().runs_linux() {
        return; // covered by the vmtest_ runs on this host
    }
    let out = ember(&["run", "--kernel", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot run a Linux guest") && stderr.contains("ember doctor"),
        "{stderr}"
    );
    assert!(Path::new(env!("CARGO_BIN_EXE_ember")).exists());
}
