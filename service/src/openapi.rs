//! The API's OpenAPI document, derived from the handlers' `#[utoipa::path]` descriptions and
//! the request and response types in `ember_client`, and served at `GET /openapi.json`.
//! Written by hand here: the list of operations (a test checks it against the router), and
//! the limits the handlers enforce, added to the derived schemas from the same constants the
//! handlers use (so a request the document calls valid is not refused as malformed).

use std::sync::OnceLock;

use serde_json::{json, Value};
use utoipa::OpenApi;

use crate::{api, exec, files, metrics, pty, sandbox_metrics, snapshots, templates};

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
        crate::network::update::update_policy,
        api::pause,
        api::resume,
        api::faults,
        sandbox_metrics::sandbox_metrics,
        exec::exec,
        exec::list_commands,
        exec::get_command,
        exec::logs::command_logs,
        exec::kill_command,
        files::get_file,
        files::put_file,
        files::mkdir,
        files::manage::list,
        files::manage::stat,
        files::manage::remove,
        files::manage::rename,
        files::archive::get_tar,
        files::archive::put_tar,
        files::watch::watch,
        pty::create,
        pty::list,
        pty::delete,
        pty::connect,
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
    components(schemas(
        ember_client::types::PtyControl,
        ember_client::responses::PtyEvent
    )),
    tags(
        (name = "service", description = "The service itself"),
        (name = "sandboxes", description = "Sandboxes: one microVM each"),
        (name = "commands", description = "Commands in a sandbox"),
        (name = "files", description = "Files in a sandbox"),
        (name = "terminals", description = "Interactive terminals in a sandbox (a pseudo-terminal in the guest, over a WebSocket)"),
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
        add_remote_access(&mut doc);
        serde_json::to_string_pretty(&doc).expect("a JSON value always serialises")
    })
}

/// Over TCP (`ember serve --listen`) every operation needs a bearer token and may be refused
/// for a missing or wrong one (401) or over the token's rate (429 with `Retry-After`); over
/// the Unix socket neither applies (no security requirement: `{}`).
fn add_remote_access(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from `ember serve --token-file`; needed over TCP (`--listen`), not on the Unix socket"
        }
    });
    doc["security"] = json!([{}, {"bearer": []}]);
    let refusals = json!({
        "401": {
            "description": "Over TCP: no bearer token, or not one the service accepts",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDocument"}}}
        },
        "429": {
            "description": "Over TCP: the token is over its request rate (or the service runs as many sandboxes as it may)",
            "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDocument"}}}
        }
    });
    let resumed = json!({
        "description": "Set when this request resumed a sandbox its `on_timeout` had suspended: how it had been (`pause` or `snapshot`)",
        "schema": {"type": "string", "enum": ["pause", "snapshot"]}
    });
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let uses_guest = crate::lifecycle::used_sandbox(path).is_some();
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(responses) = operation["responses"].as_object_mut() else {
                continue;
            };
            for (status, response) in refusals.as_object().into_iter().flatten() {
                responses
                    .entry(status.clone())
                    .or_insert_with(|| response.clone());
            }
            if uses_guest {
                for (status, response) in responses.iter_mut() {
                    if status.starts_with('2') {
                        response["headers"]["ember-resumed"] = resumed.clone();
                    }
                }
            }
        }
    }
}

/// A guest path as [`files::check_guest_path`] takes it: absolute, no `.` or `..` part, no
/// part over 255 characters, no NUL.
const GUEST_PATH_PATTERN: &str =
    r"^(/([^/.\u0000][^/\u0000]{0,254}|\.[^/.\u0000][^/\u0000]{0,253}|\.\.[^/\u0000]{1,253})?)+$";
/// An allow- or deny-list entry, as [`ember_client::types::EgressRule`] parses it: an IPv4
/// address with an optional prefix length, or a domain name with an optional `*.` (labels of
/// 1 to 63 letters, digits, `-` or `_`, not beginning or ending with `-`; at least two; the
/// last beginning with a letter).
const EGRESS_RULE_PATTERN: &str = r"^(?:((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/(3[0-2]|[12]?[0-9]))?|(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+[A-Za-z]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)$";
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

/// Puts [`EGRESS_RULE_PATTERN`] on every `allow` and `deny` list's items under `schema`.
fn set_egress_rule_pattern(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            for list in ["allow", "deny"] {
                if let Some(items) = map
                    .get_mut("properties")
                    .and_then(|p| p.get_mut(list))
                    .and_then(|a| find_items(a))
                {
                    merge(
                        items,
                        json!({"pattern": EGRESS_RULE_PATTERN, "maxLength": ember_client::network::MAX_DOMAIN_LEN}),
                    );
                }
                if let Some(array) = map.get_mut("properties").and_then(|p| p.get_mut(list)) {
                    merge(
                        array,
                        json!({"maxItems": crate::network::update::MAX_RULES}),
                    );
                }
            }
            map.values_mut().for_each(set_egress_rule_pattern);
        }
        Value::Array(list) => list.iter_mut().for_each(set_egress_rule_pattern),
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
        "idle_timeout_s",
        json!({"minimum": crate::lifecycle::MIN_IDLE_TIMEOUT_S, "maximum": crate::MAX_TIMEOUT_S}),
    );
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
    for schema in ["NetworkPolicy", "SandboxNetwork"] {
        set_egress_rule_pattern(&mut doc["components"]["schemas"][schema]);
    }
    let network = &mut doc["components"]["schemas"]["NetworkMode"];
    set_egress_rule_pattern(network);
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
    let cells = json!({"minimum": 1, "maximum": pty::MAX_CELLS});
    for schema in ["PtyBody", "PtyControl"] {
        for field in ["cols", "rows"] {
            let target = if schema == "PtyBody" {
                &mut doc["components"]["schemas"][schema]["properties"][field]
            } else {
                // The resize alternative of the tagged union.
                let resize = doc["components"]["schemas"][schema]["oneOf"]
                    .as_array_mut()
                    .and_then(|alternatives| {
                        alternatives
                            .iter_mut()
                            .find(|a| a["properties"].get(field).is_some())
                    })
                    .expect("PtyControl has a resize alternative");
                &mut resize["properties"][field]
            };
            merge(target, cells.clone());
        }
    }
    limit(
        doc,
        "PtyBody",
        "cmd",
        json!({"minLength": 1, "pattern": NO_NUL_PATTERN}),
    );
    limit(
        doc,
        "PtyBody",
        "args",
        json!({"maxItems": exec::MAX_ARGS, "items": {"type": "string", "pattern": NO_NUL_PATTERN}}),
    );
    limit(doc, "PtyBody", "env", environment());
    limit(doc, "PtyBody", "cwd", guest_path.clone());
    limit(doc, "PtyBody", "user", json!({"pattern": USER_PATTERN}));
    // `args` need a `cmd`.
    doc["components"]["schemas"]["PtyBody"]["allOf"] = json!([{
        "if": {"required": ["args"], "properties": {"args": {"type": "array", "minItems": 1}}},
        "then": {"required": ["cmd"], "properties": {"cmd": {"type": "string"}}}
    }]);
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
    // The files API beyond single files; removal and renames refuse the root.
    let not_root = json!({"not": {"pattern": "^/+$"}});
    let mut below_root = guest_path.clone();
    merge(&mut below_root, not_root);
    limit_parameter(doc, files, "delete", "path", below_root.clone());
    for (path, method) in [
        ("/sandboxes/{id}/files/list", "get"),
        ("/sandboxes/{id}/files/stat", "get"),
        ("/sandboxes/{id}/files/tar", "get"),
        ("/sandboxes/{id}/files/tar", "put"),
        ("/sandboxes/{id}/files/watch", "get"),
    ] {
        limit_parameter(doc, path, method, "path", guest_path.clone());
    }
    limit_parameter(
        doc,
        "/sandboxes/{id}/files/list",
        "get",
        "limit",
        json!({"minimum": 1, "maximum": ember_agent::protocol::MAX_LIST_ENTRIES}),
    );
    limit(doc, "RenameBody", "from", below_root.clone());
    limit(doc, "RenameBody", "to", below_root);
}
