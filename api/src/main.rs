//! `ember`: the command line of the ember microVM monitor.

mod command;
mod doctor;
mod run;
mod store_cmd;

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
        Command::Snapshots(args) => store_cmd::snapshots(args),
        Command::Store(args) => store_cmd::store(args),
    };
    std::process::exit(code);
}
