//! The HTTP API's router, request checks and the sandbox handlers (`/sandboxes…`, `/healthz`,
//! `/openapi.json`); exec, files, snapshots and ports have their own modules.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ember_client::types::{CreateBody, TimeoutBody};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ApiError;
use crate::sandbox::{NewSandbox, Sandbox, SandboxState};
use ember_sandbox::control::{ControlRequest, WorkerOrigin};

use crate::{exec, files, metrics, network, ports, sandbox, snapshots};
use crate::{
    AppState, DEFAULT_TIMEOUT_S, MAX_ENV_VARS, MAX_JSON_BODY, MAX_MEMORY_MIB, MAX_TIMEOUT_S,
    MIN_MEMORY_MIB, OPENAPI,
};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics::metrics))
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/faults", get(faults))
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route("/sandboxes/{id}/commands", get(exec::list_commands))
        .route("/sandboxes/{id}/commands/{cid}", get(exec::get_command))
        .route(
            "/sandboxes/{id}/commands/{cid}/kill",
            post(exec::kill_command),
        )
        .route(
            "/sandboxes/{id}/files",
            get(files::get_file).put(files::put_file),
        )
        .route("/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route("/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/snapshots", get(snapshots::list))
        .route(
            "/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/snapshots/{id}/fork", post(snapshots::fork))
        .route("/snapshots/{id}/push", post(snapshots::push))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(state)
}

/// A JSON request body as bytes (so malformed ones get this API's error shape).
pub type JsonBody = Result<Bytes, BytesRejection>;

/// Parses a JSON body strictly: unknown fields are refused (the types say
/// `deny_unknown_fields`), an oversize body is 413.
pub fn parse_body<T: DeserializeOwned>(body: JsonBody) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is larger than {MAX_JSON_BODY} bytes"),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"))
        }
    })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not what this endpoint takes: {e}"),
        )
    })
}

pub fn check_env(key: &str, value: &str) -> Result<(), ApiError> {
    if key.is_empty()
        || key.len() > 256
        || key.contains(['=', '\0'])
        || value.contains('\0')
        || value.len() > 64 * 1024
    {
        return Err(ApiError::bad_request(format!(
            "environment variable {key:?} is not a NAME=VALUE pair ember accepts"
        )));
    }
    Ok(())
}

pub(crate) fn check_env_map(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_ENV_VARS} environment variables"
        )));
    }
    env.iter().try_for_each(|(k, v)| check_env(k, v))
}

pub(crate) fn check_timeout(timeout_s: u64) -> Result<Duration, ApiError> {
    if timeout_s == 0 || timeout_s > MAX_TIMEOUT_S {
        return Err(ApiError::bad_request(format!(
            "`timeout_s` must be between 1 and {MAX_TIMEOUT_S}"
        )));
    }
    Ok(Duration::from_secs(timeout_s))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let sandboxes = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    axum::Json(json!({"status": "ok", "sandboxes": sandboxes})).into_response()
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

pub const IMAGES: &[&str] = &["default", "python", "node"];

/// Refuses rates of zero (a field left out is no limit) and network limits without a network.
pub fn check_limits(
    disk: Option<&ember_vmm::RateLimit>,
    net: Option<&ember_vmm::NetRateLimits>,
    network: &network::NetworkMode,
) -> Result<(), ApiError> {
    let zero = |limit: &ember_vmm::RateLimit| {
        limit.bytes_per_sec == Some(0) || limit.ops_per_sec == Some(0)
    };
    let checks = [
        ("disk_limits", disk.copied()),
        ("net_limits.rx", net.map(|n| n.rx)),
        ("net_limits.tx", net.map(|n| n.tx)),
    ];
    for (name, limit) in checks {
        if limit.as_ref().is_some_and(zero) {
            return Err(ApiError::bad_request(format!(
                "`{name}` rates must be at least 1 (leave a field out for no limit)"
            )));
        }
    }
    if net.is_some() && matches!(network, network::NetworkMode::None {}) {
        return Err(ApiError::bad_request(
            "`net_limits` limit a network device: give `network: {\"mode\": \"egress\"}` too",
        ));
    }
    Ok(())
}

/// `POST /sandboxes`
async fn create_sandbox(
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: CreateBody = parse_body(body)?;
    check_env_map(&body.env)?;
    let timeout = check_timeout(body.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))?;
    ports::check(&body.ports).map_err(ApiError::bad_request)?;
    let mut restored_nic = false;
    let mut partial = None;
    let new = match (&body.image, &body.snapshot) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `image` or `snapshot`, not both",
            ))
        }
        (_, Some(snapshot)) => {
            if body.vcpus.is_some() || body.memory_mib.is_some() {
                return Err(ApiError::bad_request(
                    "a restored sandbox has its snapshot's vCPUs and memory; leave out \
                     `vcpus` and `memory_mib`",
                ));
            }
            let snapshots::RestoreSpec {
                origin,
                vcpus,
                mem_mib,
                had_network,
                partial: fetching,
            } = snapshots::restore_spec(&state, snapshot, body.restore_mode).await?;
            snapshots::check_network(snapshot, had_network, body.network.as_ref())?;
            restored_nic = had_network;
            partial = fetching;
            (origin, vcpus, mem_mib)
        }
        (image, None) => {
            let image = image.as_deref().unwrap_or("default");
            if !IMAGES.contains(&image) {
                return Err(ApiError::bad_request(format!(
                    "unknown image {image:?}; this service has {IMAGES:?}"
                )));
            }
            if body.restore_mode.is_some() {
                return Err(ApiError::bad_request("`restore_mode` is for snapshots"));
            }
            let vcpus = body.vcpus.unwrap_or(1);
            if vcpus == 0 || vcpus > ember_vmm::MAX_VCPUS {
                return Err(ApiError::bad_request(format!(
                    "`vcpus` must be between 1 and {}",
                    ember_vmm::MAX_VCPUS
                )));
            }
            let mem_mib = body.memory_mib.unwrap_or(256);
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mem_mib) {
                return Err(ApiError::bad_request(format!(
                    "`memory_mib` must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
                )));
            }
            (WorkerOrigin::Boot, vcpus, mem_mib)
        }
    };
    let (origin, vcpus, mem_mib) = new;
    let network = body.network.unwrap_or(network::NetworkMode::None {});
    check_limits(
        body.disk_limits.as_ref(),
        body.net_limits.as_ref(),
        &network,
    )?;
    let sandbox = sandbox::create(
        &state,
        NewSandbox {
            origin,
            vcpus,
            mem_mib,
            timeout,
            env: body.env,
            disk_rate_limit: body.disk_limits.unwrap_or_default(),
            net_rate_limits: body.net_limits.unwrap_or_default(),
            network,
            restored_nic,
            ports: body.ports,
            partial,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox.to_json())).into_response())
}

/// `GET /sandboxes`
async fn list_sandboxes(State(state): State<Arc<AppState>>) -> Response {
    let mut list: Vec<Arc<Sandbox>> = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    list.sort_by_key(|s| s.record().created_unix_ms);
    let list: Vec<_> = list.iter().map(|s| s.to_json()).collect();
    axum::Json(json!({ "sandboxes": list })).into_response()
}

/// `GET /sandboxes/{id}`
async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(state.sandbox(&id)?.to_json()).into_response())
}

/// `DELETE /sandboxes/{id}`: stops it and forgets it (its overlay and logs go too).
async fn delete_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    sandbox.stop("deleted", state.cgroups.as_ref()).await;
    state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    sandbox.remove_from_disk();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/timeout` `{timeout_s}`: the sandbox now stops `timeout_s` from now.
async fn set_timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: TimeoutBody = parse_body(body)?;
    let timeout = check_timeout(body.timeout_s)?;
    let sandbox = state.sandbox(&id)?;
    if !matches!(
        sandbox.state(),
        SandboxState::Running | SandboxState::Paused
    ) {
        sandbox.require_running()?;
    }
    sandbox.update(|r| r.deadline_unix_ms = sandbox::unix_ms() + timeout.as_millis() as u64);
    Ok(axum::Json(sandbox.to_json()).into_response())
}

/// `POST /sandboxes/{id}/pause`
async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    control(&sandbox, ControlRequest::Pause).await?;
    sandbox.update(|r| r.state = SandboxState::Paused);
    Ok(axum::Json(sandbox.to_json()).into_response())
}

/// `POST /sandboxes/{id}/resume`
async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    if sandbox.state() != SandboxState::Paused {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not paused",
            sandbox.state().label()
        )));
    }
    control(&sandbox, ControlRequest::Resume).await?;
    sandbox.update(|r| r.state = SandboxState::Running);
    Ok(axum::Json(sandbox.to_json()).into_response())
}

/// `GET /sandboxes/{id}/faults`: a restored sandbox's page faults over time (how its demand
/// for the snapshot's memory died down); `lazy` is false for a booted or eager one.
async fn faults(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    if !matches!(
        sandbox.state(),
        SandboxState::Running | SandboxState::Paused
    ) {
        sandbox.require_running()?;
    }
    let reply = control(&sandbox, ControlRequest::Faults).await?;
    Ok(axum::Json(reply.faults.unwrap_or_default()).into_response())
}

/// Sends a control request; a VMM that cannot answer is a failed sandbox.
pub async fn control(
    sandbox: &Sandbox,
    request: ControlRequest,
) -> Result<ember_sandbox::control::ControlReply, ApiError> {
    let timeout = match request {
        ControlRequest::Snapshot { .. } => Duration::from_secs(900),
        _ => Duration::from_secs(30),
    };
    let reply = sandbox
        .control(request, timeout)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "vmm_unreachable", e.to_string()))?;
    if !reply.ok {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vmm_error",
            reply.error.unwrap_or_else(|| "the VMM refused".into()),
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mem_cache, ServiceConfig};
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tower::ServiceExt;

    fn state(dir: &std::path::Path) -> Arc<AppState> {
        Arc::new(AppState {
            config: ServiceConfig {
                state_dir: dir.to_path_buf(),
                store_dir: dir.join("store"),
                kernel: "/nonexistent/vmlinux".into(),
                rootfs: "/nonexistent/rootfs.ext4".into(),
                vmm_program: "/nonexistent/ember-vmm".into(),
                max_sandboxes: 4,
                jail: None,
                retention: Duration::from_secs(3600),
            },
            sandboxes: Mutex::new(HashMap::new()),
            store: ember_sandbox::defaults::open_store(&dir.join("store")).unwrap(),
            metrics: metrics::Metrics::default(),
            gc: Arc::default(),
            cgroups: None,
            mem_cache: Arc::new(mem_cache::MemoryCache::new(
                dir.join("mem-cache"),
                1 << 30,
                None,
            )),
            pool: None,
            remote: None,
        })
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, serde_json::Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(body.into())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors_with_the_right_status() {
        let dir = std::env::temp_dir().join(format!("ember-api-unit-{}", std::process::id()));
        let app = router(state(&dir));
        let cases: &[(&str, &str, String, StatusCode, &str)] = &[
            (
                "POST",
                "/sandboxes",
                "{oops".into(),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"colour":1}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"memory_mib":64}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"vcpus":0}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"timeout_s":0}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"image":"x","snapshot":"y"}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"snapshot":"none"}"#.into(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"env":{"A=B":"c"}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"disk_limits":{"bytes_per_sec":0}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"net_limits":{"tx":{"bytes_per_sec":0}},"network":{"mode":"egress"}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"net_limits":{"rx":{"bytes_per_sec":1000}}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"net_limits":{"up":{"bytes_per_sec":1000}}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            ),
            (
                "POST",
                "/sandboxes",
                r#"{"disk_limits":{"iops":10}}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            ),
            (
                "GET",
                "/sandboxes/sb-x",
                String::new(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "DELETE",
                "/sandboxes/sb-x",
                String::new(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "POST",
                "/sandboxes/sb-x/exec",
                r#"{"cmd":"true"}"#.into(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "POST",
                "/sandboxes/sb-x/exec",
                r#"{"cmd":"true","x":1}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            ),
            (
                "GET",
                "/sandboxes/sb-x/files?path=../x",
                String::new(),
                StatusCode::BAD_REQUEST,
                "invalid_path",
            ),
            (
                "DELETE",
                "/snapshots/none",
                String::new(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "DELETE",
                "/snapshots/..",
                String::new(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "POST",
                "/snapshots/none/fork",
                r#"{"count":0}"#.into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "POST",
                "/snapshots/none/fork",
                r#"{"count":2}"#.into(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "GET",
                "/nowhere",
                String::new(),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                "PATCH",
                "/sandboxes",
                String::new(),
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
            ),
            (
                "POST",
                "/sandboxes",
                format!(r#"{{"env":{{"A":"{}"}}}}"#, "x".repeat(MAX_JSON_BODY)),
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
            ),
        ];
        for (method, uri, body, status, code) in cases {
            let (got, doc) = call(&app, method, uri, body.clone()).await;
            assert_eq!(got, *status, "{method} {uri}: {doc}");
            assert_eq!(doc["error"]["code"], *code, "{method} {uri}: {doc}");
            assert!(doc["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        let (status, doc) = call(&app, "GET", "/snapshots", "").await;
        assert_eq!((status, doc), (StatusCode::OK, json!({"snapshots": []})));
        let (status, doc) = call(&app, "GET", "/openapi.json", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.0.3");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Stores a snapshot `id` of `pages` pages of noise seeded by `seed`.
    fn store_snapshot(store: &ember_snapshot_store::Store, id: &str, pages: usize, seed: u64) {
        use ember_snapshot_store::{Manifest, MemoryRef, ObjectKind, PAGE_SIZE};
        let mut x = seed | 1;
        let mem: Vec<u8> = (0..pages * PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut w = store.writer().unwrap();
        let map = w.put_memory(&mem, 1).unwrap();
        let chunks = map.store(&mut w).unwrap();
        let state = w.put(ObjectKind::VmState, id.as_bytes()).unwrap();
        let m = Manifest::new(
            id,
            state,
            MemoryRef {
                size_bytes: map.size_bytes(),
                page_size: PAGE_SIZE as u32,
                map_chunks: chunks,
            },
        );
        w.commit(&m).unwrap();
    }

    fn pack_bytes(store_dir: &std::path::Path) -> u64 {
        std::fs::read_dir(store_dir.join("packs"))
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn ended_sandboxes_are_deleted_after_the_retention_period_and_live_ones_never() {
        let dir = std::env::temp_dir().join(format!("ember-api-ret-{}", std::process::id()));
        let state = state(&dir);
        let make = |id: &str, s: SandboxState| {
            let sandbox = Arc::new(Sandbox::for_test(
                dir.join(id),
                id,
                ember_sandbox::control::WorkerOrigin::Boot,
                s,
            ));
            std::fs::create_dir_all(dir.join(id)).unwrap();
            sandbox.update(|_| {});
            state
                .sandboxes
                .lock()
                .unwrap()
                .insert(id.into(), sandbox.clone());
            sandbox
        };
        let running = make("sb-running", SandboxState::Running);
        let stopped = make("sb-stopped", SandboxState::Stopped);
        let ended = stopped
            .record()
            .ended_unix_ms
            .expect("an ended sandbox says when");
        assert_eq!(running.record().ended_unix_ms, None);
        let hour = 3600 * 1000;
        sandbox::remove_ended(&state, ended + hour - 1);
        assert_eq!(state.sandboxes.lock().unwrap().len(), 2);
        sandbox::remove_ended(&state, ended + hour);
        let left: Vec<String> = state.sandboxes.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, ["sb-running"]);
        assert!(!dir.join("sb-stopped").exists());
        assert!(dir.join("sb-running").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_snapshot_in_use_is_kept_and_a_deleted_one_is_reclaimed_in_the_background() {
        let dir = std::env::temp_dir().join(format!("ember-api-gc-{}", std::process::id()));
        let state = state(&dir);
        let store_dir = state.config.store_dir.clone();
        store_snapshot(&state.store, "keep", 64, 1);
        store_snapshot(&state.store, "drop", 64, 2);
        let before = pack_bytes(&store_dir);
        let restored = |id: &str, s: SandboxState| {
            Arc::new(Sandbox::for_test(
                dir.join(id),
                id,
                ember_sandbox::control::WorkerOrigin::Restore {
                    snapshot: "drop".into(),
                    mode: ember_vmm::RestoreMode::Lazy,
                    partial: None,
                },
                s,
            ))
        };
        for (id, s) in [
            ("sb-live", SandboxState::Running),
            ("sb-old", SandboxState::Stopped),
        ] {
            state
                .sandboxes
                .lock()
                .unwrap()
                .insert(id.into(), restored(id, s));
        }
        let app = router(state.clone());
        tokio::spawn(state.gc.clone().run(state.store.clone()));

        // A live sandbox restored from it may still load its memory from it: refused.
        let (status, doc) = call(&app, "DELETE", "/snapshots/drop", "").await;
        assert_eq!(status, StatusCode::CONFLICT, "{doc}");
        let message = doc["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("sb-live") && !message.contains("sb-old"),
            "{message}"
        );
        assert!(state.store.load_manifest("drop").is_ok());
        assert_eq!(state.gc.runs.load(std::sync::atomic::Ordering::SeqCst), 0);

        // Once that sandbox has stopped, the delete goes through and GC frees its pages.
        state
            .sandbox("sb-live")
            .unwrap()
            .update(|r| r.state = SandboxState::Stopped);
        let (status, _) = call(&app, "DELETE", "/snapshots/drop", "").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while state.gc.runs.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no GC ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = pack_bytes(&store_dir);
        assert!(
            after < before - 60 * 4096,
            "{before} bytes of packs before, {after} after"
        );
        assert!(
            state
                .gc
                .bytes_reclaimed
                .load(std::sync::atomic::Ordering::SeqCst)
                > 60 * 4096
        );
        // The other snapshot is whole.
        let fresh = ember_sandbox::defaults::open_store(&store_dir).unwrap();
        assert!(fresh.verify().unwrap().is_clean());
        let m = fresh.load_manifest("keep").unwrap();
        let map = fresh.load_memory_map(&m).unwrap();
        let mut mem = vec![0u8; map.size_bytes() as usize];
        map.restore_into(&fresh, &mut mem).unwrap();
        let request = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("ember_store_gc_runs_total 1\n"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_openapi_document_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        for path in [
            "/sandboxes",
            "/sandboxes/{id}",
            "/sandboxes/{id}/exec",
            "/sandboxes/{id}/files",
            "/sandboxes/{id}/files/mkdir",
            "/sandboxes/{id}/commands/{cid}",
            "/sandboxes/{id}/commands/{cid}/kill",
            "/sandboxes/{id}/pause",
            "/sandboxes/{id}/resume",
            "/sandboxes/{id}/faults",
            "/sandboxes/{id}/timeout",
            "/sandboxes/{id}/snapshots",
            "/snapshots",
            "/snapshots/{id}",
            "/snapshots/{id}/fork",
            "/metrics",
            "/healthz",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} is not documented");
        }
    }
}
