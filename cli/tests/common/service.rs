//! A live `ember serve` for VM tests: its own state folder, curl on its socket, the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn artifact(var: &str) -> String {
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set; run VM tests through `cargo xtask test`"))
}

/// The steps of a sandbox's start timeline, in order.
pub fn steps(sandbox: &Value) -> Vec<String> {
    sandbox["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["step"].as_str().map(String::from))
        .collect()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running `ember serve` with its own state directory (removed at the end).
pub struct Service {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub socket: PathBuf,
    /// More `ember serve` options.
    options: Vec<String>,
    /// A cgroup the service starts in (as a systemd unit with `Delegate=yes` would).
    cgroup: Option<PathBuf>,
}

impl Service {
    pub fn start(name: &str) -> Service {
        Service::start_with(name, &[])
    }

    pub fn start_with(name: &str, options: &[&str]) -> Service {
        // Unix socket paths are short: keep the state directory near the root.
        let state = PathBuf::from(format!("/tmp/es-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let socket = state.join("api.sock");
        let mut service = Service {
            child: None,
            state,
            socket,
            options: options.iter().map(|o| o.to_string()).collect(),
            cgroup: None,
        };
        service.launch();
        service
    }

    /// A service started inside `cgroup` (which then holds its process).
    pub fn start_in_cgroup(name: &str, cgroup: &Path) -> Service {
        let state = PathBuf::from(format!("/tmp/es-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let mut service = Service {
            child: None,
            socket: state.join("api.sock"),
            state,
            options: Vec::new(),
            cgroup: Some(cgroup.to_path_buf()),
        };
        service.launch();
        service
    }

    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("serve.log"))
            .unwrap();
        let mut command = match &self.cgroup {
            // The shell moves itself into the cgroup, then becomes the service.
            Some(cgroup) => {
                let mut command = Command::new("sh");
                command
                    .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
                    .arg(cgroup)
                    .arg(env!("CARGO_BIN_EXE_ember"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_ember")),
        };
        let child = command
            .args(["serve", "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--kernel", &artifact("EMBER_KERNEL")])
            .args(["--rootfs", &artifact("EMBER_ROOTFS")])
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ember serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.curl("GET", "/healthz", None).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "ember serve did not answer; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the service the way an operator would (SIGTERM) and waits for it.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("serve.log")).unwrap_or_default()
    }

    /// `curl` on the service's socket: (HTTP status, body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "600", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method, "-w", "\n%{http_code}"])
            .arg(format!("http://ember{path}"));
        if let Some(body) = body {
            cmd.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let out = cmd.output().expect("run curl");
        let all = text(&out.stdout);
        let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `method` with `bytes` as the body on the service's socket: (HTTP status, body).
    pub fn upload(&self, method: &str, path: &str, bytes: &[u8]) -> (u16, String) {
        let file = self.state.join("put-body");
        std::fs::write(&file, bytes).unwrap();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "600", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method, "-w", "\n%{http_code}", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg(format!("http://ember{path}"))
            .output()
            .expect("run curl");
        let all = text(&out.stdout);
        let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// A JSON request that must succeed with `want`.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let body = body.map(|b| b.to_string());
        let (status, answer) = self.curl(method, path, body.as_deref());
        assert_eq!(
            status,
            want,
            "{method} {path} answered {status}: {answer}\n--- service log ---\n{}",
            self.log()
        );
        serde_json::from_str(&answer).unwrap_or(Value::Null)
    }

    /// A request that must fail with `status` and error `code`.
    pub fn refuse(&self, method: &str, path: &str, body: Option<&str>, status: u16, code: &str) {
        let (got, answer) = self.curl(method, path, body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        let doc: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{method} {path}: error body is not JSON ({e}): {answer}"));
        assert_eq!(doc["error"]["code"], code, "{method} {path}: {answer}");
        assert!(
            doc["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }

    pub fn ember(&self, args: &[&str]) -> Output {
        // `--socket` belongs to the subcommand, before any `--`.
        Command::new(env!("CARGO_BIN_EXE_ember"))
            .arg(args[0])
            .arg("--socket")
            .arg(&self.socket)
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .expect("run ember")
    }

    pub fn create(&self, body: Value) -> String {
        let sandbox = self.call("POST", "/sandboxes", Some(body), 201);
        assert_eq!(sandbox["state"], "running", "{sandbox}");
        sandbox["id"].as_str().unwrap().to_string()
    }

    /// `exec?wait=true` of `sh -c script`.
    pub fn sh(&self, id: &str, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/sandboxes/{id}/exec?wait=true"),
            Some(json!({"cmd": "sh", "args": ["-c", script]})),
            200,
        )
    }

    pub fn sandbox(&self, id: &str) -> Value {
        self.call("GET", &format!("/sandboxes/{id}"), None, 200)
    }

    /// The value of an unlabelled metric in the service's `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, text) = self.curl("GET", "/metrics", None);
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// Waits until the warm pool holds `n` idle VMMs.
    pub fn wait_pool_idle(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.metric("ember_warm_pool_idle") < n {
            assert!(
                Instant::now() < deadline,
                "the pool never had {n} idle VMMs"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the sandbox is in `state`.
    pub fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.sandbox(id);
            if s["state"] == state {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox never became {state}: {s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Delete what is left so no VMM outlives the test.
        let (_, list) = self.curl("GET", "/sandboxes", None);
        if let Ok(list) = serde_json::from_str::<Value>(&list) {
            for s in list["sandboxes"].as_array().into_iter().flatten() {
                if let Some(id) = s["id"].as_str() {
                    let _ = self.curl("DELETE", &format!("/sandboxes/{id}"), None);
                }
            }
        }
        self.terminate();
        if let Ok(entries) = std::fs::read_dir(self.state.join("sandboxes")) {
            for e in entries.flatten() {
                if let Ok(r) = std::fs::read_to_string(e.path().join("sandbox.json")) {
                    if let Some(pid) = serde_json::from_str::<Value>(&r)
                        .ok()
                        .and_then(|v| v["pid"].as_i64())
                    {
                        // SAFETY: a leftover VMM of this test; at worst ESRCH.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}
