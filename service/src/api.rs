//! The HTTP API's router, request checks and the sandbox handlers (`/sandboxes…`, `/healthz`,
//! `/openapi.json`); exec, files, snapshots and ports have their own modules.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use ember_client::responses::{Faults, Health, SandboxInfo, SandboxList};
use ember_client::types::{CreateBody, ErrorDocument, TimeoutBody};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::sandbox::{NewSandbox, Sandbox, SandboxState};
use ember_sandbox::control::{ControlRequest, WorkerOrigin};

use crate::{exec, files, metrics, network, ports, pty, sandbox, snapshots, templates};
use crate::{
    AppState, DEFAULT_TIMEOUT_S, MAX_ENV_VARS, MAX_JSON_BODY, MAX_MEMORY_MIB, MAX_TIMEOUT_S,
    MIN_MEMORY_MIB,
};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics::metrics))
        .route("/images", get(list_images).post(crate::import::import))
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(delete_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::patch(network::update::update_policy),
        )
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/faults", get(faults))
        .route(
            "/sandboxes/{id}/metrics",
            get(crate::sandbox_metrics::sandbox_metrics),
        )
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route("/sandboxes/{id}/commands", get(exec::list_commands))
        .route("/sandboxes/{id}/commands/{cid}", get(exec::get_command))
        .route(
            "/sandboxes/{id}/commands/{cid}/logs",
            get(exec::command_logs),
        )
        .route(
            "/sandboxes/{id}/commands/{cid}/kill",
            post(exec::kill_command),
        )
        .route(
            "/sandboxes/{id}/files",
            get(files::get_file)
                .put(files::put_file)
                .delete(files::remove),
        )
        .route("/sandboxes/{id}/files/mkdir", post(files::mkdir))
        .route("/sandboxes/{id}/files/list", get(files::list))
        .route("/sandboxes/{id}/files/stat", get(files::stat))
        .route("/sandboxes/{id}/files/rename", post(files::rename))
        .route(
            "/sandboxes/{id}/files/tar",
            get(files::get_tar).put(files::put_tar),
        )
        .route("/sandboxes/{id}/files/watch", get(files::watch))
        .route("/sandboxes/{id}/pty", post(pty::create).get(pty::list))
        .route("/sandboxes/{id}/pty/{pty_id}", delete(pty::delete))
        .route("/sandboxes/{id}/pty/{pty_id}/connect", get(pty::connect))
        .route("/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/snapshots", get(snapshots::list))
        .route(
            "/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/snapshots/{id}/fork", post(snapshots::fork))
        .route("/snapshots/{id}/push", post(snapshots::push))
        .route("/templates", post(templates::create).get(templates::list))
        .route(
            "/templates/{name}",
            get(templates::get).delete(templates::delete),
        )
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::lifecycle::on_use,
        ))
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
    // No body, or `null`, is an empty object: every field takes its default.
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null"
    {
        b"{}"
    } else {
        &bytes
    };
    let invalid = |why: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not what this endpoint takes: {why}"),
        )
    };
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| invalid(&e))?;
    check_shape(&value, "the body").map_err(|e| invalid(&e))?;
    whole_numbers_as_integers(&mut value);
    serde_json::from_value(value).map_err(|e| invalid(&e))
}

/// A streamed answer of newline-delimited JSON records (exec's output, command logs, watches).
pub fn ndjson_response<S>(records: S) -> Response
where
    S: futures_util::TryStream + Send + 'static,
    S::Ok: Into<bytes::Bytes>,
    S::Error: Into<axum::BoxError>,
{
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(records))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Fields whose values are lists (of strings or numbers) in this API's request bodies.
const LIST_FIELDS: &[&str] = &["args", "ports", "allow", "deny", "apt", "pip", "npm"];
/// Fields that are lists of objects (each checked as a body is).
const OBJECT_LIST_FIELDS: &[&str] = &["steps"];

/// Writes numbers like `30.0` as `30`: JSON (and the OpenAPI document's schemas) count them as
/// integers, serde's integer fields do not. No request field is fractional.
fn whole_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::{Number, Value};
    match value {
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let whole = x.fract() == 0.0;
            if whole && x >= 0.0 && x < u64::MAX as f64 {
                *n = Number::from(x as u64);
            } else if whole && x < 0.0 && x >= i64::MIN as f64 {
                *n = Number::from(x as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// Where a request body has a JSON value of a shape no request type has.
#[derive(Debug, thiserror::Error)]
enum ShapeError {
    #[error("{what} must be a JSON object")]
    NotAnObject { what: String },
    #[error("`{field}` must not be a list")]
    List { field: String },
    #[error("`{field}` must be a list of strings or numbers")]
    NestedList { field: String },
}

/// Checks that the body is an object whose lists are only [`LIST_FIELDS`] of scalars. Serde
/// would otherwise read a JSON list as a struct's fields in order (`[null, null]` as a
/// `CreateBody`), which the API does not take.
fn check_shape(value: &serde_json::Value, what: &str) -> Result<(), ShapeError> {
    use serde_json::Value;
    let Value::Object(fields) = value else {
        return Err(ShapeError::NotAnObject {
            what: what.to_string(),
        });
    };
    for (name, field) in fields {
        match field {
            Value::Object(_) => check_shape(field, &format!("`{name}`"))?,
            Value::Array(items) if OBJECT_LIST_FIELDS.contains(&name.as_str()) => {
                for item in items {
                    check_shape(item, &format!("each of `{name}`"))?;
                }
            }
            Value::Array(_) if !LIST_FIELDS.contains(&name.as_str()) => {
                return Err(ShapeError::List {
                    field: name.clone(),
                });
            }
            Value::Array(items) if items.iter().any(|i| i.is_array() || i.is_object()) => {
                return Err(ShapeError::NestedList {
                    field: name.clone(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// A query string as `T`, or why not (so a bad one gets this API's error shape).
pub type QueryResult<T> = Result<Query<T>, QueryRejection>;

/// Parses a query string strictly (unknown parameters are refused, as the types say).
pub fn parse_query<T>(query: QueryResult<T>) -> Result<T, ApiError> {
    query.map(|Query(query)| query).map_err(|rejection| {
        ApiError::bad_request(format!("the query string: {}", rejection.body_text()))
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

#[utoipa::path(get, path = "/images", tag = "service",
    responses((status = 200, description = "The runtimes this service offers and their images", body = ember_client::images::ImageList)))]
/// `GET /images`
async fn list_images(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.config.runtimes.list()).into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "The service answers", body = Health)))]
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let sandboxes = state
        .sandboxes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    axum::Json(Health {
        status: "ok".into(),
        sandboxes,
    })
    .into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document", content_type = "application/json")))]
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

/// The `{id}` of a sandbox in a path.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)] // Only describes the parameter.
pub struct SandboxId(String);

/// How a request the sandbox's VMM answers fails when the VMM does.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only describes the responses.
enum VmmFailures {
    #[response(status = 500, description = "The VMM refused")]
    Refused(ErrorDocument),
    #[response(status = 502, description = "The VMM did not answer")]
    Unreachable(ErrorDocument),
}

/// The slowest root disk a sandbox may have: slower ones cannot read what its guest needs to
/// boot within the service's ready timeout.
pub(crate) const MIN_DISK_BYTES_PER_SEC: u64 = 1 << 20;
pub(crate) const MIN_DISK_OPS_PER_SEC: u64 = 100;

/// The highest rate a limit may give (bytes or operations per second): beyond it a token
/// bucket's arithmetic would overflow, and no device is that fast.
pub(crate) const MAX_RATE: u64 = 1 << 50;

/// Refuses rates above [`MAX_RATE`], disk rates below the minimums, network rates of zero (a field left out is no
/// limit) and network limits without a network.
pub fn check_limits(
    disk: Option<&ember_vmm::RateLimit>,
    net: Option<&ember_vmm::NetRateLimits>,
    network: &network::NetworkMode,
) -> Result<(), ApiError> {
    let rates = [disk, net.map(|n| &n.rx), net.map(|n| &n.tx)];
    if rates.into_iter().flatten().any(|limit| {
        [limit.bytes_per_sec, limit.ops_per_sec]
            .into_iter()
            .flatten()
            .any(|rate| rate > MAX_RATE)
    }) {
        return Err(ApiError::bad_request(format!(
            "rates in `disk_limits` and `net_limits` may be at most {MAX_RATE} per second"
        )));
    }
    let below = |limit: &ember_vmm::RateLimit, bytes: u64, ops: u64| {
        limit.bytes_per_sec.is_some_and(|rate| rate < bytes)
            || limit.ops_per_sec.is_some_and(|rate| rate < ops)
    };
    if disk.is_some_and(|d| below(d, MIN_DISK_BYTES_PER_SEC, MIN_DISK_OPS_PER_SEC)) {
        return Err(ApiError::bad_request(format!(
            "`disk_limits` must allow at least {MIN_DISK_BYTES_PER_SEC} bytes and \
             {MIN_DISK_OPS_PER_SEC} operations per second (leave a field out for no limit)"
        )));
    }
    let checks = [
        ("net_limits.rx", net.map(|n| n.rx)),
        ("net_limits.tx", net.map(|n| n.tx)),
    ];
    for (name, limit) in checks {
        if limit.as_ref().is_some_and(|l| below(l, 1, 1)) {
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

#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes",
    request_body(content = Option<CreateBody>, description = "Optional: without one, a sandbox of the default image and size"),
    responses(
        (status = 201, description = "Running (booted, or restored from `snapshot`)", body = SandboxInfo),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such snapshot, template or runtime", body = ErrorDocument),
        (status = 409, description = "An egress network for a snapshot whose guest had no network device, or a snapshot of a runtime whose image is not here", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 429, description = "The service runs as many sandboxes as it may", body = ErrorDocument),
        (status = 500, description = "The sandbox failed to start", body = ErrorDocument),
        (status = 502, description = "The remote tier failed", body = ErrorDocument),
        (status = 503, description = "The remote tier is unreachable", body = ErrorDocument)))]
/// `POST /sandboxes`
async fn create_sandbox(
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let mut body: CreateBody = parse_body(body)?;
    if let Some(template) = body.template.take() {
        if body.snapshot.is_some() || body.runtime.is_some() || body.image.is_some() {
            return Err(ApiError::bad_request(
                "a template's sandbox is a restore of its snapshot: leave out `snapshot`, \
                 `runtime` and `image`",
            ));
        }
        body.snapshot = Some(templates::find(&state, &template)?.snapshot);
    }
    check_env_map(&body.env)?;
    let timeout = check_timeout(body.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))?;
    ports::check(&body.ports).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut restored_nic = false;
    let mut partial = None;
    let mut restored_image = None;
    let new =
        match (
            body.image.is_some() || body.runtime.is_some(),
            &body.snapshot,
        ) {
            (true, Some(_)) => return Err(ApiError::bad_request(
                "a restored sandbox has its snapshot's runtime; leave out `runtime` and `image`",
            )),
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
                    image,
                    partial: fetching,
                } = snapshots::restore_spec(&state, snapshot, body.restore_mode).await?;
                snapshots::check_network(snapshot, had_network, body.network.as_ref())?;
                restored_nic = had_network;
                partial = fetching;
                restored_image = Some(image);
                (origin, vcpus, mem_mib)
            }
            (_, None) => {
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
    let image = match restored_image {
        Some(image) => image,
        None => state
            .config
            .runtimes
            .choose(body.runtime.as_deref(), body.image.as_deref())?,
    };
    let network = body.network.unwrap_or(network::NetworkMode::None {});
    network::update::check_mode(&network)?;
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
            image,
            lifecycle: crate::lifecycle::Lifecycle::from_request(
                timeout,
                body.on_timeout,
                body.auto_resume,
                body.idle_timeout_s,
            )?,
            continues: None,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox.info())).into_response())
}

#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "Every sandbox, oldest first", body = SandboxList)))]
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
    let list: Vec<_> = list.iter().map(|s| s.info()).collect();
    axum::Json(SandboxList { sandboxes: list }).into_response()
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "sandboxes", params(SandboxId),
    responses(
        (status = 200, description = "The sandbox", body = SandboxInfo),
        (status = 404, description = "No such sandbox", body = ErrorDocument)))]
/// `GET /sandboxes/{id}`
async fn get_sandbox(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(state.sandbox(&id)?.info()).into_response())
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes", params(SandboxId),
    responses(
        (status = 204, description = "Stopped and forgotten"),
        (status = 404, description = "No such sandbox", body = ErrorDocument)))]
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

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "sandboxes", params(SandboxId),
    request_body = TimeoutBody,
    responses(
        (status = 200, description = "The new deadline is set", body = SandboxInfo),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox is neither running nor paused", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument)))]
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
    Ok(axum::Json(sandbox.info()).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "sandboxes", params(SandboxId),
    responses(
        (status = 200, description = "Paused: its vCPUs stopped, its memory kept", body = SandboxInfo),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox is not running", body = ErrorDocument),
        VmmFailures))]
/// `POST /sandboxes/{id}/pause`
async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    control(&sandbox, ControlRequest::Pause).await?;
    sandbox.update(|r| r.state = SandboxState::Paused);
    Ok(axum::Json(sandbox.info()).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "sandboxes", params(SandboxId),
    responses(
        (status = 200, description = "Running again", body = SandboxInfo),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox is not paused", body = ErrorDocument),
        VmmFailures))]
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
    let now = sandbox::unix_ms();
    sandbox.update(|r| {
        r.state = SandboxState::Running;
        // Resumed by hand after its `on_timeout` paused it: its timeout starts again.
        if r.lifecycle.suspended.take().is_some() {
            r.deadline_unix_ms = now + r.lifecycle.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_S * 1000);
        }
    });
    sandbox.activity.touch();
    Ok(axum::Json(sandbox.info()).into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/faults", tag = "sandboxes", params(SandboxId),
    responses(
        (status = 200, description = "Page faults over time", body = Faults),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox is neither running nor paused", body = ErrorDocument),
        VmmFailures))]
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
    let report = reply.faults.unwrap_or_default();
    Ok(axum::Json(Faults {
        lazy: report.lazy,
        bucket_ms: report.bucket_ms,
        counts: report.counts,
        served: report.served,
        prefetched: report.prefetched,
    })
    .into_response())
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
mod tests;
