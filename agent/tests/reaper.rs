//! The PID-1 trap: while the orphan reaper runs, the server's commands keep their exit
//! statuses and orphans are still reaped. This process is made a child subreaper, so orphans
//! of the commands are re-parented to it as they would be to the guest's PID 1. (Its own test
//! binary: the reaper thread runs until the process ends.)

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::client::AgentClient;
use ember_agent::init;
use ember_agent::protocol::{ErrorKind, ExecRequest, ExitStatus};
use ember_agent::server::{serve_connection, ServerConfig};

/// Pids of this process's zombie children.
fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") && fields.get(1).and_then(|p| p.parse().ok()) == Some(me) {
            zombies.push(pid);
        }
    }
    zombies
}

#[test]
#[expect(
    clippy::zombie_processes,
    reason = "the keeper is reaped by the orphan reaper under test"
)]
fn orphans_are_reaped_and_exec_statuses_are_not_stolen() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's attributes.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // A child that is nobody's to wait for: the reaper sits in its blocking wait from the
    // start instead of sleeping for lack of children, and reaps this one at the end.
    let mut keeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::thread::spawn(|| init::reap_orphans_forever());

    let (host, guest) = UnixStream::pair().unwrap();
    let config = Arc::new(ServerConfig::new(|| {}));
    std::thread::spawn(move || serve_connection(guest, config));
    let client = AgentClient::new(host).unwrap();

    // A stolen status shows as a request that never ends (std's spawn panics when its own
    // waitpid finds the child gone): bound the wait so that fails instead of hanging.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let client = &client;
                scope.spawn(move || {
                    for round in 0..25 {
                        let code = (thread * 25 + round) % 7;
                        // Leaves an orphan behind that exits soon after.
                        let script =
                            format!("sleep 0.0{round} </dev/null >/dev/null 2>&1 & exit {code}");
                        let out = client.exec_collect(ExecRequest::shell(&script)).unwrap();
                        assert_eq!(out.status, ExitStatus::Code(code));

                        // A failed exec on the fork path (uid forces it): std reaps that child
                        // itself, which the reaper must not race.
                        let mut missing = ExecRequest::new(["/no/such/binary"]);
                        // SAFETY: getuid has no preconditions.
                        missing.uid = Some(unsafe { libc::getuid() });
                        let err = client.exec_collect(missing).unwrap_err();
                        assert!(err.to_string().contains("/no/such/binary"), "{err}");
                        assert!(matches!(
                            err,
                            ember_agent::client::ClientError::Remote(ref e) if e.kind == ErrorKind::NotFound
                        ));
                    }
                });
            }
        });
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the execs did not all finish: an exit status was stolen or a thread died");

    keeper.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let zombies = zombie_children();
        if zombies.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left unreaped: {zombies:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
