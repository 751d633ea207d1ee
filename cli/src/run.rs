//! `ember run`: boot a guest in the foreground, console on stdout.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_vmm::probe::HostFacts;
use ember_vmm::{run_reported, RunReport, VmConfig, VmmOptions};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Guest kernel (ELF vmlinux or bzImage). Default: $EMBER_KERNEL, else the newest one
    /// built by `cargo xtask kernel`.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image (raw ext4), exposed as /dev/vda. Default: $EMBER_ROOTFS, else
    /// the newest one built by `cargo xtask rootfs` (unless --initrd is given).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// An initramfs; with it and no --rootfs the guest runs from the initramfs alone.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u32,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Expose the rootfs read-only (guest writes fail with an I/O error).
    #[arg(long)]
    pub read_only_rootfs: bool,
    /// Leave --rootfs unmodified and send the guest's writes to a private copy-on-write
    /// overlay, dropped when the VM ends unless a snapshot keeps them (always so for the
    /// bundled rootfs).
    #[arg(long, conflicts_with = "read_only_rootfs")]
    pub cow: bool,
    /// A shell command the guest's init runs once userspace is up; the guest then resets.
    #[arg(long)]
    pub init_cmd: Option<String>,
    /// Write the run's figures (start-up times, VMM memory) as JSON to this file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    /// The guest's network interface (none without --tap).
    #[command(flatten)]
    pub net: NetArgs,
    /// How the command after `--` runs, and what happens around it.
    #[command(flatten)]
    pub cmd: ember_sandbox::session::CommandArgs,
    /// Push the snapshot `--snapshot-on-exit` saves to a remote tier.
    #[command(flatten)]
    pub remote: crate::remote_tier::RemoteArgs,
    /// A command to run in the guest through the agent (over vsock): its stdout and stderr
    /// stream to ember's, and ember exits with its exit code. The guest then shuts down.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn run(args: RunArgs) -> i32 {
    let start = Instant::now();
    let facts = HostFacts::read();
    if !facts.kind().runs_linux() {
        eprintln!(
            "ember: this host's KVM is {} and cannot run a Linux guest; see `ember doctor`, \
             or run ember in the lab: `cargo xtask lab -- ember run …`",
            facts.kind().label()
        );
        return 2;
    }
    let net = match args.net.config() {
        Ok(net) => net,
        Err(e) => {
            eprintln!("ember: {e}");
            return 2;
        }
    };
    if let Err(e) = args.cmd.limits.check_net(net.is_some()) {
        eprintln!("ember: {e}");
        return 2;
    }
    let Some(kernel) = args.kernel.or_else(ember_sandbox::defaults::default_kernel) else {
        eprintln!("ember: no --kernel given and none built (run `cargo xtask kernel`)");
        return 2;
    };
    let read_only_rootfs = args.read_only_rootfs;
    let mut cow = args.cow;
    let rootfs = match (&args.rootfs, &args.initrd) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(_)) => None,
        (None, None) => match ember_sandbox::defaults::default_rootfs() {
            Some(path) => {
                // The bundled image is shared by every run and keyed by its inputs: a guest
                // writes to its own overlay, never to it.
                cow = !read_only_rootfs;
                Some(path)
            }
            None => {
                eprintln!("ember: no --rootfs given and none built (run `cargo xtask rootfs`)");
                return 2;
            }
        },
    };
    for path in [Some(&kernel), rootfs.as_ref(), args.initrd.as_ref()]
        .into_iter()
        .flatten()
    {
        if !Path::new(path).is_file() {
            eprintln!("ember: {} does not exist or is not a file", path.display());
            return 2;
        }
    }
    let mut extra: Vec<String> = Vec::new();
    if rootfs.is_some() {
        extra.push(format!("init={}", ember_agent::AGENT_GUEST_PATH));
    }
    if let Some(cmd) = &args.init_cmd {
        extra.push(format!(
            "{}={}",
            ember_agent::RUN_PARAM,
            ember_agent::encode_run_command(cmd)
        ));
    }
    if let Some(cmdline) = &args.cmdline {
        extra.push(cmdline.clone());
    }
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        rootfs_overlay: (cow && rootfs.is_some()).then(ember_sandbox::defaults::overlay_path),
        rootfs,
        read_only_rootfs,
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        cmdline_extra: (!extra.is_empty()).then(|| extra.join(" ")),
        vsock: None,
        net,
    };
    if !args.command.is_empty() {
        if args.init_cmd.is_some() {
            eprintln!("ember: --init-cmd and a command after -- cannot be combined");
            return 2;
        }
        let remote = match args.remote.open() {
            Ok(remote) => remote,
            Err(e) => {
                eprintln!("ember: {e}");
                return 2;
            }
        };
        let saved = args.cmd.snapshot_on_exit.clone();
        let plan = args.cmd.into_plan(args.command);
        let store_dir = plan.store_dir.clone();
        let code = ember_sandbox::session::run_command(
            config,
            ember_sandbox::session::Origin::Boot,
            plan,
            start,
        );
        return match (remote, saved) {
            (Some(remote), Some(id)) if code == 0 => push_saved(&remote, &store_dir, &id),
            _ => code,
        };
    }
    let options = VmmOptions {
        serial_out: Box::new(std::io::stdout()),
        start,
        disk_rate_limit: args.cmd.limits.disk_rate_limit(),
        net_rate_limits: args.cmd.limits.net_rate_limits(),
        mem_cache: None,
        tap_fd: None,
        partial: None,
    };
    match run_reported(&config, options) {
        Ok((reason, report)) => {
            eprintln!("ember: guest ended ({reason:?}); {}", describe(&report));
            if let Some(path) = &args.report_json {
                if let Err(err) = write_report(path, &report) {
                    eprintln!("ember: cannot write {}: {err}", path.display());
                    return 1;
                }
            }
            if reason.is_reset() {
                0
            } else {
                1
            }
        }
        Err(err) => {
            eprintln!("ember: {err}");
            1
        }
    }
}

fn describe(report: &RunReport) -> String {
    let ms = |us: u64| us as f64 / 1e3;
    let userspace = report
        .to_userspace_us
        .map_or("never".to_string(), |us| format!("{:.1} ms", ms(us)));
    let guest_ms = |us: Option<u64>| us.map_or("–".to_string(), |us| format!("{:.1}", ms(us)));
    let guest = &report.guest;
    format!(
        "first KVM_RUN at {:.1} ms, userspace at {userspace}, ended at {:.1} ms; \
         guest clock started at {} ms; by the guest's clock: kernel ran init at {} ms, \
         agent started at {} ms, ready at {} ms; \
         VMM resident memory outside guest RAM {} KiB (guest RAM resident {} KiB)",
        ms(report.to_first_run_us),
        ms(report.total_us),
        guest_ms(report.guest_clock_started_us),
        guest_ms(guest.kernel_ran_init_us),
        guest_ms(guest.agent_started_us),
        guest_ms(guest.agent_ready_us),
        report.vmm_rss_bytes / 1024,
        report.guest_rss_bytes / 1024
    )
}

fn write_report(path: &Path, report: &RunReport) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(path, json)
}

/// `ember restore`: continue a saved sandbox.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot to continue.
    pub id: String,
    /// How memory arrives: `auto` (default: `file` when the snapshot's memory is
    /// materialised, else `prefetch`), `file` (its materialised memory file mapped as guest
    /// RAM; nothing copied up front), `prefetch` (from the store on first touch, plus the
    /// working set recorded by the snapshot's first restore loaded in bulk), `lazy` (on first
    /// touch only) or `eager` (all of it before the vCPUs start).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(ember_vmm::RestoreMode))]
    pub mode: ember_vmm::RestoreMode,
    /// Same as `--mode eager`.
    #[arg(long, conflicts_with = "mode")]
    pub eager: bool,
    /// The TAP interface for a snapshot whose guest had a network interface (it keeps its
    /// MAC and address).
    #[arg(long)]
    pub tap: Option<String>,
    /// How the command runs, and what happens around it.
    #[command(flatten)]
    pub cmd: ember_sandbox::session::CommandArgs,
    /// Restore from a remote tier a snapshot this host lacks (fetched as the guest runs, then
    /// whole), and push the snapshot `--snapshot-on-exit` saves.
    #[command(flatten)]
    pub remote: crate::remote_tier::RemoteArgs,
    /// The command to run in the restored sandbox.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub fn restore(args: RestoreArgs) -> i32 {
    let start = Instant::now();
    let facts = HostFacts::read();
    if !facts.kind().runs_linux() {
        eprintln!(
            "ember: this host's KVM is {} and cannot run a Linux guest; see `ember doctor`",
            facts.kind().label()
        );
        return 2;
    }
    if let Err(e) = args.cmd.limits.check_net(args.tap.is_some()) {
        eprintln!("ember: {e}");
        return 2;
    }
    let plan = args.cmd.into_plan(args.command);
    let store = match ember_sandbox::defaults::open_store(&plan.store_dir) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("ember: {e}");
            return 1;
        }
    };
    // The guest's shape comes from the snapshot; these are placeholders `Vmm::restore` fills.
    let config = VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        rootfs: None,
        read_only_rootfs: true,
        rootfs_overlay: None,
        vcpus: 1,
        mem_mib: 256,
        cmdline_extra: None,
        vsock: None,
        // The MAC and address are the snapshot's.
        net: args.tap.map(|tap| ember_vmm::NetConfig {
            tap,
            mac: [0x06, 0, 0, 0, 0, 1],
            ipv4: None,
        }),
    };
    let mode = if args.eager {
        ember_vmm::RestoreMode::Eager
    } else {
        args.mode
    };
    let remote = match args.remote.open() {
        Ok(remote) => remote,
        Err(e) => {
            eprintln!("ember: {e}");
            return 2;
        }
    };
    let fetching = match &remote {
        Some(remote) if store.load_manifest(&args.id).is_err() => {
            match crate::remote_tier::prepare(remote, &store, &args.id) {
                Ok(fetching) => Some(fetching),
                Err(e) => {
                    eprintln!("ember: {e}");
                    return 1;
                }
            }
        }
        _ => None,
    };
    let (lazy, partial) = match fetching {
        Some(f) => (Some(f.lazy), Some(Box::new(f.partial))),
        None => (None, None),
    };
    let saved = plan.snapshot_on_exit.clone();
    let store_dir = plan.store_dir.clone();
    let origin = ember_sandbox::session::Origin::Restore {
        store: store.clone(),
        id: args.id,
        mode,
        partial,
    };
    let code = ember_sandbox::session::run_command(config, origin, plan, start);
    let Some(remote) = remote else {
        return code;
    };
    if let Some(lazy) = lazy {
        if let Err(e) = crate::remote_tier::complete(&remote, &lazy, &store) {
            eprintln!("ember: fetching the rest of the snapshot: {e}");
            return if code == 0 { 1 } else { code };
        }
    }
    match saved {
        Some(id) if code == 0 => push_saved(&remote, &store_dir, &id),
        _ => code,
    }
}

/// Pushes the snapshot a command saved on exit; ember's exit code.
fn push_saved(remote: &ember_remote::Remote, store_dir: &Path, id: &str) -> i32 {
    let pushed = ember_sandbox::defaults::open_store(store_dir)
        .map_err(|e| e.to_string())
        .and_then(|store| crate::remote_tier::push(remote, &store, id).map_err(|e| e.to_string()));
    match pushed {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ember: pushing {id}: {e}");
            1
        }
    }
}

/// The guest's network interface on `ember run`.
#[derive(clap::Args, Debug, Default)]
pub struct NetArgs {
    /// Give the guest a network interface (`eth0`) on this TAP interface, created if missing
    /// (which needs CAP_NET_ADMIN). Without it the guest has no network at all.
    #[arg(long)]
    pub tap: Option<String>,
    /// The guest's MAC address (default: a random locally administered one).
    #[arg(long, requires = "tap")]
    pub mac: Option<String>,
    /// The guest's IPv4 address and prefix, e.g. 10.0.2.2/24, set by its kernel at boot.
    #[arg(long, requires = "tap")]
    pub guest_ip: Option<String>,
    /// The guest's default gateway.
    #[arg(long, requires = "guest_ip")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The guest's name server (in its /proc/net/pnp).
    #[arg(long, requires = "guest_ip")]
    pub dns: Option<std::net::Ipv4Addr>,
}

impl NetArgs {
    /// The network device these options ask for, checked.
    pub fn config(&self) -> Result<Option<ember_vmm::NetConfig>, String> {
        let Some(tap) = &self.tap else {
            return Ok(None);
        };
        let mac = match &self.mac {
            Some(text) => ember_vmm::parse_mac(text).ok_or_else(|| {
                format!("--mac {text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")
            })?,
            None => ember_sandbox::defaults::random_mac(),
        };
        let ipv4 = match &self.guest_ip {
            None => None,
            Some(text) => {
                let bad = || {
                    format!(
                        "--guest-ip {text:?} is not an IPv4 address with a prefix (10.0.2.2/24)"
                    )
                };
                let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
                Some(ember_vmm::GuestIpv4 {
                    address: address.parse().map_err(|_| bad())?,
                    prefix_len: prefix.parse().map_err(|_| bad())?,
                    gateway: self.gateway,
                    dns: self.dns,
                })
            }
        };
        let config = ember_vmm::NetConfig {
            tap: tap.clone(),
            mac,
            ipv4,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(Some(config))
    }
}
