//! Fuzzing with cargo-fuzz (libFuzzer, nightly, AddressSanitizer): the targets in `fuzz/`, each
//! started from its seed corpus in `fuzz/corpus/<target>`. New inputs a run finds go to
//! `target/fuzz-corpus/<target>` (not into the repository); a crash leaves its input in
//! `fuzz/artifacts/<target>/` and fails the run.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_root, output, run, target_dir, workspace_root, InputHash};

/// Every fuzz target (a `[[bin]]` of `fuzz/Cargo.toml`).
pub const TARGETS: &[&str] = &[
    "virtio_block",
    "vsock_packets",
    "net_frames",
    "agent_frames",
    "snapshot_state",
    "store_files",
    "staged_snapshot",
    "api_requests",
];

/// rustup's `cargo` with the nightly toolchain, free of the variables the stable `cargo` that
/// runs xtask set (they would pin the toolchain and its tools).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(workspace_root());
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Installs the nightly toolchain (rustup) and cargo-fuzz (into `~/.cargo/bin`) unless they
/// are there.
fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = nightly_cargo()
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly {
        eprintln!("fuzz: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain with rustup")?;
    }
    let present = nightly_cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz");
    run(nightly_cargo().args(["install", "--locked", "cargo-fuzz"])).context(
        "installing cargo-fuzz (needs the nightly toolchain: rustup toolchain install nightly)",
    )
}

/// The options `cargo fuzz build` and `cargo fuzz run` share (a run with other options would
/// build everything again). The target folder is a cache outside the repository, keyed by the
/// nightly compiler (artifacts of another compiler cannot be reused): a new clone builds only
/// ember's own crates, and a changed lock file only the dependencies it changed. (More
/// codegen units than cargo-fuzz's one did not make a fresh build faster on a 2-core host.)
fn build_options() -> Result<Vec<String>> {
    // Computed once: a stale lock file that `cargo fuzz build` brings up to date must not send
    // the runs after it to another (empty) folder.
    static OPTIONS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    if let Some(options) = OPTIONS.get() {
        return Ok(options.clone());
    }
    let compiler = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let mut hash = InputHash::new("fuzz-target-v2");
    hash.add("compiler", compiler.as_bytes());
    let folder = cache_root().join("fuzz-target");
    let dir = folder.join(hash.key());
    // Only the current key's build is kept: the others were for an older compiler.
    for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
        if entry.path() != dir {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    std::fs::create_dir_all(&dir)?;
    Ok(OPTIONS
        .get_or_init(|| vec!["--target-dir".into(), dir.display().to_string()])
        .clone())
}

/// Builds every target (as `cargo fuzz run` will: the runs reuse this build). The fuzz crate is
/// outside the workspace, so neither clippy nor the host tests compile it: this is what catches
/// a changed type there early.
pub fn build_targets() -> Result<()> {
    ensure_cargo_fuzz()?;
    run(nightly_cargo()
        .args(["fuzz", "build"])
        .args(build_options()?))
    .context("building the fuzz targets")
}

/// Runs each target (or `only`) for `seconds`; fails if any finds a crash.
pub fn run_targets(seconds: u64, only: Option<&str>) -> Result<i32> {
    let targets: Vec<&str> = match only {
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!(
            "no fuzz target {name:?}; the targets: {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz()?;
    let options = build_options()?;
    let mut crashed = Vec::new();
    for target in targets {
        let found: PathBuf = target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let seeds = workspace_root().join("fuzz/corpus").join(target);
        eprintln!("fuzz: {target} for {seconds} s");
        let status = nightly_cargo()
            .args(["fuzz", "run", target])
            .args(&options)
            .arg(&found)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                // A slow input is a finding too (a guest must not stall the VMM).
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ])
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        if !status.success() {
            crashed.push(target);
        }
    }
    if crashed.is_empty() {
        Ok(0)
    } else {
        eprintln!(
            "fuzz: crashes in {} (inputs in fuzz/artifacts/)",
            crashed.join(", ")
        );
        Ok(1)
    }
}
