//! Helpers shared by the VM test binaries (each includes this module).

#[allow(dead_code)]
pub mod service;
#[allow(dead_code)]
pub mod www;

use std::collections::HashSet;
use std::path::Path;

#[allow(dead_code)]
/// The page objects (hashes) of snapshot `id`'s memory in the store at `store_dir`; zero
/// pages are left out.
pub fn memory_objects(store_dir: &Path, id: &str) -> HashSet<String> {
    let store = ember_snapshot_store::Store::open(store_dir).unwrap();
    let manifest = store.load_manifest(id).unwrap();
    store
        .load_memory_map(&manifest)
        .unwrap()
        .pages
        .iter()
        .filter_map(|p| match p {
            ember_snapshot_store::PageRef::Object(hash) => Some(hash.to_string()),
            ember_snapshot_store::PageRef::Zero => None,
        })
        .collect()
}

/// How long one `ember` command of a VM test may take (the slowest take ~1 min in the lab).
#[allow(dead_code)]
pub const COMMAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits for `child` (stdout and stderr piped) like `wait_with_output`, for at most `limit`.
/// A child still running then is asked for its stall report (SIGUSR1: an `ember run` or
/// `ember restore` logs what its vCPUs are doing), given 5 s to write it, and killed; the
/// report ends up in the returned stderr with a line saying the command hung, so a hung
/// VM test fails with the evidence of why instead of only hitting the suite's timeout.
#[allow(dead_code)]
pub fn output_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let started = std::time::Instant::now();
    let mut hung = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ember") {
            break status;
        }
        if started.elapsed() > limit && !hung {
            hung = true;
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on our own child's pid, which try_wait has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            std::thread::sleep(std::time::Duration::from_secs(5));
            let _ = child.kill();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = stderr.join().unwrap();
    if hung {
        stderr.extend_from_slice(
            format!("\n(test: the command was still running after {limit:?}: asked for its stall report, then killed)\n")
                .as_bytes(),
        );
    }
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr,
    }
}

pub use ember_testkit::S3Server;

/// An S3-compatible server on loopback for the remote-tier tests (the `moto` package's
/// server mode) with bucket `bucket`, its `AWS_*` settings in this process's environment for
/// the processes the test starts (the VM tests run one per process: nothing else reads the
/// environment meanwhile).
#[allow(dead_code)]
pub fn start_s3(bucket: &str) -> S3Server {
    let server = S3Server::start(bucket).unwrap_or_else(|e| panic!("{e}"));
    for (name, value) in server.env() {
        std::env::set_var(name, value);
    }
    server
}
