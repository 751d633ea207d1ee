//! virtio-vsock against a real Linux guest (`vmtest_*`: hardware KVM or the lab). The guest
//! images come from `EMBER_KERNEL` and `EMBER_ROOTFS` (see `cargo xtask test`).
//!
//! The guest (the read-only rootfs, the agent as init running a python3 script) first connects
//! to the host (CID 2, port 6000 → `<uds>_6000`), then serves an echo on vsock port 5000; the
//! host connects with `CONNECT 5000`, streams random bytes through it and checks the echo.
//! The guest waits for the host to close before it exits, so the echo is whole by then.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_vmm::VsockConfig;
use ember_vmm::{run_with, ExitReason, VmConfig, VmmOptions};

const TIMEOUT: Duration = Duration::from_secs(300);
const ECHO_BYTES: usize = 4 << 20;
const GUEST_CID: u32 = 3;

fn artifact(var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .unwrap_or_else(|| panic!("{var} is not set; run VM tests through `cargo xtask test`"));
    PathBuf::from(path)
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Shows the VMM's log (warnings, and everything from the vsock device) with the test output.
struct TestLogger;

impl log::Log for TestLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info || m.target().contains("vsock")
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("[{} {}] {}", record.level(), record.target(), record.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: TestLogger = TestLogger;

/// The guest side: a guest-initiated round trip, then a single-connection echo server.
const GUEST_SCRIPT: &str = r#"echo virtio: $(cat /sys/bus/virtio/devices/*/device); ls -l /dev/vsock
python3 - <<'PY'
import socket as S
A=S.AF_VSOCK
print("python up",flush=True)
c=S.socket(A,S.SOCK_STREAM);c.settimeout(60);c.connect((2,6000));c.sendall(b"ping\n");r=b""
while not r.endswith(b"\n"):
 d=c.recv(64)
 if not d:break
 r+=d
print("guest got",r,flush=True);c.close()
l=S.socket(A,S.SOCK_STREAM);l.bind((S.VMADDR_CID_ANY,5000));l.listen(1)
print("echo ready",flush=True)
s,_=l.accept();n=0
while 1:
 d=s.recv(65536)
 if not d:break
 s.sendall(d);n+=len(d)
s.shutdown(S.SHUT_WR);s.settimeout(120);assert s.recv(1)==b""
s.close();print("echo done",n,flush=True)
PY"#;

/// Pseudo-random bytes (xorshift).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Host side of the guest-initiated connection: answer "ping" with "pong".
fn serve_pong(listener: UnixListener, deadline: Instant) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected to <uds>_6000".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = [0u8; 5];
    stream.read_exact(&mut line).map_err(|e| e.to_string())?;
    if &line != b"ping\n" {
        return Err(format!("guest sent {line:?}"));
    }
    stream.write_all(b"pong\n").map_err(|e| e.to_string())
}

/// Connects to guest port `port` through the device, retrying while the guest is not
/// listening yet (the device then closes the client).
fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> (UnixStream, String) {
    loop {
        assert!(
            Instant::now() < deadline,
            "guest port {port} never accepted"
        );
        let Ok(mut s) = UnixStream::connect(uds) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) => line.push(b[0]),
                _ => {
                    line.clear();
                    break;
                }
            }
        }
        if !line.is_empty() {
            return (s, String::from_utf8_lossy(&line).into_owned());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vmtest_vsock_echo_and_guest_initiated_connection() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(
        std::env::temp_dir().join("ember-vsock-vm-"),
    )
    .unwrap();
    let uds = dir.as_path().join("v.sock");
    let deadline = Instant::now() + TIMEOUT;
    let pong_listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let pong = std::thread::spawn(move || serve_pong(pong_listener, deadline));

    let config = VmConfig {
        kernel: artifact("EMBER_KERNEL"),
        initrd: None,
        rootfs: Some(artifact("EMBER_ROOTFS")),
        read_only_rootfs: true,
        rootfs_overlay: None,
        vcpus: 2,
        mem_mib: 512,
        cmdline_extra: Some(format!(
            "init={} {}={}",
            ember_agent::AGENT_GUEST_PATH,
            ember_agent::RUN_PARAM,
            ember_agent::encode_run_command(GUEST_SCRIPT)
        )),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        }),
        net: None,
    };
    let console = Console::default();
    let options = VmmOptions {
        serial_out: Box::new(console.clone()),
        start: Instant::now(),
        ..Default::default()
    };
    let (done_tx, done) = channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(run_with(&config, options).map_err(|e| e.to_string()));
    });

    // Host-initiated: CONNECT, then echo ECHO_BYTES random bytes.
    let (client, ok) = connect_guest(&uds, 5000, deadline);
    assert!(ok.starts_with("OK "), "{ok}");
    let host_port: u32 = ok[3..].parse().unwrap();
    assert!(host_port >= 1024, "{ok}");
    let data = Arc::new(random_bytes(ECHO_BYTES, 0xe5b0));
    let start = Instant::now();
    let writer = {
        let mut c = client.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            c.write_all(&data).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echo = Vec::with_capacity(ECHO_BYTES);
    let mut reader = client;
    reader
        .read_to_end(&mut echo)
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console.text()));
    let elapsed = start.elapsed();
    writer.join().unwrap();
    // The guest exits once the host has closed: its last bytes cannot race its power-off.
    drop(reader);
    assert_eq!(echo.len(), ECHO_BYTES, "console:\n{}", console.text());
    assert!(echo == *data, "the echo differs from what was sent");
    eprintln!(
        "vsock echo: {} MiB each way in {elapsed:?} ({:.2} MiB/s each way)",
        ECHO_BYTES >> 20,
        (ECHO_BYTES as f64 / (1 << 20) as f64) / elapsed.as_secs_f64()
    );

    pong.join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console.text()));
    let result = done
        .recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("no reset; console:\n{}", console.text()));
    std::thread::sleep(Duration::from_millis(200));
    let reason = result.unwrap_or_else(|e| panic!("{e}; console:\n{}", console.text()));
    let console = console.text();
    assert_eq!(reason, ExitReason::KeyboardReset, "console:\n{console}");
    assert!(
        console.contains("guest got b'pong\\n'"),
        "console:\n{console}"
    );
    assert!(
        console.contains(&format!("echo done {ECHO_BYTES}")),
        "console:\n{console}"
    );
    // The device removed its socket with the VM.
    assert!(!uds.exists());
}
