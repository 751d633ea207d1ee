//! Directories as tar streams: `ReadTar` writes an archive into `FileChunk`s under the
//! stream's window, `WriteTar` extracts the `FileData` the host sends (see
//! [`crate::tarball`]).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc::Receiver;

use crate::protocol::{Credit, ErrorKind, RemoteError, ResponseBody, TarSummary, MAX_CHUNK};
use crate::tarball::{self, ExtractOptions, TarError};

use super::{absolute_path, Acker, Chunk, Conn};

/// The agent's account of a failed archive operation.
pub(super) fn tar_error(err: &TarError) -> RemoteError {
    let message = err.to_string();
    match err {
        TarError::Refused { .. } | TarError::Read { .. } | TarError::PseudoFilesystem { .. } => {
            RemoteError::new(ErrorKind::InvalidInput, message)
        }
        TarError::NotADirectory { .. } => RemoteError {
            kind: ErrorKind::InvalidInput,
            errno: Some(libc::ENOTDIR),
            message,
        },
        TarError::Entry { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ELOOP) | Some(libc::ENOTDIR)
            ) =>
        {
            // A symlink or a file where the entry needs a folder: refused, not a failure
            // (and no errno: ENOTDIR would say the destination is not a folder).
            RemoteError::new(ErrorKind::InvalidInput, message)
        }
        TarError::OpenRoot { source, .. }
        | TarError::Entry { source, .. }
        | TarError::Walk { source, .. }
        | TarError::Write { source } => {
            let mut error = RemoteError::from_io("", source);
            error.message = message;
            error
        }
    }
}

/// Sends what the archive writer writes as `FileChunk`s of up to [`MAX_CHUNK`] bytes, each
/// after taking its room in the window.
struct ChunkWriter<'a> {
    conn: &'a Conn,
    id: u64,
    credit: &'a Credit,
    buf: Vec<u8>,
    sent: u64,
}

impl ChunkWriter<'_> {
    fn send(&mut self, len: usize) -> io::Result<()> {
        let data: Vec<u8> = self.buf.drain(..len).collect();
        if !self.credit.acquire(data.len() as u64)
            || !self.conn.send(self.id, ResponseBody::FileChunk { data })
        {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was cancelled or the connection closed",
            ));
        }
        self.sent += len as u64;
        Ok(())
    }
}

impl Write for ChunkWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= MAX_CHUNK {
            self.send(MAX_CHUNK)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send(self.buf.len())?;
        }
        Ok(())
    }
}

/// Streams the directory `path` as a tar archive; returns the archive's length.
pub(super) fn read_tar(
    conn: &Conn,
    id: u64,
    path: &str,
    credit: &Credit,
) -> Result<u64, RemoteError> {
    let root = absolute_path(path)?;
    let writer = ChunkWriter {
        conn,
        id,
        credit,
        buf: Vec::with_capacity(2 * MAX_CHUNK),
        sent: 0,
    };
    let (_, mut writer) = tarball::write_tree(root, writer).map_err(|e| tar_error(&e))?;
    writer
        .flush()
        .map_err(|err| RemoteError::from_io(format!("archive {path:?}"), &err))?;
    Ok(writer.sent)
}

/// The `FileData` of a `WriteTar` as a reader; acknowledges what it takes.
struct ChannelReader<'a> {
    conn: &'a Conn,
    rx: &'a Receiver<Chunk>,
    acker: &'a mut Acker,
    chunk: Vec<u8>,
    offset: usize,
    ended: bool,
    /// The channel closed before `FileEnd`: the connection is gone or the upload refused.
    aborted: bool,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.offset == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(data)) => {
                    self.acker.consumed(self.conn, data.len() as u64);
                    self.chunk = data;
                    self.offset = 0;
                }
                Ok(Chunk::End) => self.ended = true,
                Err(_) => {
                    self.aborted = true;
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the upload ended before its end",
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.offset);
        buf[..n].copy_from_slice(&self.chunk[self.offset..self.offset + n]);
        self.offset += n;
        Ok(n)
    }
}

/// Extracts a `WriteTar`'s archive under `path`; `Ok(None)` when the connection closed
/// before `FileEnd`.
pub(super) fn write_tar(
    conn: &Conn,
    path: &str,
    rx: &Receiver<Chunk>,
    acker: &mut Acker,
) -> Result<Option<TarSummary>, RemoteError> {
    let dest = absolute_path(path)?;
    let mut reader = ChannelReader {
        conn,
        rx,
        acker,
        chunk: Vec::new(),
        offset: 0,
        ended: false,
        aborted: false,
    };
    let extracted = tarball::extract(&mut reader, Path::new(dest), ExtractOptions::default());
    if reader.aborted {
        return Ok(None);
    }
    let summary = extracted.map_err(|e| tar_error(&e))?;
    // The archive's end marker came; what follows it (the record's padding) is read and
    // dropped so the host's stream ends as usual.
    match io::copy(&mut reader, &mut io::sink()) {
        Ok(_) => Ok(Some(summary)),
        Err(_) => Ok(None),
    }
}
