//! What an API client sends the service: any method's body and query on every route that takes
//! one, through the real router (axum's extractors, then ember's own checks). The service
//! here cannot start VMMs (it allows none), and its sandbox and snapshot ids name nothing, so a
//! request either is refused or reaches a lookup that fails; any panic is a finding, and so is
//! an answer of 500 (a request a client got wrong must be a 4xx).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ember_service::{router, AppState, ServiceConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// (method, path) of the routes that read a body or a query.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/sandboxes"),
    ("POST", "/sandboxes/sb-0000/exec"),
    ("POST", "/sandboxes/sb-0000/timeout"),
    ("POST", "/sandboxes/sb-0000/commands/c1/kill"),
    ("PUT", "/sandboxes/sb-0000/files"),
    ("GET", "/sandboxes/sb-0000/files"),
    ("POST", "/sandboxes/sb-0000/files/mkdir"),
    ("POST", "/sandboxes/sb-0000/snapshots"),
    ("POST", "/snapshots/snap/fork"),
    ("DELETE", "/snapshots/snap"),
    ("GET", "/sandboxes"),
];

struct Service {
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
}

fn service() -> &'static Service {
    static SERVICE: OnceLock<Service> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sandboxes")).unwrap();
        let store = ember_sandbox::defaults::open_store(&dir.join("store")).unwrap();
        let state = Arc::new(AppState {
            config: ServiceConfig {
                state_dir: dir.clone(),
                store_dir: dir.join("store"),
                kernel: "/nonexistent/vmlinux".into(),
                rootfs: "/nonexistent/rootfs.ext4".into(),
                runtimes: ember_service::runtimes::Runtimes::base_only(
                    "/nonexistent/rootfs.ext4".as_ref(),
                ),
                vmm_program: "/nonexistent/ember-vmm".into(),
                // Every valid create is refused (429) after its body was checked.
                max_sandboxes: 0,
                jail: None,
                retention: std::time::Duration::from_secs(3600),
                dns_upstreams: Vec::new(),
            },
            sandboxes: Mutex::new(HashMap::new()),
            store,
            metrics: Default::default(),
            gc: Default::default(),
            cgroups: None,
            mem_cache: Arc::new(ember_service::mem_cache::MemoryCache::new(
                dir.join("mem-cache"),
                1 << 30,
                None,
            )),
            pool: None,
            remote: None,
            templates: Default::default(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Service { runtime, state }
    })
}

fuzz_target!(|data: &[u8]| {
    let [route, query_len, rest @ ..] = data else {
        return;
    };
    let (method, path) = ROUTES[*route as usize % ROUTES.len()];
    let query_len = (*query_len as usize).min(rest.len());
    let (query, body) = rest.split_at(query_len);
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let Ok(request) = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
    else {
        // Not a request a client could send (a query with bytes a URI cannot hold).
        return;
    };
    let service = service();
    let response = service
        .runtime
        .block_on(router(service.state.clone()).oneshot(request))
        .unwrap();
    assert_ne!(
        response.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {path}?{query}"
    );
});
