//! The SDKs and remote access end to end (`vmtest_*`: hardware KVM or the lab): a live
//! `ember serve` with its Unix socket and an HTTPS listener (a certificate made here, bearer
//! tokens from a file); the TypeScript and Python SDKs' live suites run against it, curl
//! checks tokens, their rotation on SIGHUP and per-token rate limits, and the examples answer
//! "generated" code from real runtime sandboxes.

mod common;
use common::service::{artifact, text, Service};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TOKEN: &str = "sdk-tests-0123456789abcdef";
const ROTATED_TOKEN: &str = "sdk-tests-rotated-fedcba9876543210";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A service reachable over its socket and over HTTPS on loopback.
struct RemoteService {
    service: Service,
    url: String,
    ca: PathBuf,
    token_file: PathBuf,
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RemoteService {
    fn start(name: &str, extra: &[&str]) -> RemoteService {
        let dir = PathBuf::from(format!("/tmp/es-{}-{name}-tls", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, key) = ember_testkit::tls::self_signed(&dir, "IP:127.0.0.1,DNS:localhost");
        let token_file = dir.join("tokens");
        std::fs::write(&token_file, format!("# the SDK suites\nsdk {TOKEN}\n")).unwrap();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut options = vec![
            "--listen",
            &listen,
            "--tls-cert",
            ca.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        options.extend_from_slice(extra);
        let service = Service::start_with(name, &options);
        RemoteService {
            service,
            url: format!("https://127.0.0.1:{port}"),
            ca,
            token_file,
        }
    }

    /// The environment an SDK connects with.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("EMBER_SOCKET", self.service.socket.display().to_string()),
            ("EMBER_URL", self.url.clone()),
            ("EMBER_TOKEN", TOKEN.to_string()),
            ("EMBER_CA_FILE", self.ca.display().to_string()),
        ]
    }

    /// curl over HTTPS with `token`: (status, headers, body).
    fn https(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--max-time", "300", "-D", "-", "--cacert"])
            .arg(&self.ca)
            .args(["-X", method, "-w", "\n%{http_code}"])
            .arg(format!("{}{path}", self.url));
        if let Some(token) = token {
            command.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if let Some(body) = body {
            command.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let all = text(&command.output().expect("run curl").stdout);
        let (rest, code) = all.rsplit_once('\n').unwrap_or(("", &all));
        let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        (
            code.trim().parse().unwrap_or(0),
            headers.to_lowercase(),
            body.to_string(),
        )
    }
}

impl Drop for RemoteService {
    fn drop(&mut self) {
        if let Some(dir) = self.ca.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs a test program, printing its output; panics with it (and the service's log) if it
/// fails.
fn run_suite(what: &str, command: &mut Command, service: &Service) -> Output {
    let started = Instant::now();
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    println!(
        "{what}: {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
        started.elapsed().as_secs_f64(),
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}); service log:\n{}",
        out.status,
        service.log()
    );
    out
}

#[test]
fn vmtest_sdk_typescript_live_suite_passes_over_the_socket_and_https() {
    let remote = RemoteService::start("sdk-ts", &[]);
    let dir = repo().join("sdk/typescript");
    assert!(
        dir.join("dist/test/live").is_dir(),
        "the TypeScript SDK is not built: run `cargo xtask sdk`"
    );
    let out = run_suite(
        "TypeScript SDK live suite",
        Command::new(artifact("EMBER_NODE"))
            .args(["--test", "dist/test/live/sdk.live.test.js"])
            .envs(remote.env())
            .current_dir(&dir),
        &remote.service,
    );
    // node's test runner reports its totals: the suite ran tests and failed none.
    let report = text(&out.stdout);
    assert!(report.contains("# fail 0"), "{report}");
    assert!(!report.contains("# pass 0"), "{report}");
}

#[test]
fn vmtest_sdk_python_live_suite_passes_over_the_socket_and_https() {
    let remote = RemoteService::start("sdk-py", &[]);
    let dir = repo().join("sdk/python");
    let out = run_suite(
        "Python SDK live suite",
        Command::new(artifact("EMBER_PYTHON"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/live"])
            .env("PYTHONPATH", dir.join("src"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(remote.env())
            .current_dir(&dir),
        &remote.service,
    );
    let report = text(&out.stdout);
    assert!(report.contains(" passed"), "{report}");
    assert!(
        !report.contains("skipped"),
        "a live test skipped itself: {report}"
    );
}

#[test]
fn vmtest_remote_access_runs_sandboxes_over_https_rotates_tokens_on_sighup_and_rate_limits() {
    let remote = RemoteService::start("remote", &["--token-rate", "2", "--token-burst", "20"]);
    // A sandbox created and used over HTTPS.
    let (status, _, body) = remote.https("POST", "/sandboxes", Some(TOKEN), Some("{}"));
    assert_eq!(status, 201, "{body}\n{}", remote.service.log());
    let sandbox: Value = serde_json::from_str(&body).unwrap();
    let id = sandbox["id"].as_str().unwrap();
    let exec = json!({"cmd": "sh", "args": ["-c", "echo $((44 * 44))"]}).to_string();
    let (status, _, body) = remote.https(
        "POST",
        &format!("/sandboxes/{id}/exec?wait=true"),
        Some(TOKEN),
        Some(&exec),
    );
    assert_eq!(status, 200, "{body}");
    let result: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(result["stdout"], "1936\n", "{result}");

    // No token, a wrong one, another scheme: 401 with the API's error document.
    for token in [None, Some("not-a-token-0123456789")] {
        let (status, headers, body) = remote.https("GET", &format!("/sandboxes/{id}"), token, None);
        assert_eq!(status, 401, "{body}");
        assert!(headers.contains("www-authenticate: bearer"), "{headers}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "unauthorized", "{body}");
    }
    // Plain HTTP on the TLS port gets nowhere.
    let plain = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(remote.url.replace("https://", "http://") + "/healthz")
        .output()
        .unwrap();
    assert_eq!(text(&plain.stdout), "000");

    // Rate limit: 60 requests on one connection (one curl, so they come faster than the
    // budget refills) exceed a burst of 20: 429s with Retry-After. The socket has no limit.
    let headers = remote.service.state.join("burst-headers");
    let burst = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "-D",
        ])
        .arg(&headers)
        .arg("--cacert")
        .arg(&remote.ca)
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args((0..60).flat_map(|_| {
            [
                "-o".into(),
                "/dev/null".into(),
                format!("{}/healthz", remote.url),
            ]
        }))
        .output()
        .unwrap();
    let codes = text(&burst.stdout);
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert!(codes.lines().take(20).all(|c| c == "200"), "{codes}");
    assert!(
        limited > 0,
        "60 requests at once within a burst of 20 were all answered: {codes}"
    );
    let headers = std::fs::read_to_string(&headers).unwrap().to_lowercase();
    assert!(headers.contains("retry-after: "), "{headers}");
    assert_eq!(remote.service.curl("GET", "/healthz", None).0, 200);

    // Rotation: the file now holds another token; SIGHUP makes it the only one.
    std::fs::write(&remote.token_file, format!("ci {ROTATED_TOKEN}\n")).unwrap();
    let pid = remote.service.child.as_ref().unwrap().id() as i32;
    // SAFETY: a signal to the service this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while remote.https("GET", "/healthz", Some(ROTATED_TOKEN), None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the rotated token was never accepted:\n{}",
            remote.service.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(remote.https("GET", "/healthz", Some(TOKEN), None).0, 401);
    // A broken token file on SIGHUP keeps the tokens in use (and says so in the log).
    std::fs::write(&remote.token_file, "short\n").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        remote.https("GET", "/healthz", Some(ROTATED_TOKEN), None).0,
        200
    );
    assert!(
        remote.service.log().contains("keeping the tokens in use"),
        "{}",
        remote.service.log()
    );
    assert_eq!(
        remote
            .https(
                "DELETE",
                &format!("/sandboxes/{id}"),
                Some(ROTATED_TOKEN),
                None
            )
            .0,
        204
    );

    // Off loopback without TLS the service does not start.
    let refused = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["serve", "--listen", &format!("0.0.0.0:{}", free_port())])
        .arg("--token-file")
        .arg(&remote.token_file)
        .arg("--state-dir")
        .arg(remote.service.state.join("refused"))
        .args([
            "--kernel",
            &artifact("EMBER_KERNEL"),
            "--rootfs",
            &artifact("EMBER_ROOTFS"),
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("without TLS"),
        "{}",
        text(&refused.stderr)
    );
}

/// An example run with `program` and `args`, its JSON answer (the last line of stdout).
fn example_answer(service: &Service, program: &str, args: &[&str], stdin: &str) -> Value {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env("EMBER_SOCKET", &service.socket)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}\n--- service log ---\n{}",
        text(&out.stdout),
        text(&out.stderr),
        service.log()
    );
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn vmtest_examples_answer_generated_code_from_node22_and_python313_sandboxes() {
    let service = Service::start("examples");
    // The tool call an AI agent would make, without packages (no uplink here: installs from
    // the registries are the demo's and the uplink tests' job).
    let node = example_answer(
        &service,
        &artifact("EMBER_NODE"),
        &["examples/node/run-generated-code.mjs"],
        r#"{"code": "console.log(44 * 44); console.error('e'); process.exitCode = 3", "packages": []}"#,
    );
    assert_eq!(node["stdout"], "1936\n", "{node}");
    assert_eq!(node["stderr"], "e\n", "{node}");
    assert_eq!(node["exitCode"], 3, "{node}");
    let python = example_answer(
        &service,
        &artifact("EMBER_PYTHON"),
        &["examples/python/run_generated_code.py"],
        r#"{"code": "import sys; print(44 * 44); print('e', file=sys.stderr); sys.exit(3)", "packages": []}"#,
    );
    assert_eq!(python["stdout"], "1936\n", "{python}");
    assert_eq!(python["stderr"], "e\n", "{python}");
    assert_eq!(python["exit_code"], 3, "{python}");
    // Every example stops what it started.
    let left = service.call("GET", "/sandboxes", None, 200);
    let running: Vec<&Value> = left["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "running")
        .collect();
    assert!(running.is_empty(), "{left}");
}
