//! Commands in a sandbox: streamed (NDJSON), waited for (one JSON document), or detached
//! (status and logs later, killable).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use ember_agent::client::{AgentClient, ClientError, OutputStream};
use ember_agent::protocol::{ExecRequest, ExitStatus};
use ember_client::types::{ExecBody, ExecQuery, KillBody};
use serde_json::{json, Value};

use super::error::{from_agent, ApiError};
use super::sandbox::Sandbox;
use super::{parse_body, AppState, JsonBody};
use ember_sandbox::control::ControlRequest;

/// Output kept per command for `GET …/commands/{cid}` (the newest bytes win).
const LOG_LIMIT: usize = 4 << 20;
/// Output a `?wait=true` answer carries per stream.
const WAIT_OUTPUT_LIMIT: usize = 64 << 20;
/// The largest `stdin` an exec request may carry.
const MAX_STDIN: usize = 1 << 20;
const MAX_ARGS: usize = 4096;
const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
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
    exit: Option<Result<ExitStatus, String>>,
    duration_ms: Option<f64>,
    stdout: Log,
    stderr: Log,
}

/// The newest `LOG_LIMIT` bytes of a stream, and how many older ones were dropped.
#[derive(Default)]
struct Log {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl Log {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(LOG_LIMIT);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }
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

    fn to_json(&self) -> Value {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = json!({
            "cmd_id": self.id,
            "argv": self.argv,
            "pid": inner.pid,
            "started_unix_ms": self.started_unix_ms,
            "status": if inner.exit.is_some() { "finished" } else { "running" },
            "duration_ms": inner.duration_ms,
        });
        if let Some(exit) = &inner.exit {
            merge(&mut out, exit_json(exit));
        }
        for (name, log) in [("stdout", &inner.stdout), ("stderr", &inner.stderr)] {
            let bytes: Vec<u8> = log.bytes.iter().copied().collect();
            merge(&mut out, text_or_base64(name, &bytes));
            out[format!("{name}_dropped_bytes")] = json!(log.dropped);
        }
        out
    }

    fn finished(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exit
            .is_some()
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// `{"exit_code": …, "signal": …, "timed_out": …}` (or `"error"` when the agent failed).
fn exit_json(exit: &Result<ExitStatus, String>) -> Value {
    match exit {
        Ok(ExitStatus::Code(code)) => {
            json!({"exit_code": code, "signal": null, "timed_out": false})
        }
        Ok(ExitStatus::Signal(signal)) => {
            json!({"exit_code": null, "signal": signal, "timed_out": false})
        }
        Ok(ExitStatus::TimedOut) => json!({"exit_code": null, "signal": null, "timed_out": true}),
        Err(e) => json!({"exit_code": null, "signal": null, "timed_out": false, "error": e}),
    }
}

/// `{name: text}` when the bytes are UTF-8, else `{name_base64: …}`.
fn text_or_base64(name: &str, bytes: &[u8]) -> Value {
    let mut map = serde_json::Map::new();
    match std::str::from_utf8(bytes) {
        Ok(text) => map.insert(name.to_string(), json!(text)),
        Err(_) => map.insert(
            format!("{name}_base64"),
            json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
    Value::Object(map)
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
    let name = match stream {
        OutputStream::Stdout => "stdout",
        OutputStream::Stderr => "stderr",
    };
    let record = match std::str::from_utf8(data) {
        Ok(text) => json!({"type": name, "data": text}),
        Err(_) => json!({
            "type": name,
            "data_base64": base64::engine::general_purpose::STANDARD.encode(data),
        }),
    };
    ndjson(&record)
}

fn ndjson(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Checks the request and turns it into the agent's.
fn exec_request(sandbox: &Sandbox, body: &ExecBody) -> Result<ExecRequest, ApiError> {
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
    let mut env: BTreeMap<String, String> = ember_agent::protocol::DEFAULT_COMMAND_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(sandbox.record().env);
    for (k, v) in &body.env {
        super::check_env(k, v)?;
        env.insert(k.clone(), v.clone());
    }
    let mut argv = vec![body.cmd.clone()];
    argv.extend(body.args.iter().cloned());
    Ok(ExecRequest {
        argv,
        env: env.into_iter().collect(),
        cwd: body.cwd.clone(),
        stdin,
        timeout_ms,
        ..Default::default()
    })
}

/// `POST /sandboxes/{id}/exec`
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<ExecQuery>,
    body: JsonBody,
) -> Result<Response, ApiError> {
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
            id: sandbox.next_command_id(),
            argv: request.argv.clone(),
            started: Instant::now(),
            started_unix_ms: super::sandbox::unix_ms(),
            inner: Mutex::new(CommandInner {
                exec_id: None,
                pid: None,
                exit: None,
                duration_ms: None,
                stdout: Log::default(),
                stderr: Log::default(),
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
        let json = record.to_json();
        return Ok((StatusCode::ACCEPTED, axum::Json(json)).into_response());
    }
    if query.wait {
        return Ok(axum::Json(collect(rx, &record).await).into_response());
    }
    let head = ndjson(&json!({
        "type": "started",
        "cmd_id": record.id,
        "pid": record.inner.lock().unwrap_or_else(|p| p.into_inner()).pid,
    }));
    let stream = futures_util::stream::unfold((rx, Some(head)), |(mut rx, head)| async move {
        if let Some(head) = head {
            return Some((Ok::<Bytes, std::io::Error>(head), (rx, None)));
        }
        let line = match rx.recv().await? {
            Event::Output(stream, data) => output_line(stream, &data),
            Event::Exit(exit, duration_ms) => {
                let mut record = exit_json(&exit);
                merge(
                    &mut record,
                    json!({"type": "exit", "duration_ms": duration_ms}),
                );
                ndjson(&record)
            }
        };
        Some((Ok(line), (rx, None)))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

enum Event {
    Output(OutputStream, Vec<u8>),
    Exit(Result<ExitStatus, String>, f64),
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
    let status = execution.wait(|stream, data| {
        {
            let mut inner = record.inner.lock().unwrap_or_else(|p| p.into_inner());
            match stream {
                OutputStream::Stdout => inner.stdout.push(data),
                OutputStream::Stderr => inner.stderr.push(data),
            }
        }
        let index = usize::from(stream == OutputStream::Stderr);
        let ready = chunkers[index].push(data);
        forward(stream, ready, &mut listening);
    });
    for (index, stream) in [(0, OutputStream::Stdout), (1, OutputStream::Stderr)] {
        let rest = chunkers[index].finish();
        forward(stream, rest, &mut listening);
    }
    let exit = status.map_err(|e| e.to_string());
    let duration_ms = record.started.elapsed().as_secs_f64() * 1e3;
    {
        let mut inner = record.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.exit = Some(exit.clone());
        inner.duration_ms = Some(duration_ms);
    }
    record.done.notify_waiters();
    if listening {
        let _ = tx.blocking_send(Event::Exit(exit, duration_ms));
    }
}

/// `?wait=true`: the whole output and the exit in one document.
async fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>, record: &CommandRecord) -> Value {
    let mut out: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut truncated = [false, false];
    let mut result = json!({"cmd_id": record.id});
    while let Some(event) = rx.recv().await {
        match event {
            Event::Output(stream, data) => {
                let i = usize::from(stream == OutputStream::Stderr);
                let room = WAIT_OUTPUT_LIMIT.saturating_sub(out[i].len());
                truncated[i] |= data.len() > room;
                out[i].extend_from_slice(&data[..data.len().min(room)]);
            }
            Event::Exit(exit, duration_ms) => {
                merge(&mut result, exit_json(&exit));
                result["duration_ms"] = json!(duration_ms);
            }
        }
    }
    merge(&mut result, text_or_base64("stdout", &out[0]));
    merge(&mut result, text_or_base64("stderr", &out[1]));
    result["stdout_truncated"] = json!(truncated[0]);
    result["stderr_truncated"] = json!(truncated[1]);
    result
}

fn command(sandbox: &Sandbox, cid: &str) -> Result<Arc<CommandRecord>, ApiError> {
    sandbox
        .commands
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(cid)
        .cloned()
        .ok_or_else(|| ApiError::not_found("command", cid))
}

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
    let list: Vec<Value> = commands
        .iter()
        .map(|c| {
            let mut v = c.to_json();
            for key in ["stdout", "stderr", "stdout_base64", "stderr_base64"] {
                if let Some(map) = v.as_object_mut() {
                    map.remove(key);
                }
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({ "commands": list })).into_response())
}

/// `GET /sandboxes/{id}/commands/{cid}`
pub async fn get_command(
    State(state): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    Ok(axum::Json(command(&sandbox, &cid)?.to_json()).into_response())
}

/// `POST /sandboxes/{id}/commands/{cid}/kill`
pub async fn kill_command(
    State(state): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: KillBody = if body.as_ref().map(|b| b.is_empty()).unwrap_or(false) {
        KillBody::default()
    } else {
        parse_body(body)?
    };
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
    Ok(axum::Json(json!({"cmd_id": cid, "signal": signal})).into_response())
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
        assert_eq!(&line[..], b"{\"data\":\"hi\\n\",\"type\":\"stdout\"}\n");
        let line = output_line(OutputStream::Stderr, &[0xff]);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["type"], "stderr");
        assert_eq!(v["data_base64"], "/w==");
    }

    #[test]
    fn exit_records() {
        assert_eq!(exit_json(&Ok(ExitStatus::Code(3)))["exit_code"], 3);
        assert_eq!(exit_json(&Ok(ExitStatus::Signal(9)))["signal"], 9);
        assert_eq!(exit_json(&Ok(ExitStatus::TimedOut))["timed_out"], true);
    }
}
