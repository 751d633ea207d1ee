//! A self-signed certificate for tests of ember's HTTPS listener, made by the `openssl` command
//! (installed by `cargo xtask deps`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes `cert.pem` and `key.pem` (P-256, valid two days) into `dir` for the names in
/// `subject_alt_names` (openssl's form: `IP:127.0.0.1,DNS:localhost`) and returns their
/// paths. The certificate is its own CA: clients trust it by its file. Panics when openssl
/// fails: it is for tests.
pub fn self_signed(dir: &Path, subject_alt_names: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
        .args(["-nodes", "-days", "2", "-subj", "/CN=ember-test"])
        .arg("-addext")
        .arg(format!("subjectAltName={subject_alt_names}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (cargo xtask deps installs it)");
    assert!(
        made.status.success(),
        "openssl could not make a certificate: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}
