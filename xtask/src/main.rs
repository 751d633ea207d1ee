//! `cargo xtask`: builds ember's guest kernel and images, runs the lab, the tests and benches.

mod bench;
mod deps;
mod fuzz;
mod images;
mod kernel;
mod lab;
mod runtimes;
mod sdk;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ember's build, lab and test driver")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the Debian packages the project needs (apt-get; idempotent).
    Deps,
    /// Build (or fetch from the cache) the guest kernel; prints the path of vmlinux.
    Kernel,
    /// Run every test: formatting, clippy, unit tests, artifact checks, the lab, VM tests.
    Test {
        /// Do not check/install Debian packages first.
        #[arg(long)]
        skip_deps: bool,
    },
    /// Only the VM tests (`vmtest_*`), through the suite's harness (in the lab where the host's
    /// KVM cannot run Linux); `--filter` keeps those whose name contains it.
    VmTests {
        #[arg(long)]
        filter: Option<String>,
    },
    /// ember's main job, end to end: build everything, then boot a sandbox in the lab.
    Demo,
    /// Build the TypeScript and Python SDKs, check their types against api/openapi.json and
    /// run their unit tests (their live suites are VM tests).
    Sdk,
    /// Run the cargo-fuzz targets in fuzz/ (nightly; installs cargo-fuzz if needed).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Benchmarks measured end to end (in the lab where the host's KVM cannot run Linux).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// (internal) the boot benchmark's harness, run where KVM can run Linux.
    #[command(hide = true)]
    BenchBootHarness {
        #[arg(long)]
        runs: u32,
        #[arg(long)]
        ember: std::path::PathBuf,
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        initramfs: std::path::PathBuf,
        #[arg(long)]
        rootfs: std::path::PathBuf,
        #[arg(long)]
        against: Option<std::path::PathBuf>,
    },
    /// (internal) the exec benchmark's harness.
    #[command(hide = true)]
    BenchExecHarness {
        #[arg(long)]
        runs: u32,
        #[arg(long)]
        ember: std::path::PathBuf,
        #[arg(long)]
        kernel: std::path::PathBuf,
        #[arg(long)]
        rootfs: std::path::PathBuf,
    },
    /// Build (or fetch from the cache) the initramfs (busybox + agent); prints its path.
    Initramfs,
    /// Build (or fetch from the cache) the Debian rootfs image with the agent; prints its path.
    Rootfs,
    /// Build (or fetch from the cache) the runtime images (`python3.13`, `node22`, `node24`;
    /// all unless named); prints `RUNTIME PATH` per image.
    Images {
        runtimes: Vec<String>,
        /// PEM certificates the images' sandboxes trust besides Debian's (default:
        /// $EMBER_CA_BUNDLE, else the ones this host added under
        /// /usr/local/share/ca-certificates).
        #[arg(long)]
        ca_bundle: Option<std::path::PathBuf>,
    },
    /// Run a command inside the lab (an L1 VM with hardware-KVM semantics) and return its
    /// exit status. The host's root is visible read-only, the workspace and cache read-write;
    /// `ember` (built first) is on PATH.
    Lab {
        /// L1 memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem_mib: u32,
        /// L1 vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Give up (and fail) after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_s: u64,
        /// Do not build `ember` before starting.
        #[arg(long)]
        no_build: bool,
        /// Give the L1 an uplink (QEMU's user-mode network), so that egress sandboxes reach
        /// what this host reaches (the package registries).
        #[arg(long)]
        uplink: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Boot N times with ember and with QEMU microvm (baseline): time to the agent's ready
    /// line and to exit, first KVM_RUN, boot-timer userspace, VMM memory outside guest RAM.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Another `ember` binary (say, an older commit's release build) that boots the Debian
        /// rootfs in the same rounds, for a before/after ratio from one run.
        #[arg(long)]
        against: Option<std::path::PathBuf>,
    },
    /// One sandbox: cold boot to agent ready and first exec, `true` round trips (median,
    /// p99) and stdout throughput, against a local process in the same environment.
    Exec {
        #[arg(long, default_value_t = 200)]
        runs: u32,
    },
    /// `ember-bench` (cold vs warm through the service, snapshots, density, store sharing),
    /// in the lab where the host's KVM cannot run Linux; the report goes to --out.
    Service {
        #[arg(long)]
        quick: bool,
        /// Default: `ember-bench`'s (3 quick, 5 full).
        #[arg(long)]
        runs: Option<u32>,
        #[arg(long, default_value = "target/bench-results")]
        out: std::path::PathBuf,
        /// A previous report.json to compare against (regressions fail the run).
        #[arg(long)]
        compare: Option<std::path::PathBuf>,
        /// The remote tier the remote-restore figures use: `moto` (a server on the lab's
        /// loopback) or `s3://BUCKET/PREFIX` (the `AWS_*` environment reaches it); `none`
        /// leaves those figures out.
        #[arg(long, default_value = "moto")]
        remote: String,
        /// Also measure a real `pip install` against restores of the snapshot after it (the
        /// lab gets an uplink to the package index).
        #[arg(long)]
        installs: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Deps => deps::ensure().map(|_| 0),
        Cmd::Kernel => {
            let path = kernel::ensure()?;
            println!("{}", path.display());
            Ok(0)
        }
        Cmd::Test { skip_deps } => test::run_all(skip_deps),
        Cmd::VmTests { filter } => test::run_vm_tests_only(filter.as_deref()),
        Cmd::Demo => demo(),
        Cmd::Sdk => sdk::check().map(|_| 0),
        Cmd::Fuzz { seconds, target } => fuzz::run_targets(seconds, target.as_deref()),
        Cmd::Bench {
            what: BenchCmd::Boot { runs, against },
        } => bench::boot(runs, against.as_deref()),
        Cmd::Bench {
            what: BenchCmd::Exec { runs },
        } => bench::exec(runs),
        Cmd::Bench {
            what:
                BenchCmd::Service {
                    quick,
                    runs,
                    out,
                    compare,
                    remote,
                    installs,
                },
        } => bench::service(quick, runs, &out, compare.as_deref(), &remote, installs),
        Cmd::BenchExecHarness {
            runs,
            ember,
            kernel,
            rootfs,
        } => bench::exec_harness(runs, &ember, &kernel, &rootfs),
        Cmd::BenchBootHarness {
            runs,
            ember,
            kernel,
            initramfs,
            rootfs,
            against,
        } => bench::harness(
            runs,
            &ember,
            &kernel,
            &initramfs,
            &rootfs,
            against.as_deref(),
        ),
        Cmd::Initramfs => {
            println!("{}", images::initramfs()?.display());
            Ok(0)
        }
        Cmd::Rootfs => {
            println!("{}", images::rootfs()?.display());
            Ok(0)
        }
        Cmd::Images {
            runtimes: names,
            ca_bundle,
        } => {
            for (name, image) in runtimes::build(&names, ca_bundle.as_deref())? {
                println!("{name} {}", image.display());
            }
            Ok(0)
        }
        Cmd::Lab {
            mem_mib,
            cpus,
            timeout_s,
            no_build,
            uplink,
            command,
        } => {
            if !no_build {
                util::run(
                    util::cargo()
                        .args(["build", "--quiet"])
                        .args(util::PRODUCT_BINARIES)
                        .args(["-p", "ember-bench", "--bin", "ember-bench"]),
                )?;
            }
            let opts = lab::LabOptions {
                mem_mib,
                cpus,
                timeout: std::time::Duration::from_secs(timeout_s),
                uplink,
                ..Default::default()
            };
            lab::run_in_lab(&command, &opts)
        }
    }
}

/// Single-quotes `text` for sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The README's main job: everything from packages to a running guest.
fn demo() -> Result<i32> {
    let mut phases = util::Phases::new();
    phases.run("debian packages", deps::ensure)?;
    let artifacts = phases.run("guest kernel, initramfs, rootfs", test::Artifacts::ensure)?;
    for (name, value) in artifacts.env() {
        eprintln!("  {name}={value}");
    }
    // Release: the figures the demo prints should be the VMM's, not a debug build's.
    let ember = bench::build_release_ember()?;
    let here = phases.run("ember doctor on this host", || {
        Ok(std::process::Command::new(&ember)
            .arg("doctor")
            .status()?
            .success())
    })?;
    // The product story against a live `ember serve`: create a python3.13 sandbox, pip
    // install a package from the index, snapshot, delete, restore and use the package.
    let state = lab::tempdir("ember-demo")?;
    let script = format!(
        "PATH={bin}:$PATH STATE={state} sh -c {quoted}",
        bin = util::target_dir().join("release").display(),
        state = state.display(),
        quoted = shell_quote(include_str!("demo.sh"))
    );
    let script = script.as_str();
    let rc = if here {
        phases.run("ember on this host", || {
            util::run(std::process::Command::new("sh").args(["-c", script])).map(|_| 0)
        })?
    } else {
        // The install reaches the package index through the lab's uplink.
        let opts = lab::LabOptions {
            env: artifacts.env(),
            uplink: true,
            ..Default::default()
        };
        phases.run("ember in the lab", || {
            lab::run_in_lab(&["sh".into(), "-c".into(), script.into()], &opts)
        })?
    };
    std::fs::remove_dir_all(&state).ok();
    phases.summary();
    Ok(rc)
}
