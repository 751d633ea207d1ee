//! A VMM process held by a pidfd: signals and liveness checks reach that process and never
//! one that reused its pid after it was reaped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A process, by pidfd.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    fd: OwnedFd,
}

impl Process {
    /// Opens process `pid`. Sound for a child not reaped yet; for a process found by pid
    /// (adopted after a restart) it is the process holding that pid now.
    pub fn open(pid: u32) -> std::io::Result<Process> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Process { pid, fd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the process (an error once it has ended).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with our pidfd, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process still runs (a pidfd becomes readable when its process ends, even
    /// before it is reaped).
    pub fn is_alive(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call; no waiting.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_signalled_and_seen_to_end_through_its_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let process = Process::open(child.id()).unwrap();
        assert!(process.is_alive());
        process.signal(libc::SIGKILL).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process.is_alive() {
            assert!(std::time::Instant::now() < deadline, "still alive");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Ended but not reaped: the pidfd still names it, and nothing else gets the signal.
        assert!(!process.is_alive());
        let _ = child.wait();
        assert!(process.signal(libc::SIGKILL).is_err());
    }
}
