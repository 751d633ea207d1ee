//! The service a bench run talks to: one it starts itself ([`OwnService`]) or the caller's,
//! and the API calls it makes ([`Api`]), timed by the caller.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Value};

use ember_client::{empty_body, json_body, ApiClient};

use crate::{id_of, BenchArgs, BenchError, INSTALL};

/// A service this run started: stopped (and its state removed) on drop.
pub(crate) struct OwnService {
    pub(crate) child: Child,
    pub(crate) state_dir: PathBuf,
}

/// What a service this run starts gets besides the run's kernel and rootfs.
#[derive(Default, Clone)]
pub(crate) struct ServiceOptions {
    /// More `ember serve` arguments.
    pub(crate) args: Vec<String>,
    /// Its environment besides this process's.
    pub(crate) env: Vec<(String, String)>,
    /// Its warm pool (none: the run's `--warm-pool`; a soak's service has none).
    pub(crate) warm_pool: Option<usize>,
}

impl OwnService {
    pub(crate) fn start(
        args: &BenchArgs,
        options: &ServiceOptions,
    ) -> Result<(OwnService, PathBuf), BenchError> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // The `ember` program beside this one (cargo builds both into one folder).
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Service(e.to_string()))?
            .with_file_name("ember");
        let state_dir = std::env::temp_dir().join(format!(
            "ember-bench-{}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| BenchError::Service(format!("{}: {e}", state_dir.display())))?;
        let socket = state_dir.join("api.sock");
        let log = std::fs::File::create(state_dir.join("serve.log"))
            .map_err(|e| BenchError::Service(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| BenchError::Service(e.to_string()))?,
            )
            .stderr(log);
        if let Some(k) = &args.kernel {
            cmd.arg("--kernel").arg(k);
        }
        if let Some(r) = &args.rootfs {
            cmd.arg("--rootfs").arg(r);
        }
        match (options.warm_pool, args.soak) {
            (Some(pool), _) => {
                cmd.arg("--warm-pool").arg(pool.to_string());
            }
            (None, None) => {
                cmd.arg("--warm-pool").arg(args.warm_pool.to_string());
            }
            (None, Some(_)) => {}
        }
        cmd.args(&options.args)
            .envs(options.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::Service(e.to_string()))?;
        let mut service = OwnService { child, state_dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Ok(Some(status)) = service.child.try_wait() {
                let log = std::fs::read_to_string(service.state_dir.join("serve.log"))
                    .unwrap_or_default();
                return Err(BenchError::Service(format!(
                    "`ember serve` exited ({status}):\n{log}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Service("no API socket after 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((service, socket))
    }
}

impl Drop for OwnService {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The API calls the bench makes, timed by the caller.
pub(crate) struct Api(pub(crate) ApiClient);

impl Api {
    pub(crate) async fn create(&self, body: Value) -> Result<Value, String> {
        self.0
            .json(Method::POST, "/sandboxes", json_body(&body))
            .await
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn exec(&self, id: &str, cmd: &str, args: &[&str]) -> Result<Value, String> {
        let answer = self
            .0
            .json(
                Method::POST,
                &format!("/sandboxes/{id}/exec?wait=true"),
                json_body(&json!({"cmd": cmd, "args": args})),
            )
            .await
            .map_err(|e| e.to_string())?;
        if answer["exit_code"] != json!(0) {
            return Err(format!("`{cmd}` in {id} did not succeed: {answer}"));
        }
        Ok(answer)
    }

    pub(crate) async fn sandbox(&self, id: &str) -> Result<Value, String> {
        self.0
            .json(Method::GET, &format!("/sandboxes/{id}"), empty_body())
            .await
            .map_err(|e| e.to_string())
    }

    /// The service's metrics `names` (each `None` if it has none by that name).
    pub(crate) async fn metrics<const N: usize>(
        &self,
        names: [&str; N],
    ) -> Result<[Option<u64>; N], String> {
        let metrics = self
            .0
            .text(Method::GET, "/metrics")
            .await
            .map_err(|e| e.to_string())?;
        Ok(names.map(|name| {
            metrics.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        }))
    }

    /// Waits (up to a minute) until a service with a warm pool has it full (at once for one
    /// without).
    pub(crate) async fn wait_pool_full(&self) -> Result<(), String> {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let [Some(idle), Some(target)] = self
                .metrics(["ember_warm_pool_idle", "ember_warm_pool_target"])
                .await?
            else {
                return Ok(());
            };
            if idle >= target {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the warm pool stayed at {idle} of {target} VMMs"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to a minute) until the service has materialised snapshot `id`'s memory.
    pub(crate) async fn wait_materialised(&self, id: &str) -> Result<(), String> {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let snapshot = self
                .0
                .json(Method::GET, &format!("/snapshots/{id}"), empty_body())
                .await
                .map_err(|e| e.to_string())?;
            if snapshot["memory_materialised"] == json!(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "snapshot {id} was not materialised within a minute"
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn delete(&self, id: &str) -> Result<(), String> {
        self.0
            .json(Method::DELETE, &format!("/sandboxes/{id}"), empty_body())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A fresh sandbox (`create` body) that runs the install and is saved as snapshot `name`
    /// (stopping it), then deleted; returns the snapshot's answer.
    pub(crate) async fn installed_snapshot(
        &self,
        create: Value,
        name: &str,
    ) -> Result<Value, String> {
        let sandbox = self.create(create).await?;
        let id = id_of(&sandbox)?;
        self.exec(&id, "sh", &["-c", INSTALL]).await?;
        let answer = self
            .snapshot(&id, json!({"name": name, "stop": true}))
            .await?;
        self.delete(&id).await?;
        Ok(answer)
    }

    pub(crate) async fn faults(&self, id: &str) -> Result<Value, String> {
        self.0
            .json(
                Method::GET,
                &format!("/sandboxes/{id}/faults"),
                empty_body(),
            )
            .await
            .map_err(|e| e.to_string())
    }

    /// A sandbox (`create` body) that runs the install, is saved as snapshot `name`, changed a
    /// little and saved again as the diff `{name}-diff`, then deleted: both snapshots' answers
    /// and the sandbox's memory in MiB.
    pub(crate) async fn full_and_diff(
        &self,
        create: Value,
        name: &str,
    ) -> Result<(Value, Value, u32), String> {
        let sandbox = self.create(create).await?;
        let id = id_of(&sandbox)?;
        self.exec(&id, "sh", &["-c", INSTALL]).await?;
        let full = self.snapshot(&id, json!({ "name": name })).await?;
        self.exec(&id, "sh", &["-c", "echo changed > /tmp/changed"])
            .await?;
        let diff = self
            .snapshot(&id, json!({"name": format!("{name}-diff"), "diff": true}))
            .await?;
        self.delete(&id).await?;
        let mem_mib = sandbox["memory_mib"].as_u64().unwrap_or(256) as u32;
        Ok((full, diff, mem_mib))
    }

    pub(crate) async fn snapshot(&self, id: &str, body: Value) -> Result<Value, String> {
        self.0
            .json(
                Method::POST,
                &format!("/sandboxes/{id}/snapshots"),
                json_body(&body),
            )
            .await
            .map_err(|e| e.to_string())
    }
}
