//! Small file-system helpers: `flock`, directory fsync, atomic file replacement.
//! They return `std::io::Error`; callers attach the path.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Which `flock` to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: `flock` only reads the descriptor number, which `file` keeps open for the
        // duration of the call; it touches no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Takes a blocking lock on `file`; released when the file is closed.
pub(crate) fn lock(file: &File, mode: LockMode) -> io::Result<()> {
    flock(
        file,
        match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        },
    )
}

/// Tries an exclusive lock without waiting: `Ok(false)` when someone else holds a lock.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tries a shared lock without waiting: `Ok(false)` when someone holds it exclusively.
pub(crate) fn try_lock_shared(file: &File) -> io::Result<bool> {
    match flock(file, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// A held lock on the store's lock file: dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct LockGuard {
    _file: File,
}

/// Opens (creating if needed) `path` and locks it in `mode`, waiting as long as needed.
pub(crate) fn lock_path(path: &Path, mode: LockMode) -> io::Result<LockGuard> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    lock(&file, mode)?;
    Ok(LockGuard { _file: file })
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `data` to `tmp`, fsyncs it, renames it to `dest` and fsyncs the directory that
/// holds both (they must share one directory).
pub(crate) fn write_atomic(tmp: &Path, dest: &Path, data: &[u8]) -> io::Result<()> {
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(tmp, dest)?;
        match dest.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}
