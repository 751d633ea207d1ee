//! Per-thread seccomp filters for ember's VMM.
//!
//! Each VMM thread installs the filter of its [`ThreadKind`] as its first act, before the
//! guest runs an instruction: an allow-list of the system calls that thread makes (and, for
//! `ioctl` and `socket`, of their arguments: a vCPU thread may issue KVM ioctls only). Any other
//! call is trapped: the `SIGSYS` handler writes one line naming the thread and the call to
//! stderr, and the process exits with [`EXIT_SECCOMP`], so a compromised thread cannot go on
//! and the service reports why the sandbox ended.
//!
//! The lists come from tracing the VMM through boot, exec, files, snapshot (full and diff),
//! lazy/prefetch restore, pause/resume and stall reports (`strace -ff`, see `SECURITY.md`);
//! the whole VM test suite runs with the filters installed.
//!
//! `EMBER_SECCOMP=log` allows unlisted calls but has the kernel log them (audit, in `dmesg`),
//! for finding what a new code path needs; `EMBER_SECCOMP=off` installs nothing;
//! `EMBER_SECCOMP_DENY=vcpu:ioctl` takes a call off a thread's list (to see the trap work).

mod handler;
mod lists;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use handler::EXIT_SECCOMP;

/// The kinds of thread in a VMM process, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU: `KVM_RUN` and the exits it hands to device emulation.
    Vcpu,
    /// The device event loop: virtio queues, the disk image, vsock's Unix sockets.
    Devices,
    /// Serves a restored guest's missing pages (userfaultfd) and prefetches its working set.
    MemoryFaults,
    /// Writes the guest's serial console out.
    SerialOutput,
    /// The sandbox's control threads: the control socket (pause, resume, snapshot into the
    /// store, stop), the agent connection, waiting for the VM's end, stall reports.
    Control,
    /// Waits outside a jail for the jailed VMM and forwards signals to it (`ember-jail`).
    JailSupervisor,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::MemoryFaults,
        ThreadKind::SerialOutput,
        ThreadKind::Control,
        ThreadKind::JailSupervisor,
    ];

    /// The name used in logs and in the trap's message.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::MemoryFaults => "memory-faults",
            ThreadKind::SerialOutput => "serial-output",
            ThreadKind::Control => "control",
            ThreadKind::JailSupervisor => "jail-supervisor",
        }
    }
}

/// What happens to a call outside a thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Trap: log the call and end the VMM with [`EXIT_SECCOMP`] (the default).
    Enforce,
    /// Allow it, and have the kernel log it (audit records in `dmesg`).
    Log,
    /// No filters.
    Off,
}

impl Mode {
    /// From `EMBER_SECCOMP` (`off`, `log`; anything else, or unset, enforces).
    pub fn from_env() -> Mode {
        match std::env::var("EMBER_SECCOMP").as_deref() {
            Ok("off") => Mode::Off,
            Ok("log") => Mode::Log,
            _ => Mode::Enforce,
        }
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {kind} thread: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error("installing the seccomp filter of the {kind} thread: {reason}")]
    Install { kind: &'static str, reason: String },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Compiles the filter of `kind` for `mode` (`None` for [`Mode::Off`]).
pub fn compile(kind: ThreadKind, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Enforce => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let build = |reason: String| SeccompError::Build {
        kind: kind.name(),
        reason,
    };
    let denied = denied_calls(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in lists::COMMON.iter().chain(&lists::allowed(kind)) {
        if !denied.contains(&call) {
            rules.insert(call, Vec::new());
        }
    }
    for (call, conditions) in lists::restricted(kind) {
        if denied.contains(&call) {
            continue;
        }
        let mut chain = Vec::new();
        for condition in conditions {
            let condition = match condition {
                lists::Arg::Eq { index, value } => {
                    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                }
                lists::Arg::Masked { index, mask, value } => SeccompCondition::new(
                    index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(mask),
                    value,
                ),
            }
            .map_err(|e| build(format!("syscall {call}: {e}")))?;
            chain.push(SeccompRule::new(vec![condition]).map_err(|e| build(e.to_string()))?);
        }
        if rules.insert(call, chain).is_some() {
            return Err(build(format!(
                "syscall {call} is both allowed outright and restricted"
            )));
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))?;
    Ok(Some(program))
}

/// Calls taken off `kind`'s list by `EMBER_SECCOMP_DENY` (`KIND:CALL[,KIND:CALL…]`, e.g.
/// `vcpu:ioctl`): a way to see what a VMM does when one of its threads makes a forbidden call
/// (the VM tests use it). It can only narrow a list.
fn denied_calls(kind: ThreadKind) -> Vec<i64> {
    let Ok(spec) = std::env::var("EMBER_SECCOMP_DENY") else {
        return Vec::new();
    };
    spec.split(',')
        .filter_map(|item| item.trim().split_once(':'))
        .filter(|(k, _)| *k == kind.name())
        .filter_map(|(_, call)| {
            let number = handler::syscall_number(call);
            if number.is_none() {
                log::warn!("EMBER_SECCOMP_DENY: unknown system call {call:?}");
            }
            number
        })
        // The trap's own message and exit.
        .filter(|call| ![libc::SYS_write, libc::SYS_exit_group].contains(call))
        .collect()
}

/// The filter stacked on threads that start threads: `clone3` fails with `ENOSYS` (the C
/// library then uses `clone`, whose flags the main filter checks); everything else is left to
/// the main filter.
fn compile_clone3_fallback(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |reason: String| SeccompError::Build {
        kind: kind.name(),
        reason,
    };
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

/// Installs the filter of `kind` on the calling thread, in the mode `EMBER_SECCOMP` asks for.
/// Threads this one starts afterwards inherit it (on top of their own).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    install_with(kind, Mode::from_env())
}

/// As [`install`], with the mode given.
pub fn install_with(kind: ThreadKind, mode: Mode) -> Result<(), SeccompError> {
    let Some(program) = compile(kind, mode)? else {
        return Ok(());
    };
    handler::install().map_err(SeccompError::Handler)?;
    handler::set_thread_kind(kind.name());
    let fallback = if lists::starts_threads(kind) {
        Some(compile_clone3_fallback(kind)?)
    } else {
        None
    };
    // The fallback first: once the main filter is in, installing another is forbidden.
    for program in fallback.iter().chain(std::iter::once(&program)) {
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            reason: e.to_string(),
        })?;
    }
    log::debug!(
        "seccomp: the {} thread is filtered ({} syscalls allowed, mode {mode:?})",
        kind.name(),
        lists::COMMON.len() + lists::allowed(kind).len() + lists::restricted(kind).len()
    );
    Ok(())
}

/// Starts a thread named `name` that installs the filter of `kind` and then runs `body`;
/// returns once the filter is in place (or with the reason it could not be installed, in
/// which case `body` never runs).
pub fn spawn_filtered<F>(
    name: String,
    kind: ThreadKind,
    body: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (installed_tx, installed) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let result = install(kind);
        let ok = result.is_ok();
        let _ = installed_tx.send(result);
        if ok {
            body();
        }
    })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::other(format!(
            "the {} thread ended before installing its seccomp filter",
            kind.name()
        ))),
    }
}

#[cfg(test)]
mod tests;
