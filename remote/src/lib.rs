//! The snapshot store's remote tier: a bucket of an S3-compatible object store that several
//! hosts share. A snapshot saved on one host is pushed there; another host fetches it into its
//! own store and restores it. Credentials and the endpoint come from the standard `AWS_*`
//! environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...).
//!
//! Layout under `s3://BUCKET/PREFIX/` (the formats are the local store's, see
//! `ember_snapshot_store`):
//!
//! ```text
//! packs/<name>.pack    objects, as in a local pack
//! packs/<name>.idx     its index; <name> is the BLAKE3 of these bytes, so an index fetched
//!                      is checked against its own name, and a pack without one is unfinished
//! manifests/<id>       one per snapshot, listing the remote packs that hold its objects;
//!                      written only after every one of them is there
//! working-sets/<id>    the pages its restores touched first (advisory), when recorded
//! ```
//!
//! Objects are deduplicated by hash across hosts: a push uploads only the objects no remote
//! index lists. Every fetched object is verified against its hash before a store keeps it.
//! A pack is uploaded before its index and an index before any manifest naming it, so a
//! push cut short leaves nothing a reader would follow; pushing again picks up where it
//! stopped. GC removes packs no manifest names once they are older than a grace period, so
//! a push still in flight on another host is never broken.

mod fetch;
mod gc;
mod index;
mod lazy;
mod push;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ember_snapshot_store::RecordedWorkingSet;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{ClientConfigKey, ObjectStoreExt, RetryConfig};

pub use fetch::FetchReport;
pub use gc::{RemoteGcOptions, RemoteGcReport};
pub use lazy::{LazySnapshot, PrepareReport};
pub use push::PushReport;

use index::RemoteIndex;

/// Errors of the remote tier; each names the remote.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("remote {remote}: cannot set up its client: {source}")]
    Client {
        remote: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote {remote}: {op} {key}: {source}")]
    Request {
        remote: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote {remote}: {op} {key} did not finish within {timeout:?}")]
    Timeout {
        remote: String,
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    #[error("remote {remote}: GET {key}: the download this request waited on failed")]
    RangeFailed { remote: String, key: String },
    #[error("remote {remote}: snapshot {id} is not there")]
    NotFound { remote: String, id: String },
    #[error("remote {remote}: {key} is corrupt: {reason}")]
    Corrupt {
        remote: String,
        key: String,
        reason: String,
    },
    #[error("remote {remote}: the local store: {source}")]
    Local {
        remote: String,
        #[source]
        source: ember_snapshot_store::StoreError,
    },
    #[error("remote {remote}: cannot start its I/O threads: {source}")]
    Runtime {
        remote: String,
        #[source]
        source: std::io::Error,
    },
}

impl RemoteError {
    /// Whether the remote could not be reached or answered too slowly (as opposed to
    /// answering that something is missing or damaged).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RemoteError::Timeout { .. } | RemoteError::RangeFailed { .. } => true,
            RemoteError::Request { source, .. } => !matches!(
                **source,
                object_store::Error::NotFound { .. } | object_store::Error::AlreadyExists { .. }
            ),
            _ => false,
        }
    }

    /// Whether the remote answered that the object asked for is not there.
    fn is_not_found(&self) -> bool {
        matches!(self, RemoteError::Request { source, .. }
            if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// How the remote is reached.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Bound on one request, retries included.
    pub request_timeout: Duration,
    /// Where fetched pack indexes are kept between runs (they never change: named by
    /// content). None: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Size a push makes its packs (a pack is one upload).
    pub pack_target_bytes: usize,
    /// Ranged downloads in flight at once.
    pub parallel_fetches: usize,
    /// S3 settings applied over the `AWS_*` environment, by their `object_store` names
    /// (`aws_endpoint`, `aws_region`, `aws_allow_http`, ...).
    pub s3_settings: Vec<(String, String)>,
}

impl Default for RemoteOptions {
    fn default() -> RemoteOptions {
        RemoteOptions {
            request_timeout: Duration::from_secs(30),
            cache_dir: None,
            pack_target_bytes: 32 << 20,
            parallel_fetches: 8,
            s3_settings: Vec::new(),
        }
    }
}

/// A remote tier at `s3://BUCKET/PREFIX`. Its methods block (run them off an async
/// runtime's threads, e.g. in `spawn_blocking`); they drive their requests on I/O threads
/// of their own.
pub struct Remote {
    url: String,
    bucket: AmazonS3,
    prefix: Key,
    options: RemoteOptions,
    index: Mutex<RemoteIndex>,
    runtime: Option<tokio::runtime::Runtime>,
    traffic: TrafficCounters,
}

/// What a [`Remote`] moved since it was opened, for a service's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Requests made (each attempt the client's retries made counts once).
    pub requests: u64,
    /// Bytes of object bodies downloaded.
    pub bytes_downloaded: u64,
    /// Bytes of object bodies uploaded.
    pub bytes_uploaded: u64,
}

#[derive(Default)]
struct TrafficCounters {
    requests: std::sync::atomic::AtomicU64,
    bytes_downloaded: std::sync::atomic::AtomicU64,
    bytes_uploaded: std::sync::atomic::AtomicU64,
}

impl TrafficCounters {
    fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which an async caller must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `s3://BUCKET/PREFIX` → (bucket, prefix).
fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |reason: &str| RemoteError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("only s3://BUCKET/PREFIX remotes are supported"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(bad("the bucket name must be 3 to 63 of a-z 0-9 . -"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|part| part == "." || part == "..") {
        return Err(bad("the prefix must not hold . or .. parts"));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

impl Remote {
    /// Opens the remote at `url` (`s3://BUCKET/PREFIX`), configured from the `AWS_*`
    /// environment. Nothing is requested yet.
    pub fn open(url: &str, options: RemoteOptions) -> Result<Remote> {
        let (bucket_name, prefix) = parse_url(url)?;
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: options.request_timeout,
            ..RetryConfig::default()
        };
        // Timeouts as settings, not a whole `ClientOptions`: that would drop the client
        // settings the environment gave (`AWS_ALLOW_HTTP`).
        let timeout = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let mut builder = AmazonS3Builder::from_env()
            .with_retry(retry)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                timeout(options.request_timeout),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                timeout(Duration::from_secs(5).min(options.request_timeout)),
            );
        for (name, value) in &options.s3_settings {
            let key = name
                .parse::<AmazonS3ConfigKey>()
                .map_err(|source| RemoteError::Client {
                    remote: url.to_string(),
                    source: Box::new(source),
                })?;
            builder = builder.with_config(key, value);
        }
        let bucket = builder
            .with_bucket_name(bucket_name)
            .build()
            .map_err(|source| RemoteError::Client {
                remote: url.to_string(),
                source: Box::new(source),
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ember-remote")
            .enable_all()
            .build()
            .map_err(|source| RemoteError::Runtime {
                remote: url.to_string(),
                source,
            })?;
        Ok(Remote {
            url: url.to_string(),
            bucket,
            prefix: Key::from(prefix),
            options,
            index: Mutex::new(RemoteIndex::default()),
            runtime: Some(runtime),
            traffic: TrafficCounters::default(),
        })
    }

    /// The longest one request may take, its retries included.
    pub fn request_deadline(&self) -> Duration {
        self.options.request_timeout * 2
    }

    /// The remote's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Requests and bytes moved since this remote was opened.
    pub fn traffic(&self) -> Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        Traffic {
            requests: self.traffic.requests.load(Relaxed),
            bytes_downloaded: self.traffic.bytes_downloaded.load(Relaxed),
            bytes_uploaded: self.traffic.bytes_uploaded.load(Relaxed),
        }
    }

    fn count_download(&self, bytes: usize) {
        TrafficCounters::add(&self.traffic.bytes_downloaded, bytes as u64);
    }

    fn key(&self, parts: &[&str]) -> Key {
        let mut key = self.prefix.clone();
        for part in parts {
            key = key.join(*part);
        }
        key
    }

    fn manifest_key(&self, id: &str) -> Key {
        self.key(&["manifests", id])
    }

    fn working_set_key(&self, id: &str) -> Key {
        self.key(&["working-sets", id])
    }

    /// The working set recorded for snapshot `id` on some host, if one was pushed. A damaged
    /// one is an error (the caller may go on without: working sets are advisory).
    pub fn working_set(&self, id: &str) -> Result<Option<RecordedWorkingSet>> {
        ember_snapshot_store::validate_id(id).map_err(|e| self.local()(e.into()))?;
        let key = self.working_set_key(id);
        let bytes = match self.block_on(self.get(&key)) {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        RecordedWorkingSet::decode(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(key.as_ref(), e.to_string()))
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        match &self.runtime {
            Some(runtime) => runtime.block_on(future),
            None => unreachable!("the runtime is taken only when the remote is dropped"),
        }
    }

    /// Runs one request with the remote's deadline.
    async fn request<T>(
        &self,
        op: &'static str,
        key: &Key,
        future: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        TrafficCounters::add(&self.traffic.requests, 1);
        self.within_deadline(op, key, future).await
    }

    /// Runs `future` (a request, or the rest of one) with the remote's deadline.
    async fn within_deadline<T>(
        &self,
        op: &'static str,
        key: &Key,
        future: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        // The client's own timeout bounds each attempt; this bounds the retries too.
        let deadline = self.request_deadline();
        match tokio::time::timeout(deadline, future).await {
            Ok(result) => result.map_err(|source| RemoteError::Request {
                remote: self.url.clone(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(RemoteError::Timeout {
                remote: self.url.clone(),
                op,
                key: key.to_string(),
                timeout: deadline,
            }),
        }
    }

    fn local(&self) -> impl Fn(ember_snapshot_store::StoreError) -> RemoteError + '_ {
        move |source| RemoteError::Local {
            remote: self.url.clone(),
            source,
        }
    }

    /// Whether snapshot `id` has a manifest in the remote.
    pub fn has_snapshot(&self, id: &str) -> Result<bool> {
        ember_snapshot_store::validate_id(id).map_err(|e| self.local()(e.into()))?;
        let key = self.manifest_key(id);
        match self.block_on(self.request("HEAD", &key, self.bucket.head(&key))) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Snapshot `id`'s manifest as the remote holds it (verified).
    pub fn manifest(&self, id: &str) -> Result<ember_snapshot_store::Manifest> {
        ember_snapshot_store::validate_id(id).map_err(|e| self.local()(e.into()))?;
        self.block_on(self.fetch_manifest(id))
    }

    async fn fetch_manifest(&self, id: &str) -> Result<ember_snapshot_store::Manifest> {
        let key = self.manifest_key(id);
        let bytes = match self.get(&key).await {
            Err(e) if e.is_not_found() => {
                return Err(RemoteError::NotFound {
                    remote: self.url.clone(),
                    id: id.to_string(),
                })
            }
            other => other?,
        };
        let origin = PathBuf::from(format!("{}/{key}", self.url));
        ember_snapshot_store::Manifest::from_bytes(&origin, id, &bytes).map_err(|e| {
            RemoteError::Corrupt {
                remote: self.url.clone(),
                key: key.to_string(),
                reason: e.to_string(),
            }
        })
    }

    /// Every snapshot id with a manifest in the remote, sorted.
    pub fn list_snapshots(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .block_on(self.list(&self.key(&["manifests"])))?
            .into_iter()
            .filter_map(|meta| meta.location.filename().map(str::to_string))
            .filter(|name| ember_snapshot_store::validate_id(name).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Deletes snapshot `id`'s manifest from the remote (its packs go at the next remote GC,
    /// unless other manifests name them). A manifest that is not there is fine.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        ember_snapshot_store::validate_id(id).map_err(|e| self.local()(e.into()))?;
        // The manifest first: a working set without one is never read.
        for key in [self.manifest_key(id), self.working_set_key(id)] {
            match self.block_on(self.request("DELETE", &key, self.bucket.delete(&key))) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn get(&self, key: &Key) -> Result<bytes::Bytes> {
        let result = self.request("GET", key, self.bucket.get(key)).await?;
        // The body of the same request: its bytes, within the deadline again.
        let bytes = self.within_deadline("GET", key, result.bytes()).await?;
        self.count_download(bytes.len());
        Ok(bytes)
    }

    async fn put(&self, key: &Key, data: bytes::Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.request("PUT", key, self.bucket.put(key, data.into()))
            .await?;
        // Counted once the remote took it: a failed upload moved nothing that stays.
        TrafficCounters::add(&self.traffic.bytes_uploaded, len);
        Ok(())
    }

    async fn list(&self, prefix: &Key) -> Result<Vec<object_store::ObjectMeta>> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        self.request(
            "LIST",
            prefix,
            self.bucket.list(Some(prefix)).try_collect::<Vec<_>>(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_name_a_bucket_and_a_clean_prefix() {
        assert_eq!(
            parse_url("s3://snaps/team/a/").unwrap(),
            ("snaps".to_string(), "team/a".to_string())
        );
        assert_eq!(
            parse_url("s3://snaps").unwrap(),
            ("snaps".to_string(), String::new())
        );
        for bad in [
            "http://x/y",
            "s3://",
            "s3://A_B/x",
            "s3://ok-bucket/../x",
            "s3://ab/x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
