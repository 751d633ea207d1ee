//! An S3-compatible server for the tests: the `moto` package's server mode, on loopback,
//! started once per test process (installed by `cargo xtask deps`).
#![allow(dead_code)]

use ember_remote::{Remote, RemoteOptions};

pub const BUCKET: &str = "ember-test";

pub use ember_testkit::S3Server;

/// Starts a server with bucket [`BUCKET`]; panics (the test fails) if it cannot.
pub fn start_s3() -> S3Server {
    S3Server::start(BUCKET).unwrap_or_else(|e| panic!("{e}"))
}

/// What the remote tests do with the server beyond starting it.
pub trait RemoteTestServer {
    fn remote(&self, prefix: &str, options: RemoteOptions) -> Remote;
    fn flip_byte(&self, key: &str, offset: usize);
    /// Object keys under `prefix` in [`BUCKET`].
    fn list(&self, prefix: &str) -> String;
}

impl RemoteTestServer for S3Server {
    fn remote(&self, prefix: &str, options: RemoteOptions) -> Remote {
        Remote::open(
            &format!("s3://{BUCKET}/{prefix}"),
            RemoteOptions {
                s3_settings: self.settings(),
                ..options
            },
        )
        .expect("a remote")
    }

    fn list(&self, prefix: &str) -> String {
        self.raw_request("GET", &format!("/{BUCKET}?prefix={prefix}"))
            .expect("a listing")
    }

    /// Flips one byte of object `key` in [`BUCKET`], as a damaged disk or a hostile writer
    /// of the bucket would.
    fn flip_byte(&self, key: &str, offset: usize) {
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
