//! The VMM: composes KVM, guest memory, the kernel, the boot structures, the devices and the
//! vCPU threads into a running guest.
//!
//! ```text
//! VmConfig ──Vmm::build──► Vmm (vCPUs paused) ──start──► running ──wait──► ExitReason
//! ```
//!
//! Threads: one per vCPU, one device event loop (virtio queues, vsock sockets), the serial
//! writer, and
//! the caller's, which waits in [`Vmm::wait`] for the first vCPU stop or i8042 reset.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_devices::virtio::block::CowDisk;
use ember_devices::virtio::vsock::{Vsock, MAX_UDS_PATH_LEN, MIN_GUEST_CID};
use ember_devices::{BootMarks, GuestMilestones, Serial};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{
    build_boot_params, build_cmdline, e820_map, load_initrd, ram_of, write_boot_params,
    write_cmdline, BootError, InitrdInfo,
};
use crate::arch::x86_64::cpu_model::CpuModel;
use crate::arch::x86_64::layout::{IRQ_MAX, VIRTIO_IRQ_BASE};
use crate::arch::x86_64::mptable::{setup_mptable, MpTableError};
use crate::arch::x86_64::regs::{write_boot_tables, RegsError};
use crate::config::*;
use crate::device_manager::*;
use crate::kernel::{load_kernel, KernelError, LoadedKernel};
use crate::lazy::LazyMemory;
use crate::memory::{create_boot_memory, low_ram_end, BootRam, GuestMemoryMmap, MemoryError};
use crate::metrics::{micros, resident_split, IoStats, NetIo, RunReport};
use crate::persist::PersistError;
use crate::snapshot::{RestoreMode, SnapshotBase, StoreChunks};
use crate::vcpu::{command_all, ExitAction, Vcpu, VcpuCommand, VcpuError, VcpuHandle};
use crate::vm::{open_kvm, Vm, VmError};

/// Most vCPUs a guest may have (the MP table must fit the EBDA).
pub const MAX_VCPUS: u8 = 32;
/// The block device the root file system is on when `rootfs` is given.
const ROOT_DEVICE: &str = "/dev/vda";
/// How long a shut-down VM waits for host sockets to take the guest's last vsock bytes.
const VSOCK_DELIVERY_LIMIT: Duration = Duration::from_secs(3);

/// How a guest run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset through the i8042 (`reboot=k`, ember's default).
    KeyboardReset,
    /// The guest triple faulted (`reboot=t`): a reset.
    TripleFault,
    /// KVM reported a system reset event.
    SystemReset,
    /// The guest powered off or a vCPU halted for good.
    Stopped,
}

impl ExitReason {
    /// Whether the guest asked to be reset (the normal end of `ember run`).
    pub fn is_reset(self) -> bool {
        !matches!(self, ExitReason::Stopped)
    }
}

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0} vCPUs requested; ember supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("snapshot {id}: {source}")]
    Snapshot {
        id: String,
        #[source]
        source: Box<PersistError>,
    },
    #[error("restore of snapshot {id}: {source}")]
    Restore {
        id: String,
        #[source]
        source: Box<PersistError>,
    },
    #[error("guest memory could not be served: {0}")]
    LazyMemory(String),
    #[error(transparent)]
    Memory(MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot write the boot page tables and GDT: {0}")]
    BootTables(RegsError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create the serial console: {0}")]
    Serial(ember_devices::serial::SerialError),
    #[error("rootfs overlay: {0}")]
    Overlay(String),
    #[error("cannot open the root file system {path}: {source}")]
    Block {
        path: String,
        source: ember_devices::virtio::block::BlockError,
    },
    #[error("vsock guest CID {0} is invalid: it must be at least {MIN_GUEST_CID} and below {max}", max = u32::MAX)]
    VsockCid(u32),
    #[error(
        "vsock socket path {path} is {len} bytes long; a Unix socket path must be 1 to \
         {MAX_UDS_PATH_LEN} bytes"
    )]
    VsockPath { path: String, len: usize },
    #[error("cannot create the vsock device on {path}: {source}")]
    Vsock {
        path: String,
        source: ember_devices::virtio::vsock::VsockError,
    },
    #[error("network: {0}")]
    NetConfig(String),
    #[error("cannot create the network device: {0}")]
    Net(#[source] ember_devices::virtio::net::NetError),
    #[error("cannot create the virtio-mmio transport at {base:#x}: {source}")]
    Mmio {
        base: u64,
        source: ember_devices::virtio::mmio::MmioError,
    },
    #[error("cannot place {what} on the {bus} bus: {source}")]
    Bus {
        what: &'static str,
        bus: &'static str,
        source: ember_devices::BusError,
    },
    #[error("the virtio devices' saved state: {0}")]
    VirtioState(String),
    #[error("no GSI is left for virtio device {0} (GSIs {VIRTIO_IRQ_BASE}..={IRQ_MAX})")]
    OutOfIrqs(usize),
    #[error("cannot create the device event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error("cannot start the device event loop thread: {0}")]
    EventThread(std::io::Error),
    #[error("cannot wait for the guest: {0}")]
    Wait(std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {index} failed: {reason}")]
    VcpuFailed { index: u8, reason: String },
}

/// Locks `m`, giving up after `patience` (for diagnostics that must not hang themselves).
pub(crate) fn try_lock_for<T: ?Sized>(
    m: &Mutex<T>,
    patience: Duration,
) -> Option<std::sync::MutexGuard<'_, T>> {
    let deadline = Instant::now() + patience;
    loop {
        match m.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

pub(crate) fn lock_or_recover<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes the boot structures (GDT, page tables, MP table, command line, zero page) and
/// loads the kernel and initrd.
pub(crate) fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    virtio: &[(u64, u32)],
) -> Result<LoadedKernel, VmmError> {
    write_boot_tables(mem).map_err(VmmError::BootTables)?;
    setup_mptable(mem, config.vcpus)?;
    let kernel = load_kernel(mem, &config.kernel)?;
    let initrd: Option<InitrdInfo> = match &config.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            low_ram_end(mem),
            kernel.initrd_addr_max(),
            kernel.kernel_end,
        )?),
        None => None,
    };
    let root = config
        .rootfs
        .as_ref()
        .map(|_| (ROOT_DEVICE, config.read_only_rootfs));
    // The guest's address goes before the caller's extra (whose `--` part is init's).
    let ip = config
        .net
        .as_ref()
        .and_then(|n| n.ipv4)
        .map(|ip| ip.kernel_parameter());
    let extra = match (ip, config.cmdline_extra.as_deref()) {
        (Some(ip), Some(extra)) => Some(format!("{ip} {extra}")),
        (Some(ip), None) => Some(ip),
        (None, extra) => extra.map(str::to_string),
    };
    let cmdline = build_cmdline(virtio, root, extra.as_deref())?;
    let cmdline_len = write_cmdline(mem, &cmdline)?;
    log::debug!("kernel command line: {cmdline:?}");
    let params = build_boot_params(
        kernel.setup_header,
        cmdline_len,
        initrd,
        &e820_map(&ram_of(mem)),
    )?;
    write_boot_params(mem, &params)?;
    Ok(kernel)
}

/// A built VM. Field order is drop order: vCPU threads and the VM go before guest memory.
pub struct Vmm {
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) event_loop: EventLoop,
    pub(crate) stops: Mutex<Receiver<crate::vcpu::VcpuStop>>,
    pub(crate) stop_evt: EventFd,
    pub(crate) reset_evt: EventFd,
    pub(crate) boot_marks: Arc<BootMarks>,
    pub(crate) io: Arc<DeviceIo>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) transports: Vec<AttachedVirtio>,
    /// The rootfs's copy-on-write overlay, if it has one (read for snapshots).
    pub(crate) rootfs_cow: Option<Arc<CowDisk>>,
    /// A restored rootfs's snapshot chunks, for those the guest has not touched yet.
    pub(crate) rootfs_chunks: Option<Arc<StoreChunks>>,
    /// The vsock device, whose last guest bytes are delivered at shutdown.
    pub(crate) vsock: Option<Arc<Mutex<Vsock>>>,
    pub(crate) io_devices: IoDevices,
    pub(crate) config: VmConfig,
    pub(crate) vm: Vm,
    /// Serves a restored VM's memory; dropped after the vCPUs (Drop) and before the memory.
    pub(crate) lazy: Option<LazyMemory>,
    /// How a restored VM's memory arrived (never `Auto`).
    pub(crate) restore_mode: Option<RestoreMode>,
    /// A restored VM's memory file (mode `file`), locked against eviction while mapped.
    pub(crate) mapped_memory: Option<ember_snapshot_store::CachedMemory>,
    /// Where its start spent its time.
    pub(crate) timeline: Arc<crate::timeline::Timeline>,
    /// The CPU features the guest was offered when it booted (recorded in its snapshots).
    pub(crate) cpu_model: CpuModel,
    /// The snapshot memory equals but for the dirty pages (set by restores and snapshots);
    /// dirty page logging is on exactly when this is set.
    pub(crate) base: Mutex<Option<SnapshotBase>>,
    /// Whether the vCPUs were last told to run (`resume`) rather than to stop (`pause`);
    /// the lock also orders pauses and resumes from different threads.
    pub(crate) running: Mutex<bool>,
    pub(crate) mem: GuestMemoryMmap,
    /// A booted VM's RAM mappings (after `mem`, so the pages go back to the host last).
    pub(crate) boot_ram: Option<BootRam>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Builds the VM for `config` with its vCPUs paused at the kernel entry.
    pub fn build(config: &VmConfig, options: VmmOptions) -> Result<Vmm, VmmError> {
        config.validate()?;
        let timeline = Arc::new(crate::timeline::Timeline::new(options.start));
        let kvm = open_kvm()?;
        let (mem, boot_ram) = create_boot_memory(config.mem_bytes()).map_err(VmmError::Memory)?;
        timeline.mark("memory_mapped");
        let vm = Vm::new(&kvm)?;
        // SAFETY: `mem` is stored in the Vmm after `vm` and the vCPUs, so it is dropped after
        // them; every other holder is a clone sharing the same mappings.
        unsafe { vm.register_memory(&mem) }?;

        let devices = attach_devices(&vm, &mem, config, options, None, None)?;
        timeline.mark("devices_attached");
        let kernel = load_guest(&mem, config, &devices.virtio)?;
        timeline.mark("kernel_loaded");
        log::debug!("{:?} kernel entry {:#x}", kernel.format, kernel.entry.0);

        let fds = (0..config.vcpus)
            .map(|index| {
                Ok((
                    index,
                    vm.create_boot_vcpu(index, config.vcpus, kernel.entry.0)?,
                ))
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        timeline.mark("devices_built");
        let cpu_model = vm.cpu_model(config.vcpus)?;
        let mut vmm = Vmm::assemble(config.clone(), vm, mem, None, None, devices, fds)?;
        vmm.timeline = timeline;
        vmm.cpu_model = cpu_model;
        vmm.boot_ram = Some(boot_ram);
        Ok(vmm)
    }

    /// Starts a thread for each vCPU (paused) and the event loop, and puts the VM together.
    pub(crate) fn assemble(
        config: VmConfig,
        vm: Vm,
        mem: GuestMemoryMmap,
        lazy: Option<LazyMemory>,
        base: Option<SnapshotBase>,
        devices: Devices,
        fds: Vec<(u8, kvm_ioctls::VcpuFd)>,
    ) -> Result<Vmm, VmmError> {
        let (stops_tx, stops) = channel();
        let stop_evt = eventfd("vCPU stops")?;
        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, fd) in fds {
            let vcpu = Vcpu {
                index,
                fd,
                io: devices.io.clone(),
            };
            vcpus.push(vcpu.start(stops_tx.clone(), clone_evt(&stop_evt, "vCPU stops")?)?);
        }
        let event_loop = EventLoop::start(devices.subscribers)?;
        Ok(Vmm {
            vcpus,
            event_loop,
            stops: Mutex::new(stops),
            stop_evt,
            reset_evt: devices.reset_evt,
            boot_marks: devices.boot_marks,
            io: devices.io,
            serial: devices.serial,
            transports: devices.transports,
            rootfs_cow: devices.rootfs_cow,
            rootfs_chunks: None,
            vsock: devices.vsock,
            io_devices: devices.io_devices,
            config,
            vm,
            lazy,
            restore_mode: None,
            mapped_memory: None,
            timeline: Arc::new(crate::timeline::Timeline::new(Instant::now())),
            cpu_model: CpuModel::default(),
            base: Mutex::new(base),
            running: Mutex::new(false),
            mem,
            boot_ram: None,
        })
    }

    /// Live and pending vsock connections (`None` without a vsock device).
    pub fn vsock_connections(&self) -> Option<usize> {
        self.vsock.as_ref().map(|v| {
            let v = lock_or_recover(v);
            v.connection_count() + v.pending_client_count()
        })
    }

    /// Waits up to `limit` for the vsock device to hold no connections (host clients that
    /// just closed theirs take a moment to be torn down with the guest); returns how many
    /// remain.
    pub fn wait_for_vsock_idle(&self, limit: Duration) -> Option<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let count = self.vsock_connections()?;
            if count == 0 || Instant::now() >= deadline {
                return Some(count);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Ends a `wait` in progress as if the guest had reset (e.g. after a snapshot, to stop
    /// the VM without involving the guest).
    pub fn stop(&self) {
        let _ = self.reset_evt.write(1);
    }

    /// The guest's disk and network traffic through its devices since this VMM made them.
    pub fn io_stats(&self) -> IoStats {
        fn lock<T>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            device.lock().unwrap_or_else(|p| p.into_inner())
        }
        IoStats {
            disk: self
                .io_devices
                .rootfs
                .as_ref()
                .map(|b| lock(b).disk().stats()),
            net: self.io_devices.net.as_ref().map(|n| {
                let stats = lock(n).stats();
                NetIo {
                    rx_bytes: stats.rx_bytes,
                    rx_frames: stats.rx_frames,
                    rx_dropped: stats.rx_dropped,
                    tx_bytes: stats.tx_bytes,
                    tx_frames: stats.tx_frames,
                    tx_dropped: stats.tx_dropped,
                }
            }),
        }
    }

    /// Pages served on demand so far (lazy restores only).
    pub fn faults_served(&self) -> Option<u64> {
        self.lazy.as_ref().map(|l| l.stats().faults())
    }

    /// Pages the prefetcher placed before the guest touched them (lazy restores only).
    pub fn pages_prefetched(&self) -> Option<u64> {
        self.lazy.as_ref().map(|l| {
            l.stats()
                .prefetched
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Faults served on demand per [`crate::lazy::FAULT_BUCKET_MS`] since the restore started
    /// serving memory (lazy restores only).
    pub fn fault_timeline(&self) -> Option<Vec<u32>> {
        self.lazy.as_ref().map(|l| l.stats().timeline.counts())
    }

    /// The working set to prefetch next time: after a lazy restore, the pages served on
    /// demand so far in first-touch order (recording stops); after a `file` restore, the
    /// pages touched so far, in address order. `None` for other VMs.
    pub fn take_working_set(&self) -> Option<Vec<u64>> {
        if let Some(lazy) = &self.lazy {
            return Some(lazy.take_recorded());
        }
        self.mapped_memory.as_ref()?;
        match crate::memory::touched_pages(&self.mem) {
            Ok(pages) => Some(pages),
            Err(e) => {
                log::warn!("cannot read which guest pages were touched: {e}");
                None
            }
        }
    }

    /// Where the VM's start spent its time (milestones since the VMM's start); callers
    /// `mark` the later ones (the agent answering).
    pub fn timeline(&self) -> &crate::timeline::Timeline {
        &self.timeline
    }

    /// How a restored VM's memory arrives (`None` for a booted VM).
    pub fn restore_mode(&self) -> Option<RestoreMode> {
        self.restore_mode
    }

    /// Runs all vCPUs.
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut running = lock_or_recover(&self.running);
        command_all(&self.vcpus, VcpuCommand::Resume).map_err(VmmError::Vcpu)?;
        *running = true;
        self.timeline.mark("vcpus_running");
        Ok(())
    }

    /// Stops all vCPUs outside `KVM_RUN`; returns once every one has acknowledged.
    pub fn pause(&self) -> Result<(), VmmError> {
        let mut running = lock_or_recover(&self.running);
        // Marked stopped first: after a failed pause some vCPUs may be stopped, and a later
        // `resume` (not a stall report) is what runs them again.
        *running = false;
        command_all(&self.vcpus, VcpuCommand::Pause).map_err(VmmError::Vcpu)
    }

    /// Whether the vCPUs were last told to run.
    pub fn is_running(&self) -> bool {
        *lock_or_recover(&self.running)
    }

    /// A few lines on what the VM is doing, for a guest that stopped answering: each vCPU's
    /// state and position (paused briefly to read them), each virtio queue's progress on the
    /// device's and the driver's side, pending interrupt bits, and the VMM's threads. Never
    /// blocks for long: a vCPU or device that does not answer is reported as such.
    pub fn stall_report(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        // Held throughout, so an API pause or resume waits for the report; a VM that was
        // paused (by the API, or for a snapshot) stays paused.
        let running = lock_or_recover(&self.running);
        let paused_here = if *running {
            command_all(&self.vcpus, VcpuCommand::Pause).map(|()| true)
        } else {
            let _ = writeln!(out, "vCPUs: paused (not running)");
            Ok(false)
        };
        match paused_here {
            Ok(paused_here) => {
                match crate::vcpu::save_all(&self.vcpus) {
                    Ok(states) => {
                        for s in &states {
                            let _ = writeln!(
                                out,
                                "{}",
                                crate::stall::describe_vcpu(
                                    s.index,
                                    &s.regs,
                                    &s.sregs,
                                    &s.mp_state
                                )
                            );
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "vCPUs: cannot read their state: {e}");
                    }
                }
                if paused_here {
                    if let Err(e) = command_all(&self.vcpus, VcpuCommand::Resume) {
                        let _ = writeln!(out, "vCPUs: cannot resume them: {e}");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "vCPUs: cannot pause them (stuck in KVM_RUN?): {e}");
                // Those that did pause must run again: the VM was running.
                let _ = command_all(&self.vcpus, VcpuCommand::Resume);
            }
        }
        drop(running);
        for (slot, attached) in self.transports.iter().enumerate() {
            let Some(transport) = try_lock_for(&attached.transport, Duration::from_secs(1)) else {
                let _ = writeln!(out, "virtio slot {slot}: transport lock held for 1 s");
                continue;
            };
            let _ = writeln!(
                out,
                "virtio slot {slot}: type {} status {:#x} activated {} interrupt status {:#x}",
                transport.device_type(),
                transport.status(),
                transport.is_activated(),
                transport.interrupt().status()
            );
            let device = transport.device();
            let Some(device) = try_lock_for(&device, Duration::from_secs(1)) else {
                let _ = writeln!(out, "  device lock held for 1 s (event loop busy or stuck)");
                continue;
            };
            for (index, state) in device.queue_states().iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  {}",
                    crate::stall::describe_queue(index, state, &self.mem)
                );
            }
        }
        out.push_str(&crate::stall::describe_threads());
        out
    }

    /// Waits until the guest resets, stops or fails. The vCPUs are paused on return.
    pub fn wait(&self) -> Result<ExitReason, VmmError> {
        const STOP: u64 = 0;
        const RESET: u64 = 1;
        const LAZY: u64 = 2;
        let epoll = Epoll::new().map_err(VmmError::Wait)?;
        let mut watched = vec![(&self.stop_evt, STOP), (&self.reset_evt, RESET)];
        if let Some(lazy) = &self.lazy {
            watched.push((&lazy.error_evt, LAZY));
        }
        for (evt, data) in watched {
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(VmmError::Wait)?;
        }
        let mut ready = [EpollEvent::default(); 3];
        let reason = loop {
            // Linux's `reboot=k` falls through to a deliberate triple fault if the keyboard
            // controller reset has not taken effect yet: when both are pending, the guest
            // asked for the keyboard reset first.
            if self.reset_evt.read().is_ok() {
                break Ok(ExitReason::KeyboardReset);
            }
            // A page that cannot be served leaves a vCPU blocked for good: stop with the reason
            // instead of hanging.
            if let Some(lazy) = &self.lazy {
                if lazy.error_evt.read().is_ok() {
                    let reason = lazy.failure().unwrap_or_else(|| "unknown".into());
                    return Err(VmmError::LazyMemory(reason));
                }
            }
            // Anything queued before the wait started counts too.
            let stop = self
                .stops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_recv();
            if let Ok(stop) = stop {
                let _ = self.stop_evt.read();
                break match stop.action {
                    ExitAction::Shutdown => Ok(ExitReason::TripleFault),
                    ExitAction::Reset => Ok(ExitReason::SystemReset),
                    ExitAction::Stop | ExitAction::Continue => Ok(ExitReason::Stopped),
                    ExitAction::Fail(reason) => Err(VmmError::VcpuFailed {
                        index: stop.index,
                        reason,
                    }),
                };
            }
            match epoll.wait(-1, &mut ready) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(VmmError::Wait(e)),
            }
        };
        self.pause()?;
        reason
    }

    /// How long the guest took to reach userspace, once its init wrote the boot timer.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_marks.userspace()
    }

    /// The guest's own account of its boot (its clock), as far as it has reported it.
    pub fn guest_milestones(&self) -> GuestMilestones {
        self.boot_marks.guest()
    }

    /// The start's milestones with the guest's own (see
    /// [`crate::timeline::with_guest_milestones`]).
    pub fn timeline_with_guest(&self) -> Vec<crate::Milestone> {
        let userspace_ms = self.boot_time().map(|d| d.as_secs_f64() * 1e3);
        crate::timeline::with_guest_milestones(
            self.timeline.steps(),
            &self.guest_milestones(),
            userspace_ms,
        )
    }

    /// This process's resident memory as (outside guest RAM, guest RAM).
    pub fn resident_split(&self) -> std::io::Result<(u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ranges: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|region| {
                let start = region.as_ptr() as u64;
                (start, start + region.len())
            })
            .collect();
        resident_split(&ranges)
    }

    /// Guest memory (shared mappings).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The device buses the vCPUs use.
    pub fn devices(&self) -> &DeviceIo {
        &self.io
    }

    /// Ends the vCPU threads and the event loop.
    pub fn shutdown(mut self) -> Result<(), VmmError> {
        let mut first_error = None;
        for handle in self.vcpus.drain(..) {
            if let Err(e) = handle.exit_and_join() {
                first_error.get_or_insert(VmmError::Vcpu(e));
            }
        }
        self.event_loop.stop();
        if let Some(vsock) = &self.vsock {
            lock_or_recover(vsock).deliver_to_host(VSOCK_DELIVERY_LIMIT);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        for handle in self.vcpus.drain(..) {
            if let Err(e) = handle.exit_and_join() {
                log::error!("{e}");
            }
        }
    }
}

/// Boots `config` with serial output on stdout and runs it until the guest resets (Ok) or
/// something fails.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmmError> {
    run_with(config, VmmOptions::default())
}

/// [`run`] with explicit host options.
pub fn run_with(config: &VmConfig, options: VmmOptions) -> Result<ExitReason, VmmError> {
    run_reported(config, options).map(|(reason, _)| reason)
}

/// [`run_with`], also returning what the run measured.
pub fn run_reported(
    config: &VmConfig,
    options: VmmOptions,
) -> Result<(ExitReason, RunReport), VmmError> {
    let start = options.start;
    let vmm = Vmm::build(config, options)?;
    let to_first_run = start.elapsed();
    vmm.resume()?;
    let result = vmm.wait();
    let total = start.elapsed();
    let (vmm_rss_bytes, guest_rss_bytes) = vmm.resident_split().unwrap_or_else(|e| {
        log::warn!("cannot read /proc/self/smaps: {e}");
        (0, 0)
    });
    let boot_time = vmm.boot_time();
    let guest = vmm.guest_milestones();
    if let Some(boot) = boot_time {
        log::info!("guest reached userspace after {boot:?}");
    }
    vmm.shutdown()?;
    let report = RunReport {
        to_first_run_us: micros(to_first_run),
        to_userspace_us: boot_time.map(micros),
        guest,
        guest_clock_started_us: boot_time
            .map(micros)
            .zip(guest.agent_started_us)
            .map(|(userspace, started)| userspace.saturating_sub(started)),
        total_us: micros(total),
        vmm_rss_bytes,
        guest_rss_bytes,
    };
    result.map(|reason| (reason, report))
}

#[cfg(test)]
mod tests;
