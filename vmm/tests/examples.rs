//! The library's runnable examples, run end to end (`vmtest_*`: hardware KVM or the lab).

use std::path::PathBuf;
use std::process::Command;

/// An example's program, which `cargo test` builds beside the test programs.
fn example(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the test program's path");
    let examples = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test programs live in target/PROFILE/deps")
        .join("examples");
    let path = examples.join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds examples (`cargo xtask test` does)",
        path.display()
    );
    path
}

#[test]
fn vmtest_the_lifecycle_example_boots_saves_and_restores_in_every_mode() {
    let out = Command::new(example("sandbox_lifecycle"))
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("booted in"), "{stdout}");
    for mode in ["file", "prefetch", "lazy", "eager"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("restored ({mode}) in"))
                    && l.ends_with(": saved at boot")),
            "no restore in mode {mode}:\n{stdout}"
        );
    }
}
