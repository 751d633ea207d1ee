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

/// Writes the magic byte to ember's boot-timer port so the VMM logs "userspace reached".
/// False if this process may not write the port (then it must not report milestones either).
pub fn mark_boot_complete() -> bool {
    if !grant_boot_timer_ports() {
        return false;
    }
    // SAFETY: the port was granted above; writing one byte to it has no effect on this
    // process's memory. Under ember it is the boot-timer device; elsewhere an unused port.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") crate::BOOT_TIMER_PORT,
            in("al") crate::BOOT_TIMER_MAGIC,
            options(nomem, nostack, preserves_flags)
        );
    }
    true
}

/// A point of the boot reported to ember by the guest's clock (see `ember_devices::boot_timer`).
#[derive(Debug, Clone, Copy)]
pub enum Milestone {
    KernelRanInit = 0,
    AgentStarted = 1,
    AgentReady = 2,
}

/// Reports `milestone` at `us` microseconds of the guest's clock to the boot timer. Call
/// only after [`mark_boot_complete`] returned true (it asks for the ports; without them the
/// write faults).
pub fn report_milestone(milestone: Milestone, us: u64) {
    let port = crate::BOOT_TIMER_PORT + crate::BOOT_TIMER_MILESTONE_OFFSET + 4 * milestone as u16;
    let value = u32::try_from(us).unwrap_or(u32::MAX);
    // SAFETY: as in `mark_boot_complete`: a port write with no effect on this process's memory.
    unsafe {
        std::arch::asm!(
            "out dx, eax",
            in("dx") port,
            in("eax") value,
            options(nomem, nostack, preserves_flags)
        );
    }
}

/// Lets this process write the boot timer's ports; false (and a message) if it may not.
fn grant_boot_timer_ports() -> bool {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let rc = unsafe {
        libc::ioperm(
            crate::BOOT_TIMER_PORT.into(),
            crate::BOOT_TIMER_PORT_LEN.into(),
            1,
        )
    };
    if rc != 0 {
        eprintln!(
            "ember-agent: ioperm for the boot timer: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

/// The guest's clock (`CLOCK_BOOTTIME`: since its kernel started) in microseconds.
pub fn guest_clock_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The kernel log's timestamp of "Run … as init process", read from the kernel's log buffer
/// in one `syslog(2)` call (the boot's log is small; no /dev/kmsg record loop).
pub fn kernel_ran_init_us() -> Option<u64> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).ok().filter(|&n| n > 0)?.min(4 << 20);
    let mut buf = vec![0u8; size];
    // SAFETY: READ_ALL writes at most `size` bytes into `buf`, which holds that many.
    let read = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            size as libc::c_int,
        )
    };
    buf.truncate(usize::try_from(read).ok()?);
    String::from_utf8_lossy(&buf).lines().find_map(init_line_us)
}

/// The timestamp in µs of a kernel log line "<6>[    0.880611] Run /init as init process"
/// (the priority prefix is optional).
pub fn init_line_us(line: &str) -> Option<u64> {
    let line = line.trim();
    let line = match line.strip_prefix('<') {
        Some(rest) => rest.split_once('>')?.1,
        None => line,
    };
    let (stamp, message) = line.strip_prefix('[')?.split_once(']')?;
    let message = message.trim();
    if !(message.starts_with("Run ") && message.ends_with(" as init process")) {
        return None;
    }
    let (secs, micros) = stamp.trim().split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let micros: u64 = format!("{micros:0<6}").get(..6)?.parse().ok()?;
    Some(secs * 1_000_000 + micros)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_line_timestamps_are_read_with_or_without_a_priority() {
        let line = "<6>[    0.880611] Run /sbin/ember-agent as init process";
        assert_eq!(init_line_us(line), Some(880_611));
        assert_eq!(
            init_line_us("[   12.5] Run /init as init process"),
            Some(12_500_000)
        );
        assert_eq!(init_line_us("[    0.880611] Run /init"), None);
        assert_eq!(init_line_us("<6>[    0.1] Freeing unused memory"), None);
        assert_eq!(init_line_us("Run /init as init process"), None);
        assert_eq!(init_line_us("[abc] Run /init as init process"), None);
        assert_eq!(init_line_us("1.52 0.98"), None);
    }

    #[test]
    fn the_guest_clock_moves_forward() {
        let a = guest_clock_us();
        std::thread::sleep(Duration::from_millis(2));
        assert!(guest_clock_us() >= a + 2_000);
    }
}
