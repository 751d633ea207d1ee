//! Interactive terminals: a command on a pseudo-terminal in the guest (through the agent's
//! `ExecPty`), and a WebSocket that carries it to one client at a time.
//!
//! A session outlives its clients: the terminal's output goes into a bounded ring
//! ([`RING_BYTES`]) whether a client is connected or not, and a client that connects replays
//! the ring and then follows. A new client takes the session over (the old one is closed with
//! a reason). The session ends when its command does; it stays listed, with its exit, until it
//! is deleted or newer sessions push it out ([`MAX_PTYS`] per sandbox).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ember_agent::client::{AgentClient, ClientError};
use ember_agent::protocol::{ExitStatus, CAP_PTY, PTY_DEFAULT_TERM};
use ember_client::responses::{CommandExit, CommandStatus, PtyEvent, PtyInfo, PtyList};
use ember_client::types::{ErrorDocument, ExecBody, PtyBody, PtyControl};

use crate::error::{from_agent, ApiError};
use crate::sandbox::Sandbox;
use crate::{parse_body, AppState, JsonBody};

/// Terminal sessions per sandbox, running or ended (the oldest ended ones make room).
pub const MAX_PTYS: usize = 16;
/// The terminal output a session keeps for a client that connects (again).
pub const RING_BYTES: usize = 256 << 10;
/// The largest WebSocket message (and frame) a client may send.
pub const MAX_MESSAGE: usize = 64 << 10;
/// The largest terminal, in columns or rows.
pub const MAX_CELLS: u16 = 4096;
/// The login shell a session runs by default: bash where the image has it.
const DEFAULT_SHELL: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";
/// Input messages queued for the guest before the WebSocket stops being read.
const INPUT_QUEUE: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One terminal session.
pub struct PtySession {
    pub id: String,
    argv: Vec<String>,
    pid: u32,
    /// The agent's request id of the command (what `Kill` and `Resize` name).
    exec_id: u64,
    started_unix_ms: u64,
    agent: Arc<AgentClient>,
    /// What clients type, to the thread that feeds the command's terminal.
    input: tokio::sync::mpsc::Sender<Vec<u8>>,
    state: Mutex<PtyState>,
    /// Woken on output, on the end, and when another client takes over.
    progress: tokio::sync::Notify,
}

struct PtyState {
    ring: OutputRing,
    exit: Option<PtyEnd>,
    cols: u16,
    rows: u16,
    /// The connected client (0: none).
    client: u64,
    next_client: u64,
}

/// The newest [`RING_BYTES`] of a stream, addressed by their offset in the whole stream.
#[derive(Default)]
pub struct OutputRing {
    bytes: VecDeque<u8>,
    /// Bytes the stream has had in all.
    end: u64,
    capacity: usize,
}

impl OutputRing {
    pub fn new(capacity: usize) -> OutputRing {
        OutputRing {
            bytes: VecDeque::new(),
            end: 0,
            capacity,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.end += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// The bytes from `offset` on (from the oldest kept if `offset` is older), at most
    /// `limit` of them, and the offset after them.
    pub fn since(&self, offset: u64, limit: usize) -> (Vec<u8>, u64) {
        let start = self.end - self.bytes.len() as u64;
        let from = offset.clamp(start, self.end);
        let skip = (from - start) as usize;
        let take = (self.bytes.len() - skip).min(limit);
        let data: Vec<u8> = self.bytes.range(skip..skip + take).copied().collect();
        (data, from + take as u64)
    }
}

impl PtySession {
    fn info(&self) -> PtyInfo {
        let state = lock(&self.state);
        PtyInfo {
            pty_id: self.id.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            cols: state.cols,
            rows: state.rows,
            started_unix_ms: self.started_unix_ms,
            status: if state.exit.is_some() {
                CommandStatus::Finished
            } else {
                CommandStatus::Running
            },
            exit: state.exit.as_ref().map(exit_of).unwrap_or_default(),
            attached: state.client != 0,
        }
    }

    fn running(&self) -> bool {
        lock(&self.state).exit.is_none()
    }

    /// Running with a client attached: someone is at this terminal.
    pub(crate) fn in_use(&self) -> bool {
        let state = lock(&self.state);
        state.exit.is_none() && state.client != 0
    }

    fn output(&self, data: &[u8]) {
        lock(&self.state).ring.push(data);
        self.progress.notify_waiters();
    }

    fn finish(&self, exit: PtyEnd) {
        lock(&self.state).exit = Some(exit);
        self.progress.notify_waiters();
    }

    /// A new client: the one before it (if any) is told to go.
    fn attach(&self) -> u64 {
        let mut state = lock(&self.state);
        state.next_client += 1;
        state.client = state.next_client;
        drop(state);
        self.progress.notify_waiters();
        lock(&self.state).client
    }

    fn detach(&self, client: u64) {
        let mut state = lock(&self.state);
        if state.client == client {
            state.client = 0;
        }
    }
}

/// How a terminal's command ended: its status, or what broke the agent's connection first
/// (kept as the text clients are shown).
#[derive(Debug, Clone)]
enum PtyEnd {
    Status(ExitStatus),
    Lost { why: String },
}

fn exit_of(exit: &PtyEnd) -> CommandExit {
    match exit {
        PtyEnd::Status(ExitStatus::Code(code)) => CommandExit {
            exit_code: Some(*code),
            ..Default::default()
        },
        PtyEnd::Status(ExitStatus::Signal(signal)) => CommandExit {
            signal: Some(*signal),
            ..Default::default()
        },
        PtyEnd::Status(ExitStatus::TimedOut) => CommandExit {
            timed_out: true,
            ..Default::default()
        },
        PtyEnd::Lost { why } => CommandExit {
            error: Some(why.clone()),
            ..Default::default()
        },
    }
}

fn exit_event(exit: &PtyEnd) -> PtyEvent {
    let exit = exit_of(exit);
    PtyEvent::Exit {
        exit_code: exit.exit_code,
        signal: exit.signal,
        error: exit.error,
    }
}

fn check_size(cols: u16, rows: u16) -> Result<(), ApiError> {
    if !(1..=MAX_CELLS).contains(&cols) || !(1..=MAX_CELLS).contains(&rows) {
        return Err(ApiError::bad_request(format!(
            "`cols` and `rows` must be between 1 and {MAX_CELLS}"
        )));
    }
    Ok(())
}

fn check_signal(signal: i32) -> Result<(), ApiError> {
    if !(1..=64).contains(&signal) {
        return Err(ApiError::bad_request(format!(
            "signal {signal} is not between 1 and 64"
        )));
    }
    Ok(())
}

fn session(sandbox: &Sandbox, pty_id: &str) -> Result<Arc<PtySession>, ApiError> {
    lock(&sandbox.ptys)
        .get(pty_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found("terminal", pty_id))
}

/// Makes room for one more session: forgets the oldest ended one when the sandbox has
/// [`MAX_PTYS`]; refuses when all of them run.
fn make_room(sandbox: &Sandbox) -> Result<(), ApiError> {
    let mut ptys = lock(&sandbox.ptys);
    if ptys.len() < MAX_PTYS {
        return Ok(());
    }
    let oldest_ended = ptys
        .values()
        .filter(|s| !s.running())
        .min_by_key(|s| (s.started_unix_ms, s.id.clone()))
        .map(|s| s.id.clone());
    match oldest_ended {
        Some(id) => {
            ptys.remove(&id);
            Ok(())
        }
        None => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_ptys",
            format!(
                "sandbox {} runs {MAX_PTYS} terminals; delete one first",
                sandbox.id
            ),
        )),
    }
}

/// The `{pty_id}` of a terminal in a path.
#[derive(utoipa::IntoParams)]
#[into_params(names("pty_id"), parameter_in = Path)]
#[allow(dead_code)] // Only describes the parameter.
pub struct PtyId(String);

#[utoipa::path(post, path = "/sandboxes/{id}/pty", tag = "terminals", operation_id = "create_pty",
    params(crate::api::SandboxId),
    request_body = PtyBody,
    responses(
        (status = 201, description = "The command runs on its terminal; connect to `…/pty/{pty_id}/connect`", body = PtyInfo),
        (status = 400, description = "Malformed JSON, unknown field or invalid value", body = ErrorDocument),
        (status = 404, description = "No such sandbox, or no such command in the guest", body = ErrorDocument),
        (status = 409, description = "The sandbox is not running, or its agent (from an older snapshot) has no terminals (`agent_too_old`)", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 429, description = "The sandbox runs as many terminals as it may", body = ErrorDocument),
        (status = 502, description = "The guest's agent is unreachable", body = ErrorDocument)))]
/// `POST /sandboxes/{id}/pty`
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: PtyBody = parse_body(body)?;
    check_size(body.cols, body.rows)?;
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let (cmd, args) = match &body.cmd {
        Some(cmd) => (cmd.clone(), body.args.clone()),
        None if body.args.is_empty() => (
            "/bin/sh".to_string(),
            vec!["-c".to_string(), DEFAULT_SHELL.to_string()],
        ),
        None => return Err(ApiError::bad_request("`args` need a `cmd`")),
    };
    let exec = ExecBody {
        cmd,
        args,
        env: body.env.clone(),
        cwd: body.cwd.clone(),
        user: body.user.clone(),
        ..Default::default()
    };
    let mut request = crate::exec::exec_request(&sandbox, &exec)?;
    // The sandbox's defaults say `TERM=dumb` (right for exec's pipes); a terminal is an
    // xterm unless the request or the sandbox's own environment says otherwise.
    if !body.env.contains_key("TERM") && !sandbox.record().env.contains_key("TERM") {
        request.env.retain(|(key, _)| key != "TERM");
        request
            .env
            .push(("TERM".to_string(), PTY_DEFAULT_TERM.to_string()));
    }
    make_room(&sandbox)?;
    let agent = sandbox.agent().await?;
    if let Some(info) = agent.agent_info() {
        if !info.capabilities.iter().any(|c| c == CAP_PTY) {
            return Err(agent_too_old(&info.agent_version));
        }
    }
    // Two blocking threads for as long as the session runs: its output, its input.
    let turns = (sandbox.agent_turn().await?, sandbox.agent_turn().await?);
    let argv = request.argv.clone();
    let (cols, rows) = (body.cols, body.rows);
    let spawner = agent.clone();
    let execution = tokio::task::spawn_blocking(move || spawner.spawn_pty(request, cols, rows))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let execution = match execution {
        Ok(execution) => execution,
        Err(ClientError::Unsupported { agent_version, .. }) => {
            return Err(agent_too_old(&agent_version))
        }
        Err(e) => {
            if !matches!(e, ClientError::Remote(_)) {
                sandbox.forget_agent().await;
            }
            return Err(from_agent("starting the terminal's command", e));
        }
    };
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(INPUT_QUEUE);
    let session = Arc::new(PtySession {
        id: format!("pty-{}", sandbox.next_pty.fetch_add(1, Ordering::Relaxed)),
        argv,
        pid: execution.pid(),
        exec_id: execution.id(),
        started_unix_ms: crate::sandbox::unix_ms(),
        agent,
        input: input_tx,
        state: Mutex::new(PtyState {
            ring: OutputRing::new(RING_BYTES),
            exit: None,
            cols,
            rows,
            client: 0,
            next_client: 0,
        }),
        progress: tokio::sync::Notify::new(),
    });
    let (output_turn, input_turn) = turns;
    let writer = execution.stdin();
    tokio::task::spawn_blocking(move || {
        let _turn = input_turn;
        // Ends when the command has (an empty message says so), when its input is closed,
        // or when the session is gone (its sender dropped).
        while let Some(data) = input_rx.blocking_recv() {
            if data.is_empty() || writer.write(&data).is_err() {
                break;
            }
        }
    });
    {
        let session = session.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = output_turn;
            let status = execution.wait(|_, data| session.output(data));
            session.finish(match status {
                Ok(status) => PtyEnd::Status(status),
                Err(e) => PtyEnd::Lost { why: e.to_string() },
            });
            // Ends the input thread (which never blocks long: the command's input is closed).
            let _ = session.input.blocking_send(Vec::new());
        });
    }
    lock(&sandbox.ptys).insert(session.id.clone(), session.clone());
    Ok((StatusCode::CREATED, axum::Json(session.info())).into_response())
}

fn agent_too_old(agent_version: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "agent_too_old",
        format!(
            "the sandbox's agent (version {agent_version}, from before terminals existed: the \
             sandbox comes from an older snapshot) cannot run a terminal"
        ),
    )
}

#[utoipa::path(get, path = "/sandboxes/{id}/pty", tag = "terminals", operation_id = "list_ptys",
    params(crate::api::SandboxId),
    responses(
        (status = 200, description = "Its terminal sessions, oldest first", body = PtyList),
        (status = 404, description = "No such sandbox", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/pty`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let mut ptys: Vec<PtyInfo> = lock(&sandbox.ptys).values().map(|s| s.info()).collect();
    ptys.sort_by_key(|p| {
        let n: u64 = p.pty_id.trim_start_matches("pty-").parse().unwrap_or(0);
        n
    });
    Ok(axum::Json(PtyList { ptys }).into_response())
}

#[utoipa::path(delete, path = "/sandboxes/{id}/pty/{pty_id}", tag = "terminals", operation_id = "delete_pty",
    params(crate::api::SandboxId, PtyId),
    responses(
        (status = 204, description = "Its command was killed (SIGKILL to its process group and the terminal's foreground job) and the session forgotten"),
        (status = 404, description = "No such sandbox or terminal", body = ErrorDocument),
        (status = 502, description = "The guest's agent is unreachable", body = ErrorDocument)))]
/// `DELETE /sandboxes/{id}/pty/{pty_id}`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((id, pty_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let session = session(&sandbox, &pty_id)?;
    if session.running() {
        let (agent, exec_id) = (session.agent.clone(), session.exec_id);
        let killed = tokio::task::spawn_blocking(move || agent.kill(exec_id, libc::SIGKILL))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // It may have ended meanwhile: then there is nothing left to kill.
        if let Err(e) = killed {
            if session.running() && !matches!(e, ClientError::Remote(_)) {
                return Err(from_agent(&format!("killing terminal {pty_id}"), e));
            }
        }
    }
    lock(&sandbox.ptys).remove(&pty_id);
    session.progress.notify_waiters();
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/pty/{pty_id}/connect", tag = "terminals", operation_id = "connect_pty",
    params(crate::api::SandboxId, PtyId),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol (send `Connection: Upgrade`, `Upgrade: websocket` and a `Sec-WebSocket-Key`). Binary messages carry the terminal's bytes both ways (the session's kept output, at most 256 KiB, is replayed first); text messages from the client are `PtyControl` JSON (`{\"type\":\"resize\",\"cols\",\"rows\"}`, `{\"type\":\"signal\",\"signal\"}`), from the service `PtyEvent` JSON (`{\"type\":\"exit\",\"exit_code\",\"signal\"}` before it closes, `{\"type\":\"error\",\"message\"}` for a control message it refused). One client at a time: a new connection takes over and the older one is closed (code 4000). Messages are at most 64 KiB."),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorDocument),
        (status = 404, description = "No such sandbox or terminal", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/pty/{pty_id}/connect`: the terminal over a WebSocket.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    Path((id, pty_id)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let session = session(&sandbox, &pty_id)?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "not_a_websocket",
            format!(
                "connect to a terminal with a WebSocket upgrade: {}",
                rejection.body_text()
            ),
        )
    })?;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve_client(session, socket)))
}

/// Close code for a client another one took over from.
const CLOSE_TAKEN_OVER: u16 = 4000;
/// Output sent in one message.
const OUTPUT_MESSAGE: usize = 32 << 10;

async fn serve_client(session: Arc<PtySession>, mut socket: WebSocket) {
    let me = session.attach();
    let mut offset = 0;
    let reason = loop {
        let notified = session.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (data, next, exit, current) = {
            let state = lock(&session.state);
            let (data, next) = state.ring.since(offset, OUTPUT_MESSAGE);
            (data, next, state.exit.clone(), state.client)
        };
        if current != me {
            break Some((
                CLOSE_TAKEN_OVER,
                "another client connected to this terminal",
            ));
        }
        if !data.is_empty() {
            offset = next;
            if socket.send(Message::Binary(data.into())).await.is_err() {
                break None;
            }
            continue;
        }
        if let Some(exit) = exit {
            let event = serde_json::to_string(&exit_event(&exit)).unwrap_or_default();
            if socket.send(Message::Text(event.into())).await.is_err() {
                break None;
            }
            break Some((1000, "the command ended"));
        }
        tokio::select! {
            _ = &mut notified => {}
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(Message::Binary(data))) => {
                    // A session whose command ended drops what is typed (and an empty
                    // message is nothing to type).
                    if !data.is_empty() && session.running() {
                        let _ = session.input.send(data.to_vec()).await;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if let Err(e) = control(&session, text.as_str()).await {
                        let event = PtyEvent::Error { message: e.message };
                        let event = serde_json::to_string(&event).unwrap_or_default();
                        if socket.send(Message::Text(event.into())).await.is_err() {
                            break None;
                        }
                    }
                }
                Some(Ok(_)) => {} // Pings are answered by the WebSocket itself.
            },
        }
    };
    session.detach(me);
    if let Some((code, reason)) = reason {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = socket.send(Message::Close(Some(frame))).await;
    }
}

/// A client's control message: a resize or a signal.
async fn control(session: &Arc<PtySession>, text: &str) -> Result<(), ApiError> {
    let message: PtyControl = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("not a control message: {e}")))?;
    let (agent, exec_id) = (session.agent.clone(), session.exec_id);
    match message {
        PtyControl::Resize { cols, rows } => {
            check_size(cols, rows)?;
            tokio::task::spawn_blocking(move || agent.resize(exec_id, cols, rows))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| from_agent("resizing the terminal", e))?;
            let mut state = lock(&session.state);
            state.cols = cols;
            state.rows = rows;
        }
        PtyControl::Signal { signal } => {
            check_signal(signal)?;
            tokio::task::spawn_blocking(move || agent.kill(exec_id, signal))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| from_agent("signalling the terminal's command", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes_and_knows_their_offsets() {
        let mut ring = OutputRing::new(8);
        ring.push(b"hello ");
        assert_eq!(ring.since(0, 100), (b"hello ".to_vec(), 6));
        ring.push(b"world");
        // 11 bytes in all, the newest 8 kept: a client at 0 starts at the oldest kept.
        assert_eq!(ring.since(0, 100), (b"lo world".to_vec(), 11));
        assert_eq!(ring.since(6, 100), (b"world".to_vec(), 11));
        assert_eq!(ring.since(6, 2), (b"wo".to_vec(), 8));
        assert_eq!(ring.since(11, 100), (Vec::new(), 11));
        // A push larger than the ring keeps its tail.
        ring.push(b"0123456789abc");
        assert_eq!(ring.since(0, 100), (b"56789abc".to_vec(), 24));
    }

    #[test]
    fn control_messages_and_exits_have_their_documented_shape() {
        let resize: PtyControl =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":30}"#).unwrap();
        assert_eq!(
            resize,
            PtyControl::Resize {
                cols: 100,
                rows: 30
            }
        );
        let signal: PtyControl = serde_json::from_str(r#"{"type":"signal","signal":2}"#).unwrap();
        assert_eq!(signal, PtyControl::Signal { signal: 2 });
        assert!(serde_json::from_str::<PtyControl>(r#"{"type":"resize","cols":1}"#).is_err());
        assert!(
            serde_json::from_str::<PtyControl>(r#"{"type":"signal","signal":2,"x":1}"#).is_err()
        );
        let exit = serde_json::to_value(exit_event(&PtyEnd::Status(ExitStatus::Code(3)))).unwrap();
        assert_eq!(
            exit,
            serde_json::json!({"type": "exit", "exit_code": 3, "signal": null})
        );
        let killed =
            serde_json::to_value(exit_event(&PtyEnd::Status(ExitStatus::Signal(9)))).unwrap();
        assert_eq!(killed["signal"], 9);
        assert!(check_size(0, 10).is_err());
        assert!(check_size(10, MAX_CELLS + 1).is_err());
        assert!(check_size(80, 24).is_ok());
        assert!(check_signal(0).is_err() && check_signal(65).is_err() && check_signal(15).is_ok());
    }
}
