//! Debian packages the project needs, installed with apt-get when missing, and the Python
//! packages its tests use, installed with pip.

use std::process::Command;

use anyhow::Result;

use crate::util::{output, run};

/// Everything ember's build, images, lab and tests use from Debian.
pub const PACKAGES: &[&str] = &[
    // the lab: QEMU TCG with an SVM-capable CPU, and the tools to build its initramfs
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    // the guest kernel, built from Debian's source package
    "linux-source-6.1",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    // guest rootfs
    "debootstrap",
    "debian-archive-keyring",
    "e2fsprogs",
    // the userfaultfd crate runs bindgen
    "libclang-dev",
    // used by tests and benches
    "python3",
    "procps",
    // the service tests talk to its Unix socket with curl
    "curl",
    // certificates for the remote listener's TLS tests
    "openssl",
    // sandbox networks: namespaces, TAPs and veths (iproute2), NAT and filters (nftables)
    "iproute2",
    "nftables",
    // the network benchmark's host side
    "iperf3",
    // the VM test of `ember shell` drives it in a terminal
    "tmux",
];

/// The packages from [`PACKAGES`] that are not installed.
pub fn missing() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for pkg in PACKAGES {
        let status = output(
            Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", pkg])
                .stderr(std::process::Stdio::null()),
        )
        .unwrap_or_default();
        if status.trim() != "installed" {
            missing.push(*pkg);
        }
    }
    Ok(missing)
}

/// Python packages the tests use, pinned (installed with pip when missing).
const PYTHON_REQUIREMENTS: &str = "xtask/python-requirements.txt";

/// Installs whatever is missing (needs root); prints what it does.
pub fn ensure() -> Result<()> {
    ensure_debian()?;
    ensure_node()?;
    ensure_python()
}

/// Node.js and npm build and test the TypeScript SDK. A host that has them from elsewhere
/// (NodeSource bundles npm) keeps them; otherwise Debian's.
fn ensure_node() -> Result<()> {
    let present = Command::new("npm")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        eprintln!("  node and npm are present");
        return Ok(());
    }
    eprintln!("  installing: nodejs npm");
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "nodejs",
            "npm",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_python() -> Result<()> {
    let present = Command::new("python3")
        .args([
            "-c",
            "import moto.server, schemathesis, httpx, mypy, pytest",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        eprintln!("  the Python test packages are present");
        return Ok(());
    }
    let requirements = crate::util::workspace_root().join(PYTHON_REQUIREMENTS);
    eprintln!(
        "  installing Python packages from {}",
        requirements.display()
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(requirements))
}

fn ensure_debian() -> Result<()> {
    let missing = missing()?;
    if missing.is_empty() {
        eprintln!("  all {} Debian packages present", PACKAGES.len());
        return Ok(());
    }
    eprintln!("  installing: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}
