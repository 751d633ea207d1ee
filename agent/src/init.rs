//! PID 1 duties: mount the pseudo filesystems, mark boot, reap children, reset the guest.

use std::ffi::CString;

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

/// Writes the magic byte to ember's boot-timer port so the VMM logs "userspace reached".
pub fn mark_boot_complete() {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(crate::BOOT_TIMER_PORT.into(), 1, 1) } != 0 {
        eprintln!(
            "ember-agent: ioperm for the boot timer: {}",
            std::io::Error::last_os_error()
        );
        return;
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

/// Waits for any child forever (PID 1 must reap orphans).
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
