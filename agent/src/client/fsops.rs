//! The files requests of [`CAP_FILES`]: listings, `lstat`, removal, renames, directories
//! as tar streams, and watches.

use std::io::{Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{
    watch_event_cost, DirEntry, RequestBody, ResponseBody, TarSummary, WatchEvent, WatchKind,
    CAP_FILES,
};

use super::{unexpected, AgentClient, ClientError, Inner, OutputAcker, Result};

/// How long a removal may take: a recursive one of a large tree is slow.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(600);

impl AgentClient {
    /// The entries of the directory `path` (at most `limit`, sorted by name) and whether
    /// some were left out.
    pub fn list_dir(&self, path: &str, limit: u32) -> Result<(Vec<DirEntry>, bool)> {
        self.require(CAP_FILES, "list a directory")?;
        let body = RequestBody::ListDir {
            path: path.to_string(),
            limit,
        };
        match self.call("list_dir", body)? {
            ResponseBody::Listing { entries, truncated } => Ok((entries, truncated)),
            other => Err(unexpected("list_dir", &other)),
        }
    }

    /// `path` itself (a symlink described, not followed).
    pub fn lstat(&self, path: &str) -> Result<DirEntry> {
        self.require(CAP_FILES, "lstat")?;
        let body = RequestBody::Lstat {
            path: path.to_string(),
        };
        match self.call("lstat", body)? {
            ResponseBody::Entry(entry) => Ok(entry),
            other => Err(unexpected("lstat", &other)),
        }
    }

    /// Removes `path` (with `recursive`, a directory and all under it; symlinks are never
    /// followed).
    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.require(CAP_FILES, "remove files")?;
        let body = RequestBody::Remove {
            path: path.to_string(),
            recursive,
        };
        let timeout = if recursive {
            REMOVE_TIMEOUT.max(self.request_timeout)
        } else {
            self.request_timeout
        };
        match self.call_within("remove", body, timeout)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("remove", &other)),
        }
    }

    /// Renames `from` to `to`; without `overwrite` an existing `to` is refused.
    pub fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<()> {
        self.require(CAP_FILES, "rename files")?;
        let body = RequestBody::Rename {
            from: from.to_string(),
            to: to.to_string(),
            overwrite,
        };
        match self.call("rename", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("rename", &other)),
        }
    }

    /// Streams the guest's directory `path` as a tar archive into `out`; returns the
    /// archive's length. A failure to write `out` ends the guest's side at once.
    pub fn read_tar(&self, path: &str, out: impl Write) -> Result<u64> {
        self.require(CAP_FILES, "archive a directory")?;
        let body = RequestBody::ReadTar {
            path: path.to_string(),
        };
        self.download(body, "read_tar", path, out, true)
    }

    /// Extracts the tar archive `content` under the guest's directory `path` (created if
    /// missing); returns what was extracted.
    pub fn write_tar(&self, path: &str, content: impl Read) -> Result<TarSummary> {
        self.require(CAP_FILES, "extract an archive")?;
        let body = RequestBody::WriteTar {
            path: path.to_string(),
        };
        match self.upload(body, path, content)? {
            ResponseBody::Extracted(summary) => Ok(summary),
            other => Err(unexpected("write_tar", &other)),
        }
    }

    /// Starts watching the directory `path` (with `recursive`, and those under it); returns
    /// once the watch is set up, so every change from then on is seen.
    pub fn watch(&self, path: &str, recursive: bool) -> Result<Watch> {
        self.require(CAP_FILES, "watch a directory")?;
        let stream = self.inner.register()?;
        let id = stream.id;
        let body = RequestBody::Watch {
            path: path.to_string(),
            recursive,
        };
        if let Err(err) = self.inner.send(id, body) {
            self.inner.unregister(id);
            return Err(err);
        }
        let acker = OutputAcker::new(&stream);
        let mut watch = Watch {
            inner: self.inner.clone(),
            id,
            rx: stream.rx,
            acker,
            ended: false,
        };
        match self.next_response("setting up a watch", id, &watch.rx)? {
            ResponseBody::Watch(event) if event.kind == WatchKind::Watching => {
                watch.consumed(&event);
                Ok(watch)
            }
            ResponseBody::Error(err) => {
                watch.ended = true;
                Err(ClientError::Remote(err))
            }
            other => Err(unexpected("watch", &other)),
        }
    }
}

/// What [`Watch::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchNext {
    Event(WatchEvent),
    /// Nothing happened within the wait.
    Idle,
    /// The watch ended: its directory went away (a `Delete` of it came first), or the agent
    /// ended it.
    Ended,
}

/// A running watch. Dropping it ends the watch in the guest.
pub struct Watch {
    inner: Arc<Inner>,
    id: u64,
    rx: Receiver<ResponseBody>,
    acker: OutputAcker,
    ended: bool,
}

impl Watch {
    /// The next change, waiting at most `wait`.
    pub fn next(&mut self, wait: Duration) -> Result<WatchNext> {
        if self.ended {
            return Ok(WatchNext::Ended);
        }
        let body = match self.rx.recv_timeout(wait) {
            Ok(body) => body,
            Err(RecvTimeoutError::Timeout) => return Ok(WatchNext::Idle),
            Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                return Err(self.inner.disconnected());
            }
        };
        match body {
            ResponseBody::Watch(event) => {
                self.consumed(&event);
                Ok(WatchNext::Event(event))
            }
            ResponseBody::Done { .. } => {
                self.ended = true;
                Ok(WatchNext::Ended)
            }
            ResponseBody::Error(err) => {
                self.ended = true;
                Err(ClientError::Remote(err))
            }
            other => {
                self.ended = true;
                self.inner.unregister(self.id);
                Err(unexpected("watch", &other))
            }
        }
    }

    fn consumed(&mut self, event: &WatchEvent) {
        self.acker.consumed(&self.inner, watch_event_cost(event));
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.cancel(self.id);
        }
    }
}
