//! What ember's tests and benches start for themselves, never part of a shipped program.
//!
//! [`S3Server`]: an S3-compatible server on loopback, the Python `moto` package's server
//! mode (installed from `xtask/python-requirements.txt` by `cargo xtask deps`), with one
//! bucket, reached through the same `AWS_*` settings a real S3 would be. [`tree`]: a
//! folder's contents as a comparable value. [`tls`]: a self-signed certificate.

pub mod tls;
pub mod tree;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors of starting the test server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot run `python3 -m moto.server`: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the moto S3 server did not listen on 127.0.0.1:{port} within 180 s")]
    NotListening { port: u16 },
    #[error("the moto S3 server did not make bucket {bucket}: {answer}")]
    Bucket { bucket: String, answer: String },
}

/// An S3-compatible server on a free loopback port with one bucket; killed on drop (and
/// with the process that started it, if that dies without unwinding).
pub struct S3Server {
    pub port: u16,
    pub bucket: String,
    child: Child,
}

impl S3Server {
    /// Starts a server holding an empty `bucket`.
    pub fn start(bucket: &str) -> Result<S3Server, StartError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(StartError::Spawn)?
            .port();
        let mut command = Command::new("python3");
        command
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl between fork and exec only sets a flag of the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(StartError::Spawn)?;
        let server = S3Server {
            port,
            bucket: bucket.to_string(),
            child,
        };
        // Python imports moto slowly under an emulator (the lab): minutes, not seconds.
        let deadline = Instant::now() + Duration::from_secs(180);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(StartError::NotListening { port });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let answer = server
            .raw_request("PUT", &format!("/{bucket}"))
            .unwrap_or_else(|e| e.to_string());
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(StartError::Bucket {
                bucket: bucket.to_string(),
                answer,
            });
        }
        Ok(server)
    }

    /// `s3://BUCKET/PREFIX` for a remote under `prefix` in the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The `AWS_*` environment a program needs to reach this server as it would S3.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ]
    }

    /// The same as `object_store` settings (`aws_endpoint`, …), for a remote opened in
    /// process.
    pub fn settings(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_access_key_id", "testing".into()),
            ("aws_secret_access_key", "testing".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// An unsigned path-style request (moto takes them, for making buckets): the answer.
    pub fn raw_request(&self, method: &str, path: &str) -> std::io::Result<String> {
        let port = self.port;
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    }

    /// Stops the server (as an outage would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
