//! Commands in a sandbox: streamed (NDJSON), waited for (one JSON document), or detached
//! (status and logs later, killable).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use ember_agent::client::{AgentClient, ClientError, OutputStream};
use ember_agent::protocol::{ExecRequest, ExitStatus};
use ember_client::responses::{
    CommandExit, CommandInfo, CommandList, CommandOutput, CommandStatus, ExecResult, Killed,
    OutputRecord,
};
use ember_client::types::ErrorDocument;
use ember_client::types::{ExecBody, ExecQuery, KillBody};

use super::error::{from_agent, ApiError};
use super::sandbox::Sandbox;
use super::{parse_body, parse_query, AppState, JsonBody, QueryResult};
use ember_sandbox::control::ControlRequest;

pub mod logs;
pub use logs::command_logs;
use logs::OutputLog;

/// Output a `?wait=true` answer carries per stream.
const WAIT_OUTPUT_LIMIT: usize = 64 << 20;
/// The largest `stdin` an exec request may carry.
pub(crate) const MAX_STDIN: usize = 1 << 20;
pub(crate) const MAX_ARGS: usize = 4096;
pub(crate) const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// Finished commands kept per sandbox (the oldest go first).
const KEEP_FINISHED: usize = 256;

/// Adds `record` to the sandbox's commands, forgetting the oldest finished ones beyond
/// [`KEEP_FINISHED`].
fn remember(sandbox: &Sandbox, record: &Arc<CommandRecord>) {
    let mut commands = sandbox.commands.lock().unwrap_or_else(|p| p.into_inner());
    if commands.len() >= KEEP_FINISHED {
        let mut finished: Vec<_> = commands
            .values()
            .filter(|c| c.finished())
            .map(|c| (c.started, c.id.clone()))
            .collect();
        finished.sort();
        for (_, old) in finished.iter().take(commands.len() + 1 - KEEP_FINISHED) {
            commands.remove(old);
        }
    }
    commands.insert(record.id.clone(), record.clone());
}

/// One command's record: what `GET …/commands/{cid}` shows.
pub struct CommandRecord {
    /// Woken once the command has finished (its exit is recorded).
    pub done: tokio::sync::Notify,
    /// Woken on each piece of output and at the end.
    progress: tokio::sync::Notify,
    pub id: String,
    pub argv: Vec<String>,
    pub started: Instant,
    pub started_unix_ms: u64,
    inner: Mutex<CommandInner>,
    agent: Arc<AgentClient>,
}

struct CommandInner {
    exec_id: Option<u64>,
    pid: Option<u32>,
    exit: Option<Result<ExitStatus, Arc<ClientError>>>,
    duration_ms: Option<f64>,
    output: OutputLog,
}

impl CommandRecord {
    /// Returns once the command has finished.
    pub async fn finished_signal(&self) {
        loop {
            // Created before the check, so a finish in between still wakes it.
            let notified = self.done.notified();
            if self.finished() {
                return;
            }
            notified.await;
        }
    }

    /// The command as the API shows it, with the output kept if `with_output`.
    fn info(&self, with_output: bool) -> CommandInfo {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let output = if with_output {
            command_output(
                &inner.output.stream(OutputStream::Stdout),
                &inner.output.stream(OutputStream::Stderr),
            )
        } else {
            CommandOutput::default()
        };
        CommandInfo {
            cmd_id: self.id.clone(),
            argv: self.argv.clone(),
            pid: inner.pid,
            started_unix_ms: self.started_unix_ms,
            status: if inner.exit.is_some() {
                CommandStatus::Finished
            } else {
                CommandStatus::Running
            },
            duration_ms: inner.duration_ms,
            exit: inner.exit.as_ref().map(command_exit).unwrap_or_default(),
            output,
            stdout_dropped_bytes: inner.output.dropped(OutputStream::Stdout),
            stderr_dropped_bytes: inner.output.dropped(OutputStream::Stderr),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).pid
    }

    /// The output kept from chunk `next` on, the number after it, and the exit once the
    /// command has ended (all its output is in the log by then).
    fn output_since(&self, next: u64) -> (Vec<(OutputStream, Bytes)>, u64, Option<EndOfCommand>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (chunks, next) = inner.output.since(next);
        let end = inner
            .exit
            .clone()
            .map(|exit| (exit, inner.duration_ms.unwrap_or_default()));
        (chunks, next, end)
    }

    fn log_output(&self, stream: OutputStream, data: &[u8]) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .output
            .push(stream, data);
        self.progress.notify_waiters();
    }

    pub(crate) fn finished(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exit
            .is_some()
    }
}

/// How a command ended and how long it ran, in milliseconds.
type EndOfCommand = (Result<ExitStatus, Arc<ClientError>>, f64);

/// How a command ended (or that the agent could not say).
fn command_exit(exit: &Result<ExitStatus, Arc<ClientError>>) -> CommandExit {
    let (exit_code, signal, timed_out, error) = match exit {
        Ok(ExitStatus::Code(code)) => (Some(*code), None, false, None),
        Ok(ExitStatus::Signal(signal)) => (None, Some(*signal), false, None),
        Ok(ExitStatus::TimedOut) => (None, None, true, None),
        Err(e) => (None, None, false, Some(e.to_string())),
    };
    CommandExit {
        exit_code,
        signal,
        timed_out,
        error,
    }
}

/// Each stream as text when it is UTF-8, else as base64.
fn command_output(stdout: &[u8], stderr: &[u8]) -> CommandOutput {
    let (stdout, stdout_base64) = text_or_base64(stdout);
    let (stderr, stderr_base64) = text_or_base64(stderr);
    CommandOutput {
        stdout,
        stdout_base64,
        stderr,
        stderr_base64,
    }
}

/// `(Some(text), None)` when the bytes are UTF-8, else `(None, Some(base64))`.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_string()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// Splits a byte stream into chunks that end on UTF-8 character boundaries where it can, so
/// text never turns into base64 only because a read cut a character in two.
#[derive(Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// The bytes ready to send: everything except an incomplete character at the end.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let cut = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end (at most 3 bytes) waits for the rest.
            Err(e) if e.error_len().is_none() && self.pending.len() - e.valid_up_to() < 4 => {
                e.valid_up_to()
            }
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(cut);
        std::mem::replace(&mut self.pending, rest)
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

/// One NDJSON record of output.
fn output_line(stream: OutputStream, data: &[u8]) -> Bytes {
    let (data, data_base64) = text_or_base64(data);
    ndjson(&match stream {
        OutputStream::Stdout => OutputRecord::Stdout { data, data_base64 },
        OutputStream::Stderr => OutputRecord::Stderr { data, data_base64 },
    })
}

/// The NDJSON record of a command's end.
fn exit_line(exit: &Result<ExitStatus, Arc<ClientError>>, duration_ms: f64) -> Bytes {
    let exit = command_exit(exit);
    ndjson(&OutputRecord::Exit {
        exit_code: exit.exit_code,
        signal: exit.signal,
        timed_out: exit.timed_out,
        error: exit.error,
        duration_ms,
    })
}

fn ndjson(record: &OutputRecord) -> Bytes {
    let mut line = serde_json::to_vec(record).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Checks the request and turns it into the agent's.
pub(crate) fn exec_request(sandbox: &Sandbox, body: &ExecBody) -> Result<ExecRequest, ApiError> {
    if body.cmd.is_empty() || body.cmd.contains('\0') {
        return Err(ApiError::bad_request(
            "`cmd` must be a non-empty string without NUL",
        ));
    }
    if body.args.len() > MAX_ARGS || body.args.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request(format!(
            "`args` must hold at most {MAX_ARGS} strings without NUL"
        )));
    }
    if let Some(cwd) = &body.cwd {
        super::files::check_guest_path(cwd)?;
    }
    let stdin = match (&body.stdin, &body.stdin_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `stdin` or `stdin_base64`, not both",
            ))
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ApiError::bad_request(format!("`stdin_base64` is not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    if stdin.len() > MAX_STDIN {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("stdin is {} bytes; at most {MAX_STDIN}", stdin.len()),
        ));
    }
    let timeout_ms = match body.timeout_s {
        Some(0) => return Err(ApiError::bad_request("`timeout_s` must be at least 1")),
        Some(t) if t > MAX_TIMEOUT_S => {
            return Err(ApiError::bad_request(format!(
                "`timeout_s` must be at most {MAX_TIMEOUT_S}"
            )))
        }
        Some(t) => Some(t * 1000),
        None => None,
    };
    let record = sandbox.record();
    let image = record
        .runtime
        .unwrap_or_else(ember_client::images::RuntimeImage::base);
    let user = body.user.as_deref().unwrap_or(&image.user);
    let plain = user.len() <= 32
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if !plain {
        return Err(ApiError::bad_request(format!(
            "`user` must be a user name (lowercase letters, digits, `_`, `-`), not {user:?}"
        )));
    }
    let (uid, gid) = image.ids_of(user).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_such_user",
            format!(
                "the {} runtime runs commands as `root` or `{}`, not {user:?}",
                image.runtime, image.user
            ),
        )
    })?;
    let mut env = command_env(&image, user);
    env.extend(record.env);
    for (k, v) in &body.env {
        super::check_env(k, v)?;
        env.insert(k.clone(), v.clone());
    }
    let mut argv = vec![body.cmd.clone()];
    argv.extend(body.args.iter().cloned());
    Ok(ExecRequest {
        argv,
        env: env.into_iter().collect(),
        cwd: Some(body.cwd.clone().unwrap_or(image.workdir)),
        uid: (uid != 0).then_some(uid),
        gid: (uid != 0).then_some(gid),
        stdin,
        timeout_ms,
        ..Default::default()
    })
}

/// The environment a command of `user` starts from in `image`: the image's (the agent's
/// defaults where it has none), with root's home and name when root runs in an image whose
/// commands are a user's.
fn command_env(image: &ember_client::images::RuntimeImage, user: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = if image.env.is_empty() {
        ember_agent::protocol::DEFAULT_COMMAND_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    } else {
        image.env.clone()
    };
    if user == "root" && image.user != "root" {
        env.insert("HOME".into(), "/root".into());
        for name in ["USER", "LOGNAME"] {
            if env.contains_key(name) {
                env.insert(name.into(), "root".into());
            }
        }
    }
    env
}

#[utoipa::path(post, path = "/sandboxes/{id}/exec", tag = "commands",
    params(crate::api::SandboxId, ExecQuery),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command's output as it runs, one record per line (a `started` record, `stdout`/`stderr` records, then an `exit` record); with `?wait=true` one document when it ends",
            content((OutputRecord = "application/x-ndjson"), (ExecResult = "application/json"))),
        (status = 202, description = "Detached: the command runs; its record", body = CommandInfo),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such sandbox, or no such command in the guest", body = ErrorDocument),
        (status = 409, description = "The sandbox is not running", body = ErrorDocument),
        (status = 413, description = "Request body or stdin too large", body = ErrorDocument),
        (status = 502, description = "The guest's agent is unreachable", body = ErrorDocument)))]
/// `POST /sandboxes/{id}/exec`
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<ExecQuery>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    let body: ExecBody = parse_body(body)?;
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let request = exec_request(&sandbox, &body)?;
    state.metrics.execs.fetch_add(1, Ordering::Relaxed);
    // A connection the guest closes before the command started is made again, once: now and
    // then a restored guest's first connection is closed by the guest just after its hello
    // (seen once in the lab's CI, not reproduced in 32 restores since). Nothing ran on it:
    // the agent kills what a connection started when that connection ends.
    let mut attempts = 0;
    let (record, rx) = loop {
        attempts += 1;
        let agent = sandbox.agent().await?;
        let record = Arc::new(CommandRecord {
            done: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
            id: sandbox.next_command_id(),
            argv: request.argv.clone(),
            started: Instant::now(),
            started_unix_ms: super::sandbox::unix_ms(),
            inner: Mutex::new(CommandInner {
                exec_id: None,
                pid: None,
                exit: None,
                duration_ms: None,
                output: OutputLog::default(),
            }),
            agent: agent.clone(),
        });
        remember(&sandbox, &record);
        // The command runs on a blocking thread (the agent client is synchronous); output
        // comes to this task through a bounded channel, which is what slows the guest down
        // when the HTTP client reads slowly.
        let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
        let started = {
            let record = record.clone();
            let request = request.clone();
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let turn = sandbox.agent_turn().await?;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                run_command(&agent, request, &record, tx, started_tx)
            });
            started_rx
        };
        match started.await {
            Ok(Ok(())) => break (record, rx),
            Ok(Err(e)) => {
                sandbox
                    .commands
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&record.id);
                if !matches!(e, ClientError::Remote(_)) {
                    sandbox.forget_agent().await;
                }
                if attempts == 1 && matches!(e, ClientError::Disconnected(_)) {
                    log::warn!(
                        "sandbox {}: starting {:?}: {e}; connecting to the agent again",
                        sandbox.id,
                        body.cmd
                    );
                    continue;
                }
                return Err(from_agent(&format!("starting {:?}", body.cmd), e));
            }
            Err(_) => return Err(ApiError::internal("the command thread ended")),
        }
    };
    if !sandbox.first_exec_done.load(Ordering::SeqCst) {
        sandbox.note(|r| r.timeline.mark("first_exec_started"));
        // The first command's end completes the start's timeline and, after a restore,
        // marks the working set to record.
        let sandbox = sandbox.clone();
        let record = record.clone();
        let store = state.store.clone();
        let remote = state.remote.clone();
        tokio::spawn(async move {
            record.finished_signal().await;
            if !sandbox.first_exec_done.swap(true, Ordering::SeqCst) {
                sandbox.note(|r| r.timeline.mark("first_exec_ended"));
                if let Some(snapshot) = sandbox.restored_from() {
                    let recorded = sandbox
                        .control(ControlRequest::RecordWorkingSet, Duration::from_secs(60))
                        .await;
                    if recorded.is_ok() {
                        crate::ingest::working_set(&store, remote.as_ref(), &sandbox, &snapshot)
                            .await;
                    }
                }
            }
        });
    }

    if body.detach {
        let info = record.info(true);
        return Ok((StatusCode::ACCEPTED, axum::Json(info)).into_response());
    }
    if query.wait {
        return Ok(axum::Json(collect(rx, &record).await).into_response());
    }
    let head = ndjson(&OutputRecord::Started {
        cmd_id: record.id.clone(),
        pid: record.inner.lock().unwrap_or_else(|p| p.into_inner()).pid,
    });
    let stream = futures_util::stream::unfold((rx, Some(head)), |(mut rx, head)| async move {
        if let Some(head) = head {
            return Some((Ok::<Bytes, std::io::Error>(head), (rx, None)));
        }
        let line = match rx.recv().await? {
            Event::Output(stream, data) => output_line(stream, &data),
            Event::Exit(exit, duration_ms) => exit_line(&exit, duration_ms),
        };
        Some((Ok(line), (rx, None)))
    });
    Ok(crate::api::ndjson_response(stream))
}

enum Event {
    Output(OutputStream, Vec<u8>),
    Exit(Result<ExitStatus, Arc<ClientError>>, f64),
}

/// Runs one command to its end on this (blocking) thread.
fn run_command(
    agent: &AgentClient,
    request: ExecRequest,
    record: &CommandRecord,
    tx: tokio::sync::mpsc::Sender<Event>,
    started: tokio::sync::oneshot::Sender<Result<(), ClientError>>,
) {
    let execution = match agent.spawn(request) {
        Ok(execution) => execution,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    {
        let mut inner = record.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.exec_id = Some(execution.id());
        inner.pid = Some(execution.pid());
    }
    let _ = started.send(Ok(()));
    let mut chunkers = [Utf8Chunker::default(), Utf8Chunker::default()];
    // Once the HTTP client is gone the command still runs to its end (its logs stay).
    let mut listening = true;
    let forward = |stream: OutputStream, data: Vec<u8>, listening: &mut bool| {
        if *listening && !data.is_empty() && tx.blocking_send(Event::Output(stream, data)).is_err()
        {
            *listening = false;
        }
    };
    // The log keeps what the stream sends (whole characters), in the same order.
    let status = execution.wait(|stream, data| {
        let index = usize::from(stream == OutputStream::Stderr);
        let ready = chunkers[index].push(data);
        record.log_output(stream, &ready);
        forward(stream, ready, &mut listening);
    });
    for (index, stream) in [(0, OutputStream::Stdout), (1, OutputStream::Stderr)] {
        let rest = chunkers[index].finish();
        record.log_output(stream, &rest);
        forward(stream, rest, &mut listening);
    }
    let exit = status.map_err(Arc::new);
    let duration_ms = record.started.elapsed().as_secs_f64() * 1e3;
    {
        let mut inner = record.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.exit = Some(exit.clone());
        inner.duration_ms = Some(duration_ms);
    }
    record.done.notify_waiters();
    record.progress.notify_waiters();
    if listening {
        let _ = tx.blocking_send(Event::Exit(exit, duration_ms));
    }
}

/// `?wait=true`: the whole output and the exit in one document.
async fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>, record: &CommandRecord) -> ExecResult {
    let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut truncated = [false, false];
    let (mut exit, mut duration) = (None, None);
    while let Some(event) = rx.recv().await {
        match event {
            Event::Output(stream, data) => {
                let i = usize::from(stream == OutputStream::Stderr);
                let room = WAIT_OUTPUT_LIMIT.saturating_sub(out[i].len());
                truncated[i] |= data.len() > room;
                out[i].extend_from_slice(&data[..data.len().min(room)]);
            }
            Event::Exit(status, duration_ms) => {
                exit = Some(command_exit(&status));
                duration = Some(duration_ms);
            }
        }
    }
    ExecResult {
        cmd_id: record.id.clone(),
        exit: exit.unwrap_or_else(|| CommandExit {
            error: Some("the command's end was not reported".into()),
            ..Default::default()
        }),
        duration_ms: duration,
        output: command_output(&out[0], &out[1]),
        stdout_truncated: truncated[0],
        stderr_truncated: truncated[1],
    }
}

/// The `{cid}` of a command in a path.
#[derive(utoipa::IntoParams)]
#[into_params(names("cid"), parameter_in = Path)]
#[allow(dead_code)] // Only describes the parameter.
pub struct CommandId(String);

fn command(sandbox: &Sandbox, cid: &str) -> Result<Arc<CommandRecord>, ApiError> {
    sandbox
        .commands
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(cid)
        .cloned()
        .ok_or_else(|| ApiError::not_found("command", cid))
}

#[utoipa::path(get, path = "/sandboxes/{id}/commands", tag = "commands",
    params(crate::api::SandboxId),
    responses(
        (status = 200, description = "Its commands, oldest first, without their output", body = CommandList),
        (status = 404, description = "No such sandbox", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/commands`
pub async fn list_commands(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let mut commands: Vec<Arc<CommandRecord>> = sandbox
        .commands
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    commands.sort_by_key(|c| c.started);
    let commands = commands.iter().map(|c| c.info(false)).collect();
    Ok(axum::Json(CommandList { commands }).into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/commands/{cid}", tag = "commands",
    params(crate::api::SandboxId, CommandId),
    responses(
        (status = 200, description = "The command and the output kept", body = CommandInfo),
        (status = 404, description = "No such sandbox or command", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/commands/{cid}`
pub async fn get_command(
    State(state): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    Ok(axum::Json(command(&sandbox, &cid)?.info(true)).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/commands/{cid}/kill", tag = "commands",
    params(crate::api::SandboxId, CommandId),
    request_body(content = Option<KillBody>, description = "The signal (default SIGKILL)"),
    responses(
        (status = 200, description = "The signal was sent", body = Killed),
        (status = 400, description = "Malformed JSON, unknown field or invalid signal", body = ErrorDocument),
        (status = 404, description = "No such sandbox or command", body = ErrorDocument),
        (status = 409, description = "The sandbox is not running, or the command has finished", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 502, description = "The guest's agent is unreachable", body = ErrorDocument)))]
/// `POST /sandboxes/{id}/commands/{cid}/kill`
pub async fn kill_command(
    State(state): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    // No body (or `null`) is the default signal: parse_body reads it as `{}`.
    let body: KillBody = parse_body(body)?;
    let signal = body.signal.unwrap_or(libc::SIGKILL);
    if !(1..=64).contains(&signal) {
        return Err(ApiError::bad_request(format!(
            "signal {signal} is not between 1 and 64"
        )));
    }
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let record = command(&sandbox, &cid)?;
    let exec_id = {
        let inner = record.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.exit.is_some() {
            return Err(ApiError::conflict(format!(
                "command {cid} has already finished"
            )));
        }
        inner.exec_id
    };
    let Some(exec_id) = exec_id else {
        return Err(ApiError::conflict(format!("command {cid} has not started")));
    };
    let agent = record.agent.clone();
    tokio::task::spawn_blocking(move || agent.kill(exec_id, signal))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| from_agent(&format!("killing command {cid}"), e))?;
    Ok(axum::Json(Killed {
        cmd_id: cid,
        signal,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunker_keeps_characters_whole() {
        let text = "héllo wörld €".as_bytes();
        for split in 0..text.len() {
            let mut c = Utf8Chunker::default();
            let mut out = c.push(&text[..split]);
            assert!(std::str::from_utf8(&out).is_ok(), "split {split}");
            out.extend(c.push(&text[split..]));
            out.extend(c.finish());
            assert_eq!(out, text);
        }
        // Bytes that are not UTF-8 at all pass through at once.
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(&[0xff, 0xfe]), vec![0xff, 0xfe]);
    }

    #[test]
    fn output_lines_are_text_or_base64() {
        let line = output_line(OutputStream::Stdout, b"hi\n");
        assert_eq!(&line[..], b"{\"type\":\"stdout\",\"data\":\"hi\\n\"}\n");
        let line = output_line(OutputStream::Stderr, &[0xff]);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "stderr");
        assert_eq!(v["data_base64"], "/w==");
    }

    #[test]
    fn exit_records() {
        assert_eq!(command_exit(&Ok(ExitStatus::Code(3))).exit_code, Some(3));
        assert_eq!(command_exit(&Ok(ExitStatus::Signal(9))).signal, Some(9));
        assert!(command_exit(&Ok(ExitStatus::TimedOut)).timed_out);
        let gone = ClientError::Disconnected("agent gone".into());
        let lost = command_exit(&Err(Arc::new(gone)));
        assert_eq!(lost.exit_code, None);
        assert!(lost.error.is_some_and(|e| e.contains("agent gone")));
    }
}
