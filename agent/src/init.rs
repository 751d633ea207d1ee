//! PID 1 duties: mount the pseudo filesystems, mark boot, reap children, reset the guest.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

/// Mounts proc, sys, dev, devpts, /tmp and /run where they are not mounted yet.
/// Failures are reported and not fatal: a missing /run must not stop the agent.
pub fn mount_pseudo_filesystems() {
    let mounts: [(&str, &str, &str, libc::c_ulong); 6] = [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
        ),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ];
    for (source, target, fstype, flags) in mounts {
        std::fs::create_dir_all(target).ok();
        if let Err(err) = mount(source, target, fstype, flags) {
            // EBUSY: already mounted (devtmpfs is mounted by the kernel on a disk root).
            if err.raw_os_error() != Some(libc::EBUSY) {
                eprintln!("ember-agent: mount {fstype} on {target}: {err}");
            }
        }
    }
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| std::io::ErrorKind::InvalidInput);
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; `data` may
    // be NULL for these filesystems.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Brings the loopback interface up, as an init does: servers in the guest listen on
/// 127.0.0.1 (and exposed ports reach them there) whether or not the guest has a network.
pub fn bring_up_loopback() {
    if let Err(err) = set_interface_up(b"lo") {
        eprintln!("ember-agent: cannot bring up lo: {err}");
    }
}

fn set_interface_up(name: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh socket owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `req`, which outlives the
    // call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union was just written by the kernel.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes filesystems and resets the guest (the VMM sees the reset and exits).
pub fn sync_and_reset() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // Leave the root filesystem clean (journal committed, not marked in use), as a shutdown
    // would: a dirty ext4 image cannot be mounted read-only afterwards. Best effort: EBUSY
    // (a file still open for writing) leaves it as it is.
    // SAFETY: all pointers are valid NUL-terminated strings or NULL, as remount allows.
    unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    // SAFETY: reboot with RB_AUTOBOOT restarts the machine; as PID 1 we are allowed to.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    eprintln!(
        "ember-agent: reboot failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::park();
    }
}

/// Waits for any child forever (PID 1 must reap orphans). Only for when the agent runs no
/// commands of its own: see [`reap_orphans_forever`] otherwise.
pub fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Children the agent spawned and reaps itself (by pid): [`reap_orphans_forever`] leaves them
/// alone. Locked across `spawn` so that a child cannot exit and be reaped by the reaper before
/// its pid is recorded (and so that std's own `waitpid` after a failed `exec` is never raced).
static OWNED_CHILDREN: Mutex<BTreeSet<libc::pid_t>> = Mutex::new(BTreeSet::new());

/// Spawns `command` as a child the caller owns: the orphan reaper never reaps it. The caller
/// reaps it (e.g. `Child::wait`) and then calls [`release_owned`].
pub fn spawn_owned(command: &mut Command) -> std::io::Result<Child> {
    let mut owned = OWNED_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    owned.insert(child.id() as libc::pid_t);
    Ok(child)
}

/// The owner of `pid` has reaped it.
pub fn release_owned(pid: u32) {
    OWNED_CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&(pid as libc::pid_t));
}

/// PID 1's reaper while the agent serves the host: reaps every exited child except those
/// spawned with [`spawn_owned`], whose exit statuses belong to the threads that spawned them.
///
/// `waitid(P_ALL, WEXITED | WNOWAIT)` blocks until some child is a zombie without reaping it;
/// an orphan (not owned) is then reaped by pid, while an owned zombie is left for its owner
/// (who reaps it within microseconds of exiting) and looked at again a little later.
pub fn reap_orphans_forever() -> ! {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`, which is valid for writes.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                // ECHILD: no children at all right now.
                std::thread::sleep(Duration::from_millis(200));
            }
            continue;
        }
        // SAFETY: waitid succeeded with WEXITED, so `info` describes a child (si_pid is valid).
        let pid = unsafe { info.si_pid() };
        let owned = OWNED_CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        if owned.contains(&pid) {
            drop(owned);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid on one pid with a valid status pointer; WNOHANG never blocks while
        // the lock is held.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    }
}
