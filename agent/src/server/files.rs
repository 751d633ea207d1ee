//! File requests: writing and reading files in chunks under the stream windows, `mkdir -p`
//! and `stat`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::mpsc::Receiver;

use crate::protocol::{
    Credit, ErrorKind, FileStat, FileType, RemoteError, ResponseBody, MAX_CHUNK,
};

use super::{absolute_path, Acker, Chunk, Conn};

/// Writes a `WriteFile`'s content; `Ok(None)` when the connection closed before `FileEnd`.
pub(super) fn write_file(
    conn: &Conn,
    path: &str,
    mode: u32,
    create_parents: bool,
    rx: &Receiver<Chunk>,
    acker: &mut Acker,
) -> Result<Option<u64>, RemoteError> {
    let file_path = absolute_path(path)?;
    if create_parents {
        if let Some(parent) = file_path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|err| {
                    RemoteError::from_io(format!("create the parents of {path:?}"), &err)
                })?;
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(file_path)
        .map_err(|err| RemoteError::from_io(format!("open {path:?} for writing"), &err))?;
    // Exactly `mode`, whatever the umask or an existing file's mode. Not for devices and
    // FIFOs that a caller may write to on purpose: only regular files.
    let meta = file
        .metadata()
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    if meta.is_file() {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|err| RemoteError::from_io(format!("chmod {mode:o} {path:?}"), &err))?;
    }
    let mut written = 0u64;
    loop {
        match rx.recv() {
            Ok(Chunk::Data(data)) => {
                file.write_all(&data).map_err(|err| {
                    RemoteError::from_io(format!("write {path:?} at offset {written}"), &err)
                })?;
                written += data.len() as u64;
                acker.consumed(conn, data.len() as u64);
            }
            Ok(Chunk::End) => break,
            // The connection closed, or the upload was refused, before FileEnd.
            Err(_) => return Ok(None),
        }
    }
    file.flush()
        .map_err(|err| RemoteError::from_io(format!("flush {path:?}"), &err))?;
    Ok(Some(written))
}

pub(super) fn read_file(
    conn: &Conn,
    id: u64,
    path: &str,
    credit: &Credit,
) -> Result<u64, RemoteError> {
    let file_path = absolute_path(path)?;
    let mut file = File::open(file_path)
        .map_err(|err| RemoteError::from_io(format!("open {path:?} for reading"), &err))?;
    let meta = file
        .metadata()
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    if meta.is_dir() {
        return Err(RemoteError {
            kind: ErrorKind::InvalidInput,
            errno: Some(libc::EISDIR),
            message: format!("cannot read {path:?}: it is a directory"),
        });
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return Err(RemoteError::from_io(
                    format!("read {path:?} at offset {total}"),
                    &err,
                ))
            }
        };
        if !credit.acquire(n as u64)
            || !conn.send(
                id,
                ResponseBody::FileChunk {
                    data: buf[..n].to_vec(),
                },
            )
        {
            return Err(RemoteError::new(ErrorKind::Io, "connection closed"));
        }
        total += n as u64;
    }
}

pub(super) fn mkdir_p(path: &str, mode: u32) -> Result<(), RemoteError> {
    let dir = absolute_path(path)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode & 0o7777)
        .create(dir)
        .map_err(|err| RemoteError::from_io(format!("mkdir -p {path:?}"), &err))
}

pub(super) fn stat(path: &str) -> Result<FileStat, RemoteError> {
    let file_path = absolute_path(path)?;
    let meta = std::fs::metadata(file_path)
        .map_err(|err| RemoteError::from_io(format!("stat {path:?}"), &err))?;
    let file_type = if meta.is_file() {
        FileType::File
    } else if meta.is_dir() {
        FileType::Dir
    } else if meta.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    };
    Ok(FileStat {
        size: meta.len(),
        mode: meta.mode(),
        file_type,
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    })
}
