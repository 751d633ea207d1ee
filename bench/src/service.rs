//! The service a bench run talks to: one it starts itself ([`OwnService`]) or the caller's,
//! and the API calls it makes ([`Api`]), timed by the caller.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Value};

use ember_client::{empty_body, json_body, ApiClient, ApiClientError};

use crate::{BenchArgs, BenchError, INSTALL};

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
        let io = |what: String| move |source| BenchError::ServiceIo { what, source };
        let exe = std::env::current_exe()
            .map_err(io("finding this program".into()))?
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
            .map_err(io(format!("making {}", state_dir.display())))?;
        let socket = state_dir.join("api.sock");
        let log = std::fs::File::create(state_dir.join("serve.log"))
            .map_err(io("making its log".into()))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("making its log".into()))?)
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
            .map_err(io(format!("running {}", exe.display())))?;
        let mut service = OwnService { child, state_dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Ok(Some(status)) = service.child.try_wait() {
                let log = std::fs::read_to_string(service.state_dir.join("serve.log"))
                    .unwrap_or_default();
                return Err(BenchError::ServiceExited { status, log });
            }
            if Instant::now() > deadline {
                return Err(BenchError::NoSocket);
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

/// What one of the bench's calls to a service, or a check of its answer, fails with.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{call}: {source}")]
    Api {
        call: String,
        #[source]
        source: ApiClientError,
    },
    #[error("{call}: reading the body: {source}")]
    Body {
        call: String,
        #[source]
        source: hyper::Error,
    },
    #[error("`{cmd}` in {sandbox} did not succeed: {answer}")]
    Command {
        cmd: String,
        sandbox: String,
        answer: Value,
    },
    #[error("exec in clone {id}: {source}; its record says: {failure}")]
    CloneExec {
        id: String,
        #[source]
        source: Box<CallError>,
        failure: Value,
    },
    #[error("{what} within {limit_s} s: {last}")]
    NotWithin {
        what: String,
        limit_s: u64,
        last: String,
    },
    #[error("{what} is missing from the answer {answer}")]
    Missing { what: &'static str, answer: Value },
    #[error("the service has no metric {0} (no remote tier?)")]
    NoMetric(&'static str),
    /// A measurement that cannot be right (a short download, a tool's unreadable output).
    #[error("{0}")]
    Implausible(String),
    #[error("reading the store: {0}")]
    Store(#[from] ember_snapshot_store::StoreError),
}

/// Names the call an API error came from.
pub(crate) fn call(what: String) -> impl FnOnce(ApiClientError) -> CallError {
    move |source| CallError::Api { call: what, source }
}

/// Sandbox `id` from a create answer.
pub(crate) fn id_of(sandbox: &Value) -> Result<String, CallError> {
    sandbox["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CallError::Missing {
            what: "the sandbox id",
            answer: sandbox.clone(),
        })
}

/// The API calls the bench makes, timed by the caller.
pub(crate) struct Api(pub(crate) ApiClient);

impl Api {
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let what = format!("{method} {path}");
        let body = body.map_or_else(empty_body, json_body);
        self.0.json(method, path, body).await.map_err(call(what))
    }

    pub(crate) async fn create(&self, body: Value) -> Result<Value, CallError> {
        self.request(Method::POST, "/sandboxes", Some(&body)).await
    }

    pub(crate) async fn exec(
        &self,
        id: &str,
        cmd: &str,
        args: &[&str],
    ) -> Result<Value, CallError> {
        let answer = self
            .request(
                Method::POST,
                &format!("/sandboxes/{id}/exec?wait=true"),
                Some(&json!({"cmd": cmd, "args": args})),
            )
            .await?;
        if answer["exit_code"] != json!(0) {
            return Err(CallError::Command {
                cmd: cmd.to_string(),
                sandbox: id.to_string(),
                answer,
            });
        }
        Ok(answer)
    }

    pub(crate) async fn sandbox(&self, id: &str) -> Result<Value, CallError> {
        self.request(Method::GET, &format!("/sandboxes/{id}"), None)
            .await
    }

    pub(crate) async fn snapshot_info(&self, id: &str) -> Result<Value, CallError> {
        self.request(Method::GET, &format!("/snapshots/{id}"), None)
            .await
    }

    /// Asks for snapshot `id` to be pushed to the service's remote tier.
    pub(crate) async fn push(&self, id: &str) -> Result<Value, CallError> {
        self.request(Method::POST, &format!("/snapshots/{id}/push"), None)
            .await
    }

    /// The service's metrics `names` (each `None` if it has none by that name).
    pub(crate) async fn metrics<const N: usize>(
        &self,
        names: [&str; N],
    ) -> Result<[Option<u64>; N], CallError> {
        let metrics = self
            .0
            .text(Method::GET, "/metrics")
            .await
            .map_err(call("GET /metrics".into()))?;
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
    pub(crate) async fn wait_pool_full(&self) -> Result<(), CallError> {
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
                return Err(CallError::NotWithin {
                    what: "a full warm pool".into(),
                    limit_s: 60,
                    last: format!("{idle} of {target} VMMs"),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to a minute) until the service has materialised snapshot `id`'s memory.
    pub(crate) async fn wait_materialised(&self, id: &str) -> Result<(), CallError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let snapshot = self.snapshot_info(id).await?;
            if snapshot["memory_materialised"] == json!(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CallError::NotWithin {
                    what: format!("snapshot {id}'s memory materialised"),
                    limit_s: 60,
                    last: snapshot.to_string(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn delete(&self, id: &str) -> Result<(), CallError> {
        self.request(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await
            .map(|_| ())
    }

    /// A fresh sandbox (`create` body) that runs the install and is saved as snapshot `name`
    /// (stopping it), then deleted; returns the snapshot's answer.
    pub(crate) async fn installed_snapshot(
        &self,
        create: Value,
        name: &str,
    ) -> Result<Value, CallError> {
        let sandbox = self.create(create).await?;
        let id = id_of(&sandbox)?;
        self.exec(&id, "sh", &["-c", INSTALL]).await?;
        let answer = self
            .snapshot(&id, json!({"name": name, "stop": true}))
            .await?;
        self.delete(&id).await?;
        Ok(answer)
    }

    pub(crate) async fn faults(&self, id: &str) -> Result<Value, CallError> {
        self.request(Method::GET, &format!("/sandboxes/{id}/faults"), None)
            .await
    }

    /// A sandbox (`create` body) that runs the install, is saved as snapshot `name`, changed a
    /// little and saved again as the diff `{name}-diff`, then deleted: both snapshots' answers
    /// and the sandbox's memory in MiB.
    pub(crate) async fn full_and_diff(
        &self,
        create: Value,
        name: &str,
    ) -> Result<(Value, Value, u32), CallError> {
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

    pub(crate) async fn snapshot(&self, id: &str, body: Value) -> Result<Value, CallError> {
        self.request(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            Some(&body),
        )
        .await
    }
}
