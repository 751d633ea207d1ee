//! `cargo xtask`: builds ember's guest kernel and images, runs the lab, the tests and benches.

mod deps;
mod kernel;
mod lab;
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
        #[arg(long, default_value_t = 2700)]
        timeout_s: u64,
        /// Do not build `ember` before starting.
        #[arg(long)]
        no_build: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
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
        Cmd::Lab { mem_mib, cpus, timeout_s, no_build, command } => {
            if !no_build {
                util::run(util::cargo().args(["build", "--quiet", "-p", "ember-api", "--bin", "ember"]))?;
            }
            let opts = lab::LabOptions {
                mem_mib,
                cpus,
                timeout: std::time::Duration::from_secs(timeout_s),
                ..Default::default()
            };
            lab::run_in_lab(&command, &opts)
        }
    }
}
