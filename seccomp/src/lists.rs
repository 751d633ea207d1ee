//! What each kind of thread may call. Found by tracing the VMM (`strace -ff`) through boot,
//! exec, file copies, full and diff snapshots, lazy, eager and prefetch restores, pause and
//! resume, and stall reports; see `SECURITY.md` for how to redo it.

use crate::ThreadKind;

/// A condition on one argument of a call (32-bit compare, as `ioctl` numbers and socket
/// families are `int`s).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Eq { index: u8, value: u64 },
    Masked { index: u8, mask: u64, value: u64 },
}

/// Calls every filtered thread may make: memory allocation, locks and sleeping, signal
/// return (the vCPU kick), and what the trap handler and a thread's end need.
pub(crate) const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_write,
    libc::SYS_writev,
    // A thread's own file descriptors are closed when it drops them (and its end).
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
];

/// `_IOC_TYPE` of KVM's ioctls (`KVMIO`), in bits 8..16 of the request.
const KVMIO: u64 = 0xAE;
/// `_IOC_TYPE` of userfaultfd's ioctls (`UFFDIO`).
const UFFDIO: u64 = 0xAA;
/// `FIONBIO`: sets a socket non-blocking (std's `set_nonblocking`).
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX`: sets close-on-exec (std's sockets and files).
const FIOCLEX: u64 = 0x5451;
/// `TUNSETOFFLOAD`: the net device sets the TAP's offloads to what the guest negotiated.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `TCGETS`: is this a terminal (the logger's colour check).
const TCGETS: u64 = 0x5401;

fn ioctl_type(kind: u64) -> Arg {
    Arg::Masked {
        index: 1,
        mask: 0xff00,
        value: kind << 8,
    }
}

fn ioctl_request(request: u64) -> Arg {
    Arg::Eq {
        index: 1,
        value: request,
    }
}

/// `socket(AF_UNIX, …)` only: vsock's host side and the control socket are Unix sockets.
fn unix_socket() -> Arg {
    Arg::Eq {
        index: 0,
        value: libc::AF_UNIX as u64,
    }
}

/// `clone` of a thread (`CLONE_THREAD`), never of a process.
fn clone_thread() -> Arg {
    Arg::Masked {
        index: 0,
        mask: libc::CLONE_THREAD as u64,
        value: libc::CLONE_THREAD as u64,
    }
}

/// Waiting on epoll and event fds.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
];

/// Reading files (the disk image, the store's packs and indexes).
const FILE_READ: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_lseek,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

/// Writing files already open (the disk's overlay, the store's packs).
const FILE_WRITE: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
];

/// Talking over Unix sockets (made with `socket(AF_UNIX)` only, see `restricted`).
const SOCKET_IO: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Calls a thread of `kind` may make with any arguments, besides [`COMMON`].
pub(crate) fn allowed(kind: ThreadKind) -> Vec<i64> {
    let groups: &[&[i64]] = match kind {
        // KVM_RUN and the state ioctls (`restricted`), writes to event fds and the log
        // (COMMON).
        ThreadKind::Vcpu => &[],
        ThreadKind::Devices => &[
            EVENTS,
            FILE_READ,
            FILE_WRITE,
            SOCKET_IO,
            // The block and net rate limiters' retry timers.
            &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime],
        ],
        // Pages a partial snapshot's store lacks come over the page channel, a Unix socket
        // the service passed (no socket of its own: `socket` and `connect` stay out).
        ThreadKind::MemoryFaults => &[EVENTS, FILE_READ, &[libc::SYS_sendto, libc::SYS_recvfrom]],
        ThreadKind::SerialOutput => &[],
        ThreadKind::JailSupervisor => &[&[
            libc::SYS_wait4,
            libc::SYS_rt_sigtimedwait,
            libc::SYS_rt_sigaction,
            libc::SYS_kill,
            libc::SYS_tgkill,
        ]],
        ThreadKind::Control => &[
            EVENTS,
            FILE_READ,
            FILE_WRITE,
            SOCKET_IO,
            // Snapshots into the store: temporary names, renames, directories, locks.
            &[
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_mkdir,
                libc::SYS_mkdirat,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_link,
                libc::SYS_linkat,
                libc::SYS_getdents64,
                libc::SYS_flock,
                libc::SYS_readlink,
                libc::SYS_readlinkat,
                libc::SYS_getcwd,
            ],
            // The control socket, the agent connection, stall reports on SIGUSR1, vCPU kicks.
            &[
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_setsockopt,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_rt_sigaction,
                libc::SYS_rt_sigtimedwait,
                libc::SYS_tgkill,
                libc::SYS_wait4,
                libc::SYS_dup,
                libc::SYS_dup2,
                libc::SYS_dup3,
            ],
            // Threads: clone3 is answered ENOSYS by a second filter (its flags cannot be
            // inspected), so the C library falls back to `clone`, allowed for threads only.
            &[libc::SYS_clone3],
        ],
    };
    let mut calls: Vec<i64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// Whether threads of `kind` start threads (and so need the `clone3` → `ENOSYS` filter).
pub(crate) fn starts_threads(kind: ThreadKind) -> bool {
    kind == ThreadKind::Control
}

/// `fcntl` commands any thread may use: reading and setting descriptor and status flags
/// (std checks a descriptor is open before closing it, in debug builds), and duplicating
/// with close-on-exec.
fn fcntl_flags_and_dup() -> (i64, Vec<Arg>) {
    let cmd = |value: i32| Arg::Eq {
        index: 1,
        value: value as u64,
    };
    (
        libc::SYS_fcntl,
        vec![
            cmd(libc::F_GETFD),
            cmd(libc::F_SETFD),
            cmd(libc::F_GETFL),
            cmd(libc::F_SETFL),
            cmd(libc::F_DUPFD_CLOEXEC),
        ],
    )
}

/// Calls a thread of `kind` may make only with these arguments (any one condition suffices).
pub(crate) fn restricted(kind: ThreadKind) -> Vec<(i64, Vec<Arg>)> {
    let mut calls = restricted_for(kind);
    calls.push(fcntl_flags_and_dup());
    calls
}

fn restricted_for(kind: ThreadKind) -> Vec<(i64, Vec<Arg>)> {
    match kind {
        ThreadKind::Vcpu => vec![(libc::SYS_ioctl, vec![ioctl_type(KVMIO)])],
        ThreadKind::Devices => vec![
            (
                libc::SYS_ioctl,
                vec![
                    ioctl_type(KVMIO),
                    ioctl_request(FIONBIO),
                    ioctl_request(FIOCLEX),
                    ioctl_request(TUNSETOFFLOAD),
                ],
            ),
            (libc::SYS_socket, vec![unix_socket()]),
        ],
        ThreadKind::MemoryFaults => vec![(libc::SYS_ioctl, vec![ioctl_type(UFFDIO)])],
        ThreadKind::SerialOutput | ThreadKind::JailSupervisor => Vec::new(),
        ThreadKind::Control => vec![
            (
                libc::SYS_ioctl,
                vec![
                    ioctl_type(KVMIO),
                    ioctl_request(FIONBIO),
                    ioctl_request(FIOCLEX),
                    ioctl_request(TCGETS),
                ],
            ),
            (libc::SYS_socket, vec![unix_socket()]),
            (libc::SYS_clone, vec![clone_thread()]),
            (libc::SYS_prctl, thread_names()),
        ],
    }
}

/// `prctl` only to name a thread (new threads name themselves) or read its name: nothing
/// that changes what the process may do or when it dies (`PR_SET_PDEATHSIG`, dumpability,
/// capabilities, the seccomp mode).
fn thread_names() -> Vec<Arg> {
    [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|option| Arg::Eq {
            index: 0,
            value: option as u64,
        })
        .collect()
}
