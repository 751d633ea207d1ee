//! vCPU threads: one thread per vCPU running `KVM_RUN`, driven by the VMM through a mailbox.
//!
//! Each vCPU is a small state machine ([`VcpuState`]: Paused, Running, Exited) moved by
//! [`VcpuCommand`]s. Every command is acknowledged with a [`VcpuResponse`] once the vCPU is
//! in the new state (for Pause: out of `KVM_RUN`), so "pause all vCPUs" completes at a
//! consistent point. A running vCPU is kicked out of `KVM_RUN` with [`kick_signal`]: its
//! handler sets the thread's `kvm_run.immediate_exit`, so a kick that races with entering
//! `KVM_RUN` is not lost; `KVM_RUN` then fails with EINTR and the vCPU reads its mailbox.
//!
//! When the guest does something that ends the run (reset, shutdown, failure), the vCPU sends
//! a [`VcpuStop`] to the VMM, signals the stop [`EventFd`], and pauses itself.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How long the VMM waits for a vCPU to acknowledge a command.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest's port and MMIO accesses, as the vCPU hands them on. The device bus sits behind
/// it. Implementations must not fail: an access to nothing reads as all-ones (ports) or zeros
/// (MMIO) and is logged at debug level.
pub trait IoHandler: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// An [`IoHandler`] with no devices at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDevices;

impl IoHandler for NoDevices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        log::debug!("read of {} bytes from unhandled port {port:#x}", data.len());
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        log::debug!("write of {data:x?} to unhandled port {port:#x}");
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!(
            "read of {} bytes from unhandled MMIO address {addr:#x}",
            data.len()
        );
        data.fill(0);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        log::debug!("write of {data:x?} to unhandled MMIO address {addr:#x}");
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Handled: enter the guest again.
    Continue,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault, which is how a guest with `reboot=t` resets.
    Shutdown,
    /// `KVM_SYSTEM_EVENT_RESET`: the guest asked for a reset.
    Reset,
    /// The guest stopped: powered off or halted with nothing to wake it.
    Stop,
    /// The vCPU cannot go on (internal error, failed entry, emulation failure).
    Fail(String),
}

impl ExitAction {
    /// Whether the guest can no longer run after this action.
    pub fn ends_run(&self) -> bool {
        !matches!(self, ExitAction::Continue)
    }
}

/// Decides what to do about one `KVM_RUN` exit, doing the port and MMIO accesses on `io`.
pub fn handle_exit(exit: VcpuExit, io: &dyn IoHandler) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            io.pio_read(port, data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            io.pio_write(port, data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            io.mmio_read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            io.mmio_write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Shutdown => ExitAction::Shutdown,
        VcpuExit::SystemEvent(kind, data) => match kind {
            KVM_SYSTEM_EVENT_RESET => ExitAction::Reset,
            KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop,
            KVM_SYSTEM_EVENT_CRASH => ExitAction::Fail(format!("guest crashed (data {data:x?})")),
            other => {
                log::debug!("ignoring KVM system event {other} (data {data:x?})");
                ExitAction::Continue
            }
        },
        // With the in-kernel LAPIC, HLT never reaches userspace; if it does, nothing will
        // wake this vCPU.
        VcpuExit::Hlt => ExitAction::Stop,
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Fail(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
        )),
        VcpuExit::InternalError => ExitAction::Fail(INTERNAL_ERROR.to_string()),
        // A signal interrupted the guest: the loop reads its mailbox.
        VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::Nmi | VcpuExit::IoapicEoi(_) => {
            ExitAction::Continue
        }
        VcpuExit::Debug(_) => ExitAction::Continue,
        VcpuExit::MemoryFault { flags, gpa, size } => ExitAction::Fail(format!(
            "KVM_EXIT_MEMORY_FAULT at {gpa:#x} ({size:#x} bytes, flags {flags:#x})"
        )),
        VcpuExit::Unsupported(reason) => {
            ExitAction::Fail(format!("exit reason {reason} is not supported"))
        }
        other => ExitAction::Fail(format!("unexpected vCPU exit {other:?}")),
    }
}

/// The failure text of `KVM_EXIT_INTERNAL_ERROR`; the vCPU loop replaces it with
/// [`internal_error_details`].
const INTERNAL_ERROR: &str = "KVM_EXIT_INTERNAL_ERROR";

/// Details of the last `KVM_EXIT_INTERNAL_ERROR` from the vCPU's `kvm_run`.
pub fn internal_error_details(run: &kvm_run) -> String {
    // SAFETY: the caller only asks after KVM_EXIT_INTERNAL_ERROR, for which the kernel fills
    // the `internal` member of the union; all its fields are plain integers.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let kind = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        "emulation failure"
    } else {
        "internal error"
    };
    format!(
        "KVM {kind} (suberror {}, data {:x?})",
        internal.suberror,
        &internal.data[..ndata]
    )
}

/// Commands from the VMM to a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Resume,
    Pause,
    Exit,
    /// Save the vCPU's state (only while paused).
    Save,
}

/// The states of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Not in `KVM_RUN`; waiting for a command.
    Paused,
    /// Running the guest.
    Running,
    /// The thread is ending; no more commands are read.
    Exited,
}

/// Acknowledgements: the state the vCPU is now in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Exited,
    Saved(SavedVcpu),
    SaveFailed(String),
}

/// A saved vCPU state travelling from its thread to the VMM.
#[derive(Debug, Clone)]
pub struct SavedVcpu(pub Arc<crate::persist::vcpu::VcpuState>);

impl PartialEq for SavedVcpu {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SavedVcpu {}

/// The state machine: the state after `command` and its acknowledgement.
pub fn transition(state: VcpuState, command: VcpuCommand) -> (VcpuState, VcpuResponse) {
    match (state, command) {
        (VcpuState::Exited, _) | (_, VcpuCommand::Exit) => {
            (VcpuState::Exited, VcpuResponse::Exited)
        }
        (_, VcpuCommand::Pause) => (VcpuState::Paused, VcpuResponse::Paused),
        (_, VcpuCommand::Resume) => (VcpuState::Running, VcpuResponse::Resumed),
        // Saving needs the vCPU's fd; the thread answers it itself (see `save_response`). A
        // running vCPU is never saved: its state would not be consistent.
        (state, VcpuCommand::Save) => (
            state,
            VcpuResponse::SaveFailed(format!("vCPU is {state:?}; pause it first")),
        ),
    }
}

/// A vCPU told the VMM the guest run is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStop {
    pub index: u8,
    pub action: ExitAction,
}

/// Errors of vCPU thread control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot register the vCPU kick signal handler for signal {signal}: {source}")]
    SignalHandler {
        signal: i32,
        source: vmm_sys_util::errno::Error,
    },
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot send {command:?} to vCPU {index}: its thread is gone")]
    Send { index: u8, command: VcpuCommand },
    #[error("cannot kick vCPU {index} with signal {signal}: {source}")]
    Kick {
        index: u8,
        signal: i32,
        source: vmm_sys_util::errno::Error,
    },
    #[error("vCPU {index} did not acknowledge {command:?} within {timeout:?}")]
    Timeout {
        index: u8,
        command: VcpuCommand,
        timeout: Duration,
    },
    #[error("vCPU {index} answered {got:?} to {command:?}")]
    WrongResponse {
        index: u8,
        command: VcpuCommand,
        got: VcpuResponse,
    },
    #[error("the thread of vCPU {index} panicked")]
    Panicked { index: u8 },
    #[error("cannot save vCPU {index}: {reason}")]
    Save { index: u8, reason: String },
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null outside a vCPU thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread local and a byte store.
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: a non-null pointer is this thread's own kvm_run mapping, set by the vCPU
        // loop while it owns the VcpuFd and cleared before the VcpuFd is dropped.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(|source| {
            VcpuError::SignalHandler {
                signal: kick_signal(),
                source,
            }
        });
    });
    result
}

/// A vCPU ready to get its thread.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub io: Arc<dyn IoHandler>,
}

/// The VMM's end of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    commands: Sender<VcpuCommand>,
    responses: Mutex<Receiver<VcpuResponse>>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Starts the vCPU thread, Paused. Ends of run are reported on `stops` and `stop_evt`.
    pub fn start(
        self,
        stops: Sender<VcpuStop>,
        stop_evt: EventFd,
    ) -> Result<VcpuHandle, VcpuError> {
        register_kick_handler()?;
        let index = self.index;
        let (commands, mailbox) = channel();
        let (acks, responses) = channel();
        // Read here, where opening /dev/kvm is allowed, for the thread's saves.
        if let Err(e) = host_msr_indices() {
            log::warn!("vCPU {index}: cannot list the host's MSRs (snapshots will fail): {e}");
        }
        // The thread's filter is in place before `start` returns, so before any Resume.
        let thread = ember_seccomp::spawn_filtered(
            format!("ember-vcpu{index}"),
            ember_seccomp::ThreadKind::Vcpu,
            move || self.run_thread(mailbox, acks, stops, stop_evt),
        )
        .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            commands,
            responses: Mutex::new(responses),
            thread: Some(thread),
        })
    }

    /// Tells the guest (through kvmclock's `PVCLOCK_GUEST_STOPPED`) that it was stopped, so
    /// its soft-lockup watchdog does not count a pause or the time a snapshot lay in the store
    /// as a hung CPU. Fails harmlessly (`EINVAL`) before the guest set up kvmclock.
    fn mark_clock_stopped(&self) {
        if let Err(e) = self.fd.kvmclock_ctrl() {
            log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
    }

    fn run_thread(
        mut self,
        mailbox: Receiver<VcpuCommand>,
        acks: Sender<VcpuResponse>,
        stops: Sender<VcpuStop>,
        stop_evt: EventFd,
    ) {
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|cell| cell.set(flag));
        let mut state = VcpuState::Paused;
        let apply = |state: &mut VcpuState, command| {
            let (next, ack) = transition(*state, command);
            *state = next;
            // A VMM that went away no longer needs the acknowledgement.
            let _ = acks.send(ack);
        };
        while state != VcpuState::Exited {
            if state == VcpuState::Paused {
                match mailbox.recv() {
                    Ok(VcpuCommand::Save) => {
                        let _ = acks.send(self.save_response());
                    }
                    Ok(VcpuCommand::Resume) => {
                        self.mark_clock_stopped();
                        apply(&mut state, VcpuCommand::Resume);
                    }
                    Ok(command) => apply(&mut state, command),
                    Err(_) => state = VcpuState::Exited,
                }
                continue;
            }
            // Running: commands first, so a Pause is never behind a long guest run.
            while let Ok(command) = mailbox.try_recv() {
                if command == VcpuCommand::Save && state == VcpuState::Paused {
                    // A Save queued right behind a Pause.
                    let _ = acks.send(self.save_response());
                    continue;
                }
                if state == VcpuState::Running && command != VcpuCommand::Resume {
                    self.complete_pending_io();
                }
                apply(&mut state, command);
            }
            if state != VcpuState::Running {
                continue;
            }
            let action = match self.fd.run() {
                Ok(exit) => {
                    let action = handle_exit(exit, self.io.as_ref());
                    if matches!(&action, ExitAction::Fail(why) if why == INTERNAL_ERROR) {
                        ExitAction::Fail(internal_error_details(self.fd.get_kvm_run()))
                    } else {
                        action
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Fail(format!("KVM_RUN failed: {e}")),
            };
            if action.ends_run() {
                if action == ExitAction::Shutdown {
                    // A triple fault is how `reboot=t` resets, but also how an early boot
                    // failure looks: say where it happened.
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    log::info!(
                        "vCPU {} triple fault (shutdown) at rip {rip:#x}",
                        self.index
                    );
                }
                log::debug!("vCPU {} stops: {action:?}", self.index);
                state = VcpuState::Paused;
                let _ = stops.send(VcpuStop {
                    index: self.index,
                    action,
                });
                if let Err(e) = stop_evt.write(1) {
                    log::error!("vCPU {} cannot signal its stop: {e}", self.index);
                }
            }
        }
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// MSRs a snapshot saves beyond KVM's list (which leaves them out): PAT and the MTRRs,
/// which the guest's memory types depend on (ember enables MTRRs at boot).
const EXTRA_SAVED_MSRS: &[u32] = &[
    0x277, // IA32_PAT
    0x2ff, // IA32_MTRR_DEF_TYPE
    0x250, 0x258, 0x259, // fixed-range MTRRs: 64K, 16K ×2
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed-range MTRRs: 4K ×8
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable MTRRs 0-3
    0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e, 0x20f, // variable MTRRs 4-7
];

/// The MSRs a snapshot saves: the host's list (`KVM_GET_MSR_INDEX_LIST`) and
/// [`EXTRA_SAVED_MSRS`], read once, by `Vcpu::start`: opening `/dev/kvm` is not among what a
/// vCPU thread may do.
fn host_msr_indices() -> Result<&'static [u32], &'static str> {
    static LIST: OnceLock<Result<Vec<u32>, String>> = OnceLock::new();
    LIST.get_or_init(|| {
        kvm_ioctls::Kvm::new()
            .and_then(|kvm| kvm.get_msr_index_list())
            .map(|list| {
                let mut indices = list.as_slice().to_vec();
                for extra in EXTRA_SAVED_MSRS {
                    if !indices.contains(extra) {
                        indices.push(*extra);
                    }
                }
                indices
            })
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map(Vec::as_slice)
    .map_err(String::as_str)
}

impl Vcpu {
    /// Saves this (paused) vCPU for the VMM.
    fn save_response(&self) -> VcpuResponse {
        let msrs = match host_msr_indices() {
            Ok(list) => list,
            Err(e) => return VcpuResponse::SaveFailed(format!("cannot list the host's MSRs: {e}")),
        };
        match crate::persist::vcpu::save_vcpu(&self.fd, self.index, msrs) {
            Ok(state) => VcpuResponse::Saved(SavedVcpu(Arc::new(state))),
            Err(e) => VcpuResponse::SaveFailed(e.to_string()),
        }
    }

    /// Finishes an instruction whose port or MMIO access was just handled, without running
    /// the guest further: `KVM_RUN` with `immediate_exit` completes it and returns EINTR. After
    /// this the vCPU state is consistent (e.g. for a snapshot). A string instruction may exit
    /// again; those accesses are handled too.
    fn complete_pending_io(&mut self) {
        for _ in 0..64 {
            self.fd.set_kvm_immediate_exit(1);
            let result = self.fd.run();
            let done = match result {
                Ok(exit) => {
                    let action = handle_exit(exit, self.io.as_ref());
                    if action.ends_run() {
                        log::debug!("vCPU {} ends while pausing: {action:?}", self.index);
                    }
                    action.ends_run()
                }
                Err(_) => true,
            };
            if done {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Posts `command` and kicks the vCPU out of `KVM_RUN`; does not wait.
    pub fn send(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        let index = self.index;
        self.commands
            .send(command)
            .map_err(|_| VcpuError::Send { index, command })?;
        if let Some(thread) = &self.thread {
            thread
                .kill(kick_signal())
                .map_err(|source| VcpuError::Kick {
                    index,
                    signal: kick_signal(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Waits for the acknowledgement of `command`.
    pub fn wait_ack(&self, command: VcpuCommand, timeout: Duration) -> Result<(), VcpuError> {
        let index = self.index;
        let expected = match command {
            VcpuCommand::Resume => VcpuResponse::Resumed,
            VcpuCommand::Pause => VcpuResponse::Paused,
            VcpuCommand::Exit => VcpuResponse::Exited,
            VcpuCommand::Save => {
                return self.wait_saved(timeout).map(|_| ());
            }
        };
        match self
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(timeout)
        {
            Ok(got) if got == expected => Ok(()),
            // An exited vCPU acknowledges everything with Exited.
            Ok(VcpuResponse::Exited) if command != VcpuCommand::Resume => Ok(()),
            Ok(got) => Err(VcpuError::WrongResponse {
                index,
                command,
                got,
            }),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                index,
                command,
                timeout,
            }),
            // The thread ended: it is as exited as it gets.
            Err(RecvTimeoutError::Disconnected) if command != VcpuCommand::Resume => Ok(()),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Send { index, command }),
        }
    }

    /// Waits for the answer to a `Save`.
    fn wait_saved(
        &self,
        timeout: Duration,
    ) -> Result<Arc<crate::persist::vcpu::VcpuState>, VcpuError> {
        let index = self.index;
        match self
            .responses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(timeout)
        {
            Ok(VcpuResponse::Saved(saved)) => Ok(saved.0),
            Ok(VcpuResponse::SaveFailed(reason)) => Err(VcpuError::Save { index, reason }),
            Ok(got) => Err(VcpuError::WrongResponse {
                index,
                command: VcpuCommand::Save,
                got,
            }),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                index,
                command: VcpuCommand::Save,
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Send {
                index,
                command: VcpuCommand::Save,
            }),
        }
    }

    /// Sends `command` and waits for its acknowledgement.
    pub fn command(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        self.send(command)?;
        self.wait_ack(command, RESPONSE_TIMEOUT)
    }

    /// Tells the thread to exit and joins it.
    pub fn exit_and_join(mut self) -> Result<(), VcpuError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), VcpuError> {
        let index = self.index;
        if self.thread.is_none() {
            return Ok(());
        }
        // A thread that is already gone cannot take the command; joining is what matters.
        if self.send(VcpuCommand::Exit).is_ok() {
            // On a timeout the thread is left detached rather than joined forever.
            let acked = self.wait_ack(VcpuCommand::Exit, RESPONSE_TIMEOUT);
            let thread = self.thread.take();
            acked?;
            if let Some(thread) = thread {
                thread.join().map_err(|_| VcpuError::Panicked { index })?;
            }
            return Ok(());
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| VcpuError::Panicked { index }),
            None => Ok(()),
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            log::error!("{e}");
        }
    }
}

/// Sends `command` to every vCPU first, then collects every acknowledgement, so that all
/// vCPUs move (e.g. pause) together.
/// Saves every (paused) vCPU, in index order.
pub fn save_all(
    handles: &[VcpuHandle],
) -> Result<Vec<Arc<crate::persist::vcpu::VcpuState>>, VcpuError> {
    for handle in handles {
        handle.send(VcpuCommand::Save)?;
    }
    handles
        .iter()
        .map(|h| h.wait_saved(RESPONSE_TIMEOUT))
        .collect()
}

pub fn command_all(handles: &[VcpuHandle], command: VcpuCommand) -> Result<(), VcpuError> {
    for handle in handles {
        handle.send(command)?;
    }
    for handle in handles {
        handle.wait_ack(command, RESPONSE_TIMEOUT)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
