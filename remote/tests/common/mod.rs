//! An S3-compatible server for the tests: the `moto` package's server mode, on loopback,
//! started once per test process (installed by `cargo xtask deps`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_remote::{Remote, RemoteOptions};

pub const BUCKET: &str = "ember-test";

pub struct S3Server {
    pub port: u16,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// An unsigned path-style request to the server (moto takes them): for making buckets.
pub fn raw_request(port: u16, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the S3 server");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

impl S3Server {
    /// Starts a server with bucket [`BUCKET`]; panics (the test fails) if it cannot.
    pub fn start() -> S3Server {
        let port = free_port();
        let mut command = Command::new("python3");
        command
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl between fork and exec only sets a flag of the child; a test that
        // dies without unwinding takes its server with it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("start the moto S3 server (python3 -m moto.server)");
        let server = S3Server { port, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the moto S3 server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let answer = raw_request(port, "PUT", &format!("/{BUCKET}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server
    }

    /// The settings a remote needs to reach this server.
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

    pub fn remote(&self, prefix: &str, options: RemoteOptions) -> Remote {
        Remote::open(
            &format!("s3://{BUCKET}/{prefix}"),
            RemoteOptions {
                s3_settings: self.settings(),
                ..options
            },
        )
        .expect("a remote")
    }
}

impl S3Server {
    /// Flips one byte of object `key` in [`BUCKET`], as a damaged disk or a hostile writer
    /// of the bucket would.
    pub fn flip_byte(&self, key: &str, offset: usize) {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::ObjectStoreExt;
        let mut builder = AmazonS3Builder::new().with_bucket_name(BUCKET);
        for (name, value) in self.settings() {
            builder = builder.with_config(name.parse::<AmazonS3ConfigKey>().unwrap(), value);
        }
        let bucket = builder.build().unwrap();
        let path = object_store::path::Path::from(key);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut bytes = bucket
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            bytes[offset] ^= 0x40;
            bucket.put(&path, bytes.into()).await.unwrap();
        });
    }
}
