//! The `SIGSYS` handler: a filtered thread made a call outside its list. It writes one line
//! (which thread, which call) to stderr and ends the process: continuing would hand the
//! thread's control flow back to whatever made the call.

use std::cell::Cell;
use std::sync::OnceLock;

/// The VMM's exit code after a forbidden system call (128 + `SIGSYS`, as a shell reports a
/// process killed by `SIGSYS`).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The filtered thread's kind, for the message (a `const` thread-local: reading it in a
    /// signal handler neither allocates nor registers a destructor).
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("unfiltered") };
}

pub(crate) fn set_thread_kind(name: &'static str) {
    THREAD_KIND.with(|kind| kind.set(name));
}

/// Installs the handler once per process.
pub(crate) fn install() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed `sigaction` is valid (no flags, empty mask, no handler) before
        // the fields below are set.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is a valid sigaction with an `extern "C"` three-argument handler
        // (SA_SIGINFO) that only calls async-signal-safe functions; the old action is not read.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// Offset of `si_syscall` in the kernel's `siginfo_t` on x86_64: three `int`s, padding to 8,
/// then the `_sigsys` union member `{ void *call_addr; int syscall; unsigned arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let number = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel hands a complete `siginfo_t` (128 bytes) to an SA_SIGINFO
        // handler; for a seccomp SIGSYS its `_sigsys` member holds the call's number at this
        // offset, inside the structure. An unaligned read avoids assuming its alignment.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) }
    };
    let mut line = Line::default();
    line.push(b"ember: seccomp: the ");
    line.push(THREAD_KIND.with(Cell::get).as_bytes());
    line.push(b" thread made a forbidden system call: ");
    line.push(
        syscall_name(i64::from(number))
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b" (");
    line.push_number(number);
    line.push(b"); ending the VMM\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `line` is a valid buffer of
    // `len` bytes. Both calls are in every thread's list.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// A fixed buffer to format the message without allocating.
pub(crate) struct Line {
    pub(crate) buf: [u8; 192],
    pub(crate) len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub(crate) fn push_number(&mut self, number: i32) {
        if number < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut value = number.unsigned_abs();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }
}

macro_rules! syscall_names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name)),)*]
    };
}

/// Names of the calls a message is likely to mention (those a compromised VMM thread would
/// try first, and those some thread is allowed).
static SYSCALL_NAMES: &[(i64, &str)] = syscall_names![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_sched_yield,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_sendfile,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_fdatasync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getdents64,
    SYS_getcwd,
    SYS_chdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_umask,
    SYS_getuid,
    SYS_ptrace,
    SYS_setuid,
    SYS_setgid,
    SYS_sigaltstack,
    SYS_personality,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_chroot,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_reboot,
    SYS_init_module,
    SYS_delete_module,
    SYS_gettid,
    SYS_tkill,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_epoll_create,
    SYS_getdents,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_linkat,
    SYS_readlinkat,
    SYS_ppoll,
    SYS_unshare,
    SYS_set_robust_list,
    SYS_splice,
    SYS_fallocate,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_accept4,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup3,
    SYS_pipe2,
    SYS_preadv,
    SYS_pwritev,
    SYS_perf_event_open,
    SYS_recvmmsg,
    SYS_prlimit64,
    SYS_setns,
    SYS_sendmmsg,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_finit_module,
    SYS_renameat2,
    SYS_seccomp,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_kexec_file_load,
    SYS_bpf,
    SYS_execveat,
    SYS_userfaultfd,
    SYS_copy_file_range,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_statx,
    SYS_rseq,
    SYS_pidfd_open,
    SYS_clone3,
    SYS_io_uring_setup,
    SYS_rt_sigtimedwait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_sched_getparam,
    SYS_getpriority,
    SYS_sched_setaffinity,
    SYS_getppid,
    SYS_sysinfo,
    SYS_pidfd_send_signal,
];

/// The name of system call `number`, where known.
pub(crate) fn syscall_name(number: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == number)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

/// The number of system call `name` (among those [`syscall_name`] knows).
pub(crate) fn syscall_number(name: &str) -> Option<i64> {
    SYSCALL_NAMES
        .iter()
        .find(|(_, n)| n.trim_start_matches("SYS_") == name)
        .map(|(number, _)| *number)
}
