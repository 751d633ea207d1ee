//! Directory listings, `lstat`, removal and renames (the requests of [`CAP_FILES`]
//! that answer at once).
//!
//! [`CAP_FILES`]: crate::protocol::CAP_FILES

use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use crate::protocol::{
    DirEntry, ErrorKind, FileType, RemoteError, MAX_LIST_BYTES, MAX_LIST_ENTRIES,
};

use super::absolute_path;

/// What a listing entry costs against [`MAX_LIST_BYTES`]: its name and target.
fn entry_bytes(entry: &DirEntry) -> usize {
    entry.name.len() + entry.link_target.len()
}

pub(super) fn file_type(meta: &Metadata) -> FileType {
    let file_type = meta.file_type();
    if file_type.is_file() {
        FileType::File
    } else if file_type.is_dir() {
        FileType::Dir
    } else if file_type.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    }
}

/// The entry for `path`, named `name`, from its `lstat` metadata.
fn entry(path: &Path, name: Vec<u8>, meta: &Metadata) -> Result<DirEntry, io::Error> {
    let file_type = file_type(meta);
    let link_target = if file_type == FileType::Symlink {
        std::fs::read_link(path)?.as_os_str().as_bytes().to_vec()
    } else {
        Vec::new()
    };
    Ok(DirEntry {
        name,
        file_type,
        size: meta.len(),
        mode: meta.mode(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
        link_target,
    })
}

fn not_a_directory(what: &str, path: &str) -> RemoteError {
    RemoteError {
        kind: ErrorKind::InvalidInput,
        errno: Some(libc::ENOTDIR),
        message: format!("cannot {what} {path:?}: it is not a directory"),
    }
}

/// The entries of the directory `path` (a symlink to one is followed; the entries' own
/// symlinks are not), at most `limit`, sorted by name; `true` when some were left out.
pub(super) fn list_dir(path: &str, limit: u32) -> Result<(Vec<DirEntry>, bool), RemoteError> {
    let dir = absolute_path(path)?;
    let meta = std::fs::metadata(dir)
        .map_err(|err| RemoteError::from_io(format!("list {path:?}"), &err))?;
    if !meta.is_dir() {
        return Err(not_a_directory("list", path));
    }
    let limit = limit.min(MAX_LIST_ENTRIES) as usize;
    let read = std::fs::read_dir(dir)
        .map_err(|err| RemoteError::from_io(format!("list {path:?}"), &err))?;
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    for item in read {
        let item = item.map_err(|err| RemoteError::from_io(format!("list {path:?}"), &err))?;
        // DirEntry::metadata does not follow symlinks.
        let meta = match item.metadata() {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue, // Gone meanwhile.
            Err(err) => {
                return Err(RemoteError::from_io(
                    format!("lstat {:?}", item.path()),
                    &err,
                ))
            }
        };
        let name = item.file_name().as_bytes().to_vec();
        let found = match entry(&item.path(), name, &meta) {
            Ok(found) => found,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => {
                return Err(RemoteError::from_io(
                    format!("readlink {:?}", item.path()),
                    &err,
                ))
            }
        };
        if entries.len() == limit || bytes + entry_bytes(&found) > MAX_LIST_BYTES {
            truncated = true;
            break;
        }
        bytes += entry_bytes(&found);
        entries.push(found);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, truncated))
}

/// `path` itself (`lstat`: a symlink is described, not followed).
pub(super) fn lstat(path: &str) -> Result<DirEntry, RemoteError> {
    let file = absolute_path(path)?;
    let meta = std::fs::symlink_metadata(file)
        .map_err(|err| RemoteError::from_io(format!("lstat {path:?}"), &err))?;
    let name = file
        .file_name()
        .map_or_else(|| b"/".to_vec(), |n| n.as_bytes().to_vec());
    entry(file, name, &meta).map_err(|err| RemoteError::from_io(format!("readlink {path:?}"), &err))
}

/// Whether `path` names the root (`/`, `//`, `/.`): nothing to remove or rename.
fn is_root(path: &Path) -> bool {
    !path.components().any(|c| matches!(c, Component::Normal(_)))
}

/// Removes `path`: a file, a symlink (never what it points to), an empty directory or, with
/// `recursive`, a directory and all under it without following any symlink in it.
pub(super) fn remove(path: &str, recursive: bool) -> Result<(), RemoteError> {
    let target = absolute_path(path)?;
    if is_root(target) {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("refusing to remove {path:?}: it is the guest's root"),
        ));
    }
    let meta = std::fs::symlink_metadata(target)
        .map_err(|err| RemoteError::from_io(format!("remove {path:?}"), &err))?;
    let removed = if meta.is_dir() {
        if recursive {
            // std's remove_dir_all opens each folder relative to its parent with
            // O_NOFOLLOW and unlinks symlinks as entries: it never leaves the tree.
            std::fs::remove_dir_all(target)
        } else {
            std::fs::remove_dir(target)
        }
    } else {
        std::fs::remove_file(target)
    };
    removed.map_err(|err| {
        let mut error = RemoteError::from_io(format!("remove {path:?}"), &err);
        if err.raw_os_error() == Some(libc::ENOTEMPTY) {
            error.message =
                format!("cannot remove {path:?}: the folder is not empty (remove it recursively)");
        }
        error
    })
}

/// `rename(2)` of `from` to `to`; without `overwrite`, an existing `to` is refused
/// (`renameat2` with `RENAME_NOREPLACE`, so no other writer can slip in between).
pub(super) fn rename(from: &str, to: &str, overwrite: bool) -> Result<(), RemoteError> {
    let source = absolute_path(from)?;
    let target = absolute_path(to)?;
    if is_root(source) || is_root(target) {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("refusing to rename {from:?} to {to:?}: one of them is the guest's root"),
        ));
    }
    let what = || format!("rename {from:?} to {to:?}");
    let renamed = if overwrite {
        std::fs::rename(source, target)
    } else {
        rename_noreplace(source, target)
    };
    renamed.map_err(|err| {
        let mut error = RemoteError::from_io(what(), &err);
        match err.raw_os_error() {
            Some(libc::EEXIST) => {
                error.message = format!("{}: {to:?} exists (ask to overwrite it)", what());
            }
            // A folder over something that is not one: `to` is there, as something else.
            Some(libc::ENOTDIR) if std::fs::symlink_metadata(target).is_ok() => {
                error.kind = ErrorKind::AlreadyExists;
                error.message = format!("{}: {to:?} exists and is not a folder", what());
            }
            _ => {}
        }
        error
    })
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call; AT_FDCWD needs
    // no descriptor; renameat2 reads nothing else.
    let result = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // A filesystem without RENAME_NOREPLACE: look, then rename.
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    std::fs::rename(from, to)
}
