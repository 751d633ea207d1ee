//! ember-vmm as a library: boot a guest, run a command in it through its agent, save it into a
//! snapshot store, and restore it in each memory mode to find the command's file still there.
//!
//! ```sh
//! cargo run -p ember-vmm --example sandbox_lifecycle -- KERNEL ROOTFS
//! ```
//!
//! `KERNEL` and `ROOTFS` default to `$EMBER_KERNEL` and `$EMBER_ROOTFS` (what `cargo xtask
//! kernel` and `cargo xtask rootfs` build). It needs a host whose KVM runs Linux guests (on
//! one that does not: `cargo xtask lab -- target/debug/examples/sandbox_lifecycle`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_agent::client::AgentClient;
use ember_agent::protocol::{ExecRequest, AGENT_VSOCK_PORT};
use ember_snapshot_store::{MemCache, Store};
use ember_vmm::{RestoreMode, VmConfig, Vmm, VmmOptions, VsockConfig};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let kernel = args
        .next()
        .or_else(|| std::env::var_os("EMBER_KERNEL").map(PathBuf::from))
        .ok_or("give a kernel (or set EMBER_KERNEL)")?;
    let rootfs = args
        .next()
        .or_else(|| std::env::var_os("EMBER_ROOTFS").map(PathBuf::from))
        .ok_or("give a rootfs (or set EMBER_ROOTFS)")?;
    let dir = std::env::temp_dir().join(format!("ember-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = lifecycle(&kernel, &rootfs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The guest: its agent as init, the rootfs behind a private copy-on-write overlay, and a
/// vsock device whose host side is a Unix socket in `dir`.
fn guest(kernel: &Path, rootfs: &Path, dir: &Path, name: &str) -> VmConfig {
    VmConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        rootfs: Some(rootfs.to_path_buf()),
        read_only_rootfs: false,
        rootfs_overlay: Some(dir.join(format!("{name}.overlay"))),
        vcpus: 1,
        mem_mib: 256,
        cmdline_extra: Some(format!("init={}", ember_agent::AGENT_GUEST_PATH)),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join(format!("{name}.vsock")),
        }),
        net: None,
    }
}

fn options(cache: &MemCache) -> VmmOptions {
    VmmOptions {
        // The guest's console is not this example's business.
        serial_out: Box::new(std::io::sink()),
        mem_cache: Some(cache.clone()),
        ..Default::default()
    }
}

fn sh(agent: &AgentClient, script: &str) -> Result<String, Error> {
    let out = agent.exec_collect(ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    })?;
    Ok(String::from_utf8(out.stdout)?)
}

fn agent_of(config: &VmConfig) -> Result<AgentClient, Error> {
    let socket = &config
        .vsock
        .as_ref()
        .ok_or("the guest has no vsock")?
        .uds_path;
    Ok(AgentClient::wait_ready(
        socket,
        AGENT_VSOCK_PORT,
        Duration::from_secs(180),
    )?)
}

fn lifecycle(kernel: &Path, rootfs: &Path, dir: &Path) -> Result<(), Error> {
    let store = Arc::new(Store::open(dir.join("store"))?);
    let cache = MemCache::new(dir.join("mem-cache"));

    // Boot, and leave a file behind.
    let started = Instant::now();
    let config = guest(kernel, rootfs, dir, "booted");
    let vmm = Vmm::build(&config, options(&cache))?;
    vmm.resume()?;
    let agent = agent_of(&config)?;
    let wrote = sh(&agent, "echo saved at boot > /root/note && cat /root/note")?;
    println!("booted in {:?}: {}", started.elapsed(), wrote.trim());

    // Save it. Closing the agent connection first lets the restores skip the vsock
    // transport reset (the snapshot records that it held no connections).
    drop(agent);
    vmm.wait_for_vsock_idle(Duration::from_secs(1));
    let manifest = vmm.snapshot(&store, "example")?;
    vmm.shutdown()?;
    cache.materialise(&store, &manifest)?;
    println!(
        "saved snapshot {} ({} MiB of memory)",
        manifest.id,
        manifest.memory.size_bytes >> 20
    );

    // Restore it in each mode; the guest's shape comes from the snapshot, the host side
    // (sockets, overlay) from the config given.
    for mode in [
        RestoreMode::File,
        RestoreMode::Prefetch,
        RestoreMode::Lazy,
        RestoreMode::Eager,
    ] {
        let started = Instant::now();
        let config = guest(kernel, rootfs, dir, &format!("{mode}"));
        let vmm = Vmm::restore(&config, store.clone(), "example", options(&cache), mode)?;
        vmm.resume()?;
        let read = sh(&agent_of(&config)?, "cat /root/note")?;
        println!(
            "restored ({mode}) in {:?}: {}",
            started.elapsed(),
            read.trim()
        );
        if read != wrote {
            return Err(format!("the restored guest read {read:?}, not {wrote:?}").into());
        }
        vmm.shutdown()?;
    }
    Ok(())
}
