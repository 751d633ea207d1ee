//! The API's OpenAPI document, derived from the handlers' `#[utoipa::path]` descriptions and
//! the request and response types in `ember_client`, and served at `GET /openapi.json`.
//! Nothing here is written by hand but the list of operations, which a test checks against
//! the router.

use std::sync::OnceLock;

use utoipa::OpenApi;

use crate::{api, exec, files, metrics, snapshots};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ember",
        description = "The ember service: sandboxes (one microVM each), commands, files and \
            snapshots. HTTP/1.1 + JSON on a Unix socket. Every error is \
            `{\"error\": {\"code\", \"message\"}}`; request bodies and query strings refuse \
            unknown fields."
    ),
    paths(
        api::healthz,
        api::openapi,
        metrics::metrics,
        api::create_sandbox,
        api::list_sandboxes,
        api::get_sandbox,
        api::delete_sandbox,
        api::set_timeout,
        api::pause,
        api::resume,
        api::faults,
        exec::exec,
        exec::list_commands,
        exec::get_command,
        exec::kill_command,
        files::get_file,
        files::put_file,
        files::mkdir,
        snapshots::create,
        snapshots::list,
        snapshots::get,
        snapshots::delete,
        snapshots::fork,
        snapshots::push,
    ),
    tags(
        (name = "service", description = "The service itself"),
        (name = "sandboxes", description = "Sandboxes: one microVM each"),
        (name = "commands", description = "Commands in a sandbox"),
        (name = "files", description = "Files in a sandbox"),
        (name = "snapshots", description = "Snapshots in the store, and sandboxes from them"),
    )
)]
struct ApiDoc;

/// The document as JSON (built once).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        doc.to_pretty_json()
            .expect("an OpenAPI document always serialises")
    })
}
