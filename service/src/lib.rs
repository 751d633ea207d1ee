//! `ember serve`: the control plane. HTTP/1.1 + JSON on a Unix socket (axum on tokio); one
//! VMM process (`ember-vmm`) per sandbox; snapshots in the content-addressed store under the
//! state directory.
//!
//! Owns the HTTP API and everything around a sandbox's VMM process: its folder, jail set-up,
//! cgroup, network namespace, warm pool, and the snapshots' memory cache. Requests and
//! answers are `ember_client::types`; the VMM process is driven through
//! `ember_sandbox::control`. Must not depend on the CLI or the bench harness.

pub mod access;
mod api;
pub mod cgroup;
pub mod error;
pub mod exec;
pub mod files;
pub mod gc;
pub mod import;
pub mod ingest;
mod jail;
mod launch;
pub mod lifecycle;
pub mod mem_cache;
mod metrics;
pub mod network;
pub mod oci;
pub mod openapi;
pub mod pool;
pub mod ports;
pub mod process;
pub mod pty;
pub mod remote;
pub mod remote_access;
pub mod remote_cache;
pub mod runtimes;
pub mod sandbox;
pub mod sandbox_metrics;
pub mod snapshots;
pub mod templates;
pub mod timeline;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::error::ApiError;
use self::sandbox::Sandbox;

/// The largest JSON request body.
const MAX_JSON_BODY: usize = 1 << 20;
pub const DEFAULT_TIMEOUT_S: u64 = 300;
pub(crate) const MAX_TIMEOUT_S: u64 = 24 * 3600;
pub(crate) const MAX_ENV_VARS: usize = 256;
pub(crate) const MIN_MEMORY_MIB: u32 = 128;
pub(crate) const MAX_MEMORY_MIB: u32 = 16 * 1024;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The API's Unix socket (default: STATE_DIR/ember.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where sandboxes, their logs and the snapshot store live (default: $EMBER_STATE_DIR,
    /// else ~/.local/share/ember).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The guest kernel (default: $EMBER_KERNEL, else the newest `cargo xtask kernel`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The base rootfs every sandbox gets a copy-on-write view of (default: $EMBER_ROOTFS,
    /// else the newest `cargo xtask rootfs`).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// The image of a runtime (`python3.13=PATH/rootfs.ext4`, repeatable; an `image.json`
    /// must be beside it). Default: the newest `cargo xtask images` build of each.
    #[arg(long = "image", value_name = "RUNTIME=PATH")]
    pub images: Vec<String>,
    /// The runtime of sandboxes whose request names none.
    #[arg(long, default_value = ember_client::images::BASE_RUNTIME)]
    pub default_runtime: String,
    /// At most this many sandboxes run at once.
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: usize,
    /// The unprivileged user each sandbox's VMM runs as, inside its jail.
    #[arg(long, default_value_t = jail::DEFAULT_JAIL_ID)]
    pub jail_uid: u32,
    /// The group each sandbox's VMM runs as.
    #[arg(long, default_value_t = jail::DEFAULT_JAIL_ID)]
    pub jail_gid: u32,
    /// Run VMMs without their jail (namespaces, a private root, an unprivileged user). A
    /// service not run as root cannot build jails, and says so.
    #[arg(long)]
    pub no_jail: bool,
    /// Keep at most this many bytes of snapshots' materialised memory (STATE_DIR/mem-cache),
    /// least recently used evicted first; restores of a materialised snapshot map it
    /// instead of copying its pages from the store.
    #[arg(long, default_value_t = mem_cache::DEFAULT_MEM_CACHE_BYTES)]
    pub mem_cache_bytes: u64,
    /// Keep this many VMM processes started ahead of time (jailed, in their cgroups, their
    /// store open), waiting to be given a sandbox without a network namespace: a create or
    /// a restore then starts no process while the request waits.
    #[arg(long, default_value_t = 0)]
    pub warm_pool: usize,
    /// Also answer API connections from this user (repeatable; root and the service's own
    /// user always may). Checked on every connection (`SO_PEERCRED`).
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// Also answer API connections from processes of this group (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,
    /// Start even where sandboxes cannot get cgroup limits (memory, CPU, tasks): without
    /// it such a service refuses to start.
    #[arg(long)]
    pub allow_no_cgroup_limits: bool,
    /// How long a stopped or failed sandbox's record, log and disk are kept before they are
    /// deleted (its snapshots stay), in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub retention_s: u64,
    /// A remote tier shared with other hosts (`s3://BUCKET/PREFIX`; endpoint, region and
    /// credentials from the `AWS_*` environment): snapshots are pushed there, and a
    /// snapshot not in this host's store is fetched from there.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// When snapshots are pushed to the remote.
    #[arg(long, value_enum, default_value = "always")]
    pub push: remote::PushPolicy,
    /// Bound on one request to the remote, in seconds.
    #[arg(long, default_value_t = 30)]
    pub remote_timeout_s: u64,
    /// How long after it is ready a sandbox restored from a snapshot only the remote had
    /// begins fetching the rest of that snapshot in the background, in seconds (until then
    /// only the pages the guest touches come); once it is here, later restores are local.
    #[arg(long, default_value_t = 0)]
    pub remote_rest_after_s: u64,
    /// Bound on the bytes of snapshots this host fetched from the remote (not those it
    /// took): past it, the least recently restored are dropped here (the remote keeps
    /// them). Default: no bound.
    #[arg(long, value_name = "BYTES")]
    pub remote_cache_bytes: Option<u64>,
    /// The name server egress sandboxes' resolvers ask (`ADDR:PORT`, repeatable; default:
    /// the IPv4 name servers of /etc/resolv.conf, loopback ones included).
    #[arg(long = "dns-upstream", value_name = "ADDR:PORT")]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    #[command(flatten)]
    pub remote_access: remote_access::RemoteAccessArgs,
}

pub struct ServiceConfig {
    pub state_dir: PathBuf,
    pub store_dir: PathBuf,
    pub kernel: PathBuf,
    /// The base runtime's image.
    pub rootfs: PathBuf,
    /// Every runtime's image, the base one included.
    pub runtimes: runtimes::Runtimes,
    /// The VMM program each sandbox runs in (`ember-vmm`).
    pub vmm_program: PathBuf,
    pub max_sandboxes: usize,
    /// Who VMMs run as in their jails (none: VMMs are not jailed).
    pub jail: Option<jail::JailIds>,
    /// How long stopped and failed sandboxes are kept.
    pub retention: Duration,
    /// The name servers sandboxes' resolvers ask.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

pub struct AppState {
    pub config: ServiceConfig,
    pub sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    pub store: Arc<ember_snapshot_store::Store>,
    pub metrics: metrics::Metrics,
    /// Reclaims the store's space after snapshots are deleted.
    pub gc: Arc<gc::StoreGc>,
    /// Where sandboxes' cgroups go (none: the host has no usable cgroup v2 hierarchy).
    pub cgroups: Option<cgroup::Cgroups>,
    /// Snapshots' memory materialised for restores to map.
    pub mem_cache: Arc<mem_cache::MemoryCache>,
    /// VMMs started ahead of time (none: `--warm-pool 0`).
    pub pool: Option<Arc<pool::WarmPool>>,
    /// The remote tier (none: `--remote` not given).
    pub remote: Option<Arc<remote::RemoteTier>>,
    /// Templates being built.
    pub templates: templates::Building,
}

impl AppState {
    pub fn sandbox(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("sandbox", id))
    }
}

/// The default state directory: `$EMBER_STATE_DIR`, else `~/.local/share/ember`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBER_STATE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/ember")
}

/// The API socket: `--socket`, else `$EMBER_SOCKET`, else `STATE_DIR/ember.sock`.
pub fn default_socket(state_dir: Option<&std::path::Path>) -> PathBuf {
    if let Some(path) = std::env::var_os("EMBER_SOCKET") {
        return PathBuf::from(path);
    }
    state_dir
        .map(PathBuf::from)
        .unwrap_or_else(default_state_dir)
        .join("ember.sock")
}

/// Why the VMM program cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum VmmProgramError {
    #[error("cannot find its own program: {0}")]
    OwnProgram(#[source] std::io::Error),
    #[error(
        "the VMM program {} is missing (build it with `cargo build -p ember-sandbox`, or set \
         EMBER_VMM_PROGRAM)",
        .0.display()
    )]
    Missing(PathBuf),
}

/// The VMM program: `$EMBER_VMM_PROGRAM`, else `ember-vmm` beside this program (cargo builds
/// both into one folder; an install puts them side by side).
fn vmm_program() -> Result<PathBuf, VmmProgramError> {
    let program = match std::env::var_os("EMBER_VMM_PROGRAM") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .map_err(VmmProgramError::OwnProgram)?
            .with_file_name("ember-vmm"),
    };
    if !program.is_file() {
        return Err(VmmProgramError::Missing(program));
    }
    Ok(program)
}

pub fn serve(args: ServeArgs) -> i32 {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| default_socket(Some(&state_dir)));
    let facts = ember_vmm::probe::HostFacts::read();
    if !facts.kind().runs_linux() {
        eprintln!(
            "ember serve: this host's KVM is {} and cannot run a Linux guest; see `ember \
             doctor`, or run ember in the lab: `cargo xtask lab -- ember serve …`",
            facts.kind().label()
        );
        return 2;
    }
    let Some(kernel) = args
        .kernel
        .clone()
        .or_else(ember_sandbox::defaults::default_kernel)
    else {
        eprintln!("ember serve: no --kernel given and none built (run `cargo xtask kernel`)");
        return 2;
    };
    let Some(rootfs) = args
        .rootfs
        .clone()
        .or_else(ember_sandbox::defaults::default_rootfs)
    else {
        eprintln!("ember serve: no --rootfs given and none built (run `cargo xtask rootfs`)");
        return 2;
    };
    let remote_access = match remote_access::RemoteAccess::from_args(&args.remote_access) {
        Ok(access) => access,
        Err(e) => {
            eprintln!("ember serve: {e}");
            return 2;
        }
    };
    import::remove_unfinished(&state_dir);
    let runtimes = match runtimes::Runtimes::discover(
        &rootfs,
        &args.images,
        Some(&args.default_runtime),
        Some(&import::imported_dir(&state_dir)),
    ) {
        Ok(runtimes) => runtimes,
        Err(e) => {
            eprintln!("ember serve: {e}");
            return 2;
        }
    };
    let vmm_program = match vmm_program() {
        Ok(program) => program,
        Err(e) => {
            eprintln!("ember serve: {e}");
            return 1;
        }
    };
    let mem_cache_dir = state_dir.join("mem-cache");
    // The state (records with their environments, logs, guests' disks and memory) is the
    // service's alone; jailed VMMs reach their own parts through bind mounts.
    if let Err(e) = access::private_dir(&state_dir) {
        eprintln!(
            "ember serve: cannot make {} private: {e}",
            state_dir.display()
        );
        return 1;
    }
    for dir in [
        state_dir.join("sandboxes"),
        state_dir.join("run"),
        mem_cache_dir.clone(),
    ] {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("ember serve: cannot create {}: {e}", dir.display());
            return 1;
        }
    }
    let store_dir = state_dir.join("store");
    if let Err(e) = std::fs::create_dir_all(&store_dir) {
        eprintln!("ember serve: cannot create {}: {e}", store_dir.display());
        return 1;
    }
    let jail = match jail::JailIds::for_service(&args, &store_dir) {
        Ok(jail) => jail,
        Err(e) => {
            eprintln!("ember serve: {e}");
            return 1;
        }
    };
    // The service alone writes the store (VMMs read it, and snapshot into staging folders
    // the service ingests from); it reads with bounds checks, never through a mapping of a
    // file someone else could truncate.
    let store_options = ember_snapshot_store::StoreOptions {
        map_packs: false,
        group: jail.map(|ids| ids.gid),
        ..Default::default()
    };
    let store = match ember_snapshot_store::Store::open_with(&store_dir, store_options) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!(
                "ember serve: cannot open the snapshot store {}: {e}",
                store_dir.display()
            );
            return 1;
        }
    };
    let remote = match &args.remote {
        None => None,
        Some(url) => {
            let options = ember_remote::RemoteOptions {
                request_timeout: Duration::from_secs(args.remote_timeout_s.max(1)),
                cache_dir: Some(state_dir.join("remote-cache")),
                ..Default::default()
            };
            match ember_remote::Remote::open(url, options) {
                Ok(r) => {
                    log::info!("snapshots are shared through {url} (push: {:?})", args.push);
                    Some(Arc::new(remote::RemoteTier::new(
                        r,
                        args.push,
                        Duration::from_secs(args.remote_rest_after_s),
                        remote_cache::RemoteCache::load(
                            state_dir.join("remote-cache.json"),
                            args.remote_cache_bytes,
                        ),
                    )))
                }
                Err(e) => {
                    eprintln!("ember serve: {e}");
                    return 1;
                }
            }
        }
    };
    let cgroups = cgroup::Cgroups::detect(std::path::Path::new("/sys/fs/cgroup"), &state_dir);
    let dns_upstreams = if args.dns_upstreams.is_empty() {
        network::host_name_servers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        args.dns_upstreams.clone()
    };
    if dns_upstreams.is_empty() {
        log::warn!("no name server in /etc/resolv.conf nor --dns-upstream: egress sandboxes' names will not resolve");
    }
    let state = Arc::new(AppState {
        config: ServiceConfig {
            state_dir,
            store_dir,
            kernel,
            rootfs,
            runtimes,
            vmm_program,
            max_sandboxes: args.max_sandboxes.max(1),
            jail,
            retention: Duration::from_secs(args.retention_s),
            dns_upstreams,
        },
        sandboxes: Mutex::new(HashMap::new()),
        store,
        metrics: metrics::Metrics::default(),
        gc: Arc::default(),
        mem_cache: Arc::new(mem_cache::MemoryCache::new(
            mem_cache_dir,
            args.mem_cache_bytes,
            jail.map(|ids| ids.gid),
        )),
        pool: (args.warm_pool > 0).then(|| Arc::new(pool::WarmPool::new(args.warm_pool))),
        remote,
        templates: Default::default(),
        cgroups: match cgroups {
            Ok(cgroups) => {
                log::info!(
                    "sandboxes get cgroup v2 limits under {}",
                    cgroups.root().display()
                );
                Some(cgroups)
            }
            Err(e) if args.allow_no_cgroup_limits => {
                log::warn!("sandboxes run without cgroup limits (--allow-no-cgroup-limits): {e}");
                None
            }
            Err(e) => {
                eprintln!(
                    "ember serve: sandboxes cannot get cgroup limits: {e}; give the service a \
                     delegated cgroup v2 (systemd: Delegate=yes), or start it with \
                     --allow-no-cgroup-limits"
                );
                return 1;
            }
        },
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember serve: cannot start the async runtime: {e}");
            return 1;
        }
    };
    // SAFETY: geteuid takes no arguments and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    let peers = access::PeerPolicy::new(own_uid, &args.allow_uids, &args.allow_gids);
    match runtime.block_on(run_service(state, socket, peers, remote_access)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ember serve: {e}");
            1
        }
    }
}

/// Why the service stopped serving.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("cannot {what} {}: {source}", socket.display())]
    Socket {
        what: &'static str,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot handle SIGTERM or SIGHUP: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    RemoteAccess(#[from] remote_access::RemoteAccessError),
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

async fn run_service(
    state: Arc<AppState>,
    socket: PathBuf,
    peers: access::PeerPolicy,
    remote_access: Option<remote_access::RemoteAccess>,
) -> Result<(), ServeError> {
    sandbox::recover(&state).await;
    tokio::spawn(state.gc.clone().run(state.store.clone()));
    if state.config.jail.is_some() {
        let live: std::collections::HashSet<String> = state
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.record().net.is_some() && s.state().is_live())
            .map(|s| s.id.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || network::remove_stale(&live)).await;
    }
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ServeError::Socket {
                what: "replace",
                socket,
                source: e,
            })
        }
        _ => {}
    }
    let socket_error = |what: &'static str, socket: &Path| {
        let socket = socket.to_path_buf();
        move |source| ServeError::Socket {
            what,
            socket,
            source,
        }
    };
    let listener =
        tokio::net::UnixListener::bind(&socket).map_err(socket_error("listen on", &socket))?;
    std::fs::set_permissions(
        &socket,
        std::os::unix::fs::PermissionsExt::from_mode(access::SOCKET_MODE),
    )
    .map_err(socket_error("set the mode of", &socket))?;
    let listener = access::CheckedListener::new(listener, peers);
    let remote = match remote_access {
        Some(access) => {
            let bound = access.bind().await?;
            bound
                .reload_tokens_on_sighup()
                .map_err(ServeError::Signal)?;
            Some(bound)
        }
        None => None,
    };
    tokio::spawn(sandbox::reap_expired(state.clone()));
    if let Some(pool) = &state.pool {
        tokio::spawn(pool.clone().run(state.clone()));
    }
    log::info!(
        "ember serve: listening on {} (state in {})",
        socket.display(),
        state.config.state_dir.display()
    );
    let app = router(state.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signal)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        log::info!(
            "ember serve: stopping (sandboxes keep running; a restarted service adopts them)"
        );
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let local = axum::serve(listener, app.clone()).with_graceful_shutdown(stopped(stop_rx.clone()));
    match remote {
        Some(remote) => {
            let remote = remote.serve(app, stopped(stop_rx));
            tokio::try_join!(std::future::IntoFuture::into_future(local), remote)
                .map_err(ServeError::Serve)?;
        }
        None => local.await.map_err(ServeError::Serve)?,
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

pub use api::{
    check_env, check_limits, control, parse_body, parse_query, router, JsonBody, QueryResult,
};
pub(crate) use api::{check_env_map, check_timeout};
