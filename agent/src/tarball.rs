//! Directories as tar archives, both ways: [`write_tree`] archives a directory (symlinks kept
//! as symlinks, never followed) and [`extract`] unpacks an archive under a directory that
//! no entry may leave. The agent uses both in the guest (`ReadTar`, `WriteTar`); the CLI
//! uses them on the host (`ember cp -r`), where the archive comes from a guest and is
//! untrusted.
//!
//! Extraction walks every entry's path from an open descriptor of the target directory, one
//! component at a time, with `O_NOFOLLOW`: an entry with an absolute path or a `..`
//! component is refused, and so is one whose parent folder is a symlink (an earlier entry
//! cannot plant `link -> /etc` and then write `link/passwd`). A file or symlink replaces what
//! was at its name (unlinked first, then created with `O_EXCL`), so an existing symlink is
//! replaced, never written through. Devices, FIFOs, sockets and hard links are skipped and
//! counted.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::TarSummary;

/// How [`extract`] treats permission bits.
#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    /// The bits of each entry's mode kept: `0o7777` in the guest; `0o777` on a host, where
    /// an archive from a guest must not bring set-uid files.
    pub mode_mask: u32,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self { mode_mask: 0o7777 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("cannot open the folder {path:?}: {source}")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path:?} is not a folder")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path:?} is on one of the kernel's pseudo filesystems (proc, sysfs, …), whose file \
         sizes are not their contents: it is not archived"
    )]
    PseudoFilesystem { path: PathBuf },
    #[error("reading the archive: {source}")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("archive entry {entry:?} was refused: {why}")]
    Refused { entry: String, why: &'static str },
    #[error("archive entry {entry:?}: {what}: {source}")]
    Entry {
        entry: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("archiving {path:?}: {what}: {source}")]
    Walk {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("writing the archive: {source}")]
    Write {
        #[source]
        source: io::Error,
    },
}

impl TarError {
    /// The OS error behind this one, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::OpenRoot { source, .. }
            | Self::Read { source }
            | Self::Entry { source, .. }
            | Self::Walk { source, .. }
            | Self::Write { source } => Some(source),
            Self::NotADirectory { .. } | Self::PseudoFilesystem { .. } | Self::Refused { .. } => {
                None
            }
        }
    }
}

/// Magic numbers (`statfs`'s `f_type`) of the kernel's pseudo filesystems: proc, sysfs,
/// debugfs, tracefs, securityfs.
const PSEUDO_FILESYSTEMS: &[i64] = &[0x9fa0, 0x6265_6572, 0x6462_6720, 0x7472_6163, 0x7363_6673];

/// Whether `dir` is on one of [`PSEUDO_FILESYSTEMS`].
fn on_pseudo_filesystem(dir: &Path) -> io::Result<bool> {
    let path = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated; `stats` is a valid statfs for the kernel to fill.
    cvt(unsafe { libc::statfs(path.as_ptr(), &mut stats) })?;
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs.
    Ok(PSEUDO_FILESYSTEMS.contains(&(stats.f_type as i64)))
}

/// Archives the directory `root` (followed if it is a symlink) into `out`, its entries'
/// paths relative to it, sorted, the root itself left out. Symlinks under it are stored as
/// symlinks; devices, FIFOs and sockets are skipped. Like `tar --one-file-system`, it keeps
/// to `root`'s filesystem: a folder where another is mounted is stored empty. A root on a
/// kernel pseudo filesystem (`/proc`, `/sys`) is refused. Returns what it wrote and `out`.
pub fn write_tree<W: Write>(root: &Path, out: W) -> Result<(TarSummary, W), TarError> {
    let open_root = |source| TarError::OpenRoot {
        path: root.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(root).map_err(open_root)?;
    if !meta.is_dir() {
        return Err(TarError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    if on_pseudo_filesystem(root).map_err(open_root)? {
        return Err(TarError::PseudoFilesystem {
            path: root.to_path_buf(),
        });
    }
    let device = meta.dev();
    let mut builder = tar::Builder::new(out);
    let mut summary = TarSummary::default();
    // Depth first, each folder's entries in name order: (absolute, relative) paths.
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(root.to_path_buf(), PathBuf::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let walk = |what, source| TarError::Walk {
            path: dir.clone(),
            what,
            source,
        };
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| walk("read the folder", e))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| walk("read the folder", e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let rel = rel_dir.join(&name);
            let fail = |what, source| TarError::Walk {
                path: path.clone(),
                what,
                source,
            };
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Gone since the folder was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(fail("lstat", e)),
            };
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let file_type = meta.file_type();
            let written = if file_type.is_dir() {
                header.set_size(0);
                summary.dirs += 1;
                if meta.dev() == device {
                    subdirs.push((path.clone(), rel.clone()));
                }
                builder.append_data(&mut header, &rel, io::empty())
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| fail("readlink", e))?;
                header.set_size(0);
                summary.symlinks += 1;
                builder.append_link(&mut header, &rel, &target)
            } else if file_type.is_file() {
                // O_NOFOLLOW | O_NONBLOCK: what is there now may no longer be that file
                // (a symlink, a FIFO that would block).
                let file = match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(fail("open", e)),
                };
                let meta = file.metadata().map_err(|e| fail("fstat", e))?;
                if !meta.is_file() {
                    summary.skipped += 1;
                    continue;
                }
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                summary.files += 1;
                summary.bytes += meta.len();
                builder.append_data(&mut header, &rel, exactly(file, meta.len()))
            } else {
                summary.skipped += 1;
                continue;
            };
            written.map_err(|source| TarError::Write { source })?;
        }
        // Popped last first: push in reverse so the folders come out in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    let out = builder
        .into_inner()
        .map_err(|source| TarError::Write { source })?;
    Ok((summary, out))
}

/// `reader`'s first `len` bytes, padded with zeros if it ends sooner: a file that shrinks
/// while it is archived cannot break the archive's framing.
fn exactly(reader: impl Read, len: u64) -> impl Read {
    reader.take(len).chain(io::repeat(0)).take(len)
}

/// Unpacks the tar archive `reader` under `dest` (created with its parents if missing; a
/// symlink there is followed, since the caller named it). Stops at the archive's end marker
/// without reading further. The first entry that fails or is refused ends the extraction
/// with an error naming it; what came before it stays.
pub fn extract(
    reader: impl Read,
    dest: &Path,
    options: ExtractOptions,
) -> Result<TarSummary, TarError> {
    let open_root = |source| TarError::OpenRoot {
        path: dest.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(dest)
        .map_err(open_root)?;
    let root = File::open(dest).map_err(open_root)?;
    if !root.metadata().map_err(open_root)?.is_dir() {
        return Err(TarError::NotADirectory {
            path: dest.to_path_buf(),
        });
    }
    let root = OwnedFd::from(root);
    let mut archive = tar::Archive::new(reader);
    let mut summary = TarSummary::default();
    // Folders whose own mode forbids their owner to write in them get it at the end.
    let mut late_modes: Vec<(Vec<CString>, u32)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|source| TarError::Read { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| TarError::Read { source })?;
        let raw = entry.path_bytes().into_owned();
        let name = || String::from_utf8_lossy(&raw).into_owned();
        let entry_type = entry.header().entry_type();
        use tar::EntryType;
        if matches!(
            entry_type,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        let parts = components(&raw).map_err(|why| TarError::Refused { entry: name(), why })?;
        let Some((last, parents)) = parts.split_last() else {
            continue; // The archive's root (`./`): the destination exists already.
        };
        let fail = |what, source| TarError::Entry {
            entry: name(),
            what,
            source,
        };
        let parent = open_parents(&root, parents).map_err(|e| {
            let what = if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
                "a folder on its path is a symlink or not a folder (nothing is written through \
                 a symlink)"
            } else {
                "cannot open or create its folder"
            };
            fail(what, e)
        })?;
        let parent_fd = parent
            .as_ref()
            .map_or(root.as_raw_fd(), |fd| fd.as_raw_fd());
        let mode = entry.header().mode().unwrap_or(0o644) & options.mode_mask;
        match entry_type {
            EntryType::Directory => {
                make_dir(parent_fd, last, mode | 0o700).map_err(|e| fail("mkdir", e))?;
                if mode & 0o700 != 0o700 {
                    late_modes.push((parts.clone(), mode));
                }
                summary.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                let file = create_file(parent_fd, last).map_err(|e| fail("create", e))?;
                let mut file = File::from(file);
                let copied = io::copy(&mut entry, &mut file).map_err(|e| {
                    if e.raw_os_error().is_some() && e.kind() != io::ErrorKind::UnexpectedEof {
                        fail("write", e)
                    } else {
                        TarError::Read { source: e }
                    }
                })?;
                fchmod(&file, mode).map_err(|e| fail("chmod", e))?;
                if let Ok(mtime) = entry.header().mtime() {
                    set_mtime(&file, mtime).map_err(|e| fail("set the modification time", e))?;
                }
                summary.files += 1;
                summary.bytes += copied;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(TarError::Refused {
                        entry: name(),
                        why: "a symlink without a target",
                    })?
                    .into_owned();
                let target = CString::new(target).map_err(|_| TarError::Refused {
                    entry: name(),
                    why: "its symlink target contains NUL",
                })?;
                make_symlink(parent_fd, last, &target).map_err(|e| fail("symlink", e))?;
                summary.symlinks += 1;
            }
            _ => summary.skipped += 1,
        }
    }
    for (parts, mode) in late_modes {
        let (last, parents) = parts.split_last().expect("a folder entry has a name");
        let fail = |source| TarError::Entry {
            entry: String::from_utf8_lossy(&join(&parts)).into_owned(),
            what: "chmod",
            source,
        };
        let parent = open_parents(&root, parents).map_err(fail)?;
        let parent_fd = parent
            .as_ref()
            .map_or(root.as_raw_fd(), |fd| fd.as_raw_fd());
        let dir = open_dir(parent_fd, last).map_err(fail)?;
        fchmod(&dir, mode).map_err(fail)?;
    }
    Ok(summary)
}

fn join(parts: &[CString]) -> Vec<u8> {
    parts
        .iter()
        .map(|p| p.as_bytes())
        .collect::<Vec<_>>()
        .join(&b'/')
}

/// An entry's path as the names to walk from the destination: refuses absolute paths, `..`
/// and NUL; drops empty and `.` components.
fn components(raw: &[u8]) -> Result<Vec<CString>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("it has an absolute path");
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("it has a `..` component"),
            part => parts.push(CString::new(part).map_err(|_| "its path contains NUL")?),
        }
    }
    Ok(parts)
}

fn cvt(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Opens the folder `name` in `dir`, never following a symlink.
fn open_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a valid NUL-terminated string; `dir` is an open descriptor the
    // caller owns for the duration of the call.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Walks `parents` from `root`, creating missing folders (0755), never following a symlink:
/// the last one's descriptor (`None` for `root` itself).
fn open_parents(root: &OwnedFd, parents: &[CString]) -> io::Result<Option<OwnedFd>> {
    let mut current: Option<OwnedFd> = None;
    for part in parents {
        let at = current
            .as_ref()
            .map_or(root.as_raw_fd(), |fd| fd.as_raw_fd());
        let next = match open_dir(at, part) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: `part` is NUL-terminated; `at` is open.
                let made = cvt(unsafe { libc::mkdirat(at, part.as_ptr(), 0o755) });
                match made {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                open_dir(at, part)?
            }
            other => other?,
        };
        current = Some(next);
    }
    Ok(current)
}

/// `mkdir`, or nothing when a folder (not a symlink to one) is already there; then its mode.
fn make_dir(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; `dir` is open.
    match cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    // Fails with ENOTDIR or ELOOP unless a real folder is there; sets the bits the umask
    // took off.
    fchmod(&open_dir(dir, name)?, mode)
}

/// Removes what is at `name` unless it is a folder (`EISDIR` then).
fn unlink_existing(dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; `dir` is open.
    match cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        // Linux says EISDIR for a folder; POSIX allows EPERM.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            Err(io::Error::from_raw_os_error(libc::EISDIR))
        }
        Err(e) => Err(e),
    }
}

/// A new, empty regular file at `name` (whatever was there, unless a folder, is replaced).
fn create_file(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    unlink_existing(dir, name)?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; `dir` is open; the mode is passed as the variadic
    // argument O_CREAT needs.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn make_symlink(dir: RawFd, name: &CStr, target: &CStr) -> io::Result<()> {
    unlink_existing(dir, name)?;
    // SAFETY: both strings are NUL-terminated; `dir` is open.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

fn fchmod(file: &impl AsRawFd, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod on a descriptor the caller holds open.
    cvt(unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

fn set_mtime(file: &File, mtime: u64) -> io::Result<()> {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX) as libc::time_t,
            tv_nsec: 0,
        },
    ];
    // SAFETY: `times` is an array of two timespecs, as futimens reads; the descriptor is
    // open.
    cvt(unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) }).map(drop)
}

#[cfg(test)]
mod tests;
