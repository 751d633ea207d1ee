//! The jail one VMM process runs in.
//!
//! [`enter`] turns the calling (single-threaded, root) process into a jailed one:
//! - new mount, PID, IPC, UTS and network namespaces: it sees no other process, no host
//!   network (only a loopback that is down) and none of the host's mounts;
//! - a private root: a small read-only tmpfs holding the device nodes a VMM needs (`/dev/kvm`,
//!   `/dev/userfaultfd`, `/dev/null`, `/dev/urandom`), a fresh `/proc`, and bind mounts of
//!   exactly the paths [`JailSpec::mounts`] names, at the same paths as outside (so the
//!   VMM's configuration needs no rewriting), read-only unless marked writable;
//! - an unprivileged uid and gid, no supplementary groups, no capabilities, no new privileges;
//! - no inherited file descriptor beyond stdin, stdout and stderr.
//!
//! A PID namespace only applies to children, so `enter` forks: the child, PID 1 of the new
//! namespace, returns and goes on as the VMM; the parent stays outside as a supervisor that
//! forwards signals to it and ends the way it ends (exit code or signal), so whoever started
//! the process sees the VMM's own outcome. The child dies with the supervisor
//! (`PR_SET_PDEATHSIG`), and everything in the jail dies with the child.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What one jail holds and who runs in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailSpec {
    /// An existing, empty directory; the jail's root (a tmpfs seen only inside the jail) is
    /// mounted on it.
    pub root: PathBuf,
    /// The unprivileged user and group the VMM runs as (never 0).
    pub uid: u32,
    pub gid: u32,
    /// The host paths (files or directories) the VMM may see.
    pub mounts: Vec<JailMount>,
    /// A network namespace to join (a bind-mounted namespace file such as
    /// `/run/netns/NAME`), with `/dev/net/tun` in the jail to attach to a TAP there; none: a
    /// new namespace with nothing but a loopback device that is down.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// One host path made visible inside the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailMount {
    pub path: PathBuf,
    #[serde(default)]
    pub writable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail's uid and gid must not be root's (got {uid}:{gid})")]
    RootIds { uid: u32, gid: u32 },
    #[error("the jail's root {0} is not an absolute path to an empty directory")]
    BadRoot(PathBuf),
    #[error("the jail cannot hold {path}: {why}")]
    BadMount { path: PathBuf, why: String },
    #[error("a jail can only be entered by a single-threaded process ({0} threads run)")]
    Threads(usize),
    #[error("cannot {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("inside the jail, uid {uid} cannot {access} {path}: give it that access on the host")]
    NoAccess {
        uid: u32,
        access: &'static str,
        path: PathBuf,
    },
}

type Result<T> = std::result::Result<T, JailError>;

/// The call's error, named.
fn sys(what: impl Into<String>) -> JailError {
    JailError::Sys {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<()> {
    if rc < 0 {
        Err(sys(what()))
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::BadMount {
        path: path.to_path_buf(),
        why: "the path holds a NUL byte".into(),
    })
}

/// The hostname inside every jail.
pub const HOSTNAME: &str = "ember-sandbox";

/// The device nodes of a jail: name, mode, and whether the jail's user owns it (the others
/// are world-usable, like on the host).
const DEVICES: [(&str, u32, bool); 4] = [
    ("kvm", 0o600, true),
    ("userfaultfd", 0o600, true),
    ("null", 0o666, false),
    ("urandom", 0o666, false),
];
/// The TAP clone device, in a jail that joins a network namespace.
const TUN_DEVICE: (&str, u32, bool) = ("net/tun", 0o666, false);

impl JailSpec {
    fn validate(&self) -> Result<()> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::RootIds {
                uid: self.uid,
                gid: self.gid,
            });
        }
        let empty_dir = self.root.is_absolute()
            && std::fs::read_dir(&self.root).is_ok_and(|mut d| d.next().is_none());
        if !empty_dir {
            return Err(JailError::BadRoot(self.root.clone()));
        }
        for mount in &self.mounts {
            let bad = |why: &str| JailError::BadMount {
                path: mount.path.clone(),
                why: why.into(),
            };
            if !mount.path.is_absolute()
                || mount
                    .path
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return Err(bad("not a plain absolute path"));
            }
            if mount.path == Path::new("/") {
                return Err(bad("the host's whole root"));
            }
            let meta = std::fs::metadata(&mount.path).map_err(|e| bad(&e.to_string()))?;
            if !meta.is_dir() && !meta.is_file() {
                return Err(bad("neither a file nor a directory"));
            }
        }
        Ok(())
    }
}

/// Which side of [`enter`] the caller is on.
pub enum Entered {
    /// The jailed process: go on as the VMM.
    Jailed,
    /// The supervisor outside: call [`Supervisor::run`] (after, say, a seccomp filter).
    Supervisor(Supervisor),
}

/// The process outside the jail that waits for the jailed one.
pub struct Supervisor {
    child: libc::pid_t,
    forwarded: libc::sigset_t,
}

/// Signals the supervisor passes on to the jailed process; blocked from before the fork, so
/// none can end the supervisor by its default action.
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCHLD,
];

/// Moves this process into the network namespace bound at `path`.
fn join_network_namespace(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| JailError::Sys {
        what: format!("open the network namespace {}", path.display()),
        source,
    })?;
    // SAFETY: setns(2) on a namespace file this function opened; CLONE_NEWNET makes the
    // kernel check it is a network namespace.
    let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    check(joined, || {
        format!("join the network namespace {}", path.display())
    })
}

/// Enters the jail (see the crate's documentation).
pub fn enter(spec: &JailSpec) -> Result<Entered> {
    spec.validate()?;
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    close_inherited_fds()?;
    // The host's device numbers, read before the host's /dev goes out of sight.
    let tun = spec.netns.as_ref().map(|_| TUN_DEVICE);
    let devices: Vec<(&str, u32, bool, libc::dev_t)> = DEVICES
        .iter()
        .chain(tun.iter())
        .filter_map(|&(name, mode, owned)| {
            let meta = std::fs::metadata(Path::new("/dev").join(name)).ok()?;
            meta.file_type()
                .is_char_device()
                .then_some((name, mode, owned, meta.rdev()))
        })
        .collect();
    let mut namespaces =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    match &spec.netns {
        Some(netns) => join_network_namespace(netns)?,
        None => namespaces |= libc::CLONE_NEWNET,
    }
    // SAFETY: unshare(2) takes flags only; it changes this process's namespaces.
    let unshared = unsafe { libc::unshare(namespaces) };
    check(unshared, || "create the jail's namespaces (unshare)".into())?;
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise; sigprocmask reads
    // the new mask and writes the old one.
    let (forwarded, old_mask) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        (set, old)
    };
    // The supervisor's life, seen from the jail: the supervisor holds the write end and
    // never writes, so the read end reads end-of-file exactly when the supervisor is gone.
    let mut lifeline = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `lifeline`.
    let piped = unsafe { libc::pipe2(lifeline.as_mut_ptr(), libc::O_CLOEXEC) };
    check(piped, || "create the jail's lifeline pipe".into())?;
    let [lifeline_read, lifeline_write] = lifeline;
    // SAFETY: the process is single-threaded (checked above), so the child may go on running
    // ordinary Rust code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(sys("fork the jailed process"));
    }
    if child > 0 {
        // SAFETY: closes the supervisor's copy of the read end, which it has no use for.
        unsafe { libc::close(lifeline_read) };
        return Ok(Entered::Supervisor(Supervisor { child, forwarded }));
    }
    // SAFETY: closes the jail's copy of the write end (so only the supervisor's keeps the
    // pipe open) and restores the caller's signal mask from the copy taken above.
    unsafe {
        libc::close(lifeline_write);
        libc::sigprocmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
    }
    build_root(spec, &devices)?;
    pivot_into(&spec.root)?;
    // SAFETY: sethostname reads the given bytes; it changes the jail's own UTS namespace.
    let named = unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) };
    check(named, || "set the jail's hostname".into())?;
    drop_privileges(spec.uid, spec.gid)?;
    // After the change of user, which clears a parent-death signal set before it.
    die_with_supervisor(lifeline_read)?;
    for mount in &spec.mounts {
        let (mode, access) = if mount.writable {
            (libc::R_OK | libc::W_OK, "read and write")
        } else {
            (libc::R_OK, "read")
        };
        let path = cstring(&mount.path)?;
        // SAFETY: access(2) reads the NUL-terminated path.
        if unsafe { libc::access(path.as_ptr(), mode) } != 0 {
            return Err(JailError::NoAccess {
                uid: spec.uid,
                access,
                path: mount.path.clone(),
            });
        }
    }
    Ok(Entered::Jailed)
}

impl Supervisor {
    /// The jailed process's pid (outside its namespace).
    pub fn child(&self) -> libc::pid_t {
        self.child
    }

    /// Forwards signals to the jailed process and ends as it ends: its exit code, or the
    /// signal that killed it. Calls only wait4, rt_sigtimedwait, kill, and (at the end)
    /// rt_sigaction, rt_sigprocmask, getpid, gettid, tgkill and exit_group.
    pub fn run(self) -> ! {
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the child's status into `status`.
            let waited = unsafe { libc::waitpid(self.child, &mut status, libc::WNOHANG) };
            if waited == self.child {
                end_like(status);
            }
            if waited < 0 {
                // Not our child any more: nothing to wait for.
                // SAFETY: _exit ends the process without running anything else.
                unsafe { libc::_exit(1) };
            }
            // SAFETY: waits for one of the blocked signals; no siginfo is asked for.
            let signal = unsafe { libc::sigwaitinfo(&self.forwarded, std::ptr::null_mut()) };
            if signal > 0 && signal != libc::SIGCHLD {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(self.child, signal) };
            }
        }
    }
}

/// Makes the kernel kill this process when the supervisor ends, then makes sure the
/// supervisor had not already ended before that (its lifeline's write end would be closed).
fn die_with_supervisor(lifeline: libc::c_int) -> Result<()> {
    // SAFETY: prctl with integer arguments; poll reads one pollfd we own; close releases the
    // lifeline's read end, not needed afterwards.
    unsafe {
        let tied = libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        check(tied, || "tie the jailed process to its supervisor".into())?;
        let mut watch = libc::pollfd {
            fd: lifeline,
            events: libc::POLLIN,
            revents: 0,
        };
        let ready = libc::poll(&mut watch, 1, 0);
        libc::close(lifeline);
        if ready != 0 {
            // End-of-file (or an error): nobody outside waits for this process any more.
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Closes every descriptor but stdin, stdout and stderr: whatever the parent leaked.
fn close_inherited_fds() -> Result<()> {
    // SAFETY: close_range(2) closes descriptors 3 and up; nothing in this single-threaded
    // process holds one it still needs (the caller has read its configuration).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc < 0 {
        return Err(sys("close inherited file descriptors"));
    }
    Ok(())
}

/// Exits with the child's exit code, or dies of the signal it died of.
fn end_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restores the default action of `signal`, unblocks everything and raises it:
        // this process then ends the way its child did.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::raise(signal);
            libc::_exit(128 + signal)
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    // SAFETY: _exit ends the process without running anything else (nothing is left to flush).
    unsafe { libc::_exit(code) }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source_c = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype_c = fstype.map(|t| CString::new(t).expect("a literal file system type"));
    let data_c = data.map(|d| CString::new(d).expect("literal mount options"));
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(rc, || {
        format!(
            "mount {} on {} ({})",
            source.map_or("-".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind")
        )
    })
}

/// `path` inside the jail's root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn create_dirs(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| JailError::Sys {
        what: format!("create {}", path.display()),
        source,
    })
}

fn build_root(spec: &JailSpec, devices: &[(&str, u32, bool, libc::dev_t)]) -> Result<()> {
    let root = &spec.root;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("ember-jail")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=1024"),
    )?;
    create_dirs(&root.join("dev"))?;
    for &(name, mode, owned, rdev) in devices {
        let node = root.join("dev").join(name);
        if let Some(parent) = node.parent() {
            create_dirs(parent)?;
        }
        let node_c = cstring(&node)?;
        // SAFETY: mknod/chmod/chown read the NUL-terminated path of a node in the jail's own
        // tmpfs.
        unsafe {
            check(
                libc::mknod(node_c.as_ptr(), libc::S_IFCHR | mode, rdev),
                || format!("create the device node {}", node.display()),
            )?;
            check(libc::chmod(node_c.as_ptr(), mode), || {
                format!("set the mode of {}", node.display())
            })?;
            if owned {
                check(libc::chown(node_c.as_ptr(), spec.uid, spec.gid), || {
                    format!("hand {} to the jail's user", node.display())
                })?;
            }
        }
    }
    // Parents before children, so a path inside another mounted one lands on top of it.
    let mut mounts: Vec<&JailMount> = spec.mounts.iter().collect();
    mounts.sort_by_key(|m| m.path.components().count());
    for m in mounts {
        let target = inside(root, &m.path);
        if m.path.is_dir() {
            create_dirs(&target)?;
        } else {
            create_dirs(target.parent().unwrap_or(root))?;
            if !target.exists() {
                std::fs::File::create(&target).map_err(|source| JailError::Sys {
                    what: format!("create the mount point {}", target.display()),
                    source,
                })?;
            }
        }
        mount(Some(&m.path), &target, None, libc::MS_BIND, None)?;
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
        if !m.writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    let proc_dir = root.join("proc");
    create_dirs(&proc_dir)?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    // The skeleton is done: nothing in the jail may add to it.
    mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
}

/// Makes `root` the process's `/` and lets go of the host's.
fn pivot_into(root: &Path) -> Result<()> {
    let root_c = cstring(root)?;
    let dot = c".";
    let slash = c"/";
    // SAFETY: chdir/pivot_root/umount2 read NUL-terminated paths. pivot_root(".", ".") stacks
    // the old root on top of the new one, and the detach unmounts that old root, leaving the
    // new root as `/` (the sequence pivot_root(2) documents).
    unsafe {
        check(libc::chdir(root_c.as_ptr()), || {
            format!("enter {}", root.display())
        })?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
            || format!("make {} the root (pivot_root)", root.display()),
        )?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), || {
            "let go of the host's root".into()
        })?;
        check(libc::chdir(slash.as_ptr()), || "enter the new root".into())
    }
}

fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: each call takes integers or reads a value we pass; they change only this
    // process's credentials and limits. Leaving uid 0 clears every capability; the process
    // stays dumpable so it can read its own /proc files (nothing else in its PID namespace
    // runs as its user), and it dumps no core (guest memory).
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), || {
            "drop supplementary groups".into()
        })?;
        check(libc::setresgid(gid, gid, gid), || {
            format!("switch to gid {gid}")
        })?;
        check(libc::setresuid(uid, uid, uid), || {
            format!("switch to uid {uid}")
        })?;
        check(libc::setrlimit(libc::RLIMIT_CORE, &no_core), || {
            "disable core dumps".into()
        })?;
        check(libc::prctl(libc::PR_SET_DUMPABLE, 1), || {
            "keep /proc/self readable".into()
        })?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), || {
            "forbid new privileges".into()
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(root: &Path, mounts: Vec<JailMount>) -> JailSpec {
        JailSpec {
            root: root.to_path_buf(),
            uid: 1000,
            gid: 1000,
            mounts,
            netns: None,
        }
    }

    #[test]
    fn bad_specs_are_refused_with_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("ember-jail-spec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        let root = dir.join("root");
        let mut root_ids = spec(&root, vec![]);
        root_ids.uid = 0;
        assert!(matches!(
            root_ids.validate(),
            Err(JailError::RootIds { uid: 0, .. })
        ));
        assert!(matches!(
            spec(Path::new("relative"), vec![]).validate(),
            Err(JailError::BadRoot(_))
        ));
        std::fs::write(dir.join("file"), b"x").unwrap();
        assert!(matches!(
            spec(&dir, vec![]).validate(),
            Err(JailError::BadRoot(_))
        ));
        for bad in ["/", "relative/path", "/tmp/../etc", "/no/such/path/here"] {
            let err = spec(
                &root,
                vec![JailMount {
                    path: bad.into(),
                    writable: false,
                }],
            )
            .validate()
            .unwrap_err();
            assert!(matches!(err, JailError::BadMount { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        spec(
            &root,
            vec![JailMount {
                path: dir.join("file"),
                writable: true,
            }],
        )
        .validate()
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_keep_their_place_inside_the_root() {
        assert_eq!(
            inside(Path::new("/j"), Path::new("/var/lib/ember/run/sb1")),
            PathBuf::from("/j/var/lib/ember/run/sb1")
        );
    }

    #[test]
    fn a_spec_round_trips_through_json_and_refuses_unknown_fields() {
        let s = spec(
            Path::new("/j"),
            vec![JailMount {
                path: "/k".into(),
                writable: false,
            }],
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JailSpec>(&json).unwrap(), s);
        assert!(serde_json::from_str::<JailSpec>(
            r#"{"root":"/j","uid":1,"gid":1,"mounts":[],"extra":1}"#
        )
        .is_err());
    }
}
