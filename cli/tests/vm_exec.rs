//! `ember run -- CMD` and the agent end to end, in a booted guest (`vmtest_*`: hardware KVM or
//! the lab). The guest boots the bundled rootfs read-only; /tmp is a tmpfs the agent mounts.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::client::AgentClient;
use ember_agent::protocol::{ExecRequest, ExitStatus, AGENT_VSOCK_PORT};
use ember_vmm::{VmConfig, Vmm, VmmOptions, VsockConfig};
use sha2::{Digest, Sha256};

fn artifact(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set; run VM tests through `cargo xtask test`"))
}

/// `ember run --read-only-rootfs ARGS… -- CMD…` with `stdin`, returning its output.
fn ember_run(args: &[&str], cmd: &[&str], stdin: Option<&[u8]>) -> Output {
    let kernel = artifact("EMBER_KERNEL");
    let rootfs = artifact("EMBER_ROOTFS");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "run",
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs,
            "--read-only-rootfs",
        ])
        .args(args)
        .arg("--")
        .args(cmd)
        .env("EMBER_HOST_SECRET", "must-not-leak")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    child.wait_with_output().expect("wait for ember")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn vmtest_run_streams_stdout_stderr_and_exit_code() {
    let out = ember_run(
        &[],
        &[
            "python3",
            "-c",
            "import sys; print(44*44); print('e', file=sys.stderr); sys.exit(3)",
        ],
        None,
    );
    assert_eq!(text(&out.stdout), "1936\n", "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("e\n"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn vmtest_binary_stdout_and_large_stdin_arrive_byte_exact() {
    // 20 MiB of random bytes (not UTF-8); the guest reports their hash on stderr.
    let out = ember_run(
        &[],
        &[
            "sh",
            "-c",
            "head -c 20971520 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
        ],
        None,
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 20 << 20);
    assert!(
        std::str::from_utf8(&out.stdout).is_err(),
        "the sample should not be UTF-8"
    );
    assert!(
        text(&out.stderr).contains(&sha256_hex(&out.stdout)),
        "hash mismatch; stderr: {}",
        text(&out.stderr)
    );

    let input: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let out = ember_run(&["--interactive"], &["sha256sum"], Some(&input));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).split_whitespace().next(),
        Some(sha256_hex(&input).as_str())
    );
}

#[test]
fn vmtest_timeouts_isolation_and_copies() {
    let started = Instant::now();
    let out = ember_run(&["--timeout-s", "3"], &["sleep", "100000"], None);
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("timed out"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(240));

    // The product story's isolation checks: a destructive command touches only the guest, and
    // the guest sees its own environment, none of the host's.
    let host_dir = std::env::temp_dir().join(format!("ember-isolation-{}", std::process::id()));
    std::fs::create_dir_all(host_dir.join("tmp")).unwrap();
    std::fs::write(host_dir.join("tmp/keep.txt"), b"host data").unwrap();
    let input = host_dir.join("input.txt");
    std::fs::write(&input, "from the host ✓\n").unwrap();
    let output = host_dir.join("output.txt");
    let copy_in = format!("{}:/tmp/in dir/ïnput.txt", input.display());
    let copy_out = format!("/tmp/out.txt:{}", output.display());
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .current_dir(&host_dir)
        .args(["run", "--kernel", &artifact("EMBER_KERNEL"), "--rootfs", &artifact("EMBER_ROOTFS")])
        .args(["--read-only-rootfs", "--cwd", "/tmp", "--copy-in", &copy_in, "--copy-out", &copy_out, "--"])
        .args(["sh", "-c", "mkdir -p tmp && rm -rf ./tmp && env && tr a-z A-Z < '/tmp/in dir/ïnput.txt' > /tmp/out.txt"])
        .env("EMBER_HOST_SECRET", "must-not-leak")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let env = text(&out.stdout);
    assert!(env.contains("PATH="), "{env}");
    assert!(
        !env.contains("EMBER_HOST_SECRET"),
        "the host's environment leaked: {env}"
    );
    assert_eq!(
        std::fs::read(host_dir.join("tmp/keep.txt")).unwrap(),
        b"host data"
    );
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "FROM THE HOST ✓\n"
    );
    std::fs::remove_dir_all(&host_dir).ok();
}

/// A VM with a vsock device, booted in this process, and a client connected to its agent.
/// A watchdog ends the test process with the VM's stall report if the test hangs.
struct Sandbox {
    client: Arc<AgentClient>,
    vm: Option<std::thread::JoinHandle<()>>,
    vmm: std::sync::Weak<Vmm>,
    finished: Arc<AtomicBool>,
    dir: PathBuf,
    console: ConsoleTail,
}

/// The last 64 KiB of the guest's console: printed when a test using the sandbox fails, so
/// a guest that died (a panic, an agent crash) says why.
#[derive(Clone, Default)]
struct ConsoleTail(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        const KEEP: usize = 64 << 10;
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend_from_slice(buf);
        if tail.len() > 2 * KEEP {
            let cut = tail.len() - KEEP;
            tail.drain(..cut);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Longer than any test using a `Sandbox` takes in the lab; shorter than the suite's limit.
const SANDBOX_WATCHDOG: Duration = Duration::from_secs(420);

impl Sandbox {
    fn boot() -> Sandbox {
        let dir = std::env::temp_dir().join(format!("ember-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        let config = VmConfig {
            kernel: artifact("EMBER_KERNEL").into(),
            initrd: None,
            rootfs: Some(artifact("EMBER_ROOTFS").into()),
            read_only_rootfs: true,
            rootfs_overlay: None,
            vcpus: 2,
            mem_mib: 512,
            cmdline_extra: Some(format!("init={}", ember_agent::AGENT_GUEST_PATH)),
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: socket.clone(),
            }),
            net: None,
        };
        let console = ConsoleTail::default();
        let options = VmmOptions {
            serial_out: Box::new(console.clone()),
            start: Instant::now(),
            ..Default::default()
        };
        let vmm = Arc::new(Vmm::build(&config, options).expect("the VM builds"));
        vmm.resume().expect("the vCPUs run");
        let vm = {
            let vmm = vmm.clone();
            std::thread::spawn(move || {
                vmm.wait().expect("the VM runs until shutdown");
                if let Ok(vmm) = Arc::try_unwrap(vmm) {
                    vmm.shutdown().expect("the VMM shuts down");
                }
            })
        };
        let finished = Arc::new(AtomicBool::new(false));
        {
            let vmm = Arc::downgrade(&vmm);
            let finished = finished.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                while started.elapsed() < SANDBOX_WATCHDOG {
                    if finished.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let report = vmm.upgrade().map(|v| v.stall_report()).unwrap_or_default();
                // Straight to stderr: libtest's capture would lose it when the process ends.
                let _ = writeln!(
                    std::io::stderr(),
                    "the test is still running after {SANDBOX_WATCHDOG:?}; the VM:\n{report}"
                );
                std::process::exit(101);
            });
        }
        let weak = Arc::downgrade(&vmm);
        drop(vmm);
        let client = AgentClient::wait_ready(&socket, AGENT_VSOCK_PORT, Duration::from_secs(240))
            .expect("the agent answers");
        Sandbox {
            client: Arc::new(client),
            vm: Some(vm),
            vmm: weak,
            finished,
            dir,
            console,
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = self.console.0.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                std::io::stderr(),
                "--- guest console (tail) ---\n{}",
                String::from_utf8_lossy(&tail)
            );
        }
        let _ = self.client.shutdown();
        if let Some(vm) = self.vm.take() {
            let _ = vm.join();
        }
        self.finished.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn vmtest_concurrent_execs_and_files_through_one_agent() {
    let sandbox = Sandbox::boot();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let client = sandbox.client.clone();
            std::thread::spawn(move || {
                let script = format!(
                    "for n in $(seq 1 500); do echo job{i}-line$n; echo job{i}-err$n >&2; done"
                );
                let out = client
                    .exec_collect(ExecRequest::shell(&script))
                    .expect("exec");
                (i, out)
            })
        })
        .collect();
    for handle in handles {
        let (i, out) = handle.join().unwrap();
        assert_eq!(out.status, ExitStatus::Code(0));
        let expected: String = (1..=500).map(|n| format!("job{i}-line{n}\n")).collect();
        assert_eq!(
            text(&out.stdout),
            expected,
            "job {i} stdout mixed or incomplete"
        );
        let expected: String = (1..=500).map(|n| format!("job{i}-err{n}\n")).collect();
        assert_eq!(
            text(&out.stderr),
            expected,
            "job {i} stderr mixed or incomplete"
        );
    }

    // Files: 5 MiB of binary content round trips byte-exact under an awkward path.
    let content: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    let path = "/tmp/dir with spaces/ünïcødé ✓/file name.bin";
    assert_eq!(
        sandbox
            .client
            .write_file(path, 0o640, &content[..])
            .unwrap(),
        content.len() as u64
    );
    let mut back = Vec::new();
    sandbox.client.read_file(path, &mut back).unwrap();
    assert!(back == content, "read back {} bytes, differing", back.len());
    assert_eq!(
        sandbox.client.stat(path).unwrap().size,
        content.len() as u64
    );
    let err = sandbox
        .client
        .read_file("/tmp/no/such/file", &mut Vec::new())
        .unwrap_err();
    assert!(
        err.to_string().contains("No such file") || err.to_string().contains("not found"),
        "{err}"
    );
    let missing = sandbox
        .client
        .exec_collect(ExecRequest::new(["/no/such/binary"]))
        .unwrap_err();
    assert!(
        missing.to_string().contains("No such file or directory"),
        "{missing}"
    );
}

#[test]
fn vmtest_a_stall_report_shows_vcpus_queues_and_threads_and_the_vm_runs_on() {
    let sandbox = Sandbox::boot();
    let report = sandbox.vmm.upgrade().expect("the VM runs").stall_report();
    for expected in [
        "vCPU 0: ",
        "vCPU 1: ",
        // virtio-block is type 2, virtio-vsock 19; both drivers are up.
        "type 2 status 0xf activated true",
        "type 19 status 0xf activated true",
        "queue 0: ready true",
        "| ring avail.idx ",
        "ember-vcpu0",
    ] {
        assert!(report.contains(expected), "no {expected:?} in:\n{report}");
    }
    // The report paused and resumed the vCPUs: the guest still answers.
    let out = sandbox
        .client
        .exec_collect(ExecRequest::shell("echo still here"))
        .expect("exec after the report");
    assert_eq!(text(&out.stdout), "still here\n");

    // A VM paused on purpose (the API's pause, a snapshot) stays paused through a report.
    let vmm = sandbox.vmm.upgrade().expect("the VM runs");
    vmm.pause().expect("pause");
    let vcpu_lines = |report: &str| -> Vec<String> {
        report
            .lines()
            .filter(|l| l.starts_with("vCPU"))
            .map(str::to_string)
            .collect()
    };
    let first = vmm.stall_report();
    assert!(first.contains("vCPUs: paused (not running)"), "{first}");
    assert!(!vmm.is_running(), "the report resumed a paused VM");
    let second = vmm.stall_report();
    assert_eq!(
        vcpu_lines(&first),
        vcpu_lines(&second),
        "the guest ran between reports"
    );
    vmm.resume().expect("resume");
    let out = sandbox
        .client
        .exec_collect(ExecRequest::shell("echo resumed"))
        .expect("exec after resume");
    assert_eq!(text(&out.stdout), "resumed\n");
}
