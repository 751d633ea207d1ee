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
    write_atomic_with(tmp, dest, data, None)
}

/// Who may read a file ember writes: its owner only (mode 0600), or also one group (0640,
/// the group set explicitly), whatever the umask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Access {
    pub group: Option<u32>,
}

impl Access {
    fn file_mode(&self) -> u32 {
        if self.group.is_some() {
            0o640
        } else {
            0o600
        }
    }

    /// Gives an open file its mode and group.
    pub(crate) fn apply(&self, file: &File) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.group {
            std::os::unix::fs::fchown(file, None, Some(gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(self.file_mode()))
    }

    /// Gives a directory its mode (0700, or 0750 with a group) and group.
    pub(crate) fn apply_to_dir(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(dir, None, Some(gid))?;
        }
        let mode = if self.group.is_some() { 0o750 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
    }

    /// Options creating a file with this access's mode.
    pub(crate) fn create_new(&self) -> OpenOptions {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create_new(true)
            .mode(self.file_mode());
        options
    }
}

/// As [`write_atomic`], the file given `access`'s mode and group (without one, the umask
/// decides).
pub(crate) fn write_atomic_with(
    tmp: &Path,
    dest: &Path,
    data: &[u8],
    access: Option<&Access>,
) -> io::Result<()> {
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        if let Some(access) = access {
            access.apply(&f)?;
        }
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
