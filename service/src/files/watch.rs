//! `GET /sandboxes/{id}/files/watch`: changes under a guest directory as an NDJSON stream,
//! from inotify in the guest, for as long as the client listens.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use ember_agent::client::{ClientError, WatchNext};
use ember_agent::protocol::{WatchEvent, WatchKind};
use ember_client::files::{WatchEventType, WatchQuery, WatchRecord};

use super::manage::text_and_base64;
use super::{check_guest_path, FileFailures};
use crate::error::{from_agent_on_dir, ApiError};
use crate::{parse_query, AppState, QueryResult};

/// How often a watch with nothing to say looks whether its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(500);

/// Lines waiting for a slow client; beyond them the guest's events wait in its window and
/// then are counted as lost (`overflow`).
const QUEUED_LINES: usize = 64;

/// One NDJSON line.
fn line(record: &WatchRecord) -> Bytes {
    let mut text = serde_json::to_vec(record).unwrap_or_default();
    text.push(b'\n');
    Bytes::from(text)
}

fn record(event: WatchEventType, path: &[u8], is_dir: bool) -> WatchRecord {
    let (path, path_base64) = text_and_base64(path);
    WatchRecord {
        event,
        path,
        path_base64,
        from: None,
        from_base64: None,
        is_dir,
        dropped: None,
        message: None,
    }
}

/// The API's record of an agent's watch event.
pub(crate) fn watch_record(event: &WatchEvent) -> WatchRecord {
    let kind = match event.kind {
        WatchKind::Watching => WatchEventType::Watching,
        WatchKind::Create => WatchEventType::Create,
        WatchKind::Modify => WatchEventType::Modify,
        WatchKind::Delete => WatchEventType::Delete,
        WatchKind::Rename => WatchEventType::Rename,
        WatchKind::Overflow => WatchEventType::Overflow,
    };
    let mut out = record(kind, &event.path, event.is_dir);
    if event.kind == WatchKind::Rename {
        let (from, from_base64) = text_and_base64(&event.from);
        out.from = Some(from);
        out.from_base64 = from_base64;
    }
    if event.kind == WatchKind::Overflow {
        out.dropped = Some(event.dropped);
    }
    out
}

#[utoipa::path(get, path = "/sandboxes/{id}/files/watch", tag = "files", operation_id = "watch_files",
    params(crate::api::SandboxId, WatchQuery),
    responses(
        (status = 200, description = "NDJSON, one event per line: first `watching`, then `create`, `modify`, `delete`, `rename` (with `from`) and `overflow` (events lost to a slow reader) until the client goes away or the directory does",
            content_type = "application/x-ndjson", body = WatchRecord),
        FileFailures))]
/// `GET /sandboxes/{id}/files/watch?path=/dir[&recursive=true]`
pub async fn watch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: QueryResult<WatchQuery>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    check_guest_path(&query.path)?;
    let sandbox = state.sandbox(&id)?;
    sandbox.require_running()?;
    let agent = sandbox.agent().await?;
    let turn = sandbox.agent_turn().await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED_LINES);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), ClientError>>();
    let path = query.path.clone();
    let recursive = query.recursive;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut watch = match agent.watch(&path, recursive) {
            Ok(watch) => watch,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        let first = record(WatchEventType::Watching, path.as_bytes(), true);
        if tx.blocking_send(line(&first)).is_err() {
            return;
        }
        // Dropping `watch` (the client went away, or it ended) ends it in the guest.
        while !tx.is_closed() {
            let next = match watch.next(CLIENT_CHECK) {
                Ok(WatchNext::Event(event)) => line(&watch_record(&event)),
                Ok(WatchNext::Idle) => continue,
                Ok(WatchNext::Ended) => return,
                Err(e) => {
                    let mut failed = record(WatchEventType::Error, path.as_bytes(), true);
                    failed.message = Some(format!("watching {path}: {e}"));
                    let _ = tx.blocking_send(line(&failed));
                    return;
                }
            };
            if tx.blocking_send(next).is_err() {
                return;
            }
        }
    });
    let what = format!("watching {}", query.path);
    ready_rx
        .await
        .map_err(|_| ApiError::internal("the watch's thread ended"))?
        .map_err(|e| from_agent_on_dir(&what, e))?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (Ok::<Bytes, std::io::Error>(item), rx))
    });
    Ok(crate::api::ndjson_response(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_records() {
        let rename = watch_record(&WatchEvent {
            kind: WatchKind::Rename,
            path: b"/d/new".to_vec(),
            from: b"/d/\xffold".to_vec(),
            is_dir: false,
            dropped: 0,
        });
        assert_eq!(rename.event, WatchEventType::Rename);
        assert_eq!(rename.from.as_deref(), Some("/d/\u{fffd}old"));
        assert!(rename.from_base64.is_some() && rename.path_base64.is_none());
        let overflow = watch_record(&WatchEvent {
            kind: WatchKind::Overflow,
            path: Vec::new(),
            from: Vec::new(),
            is_dir: false,
            dropped: 7,
        });
        assert_eq!(overflow.dropped, Some(7));
        assert_eq!(
            std::str::from_utf8(&line(&overflow)).unwrap(),
            "{\"type\":\"overflow\",\"path\":\"\",\"is_dir\":false,\"dropped\":7}\n"
        );
    }
}
