use super::*;

#[test]
fn the_agent_writes_the_boot_timer_where_the_device_listens() {
    use ember_devices::{GuestMilestone, BOOT_TIMER_MAGIC, BOOT_TIMER_PORT, BOOT_TIMER_PORT_LEN};
    assert_eq!(ember_agent::BOOT_TIMER_PORT, BOOT_TIMER_PORT);
    assert_eq!(ember_agent::BOOT_TIMER_MAGIC, BOOT_TIMER_MAGIC);
    assert_eq!(
        u64::from(ember_agent::BOOT_TIMER_PORT_LEN),
        BOOT_TIMER_PORT_LEN
    );
    use ember_agent::boot_report::Milestone;
    for (theirs, ours) in [
        (Milestone::KernelRanInit, GuestMilestone::KernelRanInit),
        (Milestone::AgentStarted, GuestMilestone::AgentStarted),
        (Milestone::AgentReady, GuestMilestone::AgentReady),
    ] {
        let agent_offset = ember_agent::BOOT_TIMER_MILESTONE_OFFSET + 4 * theirs as u16;
        assert_eq!(u64::from(agent_offset), ours.offset(), "{ours:?}");
    }
}
use crate::arch::x86_64::mptable;
use crate::vcpu::IoHandler;
use std::io::Write;
use std::path::PathBuf;

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
