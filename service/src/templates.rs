//! Templates: a runtime plus build steps, booted once, made ready and snapshotted.
//!
//! The builder is a client of this service's own API, called in-process (the router, not a
//! socket): it creates a sandbox, runs each step with `exec`, writes files with `PUT
//! …/files` and takes snapshots, so a build goes through exactly the checks, limits and
//! records any client's requests do. After each step it keeps a snapshot named by the hash of
//! the runtime's image and the steps so far (`tpl-…`); a rebuild restores the deepest such
//! snapshot that exists and goes on from there. The template's record (STATE_DIR/templates/
//! NAME.json) is written only once the final snapshot is in the store: a failed build leaves
//! no template behind (and the old one, if any, as it was).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ember_client::responses::{ExecResult, SandboxInfo, SnapshotTaken};
use ember_client::templates::{
    valid_template_name, CopyFile, ReadyCheck, TemplateBody, TemplateInfo, TemplateList,
    TemplateStep,
};
use ember_client::types::{CreateBody, ErrorDocument, ExecBody, NetworkMode, SnapshotBody};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{parse_body, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// At most this many steps, and packages per step.
pub(crate) const MAX_STEPS: usize = 64;
pub(crate) const MAX_PACKAGES: usize = 256;
/// How long one step may run.
const STEP_TIMEOUT_S: u64 = 1800;
pub(crate) const DEFAULT_READY_TIMEOUT_S: u64 = 60;
pub(crate) const MAX_READY_TIMEOUT_S: u64 = 1800;
/// How much of a failed step's output its error quotes.
const LOG_TAIL_BYTES: usize = 2048;

/// Templates being built (a second build of one name at once is refused).
#[derive(Default)]
pub struct Building(Mutex<HashSet<String>>);

struct BuildGuard<'a> {
    building: &'a Building,
    name: String,
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        self.building
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl Building {
    fn claim(&self, name: &str) -> Option<BuildGuard<'_>> {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        names.insert(name.to_string()).then(|| BuildGuard {
            building: self,
            name: name.to_string(),
        })
    }
}

fn templates_dir(state: &AppState) -> PathBuf {
    state.config.state_dir.join("templates")
}

/// The record of template `name`, if it is built.
pub fn find(state: &AppState, name: &str) -> Result<TemplateInfo, ApiError> {
    let missing = || ApiError::not_found("template", name);
    if !valid_template_name(name) {
        return Err(missing());
    }
    let path = templates_dir(state).join(format!("{name}.json"));
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => {
            return Err(ApiError::internal(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    serde_json::from_slice(&text).map_err(|e| {
        ApiError::internal(format!(
            "template record {} is damaged: {e}",
            path.display()
        ))
    })
}

/// Writes a template's record: temp file, fsync, rename, fsync of the folder.
fn save(state: &AppState, info: &TemplateInfo) -> Result<(), ApiError> {
    let dir = templates_dir(state);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        crate::access::write_atomically(
            &dir.join(format!("{}.json", info.name)),
            &serde_json::to_vec_pretty(info)?,
        )
    };
    write().map_err(|e| ApiError::internal(format!("saving template {}: {e}", info.name)))
}

/// Refuses a template request the build could only fail on.
fn check(body: &TemplateBody) -> Result<(), ApiError> {
    if !valid_template_name(&body.name) {
        return Err(ApiError::bad_request(
            "`name` must be 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`",
        ));
    }
    if body.steps.len() > MAX_STEPS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_STEPS} `steps`"
        )));
    }
    for (n, step) in body.steps.iter().enumerate() {
        let bad = |why: &str| ApiError::bad_request(format!("step {}: {why}", n + 1));
        match step {
            TemplateStep::Apt(packages)
            | TemplateStep::Pip(packages)
            | TemplateStep::Npm(packages) => {
                if packages.is_empty() || packages.len() > MAX_PACKAGES {
                    return Err(bad(&format!("give 1 to {MAX_PACKAGES} packages")));
                }
                // Package specs are arguments, never options or shell text.
                if packages
                    .iter()
                    .any(|p| p.is_empty() || p.starts_with('-') || p.contains('\0'))
                {
                    return Err(bad(
                        "a package must be non-empty, without NUL, not start with `-`",
                    ));
                }
            }
            TemplateStep::Run(cmd) if cmd.is_empty() || cmd.contains('\0') => {
                return Err(bad("`run` must be a non-empty command without NUL"));
            }
            TemplateStep::Run(_) => {}
            TemplateStep::Copy(copy) => {
                crate::files::check_guest_path(&copy.path)?;
                base64::engine::general_purpose::STANDARD
                    .decode(&copy.content_base64)
                    .map_err(|e| bad(&format!("`content_base64` is not base64: {e}")))?;
            }
        }
    }
    if let Some(ready) = &body.ready {
        if ready.cmd.is_empty() || ready.cmd.contains('\0') {
            return Err(ApiError::bad_request(
                "`ready.cmd` must be a non-empty command without NUL",
            ));
        }
        if ready
            .timeout_s
            .is_some_and(|t| t == 0 || t > MAX_READY_TIMEOUT_S)
        {
            return Err(ApiError::bad_request(format!(
                "`ready.timeout_s` must be between 1 and {MAX_READY_TIMEOUT_S}"
            )));
        }
    }
    Ok(())
}

/// The snapshot names of a build: after each step, and the ready template, each the hash of
/// the runtime's image and everything done up to it.
fn step_snapshots(runtime: &str, image_key: &str, body: &TemplateBody) -> (Vec<String>, String) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"ember-template-v1\0");
    hasher.update(runtime.as_bytes());
    hasher.update(b"\0");
    hasher.update(image_key.as_bytes());
    let name = |hasher: &blake3::Hasher| format!("tpl-{}", &hasher.finalize().to_hex()[..24]);
    let mut steps = Vec::new();
    for step in &body.steps {
        hasher.update(b"\0step\0");
        hasher.update(&serde_json::to_vec(step).unwrap_or_default());
        steps.push(name(&hasher));
    }
    hasher.update(b"\0ready\0");
    hasher.update(&serde_json::to_vec(&body.ready).unwrap_or_default());
    (steps, name(&hasher))
}

/// A request to this service's own API, answered in-process.
async fn call<T: Serialize, R: DeserializeOwned>(
    state: &Arc<AppState>,
    method: Method,
    uri: &str,
    body: Option<&T>,
) -> Result<R, ApiError> {
    let body = match body {
        Some(body) => {
            Body::from(serde_json::to_vec(body).map_err(|e| ApiError::internal(e.to_string()))?)
        }
        None => Body::empty(),
    };
    call_raw(state, method, uri, "application/json", body).await
}

async fn call_raw<R: DeserializeOwned>(
    state: &Arc<AppState>,
    method: Method,
    uri: &str,
    content_type: &str,
    body: Body,
) -> Result<R, ApiError> {
    use tower::ServiceExt;
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header("content-type", content_type)
        .body(body)
        .map_err(|e| ApiError::internal(format!("{method} {uri}: {e}")))?;
    let response = crate::api::router(state.clone())
        .oneshot(request)
        .await
        .map_err(|e| ApiError::internal(format!("{method} {uri}: {e}")))?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .map_err(|e| ApiError::internal(format!("{method} {uri}: {e}")))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorDocument>(&bytes)
            .map(|doc| doc.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        return Err(ApiError::new(status, "template_build_failed", message));
    }
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"null")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("{method} {uri} answered unexpectedly: {e}")))
}

/// The end of a failed command's output, for its error.
fn output_tail(result: &ExecResult) -> String {
    let mut all = String::new();
    for text in [&result.output.stdout, &result.output.stderr]
        .into_iter()
        .flatten()
    {
        all.push_str(text);
    }
    let start = all.len().saturating_sub(LOG_TAIL_BYTES);
    let start = (start..all.len())
        .find(|&i| all.is_char_boundary(i))
        .unwrap_or(all.len());
    all[start..].trim().to_string()
}

fn how_it_ended(result: &ExecResult) -> String {
    match (
        &result.exit.exit_code,
        &result.exit.signal,
        result.exit.timed_out,
    ) {
        (_, _, true) => "timed out".into(),
        (Some(code), _, _) => format!("exit status {code}"),
        (_, Some(signal), _) => format!("killed by signal {signal}"),
        _ => result
            .exit
            .error
            .clone()
            .unwrap_or_else(|| "an unknown end".into()),
    }
}

/// What one step does: run a command (as whom), or write a file.
enum StepAction<'a> {
    Exec(ExecBody),
    Write(&'a CopyFile),
}

fn step_action(step: &TemplateStep) -> StepAction<'_> {
    let sh = |script: String, user: Option<&str>| ExecBody {
        cmd: "sh".into(),
        args: vec!["-c".into(), script, "ember-template".into()],
        user: user.map(str::to_string),
        timeout_s: Some(STEP_TIMEOUT_S),
        ..Default::default()
    };
    let with_args = |mut body: ExecBody, packages: &[String]| {
        body.args.extend(packages.iter().cloned());
        body
    };
    StepAction::Exec(match step {
        TemplateStep::Apt(packages) => with_args(
            sh(
                "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                 --no-install-recommends \"$@\" && apt-get clean"
                    .into(),
                Some("root"),
            ),
            packages,
        ),
        TemplateStep::Pip(packages) => with_args(
            sh(
                "python3 -m pip install --user --no-warn-script-location --progress-bar off \
                 --break-system-packages \"$@\""
                    .into(),
                None,
            ),
            packages,
        ),
        TemplateStep::Npm(packages) => with_args(
            sh("npm install --no-audit --no-fund \"$@\"".into(), None),
            packages,
        ),
        TemplateStep::Run(cmd) => sh(cmd.clone(), None),
        TemplateStep::Copy(copy) => return StepAction::Write(copy),
    })
}

/// A short name of step `n` for errors: `step 2 (pip install requests)`.
fn describe_step(n: usize, step: &TemplateStep) -> String {
    let what = match step {
        TemplateStep::Apt(p) => format!("apt-get install {}", p.join(" ")),
        TemplateStep::Pip(p) => format!("pip install {}", p.join(" ")),
        TemplateStep::Npm(p) => format!("npm install {}", p.join(" ")),
        TemplateStep::Run(cmd) => format!("run {cmd:?}"),
        TemplateStep::Copy(copy) => format!("copy to {}", copy.path),
    };
    let what: String = what.chars().take(120).collect();
    format!("step {n} ({what})")
}

fn step_failed(template: &str, step: &str, result: &ExecResult) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "template_step_failed",
        format!(
            "template {template}: {step} failed with {}; the end of its output:\n{}",
            how_it_ended(result),
            output_tail(result)
        ),
    )
}

/// The sandbox a build works in, deleted when the build ends either way.
struct BuildSandbox {
    state: Arc<AppState>,
    id: String,
}

impl BuildSandbox {
    async fn exec(&self, body: &ExecBody) -> Result<ExecResult, ApiError> {
        call(
            &self.state,
            Method::POST,
            &format!("/sandboxes/{}/exec?wait=true", self.id),
            Some(body),
        )
        .await
    }

    async fn snapshot(&self, name: &str, diff: bool, stop: bool) -> Result<(), ApiError> {
        let body = SnapshotBody {
            name: Some(name.to_string()),
            diff,
            stop,
        };
        let _: SnapshotTaken = call(
            &self.state,
            Method::POST,
            &format!("/sandboxes/{}/snapshots", self.id),
            Some(&body),
        )
        .await?;
        Ok(())
    }

    async fn run_step(
        &self,
        template: &str,
        n: usize,
        step: &TemplateStep,
    ) -> Result<(), ApiError> {
        let label = describe_step(n, step);
        let body = match step_action(step) {
            StepAction::Exec(body) => body,
            StepAction::Write(copy) => return self.write(template, &label, copy).await,
        };
        let result = self
            .exec(&body)
            .await
            .map_err(|e| prefix(e, &format!("template {template}: {label}")))?;
        if result.exit.exit_code != Some(0) {
            return Err(step_failed(template, &label, &result));
        }
        Ok(())
    }

    /// A copy step: the file through `PUT …/files`.
    async fn write(&self, template: &str, label: &str, copy: &CopyFile) -> Result<(), ApiError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&copy.content_base64)
            .map_err(|e| ApiError::bad_request(format!("{label}: {e}")))?;
        let mode = copy.mode.as_deref().unwrap_or("644");
        let uri = format!(
            "/sandboxes/{}/files?path={}&mode={mode}",
            self.id,
            ember_client::encode_query(&copy.path)
        );
        let _: serde_json::Value = call_raw(
            &self.state,
            Method::PUT,
            &uri,
            "application/octet-stream",
            Body::from(bytes),
        )
        .await
        .map_err(|e| prefix(e, &format!("template {template}: {label}")))?;
        Ok(())
    }

    /// Runs `ready` once a second until it succeeds or its time is up.
    async fn wait_ready(&self, template: &str, ready: &ReadyCheck) -> Result<(), ApiError> {
        let limit = Duration::from_secs(ready.timeout_s.unwrap_or(DEFAULT_READY_TIMEOUT_S));
        let started = Instant::now();
        let body = ExecBody {
            cmd: "sh".into(),
            args: vec!["-c".into(), ready.cmd.clone()],
            timeout_s: Some(limit.as_secs().max(1)),
            ..Default::default()
        };
        loop {
            let result = self.exec(&body).await?;
            if result.exit.exit_code == Some(0) {
                return Ok(());
            }
            if started.elapsed() >= limit {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "template_not_ready",
                    format!(
                        "template {template}: the ready command {:?} did not succeed within \
                         {limit:?} (last: {}); the end of its output:\n{}",
                        ready.cmd,
                        how_it_ended(&result),
                        output_tail(&result)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn delete(&self) {
        let _: Result<serde_json::Value, _> = call::<(), _>(
            &self.state,
            Method::DELETE,
            &format!("/sandboxes/{}", self.id),
            None,
        )
        .await;
    }
}

fn prefix(mut error: ApiError, context: &str) -> ApiError {
    error.message = format!("{context}: {}", error.message);
    error
}

/// Builds template `body.name`.
async fn build(state: &Arc<AppState>, body: &TemplateBody) -> Result<TemplateInfo, ApiError> {
    let started = Instant::now();
    let image = state
        .config
        .runtimes
        .choose(body.runtime.as_deref(), None)?;
    let (step_names, final_name) = step_snapshots(&image.info.runtime, &image.info.key, body);
    let exists = |name: &str| state.store.load_manifest(name).is_ok();
    let finish = |steps_cached: usize| TemplateInfo {
        name: body.name.clone(),
        runtime: image.info.runtime.clone(),
        steps: body.steps.clone(),
        ready: body.ready.clone(),
        snapshot: final_name.clone(),
        built_unix_ms: crate::sandbox::unix_ms(),
        build_ms: started.elapsed().as_secs_f64() * 1e3,
        steps_cached,
    };
    if exists(&final_name) {
        return Ok(finish(body.steps.len()));
    }
    let done = step_names
        .iter()
        .rposition(|name| exists(name))
        .map_or(0, |i| i + 1);
    // Installs need the network; only a service that can make namespaces gives one.
    let network = state.config.jail.is_some().then(NetworkMode::open_egress);
    let create = CreateBody {
        runtime: (done == 0).then(|| image.info.runtime.clone()),
        snapshot: (done > 0).then(|| step_names[done - 1].clone()),
        network,
        timeout_s: Some(crate::MAX_TIMEOUT_S),
        ..Default::default()
    };
    let sandbox: SandboxInfo = call(state, Method::POST, "/sandboxes", Some(&create))
        .await
        .map_err(|e| prefix(e, &format!("template {}: starting its sandbox", body.name)))?;
    let builder = BuildSandbox {
        state: state.clone(),
        id: sandbox.id,
    };
    let result = async {
        for (n, step) in body.steps.iter().enumerate().skip(done) {
            builder.run_step(&body.name, n + 1, step).await?;
            // A diff from the second snapshot on: the first of a booted sandbox is whole.
            let diff = n > 0 || done > 0;
            builder.snapshot(&step_names[n], diff, false).await?;
        }
        if let Some(ready) = &body.ready {
            builder.wait_ready(&body.name, ready).await?;
        }
        builder
            .snapshot(&final_name, !body.steps.is_empty() || done > 0, true)
            .await
    }
    .await;
    builder.delete().await;
    result?;
    Ok(finish(done))
}

#[utoipa::path(post, path = "/templates", tag = "templates", operation_id = "create_template",
    request_body = TemplateBody,
    responses(
        (status = 201, description = "Built (or found built: every step cached)", body = TemplateInfo),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such runtime", body = ErrorDocument),
        (status = 409, description = "The template is being built by another request", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 422, description = "A step failed or the ready command never succeeded: the error names it and quotes the end of its output", body = ErrorDocument),
        (status = 429, description = "The service runs as many sandboxes as it may", body = ErrorDocument),
        (status = 500, description = "The build's sandbox or a snapshot failed", body = ErrorDocument),
        (status = 502, description = "The sandbox's VMM did not answer", body = ErrorDocument)))]
/// `POST /templates`: boots the runtime (or restores the deepest step an earlier build kept),
/// runs the rest of the steps and the ready command, and snapshots it.
pub async fn create(
    State(state): State<Arc<AppState>>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: TemplateBody = parse_body(body)?;
    check(&body)?;
    let Some(_guard) = state.templates.claim(&body.name) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "template_building",
            format!("template {} is being built by another request", body.name),
        ));
    };
    let info = build(&state, &body).await?;
    save(&state, &info)?;
    log::info!(
        "template {} built in {:.0} ms ({} of {} steps cached)",
        info.name,
        info.build_ms,
        info.steps_cached,
        info.steps.len()
    );
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

#[utoipa::path(get, path = "/templates", tag = "templates", operation_id = "list_templates",
    responses((status = 200, description = "Every built template, by name", body = TemplateList)))]
/// `GET /templates`
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut templates = Vec::new();
    let entries = match std::fs::read_dir(templates_dir(&state)) {
        Ok(entries) => entries.flatten().collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ApiError::internal(format!("listing templates: {e}"))),
    };
    for entry in entries {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
            templates.push(find(&state, name)?);
        }
    }
    templates.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(axum::Json(TemplateList { templates }).into_response())
}

/// The `{name}` of a template in a path.
#[derive(utoipa::IntoParams)]
#[into_params(names("name"), parameter_in = Path)]
#[allow(dead_code)] // Only describes the parameter.
pub struct TemplateName(String);

#[utoipa::path(get, path = "/templates/{name}", tag = "templates", operation_id = "get_template", params(TemplateName),
    responses(
        (status = 200, description = "The template", body = TemplateInfo),
        (status = 404, description = "No such template", body = ErrorDocument)))]
/// `GET /templates/{name}`
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(find(&state, &name)?).into_response())
}

#[utoipa::path(delete, path = "/templates/{name}", tag = "templates", operation_id = "delete_template", params(TemplateName),
    responses(
        (status = 204, description = "Forgotten (its snapshots stay, for rebuilds and running sandboxes)"),
        (status = 404, description = "No such template", body = ErrorDocument)))]
/// `DELETE /templates/{name}`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    find(&state, &name)?;
    let path = templates_dir(&state).join(format!("{name}.json"));
    std::fs::remove_file(&path)
        .map_err(|e| ApiError::internal(format!("removing {}: {e}", path.display())))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(steps: Vec<TemplateStep>) -> TemplateBody {
        TemplateBody {
            name: "t".into(),
            runtime: None,
            steps,
            ready: None,
        }
    }

    #[test]
    fn step_snapshots_share_a_prefix_and_follow_every_input() {
        let one = body(vec![
            TemplateStep::Apt(vec!["jq".into()]),
            TemplateStep::Run("make".into()),
        ]);
        let mut two = one.clone();
        two.steps[1] = TemplateStep::Run("make all".into());
        let (a, a_final) = step_snapshots("node22", "k1", &one);
        let (b, b_final) = step_snapshots("node22", "k1", &two);
        assert_eq!(a[0], b[0], "the unchanged first step is shared");
        assert_ne!(a[1], b[1]);
        assert_ne!(a_final, b_final);
        let (c, _) = step_snapshots("node22", "k2", &one);
        assert_ne!(a[0], c[0], "another image is another start");
        let mut ready = one.clone();
        ready.ready = Some(ReadyCheck {
            cmd: "true".into(),
            timeout_s: None,
        });
        let (d, d_final) = step_snapshots("node22", "k1", &ready);
        assert_eq!(a, d, "the ready check comes after every step");
        assert_ne!(a_final, d_final);
        assert!(a
            .iter()
            .all(|n| ember_snapshot_store::validate_id(n).is_ok()));
    }

    #[test]
    fn requests_the_build_would_fail_on_are_refused_first() {
        let copy = |path: &str, content: &str| {
            TemplateStep::Copy(ember_client::templates::CopyFile {
                path: path.into(),
                content_base64: content.into(),
                mode: None,
            })
        };
        for (steps, says) in [
            (vec![TemplateStep::Pip(vec![])], "1 to"),
            (
                vec![TemplateStep::Npm(vec!["--global".into()])],
                "not start with `-`",
            ),
            (vec![TemplateStep::Run(String::new())], "non-empty"),
            (vec![copy("relative", "MQ==")], "absolute"),
            (vec![copy("/x", "not base64!")], "base64"),
        ] {
            let err = check(&body(steps)).unwrap_err();
            assert!(err.message.contains(says), "{}", err.message);
        }
        let mut bad_name = body(vec![]);
        bad_name.name = "../x".into();
        assert!(check(&bad_name).is_err());
        assert!(check(&body(vec![copy("/home/user/a.txt", "MQ==")])).is_ok());
    }

    #[test]
    fn step_commands_pass_packages_as_arguments_not_shell_text() {
        let exec = |step: &TemplateStep| match step_action(step) {
            StepAction::Exec(body) => body,
            StepAction::Write(_) => panic!("{step:?} writes a file"),
        };
        let step = TemplateStep::Pip(vec!["requests==2.32.3".into(), "a;b".into()]);
        let body = exec(&step);
        assert_eq!(body.cmd, "sh");
        assert_eq!(&body.args[3..], ["requests==2.32.3", "a;b"]);
        assert!(body.args[1].contains("\"$@\""));
        assert_eq!(
            exec(&TemplateStep::Apt(vec!["jq".into()])).user.as_deref(),
            Some("root")
        );
    }
}
