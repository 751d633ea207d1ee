//! Files in a sandbox through the guest agent: streamed uploads and downloads of single
//! files and `mkdir` (here); listings, `stat`, removal and renames ([`manage`]);
//! directories as tar streams ([`archive`]); watches ([`watch`]).

use std::io::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use ember_agent::protocol::FileType;
use ember_client::responses::{DirCreated, FileWritten};
use ember_client::types::{ErrorDocument, FileQuery, MkdirBody};
use futures_util::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::error::{from_agent, ApiError};
use super::{parse_body, parse_query, AppState, JsonBody, QueryResult};

pub mod archive;
pub mod manage;
pub mod watch;

pub use archive::{get_tar, put_tar};
pub use manage::{list, remove, rename, stat};
pub use watch::watch;

/// How a files request fails (the same for each files operation).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Only describes the responses.
enum FileFailures {
    #[response(status = 400, description = "Invalid path or mode")]
    Invalid(ErrorDocument),
    #[response(status = 403, description = "The guest refused access")]
    Forbidden(ErrorDocument),
    #[response(
        status = 404,
        description = "No such sandbox, or no such file or folder in the guest"
    )]
    NotFound(ErrorDocument),
    #[response(
        status = 409,
        description = "The sandbox is not running; the path exists (mkdir, rename), is not a \
            regular file or not a directory, or is a folder that is not empty (remove); or the \
            sandbox's agent predates the request (`agent_too_old`: a snapshot from an older \
            ember)"
    )]
    Conflict(ErrorDocument),
    #[response(status = 413, description = "Too large")]
    TooLarge(ErrorDocument),
    #[response(status = 500, description = "The guest failed")]
    GuestFailed(ErrorDocument),
    #[response(status = 502, description = "The guest's agent is unreachable")]
    AgentUnreachable(ErrorDocument),
}

/// The runtime user that should own what a files request creates at `path`: in a runtime
/// whose commands run as a user, what lands in its working directory is that user's (the
/// agent writes as root), so its commands can change it.
fn owner_of(sandbox: &crate::sandbox::Sandbox, path: &str) -> Option<String> {
    let image = sandbox.record().runtime?;
    let inside = path
        .strip_prefix(image.workdir.as_str())
        .is_some_and(|rest| rest.starts_with('/'));
    (image.uid != 0 && inside).then_some(image.user)
}

/// Gives `path` to `user` (after the agent wrote it as root).
fn chown(
    agent: &ember_agent::client::AgentClient,
    user: &str,
    path: &str,
) -> Result<(), ember_agent::client::ClientError> {
    chown_with(agent, user, path, &["-h"])
}

/// Gives `path` and all under it to `user` (symlinks themselves, never what they point to).
fn chown_tree(
    agent: &ember_agent::client::AgentClient,
    user: &str,
    path: &str,
) -> Result<(), ember_agent::client::ClientError> {
    chown_with(agent, user, path, &["-h", "-R"])
}

fn chown_with(
    agent: &ember_agent::client::AgentClient,
    user: &str,
    path: &str,
    flags: &[&str],
) -> Result<(), ember_agent::client::ClientError> {
    let mut argv = vec!["/bin/chown".to_string()];
    argv.extend(flags.iter().map(|f| f.to_string()));
    argv.extend([format!("{user}:{user}"), path.to_string()]);
    let request = ember_agent::protocol::ExecRequest::new(argv);
    let output = agent.exec_collect(request)?;
    if !output.status.success() {
        return Err(ember_agent::client::ClientError::Remote(
            ember_agent::protocol::RemoteError::new(
                ember_agent::protocol::ErrorKind::Io,
                format!(
                    "chown {user} {path}: {:?}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            ),
        ));
    }
    Ok(())
}

/// Runs `call` with the running sandbox `id`'s agent on a blocking thread, holding one of
/// its agent turns; a failure becomes the API error `on_error` makes of it.
pub(crate) async fn with_agent<T: Send + 'static>(
    state: &AppState,
    id: &str,
    call: impl FnOnce(&ember_agent::client::AgentClient) -> Result<T, ember_agent::client::ClientError>
        + Send
        + 'static,
    on_error: impl FnOnce(ember_agent::client::ClientError) -> ApiError,
) -> Result<T, ApiError> {
    let sandbox = state.sandbox(id)?;
    sandbox.require_running()?;
    let agent = sandbox.agent().await?;
    let turn = sandbox.agent_turn().await?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        call(&agent)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(on_error)
}

/// The longest guest path accepted: the guest kernel's PATH_MAX, less its terminating NUL.
pub(crate) const MAX_PATH: usize = 4095;
/// The longest part of a guest path (the guest kernel's NAME_MAX).
const MAX_NAME: usize = 255;

/// A guest path must be absolute, normalised (no `.` or `..` parts, which could climb out
/// of where a caller meant), without NUL and not too long.
pub fn check_guest_path(path: &str) -> Result<(), ApiError> {
    let invalid = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            format!("guest path {path:?} {why}"),
        )
    };
    if path.len() > MAX_PATH {
        return Err(invalid("is too long"));
    }
    if path.contains('\0') {
        return Err(invalid("contains NUL"));
    }
    if !path.starts_with('/') {
        return Err(invalid(
            "is not absolute (paths start at the guest's filesystem root, /)",
        ));
    }
    if path.split('/').any(|part| part.len() > MAX_NAME) {
        return Err(invalid("has a part longer than 255 bytes"));
    }
    if path.split('/').any(|part| part == ".." || part == ".") {
        return Err(invalid(
            "has a `.` or `..` component: it would leave the guest's filesystem root or is \
             not normalised",
        ));
    }
    Ok(())
}

fn parse_mode(mode: Option<&str>) -> Result<u32, ApiError> {
    match mode {
        None => Ok(0o644),
        Some(text) => u32::from_str_radix(text, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::bad_request(format!("mode {text:?} is not octal permission bits"))
            }),
    }
}

#[utoipa::path(put, path = "/sandboxes/{id}/files", tag = "files",
    params(crate::api::SandboxId, FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's content"),
    responses(
        (status = 201, description = "Written", body = FileWritten),
        FileFailures))]
/// `PUT /sandboxes/{id}/files?path=…[&mode=755]`: the body is the file's content.
pub async fn put_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<FileQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    let mode = parse_mode(query.mode.as_deref())?;
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let agent = sandbox.agent().await?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let path = query.path.clone();
    let owner = owner_of(&sandbox, &path);
    let written = {
        let turn = sandbox.agent_turn().await?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let written = agent.write_file(&path, mode, reader)?;
            if let Some(user) = owner {
                chown(&agent, &user, &path)?;
            }
            Ok(written)
        })
    }
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| from_agent(&format!("writing {}", query.path), e))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(FileWritten {
            path: query.path,
            bytes: written,
            mode: format!("{mode:o}"),
        }),
    )
        .into_response())
}

/// Sends what the agent reads into the response body.
pub(crate) struct ChannelWriter(
    pub(crate) tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[utoipa::path(get, path = "/sandboxes/{id}/files", tag = "files",
    params(crate::api::SandboxId,
        ("path" = String, Query, description = "The file's absolute path in the guest", pattern = "^/")),
    responses(
        (status = 200, description = "The file's content, streamed (its size in `x-file-size`)",
            content_type = "application/octet-stream", body = Vec<u8>),
        FileFailures))]
/// `GET /sandboxes/{id}/files?path=…`: the file's content, streamed.
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<FileQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    if query.mode.is_some() {
        return Err(ApiError::bad_request("`mode` is for uploads"));
    }
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let agent = sandbox.agent().await?;
    // Errors are only expressible before the body starts: look first.
    let stat = {
        let agent = agent.clone();
        let path = query.path.clone();
        let turn = sandbox.agent_turn().await?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            agent.stat(&path)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| from_agent(&format!("reading {}", query.path), e))?
    };
    if stat.file_type != FileType::File {
        return Err(ApiError::conflict(format!(
            "{} is not a regular file ({:?})",
            query.path, stat.file_type
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let path = query.path.clone();
    let turn = sandbox.agent_turn().await?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let errors = tx.clone();
        if let Err(e) = agent.read_file(&path, ChannelWriter(tx)) {
            // The status is sent; breaking the body tells the client it is incomplete.
            let _ = errors.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-file-size", stat.size)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[utoipa::path(post, path = "/sandboxes/{id}/files/mkdir", tag = "files",
    params(crate::api::SandboxId),
    request_body = MkdirBody,
    responses(
        (status = 201, description = "The folder and its parents exist", body = DirCreated),
        FileFailures))]
/// `POST /sandboxes/{id}/files/mkdir` `{path, mode?}`: `mkdir -p`.
pub async fn mkdir(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: MkdirBody = parse_body(body)?;
    check_guest_path(&body.path)?;
    let mode = body.mode.unwrap_or(0o755);
    if mode > 0o7777 {
        return Err(ApiError::bad_request(format!("mode {mode} is too large")));
    }
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let agent = sandbox.agent().await?;
    let path = body.path.clone();
    let owner = owner_of(&sandbox, &path);
    let turn = sandbox.agent_turn().await?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        agent.mkdir_p(&path, mode)?;
        if let Some(user) = owner {
            chown(&agent, &user, &path)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| from_agent(&format!("mkdir {}", body.path), e))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(DirCreated { path: body.path }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert!(check_guest_path("/tmp/x").is_ok());
        assert!(check_guest_path("/").is_ok());
        for bad in ["tmp/x", "", "/tmp/../etc/passwd", "/..", "/a/./b", "/a\0b"] {
            let err = check_guest_path(bad).unwrap_err();
            assert_eq!(err.code, "invalid_path", "{bad:?}");
        }
        assert!(check_guest_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(None).unwrap(), 0o644);
        assert_eq!(parse_mode(Some("755")).unwrap(), 0o755);
        assert!(parse_mode(Some("9")).is_err());
        assert!(parse_mode(Some("77777")).is_err());
    }
}
