//! The TypeScript and Python SDKs (`sdk/`): built, type-checked and unit-tested on the host;
//! their live suites run in VM tests (`cli/tests/vm_sdk.rs`) against a real `ember serve`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{output, run, workspace_root};

/// The oldest Node.js the TypeScript SDK supports (and its tests need).
const MIN_NODE_MAJOR: u32 = 18;

fn typescript_dir() -> PathBuf {
    workspace_root().join("sdk/typescript")
}

fn python_dir() -> PathBuf {
    workspace_root().join("sdk/python")
}

/// The Node.js major version on PATH, checked against [`MIN_NODE_MAJOR`].
fn check_node() -> Result<()> {
    let version = output(Command::new("node").arg("--version"))
        .context("node is missing: run `cargo xtask deps`")?;
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < MIN_NODE_MAJOR {
        bail!("node {} is older than {MIN_NODE_MAJOR}", version.trim());
    }
    Ok(())
}

/// Installs the TypeScript SDK's pinned dev dependencies (from its lock file) and compiles
/// it and its tests to `dist/`.
pub fn build_typescript() -> Result<()> {
    check_node()?;
    let dir = typescript_dir();
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))?;
    run(Command::new("npm")
        .args(["run", "--silent", "build"])
        .current_dir(&dir))
}

/// Everything about the SDKs a host can check: both build, type-check strictly, their
/// generated types match `api/openapi.json`, and their unit tests pass.
pub fn check() -> Result<()> {
    build_typescript()?;
    run(Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(typescript_dir()))?;
    let python = python_dir();
    run(Command::new("python3")
        .args(["-m", "mypy", "--strict", "src", "tests"])
        .current_dir(&python))?;
    run(Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"])
        .env("PYTHONPATH", python.join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&python))
}

/// The interpreters the SDKs' live suites run under, by absolute path: VM tests in the lab
/// run them from the host's (shared) root without the host's shell set-up.
pub fn tool_env() -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Ok(python) =
        output(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))
    {
        env.push(("EMBER_PYTHON".into(), python.trim().to_string()));
    }
    if let Ok(node) = output(Command::new("sh").args(["-c", "command -v node"])) {
        env.push(("EMBER_NODE".into(), node.trim().to_string()));
    }
    env
}
