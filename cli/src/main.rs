//! `ember`: the command line of the ember microVM monitor.

mod doctor;
mod files;
mod images;
mod metrics;
mod network;
mod remote;
mod remote_tier;
mod run;
mod shell;
mod store_cmd;
mod template;

use ember_service as service;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "ember: a snapshot-centric microVM monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this host's KVM: hardware, PVM-backed or absent; run a tiny probe guest.
    /// Exits 0 only where a Linux guest can run.
    Doctor,
    /// Boot a guest in the foreground; its console goes to stdout. Exits 0 when the guest
    /// resets (its way to stop without ACPI), non-zero on any VMM error.
    Run(Box<run::RunArgs>),
    /// Continue a saved sandbox (memory arrives lazily through userfaultfd) and run a
    /// command in it.
    Restore(Box<run::RestoreArgs>),
    /// List the snapshots in the store (`--json` for a JSON array), or delete one:
    /// `ember snapshots delete ID`.
    Snapshots(store_cmd::SnapshotsArgs),
    /// Inspect and maintain the snapshot store: `stats`, `verify` (re-hash every object),
    /// `gc` (reclaim what no snapshot uses).
    Store(store_cmd::StoreArgs),
    /// List the runtime images built on this host (or, with `--socket`, those a service
    /// offers).
    Images(images::ImagesArgs),
    /// Build, list and remove templates (a runtime plus steps, snapshotted ready; `ember
    /// create --template NAME` restores one).
    Template(template::TemplateArgs),
    /// Run the ember service: the HTTP/JSON API on a Unix socket, one VMM process per
    /// sandbox.
    Serve(service::ServeArgs),
    /// Create a sandbox (boot, or restore `--snapshot`) through the service; prints its id.
    Create(remote::CreateArgs),
    /// List the service's sandboxes.
    Ls(remote::LsArgs),
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec(remote::ExecArgs),
    /// An interactive terminal in a sandbox (default: its login shell); `--attach PTY_ID`
    /// connects to one that runs. Exits with the command's exit code.
    Shell(shell::ShellArgs),
    /// Copy a file into (`HOST SANDBOX:/path`) or out of (`SANDBOX:/path HOST`) a sandbox;
    /// `-r` copies folders.
    Cp(remote::CpArgs),
    /// A sandbox's files: `ls`, `stat`, `rm [-r]`, `mv`, `watch [-r]` on SANDBOX:/path.
    Files(files::FilesArgs),
    /// Pause a sandbox's vCPUs.
    Pause(remote::IdArgs),
    /// Resume a paused sandbox.
    Resume(remote::IdArgs),
    /// One sample of a sandbox's CPU, memory, disk and network (guest and host side).
    Metrics(remote::IdArgs),
    /// Replace an egress sandbox's allow- and deny-lists (networks and domain names).
    Network(network::NetworkArgs),
    /// Save a sandbox as a snapshot; prints the snapshot's id.
    Snapshot(remote::SnapshotArgs),
    /// Start `--count` sandboxes from one snapshot at once; prints their ids.
    Fork(remote::ForkArgs),
    /// Stop and delete sandboxes.
    Rm(remote::RmArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Doctor => doctor::run(),
        Command::Run(args) => run::run(*args),
        Command::Restore(args) => run::restore(*args),
        Command::Snapshots(args) => match &args.service.socket {
            Some(_) if args.action.is_none() && args.store.is_none() => {
                remote::snapshots(&args.service, args.json)
            }
            _ => store_cmd::snapshots(args),
        },
        Command::Store(args) => store_cmd::store(args),
        Command::Images(args) => images::run(args),
        Command::Template(args) => template::run(args),
        Command::Serve(args) => service::serve(args),
        Command::Create(args) => remote::create(args),
        Command::Ls(args) => remote::ls(args),
        Command::Exec(args) => remote::exec(args),
        Command::Shell(args) => shell::shell(args),
        Command::Cp(args) => remote::cp(args),
        Command::Files(args) => files::run(args),
        Command::Pause(args) => remote::pause(args),
        Command::Metrics(args) => metrics::metrics(args),
        Command::Network(args) => network::network(args),
        Command::Resume(args) => remote::resume(args),
        Command::Snapshot(args) => remote::snapshot(args),
        Command::Fork(args) => remote::fork(args),
        Command::Rm(args) => remote::rm(args),
    };
    std::process::exit(code);
}
