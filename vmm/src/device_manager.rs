//! The devices of a VM: the port and MMIO buses, the legacy devices (serial, i8042, boot
//! timer), the virtio-mmio slots with their IRQs and notification eventfds, and the event loop
//! thread that serves them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ember_devices::virtio::block::{Block, CowDisk, Disk, COW_CHUNK_SIZE};
use ember_devices::virtio::mmio::{
    regs::QUEUE_NOTIFY, MmioTransport, MmioTransportState, MMIO_WINDOW_SIZE,
};
use ember_devices::virtio::net::{Net, Tap};
use ember_devices::virtio::vsock::Vsock;
use ember_devices::virtio::VirtioDevice;
use ember_devices::{
    BootMarks, BootTimer, Bus, Serial, BOOT_TIMER_PORT, BOOT_TIMER_PORT_LEN, I8042,
};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::collections::BTreeMap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{
    IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::config::*;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::VmSnapshot;
use crate::vcpu::IoHandler;
use crate::vm::Vm;
use crate::vmm::*;

const SERIAL_PORT_LEN: u64 = 8;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;

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

pub(crate) fn eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| VmmError::EventFd { what, source })
}

pub(crate) fn clone_evt(evt: &EventFd, what: &'static str) -> Result<EventFd, VmmError> {
    evt.try_clone()
        .map_err(|source| VmmError::EventFd { what, source })
}

pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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
pub(crate) struct EventLoop {
    exit_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub(crate) fn start(subscribers: Vec<Subscriber>) -> Result<EventLoop, VmmError> {
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

    pub(crate) fn stop(&mut self) {
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
pub(crate) struct Devices {
    pub(crate) io: Arc<DeviceIo>,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// The virtio devices in slot order.
    pub(crate) transports: Vec<AttachedVirtio>,
    /// (base, GSI) of each virtio-mmio device, for the command line.
    pub(crate) virtio: Vec<(u64, u32)>,
    pub(crate) reset_evt: EventFd,
    pub(crate) boot_marks: Arc<BootMarks>,
    pub(crate) vsock: Option<Arc<Mutex<Vsock>>>,
    pub(crate) rootfs_cow: Option<Arc<CowDisk>>,
    /// Read for the guest's I/O totals.
    pub(crate) io_devices: IoDevices,
}

/// The devices whose traffic the VMM reports (see [`crate::Vmm::io_stats`]).
#[derive(Default)]
pub(crate) struct IoDevices {
    pub(crate) rootfs: Option<Arc<Mutex<Block>>>,
    pub(crate) net: Option<Arc<Mutex<Net>>>,
}

pub(crate) fn attach_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mut options: VmmOptions,
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
    let boot_marks = timer.marks();
    io.pio
        .insert(
            Arc::new(Mutex::new(timer)),
            u64::from(BOOT_TIMER_PORT),
            BOOT_TIMER_PORT_LEN,
        )
        .map_err(bus_error("the boot timer", "port"))?;

    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut virtio = Vec::new();
    let mut transports = Vec::new();
    let mut vsock_device = None;
    let mut rootfs_cow = None;
    let mut io_devices = IoDevices::default();
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
        io_devices.rootfs = Some(block.clone());
        transports.push(AttachedVirtio {
            id: ROOTFS_DEVICE,
            transport: attach_virtio(
                vm,
                mem,
                &mut io,
                block.clone(),
                "the root virtio-block device",
                &mut virtio,
            )?,
        });
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
        transports.push(AttachedVirtio {
            id: VSOCK_DEVICE,
            transport: attach_virtio(
                vm,
                mem,
                &mut io,
                device.clone(),
                "the virtio-vsock device",
                &mut virtio,
            )?,
        });
        subscribers.push(device);
    }
    if let Some(net) = &config.net {
        // A restored guest keeps the MAC it was snapshotted with.
        let mac = restore.and_then(|snap| snap.net_mac).unwrap_or(net.mac);
        let tap = match options.tap_fd.take() {
            Some(fd) => Tap::from_fd(fd, &net.tap),
            None => Tap::open(&net.tap),
        }
        .map_err(VmmError::Net)?;
        let mut device = Net::new(tap, mac).map_err(VmmError::Net)?;
        device
            .set_rate_limits(options.net_rate_limits)
            .map_err(VmmError::Net)?;
        let device = Arc::new(Mutex::new(device));
        io_devices.net = Some(device.clone());
        transports.push(AttachedVirtio {
            id: NET_DEVICE,
            transport: attach_virtio(
                vm,
                mem,
                &mut io,
                device.clone(),
                "the virtio-net device",
                &mut virtio,
            )?,
        });
        subscribers.push(device);
    }
    if let Some(snap) = restore {
        restore_virtio_states(&transports, &snap.virtio)?;
    }
    Ok(Devices {
        vsock: vsock_device,
        io_devices,
        rootfs_cow,
        io: Arc::new(io),
        subscribers,
        serial,
        transports,
        virtio,
        reset_evt,
        boot_marks,
    })
}

/// The device ids virtio states are saved under.
pub const ROOTFS_DEVICE: &str = "rootfs";
pub const VSOCK_DEVICE: &str = "vsock";
pub const NET_DEVICE: &str = "net";

/// A virtio device on its MMIO slot, and the id its state is saved under.
pub(crate) struct AttachedVirtio {
    pub(crate) id: &'static str,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// Puts each saved transport state back on the device of the same id. The snapshot and the
/// VM built for it must have the same devices: one missing on either side is named.
fn restore_virtio_states(
    transports: &[AttachedVirtio],
    saved: &BTreeMap<String, MmioTransportState>,
) -> Result<(), VmmError> {
    let mismatch = VmmError::VirtioState;
    if let Some(extra) = saved
        .keys()
        .find(|id| !transports.iter().any(|t| t.id == id.as_str()))
    {
        return Err(mismatch(format!(
            "the snapshot has a virtio device {extra:?} this VM does not"
        )));
    }
    for attached in transports {
        let state = saved.get(attached.id).ok_or_else(|| {
            mismatch(format!(
                "the snapshot has no state for the virtio device {:?}",
                attached.id
            ))
        })?;
        lock_or_recover(&attached.transport)
            .restore_state(state)
            .map_err(|e| mismatch(format!("virtio device {:?}: {e}", attached.id)))?;
    }
    Ok(())
}

/// Puts `device` on the next virtio-mmio slot: irqfd, queue ioeventfds, MMIO window. Appends
/// the slot's (base, GSI) to `virtio` for the command line.
pub(crate) fn attach_virtio(
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
