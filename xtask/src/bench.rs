//! `cargo xtask bench boot`: boot figures measured in one run, with a baseline.
//!
//! The harness runs where Linux guests can run (directly on hardware KVM, else inside the lab)
//! and boots the same kernel and initramfs N times with ember and with QEMU's `microvm`
//! machine (the baseline), timing each from process start to the agent's "ready" line on the
//! console and to process exit. ember's own report adds the time to the first `KVM_RUN`, the
//! boot-timer figure and the VMM's resident memory outside guest RAM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ember_agent::boot_report::init_line_us;

use crate::lab::{run_in_lab, LabOptions};
use crate::test::Artifacts;
use crate::util::{cargo, run, target_dir};

/// One boot's figures, in microseconds / bytes.
#[derive(Debug, Default, Clone)]
struct Sample {
    to_ready_us: u64,
    total_us: u64,
    rss_at_ready_bytes: u64,
    to_first_run_us: Option<u64>,
    to_userspace_us: Option<u64>,
    vmm_rss_bytes: Option<u64>,
    /// The guest's own clock (`/proc/uptime`, since its kernel started) when its init ran
    /// its first command: the guest side of the boot, comparable across VMMs.
    guest_uptime_us: Option<u64>,
    /// The guest kernel's own time (its log's timestamp) when it ran init: the kernel's part
    /// of the boot, without the init's.
    guest_init_us: Option<u64>,
    /// The agent's start and its readiness by the guest's clock (ember's boot timer only).
    guest_agent_started_us: Option<u64>,
    guest_agent_ready_us: Option<u64>,
    /// When the guest's clock started, by the VMM's (ember's report only).
    guest_clock_started_us: Option<u64>,
}

/// The command every boot runs first: it prints the guest's own uptime, then the kernel log's
/// line of the moment it ran init.
const FIRST_COMMAND: &str = "cat /proc/uptime; dmesg | grep -m 1 ' as init process'";

/// `/proc/uptime`'s first figure in µs, if `line` is such a line ("12.34 5.67").
fn uptime_us(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    let (up, idle) = (fields.next()?, fields.next()?);
    if fields.next().is_some() || idle.parse::<f64>().is_err() {
        return None;
    }
    up.parse::<f64>().ok().map(|s| (s * 1e6) as u64)
}

/// Builds the programs the benches measure (release profile) and returns the `ember` one's
/// path (`ember-vmm` is beside it).
pub fn build_release_ember() -> Result<std::path::PathBuf> {
    run(cargo()
        .args(["build", "--quiet", "--release"])
        .args(crate::util::PRODUCT_BINARIES))?;
    Ok(target_dir().join("release/ember"))
}

/// Runs a harness `argv` directly where `ember` says this host's KVM runs Linux, otherwise
/// inside the lab; returns its exit status.
/// `uplink`: the lab gets one (the harness reaches the package registries).
fn run_harness(ember: &Path, argv: &[String], uplink: bool) -> Result<i32> {
    if Command::new(ember)
        .arg("doctor")
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        eprintln!("bench: hardware KVM on this host: measuring directly");
        let status = Command::new(&argv[0]).args(&argv[1..]).status()?;
        return Ok(status.code().unwrap_or(1));
    }
    eprintln!("bench: this host's KVM cannot run Linux: measuring inside the lab (figures ~20-30x native)");
    let opts = LabOptions {
        uplink,
        ..Default::default()
    };
    run_in_lab(argv, &opts)
}

/// Entry point on the host: build, then run the harness where KVM can run Linux. With
/// `against`, another `ember` binary (say, an older commit's release build) boots the Debian
/// rootfs in the same rounds.
pub fn boot(runs: u32, against: Option<&Path>) -> Result<i32> {
    let artifacts = Artifacts::ensure()?;
    let ember = build_release_ember()?;
    let me = std::env::current_exe()?;
    let argv: Vec<String> = vec![
        me.display().to_string(),
        "bench-boot-harness".into(),
        "--runs".into(),
        runs.to_string(),
        "--ember".into(),
        ember.display().to_string(),
        "--kernel".into(),
        artifacts.kernel.display().to_string(),
        "--initramfs".into(),
        artifacts.initramfs.display().to_string(),
        "--rootfs".into(),
        artifacts.rootfs.display().to_string(),
    ];
    let mut argv = argv;
    if let Some(other) = against {
        argv.extend([
            "--against".into(),
            std::fs::canonicalize(other)?.display().to_string(),
        ]);
    }
    run_harness(&ember, &argv, false)
}

/// The harness (runs in the lab or on hardware KVM).
pub fn harness(
    runs: u32,
    ember: &Path,
    kernel: &Path,
    initramfs: &Path,
    rootfs: &Path,
    against: Option<&Path>,
) -> Result<i32> {
    let env = if std::env::var_os("EMBER_IN_LAB").is_some() {
        "the lab (nested KVM under QEMU TCG)"
    } else {
        "hardware KVM"
    };
    let command = ember_agent::encode_run_command(FIRST_COMMAND);
    let run_param = format!("{}={command}", ember_agent::RUN_PARAM);
    let report = std::env::temp_dir().join(format!("ember-bench-{}.json", std::process::id()));
    let s = |p: &Path| p.display().to_string();

    let ember_initramfs = |report: &Path| -> Vec<String> {
        vec![
            s(ember),
            "run".into(),
            "--kernel".into(),
            s(kernel),
            "--initrd".into(),
            s(initramfs),
            "--init-cmd".into(),
            FIRST_COMMAND.into(),
            "--report-json".into(),
            s(report),
        ]
    };
    let ember_rootfs = |ember: &Path, report: &Path| -> Vec<String> {
        vec![
            s(ember),
            "run".into(),
            "--kernel".into(),
            s(kernel),
            "--rootfs".into(),
            s(rootfs),
            "--read-only-rootfs".into(),
            "--init-cmd".into(),
            FIRST_COMMAND.into(),
            "--report-json".into(),
            s(report),
        ]
    };
    // QEMU's minimal machine with the same kernel (PVH entry), initramfs, memory and vCPUs.
    // Without an i8042 it resets by triple fault (reboot=t); -no-reboot makes that an exit.
    let qemu: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-M".into(),
        "microvm".into(),
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-m".into(),
        "256".into(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        s(kernel),
        "-initrd".into(),
        s(initramfs),
        "-append".into(),
        format!("console=ttyS0 reboot=t panic=1 pci=off nomodule tsc=reliable quiet {run_param}"),
    ];

    let mut results: Vec<(&str, Vec<Sample>)> = vec![
        ("ember, initramfs", Vec::new()),
        ("qemu microvm, initramfs (baseline)", Vec::new()),
        ("ember, Debian rootfs (virtio-block)", Vec::new()),
    ];
    if against.is_some() {
        results.push(("ember to compare (--against), Debian rootfs", Vec::new()));
    }
    for i in 0..runs {
        eprintln!("bench: round {}/{runs}", i + 1);
        let mut sample = measure(&ember_initramfs(&report))?;
        add_report(&mut sample, &report)?;
        results[0].1.push(sample);
        results[1].1.push(measure(&qemu)?);
        let mut sample = measure(&ember_rootfs(ember, &report))?;
        add_report(&mut sample, &report)?;
        results[2].1.push(sample);
        if let Some(other) = against {
            let mut sample = measure(&ember_rootfs(other, &report))?;
            add_report(&mut sample, &report)?;
            results[3].1.push(sample);
        }
    }
    std::fs::remove_file(&report).ok();

    println!("\nboot figures in {env}: {runs} runs each, 1 vCPU, 256 MiB; median [min–max]\n");
    println!("| scenario | to agent ready (ms) | to exit (ms) | RSS at ready (MiB) | first KVM_RUN (ms) | guest clock started (ms) | boot timer: userspace (ms) | guest kernel: init run at (ms) | guest: agent started (ms) | guest clock at its first command (ms) | VMM RSS outside guest RAM (MiB) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, samples) in &results {
        let ms = |f: &dyn Fn(&Sample) -> Option<u64>| stat(samples, f, 1e3);
        let mib = |f: &dyn Fn(&Sample) -> Option<u64>| stat(samples, f, 1048576.0);
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ms(&|s| Some(s.to_ready_us)),
            ms(&|s| Some(s.total_us)),
            mib(&|s| Some(s.rss_at_ready_bytes)),
            ms(&|s| s.to_first_run_us),
            ms(&|s| s.guest_clock_started_us),
            ms(&|s| s.to_userspace_us),
            ms(&|s| s.guest_init_us),
            ms(&|s| s.guest_agent_started_us),
            ms(&|s| s.guest_uptime_us),
            mib(&|s| s.vmm_rss_bytes),
        );
    }
    let median_ready = |samples: &[Sample]| median(samples.iter().map(|s| s.to_ready_us).collect());
    let (ember_ready, qemu_ready) = (median_ready(&results[0].1), median_ready(&results[1].1));
    let (ember_exit, qemu_exit) = (
        median(results[0].1.iter().map(|s| s.total_us).collect()),
        median(results[1].1.iter().map(|s| s.total_us).collect()),
    );
    println!(
        "\nratios (ember / qemu microvm, same kernel and initramfs, same run): to ready {:.2}, to exit {:.2}",
        ember_ready as f64 / qemu_ready.max(1) as f64,
        ember_exit as f64 / qemu_exit.max(1) as f64
    );
    let guest =
        |samples: &[Sample]| median(samples.iter().filter_map(|s| s.guest_uptime_us).collect());
    println!(
        "guest clock at its first command, ember / qemu microvm (initramfs): {:.2}",
        guest(&results[0].1) as f64 / guest(&results[1].1).max(1) as f64
    );
    let init =
        |samples: &[Sample]| median(samples.iter().filter_map(|s| s.guest_init_us).collect());
    let (ember_init, qemu_init) = (init(&results[0].1), init(&results[1].1));
    println!(
        "guest kernel's time to init (its log), ember / qemu microvm (initramfs): {:.2} ({} ms vs {} ms; target ≤ 1: {})",
        ember_init as f64 / qemu_init.max(1) as f64,
        ember_init / 1000,
        qemu_init / 1000,
        if ember_init > 0 && ember_init <= qemu_init { "met" } else { "NOT met" }
    );
    if let Some((_, old)) = results.get(3) {
        let old_ready = median_ready(old);
        let new_ready = median_ready(&results[2].1);
        println!(
            "Debian rootfs, this ember / --against: to agent ready {:.2} ({} ms vs {} ms, {:.0}% sooner), guest clock at its first command {:.2}",
            new_ready as f64 / old_ready.max(1) as f64,
            new_ready / 1000,
            old_ready / 1000,
            (1.0 - new_ready as f64 / old_ready.max(1) as f64) * 100.0,
            guest(&results[2].1) as f64 / guest(old).max(1) as f64,
        );
    }
    let vmm_rss = median(
        results[0]
            .1
            .iter()
            .filter_map(|s| s.vmm_rss_bytes)
            .collect(),
    );
    println!(
        "ember VMM resident memory outside guest RAM: {:.2} MiB (target ≤ 5 MiB: {})",
        vmm_rss as f64 / 1048576.0,
        if vmm_rss <= 5 << 20 { "met" } else { "NOT met" }
    );
    Ok(0)
}

fn add_report(sample: &mut Sample, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let get = |k: &str| json.get(k).and_then(|v| v.as_u64());
    sample.to_first_run_us = get("to_first_run_us");
    sample.to_userspace_us = get("to_userspace_us");
    sample.vmm_rss_bytes = get("vmm_rss_bytes");
    let guest = |k: &str| {
        json.get("guest")
            .and_then(|g| g.get(k))
            .and_then(|v| v.as_u64())
    };
    sample.guest_agent_started_us = guest("agent_started_us");
    sample.guest_agent_ready_us = guest("agent_ready_us");
    sample.guest_clock_started_us = get("guest_clock_started_us");
    // The guest's report and its log say the same; the report does without the console.
    if let Some(init) = guest("kernel_ran_init_us") {
        sample.guest_init_us = Some(init);
    }
    std::fs::remove_file(path).ok();
    Ok(())
}

/// Runs `argv`, timing process start to the agent's "ready" line and to exit.
fn measure(argv: &[String]) -> Result<Sample> {
    const LIMIT: Duration = Duration::from_secs(300);
    let start = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("stdout")?;
    let mut sample = Sample::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if sample.guest_uptime_us.is_none() {
            sample.guest_uptime_us = uptime_us(line.trim());
        }
        if sample.guest_init_us.is_none() {
            sample.guest_init_us = init_line_us(&line);
        }
        if sample.to_ready_us == 0 && line.contains("ember-agent") && line.contains("ready") {
            sample.to_ready_us = start.elapsed().as_micros() as u64;
            sample.rss_at_ready_bytes = rss_of(pid).unwrap_or(0);
        }
        if start.elapsed() > LIMIT {
            child.kill().ok();
            bail!("{} did not finish within {LIMIT:?}", argv[0]);
        }
    }
    let status = child.wait()?;
    sample.total_us = start.elapsed().as_micros() as u64;
    if sample.to_ready_us == 0 {
        bail!(
            "{} never printed the agent's ready line ({status})",
            argv[0]
        );
    }
    Ok(sample)
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn stat(samples: &[Sample], f: &dyn Fn(&Sample) -> Option<u64>, unit: f64) -> String {
    let mut values: Vec<u64> = samples.iter().filter_map(f).collect();
    if values.is_empty() {
        return "–".into();
    }
    values.sort_unstable();
    let (lo, hi) = (values[0], values[values.len() - 1]);
    format!(
        "{:.1} [{:.1}–{:.1}]",
        median(values) as f64 / unit,
        lo as f64 / unit,
        hi as f64 / unit
    )
}

/// Entry point on the host for `bench exec`.
pub fn exec(runs: u32) -> Result<i32> {
    let artifacts = Artifacts::ensure()?;
    let ember = build_release_ember()?;
    let argv: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "bench-exec-harness".into(),
        "--runs".into(),
        runs.to_string(),
        "--ember".into(),
        ember.display().to_string(),
        "--kernel".into(),
        artifacts.kernel.display().to_string(),
        "--rootfs".into(),
        artifacts.rootfs.display().to_string(),
    ];
    run_harness(&ember, &argv, false)
}

/// `ember-bench` where Linux guests run; `out` and `compare` are paths in the workspace,
/// which the lab shares.
pub fn service(
    quick: bool,
    runs: Option<u32>,
    out: &Path,
    compare: Option<&Path>,
    remote: &str,
    installs: bool,
) -> Result<i32> {
    let artifacts = Artifacts::ensure()?;
    let ember = build_release_ember()?;
    let absolute =
        |p: &Path| -> Result<String> { Ok(std::env::current_dir()?.join(p).display().to_string()) };
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "ember-bench",
        "--bin",
        "ember-bench",
    ]))?;
    let mut argv: Vec<String> = vec![
        ember.with_file_name("ember-bench").display().to_string(),
        "--out".into(),
        absolute(out)?,
        "--kernel".into(),
        artifacts.kernel.display().to_string(),
        "--rootfs".into(),
        artifacts.rootfs.display().to_string(),
    ];
    if quick {
        argv.push("--quick".into());
    }
    if let Some(runs) = runs {
        argv.extend(["--runs".into(), runs.to_string()]);
    }
    if let Some(old) = compare {
        argv.extend(["--compare".into(), absolute(old)?]);
    }
    if remote != "none" {
        argv.extend(["--remote".into(), remote.to_string()]);
    }
    if installs {
        argv.push("--installs".into());
    }
    run_harness(&ember, &argv, installs)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The exec benchmark's harness: one sandbox, many execs through its agent.
pub fn exec_harness(runs: u32, ember: &Path, kernel: &Path, rootfs: &Path) -> Result<i32> {
    use ember_agent::client::AgentClient;
    use ember_agent::protocol::{ExecRequest, AGENT_VSOCK_PORT};
    let env = if std::env::var_os("EMBER_IN_LAB").is_some() {
        "the lab (nested KVM under QEMU TCG)"
    } else {
        "hardware KVM"
    };
    let socket = std::env::temp_dir().join(format!("ember-bench-exec-{}.sock", std::process::id()));
    let started = Instant::now();
    let mut sandbox = Command::new(ember)
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--rootfs")
        .arg(rootfs)
        .args(["--read-only-rootfs", "--vsock-socket"])
        .arg(&socket)
        .args(["--", "sleep", "1000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ember run")?;
    let result = (|| -> Result<()> {
        let client = AgentClient::wait_ready(&socket, AGENT_VSOCK_PORT, Duration::from_secs(300))
            .map_err(|e| anyhow::anyhow!("the sandbox's agent did not answer: {e}"))?;
        let ready = started.elapsed();
        let out = client
            .exec_collect(ExecRequest::new(["true"]))
            .map_err(|e| anyhow::anyhow!("first exec: {e}"))?;
        let first_exec = started.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "`true` failed in the guest: {:?}",
            out.status
        );

        let mut guest = Vec::new();
        let mut local = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            client
                .exec_collect(ExecRequest::new(["true"]))
                .map_err(|e| anyhow::anyhow!("exec: {e}"))?;
            guest.push(t.elapsed());
            let t = Instant::now();
            Command::new("true").status()?;
            local.push(t.elapsed());
        }
        guest.sort();
        local.sort();

        const BYTES: u64 = 64 << 20;
        let t = Instant::now();
        let mut received = 0u64;
        client
            .exec(
                ExecRequest::new(["head", "-c", &BYTES.to_string(), "/dev/zero"]),
                |_, data| received += data.len() as u64,
            )
            .map_err(|e| anyhow::anyhow!("throughput exec: {e}"))?;
        let guest_mbs = received as f64 / 1e6 / t.elapsed().as_secs_f64();
        anyhow::ensure!(received == BYTES, "received {received} of {BYTES} bytes");
        let t = Instant::now();
        let mut child = Command::new("head")
            .args(["-c", &BYTES.to_string(), "/dev/zero"])
            .stdout(Stdio::piped())
            .spawn()?;
        let local_bytes = std::io::copy(
            child.stdout.as_mut().context("stdout")?,
            &mut std::io::sink(),
        )?;
        child.wait()?;
        let local_mbs = local_bytes as f64 / 1e6 / t.elapsed().as_secs_f64();

        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("\nexec figures in {env}: 1 vCPU, 256 MiB, bundled rootfs read-only; {runs} round trips\n");
        println!("| measure | ember sandbox | local process in the same environment (baseline) | ratio |");
        println!("|---|---|---|---|");
        println!("| cold boot → agent ready | {:.1} ms | | |", ms(ready));
        println!(
            "| cold boot → first exec finished | {:.1} ms | | |",
            ms(first_exec)
        );
        println!(
            "| exec `true` round trip, median | {:.2} ms | {:.2} ms | {:.1}× |",
            ms(percentile(&guest, 0.5)),
            ms(percentile(&local, 0.5)),
            ms(percentile(&guest, 0.5)) / ms(percentile(&local, 0.5)).max(1e-6)
        );
        println!(
            "| exec `true` round trip, p99 | {:.2} ms | {:.2} ms | {:.1}× |",
            ms(percentile(&guest, 0.99)),
            ms(percentile(&local, 0.99)),
            ms(percentile(&guest, 0.99)) / ms(percentile(&local, 0.99)).max(1e-6)
        );
        println!(
            "| stdout throughput (64 MiB) | {guest_mbs:.1} MB/s | {local_mbs:.1} MB/s | {:.3}× |",
            guest_mbs / local_mbs.max(1e-6)
        );
        let _ = client.shutdown();
        Ok(())
    })();
    let deadline = Instant::now() + Duration::from_secs(60);
    while sandbox.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    sandbox.kill().ok();
    sandbox.wait().ok();
    std::fs::remove_file(&socket).ok();
    result.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_uptime_line_is_recognised_and_nothing_else() {
        assert_eq!(uptime_us("1.52 0.98"), Some(1_520_000));
        assert_eq!(uptime_us("0.00 0.00"), Some(0));
        assert_eq!(uptime_us("[    0.532] ember-agent: ready"), None);
        assert_eq!(uptime_us("1.5 x"), None);
        assert_eq!(uptime_us("1.5 2.5 3.5"), None);
        assert_eq!(uptime_us(""), None);
    }
}
