//! The router's checks and handlers against a service state without VMs.

use super::*;
use crate::{mem_cache, ServiceConfig};
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Mutex;
use tower::ServiceExt;

mod files;

fn state(dir: &std::path::Path) -> Arc<AppState> {
    Arc::new(AppState {
        config: ServiceConfig {
            state_dir: dir.to_path_buf(),
            store_dir: dir.join("store"),
            kernel: "/nonexistent/vmlinux".into(),
            rootfs: "/nonexistent/rootfs.ext4".into(),
            runtimes: crate::runtimes::Runtimes::base_only("/nonexistent/rootfs.ext4".as_ref()),
            vmm_program: "/nonexistent/ember-vmm".into(),
            max_sandboxes: 4,
            jail: None,
            retention: Duration::from_secs(3600),
            dns_upstreams: Vec::new(),
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
        templates: Default::default(),
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
            "PATCH",
            "/sandboxes/sb-none/network",
            r#"{"allow": ["*.com"]}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "PATCH",
            "/sandboxes/sb-none/network",
            format!(
                r#"{{"deny": [{}]}}"#,
                vec!["\"192.0.2.1\""; crate::network::update::MAX_RULES + 1].join(",")
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "PATCH",
            "/sandboxes/sb-none/network",
            r#"{"allow": ["api.example.org"]}"#.into(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"network": {"mode": "egress", "deny": ["a..example.com"]}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        // 2.0 is an integer to JSON: the range check, not the parser, refuses it.
        (
            "POST",
            "/sandboxes",
            r#"{"timeout_s": 0.0}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"timeout_s": 1.5}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        // An empty kill body is the default signal: the request gets as far as the sandbox.
        (
            "POST",
            "/sandboxes/sb-none/commands/cmd-1/kill",
            String::new(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        // Runtimes: one the service has, given once.
        (
            "POST",
            "/sandboxes",
            r#"{"runtime":"ruby3"}"#.into(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"runtime":"node22"}"#.into(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "POST",
            "/images?name=base",
            "x".into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/images?name=Bad.Name",
            "x".into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/images?name=fine",
            "not a tarball".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_import_failed",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"runtime":"base","image":"default"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"snapshot":"s","runtime":"base"}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"network":{"mode":"egress"},"net_limits":{"tx":{"ops_per_sec":9223372036854775808}}}"#
                .into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Serde would read a list as a struct's fields in order.
        (
            "POST",
            "/sandboxes",
            "[null, null]".into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"disk_limits":[null, null]}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"ports":[[80]]}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "POST",
            "/sandboxes",
            r#"{"disk_limits":{"bytes_per_sec":1}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
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
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
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
    let mut m = Manifest::new(
        id,
        state,
        MemoryRef {
            size_bytes: map.size_bytes(),
            page_size: PAGE_SIZE as u32,
            map_chunks: chunks,
        },
    );
    m.metadata.insert("vcpus".into(), "1".into());
    w.commit(&m).unwrap();
}

fn pack_bytes(store_dir: &std::path::Path) -> u64 {
    std::fs::read_dir(store_dir.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[tokio::test]
async fn a_fork_without_room_for_every_clone_is_refused_before_any_starts() {
    let dir = std::env::temp_dir().join(format!("ember-api-room-{}", std::process::id()));
    let state = state(&dir);
    store_snapshot(&state.store, "snap-room", 4, 7);
    for i in 0..3 {
        let id = format!("sb-live{i}");
        let sandbox = Sandbox::for_test(
            dir.join(&id),
            &id,
            ember_sandbox::control::WorkerOrigin::Boot,
            SandboxState::Running,
        );
        state
            .sandboxes
            .lock()
            .unwrap()
            .insert(id, Arc::new(sandbox));
    }
    let app = router(state.clone());
    let (status, doc) = call(&app, "POST", "/snapshots/snap-room/fork", r#"{"count":2}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{doc}");
    assert_eq!(doc["error"]["code"], "too_many_sandboxes");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("3 sandboxes are running and 2 more"),
        "{message}"
    );
    assert_eq!(
        state.sandboxes.lock().unwrap().len(),
        3,
        "no clone was started"
    );
    // One more fits: that fork gets past the check (and fails later, having no VMM program).
    let (status, doc) = call(&app, "POST", "/snapshots/snap-room/fork", r#"{"count":1}"#).await;
    assert_ne!(status, StatusCode::TOO_MANY_REQUESTS, "{doc}");
    let _ = std::fs::remove_dir_all(&dir);
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

/// Every operation of the document, as `(METHOD, path)`.
fn documented_operations() -> Vec<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                ops.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops.sort();
    ops
}

#[tokio::test]
async fn the_openapi_document_and_the_router_name_the_same_operations() {
    let ops = documented_operations();
    // The router's operations (a route added there must be added here and documented).
    let mut routed: Vec<(String, String)> = [
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/images"),
        ("POST", "/images"),
        ("POST", "/sandboxes"),
        ("GET", "/sandboxes"),
        ("GET", "/sandboxes/{id}"),
        ("DELETE", "/sandboxes/{id}"),
        ("POST", "/sandboxes/{id}/timeout"),
        ("PATCH", "/sandboxes/{id}/network"),
        ("POST", "/sandboxes/{id}/pause"),
        ("POST", "/sandboxes/{id}/resume"),
        ("GET", "/sandboxes/{id}/faults"),
        ("GET", "/sandboxes/{id}/metrics"),
        ("POST", "/sandboxes/{id}/exec"),
        ("GET", "/sandboxes/{id}/commands"),
        ("GET", "/sandboxes/{id}/commands/{cid}"),
        ("GET", "/sandboxes/{id}/commands/{cid}/logs"),
        ("POST", "/sandboxes/{id}/commands/{cid}/kill"),
        ("GET", "/sandboxes/{id}/files"),
        ("PUT", "/sandboxes/{id}/files"),
        ("DELETE", "/sandboxes/{id}/files"),
        ("POST", "/sandboxes/{id}/files/mkdir"),
        ("GET", "/sandboxes/{id}/files/list"),
        ("GET", "/sandboxes/{id}/files/stat"),
        ("POST", "/sandboxes/{id}/files/rename"),
        ("GET", "/sandboxes/{id}/files/tar"),
        ("PUT", "/sandboxes/{id}/files/tar"),
        ("GET", "/sandboxes/{id}/files/watch"),
        ("POST", "/sandboxes/{id}/pty"),
        ("GET", "/sandboxes/{id}/pty"),
        ("DELETE", "/sandboxes/{id}/pty/{pty_id}"),
        ("GET", "/sandboxes/{id}/pty/{pty_id}/connect"),
        ("POST", "/sandboxes/{id}/snapshots"),
        ("GET", "/snapshots"),
        ("GET", "/snapshots/{id}"),
        ("DELETE", "/snapshots/{id}"),
        ("POST", "/snapshots/{id}/fork"),
        ("POST", "/snapshots/{id}/push"),
        ("POST", "/templates"),
        ("GET", "/templates"),
        ("GET", "/templates/{name}"),
        ("DELETE", "/templates/{name}"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    routed.sort();
    assert_eq!(ops, routed);
    // Each documented operation reaches a handler: not the fallbacks for an unknown path or
    // method.
    let dir = std::env::temp_dir().join(format!("ember-api-ops-{}", std::process::id()));
    let app = router(state(&dir));
    for (method, path) in &ops {
        let uri = path
            .replace("{id}", "x")
            .replace("{cid}", "y")
            .replace("{pty_id}", "w")
            .replace("{name}", "z");
        let (status, doc) = call(&app, method, &uri, "").await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(
            doc["error"]["message"], "no such endpoint",
            "{method} {path}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_document_describes_the_bodies_with_the_api_types() {
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    let schemas = &doc["components"]["schemas"];
    for name in [
        "CreateBody",
        "SandboxInfo",
        "ExecBody",
        "ExecResult",
        "OutputRecord",
        "CommandInfo",
        "SnapshotInfo",
        "SnapshotTaken",
        "ErrorDocument",
        "RestoreMode",
        "RateLimit",
    ] {
        assert!(schemas[name].is_object(), "no schema {name}");
    }
    // Request bodies refuse unknown fields, and the document says so.
    assert_eq!(schemas["CreateBody"]["additionalProperties"], false);
    let restore_modes = &schemas["RestoreMode"]["enum"];
    assert_eq!(
        *restore_modes,
        json!(["auto", "file", "lazy", "eager", "prefetch"])
    );
    let exec = &doc["paths"]["/sandboxes/{id}/exec"]["post"]["responses"]["200"]["content"];
    assert!(exec["application/x-ndjson"].is_object(), "{exec}");
    assert!(exec["application/json"].is_object(), "{exec}");
}

/// The document's bounds on `idle_timeout_s` are those create enforces (schemathesis found
/// them missing: it sent a schema-valid value the service refused).
#[test]
fn the_documented_idle_timeout_bounds_are_the_ones_create_accepts() {
    use crate::lifecycle::{Lifecycle, MIN_IDLE_TIMEOUT_S};
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    let idle = &doc["components"]["schemas"]["CreateBody"]["properties"]["idle_timeout_s"];
    let (min, max) = (idle["minimum"].as_u64(), idle["maximum"].as_u64());
    assert_eq!(min, Some(MIN_IDLE_TIMEOUT_S), "{idle}");
    assert_eq!(max, Some(crate::MAX_TIMEOUT_S), "{idle}");
    let check = |s: u64| Lifecycle::from_request(Duration::from_secs(60), None, None, Some(s));
    assert!(check(MIN_IDLE_TIMEOUT_S).is_ok() && check(crate::MAX_TIMEOUT_S).is_ok());
    assert!(check(MIN_IDLE_TIMEOUT_S - 1).is_err() && check(crate::MAX_TIMEOUT_S + 1).is_err());
}

/// OpenAPI requires each operation's id to be unique (generators name methods after them).
#[test]
fn every_operation_has_an_id_of_its_own() {
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    let mut seen = HashMap::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let Some(id) = operation["operationId"].as_str() else {
                continue;
            };
            if let Some(other) = seen.insert(id.to_string(), format!("{method} {path}")) {
                panic!("{method} {path} and {other} are both `{id}`");
            }
        }
    }
    assert!(seen.contains_key("delete_pty") && seen.contains_key("delete_snapshot"));
}

/// `api/openapi.json` is the generated document, committed for readers and SDK
/// generators; `EMBER_WRITE_OPENAPI=1 cargo test -p ember-service committed_openapi`
/// rewrites it.
#[test]
fn the_committed_openapi_json_is_the_generated_document() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.json");
    let generated = format!("{}\n", crate::openapi::document());
    if std::env::var_os("EMBER_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the document the service serves; run \
         `EMBER_WRITE_OPENAPI=1 cargo test -p ember-service committed_openapi`",
        path.display()
    );
}
