//! Shared helpers: running commands, hashing inputs, the artifact cache, timing phases.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where built artifacts are cached, outside the repository, so fresh clones reuse them.
/// `EMBER_CACHE_DIR` overrides; otherwise `$XDG_CACHE_HOME/ember` or `$HOME/.cache/ember`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBER_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("ember");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/ember")
}

/// Cargo's arguments that build the programs ember ships: the `ember` command line and
/// service, and `ember-vmm`, the process that runs one sandbox.
pub const PRODUCT_BINARIES: &[&str] = &[
    "-p",
    "ember-cli",
    "--bin",
    "ember",
    "-p",
    "ember-sandbox",
    "--bin",
    "ember-vmm",
];

/// The cargo target directory of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A hash of named inputs; the first 16 hex digits name a cache entry.
#[derive(Default)]
pub struct InputHash(Sha256);

impl InputHash {
    pub fn new(recipe: &str) -> Self {
        let mut hash = InputHash::default();
        hash.add("recipe", recipe.as_bytes());
        hash
    }

    pub fn add(&mut self, name: &str, bytes: &[u8]) -> &mut Self {
        // Length-prefix both parts so that ("ab","c") and ("a","bc") differ.
        for part in [name.as_bytes(), bytes] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn add_file(&mut self, name: &str, path: &Path) -> Result<&mut Self> {
        let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(self.add(name, &bytes))
    }

    pub fn key(&self) -> String {
        let digest = self.0.clone().finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// Moves a finished file into the cache atomically: the caller wrote `tmp` next to `dest`.
pub fn publish(tmp: &Path, dest: &Path) -> Result<()> {
    let file = fs::File::open(tmp).with_context(|| format!("opening {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync {}", tmp.display()))?;
    fs::rename(tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Some(dir) = dest.parent() {
        fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// Runs a command to completion with inherited output; fails with the command line on error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command and returns its stdout; stderr is inherited.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("{} failed with {}", describe(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a long command with its output going to `log`, printing a progress line now and then
/// (the latest line of output) so that a person watching knows it is alive.
pub fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<()> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let stderr = child.stderr.take().context("child stderr")?;
    let stderr_log = log.with_extension("stderr.log");
    let stderr_thread = std::thread::spawn(move || -> std::io::Result<()> {
        let mut file = fs::File::create(stderr_log)?;
        std::io::copy(&mut BufReader::new(stderr), &mut file)?;
        Ok(())
    });
    let stdout = child.stdout.take().context("child stdout")?;
    let mut last_report = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        writeln!(log_file, "{line}").ok();
        if last_report.elapsed().as_secs() >= 20 {
            eprintln!(
                "  [{what} {:>4}s] {}",
                started.elapsed().as_secs(),
                truncate(&line, 90)
            );
            last_report = Instant::now();
        }
    }
    let status = child.wait()?;
    stderr_thread.join().ok();
    if !status.success() {
        let tail = tail_lines(log, 30) + &tail_lines(&log.with_extension("stderr.log"), 30);
        bail!(
            "{what} failed with {status}; last output:\n{tail}\n(full log: {})",
            log.display()
        );
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The last `n` lines of a text file (empty if it cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// `cargo` as invoked by the user (respects `$CARGO`).
pub fn cargo() -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsStr::new("cargo").into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Quotes a word for POSIX sh.
pub fn sh_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Prints how long each named phase took, as it ends.
pub struct Phases {
    started: Instant,
    done: Vec<(String, f64)>,
}

impl Phases {
    pub fn new() -> Self {
        Phases {
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("==> {name}");
        let start = Instant::now();
        let result = f();
        let secs = start.elapsed().as_secs_f64();
        let verdict = if result.is_ok() { "done" } else { "FAILED" };
        eprintln!("==> {name}: {verdict} in {secs:.1}s");
        self.done.push((name.to_string(), secs));
        result
    }

    pub fn summary(&self) {
        eprintln!("==> phase times:");
        for (name, secs) in &self.done {
            eprintln!("    {secs:>8.1}s  {name}");
        }
        eprintln!("    {:>8.1}s  total", self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_round_trips_through_sh() {
        let words = ["plain", "with space", "it's", "", "$HOME", "a\"b", "x;y"];
        let script = format!(
            "printf '%s\\n' {}",
            words
                .iter()
                .map(|w| sh_quote(w))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let printed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(printed.lines().collect::<Vec<_>>(), words);
    }

    #[test]
    fn input_hash_separates_parts() {
        let mut a = InputHash::new("r");
        a.add("x", b"ab").add("y", b"c");
        let mut b = InputHash::new("r");
        b.add("x", b"a").add("y", b"bc");
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key().len(), 16);
    }
}
