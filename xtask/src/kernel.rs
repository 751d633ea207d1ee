//! The guest kernel: Debian's linux-source-6.1 with ember's own minimal configuration.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_root, output, publish, run, run_logged, workspace_root, InputHash};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the build steps below change in a way that changes the output.
const RECIPE: &str = "kernel-v1: allnoconfig + KCONFIG_ALLCONFIG fragment, make vmlinux";

pub fn config_fragment() -> PathBuf {
    workspace_root().join("kernel-config/ember-guest.config")
}

fn source_version() -> Result<String> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
        .with_context(|| format!("{SOURCE_PACKAGE} is not installed (run `cargo xtask deps`)"))?;
    Ok(version.trim().to_string())
}

/// The cache folder the kernel for the current inputs lives in.
pub fn cache_dir() -> Result<PathBuf> {
    let mut hash = InputHash::new(RECIPE);
    hash.add("source", source_version()?.as_bytes());
    hash.add_file("config", &config_fragment())?;
    Ok(cache_root().join("kernel").join(hash.key()))
}

/// Returns the path of `vmlinux`, building it first if the cache has none for these inputs.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let vmlinux = dir.join("vmlinux");
    if vmlinux.exists() {
        eprintln!("  cached: {}", vmlinux.display());
        return Ok(vmlinux);
    }
    fs::create_dir_all(&dir)?;
    let build = dir.join("build");
    if build.exists() {
        fs::remove_dir_all(&build)?;
    }
    fs::create_dir_all(&build)?;
    eprintln!("  unpacking {SOURCE_TARBALL}");
    run(Command::new("tar")
        .args(["xf", SOURCE_TARBALL, "--strip-components=1", "-C"])
        .arg(&build))?;

    let fragment = config_fragment();
    eprintln!("  configuring: allnoconfig + {}", fragment.display());
    run(Command::new("make")
        .current_dir(&build)
        .args(["-s", "allnoconfig"])
        .env("KCONFIG_ALLCONFIG", &fragment))?;
    check_config(&fragment, &build.join(".config"))?;

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    eprintln!("  building vmlinux with {jobs} jobs (about 5 minutes on 2 cores)");
    run_logged(
        Command::new("make")
            .current_dir(&build)
            .arg(format!("-j{jobs}"))
            .arg("vmlinux"),
        &dir.join("build.log"),
        "kernel",
    )?;
    let tmp = dir.join("vmlinux.tmp");
    fs::copy(build.join("vmlinux"), &tmp)?;
    fs::copy(build.join(".config"), dir.join("config"))?;
    publish(&tmp, &vmlinux)?;
    fs::remove_dir_all(&build).ok();
    eprintln!("  built: {}", vmlinux.display());
    Ok(vmlinux)
}

/// Every option the fragment sets must be in the final configuration: a dependency that
/// silently turned an option off would otherwise give a kernel that boots without, say, vsock.
fn check_config(fragment: &Path, config: &Path) -> Result<()> {
    let wanted = fs::read_to_string(fragment)?;
    let got = fs::read_to_string(config)?;
    let got: std::collections::HashSet<&str> = got.lines().collect();
    let lost: Vec<&str> = wanted
        .lines()
        .filter(|line| line.starts_with("CONFIG_") || line.starts_with("# CONFIG_"))
        .filter(|line| !got.contains(line))
        .collect();
    if !lost.is_empty() {
        bail!(
            "kernel options from {} did not survive configuration:\n  {}",
            fragment.display(),
            lost.join("\n  ")
        );
    }
    Ok(())
}
