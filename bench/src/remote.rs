//! Restores from the remote tier (`--remote`): the snapshot the local restores start from,
//! pushed by the run's service (host A), restored by a service with an empty store (host
//! B, a new one for each sample) lazily and whole, then again on B once the snapshot is
//! local (the warm cache); and the bytes two hosts upload for the same installs.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use ember_client::ApiClient;
use ember_testkit::S3Server;

use crate::report::{Better, Figure, StartTimeline};
use crate::service::{Api, CallError, OwnService, ServiceOptions};
use crate::{
    push_start, say, start_once, step, timeline_medians, BenchArgs, BenchError, StartSample,
};

const MIB: f64 = 1048576.0;

/// The remote the run measures, and the server it started for it (if any).
pub(crate) struct RemoteSetup {
    /// `s3://BUCKET/PREFIX` of this run (a prefix of its own under the one given).
    url: String,
    env: Vec<(String, String)>,
    _server: Option<S3Server>,
}

impl RemoteSetup {
    /// `moto`: an S3-compatible server on loopback that this run starts; otherwise an
    /// `s3://BUCKET/PREFIX` the `AWS_*` environment reaches.
    pub(crate) fn new(spec: &str) -> Result<RemoteSetup, BenchError> {
        let run = format!("bench-{}", ember_service::sandbox::unix_ms());
        if spec == "moto" {
            let server = S3Server::start("ember-bench")?;
            return Ok(RemoteSetup {
                url: server.url(&run),
                env: server
                    .env()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                _server: Some(server),
            });
        }
        if !spec.starts_with("s3://") {
            return Err(BenchError::RemoteSpec(spec.to_string()));
        }
        Ok(RemoteSetup {
            url: format!("{}/{run}", spec.trim_end_matches('/')),
            env: Vec::new(),
            _server: None,
        })
    }

    /// A service on `prefix` of this run's remote with `args` besides.
    fn service(&self, prefix: &str, args: &[&str], warm_pool: Option<usize>) -> ServiceOptions {
        let url = format!("{}/{prefix}", self.url);
        ServiceOptions {
            args: ["--remote", url.as_str()]
                .iter()
                .chain(args)
                .map(|a| a.to_string())
                .collect(),
            env: self.env.clone(),
            warm_pool,
        }
    }

    /// Host A: the run's own service, which pushes only when asked.
    pub(crate) fn host_a(&self) -> ServiceOptions {
        self.service("restores", &["--push", "on-request"], None)
    }
}

/// What one remote-restore sample measured.
#[derive(Default)]
struct Samples {
    lazy: Vec<StartSample>,
    warm: Vec<StartSample>,
    whole: Vec<StartSample>,
    before_start_mib: Vec<f64>,
    before_ready_mib: Vec<f64>,
    lazy_all_mib: Vec<f64>,
    warm_mib: Vec<f64>,
    whole_mib: Vec<f64>,
}

/// Restores of `bench-base` from the remote on empty hosts, `runs` of each, next to the local
/// ones measured before in this run; and the uploads of identical installs from two hosts.
pub(crate) async fn measure(
    args: &BenchArgs,
    a: &Api,
    setup: &RemoteSetup,
    runs: u32,
    cold: (Option<f64>, Option<f64>),
    figures: &mut Vec<Figure>,
    timelines: &mut Vec<StartTimeline>,
) -> Result<(), BenchError> {
    say("pushing bench-base to the remote");
    push(a, "bench-base")
        .await
        .map_err(step("pushing the snapshot"))?;
    let mut samples = Samples::default();
    for run in 1..=runs {
        say(&format!(
            "remote restores {run}/{runs}: lazy then warm on an empty host, whole on another"
        ));
        lazy_then_warm(args, setup, &mut samples).await?;
        whole(args, setup, &mut samples).await?;
    }
    let starts = [
        (
            "remote.lazy",
            "restore from the remote on an empty host (lazy)",
            &samples.lazy,
        ),
        (
            "remote.whole",
            "restore from the remote on an empty host (whole fetch first)",
            &samples.whole,
        ),
        (
            "remote.warm",
            "restore of a snapshot fetched earlier (prefetch)",
            &samples.warm,
        ),
    ];
    for (key, label, taken) in starts {
        push_start(figures, key, label, taken, Some(cold));
        timelines.push(timeline_medians(key, taken));
    }
    let bytes = [
        (
            "remote.lazy.before_start_mib",
            "lazy restore from the remote: downloaded before the VMM started (head, working set)",
            samples.before_start_mib,
        ),
        (
            "remote.lazy.before_ready_mib",
            "lazy restore from the remote: downloaded before ready",
            samples.before_ready_mib,
        ),
        (
            "remote.lazy.downloaded_mib",
            "lazy restore from the remote: downloaded in all (the rest in the background)",
            samples.lazy_all_mib,
        ),
        (
            "remote.whole.downloaded_mib",
            "whole restore from the remote: downloaded (the stored snapshot)",
            samples.whole_mib,
        ),
        (
            "remote.warm.downloaded_mib",
            "restore of a snapshot fetched earlier: downloaded",
            samples.warm_mib,
        ),
    ];
    for (key, label, values) in bytes {
        figures.push(Figure::new(key, label, "MiB", Better::Lower, values));
    }
    uploads(args, setup, figures).await
}

/// A new host B with an empty store, on the prefix host A pushed to.
fn empty_host(args: &BenchArgs, setup: &RemoteSetup) -> Result<(OwnService, Api), BenchError> {
    let (host, socket) = OwnService::start(args, &setup.service("restores", &[], None))?;
    Ok((host, Api(ApiClient::new(&socket))))
}

/// A restore of `bench-base` in `mode` on `api`'s host, its sandbox kept: the start, the
/// sandbox and what the host had downloaded before it.
async fn restore_base(api: &Api, mode: &str) -> Result<(StartSample, String, u64), CallError> {
    let before = downloaded(api).await?;
    let body = json!({"snapshot": "bench-base", "restore_mode": mode});
    let (sample, id) = start_once(api, body, true).await?;
    Ok((sample, id, before))
}

/// One empty host B: a lazy restore of `bench-base` (bytes before ready from the sandbox's
/// record), then, once the rest arrived, a restore of the now local snapshot.
async fn lazy_then_warm(
    args: &BenchArgs,
    setup: &RemoteSetup,
    samples: &mut Samples,
) -> Result<(), BenchError> {
    let (host, api) = empty_host(args, setup)?;
    let measured = async {
        let (lazy, id, before) = restore_base(&api, "prefetch").await?;
        let record = api.sandbox(&id).await?;
        let fetched = |name: &'static str| {
            record["remote_fetch"][name]
                .as_u64()
                .ok_or_else(|| CallError::Missing {
                    what: name,
                    answer: record.clone(),
                })
        };
        let (before_start, before_ready) = (
            fetched("bytes_before_start")?,
            fetched("bytes_before_ready")?,
        );
        api.delete(&id).await?;
        wait_local(&api, "bench-base").await?;
        let (warm, id, after_lazy) = restore_base(&api, "prefetch").await?;
        api.delete(&id).await?;
        let after_warm = downloaded(&api).await?;
        samples.lazy.push(lazy);
        samples.warm.push(warm);
        samples.before_start_mib.push(before_start as f64 / MIB);
        samples.before_ready_mib.push(before_ready as f64 / MIB);
        samples
            .lazy_all_mib
            .push(after_lazy.saturating_sub(before) as f64 / MIB);
        samples
            .warm_mib
            .push(after_warm.saturating_sub(after_lazy) as f64 / MIB);
        Ok(())
    }
    .await;
    measured.map_err(|e| with_log(&host, "lazy restore from the remote", e))
}

/// One empty host B: a restore that fetches all of `bench-base` before its VMM starts.
async fn whole(
    args: &BenchArgs,
    setup: &RemoteSetup,
    samples: &mut Samples,
) -> Result<(), BenchError> {
    let (host, api) = empty_host(args, setup)?;
    let measured = async {
        let (whole, id, before) = restore_base(&api, "file").await?;
        api.delete(&id).await?;
        samples.whole.push(whole);
        samples
            .whole_mib
            .push(downloaded(&api).await?.saturating_sub(before) as f64 / MIB);
        Ok(())
    }
    .await;
    measured.map_err(|e| with_log(&host, "whole restore from the remote", e))
}

/// Bytes uploaded by two hosts pushing snapshots of the same install (2 with --quick, else
/// 10): the first host's first push against all of them.
async fn uploads(
    args: &BenchArgs,
    setup: &RemoteSetup,
    figures: &mut Vec<Figure>,
) -> Result<(), BenchError> {
    let per_host = if args.quick { 1 } else { 5 };
    say(&format!(
        "{} snapshots of the same install pushed from two hosts",
        per_host * 2
    ));
    let options = setup.service("uploads", &["--push", "always"], Some(0));
    let hosts = [
        OwnService::start(args, &options)?,
        OwnService::start(args, &options)?,
    ];
    let mut pushed = Vec::new();
    for (h, (service, socket)) in hosts.iter().enumerate() {
        let api = Api(ApiClient::new(socket));
        for i in 0..per_host {
            let name = format!("same-install-{h}-{i}");
            let measured = async {
                let before = uploaded(&api).await?;
                api.installed_snapshot(json!({}), &name).await?;
                wait_pushed(&api, &name).await?;
                Ok::<u64, CallError>(uploaded(&api).await?.saturating_sub(before))
            }
            .await;
            pushed.push(measured.map_err(|e| with_log(service, "pushing an install", e))?);
        }
    }
    let mib = |b: u64| b as f64 / MIB;
    figures.push(Figure::new(
        "remote.upload.first_mib",
        "uploaded for the first snapshot of an install",
        "MiB",
        Better::Lower,
        vec![mib(pushed[0])],
    ));
    figures.push(Figure::new(
        "remote.upload.all_mib",
        &format!(
            "uploaded for {} snapshots of the same install from two hosts",
            pushed.len()
        ),
        "MiB",
        Better::Lower,
        vec![mib(pushed.iter().sum())],
    ));
    Ok(())
}

/// A failed step on a host this module started, with the end of that host's log.
fn with_log(host: &OwnService, what: &str, source: CallError) -> BenchError {
    let log = std::fs::read_to_string(host.state_dir.join("serve.log")).unwrap_or_default();
    let mut tail: Vec<&str> = log.lines().rev().take(30).collect();
    tail.reverse();
    BenchError::OnHost {
        what: what.into(),
        log_tail: tail.join("\n"),
        source: Box::new(source),
    }
}

async fn downloaded(api: &Api) -> Result<u64, CallError> {
    let [bytes] = api.metrics(["ember_remote_downloaded_bytes_total"]).await?;
    bytes.ok_or(CallError::NoMetric("ember_remote_downloaded_bytes_total"))
}

async fn uploaded(api: &Api) -> Result<u64, CallError> {
    let [bytes] = api.metrics(["ember_remote_uploaded_bytes_total"]).await?;
    bytes.ok_or(CallError::NoMetric("ember_remote_uploaded_bytes_total"))
}

/// Asks for snapshot `id` to be pushed and waits until the remote has it.
async fn push(api: &Api, id: &str) -> Result<(), CallError> {
    api.push(id).await?;
    wait_pushed(api, id).await
}

/// Polls snapshot `id` until `done` says its description is final (for up to 10 minutes).
async fn wait_for(
    api: &Api,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> Result<bool, CallError>,
) -> Result<(), CallError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let described = api.snapshot_info(id).await?;
        if done(&described)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CallError::NotWithin {
                what: format!("snapshot {id} {what}"),
                limit_s: 600,
                last: described.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_pushed(api: &Api, id: &str) -> Result<(), CallError> {
    wait_for(api, id, "pushed", |d| match d["remote"].as_str() {
        Some("remote") => Ok(true),
        Some("push_failed") => Err(CallError::Implausible(format!(
            "pushing snapshot {id} failed: {d}"
        ))),
        _ => Ok(false),
    })
    .await
}

/// Waits until the rest of snapshot `id`, restored lazily, has arrived.
async fn wait_local(api: &Api, id: &str) -> Result<(), CallError> {
    wait_for(api, id, "local", |d| Ok(d["local"] == json!(true))).await
}
