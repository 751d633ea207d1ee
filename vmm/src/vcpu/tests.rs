use super::*;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

#[derive(Default)]
struct RecordingIo {
    writes: Mutex<Vec<(String, u64, Vec<u8>)>>,
}

impl IoHandler for RecordingIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(port as u8);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.writes
            .lock()
            .unwrap()
            .push(("pio".into(), u64::from(port), data.to_vec()));
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(addr as u8);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.writes
            .lock()
            .unwrap()
            .push(("mmio".into(), addr, data.to_vec()));
    }
}

#[test]
fn port_and_mmio_exits_reach_the_handler() {
    let io = RecordingIo::default();
    let mut buf = [0u8; 2];
    assert_eq!(
        handle_exit(VcpuExit::IoIn(0x61, &mut buf), &io),
        ExitAction::Continue
    );
    assert_eq!(buf, [0x61, 0x61]);
    assert_eq!(
        handle_exit(VcpuExit::IoOut(0x3f8, b"h"), &io),
        ExitAction::Continue
    );
    let mut buf = [0u8; 4];
    assert_eq!(
        handle_exit(VcpuExit::MmioRead(0xd000_0070, &mut buf), &io),
        ExitAction::Continue
    );
    assert_eq!(buf, [0x70; 4]);
    assert_eq!(
        handle_exit(VcpuExit::MmioWrite(0xd000_0050, &[1, 0, 0, 0]), &io),
        ExitAction::Continue
    );
    let writes = io.writes.lock().unwrap();
    assert_eq!(writes[0], ("pio".to_string(), 0x3f8, b"h".to_vec()));
    assert_eq!(
        writes[1],
        ("mmio".to_string(), 0xd000_0050, vec![1, 0, 0, 0])
    );
}

#[test]
fn unknown_accesses_read_as_ones_and_zeros() {
    let mut buf = [0u8; 2];
    assert_eq!(
        handle_exit(VcpuExit::IoIn(0x80, &mut buf), &NoDevices),
        ExitAction::Continue
    );
    assert_eq!(buf, [0xff, 0xff]);
    let mut buf = [7u8; 4];
    handle_exit(VcpuExit::MmioRead(0x1234, &mut buf), &NoDevices);
    assert_eq!(buf, [0; 4]);
}

#[test]
fn guest_ends_map_to_actions() {
    let io = NoDevices;
    assert_eq!(handle_exit(VcpuExit::Shutdown, &io), ExitAction::Shutdown);
    assert_eq!(
        handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &io),
        ExitAction::Reset
    );
    assert_eq!(
        handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), &io),
        ExitAction::Stop
    );
    assert!(matches!(
        handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[1]), &io),
        ExitAction::Fail(_)
    ));
    assert_eq!(handle_exit(VcpuExit::Hlt, &io), ExitAction::Stop);
    assert_eq!(handle_exit(VcpuExit::Intr, &io), ExitAction::Continue);
    match handle_exit(VcpuExit::FailEntry(0x21, 3), &io) {
        ExitAction::Fail(why) => {
            assert!(why.contains("0x21") && why.contains("CPU 3"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        handle_exit(VcpuExit::InternalError, &io),
        ExitAction::Fail(_)
    ));
    assert!(matches!(
        handle_exit(VcpuExit::Unsupported(99), &io),
        ExitAction::Fail(_)
    ));
    assert!(matches!(
        handle_exit(VcpuExit::Exception, &io),
        ExitAction::Fail(_)
    ));
    assert!(!ExitAction::Continue.ends_run());
    assert!(ExitAction::Reset.ends_run());
}

#[test]
fn internal_error_details_show_suberror_and_data() {
    let mut run = kvm_run::default();
    run.__bindgen_anon_1.internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
    run.__bindgen_anon_1.internal.ndata = 2;
    // SAFETY: writing plain integers into the union member just selected.
    unsafe { run.__bindgen_anon_1.internal.data[1] = 0xabc };
    let details = internal_error_details(&run);
    assert!(details.contains("emulation failure"), "{details}");
    assert!(details.contains("abc"), "{details}");
}

#[test]
fn state_machine_transitions() {
    use VcpuCommand::*;
    use VcpuState::*;
    assert_eq!(transition(Paused, Resume), (Running, VcpuResponse::Resumed));
    assert_eq!(transition(Running, Pause), (Paused, VcpuResponse::Paused));
    assert_eq!(transition(Paused, Pause), (Paused, VcpuResponse::Paused));
    assert_eq!(
        transition(Running, Resume),
        (Running, VcpuResponse::Resumed)
    );
    assert_eq!(transition(Running, Exit), (Exited, VcpuResponse::Exited));
    assert_eq!(transition(Paused, Exit), (Exited, VcpuResponse::Exited));
    assert_eq!(transition(Exited, Resume), (Exited, VcpuResponse::Exited));
}

/// A real-mode guest at 0x1000 running `code`, on a VM with or without an irqchip.
fn real_mode_vcpu(code: &[u8], irqchip: bool) -> (GuestMemoryMmap, kvm_ioctls::VmFd, VcpuFd) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    if irqchip {
        vm.create_irq_chip().unwrap();
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: 0x1000,
        userspace_addr: mem.get_host_address(GuestAddress(0x1000)).unwrap() as u64,
        flags: 0,
    };
    // SAFETY: the mapping belongs to `mem`, returned with the VM and kept alive by the test
    // until after the vCPU thread has been joined.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    (mem, vm, fd)
}

#[test]
fn a_spinning_vcpu_pauses_resumes_and_exits() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    // out 0x80, al; jmp back to the out: the guest never stops on its own.
    let (_mem, _vm, fd) = real_mode_vcpu(&[0xe6, 0x80, 0xeb, 0xfc], true);
    let io = Arc::new(RecordingIo::default());
    let (stops_tx, stops) = channel();
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let vcpu = Vcpu {
        index: 0,
        fd,
        io: io.clone(),
    };
    let handle = vcpu.start(stops_tx, stop_evt.try_clone().unwrap()).unwrap();

    handle.command(VcpuCommand::Resume).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    handle.command(VcpuCommand::Pause).unwrap();
    // Paused: no more port writes happen.
    let count = io.writes.lock().unwrap().len();
    assert!(count > 0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(io.writes.lock().unwrap().len(), count);

    command_all(std::slice::from_ref(&handle), VcpuCommand::Resume).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    command_all(std::slice::from_ref(&handle), VcpuCommand::Pause).unwrap();
    assert!(io.writes.lock().unwrap().len() > count);
    handle.exit_and_join().unwrap();
    assert!(stops.try_recv().is_err());
    assert!(stop_evt.read().is_err());
}

#[test]
fn a_paused_vcpu_is_saved_and_a_running_one_is_not() {
    // out 0x80, al; jmp back to the out.
    let (_mem, _vm, fd) = real_mode_vcpu(&[0xe6, 0x80, 0xeb, 0xfc], true);
    let (stops_tx, _stops) = channel();
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let vcpu = Vcpu {
        index: 0,
        fd,
        io: Arc::new(RecordingIo::default()),
    };
    let handle = vcpu.start(stops_tx, stop_evt).unwrap();
    handle.command(VcpuCommand::Resume).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let err = handle.command(VcpuCommand::Save).unwrap_err();
    assert!(err.to_string().contains("pause it first"), "{err}");

    handle.command(VcpuCommand::Pause).unwrap();
    let saved = save_all(std::slice::from_ref(&handle)).unwrap();
    assert_eq!(saved.len(), 1);
    // Paused at a consistent point: on the `out` or the `jmp` of the loop.
    assert!(
        [0x1000, 0x1002].contains(&saved[0].regs.rip),
        "rip {:#x}",
        saved[0].regs.rip
    );
    assert!(!saved[0].msrs.is_empty());
    // The vCPU keeps working after a save.
    handle.command(VcpuCommand::Resume).unwrap();
    handle.exit_and_join().unwrap();
}

#[test]
fn a_halting_vcpu_reports_its_stop() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    // Without an irqchip HLT exits to userspace.
    let (_mem, _vm, fd) = real_mode_vcpu(&[0xe6, 0x80, 0xf4], false);
    let (stops_tx, stops) = channel();
    let stop_evt = EventFd::new(0).unwrap();
    let vcpu = Vcpu {
        index: 0,
        fd,
        io: Arc::new(NoDevices),
    };
    let handle = vcpu.start(stops_tx, stop_evt.try_clone().unwrap()).unwrap();
    handle.command(VcpuCommand::Resume).unwrap();
    let stop = stops.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        stop,
        VcpuStop {
            index: 0,
            action: ExitAction::Stop
        }
    );
    assert_eq!(stop_evt.read().unwrap(), 1);
    // The stopped vCPU is paused and still answers.
    handle.command(VcpuCommand::Pause).unwrap();
    handle.exit_and_join().unwrap();
}
