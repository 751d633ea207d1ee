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
/// A lock file on a read-only mount (a VMM's view of the shared store) is opened for
/// reading: `flock` needs no write access.
pub(crate) fn lock_path(path: &Path, mode: LockMode) -> io::Result<LockGuard> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) => {
            File::open(path).map_err(|_| e)?
        }
        Err(e) => return Err(e),
    };
    lock(&file, mode)?;
    Ok(LockGuard { _file: file })
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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

    /// Gives an open file its mode and group. Only what differs is changed: a file created
    /// with the mode already needs no call a sandboxed writer may lack (`fchmod`).
    pub(crate) fn apply(&self, file: &File) -> io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = file.metadata()?;
        if let Some(gid) = self.group.filter(|&g| g != meta.gid()) {
            std::os::unix::fs::fchown(file, None, Some(gid))?;
        }
        if meta.mode() & 0o7777 != self.file_mode() {
            file.set_permissions(std::fs::Permissions::from_mode(self.file_mode()))?;
        }
        Ok(())
    }

    fn dir_mode(&self) -> u32 {
        if self.group.is_some() {
            0o750
        } else {
            0o700
        }
    }

    /// Gives a directory its mode (0700, or 0750 with a group) and group, changing only what
    /// differs.
    pub(crate) fn apply_to_dir(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(dir)?;
        if let Some(gid) = self.group.filter(|&g| g != meta.gid()) {
            std::os::unix::fs::chown(dir, None, Some(gid))?;
        }
        if meta.mode() & 0o7777 != self.dir_mode() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(self.dir_mode()))?;
        }
        Ok(())
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

/// Creates `dir` (and its parents) if it is missing, giving the directory itself
/// `access`'s mode and group; an existing directory is left as it is (it may be on a
/// read-only mount).
pub(crate) fn ensure_dir(dir: &Path, access: &Access) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(access.dir_mode())
        .create(dir)?;
    access.apply_to_dir(dir)
}

/// Writes `data` to `tmp`, fsyncs it, renames it to `dest` and fsyncs the directory that
/// holds both (they must share one directory). The file gets `access`'s mode and group
/// (without one, the umask decides).
pub(crate) fn write_atomic_with(
    tmp: &Path,
    dest: &Path,
    data: &[u8],
    access: Option<&Access>,
) -> io::Result<()> {
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if let Some(access) = access {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, access.file_mode());
        }
        let mut f = options.open(tmp)?;
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
