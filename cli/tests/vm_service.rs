//! `ember serve` end to end (`vmtest_*`: hardware KVM or the lab): curl on its Unix socket
//! and the `ember` CLI against a live service with real sandboxes.

mod common;
use common::service::{artifact, steps, text, Service};
use common::{memory_objects, start_s3};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[test]
fn vmtest_service_exec_streams_files_and_refuses_bad_requests() {
    let service = Service::start("exec");
    // A disk limit far above what the test moves: the path from the API to the device.
    let id = service.create(json!({
        "env": {"GREETING": "hi"},
        "disk_limits": {"bytes_per_sec": 1u64 << 30}
    }));
    let sandbox = service.sandbox(&id);
    assert_eq!(
        sandbox["disk_limits"]["bytes_per_sec"],
        1u64 << 30,
        "{sandbox}"
    );

    // The service's state is private to it (its folder, the sandbox's folder, record, spec
    // and log), and the API socket is its owner's and group's.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let sandbox_dir = service.state.join("sandboxes").join(&id);
    assert_eq!(mode(&service.state), 0o700);
    assert_eq!(mode(&sandbox_dir), 0o700);
    for file in ["sandbox.json", "spec.json", "vmm.log"] {
        assert_eq!(mode(&sandbox_dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&service.socket), 0o660);
    // A user the service was not told to answer gets nothing, even with every mode opened up
    // around the socket: the peer check refuses the connection itself.
    let set_mode = |p: &Path, m: u32| std::fs::set_permissions(p, PermissionsExt::from_mode(m));
    set_mode(&service.state, 0o711).unwrap();
    set_mode(&service.socket, 0o666).unwrap();
    let stranger = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
        ])
        .args(["--max-time", "10", "--unix-socket"])
        .arg(&service.socket)
        .arg("http://ember/healthz")
        .output()
        .expect("run curl as nobody");
    set_mode(&service.state, 0o700).unwrap();
    set_mode(&service.socket, 0o660).unwrap();
    assert!(
        !stranger.status.success() && !String::from_utf8_lossy(&stranger.stdout).contains("ok"),
        "nobody was answered: {stranger:?}"
    );
    assert!(
        service.log().contains("API connection refused: uid 65534"),
        "{}",
        service.log()
    );

    // The service runs as root, so the VMM is jailed: the process it started is the jail's
    // supervisor (one thread, filtered), and the VMM is its only child, PID 1 of its own
    // namespace, running as the jail's user.
    let supervisor = sandbox["pid"].as_i64().unwrap();
    let status_of = |pid: i64| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let outside = status_of(supervisor);
    assert_eq!(line(&outside, "Threads:"), "1", "{outside}");
    assert_eq!(line(&outside, "Seccomp:"), "2", "{outside}");
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).unwrap();
    let children: Vec<i64> = children
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 1, "{children:?}");
    let pid = children[0];
    let inside = status_of(pid);
    assert_eq!(line(&inside, "NSpid:"), format!("{pid} 1"), "{inside}");
    assert_eq!(line(&inside, "Uid:"), "64177 64177 64177 64177", "{inside}");
    assert_eq!(line(&inside, "CapEff:"), "0000000000000000", "{inside}");
    // The VMM process is contained: every one of its threads runs under a seccomp filter,
    // and its file limits are set.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut threads = Vec::new();
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    assert!(threads.len() >= 5, "{threads:?}");
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "a VMM thread runs without a seccomp filter: {threads:?}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some("4096")),
        "{limits}"
    );
    // Its own cgroup v2: memory = the guest's 256 MiB + 160 MiB, one vCPU's CPU, 64 tasks.
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cgroup = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| {
            let folder = ember_service::cgroup::service_folder(&service.state);
            p.ends_with(&format!("/ember-sandboxes/{folder}/{id}"))
        })
        .unwrap_or_else(|| panic!("the VMM is not in its sandbox's cgroup: {membership}"));
    let cgroup = std::path::Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'));
    let read = |file: &str| {
        std::fs::read_to_string(cgroup.join(file))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("memory.max"), ((256u64 + 160) << 20).to_string());
    assert_eq!(read("cpu.max"), "100000 100000");
    // The lab's kernel has the burst (5.14 and later): a start may spend saved-up CPU time.
    assert_eq!(read("cpu.max.burst"), "100000");
    assert_eq!(read("pids.max"), "64");
    // The guest fills most of its RAM: the VMM grows, stays under its limit, is not killed,
    // and the sandbox goes on answering.
    let out = service.sh(
        &id,
        "python3 -c 'b = bytearray(160 << 20); b[::4096] = b\"x\" * len(b[::4096]); print(len(b) >> 20)'",
    );
    assert_eq!(out["stdout"], "160\n", "{out}");
    let peak: u64 = read("memory.peak").parse().unwrap_or(0);
    let current: u64 = read("memory.current").parse().unwrap();
    assert!(
        peak.max(current) > 130 << 20 && peak.max(current) <= (256 + 160) << 20,
        "memory.current {current}, memory.peak {peak}"
    );
    let events = read("memory.events");
    assert!(
        events.lines().any(|l| l == "oom_kill 0"),
        "the sandbox's VMM was OOM-killed: {events}"
    );

    // The issue's first example, waited for.
    let out = service.call(
        "POST",
        &format!("/sandboxes/{id}/exec?wait=true"),
        Some(json!({"cmd": "python3", "args": ["-c", "print(44*44)"]})),
        200,
    );
    assert_eq!(out["stdout"], "1936\n", "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    // The sandbox's env reaches commands; a failing command's code comes back.
    let out = service.sh(&id, "echo $GREETING; echo oops >&2; exit 3");
    assert_eq!(
        (out["stdout"].as_str(), out["stderr"].as_str()),
        (Some("hi\n"), Some("oops\n"))
    );
    assert_eq!(out["exit_code"], 3);

    // A streamed command printing 1,000 lines: NDJSON, in order, complete, then the exit.
    let (status, stream) = service.curl(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(r#"{"cmd":"sh","args":["-c","for i in $(seq 1 1000); do echo line $i; done"]}"#),
    );
    assert_eq!(status, 200, "{stream}");
    let records: Vec<Value> = stream
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect();
    assert_eq!(records[0]["type"], "started");
    let stdout: String = records
        .iter()
        .filter(|r| r["type"] == "stdout")
        .map(|r| r["data"].as_str().unwrap().to_string())
        .collect();
    let want: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout, want);
    let last = records.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(0))
    );

    // The CLI streams and exits with the command's code.
    let out = service.ember(&["exec", &id, "--", "sh", "-c", "printf 'a\\nb\\n'; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a\nb\n");

    // Files: upload (binary, streamed), download, mkdir; the CLI's cp both ways.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let host = service.state.join("blob.bin");
    std::fs::write(&host, &data).unwrap();
    let out = service.ember(&[
        "cp",
        host.to_str().unwrap(),
        &format!("{id}:/root/in/blob.bin"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = service.sh(&id, "sha256sum /root/in/blob.bin | cut -d' ' -f1");
    let want = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&data);
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(out["stdout"].as_str().unwrap().trim(), want);
    let back = service.state.join("back.bin");
    let out = service.ember(&[
        "cp",
        &format!("{id}:/root/in/blob.bin"),
        back.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    service.call(
        "POST",
        &format!("/sandboxes/{id}/files/mkdir"),
        Some(json!({"path": "/srv/a/b"})),
        201,
    );
    assert_eq!(
        service.sh(&id, "test -d /srv/a/b && echo yes")["stdout"],
        "yes\n"
    );
    let (status, body) = service.curl(
        "GET",
        &format!("/sandboxes/{id}/files?path=/etc/hostname"),
        None,
    );
    assert_eq!(status, 200, "{body}");

    // Detached commands: status, logs, kill.
    let cmd = service.call(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(json!({"cmd": "sh", "args": ["-c", "echo started; sleep 600"], "detach": true})),
        202,
    );
    let cid = cmd["cmd_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = service.call("GET", &format!("/sandboxes/{id}/commands/{cid}"), None, 200);
        assert_eq!(c["status"], "running", "{c}");
        if c["stdout"] == "started\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no output from the detached command: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    service.call(
        "POST",
        &format!("/sandboxes/{id}/commands/{cid}/kill"),
        Some(json!({})),
        200,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = service.call("GET", &format!("/sandboxes/{id}/commands/{cid}"), None, 200);
        if c["status"] == "finished" {
            assert_eq!(c["signal"], 9, "{c}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed command still runs: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Bad requests: clear errors, nothing lost.
    service.refuse("POST", "/sandboxes", Some("{not json"), 400, "invalid_json");
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"vcpus":1,"colour":"red"}"#),
        400,
        "invalid_json",
    );
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"memory_mib":1}"#),
        400,
        "invalid_request",
    );
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"image":"windows"}"#),
        400,
        "invalid_request",
    );
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"snapshot":"no-such"}"#),
        404,
        "not_found",
    );
    service.refuse("GET", "/sandboxes/sb-nope", None, 404, "not_found");
    service.refuse(
        "POST",
        "/sandboxes/sb-nope/exec",
        Some(r#"{"cmd":"true"}"#),
        404,
        "not_found",
    );
    service.refuse("GET", "/no/such/endpoint", None, 404, "not_found");
    let huge = format!(r#"{{"cmd":"true","args":["{}"]}}"#, "x".repeat(2 << 20));
    let huge_file = service.state.join("huge.json");
    std::fs::write(&huge_file, huge).unwrap();
    service.refuse(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(&format!("@{}", huge_file.display())),
        413,
        "too_large",
    );
    for bad in ["../etc/passwd", "/root/../../etc/passwd", "relative/path"] {
        service.refuse(
            "GET",
            &format!("/sandboxes/{id}/files?path={bad}"),
            None,
            400,
            "invalid_path",
        );
    }
    service.refuse(
        "GET",
        &format!("/sandboxes/{id}/files?path=/no/such/file"),
        None,
        404,
        "not_found",
    );
    service.refuse(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(r#"{"cmd":"/no/such/program"}"#),
        404,
        "not_found",
    );
    // After all that the sandbox still works.
    assert_eq!(service.sh(&id, "echo alive")["stdout"], "alive\n");

    // Pause: nothing runs until resume.
    service.call("POST", &format!("/sandboxes/{id}/pause"), None, 200);
    service.refuse(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(r#"{"cmd":"true"}"#),
        409,
        "conflict",
    );
    service.call("POST", &format!("/sandboxes/{id}/resume"), None, 200);
    assert_eq!(service.sh(&id, "echo back")["stdout"], "back\n");

    // A sandbox at its timeout stops; commands on it are refused.
    let short = service.create(json!({"timeout_s": 2}));
    service.wait_state(&short, "stopped", Duration::from_secs(60));
    service.refuse(
        "POST",
        &format!("/sandboxes/{short}/exec"),
        Some(r#"{"cmd":"true"}"#),
        409,
        "conflict",
    );

    // kill -9 of one sandbox's VMM: reported as failed, the other keeps working. As root (the
    // lab) it has a network, which goes with its VMM while its record stays.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let victim = service.create(if root {
        json!({"network": {"mode": "egress"}})
    } else {
        json!({})
    });
    let netns = std::path::PathBuf::from(format!("/run/netns/ember-{victim}"));
    assert_eq!(netns.exists(), root, "{}", netns.display());
    let pid = service.sandbox(&victim)["pid"].as_i64().unwrap();
    // SAFETY: the victim's VMM process, started by the service for this test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let failed = service.wait_state(&victim, "failed", Duration::from_secs(30));
    assert!(
        failed["failure"]
            .as_str()
            .is_some_and(|f| f.contains("signal: 9") || f.contains("SIGKILL")),
        "{failed}"
    );
    service.refuse(
        "POST",
        &format!("/sandboxes/{victim}/exec"),
        Some(r#"{"cmd":"true"}"#),
        409,
        "conflict",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while netns.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !netns.exists(),
        "the dead VMM's network namespace {} is still there",
        netns.display()
    );
    assert_eq!(service.sh(&id, "echo still here")["stdout"], "still here\n");

    // The CLI lists them; metrics count them.
    let out = service.ember(&["ls"]);
    assert!(
        text(&out.stdout).contains(&id) && text(&out.stdout).contains("failed"),
        "{}",
        text(&out.stdout)
    );
    let (status, metrics) = service.curl("GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ember_sandboxes{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ember_boots_total 3"), "{metrics}");
    let (status, openapi) = service.curl("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<Value>(&openapi).unwrap()["paths"]["/sandboxes/{id}/exec"]
            .is_object()
    );

    let out = service.ember(&["rm", &id, &short, &victim]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        service.call("GET", "/sandboxes", None, 200)["sandboxes"],
        json!([])
    );
}

/// Installs a dependency (a Python package written into site-packages, no network here)
/// and simulates its slow set-up.
const INSTALL: &str = "mkdir -p /usr/local/lib/python3.11/dist-packages/emberdemo && \
    printf 'def greet():\\n    return \"hello from a dependency\"\\n' \
      > /usr/local/lib/python3.11/dist-packages/emberdemo/__init__.py && \
    python3 -c 'import emberdemo, compileall; compileall.compile_dir(\"/usr/local/lib/python3.11/dist-packages\", quiet=1)' && \
    echo installed";

const USE_DEP: &str = "python3 -c 'import emberdemo; print(emberdemo.greet())'";

/// Seconds since the guest booted (a restored guest carries on from its snapshot's).
fn uptime(service: &Service, id: &str) -> f64 {
    let out = service.sh(id, "cut -d' ' -f1 /proc/uptime");
    out["stdout"].as_str().unwrap().trim().parse().unwrap()
}

#[test]
fn vmtest_service_story_snapshot_restore_fork_and_restart() {
    let mut service = Service::start("story");

    // Cold: create, install, use.
    let t = Instant::now();
    let cold = service.create(json!({"image": "python"}));
    let out = service.sh(&cold, INSTALL);
    assert_eq!(out["stdout"], "installed\n", "{out}");
    let cold_first_exec = t.elapsed();
    assert_eq!(
        service.sh(&cold, USE_DEP)["stdout"],
        "hello from a dependency\n"
    );

    // Two snapshots of the running sandbox a few seconds apart share ≥ 90 % of their memory
    // objects (the first leaves it running).
    let pre = service.call(
        "POST",
        &format!("/sandboxes/{cold}/snapshots"),
        Some(json!({"name": "pre"})),
        201,
    );
    assert_eq!(pre["sandbox"]["state"], "running", "{pre}");
    std::thread::sleep(Duration::from_secs(3));

    // Snapshot (stopping it), delete the sandbox.
    let booted_for = uptime(&service, &cold);
    let out = service.ember(&["snapshot", &cold, "--name", "with-dep", "--stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "with-dep");
    service.wait_state(&cold, "stopped", Duration::from_secs(30));
    let (pre, later) = (
        memory_objects(&service.state.join("store"), "pre"),
        memory_objects(&service.state.join("store"), "with-dep"),
    );
    let shared = later.intersection(&pre).count();
    eprintln!("story: {shared} of {} memory objects shared", later.len());
    assert!(
        shared * 10 >= later.len() * 9,
        "only {shared} of {} memory objects shared",
        later.len()
    );
    service.call("DELETE", &format!("/sandboxes/{cold}"), None, 204);
    service.refuse(
        "POST",
        &format!("/sandboxes/{cold}/snapshots"),
        Some("{}"),
        404,
        "not_found",
    );
    let snaps = service.call("GET", "/snapshots", None, 200);
    let ids: Vec<&str> = snaps["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(ids.contains(&"with-dep") && ids.contains(&"pre"), "{snaps}");

    // Restore: the dependency is there without reinstalling, and the guest carried on
    // (its uptime continues from the snapshot's, it did not boot again).
    let t = Instant::now();
    let warm = service.create(json!({"snapshot": "with-dep"}));
    let out = service.sh(&warm, USE_DEP);
    let warm_first_exec = t.elapsed();
    assert_eq!(out["stdout"], "hello from a dependency\n", "{out}");
    assert!(
        uptime(&service, &warm) >= booted_for,
        "the restored guest booted afresh"
    );
    eprintln!(
        "story: cold create+install {:.0} ms, restore+first exec {:.0} ms ({:.1}x)",
        cold_first_exec.as_secs_f64() * 1e3,
        warm_first_exec.as_secs_f64() * 1e3,
        cold_first_exec.as_secs_f64() / warm_first_exec.as_secs_f64()
    );
    // The pages that first command needed are recorded for the next restores: by the VMM
    // into its staging folder, then checked and taken into the store by the service.
    let working_set = service.state.join("store/workingsets/with-dep");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !working_set.exists() {
        assert!(
            Instant::now() < deadline,
            "no working set was recorded for with-dep"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let staged = service
        .state
        .join("sandboxes")
        .join(&warm)
        .join("vmm/staging/working-set");
    assert!(!staged.exists(), "the staged working set is left behind");

    // A diff snapshot of the restored sandbox, which keeps running.
    let diff = service.call(
        "POST",
        &format!("/sandboxes/{warm}/snapshots"),
        Some(json!({"name": "with-dep-2", "diff": true})),
        201,
    );
    assert_eq!(diff["parent"], "with-dep", "{diff}");
    assert_eq!(service.sh(&warm, "echo running")["stdout"], "running\n");
    service.refuse(
        "POST",
        &format!("/sandboxes/{warm}/snapshots"),
        Some(r#"{"name":"with-dep"}"#),
        409,
        "conflict",
    );

    // Fork four from one snapshot: independent sandboxes.
    let out = service.ember(&["fork", "with-dep", "--count", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forks: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(forks.len(), 4, "{forks:?}");
    let mut randoms = Vec::new();
    for (i, id) in forks.iter().enumerate() {
        let out = service.sh(id, &format!("echo {i} > /root/who; {USE_DEP}; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"));
        assert!(
            out["stdout"]
                .as_str()
                .unwrap()
                .starts_with("hello from a dependency\n"),
            "{out}"
        );
        randoms.push(
            out["stdout"]
                .as_str()
                .unwrap()
                .lines()
                .nth(1)
                .unwrap_or("")
                .to_string(),
        );
    }
    for (i, id) in forks.iter().enumerate() {
        assert_eq!(
            service.sh(id, "cat /root/who")["stdout"],
            format!("{i}\n"),
            "fork {id} saw another's write"
        );
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        4,
        "forks share their randomness: {randoms:?}"
    );

    // Restart the service: snapshots are kept, running sandboxes are adopted, and one whose
    // VMM died meanwhile is reported.
    let victim = forks[0].clone();
    let victim_pid = service.sandbox(&victim)["pid"].as_i64().unwrap();
    service.terminate();
    // SAFETY: the victim's VMM process, started by the service for this test.
    unsafe { libc::kill(victim_pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    service.launch();
    let snaps = service.ember(&["snapshots"]);
    assert!(
        text(&snaps.stdout).contains("with-dep-2"),
        "{}",
        text(&snaps.stdout)
    );
    let s = service.sandbox(&victim);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["failure"].as_str().unwrap().contains("gone"), "{s}");
    assert_eq!(service.sandbox(&forks[1])["state"], "running");
    assert_eq!(service.sh(&forks[1], "cat /root/who")["stdout"], "1\n");
    // And it still restores.
    let again = service.create(json!({"snapshot": "with-dep-2"}));
    assert_eq!(
        service.sh(&again, USE_DEP)["stdout"],
        "hello from a dependency\n"
    );
}

#[test]
fn vmtest_a_jailed_vmm_sees_only_its_own_files_and_no_network() {
    let service = Service::start("jail");
    let a = service.create(json!({}));
    let b = service.create(json!({}));
    let spec_of = |id: &str| service.state.join("sandboxes").join(id).join("spec.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(spec_of(&a)).unwrap()).unwrap();
    assert_eq!(spec["jail"]["uid"], 64177, "{spec}");
    // A host TCP listener the probe must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let a_dir = service.state.join("sandboxes").join(&a);
    let b_dir = service.state.join("sandboxes").join(&b);
    let run = service.state.join("run");
    let outsiders = [
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/usr"),
        PathBuf::from("/home"),
        PathBuf::from("/sys"),
        service.socket.clone(),
        service.state.join("serve.log"),
        a_dir.join("sandbox.json"),
        a_dir.join("spec.json"),
        b_dir.join("vmm").join("rootfs.overlay"),
        run.join(&b).join("vsock"),
        run.join(&b).join("ctl"),
    ];
    let insiders = [
        PathBuf::from(artifact("EMBER_KERNEL")),
        PathBuf::from(artifact("EMBER_ROOTFS")),
        a_dir.join("vmm").join("rootfs.overlay"),
        run.join(&a).join("vsock"),
        service.state.join("store"),
        PathBuf::from("/dev/kvm"),
    ];
    // The probe enters sandbox a's jail exactly as a's VMM did, then looks around.
    let mut probe =
        Command::new(PathBuf::from(env!("CARGO_BIN_EXE_ember")).with_file_name("ember-vmm"));
    probe
        .args(["--jail-probe", "--spec"])
        .arg(spec_of(&a))
        .args(["--probe-connect", &address])
        .env("SECRET_OF_THE_HOST", "x");
    for path in outsiders.iter().chain(&insiders) {
        probe.arg("--probe-path").arg(path);
    }
    let out = probe.output().expect("run the jail probe");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the probe's JSON");
    assert_eq!(seen["uid"], 64177, "{seen}");
    assert_eq!(seen["gid"], 64177, "{seen}");
    assert_eq!(seen["effective_capabilities"], "0000000000000000", "{seen}");
    assert_eq!(seen["pid"], 1, "{seen}");
    assert_eq!(seen["visible_processes"], 1, "{seen}");
    assert_eq!(seen["hostname"], "ember-sandbox", "{seen}");
    assert_eq!(seen["interfaces"], json!(["lo"]), "{seen}");
    assert_ne!(seen["connect"], "connected", "{seen}");
    assert_eq!(seen["open_fds"], json!([0, 1, 2]), "{seen}");
    assert_eq!(seen["kvm_opens"], true, "{seen}");
    // The root holds the devices, /proc and the top of each visible path, nothing else.
    let top = |p: &PathBuf| {
        p.components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    };
    let mut expected: Vec<String> = insiders
        .iter()
        .map(top)
        .chain(["dev".into(), "proc".into()])
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(seen["root_entries"], json!(expected), "{seen}");
    let reachable: Vec<PathBuf> = serde_json::from_value(seen["reachable_paths"].clone()).unwrap();
    for path in &outsiders {
        assert!(
            !reachable.contains(path),
            "the jail reaches {}: {seen}",
            path.display()
        );
    }
    for path in &insiders {
        assert!(
            reachable.contains(path),
            "the jail lacks {}: {seen}",
            path.display()
        );
    }
    // The VMM's environment is what the service chose, none of the service's own.
    let environ = std::fs::read(format!("/proc/{}/environ", jailed_vmm_pid(&service, &a))).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| text(v).split('=').next().unwrap().to_string())
        .collect();
    assert!(
        names.iter().all(|n| [
            "TMPDIR",
            "RUST_LOG",
            "RUST_BACKTRACE",
            "EMBER_SECCOMP",
            "EMBER_SECCOMP_DENY"
        ]
        .contains(&n.as_str())),
        "{names:?}"
    );
    // Both jailed sandboxes work, snapshot included: the VMM writes it into its staging
    // folder, the service verifies it and takes it into the store.
    for id in [&a, &b] {
        let out = service.sh(id, "echo jailed; id -u");
        assert_eq!(out["stdout"], "jailed\n0\n", "{out}");
    }
    service.call(
        "POST",
        &format!("/sandboxes/{a}/snapshots"),
        Some(json!({"name": "jailed"})),
        201,
    );
    let store = service.state.join("store");
    assert!(!memory_objects(&store, "jailed").is_empty());
    assert!(
        !a_dir.join("vmm/staging/snapshots/jailed").exists(),
        "the staged copy is left behind"
    );
    // The store is the service's, readable by the jail's group, writable by no VMM.
    let packs: Vec<PathBuf> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(!packs.is_empty());
    for path in packs
        .iter()
        .chain([&store, &store.join("manifests/jailed")])
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 64177), "{}", path.display());
        assert_eq!(meta.mode() & 0o027, 0, "{}", path.display());
    }
    let mut writes =
        Command::new(PathBuf::from(env!("CARGO_BIN_EXE_ember")).with_file_name("ember-vmm"));
    writes.args(["--jail-probe", "--spec"]).arg(spec_of(&a));
    let wanted = [
        store.clone(),
        store.join("packs"),
        store.join("manifests"),
        store.join("manifests/jailed"),
        packs[0].clone(),
        a_dir.join("vmm"),
    ];
    for path in &wanted {
        writes.arg("--probe-path").arg(path);
    }
    let out = writes.output().expect("run the jail probe");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the probe's JSON");
    assert_eq!(
        seen["writable_paths"],
        json!([a_dir.join("vmm")]),
        "a jailed VMM can write only its own folder: {seen}"
    );
    // A restore in a jail: its memory arrives through the jail's /dev/userfaultfd.
    let restored = service.create(json!({"snapshot": "jailed"}));
    let out = service.sh(&restored, "echo restored");
    assert_eq!(out["stdout"], "restored\n", "{out}");
    // A VMM dies with its supervisor (the pid the service knows and kills).
    let supervisor = service.sandbox(&b)["pid"].as_i64().unwrap();
    let jailed = jailed_vmm_pid(&service, &b);
    // SAFETY: kill(2) on the test's own sandbox's supervisor.
    unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{jailed}/exe")).exists() {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM {jailed} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What a jail leaves on the host goes with its sandbox: no mount of the jail's is seen
    // outside, and deleting the sandboxes leaves no socket folder.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("ember-jail"), "{mounts}");
    for id in [&a, &b, &restored] {
        service.call("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
    let left: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    drop(listener);
}

/// The VMM of sandbox `id`: the jail supervisor's only child.
fn jailed_vmm_pid(service: &Service, id: &str) -> i64 {
    let supervisor = service.sandbox(id)["pid"].as_i64().unwrap();
    std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A value of sandbox `id`'s cgroup (read through its VMM's membership).
fn cgroup_value(service: &Service, id: &str, file: &str) -> String {
    let pid = jailed_vmm_pid(service, id);
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = membership
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap();
    std::fs::read_to_string(
        std::path::Path::new("/sys/fs/cgroup")
            .join(path.trim_start_matches('/'))
            .join(file),
    )
    .unwrap()
}

#[test]
fn vmtest_a_guest_exhausting_its_memory_and_forking_without_end_harms_no_one_else() {
    let service = Service::start("hostile");
    let hostile = service.create(json!({}));
    let bystander = service.create(json!({}));
    // Allocating without end: the guest's own OOM killer ends the hog (SIGKILL: 137); the
    // host's memory limit on its VMM never fires, and the sandbox answers afterwards.
    let out = service.call(
        "POST",
        &format!("/sandboxes/{hostile}/exec?wait=true"),
        Some(json!({"cmd": "python3", "args": ["-c",
            "x = []\nwhile True: x.append(bytearray(1 << 20)); x[-1][::4096] = b'x' * 256"],
            "timeout_s": 240})),
        200,
    );
    assert_ne!(out["exit_code"], 0, "{out}");
    assert_eq!(service.sh(&hostile, "echo alive")["stdout"], "alive\n");
    let events = cgroup_value(&service, &hostile, "memory.events");
    assert!(events.lines().any(|l| l == "oom_kill 0"), "{events}");
    // A fork bomb, left running: the guest drowns in its own processes, the host's task limit
    // on its VMM holds, and the service and the other sandbox carry on.
    service.call(
        "POST",
        &format!("/sandboxes/{hostile}/exec"),
        Some(json!({"cmd": "sh", "args": ["-c", "b() { b | b & }; b"], "detach": true})),
        202,
    );
    std::thread::sleep(Duration::from_secs(20));
    let tasks: u32 = cgroup_value(&service, &hostile, "pids.current")
        .trim()
        .parse()
        .unwrap();
    assert!(tasks <= 64, "{tasks} tasks");
    for round in 0..3 {
        let out = service.sh(&bystander, &format!("echo round {round}"));
        assert_eq!(out["stdout"], format!("round {round}\n"), "{out}");
        assert_eq!(service.curl("GET", "/healthz", None).0, 200);
    }
    assert_eq!(
        cgroup_value(&service, &hostile, "memory.events")
            .lines()
            .find(|l| l.starts_with("oom_kill ")),
        Some("oom_kill 0")
    );
    // The drowned sandbox still goes away when asked.
    let started = Instant::now();
    service.call("DELETE", &format!("/sandboxes/{hostile}"), None, 204);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(service.sh(&bystander, "echo still")["stdout"], "still\n");
}

/// Pids of the service's idle pooled VMMs (jail supervisors and jailed processes alike):
/// `--pooled` on their command lines, and their sandbox folder still marked pooled.
fn idle_pooled_pids(service: &Service) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|b| *b == 0).map(text).collect();
            let spec = args
                .iter()
                .position(|a| a == "--spec")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from);
            args.iter().any(|a| a == "--pooled")
                && spec.is_some_and(|spec| {
                    spec.starts_with(&service.state) && spec.with_file_name("pooled").exists()
                })
        })
        .collect()
}

#[test]
fn vmtest_a_warm_pool_serves_boots_and_restores_replaces_dead_vmms_and_absorbs_bursts() {
    let service = Service::start_with("pool", &["--warm-pool", "2"]);
    service.wait_pool_idle(2);
    assert!(service.metric("ember_warm_pool_idle_rss_bytes") > 0);

    // A boot takes a pooled VMM: assigned, not spawned.
    let a = service.create(json!({}));
    let described = service.sandbox(&a);
    let booted = steps(&described);
    assert!(booted.contains(&"vmm_assigned".to_string()), "{described}");
    // A booted VMM's timeline carries the guest's own milestones, in the guest's order.
    let at = |step: &str| {
        booted
            .iter()
            .position(|s| s == step)
            .unwrap_or_else(|| panic!("no {step} in {described}"))
    };
    assert!(
        at("vcpus_running") < at("guest_kernel_ran_init"),
        "{described}"
    );
    assert!(
        at("guest_kernel_ran_init") < at("guest_agent_started"),
        "{described}"
    );
    assert!(
        at("guest_agent_started") < at("guest_agent_ready"),
        "{described}"
    );
    assert_eq!(service.sh(&a, "echo pooled")["stdout"], "pooled\n");
    assert_eq!(service.metric("ember_warm_pool_hits_total"), 1);

    // A restore takes one too, and maps its snapshot's memory.
    service.call(
        "POST",
        &format!("/sandboxes/{a}/snapshots"),
        Some(json!({"name": "pooled-snap"})),
        201,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while service.call("GET", "/snapshots/pooled-snap", None, 200)["memory_materialised"] != true {
        assert!(
            Instant::now() < deadline,
            "the snapshot was never materialised"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    service.wait_pool_idle(2);
    let b = service.create(json!({"snapshot": "pooled-snap"}));
    let described = service.sandbox(&b);
    assert!(
        steps(&described).contains(&"vmm_assigned".to_string()),
        "{described}"
    );
    assert_eq!(described["memory"], "file", "{described}");
    assert_eq!(service.sh(&b, "echo restored")["stdout"], "restored\n");

    // Pooled VMMs that died while idle are never assigned: the next sandbox starts anyway.
    service.wait_pool_idle(2);
    let idle = idle_pooled_pids(&service);
    assert!(idle.len() >= 2, "{idle:?}");
    for pid in &idle {
        // SAFETY: a pooled VMM this test's service started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(500));
    let c = service.create(json!({}));
    assert_eq!(service.sh(&c, "echo after")["stdout"], "after\n");
    assert!(service.metric("ember_warm_pool_died_idle_total") >= 1);
    assert!(service.metric("ember_warm_pool_misses_total") >= 1);

    // A burst larger than the pool: every request is served (by the pool as it refills, or
    // by VMMs started for it).
    service.wait_pool_idle(2);
    let burst: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| service.create(json!({}))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for id in &burst {
        assert_eq!(service.sh(id, "echo burst")["stdout"], "burst\n");
    }
    // Every VMM, pooled or started for its request, booted or restored, passed the
    // connection its agent answered on up to the service, which ran the first command on it.
    assert_eq!(service.metric("ember_agent_connections_passed_total"), 6);
    assert_eq!(
        service.metric("ember_agent_connections_not_passed_total"),
        0
    );
    for id in [a, b, c].iter().chain(&burst) {
        service.call("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
}

#[test]
fn vmtest_a_service_in_a_delegated_cgroup_moves_into_a_leaf_and_limits_its_sandboxes() {
    // What systemd gives a unit with `Delegate=yes`: a cgroup of its own, holding the service.
    let mount = Path::new("/sys/fs/cgroup");
    std::fs::write(mount.join("cgroup.subtree_control"), "+memory +cpu +pids").unwrap();
    let unit = mount.join(format!("ember-test-unit-{}", std::process::id()));
    std::fs::create_dir_all(&unit).unwrap();
    let mut service = Service::start_in_cgroup("unit", &unit);
    let pid = service.child.as_ref().unwrap().id();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unit_name = unit.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        own.trim(),
        format!("0::/{unit_name}/service"),
        "{}",
        service.log()
    );
    let id = service.create(json!({}));
    let service_cgroups = unit
        .join("ember-sandboxes")
        .join(ember_service::cgroup::service_folder(&service.state));
    let sandbox_cgroup = service_cgroups.join(&id);
    let memory_max = std::fs::read_to_string(sandbox_cgroup.join("memory.max")).unwrap();
    assert_eq!(memory_max.trim(), ((256u64 + 160) << 20).to_string());
    assert_eq!(service.sh(&id, "echo limited")["stdout"], "limited\n");
    service.call("DELETE", &format!("/sandboxes/{id}"), None, 204);
    service.terminate();
    // Leaves first: the sandboxes' folders, the service's leaf, then the unit.
    for dir in [
        service_cgroups,
        unit.join("ember-sandboxes"),
        unit.join("service"),
        unit.clone(),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&dir).is_err() && dir.exists() {
            assert!(Instant::now() < deadline, "cannot remove {}", dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One HTTP/1.1 request on the service's socket from this process (no `curl` per request, so
/// hundreds can be under way at once): its status, 0 if no answer came within `patience`.
fn raw_request(socket: &Path, method: &str, path: &str, body: &str, patience: Duration) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(patience));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: ember\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn vmtest_hundreds_of_requests_to_a_silent_agent_harm_no_other_sandbox() {
    let service = Service::start("silent");
    let silent = service.create(json!({}));
    let other = service.create(json!({}));
    assert_eq!(service.sh(&silent, "echo up")["stdout"], "up\n");
    // The silent sandbox's VMM (and so its agent) is frozen: it takes connections into its
    // socket's backlog and requests into its buffers, and answers nothing.
    let supervisor = service.sandbox(&silent)["pid"].as_i64().unwrap();
    let membership = std::fs::read_to_string(format!("/proc/{supervisor}/cgroup")).unwrap();
    let cgroup = Path::new("/sys/fs/cgroup").join(
        membership
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim_start_matches('/'),
    );
    std::fs::write(cgroup.join("cgroup.freeze"), "1").unwrap();

    let requests = 200;
    let started = Instant::now();
    let service_pid = service.child.as_ref().unwrap().id();
    let threads_of = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    let path = format!("/sandboxes/{silent}/exec?wait=true");
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..requests)
            .map(|_| {
                let (socket, path) = (&service.socket, &path);
                scope.spawn(move || {
                    raw_request(
                        socket,
                        "POST",
                        path,
                        r#"{"cmd":"true"}"#,
                        Duration::from_secs(300),
                    )
                })
            })
            .collect();
        // While they wait, the other sandbox answers as before, and the service's threads
        // stay bounded (the agent calls under way are, not the requests).
        std::thread::sleep(Duration::from_secs(3));
        for _ in 0..3 {
            let asked = Instant::now();
            assert_eq!(service.sh(&other, "echo fine")["stdout"], "fine\n");
            assert!(
                asked.elapsed() < Duration::from_secs(20),
                "the other sandbox took {:?} to answer",
                asked.elapsed()
            );
        }
        let threads = threads_of(service_pid);
        assert!(threads < 150, "the service has {threads} threads");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    // Every request was answered with an error (none hung, none ran), within the deadlines:
    // 64 agent calls at a time, each abandoned after 30 s; the rest refused (503) after
    // waiting 30 s for a turn.
    let mut counts = std::collections::BTreeMap::new();
    for status in &statuses {
        *counts.entry(*status).or_insert(0) += 1;
    }
    assert!(
        statuses.iter().all(|s| matches!(s, 502..=504)),
        "statuses: {counts:?}"
    );
    assert!(
        counts.get(&503).copied().unwrap_or(0) >= requests - 2 * 64,
        "statuses: {counts:?}"
    );
    assert!(
        took < Duration::from_secs(150),
        "the requests took {took:?}: {counts:?}"
    );

    // Thawed, the sandbox serves commands again.
    std::fs::write(cgroup.join("cgroup.freeze"), "0").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, answer) = service.curl(
            "POST",
            &format!("/sandboxes/{silent}/exec?wait=true"),
            Some(r#"{"cmd":"sh","args":["-c","echo back"]}"#),
        );
        if status == 200 {
            assert!(answer.contains("back"), "{answer}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the thawed sandbox does not answer: {status} {answer}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    for id in [&silent, &other] {
        service.call("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
}

/// Polls `GET /snapshots/{id}` until its `remote` field is `want`.
fn wait_remote(service: &Service, id: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let snap = service.call("GET", &format!("/snapshots/{id}"), None, 200);
        if snap["remote"] == want {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot {id} never became {want}: {snap}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vmtest_a_snapshot_saved_on_one_host_resumes_on_another_through_the_remote_tier() {
    let mut s3 = start_s3("ember-share");
    let url = s3.url("hosts");
    // Short enough for the outage below to show quickly, long enough for moto (Python, in the
    // lab, beside another lab) to take a pack of several MiB.
    let options = ["--remote", url.as_str(), "--remote-timeout-s", "20"];
    let a = Service::start_with("remote-a", &options);
    // B keeps as little of what it fetches as it may.
    let b = Service::start_with(
        "remote-b",
        &[&options[..], &["--remote-cache-bytes", "1"]].concat(),
    );
    // (All three start before any sandbox: a starting service removes the sandbox cgroups
    // it does not know, and these share one cgroup root.)
    let c = Service::start_with(
        "remote-c",
        &[&options[..], &["--remote-rest-after-s", "3600"]].concat(),
    );

    // Host A installs something and saves it; the push follows on its own.
    let sandbox = a.create(json!({"image": "python"}));
    assert_eq!(a.sh(&sandbox, INSTALL)["stdout"], "installed\n");
    a.call(
        "POST",
        &format!("/sandboxes/{sandbox}/snapshots"),
        Some(json!({"name": "installed"})),
        201,
    );
    wait_remote(&a, "installed", "remote");

    // Host B has an empty store: it sees the snapshot in the remote and restores it at once,
    // having fetched only what the VMM reads first; the guest's pages come as it touches
    // them, the rest in the background, after which the snapshot is local.
    assert!(!b.state.join("store/manifests/installed").exists());
    let seen = b.call("GET", "/snapshots/installed", None, 200);
    assert_eq!(seen["remote"], "remote", "{seen}");
    assert_eq!(seen["local"], false, "{seen}");
    let restored = b.create(json!({"snapshot": "installed"}));
    let fetched =
        b.call("GET", &format!("/sandboxes/{restored}"), None, 200)["remote_fetch"].clone();
    let bytes = |name: &str| {
        fetched[name]
            .as_u64()
            .unwrap_or_else(|| panic!("a lazy restore records what it fetched first: {fetched}"))
    };
    let (before_start, before_ready) = (bytes("bytes_before_start"), bytes("bytes_before_ready"));
    assert_eq!(
        b.sh(&restored, USE_DEP)["stdout"],
        "hello from a dependency\n"
    );
    let local = b.state.join("store/manifests/installed");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !local.exists() {
        assert!(Instant::now() < deadline, "{}", b.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        b.call("GET", "/snapshots/installed", None, 200)["local"],
        true
    );
    assert!(!memory_objects(&b.state.join("store"), "installed").is_empty());
    let in_all = b.metric("ember_remote_downloaded_bytes_total");
    assert!(
        before_start > 0 && before_start * 2 < in_all && before_start <= before_ready,
        "{before_start} bytes fetched before the VMM started, {before_ready} before ready, \
         {in_all} in all"
    );
    assert!(a.metric("ember_remote_uploaded_bytes_total") >= in_all / 2);

    // Host C restores a snapshot only the remote has, and the remote dies before the rest of
    // it is fetched: the guest's next page that is not here stops the sandbox, saying why.
    a.call(
        "POST",
        &format!("/sandboxes/{sandbox}/snapshots"),
        Some(json!({"name": "for-c"})),
        201,
    );
    wait_remote(&a, "for-c", "remote");
    let stranded = c.create(json!({"snapshot": "for-c"}));

    // B, over its bound on fetched snapshots, drops the one no sandbox uses any more when
    // it fetches another (whole, for a `file` restore), and keeps the new one.
    assert!(local.exists(), "in use by a live sandbox, kept");
    b.call("DELETE", &format!("/sandboxes/{restored}"), None, 204);
    let restored = b.create(json!({"snapshot": "for-c", "restore_mode": "file"}));
    assert!(!local.exists(), "{}", b.log());
    assert!(b.state.join("store/manifests/for-c").exists());
    let seen = b.call("GET", "/snapshots/installed", None, 200);
    assert_eq!(seen["remote"], "remote", "still in the remote: {seen}");

    // With the remote gone: a push fails and says so, a restore of a snapshot only the
    // remote had fails at once with 503 naming the remote, and local work goes on.
    a.call(
        "POST",
        &format!("/sandboxes/{sandbox}/snapshots"),
        Some(json!({"name": "later"})),
        201,
    );
    wait_remote(&a, "later", "remote");
    s3.kill();
    a.call(
        "POST",
        &format!("/sandboxes/{sandbox}/snapshots"),
        Some(json!({"name": "unpushed"})),
        201,
    );
    let failed = wait_remote(&a, "unpushed", "push_failed");
    assert!(
        failed["remote_error"]
            .as_str()
            .is_some_and(|e| e.contains(&url)),
        "{failed}"
    );
    let t = Instant::now();
    b.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"snapshot": "later"}"#),
        503,
        "remote_unavailable",
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(a.sh(&sandbox, "echo still")["stdout"], "still\n");
    assert_eq!(b.sh(&restored, "echo still")["stdout"], "still\n");

    // Reading every file touches page-cache pages C never fetched.
    let t = Instant::now();
    let _ = c.curl(
        "POST",
        &format!("/sandboxes/{stranded}/exec?wait=true"),
        Some(
            r#"{"cmd": "sh", "args": ["-c", "cat /usr/lib/python3*/*.py /usr/bin/* > /dev/null"]}"#,
        ),
    );
    let failed = loop {
        let info = c.call("GET", &format!("/sandboxes/{stranded}"), None, 200);
        if info["state"] == "failed" {
            break info;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the sandbox still runs without its pages: {info}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let why = failed["failure"].as_str().unwrap_or_default();
    assert!(why.contains("guest page") && why.contains(&url), "{failed}");
}

/// The schemathesis configuration of the contract test: which fixture each operation acts
/// on, so generated requests reach live resources instead of only 404s.
fn contract_config(ids: &ContractFixtures, report: &Path) -> String {
    let ContractFixtures {
        sandbox,
        command,
        pty,
        finished,
        snapshotted,
        doomed,
        snapshot,
        doomed_snapshot,
    } = ids;
    format!(
        r#"# Written by vmtest_the_service_keeps_its_openapi_contract.
workers = 1
request-timeout = 120
continue-on-failure = true
max-failures = 50
[generation]
# Each operation also gets the coverage phase's cases (every boundary the schema defines).
max-examples = 4
no-shrink = true
[phases.stateful]
enabled = false
[reports.junit]
enabled = true
path = "{report}"

[[operations]]
include-path = "/sandboxes/{{id}}/snapshots"
parameters = {{ "path.id" = "{snapshotted}" }}
generation = {{ max-examples = 3 }}

# (Operations are picked by id: `include-path` matches every path under it too.)
[[operations]]
include-operation-id = "delete_sandbox"
parameters = {{ "path.id" = "{doomed}" }}

[[operations]]
include-operation-id = "delete_snapshot"
parameters = {{ "path.id" = "{doomed_snapshot}" }}

[[operations]]
include-path-regex = "^/snapshots/\\{{id\\}}"
parameters = {{ "path.id" = "{snapshot}" }}

# The operations that start VMs: every valid boundary value the coverage phase would try
# boots one (a lab boot takes seconds); their valid requests come from the other phases.
[[operations]]
include-operation-id = "fork_snapshot"
parameters = {{ "path.id" = "{snapshot}" }}
generation = {{ max-examples = 3 }}
phases = {{ coverage = {{ generation = {{ mode = "negative" }} }} }}

[[operations]]
include-operation-id = "create_sandbox"
generation = {{ max-examples = 3 }}
phases = {{ coverage = {{ generation = {{ mode = "negative" }} }} }}

# A removal acts on a scratch path (a generated one could be a folder the fixture needs).
[[operations]]
include-operation-id = "remove_file"
parameters = {{ "path.id" = "{sandbox}", "query.path" = "/tmp/contract-scratch" }}

# A folder's archive streams all under it: a generated path could be `/` (the whole disk).
[[operations]]
include-operation-id = "get_tar"
parameters = {{ "path.id" = "{sandbox}", "query.path" = "/tmp" }}
generation = {{ max-examples = 3 }}

# A running command's log, and a `GET` of it with `wait`, last as long as the command.
[[operations]]
include-operation-id = ["command_logs", "get_command"]
parameters = {{ "path.id" = "{sandbox}", "path.cid" = "{finished}" }}

[[operations]]
include-path-regex = "^/sandboxes/\\{{id\\}}/files/(list|stat|rename)$"
parameters = {{ "path.id" = "{sandbox}" }}
generation = {{ max-examples = 4 }}

[[operations]]
include-path-regex = "^/sandboxes/\\{{id\\}}"
parameters = {{ "path.id" = "{sandbox}", "path.cid" = "{command}", "path.pty_id" = "{pty}" }}
"#,
        report = report.display()
    )
}

struct ContractFixtures {
    /// The sandbox most operations act on.
    sandbox: String,
    /// A command in it that has finished (what its log and a waiting `GET` act on: a running
    /// one's follow until the command ends).
    finished: String,
    /// A detached command in it.
    command: String,
    /// A terminal in it (running `sleep`).
    pty: String,
    /// The sandbox the snapshot operation acts on (a snapshot with `stop` stops it).
    snapshotted: String,
    /// The sandbox `DELETE /sandboxes/{id}` acts on.
    doomed: String,
    /// The snapshot the snapshot operations act on.
    snapshot: String,
    /// The snapshot `DELETE /snapshots/{id}` acts on.
    doomed_snapshot: String,
}

/// A process killed when this is dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The OpenAPI document the service serves, against the service itself: schemathesis
/// (pinned in `xtask/python-requirements.txt`) generates requests to every operation, valid
/// and invalid, and checks each answer's status, content type and body against the document,
/// that valid requests are not refused as malformed, invalid ones are, and that nothing is a
/// server error.
#[test]
fn vmtest_the_service_keeps_its_openapi_contract() {
    let service = Service::start_with("contract", &["--max-sandboxes", "6"]);
    let small = json!({"memory_mib": 256, "vcpus": 1});
    let sandbox = service.create(small.clone());
    let detached = service.call(
        "POST",
        &format!("/sandboxes/{sandbox}/exec"),
        Some(json!({"cmd": "sleep", "args": ["3600"], "detach": true})),
        202,
    );
    let command = detached["cmd_id"].as_str().unwrap().to_string();
    let done = service.call(
        "POST",
        &format!("/sandboxes/{sandbox}/exec"),
        Some(json!({"cmd": "echo", "args": ["finished"], "detach": true})),
        202,
    );
    let finished = done["cmd_id"].as_str().unwrap().to_string();
    let terminal = service.call(
        "POST",
        &format!("/sandboxes/{sandbox}/pty"),
        Some(json!({"cmd": "sleep", "args": ["3600"], "cols": 80, "rows": 24})),
        201,
    );
    let pty = terminal["pty_id"].as_str().unwrap().to_string();
    let waited = service.call(
        "GET",
        &format!("/sandboxes/{sandbox}/commands/{finished}?wait=true"),
        None,
        200,
    );
    assert_eq!(waited["status"], "finished", "{waited}");
    service.sh(&sandbox, "echo contract > /tmp/contract.txt");
    let snapshotted = service.create(small.clone());
    let doomed = service.create(small);
    let take = |name: &str| {
        service.call(
            "POST",
            &format!("/sandboxes/{snapshotted}/snapshots"),
            Some(json!({"name": name})),
            201,
        );
        name.to_string()
    };
    let fixtures = ContractFixtures {
        finished,
        snapshot: take("contract-base"),
        doomed_snapshot: take("contract-doomed"),
        sandbox,
        command,
        pty,
        snapshotted,
        doomed,
    };
    let report = service.state.join("contract-junit.xml");
    let config = service.state.join("schemathesis.toml");
    std::fs::write(&config, contract_config(&fixtures, &report)).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _proxy = KillOnDrop(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../service/tests/contract/uds_proxy.py"
            ))
            .arg(port.to_string())
            .arg(&service.socket)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the TCP-to-Unix-socket proxy"),
    );
    let started = Instant::now();
    let run = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--no-color", "--config-file"])
        .arg(&config)
        .arg("run")
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args(["--wait-for-schema", "300", "--checks", "all"])
        // A template build runs package managers, which reach the registries; this test
        // keeps to this machine (vm_runtimes.rs builds templates and checks their answers).
        .args(["--exclude-operation-id", "create_template"])
        // An import's body is a container image tarball: a generated one is never a valid
        // image, and its 422 is not a contract break (unit and VM tests import real ones).
        .args(["--exclude-operation-id", "import_image"])
        // A watch streams until its client goes away (a request timeout to schemathesis),
        // and a generated body is never a tar archive (its 400 is not a contract break
        // either; unit and VM tests send real and hostile archives).
        .args(["--exclude-operation-id", "watch_files"])
        .args(["--exclude-operation-id", "put_tar"])
        // A terminal's connect is a WebSocket upgrade: without one it is 400 (which the
        // document, describing no upgrade headers, cannot say), with one a 101 and a byte
        // stream no HTTP exchange ends (vm_shell.rs drives real sessions).
        .args(["--exclude-operation-id", "connect_pty"])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its caches (.schemathesis, .hypothesis) go with the service's state.
        .current_dir(&service.state)
        .stdin(Stdio::null())
        .output()
        .expect("run schemathesis (cargo xtask deps installs it)");
    let out = text(&run.stdout);
    eprintln!(
        "schemathesis ran in {:.0?}:\n{out}\n{}",
        started.elapsed(),
        text(&run.stderr)
    );
    // Kept where the host sees it after the lab: which operations the time went to.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("contract-junit.xml");
    let _ = std::fs::copy(&report, &kept);
    assert!(
        run.status.success(),
        "schemathesis found operations that break the contract (above); service log:\n{}",
        service.log()
    );
    // Each operation was exercised (a filter that matched nothing would pass vacuously).
    let junit = std::fs::read_to_string(&report).unwrap_or_default();
    for op in [
        "POST /sandboxes/{id}/exec",
        "GET /snapshots/{id}",
        "PUT /sandboxes/{id}/files",
        "GET /sandboxes/{id}/files/list",
        "GET /templates",
        "GET /images",
    ] {
        assert!(junit.contains(op), "{op} was not tested:\n{junit}");
    }
}
