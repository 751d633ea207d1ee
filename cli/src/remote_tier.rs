//! `--remote` on `ember run` and `ember restore`: the remote tier without a service. A
//! snapshot saved with `--snapshot-on-exit` is pushed; a snapshot this host lacks is restored
//! from the remote as the service does it (what the VMM reads first and the working set up
//! front, each other page as the guest touches it, then the rest, so that it is local after).

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use ember_remote::{LazySnapshot, Remote, RemoteError, RemoteOptions};
use ember_sandbox::page_channel::{self, PageChannel};
use ember_snapshot_store::Store;

/// The remote tier's options.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RemoteArgs {
    /// A remote tier shared with other hosts (`s3://BUCKET/PREFIX`; endpoint, region and
    /// credentials from the `AWS_*` environment).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Bound on one request to the remote, in seconds.
    #[arg(long, default_value_t = 30, requires = "remote")]
    pub remote_timeout_s: u64,
}

/// Errors of `--remote`.
#[derive(Debug, thiserror::Error)]
pub enum RemoteTierError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("the page channel: {0}")]
    Channel(#[source] std::io::Error),
}

impl RemoteArgs {
    /// The remote, if one was asked for.
    pub fn open(&self) -> Result<Option<Arc<Remote>>, RemoteError> {
        let Some(url) = &self.remote else {
            return Ok(None);
        };
        let options = RemoteOptions {
            request_timeout: Duration::from_secs(self.remote_timeout_s.max(1)),
            ..RemoteOptions::default()
        };
        Remote::open(url, options).map(|remote| Some(Arc::new(remote)))
    }
}

/// A restore of a snapshot fetched as it runs.
pub struct RemoteRestore {
    pub lazy: Arc<LazySnapshot>,
    pub partial: ember_vmm::PartialSnapshot,
}

/// Prepares the restore of `id`, which `store` lacks, from `remote`. The pages are served to
/// the VMM over a page channel by a thread of this process started here, before any of the
/// VMM's seccomp filters exist (its fault handler may not make network calls itself).
pub fn prepare(
    remote: &Arc<Remote>,
    store: &Arc<Store>,
    id: &str,
) -> Result<RemoteRestore, RemoteTierError> {
    let lazy = Arc::new(remote.prepare_lazy(store, id)?);
    let report = lazy.report();
    eprintln!(
        "ember: restoring {id} from {}: {} bytes in {} requests before the guest runs ({} \
         working-set pages); the rest as it runs",
        remote.url(),
        report.bytes_fetched,
        report.requests,
        lazy.working_set().len()
    );
    let (ours, vmms) = UnixStream::pair().map_err(RemoteTierError::Channel)?;
    let (server_lazy, server_store) = (lazy.clone(), store.clone());
    std::thread::Builder::new()
        .name("ember-pages".into())
        .spawn(move || {
            let served = page_channel::serve(ours, |index| {
                server_lazy.page(&server_store, index).inspect_err(|e| {
                    eprintln!("ember: guest page {index}: {e}");
                })
            });
            if let Err(e) = served {
                eprintln!("ember: the page channel: {e}");
            }
        })
        .map_err(RemoteTierError::Channel)?;
    let timeout = remote.request_deadline() * 2 + Duration::from_secs(5);
    let channel = PageChannel::new(vmms, timeout).map_err(RemoteTierError::Channel)?;
    Ok(RemoteRestore {
        partial: ember_vmm::PartialSnapshot {
            manifest: lazy.manifest(),
            working_set: lazy.working_set().to_vec(),
            missing_pages: Arc::new(channel),
        },
        lazy,
    })
}

/// Fetches the rest of a restore and saves it in `store`: later restores are local.
pub fn complete(remote: &Remote, lazy: &LazySnapshot, store: &Store) -> Result<(), RemoteError> {
    let rest = lazy.complete(store)?;
    let total = lazy.report();
    eprintln!(
        "ember: {} fetched whole from {} ({} bytes after the guest started; {} bytes in {} \
         requests in all): now local",
        lazy.manifest().id,
        remote.url(),
        rest.bytes_fetched,
        total.bytes_fetched,
        total.requests
    );
    Ok(())
}

/// Pushes snapshot `id` from `store`.
pub fn push(remote: &Remote, store: &Store, id: &str) -> Result<(), RemoteError> {
    let report = remote.push(store, id)?;
    eprintln!(
        "ember: {id} pushed to {}: {} objects ({} bytes) uploaded, {} there already",
        remote.url(),
        report.objects_uploaded,
        report.bytes_uploaded,
        report.objects_present
    );
    Ok(())
}
