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

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use ember_devices::rate_limiter::RateLimit;
use ember_devices::virtio::block::{Block, CowDisk, Disk, COW_CHUNK_SIZE};
use ember_devices::virtio::mmio::{regs::QUEUE_NOTIFY, MmioTransport, MMIO_WINDOW_SIZE};
pub use ember_devices::virtio::net::NetRateLimits;
use ember_devices::virtio::net::{Net, Tap};
use ember_devices::virtio::vsock::{Vsock, MAX_UDS_PATH_LEN, MIN_GUEST_CID};
use ember_devices::virtio::VirtioDevice;
use ember_devices::{BootTimer, Bus, Serial, BOOT_TIMER_PORT, I8042};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{
    build_boot_params, build_cmdline, e820_map, load_initrd, ram_of, write_boot_params,
    write_cmdline, BootError, InitrdInfo,
};
use crate::arch::x86_64::cpu_model::CpuModel;
use crate::arch::x86_64::layout::{
    IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::arch::x86_64::mptable::{self, setup_mptable, MpTableError};
use crate::arch::x86_64::regs::{write_boot_tables, RegsError};
use crate::kernel::{load_kernel, KernelError, LoadedKernel};
use crate::lazy::LazyMemory;
use crate::memory::{
    check_mem_size, create_guest_memory, low_ram_end, GuestMemoryMmap, MemoryError,
};
use crate::metrics::{micros, resident_split, RunReport};
use crate::persist::{decode_state, encode_state};
use crate::snapshot::{
    BaseImage, RestoreMode, SnapshotBase, SnapshotKind, StoreChunks, VmSnapshot,
};
use crate::vcpu::{command_all, ExitAction, IoHandler, Vcpu, VcpuCommand, VcpuError, VcpuHandle};
use crate::vm::{open_kvm, Vm, VmError};
use ember_snapshot_store::{
    DiskMap, DiskRef, Manifest, MemoryMap, MemoryRef, ObjectKind, SnapshotIndexing, Store,
};

/// Most vCPUs a guest may have (the MP table must fit the EBDA).
pub const MAX_VCPUS: u8 = 32;
const SERIAL_PORT_LEN: u64 = 8;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;
const BOOT_TIMER_LEN: u64 = 1;
/// The block device the root file system is on when `rootfs` is given.
const ROOT_DEVICE: &str = "/dev/vda";
/// How long a shut-down VM waits for host sockets to take the guest's last vsock bytes.
const VSOCK_DELIVERY_LIMIT: Duration = Duration::from_secs(3);

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Disk image exposed as the first virtio-block device (`/dev/vda`) and used as root.
    pub rootfs: Option<PathBuf>,
    pub read_only_rootfs: bool,
    /// With a rootfs: keep it unmodified and send the guest's writes to a private
    /// copy-on-write overlay created at this path (removed with the VM). Snapshots capture
    /// the overlay's chunks.
    pub rootfs_overlay: Option<PathBuf>,
    pub vcpus: u8,
    pub mem_mib: u32,
    /// Appended to the default command line (a `-- args` part goes to init).
    pub cmdline_extra: Option<String>,
    /// A virtio-vsock device with a Unix-socket back-end.
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on a TAP interface (`eth0` in the guest); none: no network at all.
    pub net: Option<NetConfig>,
}

/// A virtio-net device on the TAP interface `tap` (in the VMM's network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface; attached with virtio headers (`IFF_VNET_HDR`), created if missing.
    pub tap: String,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The guest's IPv4 set-up, given to its kernel on the command line (`ip=`) so the
    /// interface is up before init; `None` leaves `eth0` to the guest.
    pub ipv4: Option<GuestIpv4>,
}

/// A static IPv4 set-up for the guest's `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestIpv4 {
    pub address: std::net::Ipv4Addr,
    /// Network prefix length, 1 to 32.
    pub prefix_len: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Name server, written by the kernel to `/proc/net/pnp`.
    pub dns: Option<std::net::Ipv4Addr>,
}

impl GuestIpv4 {
    /// The kernel's `ip=` parameter: `client::gateway:netmask::eth0:off[:dns]`.
    pub fn kernel_parameter(&self) -> String {
        let netmask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix_len)));
        let gateway = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        let mut param = format!("ip={}::{gateway}:{netmask}::eth0:off", self.address);
        if let Some(dns) = self.dns {
            param.push_str(&format!(":{dns}"));
        }
        param
    }
}

impl NetConfig {
    /// Checks the TAP name, the MAC and the address.
    pub fn validate(&self) -> Result<(), VmmError> {
        let invalid = |why: String| VmmError::NetConfig(why);
        let name_ok = !self.tap.is_empty()
            && self.tap.len() < ember_devices::virtio::net::IFNAMSIZ
            && !self.tap.contains(['/', ' ', '\0', ':']);
        if !name_ok {
            return Err(invalid(format!(
                "TAP name {:?} is not an interface name (1 to 15 bytes, no '/', ':', space or NUL)",
                self.tap
            )));
        }
        if self.mac[0] & 1 != 0 || self.mac == [0; 6] {
            return Err(invalid(format!(
                "MAC {} is not a unicast address",
                format_mac(&self.mac)
            )));
        }
        if let Some(ip) = &self.ipv4 {
            if !(1..=32).contains(&ip.prefix_len) {
                return Err(invalid(format!(
                    "prefix length /{} is not 1 to 32",
                    ip.prefix_len
                )));
            }
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A virtio-vsock device whose host side is the Unix socket `uds_path`.
///
/// Host-initiated connections: connect to `uds_path`, write `CONNECT <guest port>\n`, read
/// `OK <host port>\n`, then the stream is the connection. Guest-initiated connections to CID 2
/// port `P` reach whatever listens on the Unix socket `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more; `u32::MAX` is reserved).
    pub guest_cid: u32,
    /// Where the device listens; a stale socket there is replaced.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the CID and that the path fits a Unix socket address.
    pub fn validate(&self) -> Result<(), VmmError> {
        if u64::from(self.guest_cid) < MIN_GUEST_CID || self.guest_cid == u32::MAX {
            return Err(VmmError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH_LEN {
            return Err(VmmError::VsockPath {
                path: self.uds_path.display().to_string(),
                len,
            });
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks the numbers before anything is allocated.
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::VcpuCount(self.vcpus));
        }
        debug_assert!(MAX_VCPUS <= mptable::max_cpus());
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if self.rootfs_overlay.is_some() && (self.rootfs.is_none() || self.read_only_rootfs) {
            return Err(VmmError::Overlay(
                "a copy-on-write overlay needs a rootfs that is not read-only".into(),
            ));
        }
        check_mem_size(self.mem_bytes()).map_err(VmmError::Memory)
    }

    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }
}

/// Host-side options that are not part of the guest's description.
pub struct VmmOptions {
    /// Where the guest's serial output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// When boot time is measured from (the boot timer reports the time to userspace).
    pub start: Instant,
    /// Limits on the root disk's bytes and requests per second (none by default): one guest
    /// must not starve the host's disk.
    pub disk_rate_limit: RateLimit,
    /// Limits on the network device's traffic each way (none by default): one guest must not
    /// starve the host's network.
    pub net_rate_limits: NetRateLimits,
    /// Where restores look for a snapshot's materialised memory (`file` and `auto` modes).
    pub mem_cache: Option<ember_snapshot_store::MemCache>,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            serial_out: Box::new(std::io::stdout()),
            start: Instant::now(),
            disk_rate_limit: RateLimit::default(),
            net_rate_limits: NetRateLimits::default(),
            mem_cache: None,
        }
    }
}

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
    #[error("snapshot {id}: {reason}")]
    Snapshot { id: String, reason: String },
    #[error("restore of snapshot {id}: {reason}")]
    Restore { id: String, reason: String },
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

/// Port and MMIO accesses go to the two device buses. Accesses to nothing read as all-ones
/// (ports) or zeros (MMIO) and are logged at debug level.
#[derive(Debug, Default, Clone)]
pub struct DeviceIo {
    pub pio: Bus,
    pub mmio: Bus,
}

impl IoHandler for DeviceIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Err(e) = self.pio.read(u64::from(port), data) {
            log::debug!("port read of {} bytes at {port:#x}: {e}", data.len());
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if let Err(e) = self.pio.write(u64::from(port), data) {
            log::debug!("port write of {data:x?} at {port:#x}: {e}");
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Err(e) = self.mmio.read(addr, data) {
            log::debug!("MMIO read of {} bytes at {addr:#x}: {e}", data.len());
            data.fill(0);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Err(e) = self.mmio.write(addr, data) {
            log::debug!("MMIO write of {data:x?} at {addr:#x}: {e}");
        }
    }
}

/// Base address and GSI of virtio-mmio slot `slot`.
pub fn virtio_slot(slot: usize) -> Result<(u64, u32), VmmError> {
    let gsi = u32::try_from(slot)
        .ok()
        .and_then(|s| s.checked_add(VIRTIO_IRQ_BASE))
        .filter(|gsi| *gsi <= IRQ_MAX)
        .ok_or(VmmError::OutOfIrqs(slot))?;
    Ok((VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE, gsi))
}

fn eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| VmmError::EventFd { what, source })
}

fn clone_evt(evt: &EventFd, what: &'static str) -> Result<EventFd, VmmError> {
    evt.try_clone()
        .map_err(|source| VmmError::EventFd { what, source })
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the device event loop when its eventfd is written.
struct LoopExit {
    evt: EventFd,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for LoopExit {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, event_manager::EventSet::IN)) {
            log::error!("cannot watch the event loop's exit eventfd: {e:?}");
        }
    }
}

/// The device event loop thread.
struct EventLoop {
    exit_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    fn start(subscribers: Vec<Subscriber>) -> Result<EventLoop, VmmError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventManager)?;
        let exit_evt = eventfd("the event loop exit")?;
        let done = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(LoopExit {
            evt: clone_evt(&exit_evt, "the event loop exit")?,
            done: done.clone(),
        })));
        for subscriber in subscribers {
            manager.add_subscriber(subscriber);
        }
        let thread = ember_seccomp::spawn_filtered(
            "ember-events".into(),
            ember_seccomp::ThreadKind::Devices,
            move || {
                while !done.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            },
        )
        .map_err(VmmError::EventThread)?;
        Ok(EventLoop {
            exit_evt,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.exit_evt.write(1) {
                log::error!("cannot stop the device event loop: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("the device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The devices of a VM and what the VMM keeps of them.
struct Devices {
    io: Arc<DeviceIo>,
    subscribers: Vec<Subscriber>,
    serial: Arc<Mutex<Serial>>,
    /// The virtio-mmio transports in slot order.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// (base, GSI) of each virtio-mmio device, for the command line.
    virtio: Vec<(u64, u32)>,
    reset_evt: EventFd,
    boot_time: Arc<OnceLock<Duration>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    rootfs_cow: Option<Arc<CowDisk>>,
}

fn attach_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    options: VmmOptions,
    restore: Option<&VmSnapshot>,
    restored_overlay: Option<Arc<CowDisk>>,
) -> Result<Devices, VmmError> {
    let mut io = DeviceIo::default();
    let bus_error = |what, bus| move |source| VmmError::Bus { what, bus, source };

    let serial_irq = eventfd("the serial IRQ")?;
    vm.register_irq(&serial_irq, SERIAL_IRQ)?;
    let serial = match restore {
        Some(snap) => Serial::from_snapshot(serial_irq, options.serial_out, &snap.serial),
        None => Serial::new(serial_irq, options.serial_out),
    }
    .map_err(VmmError::Serial)?;
    let serial = Arc::new(Mutex::new(serial));
    io.pio
        .insert(serial.clone(), u64::from(SERIAL_PORT), SERIAL_PORT_LEN)
        .map_err(bus_error("the serial port", "port"))?;

    let reset_evt = eventfd("the i8042 reset line")?;
    let i8042 = I8042::new(clone_evt(&reset_evt, "the i8042 reset line")?);
    io.pio
        .insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_PORT_LEN)
        .map_err(bus_error("the i8042", "port"))?;

    let timer = BootTimer::new(options.start);
    let boot_time = timer.reached();
    io.pio
        .insert(
            Arc::new(Mutex::new(timer)),
            u64::from(BOOT_TIMER_PORT),
            BOOT_TIMER_LEN,
        )
        .map_err(bus_error("the boot timer", "port"))?;

    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut virtio = Vec::new();
    let mut transports = Vec::new();
    let mut vsock_device = None;
    let mut rootfs_cow = None;
    if let Some(rootfs) = &config.rootfs {
        let block_error = |source| VmmError::Block {
            path: rootfs.display().to_string(),
            source,
        };
        let cow = match (restored_overlay, &config.rootfs_overlay) {
            (Some(cow), _) => Some(cow),
            (None, Some(overlay)) => Some(Arc::new(
                CowDisk::create(rootfs, overlay, COW_CHUNK_SIZE).map_err(block_error)?,
            )),
            (None, None) => None,
        };
        let mut block = match &cow {
            Some(cow) => Block::with_disk(Disk::from_cow(cow.clone(), "rootfs")),
            None => Block::new(rootfs, config.read_only_rootfs, "rootfs".to_string()),
        }
        .map_err(block_error)?;
        block
            .set_rate_limit(options.disk_rate_limit)
            .map_err(block_error)?;
        rootfs_cow = cow;
        let block = Arc::new(Mutex::new(block));
        transports.push(attach_virtio(
            vm,
            mem,
            &mut io,
            block.clone(),
            "the root virtio-block device",
            &mut virtio,
        )?);
        subscribers.push(block);
    }
    if let Some(vsock) = &config.vsock {
        let device =
            Vsock::new(u64::from(vsock.guest_cid), vsock.uds_path.clone()).map_err(|source| {
                VmmError::Vsock {
                    path: vsock.uds_path.display().to_string(),
                    source,
                }
            })?;
        let device = Arc::new(Mutex::new(device));
        vsock_device = Some(device.clone());
        transports.push(attach_virtio(
            vm,
            mem,
            &mut io,
            device.clone(),
            "the virtio-vsock device",
            &mut virtio,
        )?);
        subscribers.push(device);
    }
    if let Some(net) = &config.net {
        // A restored guest keeps the MAC it was snapshotted with.
        let mac = restore.and_then(|snap| snap.net_mac).unwrap_or(net.mac);
        let tap = Tap::open(&net.tap).map_err(VmmError::Net)?;
        let mut device = Net::new(tap, mac).map_err(VmmError::Net)?;
        device
            .set_rate_limits(options.net_rate_limits)
            .map_err(VmmError::Net)?;
        let device = Arc::new(Mutex::new(device));
        transports.push(attach_virtio(
            vm,
            mem,
            &mut io,
            device.clone(),
            "the virtio-net device",
            &mut virtio,
        )?);
        subscribers.push(device);
    }
    if let Some(snap) = restore {
        if snap.virtio.len() != transports.len() {
            return Err(VmmError::Restore {
                id: String::new(),
                reason: format!(
                    "the snapshot has {} virtio devices, this VM {}",
                    snap.virtio.len(),
                    transports.len()
                ),
            });
        }
        for (transport, state) in transports.iter().zip(&snap.virtio) {
            lock_or_recover(transport)
                .restore_state(state)
                .map_err(|e| VmmError::Restore {
                    id: String::new(),
                    reason: e.to_string(),
                })?;
        }
    }
    Ok(Devices {
        vsock: vsock_device,
        rootfs_cow,
        io: Arc::new(io),
        subscribers,
        serial,
        transports,
        virtio,
        reset_evt,
        boot_time,
    })
}

/// Puts `device` on the next virtio-mmio slot: irqfd, queue ioeventfds, MMIO window. Appends
/// the slot's (base, GSI) to `virtio` for the command line.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    io: &mut DeviceIo,
    device: Arc<Mutex<dyn VirtioDevice>>,
    what: &'static str,
    virtio: &mut Vec<(u64, u32)>,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let (base, gsi) = virtio_slot(virtio.len())?;
    let irq = eventfd("a virtio IRQ")?;
    vm.register_irq(&irq, gsi)?;
    let transport = MmioTransport::new(device, mem.clone(), irq)
        .map_err(|source| VmmError::Mmio { base, source })?;
    for (queue, evt) in transport.queue_evts().into_iter().enumerate() {
        vm.register_mmio_notify(evt, base + QUEUE_NOTIFY, queue as u32)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    io.mmio
        .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
        .map_err(|source| VmmError::Bus {
            what,
            bus: "MMIO",
            source,
        })?;
    virtio.push((base, gsi));
    Ok(transport)
}

/// The name of the rootfs in a manifest's disk list.
const ROOTFS_DISK: &str = "rootfs";

/// A fresh overlay over `base_path` whose chunks are a snapshot's rootfs map (chunks the map
/// leaves out are the base image's, which must be the one the snapshot was taken over). The
/// snapshot's chunks are not copied now: each loads from the store on the guest's first use.
fn restore_overlay(
    store: &Arc<Store>,
    disk: &DiskRef,
    base: &BaseImage,
    base_path: &std::path::Path,
    overlay: &std::path::Path,
) -> Result<(Arc<CowDisk>, Arc<StoreChunks>), String> {
    let now = BaseImage::of(base_path).map_err(|e| format!("{}: {e}", base_path.display()))?;
    if &now != base {
        return Err(format!(
            "the base image {} changed since the snapshot ({base:?} then, {now:?} now)",
            base_path.display()
        ));
    }
    let map = store.load_disk_map(disk).map_err(|e| e.to_string())?;
    let mut cow = CowDisk::create(base_path, overlay, map.chunk_size).map_err(|e| e.to_string())?;
    if cow.size() != map.size {
        return Err(format!(
            "the disk map is for {} bytes, the base image has {}",
            map.size,
            cow.size()
        ));
    }
    let chunks = Arc::new(StoreChunks {
        store: store.clone(),
        map,
    });
    cow.load_lazily(chunks.clone(), chunks.stored_chunks())
        .map_err(|e| e.to_string())?;
    Ok((Arc::new(cow), chunks))
}

/// Guest page `index` (numbered over all regions in address order) as a slice of the VMM's
/// mapping.
fn page_bytes(mem: &GuestMemoryMmap, index: u64) -> Option<&[u8; 4096]> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut first = 0u64;
    for region in mem.iter() {
        let pages = region.len() / 4096;
        if index < first + pages {
            let offset = usize::try_from((index - first) * 4096).ok()?;
            // SAFETY: the page lies inside the region's mapping, owned by `mem` for the
            // lifetime of the returned borrow; callers hold the vCPUs paused and the devices
            // locked, so nothing writes it meanwhile.
            let page = unsafe { &*(region.as_ptr().add(offset) as *const [u8; 4096]) };
            return Some(page);
        }
        first += pages;
    }
    None
}

/// Locks `m`, giving up after `patience` (for diagnostics that must not hang themselves).
fn try_lock_for<T: ?Sized>(
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

fn lock_or_recover<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes the boot structures (GDT, page tables, MP table, command line, zero page) and
/// loads the kernel and initrd.
fn load_guest(
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

/// The manifest metadata key recording the guest's CPU model (its CPUID feature words).
pub const CPU_MODEL_KEY: &str = "cpu_model";

/// The manifest metadata key recording how many vsock connections a snapshot held.
pub const VSOCK_CONNECTIONS_KEY: &str = "vsock_connections";

/// Whether a snapshot's guest held no vsock connections (snapshots that did not record it
/// are taken to have held some).
fn held_no_vsock_connections(manifest: &Manifest) -> bool {
    manifest
        .metadata
        .get(VSOCK_CONNECTIONS_KEY)
        .is_some_and(|count| count == "0")
}

/// A built VM. Field order is drop order: vCPU threads and the VM go before guest memory.
pub struct Vmm {
    vcpus: Vec<VcpuHandle>,
    event_loop: EventLoop,
    stops: Mutex<Receiver<crate::vcpu::VcpuStop>>,
    stop_evt: EventFd,
    reset_evt: EventFd,
    boot_time: Arc<OnceLock<Duration>>,
    io: Arc<DeviceIo>,
    serial: Arc<Mutex<Serial>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The rootfs's copy-on-write overlay, if it has one (read for snapshots).
    rootfs_cow: Option<Arc<CowDisk>>,
    /// A restored rootfs's snapshot chunks, for those the guest has not touched yet.
    rootfs_chunks: Option<Arc<StoreChunks>>,
    /// The vsock device, whose last guest bytes are delivered at shutdown.
    vsock: Option<Arc<Mutex<Vsock>>>,
    config: VmConfig,
    vm: Vm,
    /// Serves a restored VM's memory; dropped after the vCPUs (Drop) and before the memory.
    lazy: Option<LazyMemory>,
    /// How a restored VM's memory arrived (never `Auto`).
    restore_mode: Option<RestoreMode>,
    /// A restored VM's memory file (mode `file`), locked against eviction while mapped.
    mapped_memory: Option<ember_snapshot_store::CachedMemory>,
    /// Where its start spent its time.
    timeline: Arc<crate::timeline::Timeline>,
    /// The CPU features the guest was offered when it booted (recorded in its snapshots).
    cpu_model: CpuModel,
    /// The snapshot memory equals but for the dirty pages (set by restores and snapshots);
    /// dirty page logging is on exactly when this is set.
    base: Mutex<Option<SnapshotBase>>,
    /// Whether the vCPUs were last told to run (`resume`) rather than to stop (`pause`);
    /// the lock also orders pauses and resumes from different threads.
    running: Mutex<bool>,
    mem: GuestMemoryMmap,
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
        let mem = create_guest_memory(config.mem_bytes()).map_err(VmmError::Memory)?;
        timeline.mark("memory_mapped");
        let vm = Vm::new(&kvm)?;
        // SAFETY: `mem` is stored in the Vmm after `vm` and the vCPUs, so it is dropped after
        // them; every other holder is a clone sharing the same mappings.
        unsafe { vm.register_memory(&mem) }?;

        let devices = attach_devices(&vm, &mem, config, options, None, None)?;
        let kernel = load_guest(&mem, config, &devices.virtio)?;
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
        Ok(vmm)
    }

    /// Starts a thread for each vCPU (paused) and the event loop, and puts the VM together.
    fn assemble(
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
            boot_time: devices.boot_time,
            io: devices.io,
            serial: devices.serial,
            transports: devices.transports,
            rootfs_cow: devices.rootfs_cow,
            rootfs_chunks: None,
            vsock: devices.vsock,
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
        })
    }

    /// Saves the whole VM into `store` as snapshot `id` and returns its manifest. The vCPUs
    /// are paused first and stay paused; the caller resumes or stops the VM.
    pub fn snapshot(&self, store: &Store, id: &str) -> Result<Manifest, VmmError> {
        self.snapshot_as(store, id, SnapshotKind::Full)
    }

    /// As [`Vmm::snapshot`]; a `Diff` hashes only the pages written since the parent snapshot
    /// (an error if this VM has none yet: it was booted and never saved).
    pub fn snapshot_as(
        &self,
        store: &Store,
        id: &str,
        kind: SnapshotKind,
    ) -> Result<Manifest, VmmError> {
        let fail = |reason: String| VmmError::Snapshot {
            id: id.to_string(),
            reason,
        };
        if self.config.rootfs.is_some()
            && !self.config.read_only_rootfs
            && self.rootfs_cow.is_none()
        {
            return Err(fail(
                "a rootfs written in place cannot be captured; give the VM a copy-on-write \
                 overlay (the default for `ember run`) or a read-only rootfs"
                    .into(),
            ));
        }
        self.pause()?;
        // Whether the restored guest needs a transport reset: only if it held connections.
        let vsock_connections = self.vsock_connections();
        // Devices must not write guest memory while it is hashed: hold every virtio device
        // (the event loop waits on these locks meanwhile).
        let transports: Vec<_> = self.transports.iter().map(|t| lock_or_recover(t)).collect();
        let devices: Vec<_> = transports.iter().map(|t| t.device()).collect();
        let device_guards: Vec<_> = devices.iter().map(|d| lock_or_recover(d)).collect();

        let vcpus = crate::vcpu::save_all(&self.vcpus)
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .map(|state| {
                Arc::try_unwrap(state).map_err(|_| fail("a vCPU state is still shared".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let snap = VmSnapshot {
            vcpu_count: self.config.vcpus,
            mem_bytes: self.config.mem_bytes(),
            rootfs: self.config.rootfs.clone(),
            read_only_rootfs: self.config.read_only_rootfs,
            rootfs_base: match (&self.rootfs_cow, &self.config.rootfs) {
                (Some(_), Some(path)) => {
                    Some(BaseImage::of(path).map_err(|e| fail(format!("the rootfs: {e}")))?)
                }
                _ => None,
            },
            vsock_cid: self.config.vsock.as_ref().map(|v| v.guest_cid),
            net_mac: self.config.net.as_ref().map(|n| n.mac),
            vm: crate::persist::vm::save_vm(self.vm.fd()).map_err(|e| fail(e.to_string()))?,
            vcpus,
            serial: lock_or_recover(&self.serial).save_state(),
            // The queues' live positions are the devices' (locked above), not the transports'.
            virtio: transports
                .iter()
                .zip(&device_guards)
                .map(|(t, d)| t.save_state_with(d.queue_states()))
                .collect(),
        };
        let blob = encode_state(&snap).map_err(|e| fail(e.to_string()))?;

        let mut base = lock_or_recover(&self.base);
        let mut writer = store.writer().map_err(|e| fail(e.to_string()))?;
        let pages = match (kind, base.as_mut()) {
            (SnapshotKind::Diff, None) => {
                return Err(fail(
                    "a diff snapshot needs a parent: take a full snapshot of this VM first".into(),
                ))
            }
            (SnapshotKind::Diff, Some(parent)) => {
                let dirty = crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                    .map_err(|e| fail(e.to_string()))?;
                let mut pages = parent
                    .map(store)
                    .map_err(|e| fail(format!("the parent's memory map: {e}")))?
                    .pages
                    .clone();
                for &index in &dirty {
                    let slot = usize::try_from(index)
                        .ok()
                        .filter(|&i| i < pages.len())
                        .ok_or_else(|| fail(format!("dirty page {index} is beyond memory")))?;
                    let page = page_bytes(&self.mem, index)
                        .ok_or_else(|| fail(format!("dirty page {index} is not mapped")))?;
                    pages[slot] = writer.put_page(page).map_err(|e| fail(e.to_string()))?;
                }
                log::info!(
                    "snapshot {id}: {} pages written since {}",
                    dirty.len(),
                    parent.id
                );
                pages
            }
            (SnapshotKind::Full, _) => {
                let threads = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                let mut pages = Vec::new();
                for region in self.mem.iter() {
                    // SAFETY: the region's mapping is owned by `self.mem` and stays mapped for
                    // this call; the vCPUs are paused and every device is locked, so nothing
                    // writes it.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            region.as_ptr() as *const u8,
                            region.len() as usize,
                        )
                    };
                    pages.extend(
                        writer
                            .put_pages(bytes, threads)
                            .map_err(|e| fail(e.to_string()))?,
                    );
                }
                // From here on, what is written is what the next diff snapshot stores.
                if base.is_some() {
                    crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                        .map_err(|e| fail(e.to_string()))?;
                } else {
                    // SAFETY: the same memory, registered again with logging on; it outlives
                    // the VM (field order of `Vmm`).
                    unsafe { self.vm.register_memory_logging_dirty(&self.mem) }
                        .map_err(|e| fail(e.to_string()))?;
                    crate::memory::take_dirty_pages(self.vm.fd(), &self.mem)
                        .map_err(|e| fail(e.to_string()))?;
                }
                pages
            }
        };
        let map = MemoryMap::new(pages);
        let state = writer
            .put(ObjectKind::VmState, &blob)
            .map_err(|e| fail(e.to_string()))?;
        let map_chunks = map.store(&mut writer).map_err(|e| fail(e.to_string()))?;
        // The overlay's written chunks (the devices are locked: no request is in flight);
        // chunks it never wrote stay the base image's.
        let disks = match &self.rootfs_cow {
            Some(cow) => {
                let mut chunks = vec![None; cow.chunk_count() as usize];
                // Chunks of the snapshot this VM was restored from that the guest has not
                // touched yet are still that snapshot's objects; reading them from the overlay
                // would load them for nothing. (Listed before the written ones: a chunk loaded
                // meanwhile shows in both, and its written content wins.)
                for index in cow.pending_chunks() {
                    let hash = self
                        .rootfs_chunks
                        .as_ref()
                        .and_then(|c| c.hash_of(index))
                        .ok_or_else(|| fail(format!("rootfs chunk {index} has no source")))?;
                    if let Some(slot) = chunks.get_mut(index as usize) {
                        *slot = Some(hash);
                    }
                }
                let mut buf = Vec::new();
                for index in cow.written_chunks() {
                    cow.read_chunk(index, &mut buf)
                        .map_err(|e| fail(format!("reading rootfs chunk {index}: {e}")))?;
                    let hash = writer
                        .put(ObjectKind::DiskChunk, &buf)
                        .map_err(|e| fail(e.to_string()))?;
                    if let Some(slot) = chunks.get_mut(index as usize) {
                        *slot = Some(hash);
                    }
                }
                let disk = DiskMap {
                    size: cow.size(),
                    chunk_size: cow.chunk_size(),
                    chunks,
                };
                vec![DiskRef {
                    name: ROOTFS_DISK.into(),
                    size: disk.size,
                    chunk_size: disk.chunk_size,
                    map_chunks: disk.store(&mut writer).map_err(|e| fail(e.to_string()))?,
                }]
            }
            None => Vec::new(),
        };
        let mut manifest = Manifest::new(
            id,
            state,
            MemoryRef {
                size_bytes: map.size_bytes(),
                page_size: 4096,
                map_chunks,
            },
        );
        manifest.parent = base.as_ref().map(|b| b.id.clone());
        manifest.disks = disks;
        manifest.metadata.insert(
            "kind".into(),
            match kind {
                SnapshotKind::Full => "full",
                SnapshotKind::Diff => "diff",
            }
            .into(),
        );
        manifest
            .metadata
            .insert("vcpus".into(), self.config.vcpus.to_string());
        manifest
            .metadata
            .insert(CPU_MODEL_KEY.into(), self.cpu_model.encode());
        if let Some(count) = vsock_connections {
            manifest
                .metadata
                .insert(VSOCK_CONNECTIONS_KEY.into(), count.to_string());
        }
        manifest
            .metadata
            .insert("kernel".into(), self.config.kernel.display().to_string());
        if let Some(net) = &self.config.net {
            manifest
                .metadata
                .insert("net_mac".into(), format_mac(&net.mac));
        }
        let stats = writer.commit(&manifest).map_err(|e| fail(e.to_string()))?;
        *base = Some(SnapshotBase::loaded(id, map.clone()));
        log::info!(
            "snapshot {id}: {} pages ({} zero), {} new objects, {} bytes written",
            map.pages.len(),
            map.zero_pages(),
            stats.objects_written,
            stats.bytes_written
        );
        Ok(manifest)
    }

    /// Builds a VM from snapshot `id`, paused; `resume` runs it. `config` gives the host side
    /// (vsock socket path); the guest's shape (vCPUs, memory, disk) comes from the snapshot.
    pub fn restore(
        config: &VmConfig,
        store: Arc<Store>,
        id: &str,
        options: VmmOptions,
        mode: RestoreMode,
    ) -> Result<Vmm, VmmError> {
        let fail = |reason: String| VmmError::Restore {
            id: id.to_string(),
            reason,
        };
        let timeline = Arc::new(crate::timeline::Timeline::new(options.start));
        let phase = |what: &str| timeline.mark(what);
        let manifest = store.load_manifest(id).map_err(|e| fail(e.to_string()))?;
        match store
            .index_snapshot(&manifest)
            .map_err(|e| fail(e.to_string()))?
        {
            SnapshotIndexing::Listed { loaded } => {
                log::debug!("restore {id}: indexed the {loaded} packs its manifest lists")
            }
            SnapshotIndexing::WholeStore { reason } => {
                log::info!("restore {id}: indexed the whole store ({reason})")
            }
        }
        let blob = store
            .read(&manifest.vm_state)
            .map_err(|e| fail(e.to_string()))?;
        let snap: VmSnapshot = decode_state(&blob).map_err(|e| fail(e.to_string()))?;
        phase("manifest_read");
        // The memory map itself is read only where memory comes from the store (the map's
        // length is checked against the manifest's size when it is read).
        if manifest.memory.size_bytes != snap.mem_bytes
            || snap.vcpus.len() != usize::from(snap.vcpu_count)
        {
            return Err(fail(format!(
                "the snapshot is inconsistent: {} bytes of memory for {} bytes of RAM, {} vCPU states for {} vCPUs",
                manifest.memory.size_bytes,
                snap.mem_bytes,
                snap.vcpus.len(),
                snap.vcpu_count
            )));
        }
        let mut config = config.clone();
        config.vcpus = snap.vcpu_count;
        config.mem_mib =
            u32::try_from(snap.mem_bytes >> 20).map_err(|_| fail("memory size".into()))?;
        config.rootfs = snap.rootfs.clone();
        config.read_only_rootfs = snap.read_only_rootfs;
        // Where the rootfs overlay goes (restored below, once the working set is loading).
        let overlay_plan = match (&snap.rootfs_base, &snap.rootfs) {
            (Some(base), Some(path)) => {
                let overlay = config.rootfs_overlay.clone().ok_or_else(|| {
                    fail(
                        "the snapshot's rootfs has an overlay: give the restore a path for it"
                            .into(),
                    )
                })?;
                let disk = manifest
                    .disks
                    .iter()
                    .find(|d| d.name == ROOTFS_DISK)
                    .ok_or_else(|| fail("the manifest has no rootfs disk map".into()))?;
                Some((disk, base, path, overlay))
            }
            _ => {
                config.rootfs_overlay = None;
                None
            }
        };
        if snap.vsock_cid.is_some() != config.vsock.is_some() {
            return Err(fail(
                "the snapshot's vsock device needs a vsock socket (and only then)".into(),
            ));
        }
        if snap.net_mac.is_some() != config.net.is_some() {
            return Err(fail(
                "the snapshot's network device needs a TAP (and only then)".into(),
            ));
        }
        config.validate()?;

        // Memory first: a working set starts loading now, while the disk overlay, the VM
        // and its devices are put together.
        let kvm = open_kvm()?;
        let restored = crate::restore_memory::restore_memory(
            &manifest,
            &store,
            options.mem_cache.as_ref(),
            mode,
        )
        .map_err(|e| fail(e.to_string()))?;
        let (mem, lazy) = (restored.mem, restored.lazy);
        log::debug!("restore {id}: memory in mode {}", restored.mode);
        phase("memory_mapped");
        let overlay = match overlay_plan {
            Some((disk, base, path, overlay)) => Some(
                restore_overlay(&store, disk, base, path, &overlay)
                    .map_err(|reason| fail(format!("the rootfs overlay: {reason}")))?,
            ),
            None => None,
        };
        phase("disk_overlay_restored");
        let vm = Vm::new(&kvm)?;
        // Refused before any vCPU exists: a guest cannot be told that a feature it was
        // given is gone.
        let host_model = vm.cpu_model(snap.vcpu_count)?;
        let cpu_model = match manifest.metadata.get(CPU_MODEL_KEY) {
            Some(recorded) => {
                let model = CpuModel::decode(recorded).map_err(|e| fail(e.to_string()))?;
                model
                    .check_against(&host_model)
                    .map_err(|e| fail(e.to_string()))?;
                model
            }
            // Saved before models were recorded: assume what this host offers.
            None => host_model,
        };
        // Logging dirty pages from the start makes the next snapshot of this VM a possible
        // diff against this one.
        // SAFETY: as in `build`: `mem` outlives the VM and its vCPUs inside the Vmm.
        unsafe { vm.register_memory_logging_dirty(&mem) }?;
        phase("vm_created");
        let (overlay, rootfs_chunks) = overlay.unzip();
        let devices = attach_devices(&vm, &mem, &config, options, Some(&snap), overlay)
            .map_err(|e| fail(e.to_string()))?;
        phase("devices_attached");
        // The working set was loading while the VM was put together; let it finish before
        // the guest's clocks are set (REAP's finding: loading it in one go beats racing the
        // guest for it, which on few cores mostly steals the vCPU's time). The VM clock and
        // the vCPUs' TSCs are restored only after that wait, right before the vCPUs run:
        // restored earlier, the guest would find that much time gone at its first
        // instruction (in the lab the agent's first answer after a prefetch restore came in
        // 150-180 ms this way, 210-850 ms with the clocks set before a 0.5-1.4 s wait).
        let mut lazy = lazy;
        if let Some(lazy) = lazy.as_mut() {
            lazy.finish_prefetch();
        }
        phase("working_set_loaded");
        crate::persist::vm::restore_vm(vm.fd(), &snap.vm).map_err(|e| fail(e.to_string()))?;
        phase("vm_state_restored");

        let mut fds = Vec::with_capacity(snap.vcpus.len());
        for state in &snap.vcpus {
            let index = state.index;
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|e| fail(format!("creating vCPU {index}: {e}")))?;
            crate::persist::vcpu::restore_vcpu(&fd, state).map_err(|e| fail(e.to_string()))?;
            fds.push((index, fd));
        }
        // Connections do not survive a snapshot: a guest that held some is told so (its
        // listening sockets stay, and host clients connect again). Only now, with the
        // interrupt controllers and LAPICs restored, can the event's interrupt reach the
        // guest (restoring the irqchip would clear a line raised earlier, and the driver
        // would not see the event until some other vsock interrupt). A snapshot that held
        // only listeners needs no reset: host clients connect at once.
        if let Some(vsock) = &devices.vsock {
            let mut vsock = lock_or_recover(vsock);
            if held_no_vsock_connections(&manifest) {
                vsock.resume_without_reset();
            } else {
                vsock.send_transport_reset();
            }
        }
        phase("devices_built");
        let base = match restored.map {
            Some(map) => SnapshotBase::loaded(id, map),
            None => SnapshotBase::deferred(manifest),
        };
        let mut vmm = Vmm::assemble(config, vm, mem, lazy, Some(base), devices, fds)?;
        vmm.rootfs_chunks = rootfs_chunks;
        vmm.timeline = timeline;
        vmm.cpu_model = cpu_model;
        vmm.restore_mode = Some(restored.mode);
        vmm.mapped_memory = restored.mapped;
        Ok(vmm)
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
        for (slot, transport) in self.transports.iter().enumerate() {
            let Some(transport) = try_lock_for(transport, Duration::from_secs(1)) else {
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
        self.boot_time.get().copied()
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
    if let Some(boot) = boot_time {
        log::info!("guest reached userspace after {boot:?}");
    }
    vmm.shutdown()?;
    let report = RunReport {
        to_first_run_us: micros(to_first_run),
        to_userspace_us: boot_time.map(micros),
        total_us: micros(total),
        vmm_rss_bytes,
        guest_rss_bytes,
    };
    result.map(|reason| (reason, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent/vmlinux"),
            initrd: None,
            rootfs: None,
            read_only_rootfs: false,
            rootfs_overlay: None,
            vcpus: 2,
            mem_mib: 128,
            cmdline_extra: None,
            vsock: None,
            net: None,
        }
    }

    #[test]
    fn network_settings_are_checked_and_reach_the_kernel_command_line() {
        let ip = GuestIpv4 {
            address: "10.0.2.2".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.1".parse().unwrap()),
            dns: None,
        };
        assert_eq!(
            ip.kernel_parameter(),
            "ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off"
        );
        let ip32 = GuestIpv4 {
            prefix_len: 32,
            gateway: None,
            dns: Some("10.0.2.3".parse().unwrap()),
            ..ip
        };
        assert_eq!(
            ip32.kernel_parameter(),
            "ip=10.0.2.2:::255.255.255.255::eth0:off:10.0.2.3"
        );
        let net = |tap: &str, mac: [u8; 6], prefix_len: u8| VmConfig {
            net: Some(NetConfig {
                tap: tap.into(),
                mac,
                ipv4: Some(GuestIpv4 { prefix_len, ..ip }),
            }),
            ..config()
        };
        let mac = [0x06, 1, 2, 3, 4, 5];
        assert!(net("tap0", mac, 24).validate().is_ok());
        for bad in [
            net("", mac, 24),
            net("a-name-of-16-chr", mac, 24),
            net("../tap", mac, 24),
            net("tap0", [0x07, 1, 2, 3, 4, 5], 24),
            net("tap0", [0; 6], 24),
            net("tap0", mac, 0),
            net("tap0", mac, 33),
        ] {
            assert!(
                matches!(bad.validate(), Err(VmmError::NetConfig(_))),
                "{:?}",
                bad.net
            );
        }
        assert_eq!(
            parse_mac("06:e0:0a:ff:00:01"),
            Some([6, 0xe0, 10, 0xff, 0, 1])
        );
        assert_eq!(format_mac(&[6, 0xe0, 10, 0xff, 0, 1]), "06:e0:0a:ff:00:01");
        for bad in [
            "06:e0:0a:ff:00",
            "06:e0:0a:ff:00:01:02",
            "6:e0:0a:ff:00:01",
            "zz:e0:0a:ff:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_is_validated() {
        assert!(config().validate().is_ok());
        assert!(matches!(
            VmConfig {
                vcpus: 0,
                ..config()
            }
            .validate(),
            Err(VmmError::VcpuCount(0))
        ));
        assert!(matches!(
            VmConfig {
                vcpus: MAX_VCPUS + 1,
                ..config()
            }
            .validate(),
            Err(VmmError::VcpuCount(_))
        ));
        assert!(matches!(
            VmConfig {
                mem_mib: 1,
                ..config()
            }
            .validate(),
            Err(VmmError::Memory(_))
        ));
        assert_eq!(config().mem_bytes(), 128 << 20);
        let vsock = |guest_cid, uds_path: &str| VmConfig {
            vsock: Some(VsockConfig {
                guest_cid,
                uds_path: PathBuf::from(uds_path),
            }),
            ..config()
        };
        assert!(vsock(3, "/tmp/v.sock").validate().is_ok());
        assert!(matches!(
            vsock(2, "/tmp/v.sock").validate(),
            Err(VmmError::VsockCid(2))
        ));
        assert!(matches!(
            vsock(u32::MAX, "/tmp/v.sock").validate(),
            Err(VmmError::VsockCid(_))
        ));
        let long = format!("/tmp/{}", "x".repeat(MAX_UDS_PATH_LEN));
        let err = vsock(3, &long).validate().unwrap_err();
        assert!(matches!(err, VmmError::VsockPath { len: 112, .. }), "{err}");
        assert!(err.to_string().contains("112 bytes"), "{err}");
        assert!(matches!(
            vsock(3, "").validate(),
            Err(VmmError::VsockPath { len: 0, .. })
        ));
        assert!(MAX_VCPUS <= mptable::max_cpus());
    }

    #[test]
    fn virtio_slots_use_the_mmio_window_and_gsis_5_to_23() {
        assert_eq!(virtio_slot(0).unwrap(), (0xd000_0000, 5));
        assert_eq!(virtio_slot(1).unwrap(), (0xd000_1000, 6));
        assert_eq!(virtio_slot(18).unwrap(), (0xd001_2000, 23));
        assert!(matches!(virtio_slot(19), Err(VmmError::OutOfIrqs(19))));
    }

    #[test]
    fn device_io_answers_unknown_addresses() {
        let io = DeviceIo::default();
        let mut data = [0u8; 2];
        io.pio_read(0x2f8, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [9u8; 4];
        io.mmio_read(0xd000_0000, &mut data);
        assert_eq!(data, [0; 4]);
        io.pio_write(0x80, &[1]);
        io.mmio_write(0xd000_0000, &[1]);
    }

    #[test]
    fn exit_reasons() {
        assert!(ExitReason::KeyboardReset.is_reset());
        assert!(ExitReason::TripleFault.is_reset());
        assert!(!ExitReason::Stopped.is_reset());
    }

    #[derive(Clone, Default)]
    struct SharedOut(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A whole run with a stand-in "kernel": 64-bit code at the ELF entry that prints "hi" on
    /// the serial port and resets through the i8042. Needs a KVM that runs long mode code.
    #[test]
    fn a_tiny_64_bit_kernel_prints_and_resets() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let code = [
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
            0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
            0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
            0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
        ];
        let kernel = tiny_kernel(&code);
        let out = SharedOut::default();
        let options = VmmOptions {
            serial_out: Box::new(out.clone()),
            start: Instant::now(),
            ..Default::default()
        };
        let config = VmConfig {
            kernel: kernel.as_path().to_path_buf(),
            ..config()
        };
        let reason = run_with(&config, options).unwrap();
        assert_eq!(reason, ExitReason::KeyboardReset);
        for _ in 0..100 {
            if out.0.lock().unwrap().as_slice() == b"hi" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi");
    }

    fn tiny_kernel(code: &[u8]) -> vmm_sys_util::tempfile::TempFile {
        let kernel = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(
            kernel.as_path(),
            crate::kernel::minimal_elf(0x100_0000, code),
        )
        .unwrap();
        kernel
    }

    /// int3 with the boot IDT (no valid gate) escalates to a triple fault.
    #[test]
    fn a_triple_fault_ends_the_run_as_a_reset() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let kernel = tiny_kernel(&[0xcc]);
        let config = VmConfig {
            kernel: kernel.as_path().to_path_buf(),
            vcpus: 1,
            ..config()
        };
        let options = VmmOptions {
            serial_out: Box::new(std::io::sink()),
            start: Instant::now(),
            ..Default::default()
        };
        match run_with(&config, options) {
            Ok(reason) => assert_eq!(reason, ExitReason::TripleFault),
            // PVM-backed KVM cannot deliver the exception and reports an emulation failure,
            // which must arrive as a vCPU failure with its details.
            Err(VmmError::VcpuFailed { index: 0, reason })
                if !crate::probe::HostFacts::read().kind().runs_linux() =>
            {
                assert!(reason.contains("emulation failure"), "{reason}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The VMM pauses and resumes a guest that spins, then tears it down.
    #[test]
    fn a_spinning_guest_pauses_resumes_and_shuts_down() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let kernel = tiny_kernel(&[0xeb, 0xfe]); // jmp $
        let config = VmConfig {
            kernel: kernel.as_path().to_path_buf(),
            vcpus: 4,
            ..config()
        };
        let options = VmmOptions {
            serial_out: Box::new(std::io::sink()),
            start: Instant::now(),
            ..Default::default()
        };
        let vmm = Vmm::build(&config, options).unwrap();
        vmm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        vmm.pause().unwrap();
        vmm.resume().unwrap();
        assert_eq!(vmm.boot_time(), None);
        vmm.shutdown().unwrap();
    }

    #[test]
    fn a_missing_kernel_fails_the_build() {
        if !std::path::Path::new("/dev/kvm").exists() {
            return;
        }
        let options = VmmOptions {
            serial_out: Box::new(std::io::sink()),
            start: Instant::now(),
            ..Default::default()
        };
        let err = Vmm::build(&config(), options).unwrap_err();
        assert!(
            matches!(err, VmmError::Kernel(KernelError::Open { .. })),
            "{err}"
        );
    }
}
