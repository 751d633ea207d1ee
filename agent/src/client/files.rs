//! Files in the guest: written and read in chunks under the stream windows, `mkdir -p`,
//! `stat`.

use std::io::{self, Read, Write};

use crate::protocol::{FileStat, RequestBody, ResponseBody, MAX_CHUNK};

use super::{unexpected, AgentClient, ClientError, OutputAcker, Registered, Result};

impl AgentClient {
    /// Writes `content` to `path` in the guest (created with `mode`, parents created,
    /// truncated if it exists); returns the bytes written.
    pub fn write_file(&self, path: &str, mode: u32, content: impl Read) -> Result<u64> {
        let start = RequestBody::WriteFile {
            path: path.to_string(),
            mode,
            create_parents: true,
        };
        match self.upload(start, path, content)? {
            ResponseBody::Done { bytes } => Ok(bytes),
            other => Err(unexpected("write_file", &other)),
        }
    }

    /// Sends `start`, then `content` as `FileData` under the window and `FileEnd`; returns
    /// the final answer (an error answer as [`ClientError::Remote`]).
    pub(super) fn upload(
        &self,
        start: RequestBody,
        path: &str,
        mut content: impl Read,
    ) -> Result<ResponseBody> {
        let Registered { id, rx, credit, .. } = self.inner.register()?;
        if let Err(err) = self.inner.send(id, start) {
            self.inner.unregister(id);
            return Err(err);
        }
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut local_error = None;
        loop {
            let n = match content.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    local_error = Some(err);
                    break;
                }
            };
            // `false`: the agent already answered (an error) or the connection is gone; a
            // window that stays full past the request timeout is a silent agent.
            match credit.acquire_within(n as u64, self.request_timeout) {
                Some(true) => {}
                Some(false) => break,
                None => {
                    self.inner.unregister(id);
                    return Err(ClientError::Timeout {
                        what: format!("room in its window for {path:?} (request {id})"),
                        timeout: self.request_timeout,
                    });
                }
            }
            let data = buf[..n].to_vec();
            if let Err(err) = self.inner.send(id, RequestBody::FileData { data }) {
                self.inner.unregister(id);
                return Err(err);
            }
        }
        self.inner.send(id, RequestBody::FileEnd).ok();
        let result = match self.next_response("the end of an upload", id, &rx) {
            Ok(ResponseBody::Error(err)) => Err(ClientError::Remote(err)),
            other => other,
        };
        match local_error {
            Some(source) => Err(ClientError::Local {
                what: format!("reading the content for {path:?} (the guest's copy is partial)"),
                source,
            }),
            None => result,
        }
    }

    /// Streams the guest's `path` into `out`; returns the bytes read.
    pub fn read_file(&self, path: &str, out: impl Write) -> Result<u64> {
        let body = RequestBody::ReadFile {
            path: path.to_string(),
        };
        self.download(body, "read_file", path, out, false)
    }

    /// Sends `start` and writes the `FileChunk`s it answers into `out` until `Done`;
    /// returns `Done`'s bytes. With `cancel_on_local_error`, a failure to write `out` ends
    /// the stream at once (`Cancel`); otherwise the rest is read and dropped.
    pub(super) fn download(
        &self,
        start: RequestBody,
        what: &'static str,
        path: &str,
        mut out: impl Write,
        cancel_on_local_error: bool,
    ) -> Result<u64> {
        let stream = self.inner.register()?;
        let id = stream.id;
        if let Err(err) = self.inner.send(id, start) {
            self.inner.unregister(id);
            return Err(err);
        }
        let mut acker = OutputAcker::new(&stream);
        let mut local_error = None;
        let local = |source| ClientError::Local {
            what: format!("writing the content of {path:?}"),
            source,
        };
        loop {
            // Each chunk within the request timeout: a stream that stops flowing is a silent
            // agent.
            match self.next_response("the next chunk of a file", id, &stream.rx) {
                Ok(ResponseBody::FileChunk { data }) => {
                    if local_error.is_none() {
                        local_error = out.write_all(&data).err();
                    }
                    acker.consumed(&self.inner, data.len() as u64);
                    if cancel_on_local_error {
                        if let Some(source) = local_error.take() {
                            self.cancel(id);
                            return Err(local(source));
                        }
                    }
                }
                Ok(ResponseBody::Done { bytes }) => {
                    return match local_error.or_else(|| out.flush().err()) {
                        Some(source) => Err(local(source)),
                        None => Ok(bytes),
                    };
                }
                Ok(ResponseBody::Error(err)) => return Err(ClientError::Remote(err)),
                Ok(other) => {
                    self.inner.unregister(id);
                    return Err(unexpected(what, &other));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Ends the stream of request `id` (`Cancel`, not waiting for its answer) and forgets
    /// it: whatever the agent still sends for it is dropped.
    pub(super) fn cancel(&self, id: u64) {
        self.inner.cancel(id);
    }

    /// `mkdir -p path`; created directories get `mode`.
    pub fn mkdir_p(&self, path: &str, mode: u32) -> Result<()> {
        let body = RequestBody::Mkdir {
            path: path.to_string(),
            mode,
        };
        match self.call("mkdir", body)? {
            ResponseBody::Done { .. } => Ok(()),
            other => Err(unexpected("mkdir", &other)),
        }
    }

    /// Size, mode, type and mtime of `path` (symlinks followed).
    pub fn stat(&self, path: &str) -> Result<FileStat> {
        let body = RequestBody::Stat {
            path: path.to_string(),
        };
        match self.call("stat", body)? {
            ResponseBody::StatResult(stat) => Ok(stat),
            other => Err(unexpected("stat", &other)),
        }
    }
}
