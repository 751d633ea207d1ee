//! `Watch`: inotify on a directory (and its subdirectories), turned into create, modify,
//! delete and rename events for the host.
//!
//! One thread per watch polls its inotify descriptor (every [`POLL_MS`] it also looks
//! whether the watch was cancelled or the connection closed, and then closes the
//! descriptor, which ends every inotify watch it held). Events go out under the stream's
//! window: one that does not fit is dropped and counted, and an `Overflow` event says how
//! many were lost once there is room again, so a host that stops reading costs the guest
//! no memory.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::protocol::{
    watch_event_cost, Credit, ErrorKind, RemoteError, ResponseBody, WatchEvent, WatchKind,
};

use super::{absolute_path, Conn};

/// How often an idle watch looks whether it should end.
const POLL_MS: i32 = 200;

/// Most directories one recursive watch follows (each is an inotify watch in the guest).
pub(super) const MAX_WATCHED_DIRS: usize = 8192;

/// The inotify events a watch asks for.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// A watch's state: its descriptor, what each inotify watch descriptor stands for, and the
/// events it could not send yet.
struct Watcher<'a> {
    conn: &'a Conn,
    id: u64,
    credit: &'a Credit,
    fd: OwnedFd,
    recursive: bool,
    /// inotify watch descriptor → the directory's absolute path.
    dirs: HashMap<i32, Vec<u8>>,
    root_wd: i32,
    /// Events lost since the last `Overflow` was sent.
    dropped: u64,
    /// Set once [`MAX_WATCHED_DIRS`] stopped a directory from being followed.
    limited: bool,
    /// An `IN_MOVED_FROM` waiting for its `IN_MOVED_TO`: (cookie, path, is_dir).
    moved_from: Option<(u32, Vec<u8>, bool)>,
    /// The last event sent (a burst of writes to one file is one `Modify`).
    last: Option<(WatchKind, Vec<u8>)>,
    sent: u64,
    /// The root went away, or the connection did: the watch ends.
    finished: bool,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = dir.to_vec();
    if !path.ends_with(b"/") {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

impl Watcher<'_> {
    /// Adds an inotify watch on the directory `path` (`follow`: the root may be a symlink;
    /// directories under it are never followed through one).
    fn add(&mut self, path: &[u8], follow: bool) -> io::Result<i32> {
        let c_path = CString::new(path.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        let mut mask = MASK | libc::IN_ONLYDIR;
        if !follow {
            mask |= libc::IN_DONT_FOLLOW;
        }
        // SAFETY: the descriptor is this watcher's inotify instance; `c_path` is
        // NUL-terminated and outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c_path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, path.to_vec());
        Ok(wd)
    }

    /// Follows the directories under `dir` (recursive watches); with `announce`, what is
    /// found there (made before its watch existed) is sent as created.
    fn add_tree(&mut self, dir: &[u8], announce: bool) {
        let mut stack = vec![dir.to_vec()];
        while let Some(dir) = stack.pop() {
            let Ok(read) = std::fs::read_dir(std::ffi::OsStr::from_bytes(&dir)) else {
                continue; // Gone or unreadable: nothing to follow.
            };
            for item in read.flatten() {
                let path = join(&dir, item.file_name().as_bytes());
                let is_dir = item.file_type().is_ok_and(|t| t.is_dir());
                if announce {
                    self.emit(WatchKind::Create, path.clone(), Vec::new(), is_dir);
                }
                if !is_dir {
                    continue;
                }
                if self.dirs.len() >= MAX_WATCHED_DIRS {
                    if !self.limited {
                        self.limited = true;
                        self.dropped += 1;
                    }
                    continue;
                }
                if self.add(&path, false).is_ok() {
                    stack.push(path);
                }
            }
        }
    }

    /// Sends one event if the window has room; counts it as lost otherwise.
    fn emit(&mut self, kind: WatchKind, path: Vec<u8>, from: Vec<u8>, is_dir: bool) {
        if kind == WatchKind::Modify
            && self
                .last
                .as_ref()
                .is_some_and(|(k, p)| *k == WatchKind::Modify && *p == path)
        {
            return;
        }
        if !self.flush_overflow() {
            self.dropped += 1;
            return;
        }
        self.last = Some((kind, path.clone()));
        let event = WatchEvent {
            kind,
            path,
            from,
            is_dir,
            dropped: 0,
        };
        self.send(event);
    }

    /// Takes the event's room in the window and sends it: `false` when there was none.
    fn send(&mut self, event: WatchEvent) -> bool {
        if !self.credit.try_acquire(watch_event_cost(&event)) {
            self.dropped += 1;
            return false;
        }
        if !self.conn.send(self.id, ResponseBody::Watch(event)) {
            self.finished = true;
            return false;
        }
        self.sent += 1;
        true
    }

    /// Sends the `Overflow` for what was lost, if anything was and it fits: `false` when
    /// events are still being lost.
    fn flush_overflow(&mut self) -> bool {
        if self.dropped == 0 {
            return true;
        }
        let event = WatchEvent {
            kind: WatchKind::Overflow,
            path: Vec::new(),
            from: Vec::new(),
            is_dir: false,
            dropped: self.dropped,
        };
        let dropped = self.dropped;
        if self.send(event) {
            self.dropped -= dropped;
            self.last = None;
            true
        } else {
            // `send` counted the overflow event itself as lost: it was not an event.
            self.dropped = dropped;
            false
        }
    }

    /// An `IN_MOVED_FROM` whose `IN_MOVED_TO` never came: moved out of the watch, so gone.
    fn flush_moved_from(&mut self) {
        if let Some((_, path, is_dir)) = self.moved_from.take() {
            if is_dir {
                self.forget_under(&path);
            }
            self.emit(WatchKind::Delete, path, Vec::new(), is_dir);
        }
    }

    /// Stops following the directories at and under `path` (moved out of the watch).
    fn forget_under(&mut self, path: &[u8]) {
        let prefix = join(path, b"");
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(wd, p)| **wd != self.root_wd && (p[..] == *path || p.starts_with(&prefix)))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // SAFETY: removes a watch descriptor of this watcher's own inotify instance.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
        }
    }

    /// A directory renamed inside the watch: the paths of its followed subdirectories move.
    fn moved_dir(&mut self, from: &[u8], to: &[u8]) {
        let prefix = join(from, b"");
        for path in self.dirs.values_mut() {
            if path[..] == *from {
                *path = to.to_vec();
            } else if path.starts_with(&prefix) {
                let rest = path[prefix.len()..].to_vec();
                *path = join(to, &rest);
            }
        }
    }

    fn handle(&mut self, wd: i32, mask: u32, cookie: u32, name: &[u8]) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            self.dropped += 1;
            self.flush_overflow();
            return;
        }
        if mask & libc::IN_MOVED_TO == 0 {
            self.flush_moved_from();
        }
        if mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            if wd == self.root_wd {
                self.finished = true;
            }
            return;
        }
        let Some(dir) = self.dirs.get(&wd).cloned() else {
            return;
        };
        let is_dir = mask & libc::IN_ISDIR != 0;
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            // A subdirectory's own end is reported by its parent's IN_DELETE/IN_MOVED_FROM.
            if wd == self.root_wd {
                self.emit(WatchKind::Delete, dir, Vec::new(), true);
                self.finished = true;
            }
            return;
        }
        let path = if name.is_empty() {
            dir
        } else {
            join(&dir, name)
        };
        if mask & libc::IN_CREATE != 0 {
            self.emit(WatchKind::Create, path.clone(), Vec::new(), is_dir);
            if is_dir && self.recursive {
                self.follow_new_dir(&path);
            }
        } else if mask & libc::IN_MODIFY != 0 {
            self.emit(WatchKind::Modify, path, Vec::new(), is_dir);
        } else if mask & libc::IN_DELETE != 0 {
            self.emit(WatchKind::Delete, path, Vec::new(), is_dir);
        } else if mask & libc::IN_MOVED_FROM != 0 {
            self.moved_from = Some((cookie, path, is_dir));
        } else if mask & libc::IN_MOVED_TO != 0 {
            match self.moved_from.take() {
                Some((from_cookie, from, _)) if from_cookie == cookie => {
                    if is_dir {
                        self.moved_dir(&from, &path);
                    }
                    self.emit(WatchKind::Rename, path, from, is_dir);
                }
                other => {
                    self.moved_from = other;
                    self.flush_moved_from();
                    // Moved in from outside the watch: new here.
                    self.emit(WatchKind::Create, path.clone(), Vec::new(), is_dir);
                    if is_dir && self.recursive {
                        self.follow_new_dir(&path);
                    }
                }
            }
        }
    }

    fn follow_new_dir(&mut self, path: &[u8]) {
        if self.dirs.len() >= MAX_WATCHED_DIRS {
            self.dropped += u64::from(!self.limited);
            self.limited = true;
            return;
        }
        if self.add(path, false).is_ok() {
            self.add_tree(path, true);
        }
    }

    /// Reads and handles what inotify has; `false` when it had nothing.
    fn read_events(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(err),
            };
        }
        let n = n as usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut offset = 0;
        while offset + header <= n {
            // SAFETY: `header` bytes from `offset` are within what read() filled; the kernel
            // wrote a whole inotify_event there (a plain C struct of integers, valid for any
            // bits); read_unaligned needs no alignment.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
            let name_end = offset + header + event.len as usize;
            if name_end > n {
                break;
            }
            let raw = &buf[offset + header..name_end];
            let name_len = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            let name = raw[..name_len].to_vec();
            offset = name_end;
            self.handle(event.wd, event.mask, event.cookie, &name);
        }
        Ok(true)
    }
}

/// Watches `path` until `cancelled`, the root's end or the connection's; returns the
/// events sent.
pub(super) fn watch(
    conn: &Conn,
    id: u64,
    path: &str,
    recursive: bool,
    credit: &Credit,
    cancelled: &AtomicBool,
) -> Result<u64, RemoteError> {
    let root = absolute_path(path)?;
    let meta = std::fs::metadata(root)
        .map_err(|err| RemoteError::from_io(format!("watch {path:?}"), &err))?;
    if !meta.is_dir() {
        return Err(RemoteError {
            kind: ErrorKind::InvalidInput,
            errno: Some(libc::ENOTDIR),
            message: format!("cannot watch {path:?}: it is not a directory"),
        });
    }
    // SAFETY: inotify_init1 takes flags only.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return Err(RemoteError::from_io(
            format!("watch {path:?}: inotify_init1"),
            &err,
        ));
    }
    let mut watcher = Watcher {
        conn,
        id,
        credit,
        // SAFETY: inotify_init1 returned a new descriptor that nothing else owns.
        fd: unsafe { OwnedFd::from_raw_fd(raw) },
        recursive,
        dirs: HashMap::new(),
        root_wd: -1,
        dropped: 0,
        limited: false,
        moved_from: None,
        last: None,
        sent: 0,
        finished: false,
    };
    let root_bytes = path.as_bytes().to_vec();
    watcher.root_wd = watcher
        .add(&root_bytes, true)
        .map_err(|err| RemoteError::from_io(format!("watch {path:?}"), &err))?;
    if recursive {
        watcher.add_tree(&root_bytes, false);
    }
    // Set up: the host may start changing things now.
    let ready = WatchEvent {
        kind: WatchKind::Watching,
        path: root_bytes,
        from: Vec::new(),
        is_dir: true,
        dropped: watcher.dropped,
    };
    watcher.dropped = 0;
    if !credit.acquire(watch_event_cost(&ready)) || !conn.send(id, ResponseBody::Watch(ready)) {
        return Ok(0);
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !watcher.finished
        && !cancelled.load(Ordering::SeqCst)
        && !conn.broken.load(Ordering::SeqCst)
    {
        let mut poll = libc::pollfd {
            fd: watcher.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, as the count says.
        let ready = unsafe { libc::poll(&mut poll, 1, POLL_MS) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RemoteError::from_io(format!("watch {path:?}: poll"), &err));
        }
        if ready == 0 {
            // Quiet for a while: a pending move's other half is not coming, and a lost
            // event count can go out if there is room now.
            watcher.flush_moved_from();
            watcher.flush_overflow();
            continue;
        }
        watcher
            .read_events(&mut buf)
            .map_err(|err| RemoteError::from_io(format!("watch {path:?}: read"), &err))?;
    }
    watcher.flush_moved_from();
    Ok(watcher.sent)
}
