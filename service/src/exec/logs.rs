//! A command's output kept in the order it came (both streams in one bounded ring), and
//! `GET …/commands/{cid}/logs`, which replays it and follows a running command to its end.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use ember_agent::client::OutputStream;
use ember_client::responses::OutputRecord;
use ember_client::types::ErrorDocument;

use super::{command, exit_line, ndjson, output_line, CommandRecord};
use crate::error::ApiError;
use crate::AppState;

/// Output kept per command, both streams together (the newest bytes win).
pub(super) const LOG_LIMIT: usize = 8 << 20;

/// The newest [`LOG_LIMIT`] bytes of a command's output in arrival order. Chunks are
/// numbered from the command's start, so a reader that has seen chunks up to `n` asks for
/// those after it even when older ones were dropped meanwhile.
#[derive(Default)]
pub(super) struct OutputLog {
    chunks: VecDeque<(OutputStream, Bytes)>,
    /// The number of `chunks[0]`.
    first_seq: u64,
    kept: usize,
    /// Bytes dropped per stream (stdout, stderr).
    dropped: [u64; 2],
}

fn index(stream: OutputStream) -> usize {
    usize::from(stream == OutputStream::Stderr)
}

impl OutputLog {
    pub(super) fn push(&mut self, stream: OutputStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.chunks
            .push_back((stream, Bytes::copy_from_slice(data)));
        self.kept += data.len();
        while self.kept > LOG_LIMIT {
            let Some((oldest_stream, oldest)) = self.chunks.front_mut() else {
                break;
            };
            let excess = self.kept - LOG_LIMIT;
            let cut = excess.min(oldest.len());
            self.dropped[index(*oldest_stream)] += cut as u64;
            self.kept -= cut;
            if cut == oldest.len() {
                self.chunks.pop_front();
                self.first_seq += 1;
            } else {
                *oldest = oldest.slice(cut..);
            }
        }
    }

    /// One stream's kept bytes.
    pub(super) fn stream(&self, stream: OutputStream) -> Vec<u8> {
        self.chunks
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, data)| data.iter().copied())
            .collect()
    }

    pub(super) fn dropped(&self, stream: OutputStream) -> u64 {
        self.dropped[index(stream)]
    }

    /// The kept chunks numbered `next` and after, and the number after the newest.
    pub(super) fn since(&self, next: u64) -> (Vec<(OutputStream, Bytes)>, u64) {
        let skip = next.saturating_sub(self.first_seq) as usize;
        let chunks = self.chunks.iter().skip(skip).cloned().collect();
        (chunks, self.first_seq + self.chunks.len() as u64)
    }
}

/// Where a logs reader is.
struct Follow {
    record: Arc<CommandRecord>,
    next: u64,
    pending: VecDeque<Bytes>,
    ended: bool,
}

impl Follow {
    /// The next NDJSON line, waiting for the command when it has nothing new yet.
    async fn next_line(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(line), self));
            }
            if self.ended {
                return None;
            }
            // Registered before looking, so output that comes in between still wakes it.
            let notified = self.record.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (chunks, next, exit) = self.record.output_since(self.next);
            self.next = next;
            self.pending.extend(
                chunks
                    .iter()
                    .map(|(stream, data)| output_line(*stream, data)),
            );
            if let Some((exit, duration_ms)) = exit {
                self.pending.push_back(exit_line(&exit, duration_ms));
                self.ended = true;
            } else if self.pending.is_empty() {
                notified.await;
            }
        }
    }
}

#[utoipa::path(get, path = "/sandboxes/{id}/commands/{cid}/logs", tag = "commands",
    params(crate::api::SandboxId, super::CommandId),
    responses(
        (status = 200, description = "The command's kept output in the order it came (at most 8 MiB, the newest; a `started` record, `stdout`/`stderr` records), following a running command, then its `exit` record",
            content_type = "application/x-ndjson", body = OutputRecord),
        (status = 404, description = "No such sandbox or command", body = ErrorDocument)))]
/// `GET /sandboxes/{id}/commands/{cid}/logs`
pub async fn command_logs(
    State(state): State<Arc<AppState>>,
    Path((id, cid)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let sandbox = state.sandbox(&id)?;
    let record = command(&sandbox, &cid)?;
    let head = ndjson(&OutputRecord::Started {
        cmd_id: record.id.clone(),
        pid: record.pid(),
    });
    let follow = Follow {
        record,
        next: 0,
        pending: VecDeque::from([head]),
        ended: false,
    };
    let stream = futures_util::stream::unfold(follow, Follow::next_line);
    Ok(crate::api::ndjson_response(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_arrival_order_across_streams() {
        let mut log = OutputLog::default();
        log.push(OutputStream::Stdout, b"a");
        log.push(OutputStream::Stderr, b"b");
        log.push(OutputStream::Stdout, b"c");
        let (chunks, next) = log.since(0);
        let order: Vec<_> = chunks.iter().map(|(s, d)| (*s, d.clone())).collect();
        assert_eq!(
            order,
            vec![
                (OutputStream::Stdout, Bytes::from_static(b"a")),
                (OutputStream::Stderr, Bytes::from_static(b"b")),
                (OutputStream::Stdout, Bytes::from_static(b"c")),
            ]
        );
        assert_eq!(next, 3);
        assert_eq!(log.stream(OutputStream::Stdout), b"ac");
        assert_eq!(log.since(2).0.len(), 1);
        assert!(log.since(3).0.is_empty());
    }

    #[test]
    fn the_ring_drops_the_oldest_bytes_and_counts_them_per_stream() {
        let mut log = OutputLog::default();
        let half = vec![b'x'; LOG_LIMIT / 2];
        log.push(OutputStream::Stderr, &half);
        log.push(OutputStream::Stdout, &half);
        log.push(OutputStream::Stdout, b"12345");
        assert_eq!(log.dropped(OutputStream::Stderr), 5);
        assert_eq!(log.dropped(OutputStream::Stdout), 0);
        assert_eq!(log.kept, LOG_LIMIT);
        // A reader past the dropped chunks keeps its place.
        log.push(OutputStream::Stdout, &vec![b'y'; LOG_LIMIT / 2]);
        assert_eq!(log.first_seq, 1);
        let (chunks, next) = log.since(2);
        assert_eq!(next, 4);
        assert_eq!(chunks.len(), 2);
        // One that had read nothing starts at the oldest kept chunk.
        assert_eq!(log.since(0).0.len(), 3);
    }
}
