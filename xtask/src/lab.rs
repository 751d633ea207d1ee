//! The lab: an L1 VM under QEMU TCG with an emulated AMD CPU that has SVM, running Debian's
//! kernel with `kvm_amd`, so that `/dev/kvm` inside it has hardware-virtualization semantics
//! on any Linux host (this project's own hosts only have a PVM-backed `/dev/kvm`).
//!
//! The L1 sees the host's root filesystem read-only over 9p and runs the command chrooted
//! into it, so every host binary (and its libraries) works unchanged; the workspace, the
//! artifact cache and a per-run folder are shared read-write at their host paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{
    cache_root, output, publish, run, sh_quote, target_dir, workspace_root, InputHash,
};

/// Modules the L1 loads, in any order (dependencies are resolved from the modules).
pub const MODULES: &[&str] = &[
    // the 9p shares
    "virtio_pci",
    // the optional uplink (QEMU's user-mode network)
    "virtio_net",
    "9pnet_virtio",
    "9p",
    // KVM with AMD SVM (nested paging comes from the emulated CPU)
    "kvm_amd",
    // sandbox networking: TAPs, veth pairs, and nftables with NAT and connection tracking
    // (the L1 cannot load modules on demand: its userspace is the host's)
    "tun",
    "veth",
    // libcrc32c (nf_tables, nf_conntrack) needs a crc32c implementation at load: a soft
    // dependency, so not found by the dependency walk
    "crc32c_generic",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
];

const RECIPE: &str = "lab-v2";
const INIT_SCRIPT: &str = include_str!("lab_init.sh");

/// Options of one lab run.
pub struct LabOptions {
    pub mem_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// Extra `KEY=VALUE` pairs for the command's environment.
    pub env: Vec<(String, String)>,
    /// An uplink through QEMU's user-mode network (NAT through this host's sockets): the
    /// L1's `eth0`, so that sandboxes with an egress network reach what this host reaches.
    /// Off by default: tests keep to servers they start themselves.
    pub uplink: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            mem_mib: 3072,
            cpus: 2,
            timeout: Duration::from_secs(30 * 60),
            env: Vec::new(),
            uplink: false,
        }
    }
}

/// The L1 kernel and its initramfs, from the cache.
pub struct LabImage {
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    /// The L1 kernel's text symbols (from its /proc/kallsyms: Debian ships only a stub
    /// System.map), to name where a wedged L1 stopped; written by the first lab run.
    pub kallsyms: PathBuf,
}

/// The Debian kernel package the L1 boots: the one `linux-image-amd64` currently points to.
fn l1_kernel_package() -> Result<String> {
    let lookup = || output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
    // A machine whose package lists were never fetched (or were cleaned) knows no kernels.
    let deps = match lookup() {
        Ok(deps) if deps.contains("Depends: linux-image-") => deps,
        _ => {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            lookup()?
        }
    };
    deps.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-amd64"))
        .map(str::to_string)
        .context(
            "cannot find the kernel package that linux-image-amd64 depends on (apt-get update?)",
        )
}

/// Builds (or finds in the cache) the L1 kernel and initramfs.
pub fn ensure_image() -> Result<LabImage> {
    let package = l1_kernel_package()?;
    let version = output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .unwrap_or_default();
    let mut hash = InputHash::new(RECIPE);
    hash.add("package", package.as_bytes())
        .add("version", version.as_bytes());
    hash.add("modules", MODULES.join(",").as_bytes())
        .add("init", INIT_SCRIPT.as_bytes());
    hash.add_file("busybox", Path::new("/bin/busybox"))?;
    let dir = cache_root().join("lab").join(hash.key());
    let image = LabImage {
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio.gz"),
        kallsyms: dir.join("kallsyms"),
    };
    if image.vmlinuz.exists() && image.initramfs.exists() {
        return Ok(image);
    }

    eprintln!("  lab: fetching {package} {version}");
    let work = dir.join("work");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .current_dir(&work)
        .args(["download", "-qq", &package])
        .stdout(Stdio::null()))?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let unpacked = work.join("pkg");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;

    let boot = unpacked.join("boot");
    let vmlinuz = fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;

    // The initramfs: busybox, the init script, and the modules in dependency order.
    let root = work.join("initramfs");
    for sub in ["bin", "dev", "proc", "sys", "host", "labrun", "lib/modules"] {
        fs::create_dir_all(root.join(sub))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    write_executable(&root.join("init"), INIT_SCRIPT)?;
    let modules = resolve_modules(&unpacked.join("lib/modules"), MODULES)?;
    let mut order = String::new();
    for (name, path) in &modules {
        fs::copy(path, root.join("lib/modules").join(format!("{name}.ko")))?;
        order.push_str(name);
        order.push('\n');
    }
    fs::write(root.join("lib/modules/order"), order)?;
    let tmp = dir.join("initramfs.cpio.gz.tmp");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio --quiet -o -H newc | gzip -1 > {}",
        sh_quote(&tmp.to_string_lossy())
    )))?;
    publish(&tmp, &image.initramfs)?;
    let tmp = dir.join("vmlinuz.tmp");
    fs::copy(&vmlinuz, &tmp)?;
    publish(&tmp, &image.vmlinuz)?;
    fs::remove_dir_all(&work).ok();
    Ok(image)
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Module names use `_` and `-` interchangeably; `depends=` uses `_`.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// Finds the wanted modules and everything they depend on, in load order.
fn resolve_modules(modules_root: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.strip_suffix(".ko") {
                    index.insert(module_key(stem), path.clone());
                }
            }
        }
    }
    let mut ordered = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        ordered: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<()> {
        let key = module_key(name);
        if seen.contains(&key) {
            return Ok(());
        }
        if depth > 32 {
            bail!("module dependencies nest too deeply at {name}");
        }
        let path = index
            .get(&key)
            .with_context(|| format!("no module {name} in the L1 kernel"))?;
        for dep in module_depends(path)? {
            visit(&dep, index, seen, ordered, depth + 1)?;
        }
        seen.insert(key.clone());
        ordered.push((key, path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(name, &index, &mut seen, &mut ordered, 0)?;
    }
    Ok(ordered)
}

/// The `depends=` entry of a module's modinfo section.
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path)?;
    let needle = b"\0depends=";
    let Some(start) = bytes.windows(needle.len()).position(|w| w == needle) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[start + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

/// Environment variables passed from the host into the lab command.
fn passed_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("EMBER_")
                || k.starts_with("RUST_")
                || k.starts_with("CARGO_")
                || matches!(k.as_str(), "CI" | "TERM" | "NO_COLOR" | "LANG")
        })
        .collect()
}

/// Runs `argv` inside the lab and returns its exit status (128+N for a signal, like sh).
/// Its stdout and stderr stream to ours as it runs.
pub fn run_in_lab(argv: &[String], opts: &LabOptions) -> Result<i32> {
    if argv.is_empty() {
        bail!("no command given: cargo xtask lab -- CMD ARGS…");
    }
    let image = ensure_image()?;
    let run_dir = tempdir("ember-lab")?;

    // Paths shared read-write at their host paths (parents first so nesting works).
    let mut rw: Vec<PathBuf> = vec![workspace_root(), cache_root(), target_dir()];
    rw.iter_mut()
        .for_each(|p| *p = p.canonicalize().unwrap_or_else(|_| p.clone()));
    rw.sort();
    rw.dedup();
    // A folder inside another shared folder is reached through that one already.
    let rw: Vec<PathBuf> = rw
        .iter()
        .filter(|p| p.is_dir() && !rw.iter().any(|q| q != *p && p.starts_with(q)))
        .cloned()
        .collect();

    let cwd = std::env::current_dir()?;
    let target_bin = target_dir().join("debug");
    let path = format!(
        "{}:{}",
        target_bin.display(),
        std::env::var("PATH")
            .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into())
    );
    let mut script = String::from("# written by cargo xtask lab\n");
    script.push_str(&format!(
        "cd {} || exit 125\n",
        sh_quote(&cwd.to_string_lossy())
    ));
    let mut env = passed_env();
    env.extend(opts.env.iter().cloned());
    env.push(("PATH".into(), path));
    env.push(("HOME".into(), "/tmp".into()));
    env.push(("TMPDIR".into(), "/tmp".into()));
    env.push(("EMBER_IN_LAB".into(), "1".into()));
    if opts.uplink {
        env.push(("EMBER_LAB_UPLINK".into(), "1".into()));
    }
    // HOME differs inside the lab: name the artifact cache explicitly.
    env.push(("EMBER_CACHE_DIR".into(), cache_root().display().to_string()));
    for (k, v) in &env {
        script.push_str(&format!("export {}={}\n", k, sh_quote(v)));
    }
    script.push_str("exec");
    for arg in argv {
        script.push(' ');
        script.push_str(&sh_quote(arg));
    }
    script.push('\n');
    fs::write(run_dir.join("cmd.sh"), script)?;
    let mut mounts = String::new();
    for (i, p) in rw.iter().enumerate() {
        mounts.push_str(&format!("rw{i} {}\n", p.display()));
    }
    fs::write(run_dir.join("mounts"), mounts)?;
    for name in ["stdout", "stderr"] {
        fs::write(run_dir.join(name), b"")?;
    }
    if !image.kallsyms.exists() {
        fs::write(run_dir.join("want-kallsyms"), b"")?;
    }
    if opts.uplink {
        fs::write(run_dir.join("uplink"), b"")?;
    }

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,+svm",
    ])
    .args([
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &opts.mem_mib.to_string(),
    ])
    .args(["-display", "none", "-no-reboot", "-nic"])
    .arg(if opts.uplink {
        "user,model=virtio-net-pci"
    } else {
        "none"
    })
    .arg("-serial")
    .arg(format!("file:{}", run_dir.join("console.log").display()))
    // A human monitor on a socket, asked where the vCPUs are when the L1 wedges.
    .arg("-monitor")
    .arg(format!(
        "unix:{},server=on,wait=off",
        run_dir.join("monitor").display()
    ))
    .arg("-kernel")
    .arg(&image.vmlinuz)
    .arg("-initrd")
    .arg(&image.initramfs)
    .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 nokaslr"])
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=labrun,security_model=none",
        run_dir.display()
    ));
    for (i, p) in rw.iter().enumerate() {
        qemu.arg("-virtfs").arg(format!(
            "local,path={},mount_tag=rw{i},security_model=none,multidevs=remap",
            p.display()
        ));
    }
    qemu.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask deps)")?;

    let done = Arc::new(AtomicBool::new(false));
    let followers: Vec<_> = [("stdout", true), ("stderr", false)]
        .into_iter()
        .map(|(name, to_stdout)| {
            let path = run_dir.join(name);
            let done = done.clone();
            std::thread::spawn(move || follow(&path, to_stdout, &done))
        })
        .collect();

    let mut last_check = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        // A wedged L1 (nested KVM under TCG can soft-lock or stop dead) never finishes on its
        // own: give up at once rather than at the timeout, and say why.
        if last_check.elapsed() > Duration::from_secs(5) {
            last_check = Instant::now();
            let why = l1_failure(&run_dir.join("console.log"))
                .or_else(|| heartbeat_lost(&run_dir.join("heartbeat"), started.elapsed()));
            if let Some(why) = why {
                let cpus = l1_vcpus(&run_dir.join("monitor"), &image.kallsyms);
                child.kill().ok();
                child.wait().ok();
                done.store(true, Ordering::SeqCst);
                return Err(LabFailure::L1Failed(format!(
                    "{why}; L1 vCPUs: {cpus}; L1 console:\n{}",
                    crate::util::tail_lines(&run_dir.join("console.log"), 20)
                ))
                .into());
            }
        }
        if started.elapsed() > opts.timeout {
            let cpus = l1_vcpus(&run_dir.join("monitor"), &image.kallsyms);
            child.kill().ok();
            child.wait().ok();
            done.store(true, Ordering::SeqCst);
            bail!(
                "lab command timed out after {:?}; L1 vCPUs: {cpus}; L1 console:\n{}",
                opts.timeout,
                crate::util::tail_lines(&run_dir.join("console.log"), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    done.store(true, Ordering::SeqCst);
    for f in followers {
        f.join().ok();
    }
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut qemu_err).ok();
    }
    if run_dir.join("kallsyms").exists() && !image.kallsyms.exists() {
        let tmp = image.kallsyms.with_extension("tmp");
        if fs::copy(run_dir.join("kallsyms"), &tmp).is_ok() {
            let _ = publish(&tmp, &image.kallsyms);
        }
    }
    let rc = fs::read_to_string(run_dir.join("rc")).ok();
    let console = crate::util::tail_lines(&run_dir.join("console.log"), 40);
    let rc = match rc.as_deref().map(str::trim).map(str::parse::<i32>) {
        Some(Ok(rc)) => rc,
        // The L1 died before the command finished (a kernel panic ends QEMU at once with
        // -no-reboot): the lab's failure, not the command's.
        _ => {
            return Err(LabFailure::L1Failed(format!(
                "the lab ended without the command's exit status (qemu {status}); qemu said: {}\nL1 console:\n{console}",
                qemu_err.trim()
            ))
            .into())
        }
    };
    if std::env::var_os("EMBER_LAB_KEEP").is_some() {
        eprintln!("lab: run folder kept at {}", run_dir.display());
    } else {
        fs::remove_dir_all(&run_dir).ok();
    }
    Ok(rc)
}

/// Why a lab run failed without the command's fault.
#[derive(Debug)]
pub enum LabFailure {
    /// The L1 kernel locked up or panicked.
    L1Failed(String),
}

impl std::fmt::Display for LabFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabFailure::L1Failed(why) => write!(f, "the lab's L1 kernel failed: {why}"),
        }
    }
}

impl std::error::Error for LabFailure {}

/// A sign in the L1 console that the L1 kernel will not finish: a soft lockup that has lasted
/// long, or a panic.
fn l1_failure(console: &Path) -> Option<String> {
    let text = fs::read_to_string(console).ok()?;
    if let Some(line) = text.lines().find(|l| l.contains("Kernel panic")) {
        return Some(line.trim().to_string());
    }
    // Short lockups happen when the host is loaded; a minute-long one is a hang.
    text.lines()
        .filter(|l| l.contains("soft lockup"))
        .find(|l| {
            l.split("stuck for ")
                .nth(1)
                .and_then(|rest| rest.split('s').next())
                .and_then(|secs| secs.parse::<u64>().ok())
                .is_some_and(|secs| secs >= 60)
        })
        .map(|l| l.trim().to_string())
}

/// `function+offset` for a kernel address, from kallsyms (the L1 boots with `nokaslr`, so
/// addresses are the same in every run).
fn symbolize(kallsyms: &Path, addr: u64) -> Option<String> {
    let text = fs::read_to_string(kallsyms).ok()?;
    let (start, name) = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let start = u64::from_str_radix(parts.next()?, 16).ok()?;
            let kind = parts.next()?;
            let name = parts.next()?;
            matches!(kind, "t" | "T").then_some((start, name))
        })
        .filter(|(start, _)| *start <= addr)
        .max_by_key(|(start, _)| *start)?;
    Some(format!("{name}+{:#x}", addr - start))
}

/// How long the L1 may go without touching its heartbeat file before it counts as wedged
/// (it touches it every 5 s; a loaded host stretches that, a wedged L1 stops it).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(150);
/// How long the L1 may take to boot and start its heartbeat.
const FIRST_HEARTBEAT_LIMIT: Duration = Duration::from_secs(240);

/// Says why the L1 counts as wedged, judged by its heartbeat file's (host-side) age.
fn heartbeat_lost(heartbeat: &Path, running_for: Duration) -> Option<String> {
    match fs::metadata(heartbeat).and_then(|m| m.modified()) {
        Ok(touched) => {
            let age = touched.elapsed().unwrap_or_default();
            (age > HEARTBEAT_LIMIT).then(|| format!("the L1 stopped its heartbeat {age:.0?} ago"))
        }
        Err(_) => (running_for > FIRST_HEARTBEAT_LIMIT)
            .then(|| format!("the L1 started no heartbeat within {running_for:.0?}")),
    }
}

/// Where the L1's vCPUs are (instruction pointer, privilege level, halted), from QEMU's
/// human monitor: tells an L1 kernel hang from an L2 guest that never exits.
fn l1_vcpus(socket: &Path, kallsyms: &Path) -> String {
    let command = "info registers -a";
    use std::os::unix::net::UnixStream;
    let ask = || -> std::io::Result<String> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // The monitor echoes and prompts; read until it goes quiet.
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    match ask() {
        Ok(text) if !text.contains("RIP=") => "(the monitor did not answer)".to_string(),
        Ok(text) => text
            .lines()
            .filter_map(|l| {
                let rip = l.split_whitespace().find(|w| w.starts_with("RIP="))?;
                let cpl = l.split_whitespace().find(|w| w.starts_with("CPL="))?;
                let hlt = l.split_whitespace().find(|w| w.starts_with("HLT="))?;
                let symbol = u64::from_str_radix(&rip[4..], 16)
                    .ok()
                    .and_then(|addr| symbolize(kallsyms, addr))
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                Some(format!("{rip}{symbol} {cpl} {hlt}"))
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => format!("(monitor: {e})"),
    }
}

/// Copies what is appended to `path` to our stdout or stderr until `done` and the end.
fn follow(path: &Path, to_stdout: bool, done: &AtomicBool) {
    let Ok(mut file) = fs::File::open(path) else {
        return;
    };
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let finished = done.load(Ordering::SeqCst);
        loop {
            if file.seek(SeekFrom::Start(pos)).is_err() {
                return;
            }
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    pos += n as u64;
                    if to_stdout {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&buf[..n]).ok();
                        out.flush().ok();
                    } else {
                        std::io::stderr().write_all(&buf[..n]).ok();
                    }
                }
            }
        }
        if finished {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh private folder under the system temp dir.
pub fn tempdir(prefix: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("{prefix}-{}-{nanos}-{attempt}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("cannot create a temporary folder under {}", base.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(text: &str) -> Option<String> {
        let dir = tempdir("ember-lab-test").unwrap();
        let path = dir.join("console.log");
        fs::write(&path, text).unwrap();
        let result = l1_failure(&path);
        fs::remove_dir_all(dir).ok();
        result
    }

    #[test]
    fn detects_long_lockups_and_panics_but_not_short_stalls() {
        assert!(console("[ 1.0] booting\n").is_none());
        assert!(
            console("[ 30.0] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [x:1]\n").is_none()
        );
        let long =
            console("[ 697.2] watchdog: BUG: soft lockup - CPU#1 stuck for 648s! [vm:127]\n");
        assert!(long.unwrap().contains("648s"));
        assert!(console("[ 5.0] Kernel panic - not syncing: oops\n")
            .unwrap()
            .contains("Kernel panic"));
    }
}
