//! Guest images: the static agent, a small initramfs (busybox + agent) and an ext4 rootfs
//! from Debian bookworm (python3, nodejs, iperf3) with the agent as init. All cached by input hash.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{
    cache_root, cargo, output, publish, run, run_logged, sh_quote, target_dir, InputHash,
};

pub use ember_agent::AGENT_GUEST_PATH;
const SUITE: &str = "bookworm";
const INCLUDE: &str = "python3,nodejs,ca-certificates,iperf3,procps,vim-tiny";
const BASE_RECIPE: &str =
    "rootfs-base-v1: debootstrap --variant=minbase, apt lists and caches removed";
const IMAGE_RECIPE: &str =
    "rootfs-image-v2: mkfs.ext4 -d, 1536 MiB, /etc/resolv.conf -> /proc/net/pnp";
const INITRAMFS_RECIPE: &str = "initramfs-v1: busybox applets + agent as /init";
const ROOTFS_SIZE_MIB: u64 = 1536;

/// Builds the agent as a static binary (the guest has no Rust toolchain libraries to share).
pub fn agent() -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    run(cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "ember-agent",
            "--target",
            TARGET,
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        ))?;
    let path = target_dir().join(TARGET).join("release/ember-agent");
    if has_interpreter(&fs::read(&path)?) {
        bail!(
            "{} is dynamically linked; the guest needs a static agent",
            path.display()
        );
    }
    Ok(path)
}

/// Whether an ELF64 file asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    let read = |off: usize, len: usize| elf.get(off..off + len);
    let u16_at = |off| read(off, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |off| read(off, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |off| {
        read(off, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..phnum).any(|i| u32_at(phoff as usize + i * phentsize) == Some(3))
}

/// Builds (or finds) the initramfs: busybox with its applets, the agent as /init.
pub fn initramfs() -> Result<PathBuf> {
    let agent = agent()?;
    let mut hash = InputHash::new(INITRAMFS_RECIPE);
    hash.add_file("agent", &agent)?
        .add_file("busybox", Path::new("/bin/busybox"))?;
    let dir = cache_root().join("initramfs").join(hash.key());
    let image = dir.join("initramfs.cpio.gz");
    if image.exists() {
        return Ok(image);
    }
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for sub in [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc",
    ] {
        fs::create_dir_all(root.join(sub))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    let applets = output(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        symlink("busybox", root.join("bin").join(applet)).ok();
    }
    fs::copy(&agent, root.join(AGENT_GUEST_PATH.trim_start_matches('/')))?;
    symlink(AGENT_GUEST_PATH, root.join("init"))?;
    fs::write(root.join("etc/hostname"), "ember\n")?;
    let tmp = dir.join("initramfs.cpio.gz.tmp");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio --quiet -o -H newc -R 0:0 | gzip -6 > {}",
        sh_quote(&tmp.to_string_lossy())
    )))?;
    publish(&tmp, &image)?;
    fs::remove_dir_all(&root).ok();
    prune_siblings(&dir, 3);
    Ok(image)
}

/// The Debian mirror this machine's apt uses (debootstrap must use a reachable one).
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("EMBER_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut sources = String::new();
    for file in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        sources.push_str(&fs::read_to_string(file).unwrap_or_default());
        sources.push('\n');
    }
    sources
        .split_whitespace()
        .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// A debootstrap tree of `suite` with the `include` packages (comma-separated), cached by
/// suite, package list and mirror.
pub fn debootstrap_tree(suite: &str, include: &str) -> Result<PathBuf> {
    let mirror = debian_mirror();
    let mut hash = InputHash::new(BASE_RECIPE);
    hash.add("suite", suite.as_bytes())
        .add("include", include.as_bytes())
        .add("mirror", mirror.as_bytes());
    let dir = cache_root().join("rootfs-base").join(hash.key());
    let tree = dir.join("tree");
    let complete = dir.join("complete");
    if complete.exists() {
        return Ok(tree);
    }
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    fs::create_dir_all(&dir)?;
    eprintln!("  debootstrap {suite} (minbase + {include}) from {mirror}: a few minutes");
    run_logged(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={include}"), suite])
            .arg(&tree)
            .arg(&mirror),
        &dir.join("debootstrap.log"),
        "debootstrap",
    )?;
    // Slim the image: package caches and lists are of no use inside a sandbox.
    for sub in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let path = tree.join(sub);
        for entry in fs::read_dir(&path).into_iter().flatten().flatten() {
            if entry.path().is_file() {
                fs::remove_file(entry.path()).ok();
            }
        }
    }
    fs::write(&complete, b"")?;
    Ok(tree)
}

/// Builds (or finds) the ext4 rootfs image with the agent installed as init.
pub fn rootfs() -> Result<PathBuf> {
    let tree = debootstrap_tree(SUITE, INCLUDE)?;
    let agent = agent()?;
    let mut hash = InputHash::new(IMAGE_RECIPE);
    hash.add("base", tree.to_string_lossy().as_bytes())
        .add_file("agent", &agent)?;
    let dir = cache_root().join("rootfs").join(hash.key());
    let image = dir.join("rootfs.ext4");
    if image.exists() {
        return Ok(image);
    }
    let staging = fresh_copy(&tree, &dir)?;
    install_agent_and_network(&staging, &agent)?;
    let tmp = dir.join("rootfs.ext4.tmp");
    make_ext4(&staging, &tmp, ROOTFS_SIZE_MIB)?;
    publish(&tmp, &image)?;
    fs::remove_dir_all(&staging).ok();
    prune_siblings(&dir, 3);
    Ok(image)
}

/// A fresh copy of `tree` as `dir/staging` (an earlier, unfinished one is removed first).
pub fn fresh_copy(tree: &Path, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let staging = dir.join("staging");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(tree)
        .arg(&staging))?;
    Ok(staging)
}

/// Installs the agent as init, the host name, and a resolv.conf that is the name server the
/// kernel was given at boot (`ip=…:dns`), as every resolver reads it.
pub fn install_agent_and_network(staging: &Path, agent: &Path) -> Result<()> {
    fs::copy(
        agent,
        staging.join(AGENT_GUEST_PATH.trim_start_matches('/')),
    )?;
    fs::write(staging.join("etc/hostname"), "ember\n")?;
    fs::write(
        staging.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 ember\n::1 localhost\n",
    )?;
    let resolv = staging.join("etc/resolv.conf");
    fs::remove_file(&resolv).ok();
    symlink("/proc/net/pnp", &resolv)?;
    Ok(())
}

/// Writes the sparse ext4 image `out` of `size_mib` holding the tree `staging`.
pub fn make_ext4(staging: &Path, out: &Path, size_mib: u64) -> Result<()> {
    fs::remove_file(out).ok();
    eprintln!("  mkfs.ext4 -d ({size_mib} MiB, sparse)");
    run(Command::new("mkfs.ext4")
        .stdout(std::process::Stdio::null())
        .args(["-q", "-F", "-L", "ember-root", "-m", "0", "-d"])
        .arg(staging)
        .arg(out)
        .arg(format!("{size_mib}M")))
}

/// Keeps the `keep` most recently built entries beside `current` (every agent change makes a
/// new image; without this the cache grows by one rootfs per change).
pub fn prune_siblings(current: &Path, keep: usize) {
    let Some(parent) = current.parent() else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path() != current)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    entries.sort();
    let excess = (entries.len() + 1).saturating_sub(keep);
    for (_, path) in entries.into_iter().take(excess) {
        fs::remove_dir_all(&path).ok();
    }
}

/// Lists the names in a folder of an ext4 image without mounting it (debugfs).
pub fn ext4_list(image: &Path, dir: &str) -> Result<Vec<String>> {
    let out = output(
        Command::new("debugfs")
            .args(["-R", &format!("ls -p {dir}")])
            .arg(image),
    )
    .with_context(|| format!("debugfs on {}", image.display()))?;
    // `ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
    Ok(out
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_and_static_elves() {
        // This test binary itself is dynamically linked.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&me));
        assert!(has_interpreter(b"not an elf"));
    }
}
