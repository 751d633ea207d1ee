//! The API's OpenAPI document, derived from the handlers' `#[utoipa::path]` descriptions and
//! the request and response types in `ember_client`, and served at `GET /openapi.json`.
//! Written by hand here: the list of operations (a test checks it against the router), and
//! the limits the handlers enforce, added to the derived schemas from the same constants the
//! handlers use (so a request the document calls valid is not refused as malformed).

use std::sync::OnceLock;

use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::{api, exec, files, metrics, snapshots, templates};

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
        api::list_images,
        crate::import::import,
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
        templates::create,
        templates::list,
        templates::get,
        templates::delete,
    ),
    tags(
        (name = "service", description = "The service itself"),
        (name = "sandboxes", description = "Sandboxes: one microVM each"),
        (name = "commands", description = "Commands in a sandbox"),
        (name = "files", description = "Files in a sandbox"),
        (name = "snapshots", description = "Snapshots in the store, and sandboxes from them"),
        (name = "templates", description = "Runtimes with build steps, snapshotted ready to use"),
    )
)]
struct ApiDoc;

/// The document as JSON (built once).
pub fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        let mut doc = serde_json::to_value(doc).expect("an OpenAPI document always serialises");
        add_limits(&mut doc);
        serde_json::to_string_pretty(&doc).expect("a JSON value always serialises")
    })
}

/// A guest path as [`files::check_guest_path`] takes it: absolute, no `.` or `..` part, no
/// part over 255 characters, no NUL.
const GUEST_PATH_PATTERN: &str =
    r"^(/([^/.\u0000][^/\u0000]{0,254}|\.[^/.\u0000][^/\u0000]{0,253}|\.\.[^/\u0000]{1,253})?)+$";
/// An IPv4 address with an optional prefix length, as [`ember_client::types::Cidr`] parses it.
const CIDR_PATTERN: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?$";
/// A user name as exec takes it (`root`, `user`, or an imported image's own).
const USER_PATTERN: &str = "^[a-z_][a-z0-9_-]{0,31}$";
/// Text without NUL.
const NO_NUL_PATTERN: &str = r"^[^\u0000]*$";
/// Padded standard base64.
const BASE64_PATTERN: &str = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$";

/// Adds `extra`'s keys to `schema`'s property `property` (for an optional property, to its
/// non-null alternative).
fn limit(doc: &mut Value, schema: &str, property: &str, extra: Value) {
    let target = &mut doc["components"]["schemas"][schema]["properties"][property];
    assert!(target.is_object(), "no property {schema}.{property}");
    merge(target, extra);
}

/// Adds `extra`'s keys to the parameter `name` of `path`'s `method` operation.
fn limit_parameter(doc: &mut Value, path: &str, method: &str, name: &str, extra: Value) {
    let parameters = doc["paths"][path][method]["parameters"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{method} {path} has no parameters"));
    let parameter = parameters
        .iter_mut()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"));
    merge(&mut parameter["schema"], extra);
}

fn merge(target: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
        target.extend(extra);
    }
}

/// Puts [`CIDR_PATTERN`] on every `allow` list's items under `schema`.
fn set_cidr_pattern(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(items) = map
                .get_mut("properties")
                .and_then(|p| p.get_mut("allow"))
                .and_then(|a| find_items(a))
            {
                merge(items, json!({"pattern": CIDR_PATTERN}));
            }
            map.values_mut().for_each(set_cidr_pattern);
        }
        Value::Array(list) => list.iter_mut().for_each(set_cidr_pattern),
        _ => {}
    }
}

/// The `items` schema of an array schema, or of its non-null alternative.
fn find_items(schema: &mut Value) -> Option<&mut Value> {
    if schema.get("items").is_some() {
        return schema.get_mut("items");
    }
    schema
        .get_mut("oneOf")?
        .as_array_mut()?
        .iter_mut()
        .find_map(|alternative| alternative.get_mut("items"))
}

/// The environment a sandbox or a command takes (see [`api::check_env`]).
fn environment() -> Value {
    json!({
        "maxProperties": crate::MAX_ENV_VARS,
        "propertyNames": {"minLength": 1, "maxLength": 256, "pattern": r"^[^=\u0000]*$"},
        "additionalProperties": {"type": "string", "maxLength": 65536, "pattern": NO_NUL_PATTERN},
    })
}

/// Guest ports to expose (see [`crate::ports::check`]).
fn ports() -> Value {
    json!({
        "maxItems": crate::ports::MAX_PORTS,
        "uniqueItems": true,
        "items": {"type": "integer", "minimum": 1, "maximum": 65535},
    })
}

/// `net_limits` need an egress network (see [`api::check_limits`]).
fn net_limits_need_egress() -> Value {
    json!({
        "if": {"required": ["net_limits"], "properties": {"net_limits": {"type": "object"}}},
        "then": {
            "required": ["network"],
            "properties": {"network": {"type": "object", "properties": {"mode": {"const": "egress"}}}}
        }
    })
}

/// The handlers' limits, from their constants.
fn add_limits(doc: &mut Value) {
    let sandbox_timeout = json!({"minimum": 1, "maximum": crate::MAX_TIMEOUT_S});
    for schema in ["CreateBody", "ForkBody"] {
        limit(doc, schema, "timeout_s", sandbox_timeout.clone());
        limit(doc, schema, "env", environment());
        limit(doc, schema, "ports", ports());
    }
    limit(doc, "TimeoutBody", "timeout_s", sandbox_timeout);
    limit(
        doc,
        "CreateBody",
        "image",
        json!({"enum": ember_client::images::BASE_ALIASES}),
    );
    // Built-in runtimes or imported images' names.
    let runtime = json!({"pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"});
    limit(doc, "CreateBody", "runtime", runtime.clone());
    limit(doc, "TemplateBody", "runtime", runtime);
    limit(
        doc,
        "TemplateBody",
        "name",
        json!({"pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"}),
    );
    limit(
        doc,
        "TemplateBody",
        "steps",
        json!({"maxItems": crate::templates::MAX_STEPS}),
    );
    limit(
        doc,
        "ReadyCheck",
        "timeout_s",
        json!({"minimum": 1, "maximum": crate::templates::MAX_READY_TIMEOUT_S}),
    );
    limit(
        doc,
        "ReadyCheck",
        "cmd",
        json!({"minLength": 1, "pattern": NO_NUL_PATTERN}),
    );
    limit(
        doc,
        "CopyFile",
        "path",
        json!({"minLength": 1, "maxLength": files::MAX_PATH, "pattern": GUEST_PATH_PATTERN}),
    );
    limit(
        doc,
        "CopyFile",
        "content_base64",
        json!({"pattern": BASE64_PATTERN}),
    );
    limit(doc, "ExecBody", "user", json!({"pattern": USER_PATTERN}));
    limit(
        doc,
        "CreateBody",
        "vcpus",
        json!({"minimum": 1, "maximum": ember_vmm::MAX_VCPUS}),
    );
    limit(
        doc,
        "CreateBody",
        "memory_mib",
        json!({"minimum": crate::MIN_MEMORY_MIB, "maximum": crate::MAX_MEMORY_MIB}),
    );
    // A restore has its snapshot's hardware and image; `restore_mode` is for restores.
    let restoring =
        json!({"required": ["snapshot"], "properties": {"snapshot": {"type": "string"}}});
    let create_rules = json!([
        {
            "if": restoring,
            "then": {"properties": {
                "image": {"type": "null"}, "runtime": {"type": "null"},
                "vcpus": {"type": "null"}, "memory_mib": {"type": "null"}
            }},
            "else": {"properties": {"restore_mode": {"type": "null"}}}
        },
        {
            // A template is a restore of its snapshot.
            "if": {"required": ["template"], "properties": {"template": {"type": "string"}}},
            "then": {"properties": {
                "snapshot": {"type": "null"}, "runtime": {"type": "null"}, "image": {"type": "null"}
            }}
        },
        {
            // `runtime` or the older `image`, not both.
            "if": {"required": ["runtime"], "properties": {"runtime": {"type": "string"}}},
            "then": {"properties": {"image": {"type": "null"}}}
        },
        net_limits_need_egress(),
    ]);
    doc["components"]["schemas"]["CreateBody"]["allOf"] = create_rules;
    doc["components"]["schemas"]["ForkBody"]["allOf"] = json!([net_limits_need_egress()]);
    limit(
        doc,
        "ForkBody",
        "count",
        json!({"minimum": 1, "maximum": snapshots::MAX_FORK}),
    );
    for field in ["bytes_per_sec", "ops_per_sec"] {
        limit(
            doc,
            "RateLimit",
            field,
            json!({"minimum": 1, "maximum": api::MAX_RATE}),
        );
    }
    let disk_minimums = json!({"properties": {
        "bytes_per_sec": {"minimum": api::MIN_DISK_BYTES_PER_SEC},
        "ops_per_sec": {"minimum": api::MIN_DISK_OPS_PER_SEC},
    }});
    for schema in ["CreateBody", "ForkBody"] {
        limit(doc, schema, "disk_limits", disk_minimums.clone());
    }
    let network = &mut doc["components"]["schemas"]["NetworkMode"];
    set_cidr_pattern(network);
    // Each mode refuses the other's fields (the type denies unknown fields).
    for mode in network["oneOf"].as_array_mut().into_iter().flatten() {
        merge(mode, json!({"additionalProperties": false}));
    }
    limit(
        doc,
        "SnapshotBody",
        "name",
        json!({"pattern": r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"}),
    );

    let guest_path =
        json!({"minLength": 1, "maxLength": files::MAX_PATH, "pattern": GUEST_PATH_PATTERN});
    limit(
        doc,
        "ExecBody",
        "cmd",
        json!({"minLength": 1, "pattern": NO_NUL_PATTERN}),
    );
    limit(
        doc,
        "ExecBody",
        "args",
        json!({"maxItems": exec::MAX_ARGS, "items": {"type": "string", "pattern": NO_NUL_PATTERN}}),
    );
    limit(doc, "ExecBody", "env", environment());
    limit(doc, "ExecBody", "cwd", guest_path.clone());
    limit(
        doc,
        "ExecBody",
        "stdin",
        json!({"maxLength": exec::MAX_STDIN}),
    );
    limit(
        doc,
        "ExecBody",
        "stdin_base64",
        json!({"pattern": BASE64_PATTERN}),
    );
    limit(
        doc,
        "ExecBody",
        "timeout_s",
        json!({"minimum": 1, "maximum": exec::MAX_TIMEOUT_S}),
    );
    doc["components"]["schemas"]["ExecBody"]["allOf"] = json!([{
        "if": {"required": ["stdin"], "properties": {"stdin": {"type": "string"}}},
        "then": {"properties": {"stdin_base64": {"type": "null"}}}
    }]);
    limit(
        doc,
        "KillBody",
        "signal",
        json!({"minimum": 1, "maximum": 64}),
    );
    limit(doc, "MkdirBody", "path", guest_path.clone());
    limit(doc, "MkdirBody", "mode", json!({"maximum": 0o7777}));
    let files = "/sandboxes/{id}/files";
    for method in ["get", "put"] {
        limit_parameter(doc, files, method, "path", guest_path.clone());
    }
    limit_parameter(
        doc,
        files,
        "put",
        "mode",
        json!({"pattern": "^[0-7]{1,4}$"}),
    );
}
