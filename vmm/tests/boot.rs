//! Linux boots (`vmtest_*`: hardware KVM or the lab). The guest images come from
//! `cargo xtask test` through `EMBER_KERNEL`, `EMBER_INITRAMFS` and `EMBER_ROOTFS`; the agent
//! (init) prints "ready", writes the boot timer and reboots, which ember sees as an i8042 reset.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_vmm::{run_reported, ExitReason, RunReport, VmConfig, VmmOptions};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn artifact(var: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .unwrap_or_else(|| panic!("{var} is not set; run VM tests through `cargo xtask test`"));
    PathBuf::from(path)
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Boots `config` and returns how it ended and what the console showed.
fn boot(config: VmConfig) -> (ExitReason, String) {
    let (reason, _, console) = boot_reported(config);
    (reason, console)
}

/// [`boot`], with the VMM's report of the run.
fn boot_reported(config: VmConfig) -> (ExitReason, RunReport, String) {
    let console = Console::default();
    let options = VmmOptions {
        serial_out: Box::new(console.clone()),
        start: Instant::now(),
        ..Default::default()
    };
    let (done_tx, done) = channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(run_reported(&config, options).map_err(|e| e.to_string()));
    });
    let result = done.recv_timeout(BOOT_TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "no reset within {BOOT_TIMEOUT:?}; console:\n{}",
            console.text()
        )
    });
    // The serial writer thread may still be draining.
    std::thread::sleep(Duration::from_millis(200));
    let (reason, report) = result.unwrap_or_else(|e| panic!("{e}; console:\n{}", console.text()));
    (reason, report, console.text())
}

fn initramfs_config(vcpus: u8) -> VmConfig {
    VmConfig {
        kernel: artifact("EMBER_KERNEL"),
        initrd: Some(artifact("EMBER_INITRAMFS")),
        rootfs: None,
        read_only_rootfs: false,
        rootfs_overlay: None,
        vcpus,
        mem_mib: 256,
        // Without a command the agent keeps serving; with one it runs it and resets.
        cmdline_extra: Some(run_param("echo booted")),
        vsock: None,
        net: None,
    }
}

fn run_param(script: &str) -> String {
    format!(
        "{}={}",
        ember_agent::RUN_PARAM,
        ember_agent::encode_run_command(script)
    )
}

#[test]
fn vmtest_boots_linux_from_initramfs_and_resets() {
    // The command prints the kernel log's line of the moment it ran init, which the agent
    // also reports to the boot timer by the guest's clock.
    let (reason, report, console) = boot_reported(VmConfig {
        cmdline_extra: Some(run_param(
            "echo booted; dmesg | grep -m 1 ' as init process'",
        )),
        ..initramfs_config(1)
    });
    assert_eq!(reason, ExitReason::KeyboardReset, "console:\n{console}");
    assert!(
        console.contains("ember-agent") && console.contains("ready"),
        "console:\n{console}"
    );
    assert!(console.contains("booted"), "console:\n{console}");

    assert!(report.to_userspace_us.is_some(), "{report:?}");
    let logged = console
        .lines()
        .find_map(ember_agent::boot_report::init_line_us)
        .unwrap_or_else(|| panic!("no init line on the console:\n{console}"));
    let guest = report.guest;
    assert_eq!(guest.kernel_ran_init_us, Some(logged), "{report:?}");
    let started = guest.agent_started_us.expect("the agent reports its start");
    assert!(
        started >= logged,
        "agent started before init ran: {report:?}"
    );
    // The guest's clock starts after the vCPUs do and before userspace.
    let clock_started = report.guest_clock_started_us.expect("both clocks tied");
    assert!(
        report.to_first_run_us <= clock_started && clock_started <= report.to_userspace_us.unwrap(),
        "{report:?}"
    );
    // It ran one command and reset, never listening for the host.
    assert_eq!(guest.agent_ready_us, None, "{report:?}");
}

#[test]
fn vmtest_boots_linux_with_four_vcpus() {
    // The agent reports what the guest sees: every vCPU must have come online (MP table,
    // APIC ids and CPUID topology agree).
    let script = "echo online=$(cat /sys/devices/system/cpu/online) cpus=$(grep -c ^processor /proc/cpuinfo)";
    let (reason, console) = boot(VmConfig {
        cmdline_extra: Some(run_param(script)),
        ..initramfs_config(4)
    });
    assert_eq!(reason, ExitReason::KeyboardReset, "console:\n{console}");
    assert!(console.contains("online=0-3 cpus=4"), "console:\n{console}");
}

#[test]
fn vmtest_boots_linux_from_a_read_only_virtio_rootfs() {
    let (reason, console) = boot(VmConfig {
        initrd: None,
        rootfs: Some(artifact("EMBER_ROOTFS")),
        read_only_rootfs: true,
        rootfs_overlay: None,
        cmdline_extra: Some(format!(
            "init={} {}",
            ember_agent::AGENT_GUEST_PATH,
            run_param("echo booted from $(stat -c %m /sbin/ember-agent)")
        )),
        ..initramfs_config(2)
    });
    assert_eq!(reason, ExitReason::KeyboardReset, "console:\n{console}");
    assert!(console.contains("booted from /"), "console:\n{console}");
}
