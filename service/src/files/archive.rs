//! A sandbox's directories as tar streams: downloaded (`GET …/files/tar`) and uploaded
//! (`PUT …/files/tar`). The agent makes and extracts the archives in the guest; the service
//! only moves the bytes, a window at a time.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_agent::protocol::FileType;
use ember_client::files::{PathQuery, TarExtracted};
use futures_util::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{check_guest_path, chown_tree, owner_of, with_agent, ChannelWriter, FileFailures};
use crate::error::{from_agent_on_dir, ApiError};
use crate::{parse_query, AppState, QueryResult};

#[utoipa::path(get, path = "/sandboxes/{id}/files/tar", tag = "files", operation_id = "get_tar",
    params(crate::api::SandboxId, PathQuery),
    responses(
        (status = 200, description = "The directory as a tar archive, streamed: paths relative to it, symlinks kept as symlinks, devices, FIFOs and sockets left out",
            content_type = "application/x-tar", body = Vec<u8>),
        FileFailures))]
/// `GET /sandboxes/{id}/files/tar?path=/dir`
pub async fn get_tar(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<PathQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    // Errors are only expressible before the body starts: look first.
    let path = query.path.clone();
    let what = format!("archiving {}", query.path);
    let stat = with_agent(
        &state,
        &id,
        move |agent| agent.stat(&path),
        |e| from_agent_on_dir(&what, e),
    )
    .await?;
    if stat.file_type != FileType::Dir {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_a_directory",
            format!("{} is not a directory ({:?})", query.path, stat.file_type),
        ));
    }
    let sandbox = state.sandbox(&id)?;
    let agent = sandbox.agent().await?;
    let turn = sandbox.agent_turn().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let path = query.path.clone();
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let errors = tx.clone();
        // A client that goes away makes the writer fail, which cancels the archive in the
        // guest.
        if let Err(e) = agent.read_tar(&path, ChannelWriter(tx)) {
            // The status is sent; breaking the body tells the client it is incomplete.
            let _ = errors.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[utoipa::path(put, path = "/sandboxes/{id}/files/tar", tag = "files", operation_id = "put_tar",
    params(crate::api::SandboxId, PathQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "A tar archive, extracted under `path` (created if missing). Entries with absolute paths or `..`, and entries under a symlink, are refused (400); devices, FIFOs and hard links are skipped"),
    responses(
        (status = 201, description = "Extracted", body = TarExtracted),
        FileFailures))]
/// `PUT /sandboxes/{id}/files/tar?path=/dir`: the body is a tar archive. An entry that is
/// refused ends the extraction (400); the entries before it stay.
pub async fn put_tar(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<PathQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    let owner = owner_of(&*state.sandbox(&id)?, &query.path);
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let path = query.path.clone();
    let what = format!("extracting an archive into {}", query.path);
    let summary = with_agent(
        &state,
        &id,
        move |agent| {
            let summary = agent.write_tar(&path, reader)?;
            if let Some(user) = owner {
                chown_tree(agent, &user, &path)?;
            }
            Ok(summary)
        },
        |e| from_agent_on_dir(&what, e),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(TarExtracted {
            path: query.path,
            files: summary.files,
            dirs: summary.dirs,
            symlinks: summary.symlinks,
            bytes: summary.bytes,
            skipped: summary.skipped,
        }),
    )
        .into_response())
}
