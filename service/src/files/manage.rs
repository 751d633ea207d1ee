//! Listings, `stat`, removal and renames of a sandbox's files.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ember_agent::protocol::{DirEntry, FileType, MAX_LIST_ENTRIES};
use ember_client::files::{
    DirListing, EntryType, FileEntry, ListQuery, PathQuery, RemoveQuery, RenameBody, Renamed,
};

use super::{check_guest_path, with_agent, FileFailures};
use crate::error::{from_agent, from_agent_on_dir, ApiError};
use crate::{parse_body, parse_query, AppState, JsonBody, QueryResult};

/// Entries a listing answers unless the request says otherwise.
pub const DEFAULT_LIST_LIMIT: u32 = 1000;

/// `bytes` as text, and as base64 too when they are not UTF-8.
pub(crate) fn text_and_base64(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(bytes).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// The API's view of an agent's directory entry.
pub(crate) fn file_entry(entry: DirEntry) -> FileEntry {
    let entry_type = match entry.file_type {
        FileType::File => EntryType::File,
        FileType::Dir => EntryType::Dir,
        FileType::Symlink => EntryType::Symlink,
        FileType::Other => EntryType::Other,
    };
    let mtime_unix_ms = entry.mtime_unix_ms();
    let (name, name_base64) = text_and_base64(&entry.name);
    let target = (entry.file_type == FileType::Symlink)
        .then(|| String::from_utf8_lossy(&entry.link_target).into_owned());
    FileEntry {
        name,
        name_base64,
        entry_type,
        size: entry.size,
        mode: format!("{:o}", entry.mode & 0o7777),
        mtime_unix_ms,
        target,
    }
}

#[utoipa::path(get, path = "/sandboxes/{id}/files/list", tag = "files", operation_id = "list_files",
    params(crate::api::SandboxId, ListQuery),
    responses(
        (status = 200, description = "The directory's entries (symlinks in it not followed), sorted by name", body = DirListing),
        FileFailures))]
/// `GET /sandboxes/{id}/files/list?path=…[&limit=N]`
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "`limit` must be between 1 and {MAX_LIST_ENTRIES}"
        )));
    }
    let path = query.path.clone();
    let what = format!("listing {}", query.path);
    let (entries, truncated) = with_agent(
        &state,
        &id,
        move |agent| agent.list_dir(&path, limit),
        |e| from_agent_on_dir(&what, e),
    )
    .await?;
    Ok(axum::Json(DirListing {
        path: query.path,
        entries: entries.into_iter().map(file_entry).collect(),
        truncated,
    })
    .into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}/files/stat", tag = "files", operation_id = "stat_file",
    params(crate::api::SandboxId, PathQuery),
    responses(
        (status = 200, description = "The path exists: what it is (a symlink described, not followed)", body = FileEntry),
        FileFailures))]
/// `GET /sandboxes/{id}/files/stat?path=…`: 404 when nothing is there.
pub async fn stat(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<PathQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    let path = query.path.clone();
    let what = format!("stat {}", query.path);
    let entry = with_agent(
        &state,
        &id,
        move |agent| agent.lstat(&path),
        |e| from_agent(&what, e),
    )
    .await?;
    Ok(axum::Json(file_entry(entry)).into_response())
}

/// Refuses the guest's root as what a removal or rename acts on.
fn not_the_root(path: &str, what: &str) -> Result<(), ApiError> {
    if path.trim_end_matches('/').is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            format!("refusing to {what} {path:?}: it is the guest's root"),
        ));
    }
    Ok(())
}

#[utoipa::path(delete, path = "/sandboxes/{id}/files", tag = "files", operation_id = "remove_file",
    params(crate::api::SandboxId, RemoveQuery),
    responses(
        (status = 204, description = "Removed"),
        FileFailures))]
/// `DELETE /sandboxes/{id}/files?path=…[&recursive=true]`: a folder that is not empty needs
/// `recursive` (409 `not_empty` otherwise); symlinks are removed, never followed.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<RemoveQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    not_the_root(&query.path, "remove")?;
    let path = query.path.clone();
    let recursive = query.recursive;
    let what = format!("removing {}", query.path);
    with_agent(
        &state,
        &id,
        move |agent| agent.remove(&path, recursive),
        |e| from_agent(&what, e),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/files/rename", tag = "files", operation_id = "rename_file",
    params(crate::api::SandboxId),
    request_body = RenameBody,
    responses(
        (status = 200, description = "Renamed", body = Renamed),
        FileFailures))]
/// `POST /sandboxes/{id}/files/rename` `{from, to, overwrite?}`: one `rename(2)` in the
/// guest; an existing `to` is a 409 unless `overwrite`.
pub async fn rename(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let body: RenameBody = parse_body(body)?;
    for path in [&body.from, &body.to] {
        check_guest_path(path)?;
        not_the_root(path, "rename")?;
    }
    let (from, to, overwrite) = (body.from.clone(), body.to.clone(), body.overwrite);
    let what = format!("renaming {} to {}", body.from, body.to);
    with_agent(
        &state,
        &id,
        move |agent| agent.rename(&from, &to, overwrite),
        |e| from_agent(&what, e),
    )
    .await?;
    Ok(axum::Json(Renamed {
        from: body.from,
        to: body.to,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_show_permission_bits_and_exact_names() {
        let entry = file_entry(DirEntry {
            name: b"caf\xe9".to_vec(),
            file_type: FileType::Symlink,
            size: 4,
            mode: 0o120777,
            mtime_sec: 2,
            mtime_nsec: 5_000_000,
            link_target: b"/etc".to_vec(),
        });
        assert_eq!(entry.mode, "777");
        assert_eq!(entry.entry_type, EntryType::Symlink);
        assert_eq!(entry.name, "caf\u{fffd}");
        assert_eq!(entry.name_base64.as_deref(), Some("Y2Fm6Q=="));
        assert_eq!(entry.target.as_deref(), Some("/etc"));
        assert_eq!(entry.mtime_unix_ms, 2005);
        let file = file_entry(DirEntry {
            name: b"plain".to_vec(),
            file_type: FileType::File,
            size: 1,
            mode: 0o100644,
            mtime_sec: 0,
            mtime_nsec: 0,
            link_target: Vec::new(),
        });
        assert_eq!(
            (file.mode.as_str(), file.name_base64, file.target),
            ("644", None, None)
        );
    }

    #[test]
    fn the_root_is_never_removed_or_renamed() {
        for root in ["/", "//"] {
            assert_eq!(
                not_the_root(root, "remove").unwrap_err().code,
                "invalid_path"
            );
        }
        assert!(not_the_root("/tmp", "remove").is_ok());
    }
}
