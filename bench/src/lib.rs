//! `ember-bench`: cold vs warm start, end to end through the service, the way API users see
//! it, with one persistent client (no process start-up per request in the figures).
//!
//! Every figure is the median and spread of N runs made in this one session, and names its
//! environment: hardware KVM, or the lab (nested KVM under QEMU TCG), where absolute times are
//! ~20-30x native and fixed per-event costs (exits, faults, context switches) weigh more.
//! Start-up figures carry their ratio to the cold boot's same figure.

//!
//! A development tool: it lives outside the shipped programs and drives the `ember` beside it.
//! It must not be a dependency of any product crate.

mod density;
mod remote;
pub mod report;
mod service;
pub mod soak;
mod templates;
mod throughput;

use service::{id_of, Api, CallError, OwnService, ServiceOptions};

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use ember_client::ApiClient;
use report::{median, regressions, Better, FaultSeries, Figure, Report, StartTimeline, SCHEMA};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Measure fewer runs and sizes (minutes in the lab).
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure (default: 3 with --quick, else 5).
    #[arg(long)]
    pub runs: Option<u32>,
    /// Where the report (JSON, Markdown, SVG charts) goes.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// A previous `report.json`: figures worse by more than --threshold-pct fail the run.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    #[arg(long, default_value_t = 15.0)]
    pub threshold_pct: f64,
    /// Measure this running service instead of starting one (store figures need
    /// --state-dir too).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The state directory of the service given with --socket.
    #[arg(long, requires = "socket")]
    pub state_dir: Option<PathBuf>,
    /// Measure nothing: write the Markdown and charts of this earlier `report.json` to --out.
    #[arg(long, conflicts_with_all = ["compare", "socket"])]
    pub render: Option<PathBuf>,
    /// Instead of the benchmark: a soak of this many cycles (create, exec, snapshot, restore,
    /// exec, delete) against a service this run starts, with the service's file descriptors,
    /// threads and memory after each (`soak.json`, `soak.md`, `soak.svg` in --out); fails on
    /// growth beyond noise or anything left behind.
    #[arg(long, value_name = "CYCLES", conflicts_with_all = ["compare", "socket", "render"])]
    pub soak: Option<u32>,
    /// Soak cycles run at once (each its own sequence of sandboxes and snapshot).
    #[arg(long, value_name = "K", default_value_t = 1, requires = "soak")]
    pub soak_streams: u32,
    /// Continue the unfinished soak whose `soak.json` this is (say, after the machine running
    /// it died), in a new service, up to --soak cycles in all.
    #[arg(long, value_name = "SOAK_JSON", requires = "soak")]
    pub soak_resume: Option<PathBuf>,
    /// Run nothing: judge the soak whose `soak.json` this is again, by this version's rules for
    /// growth (failed cycles and leftovers stay as recorded), and write its report to --out.
    #[arg(long, value_name = "SOAK_JSON", conflicts_with_all = ["compare", "socket", "render", "soak"])]
    pub soak_judge: Option<PathBuf>,
    /// Also measure a real `pip install` in a python3.13 sandbox against restores of the
    /// snapshot taken after it (reaches the package index: needs a network that does).
    #[arg(long)]
    pub installs: bool,
    /// The warm pool of the service this starts for the figures (`ember serve --warm-pool`;
    /// a soak's service has none, so every cycle starts its own processes).
    #[arg(long, default_value_t = 2)]
    pub warm_pool: usize,
    /// Also measure restores from a remote tier on empty hosts, lazy and whole, and the
    /// uploads of identical installs from two hosts: `moto` (an S3-compatible server this
    /// run starts on loopback) or `s3://BUCKET/PREFIX` (reached through the `AWS_*`
    /// environment; the run writes under a prefix of its own there).
    #[arg(long, value_name = "moto|URL", conflicts_with_all = ["socket", "render", "soak"])]
    pub remote: Option<String>,
    /// How many clones of one snapshot run at once for each density point (comma-separated).
    #[arg(long, value_name = "K,K,…", value_delimiter = ',', default_value = "1,2,4,8",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub density_clones: Vec<u32>,
    /// Kernel and rootfs for the service this starts (default: as `ember serve`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("starting the service: {what}: {source}")]
    ServiceIo {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ember serve` exited ({status}):\n{log}")]
    ServiceExited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("`ember serve` made no API socket within 60 s")]
    NoSocket,
    #[error("starting the S3 server for the remote figures: {0}")]
    S3Server(#[from] ember_testkit::StartError),
    #[error("--remote {0:?} is neither `moto` nor s3://BUCKET/PREFIX")]
    RemoteSpec(String),
    #[error("{what}: {source}")]
    Step {
        what: String,
        #[source]
        source: Box<CallError>,
    },
    #[error("{what}: {source}\nthe end of that service's log:\n{log_tail}")]
    OnHost {
        what: String,
        log_tail: String,
        #[source]
        source: Box<CallError>,
    },
    #[error(transparent)]
    Report(#[from] report::ReportError),
}

/// Names the step a failed call belongs to.
fn step(what: impl Into<String>) -> impl FnOnce(CallError) -> BenchError {
    let what = what.into();
    move |source| BenchError::Step {
        what,
        source: Box::new(source),
    }
}

/// The "install" every measured snapshot holds: byte-identical files and warm imports.
const INSTALL: &str = "mkdir -p /opt/pkg && cp -r /usr/lib/python3.11/json /opt/pkg/ && \
                       python3 -c 'import json, email' && sync";

pub fn run(args: BenchArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ember-bench: {e}");
            return 1;
        }
    };
    match runtime.block_on(bench(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember-bench: {e}");
            1
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// One start (cold boot or restore) measured: request → agent ready → first exec done,
/// and the service's timeline of it.
struct StartSample {
    ready_ms: f64,
    first_exec_ms: f64,
    vmm_ready_ms: Option<f64>,
    timeline: Vec<ember_vmm::Milestone>,
}

async fn start_once(
    api: &Api,
    body: Value,
    keep: bool,
) -> Result<(StartSample, String), CallError> {
    // Every start finds the warm pool full, as on a service with spare capacity: a pool
    // still refilling from the last start would compete for the lab's two CPUs.
    api.wait_pool_full().await?;
    let t0 = Instant::now();
    let sandbox = api.create(body).await?;
    let ready_ms = ms(t0);
    let id = id_of(&sandbox)?;
    api.exec(&id, "true", &[]).await?;
    let first_exec_ms = ms(t0);
    let described = api.sandbox(&id).await?;
    let timeline = serde_json::from_value(described["timeline"].clone()).unwrap_or_default();
    if !keep {
        api.delete(&id).await?;
    }
    Ok((
        StartSample {
            ready_ms,
            first_exec_ms,
            vmm_ready_ms: sandbox["ready_ms"].as_f64(),
            timeline,
        },
        id,
    ))
}

/// The median time of each step over `samples`, in the order the steps were reached.
fn timeline_medians(start: &str, samples: &[StartSample]) -> StartTimeline {
    let mut steps: Vec<String> = Vec::new();
    for sample in samples {
        for m in &sample.timeline {
            if !steps.contains(&m.step) {
                steps.push(m.step.clone());
            }
        }
    }
    let mut medians: Vec<(String, f64)> = steps
        .into_iter()
        .filter_map(|step| {
            let times: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.timeline.iter().find(|m| m.step == step).map(|m| m.ms))
                .collect();
            median(&times).map(|m| (step, m))
        })
        .collect();
    medians.sort_by(|a, b| a.1.total_cmp(&b.1));
    StartTimeline {
        start: start.to_string(),
        steps: medians,
    }
}

/// The full and diff snapshot times of a `mem_mib` guest, from the snapshots' answers.
fn push_snapshot_figures(figures: &mut Vec<Figure>, mem_mib: u32, full: &Value, diff: &Value) {
    for (name, answer) in [("full", full), ("diff", diff)] {
        if let Some(took) = answer["took_ms"].as_f64() {
            figures.push(Figure::new(
                &format!("snapshot.{name}.{mem_mib}mib_ms"),
                &format!("snapshot ({name}, {mem_mib} MiB guest, running sandbox)"),
                "ms",
                Better::Lower,
                vec![took],
            ));
        }
    }
}

/// Whether this runs inside the lab (its init sets `EMBER_IN_LAB`).
fn in_lab() -> bool {
    std::env::var_os("EMBER_IN_LAB").is_some()
}

fn environment() -> String {
    if in_lab() {
        "the lab (nested KVM under QEMU TCG)".into()
    } else {
        let facts = ember_vmm::probe::HostFacts::read();
        format!("{} KVM", facts.kind().label())
    }
}

async fn bench(args: &BenchArgs) -> Result<i32, BenchError> {
    if let Some(old) = &args.render {
        let report = Report::load(old)?;
        report.write(&args.out)?;
        print!("{}", report.markdown());
        return Ok(0);
    }
    if let Some(path) = &args.soak_judge {
        let mut report = soak::SoakReport::load_into(path, &args.out, in_lab())?;
        report.growth = soak::growth_by_service(&report.samples, &report.service_starts);
        report.write(&args.out)?;
        print!("{}", report.markdown());
        return Ok(if report.passed() { 0 } else { 1 });
    }
    if let Some(cycles) = args.soak {
        return run_soak(args, cycles).await;
    }
    let runs = args.runs.unwrap_or(if args.quick { 3 } else { 5 }).max(1);
    let remote = args
        .remote
        .as_deref()
        .map(remote::RemoteSetup::new)
        .transpose()?;
    let (own, socket, state_dir) = match &args.socket {
        Some(socket) => (None, socket.clone(), args.state_dir.clone()),
        None => {
            let options = remote
                .as_ref()
                .map(remote::RemoteSetup::host_a)
                .unwrap_or_default();
            let (service, socket) = OwnService::start(args, &options)?;
            let state = service.state_dir.clone();
            (Some(service), socket, Some(state))
        }
    };
    let api = Api(ApiClient::new(&socket));
    let started_unix_ms = ember_service::sandbox::unix_ms();
    let mut figures = Vec::new();
    let mut notes = Vec::new();

    let cold = cold_boots(&api, args.quick, runs, &mut figures).await?;
    let mut timelines = vec![timeline_medians("cold", &cold)];
    let cold_figure = |name: &str| figures.iter().find(|f| f.name == name).map(|f| f.median);
    let cold_medians = (
        cold_figure("cold.ready_ms"),
        cold_figure("cold.first_exec_ms"),
    );

    // The snapshot every restore starts from, and a diff on top of it; the same at 512 MiB
    // and 1 GiB in a full run.
    say("install, then full and diff snapshots");
    let (full, diff, mem_mib) = api
        .full_and_diff(json!({}), "bench-base")
        .await
        .map_err(step("full and diff snapshots"))?;
    push_snapshot_figures(&mut figures, mem_mib, &full, &diff);
    if !args.quick {
        for size in [512u32, 1024] {
            say(&format!("full and diff snapshots at {size} MiB"));
            let (full, diff, _) = api
                .full_and_diff(json!({"memory_mib": size}), &format!("bench-{size}"))
                .await
                .map_err(step(format!("full and diff snapshots at {size} MiB")))?;
            push_snapshot_figures(&mut figures, size, &full, &diff);
        }
    }

    let fault_series = restores(&api, runs, cold_medians, &mut figures, &mut timelines).await?;
    if let Some(setup) = &remote {
        remote::measure(
            args,
            &api,
            setup,
            runs,
            cold_medians,
            &mut figures,
            &mut timelines,
        )
        .await?;
    }

    templates::measure(&api, runs, args.installs, &mut figures, &mut notes).await?;

    let density = density::density(&api, &args.density_clones, &mut notes).await;

    if let Some(state) = &state_dir {
        density::store_growth(&api, state, args.quick, &mut figures).await?;
    } else {
        notes.push("store figures skipped: give --state-dir with --socket".into());
    }

    let environment = environment();
    notes.push(format!(
        "Measured in {environment}. Times run from the API request (one persistent client) to \
         the answer; `ready` is the create call's answer (agent answering), `first exec` adds a \
         `true` run to completion."
    ));
    if environment.starts_with("the lab") {
        notes.push(
            "The lab runs the guest as nested KVM under QEMU's TCG: absolute times are ~20-30x \
             native, and per-event costs (VM exits, page faults, context switches) are inflated \
             far more than straight-line code; compare ratios measured in one run."
                .into(),
        );
    }
    let report = Report {
        schema: SCHEMA.into(),
        environment,
        ember_version: env!("CARGO_PKG_VERSION").into(),
        started_unix_ms,
        quick: args.quick,
        runs,
        guest_memory_mib: mem_mib,
        figures,
        density,
        fault_series,
        timelines,
        notes,
    };
    drop(own);
    report.write(&args.out)?;
    print!("{}", report.markdown());
    println!(
        "\nwritten: {}/report.json, report.md, restore-latency.svg, memory-per-clone.svg, \
         faults-after-restore.svg",
        args.out.display()
    );
    if let Some(old) = &args.compare {
        let old = Report::load(old)?;
        let found = regressions(&old, &report, args.threshold_pct);
        if found.is_empty() {
            println!(
                "no figure is more than {}% worse than {}",
                args.threshold_pct, old.environment
            );
        } else {
            for r in &found {
                println!(
                    "REGRESSION {}: {:.2} -> {:.2} ({:.1}% worse)",
                    r.name, r.old, r.new, r.worse_pct
                );
            }
            return Ok(3);
        }
    }
    Ok(0)
}

/// A soak of `cycles` create-exec-snapshot-restore-delete cycles against a service of its own.
async fn run_soak(args: &BenchArgs, cycles: u32) -> Result<i32, BenchError> {
    let resume = match &args.soak_resume {
        Some(path) => Some(soak::SoakReport::load_into(path, &args.out, in_lab())?),
        None => None,
    };
    let (service, socket) = OwnService::start(args, &ServiceOptions::default())?;
    let api = Api(ApiClient::new(&socket));
    let report = soak::soak(
        &api,
        service.child.id(),
        &service.state_dir,
        soak::SoakPlan {
            cycles: cycles.max(1),
            streams: args.soak_streams,
            environment: environment(),
            out: &args.out,
            resume,
        },
    )
    .await?;
    drop(service);
    report.write(&args.out)?;
    print!("{}", report.markdown());
    Ok(if report.passed() { 0 } else { 1 })
}

/// Cold boots, and the exec round trip and data rates on the first one's sandbox.
async fn cold_boots(
    api: &Api,
    quick: bool,
    runs: u32,
    figures: &mut Vec<Figure>,
) -> Result<Vec<StartSample>, BenchError> {
    say(&format!("cold boot x{runs}"));
    let mut cold = Vec::new();
    let mut round_trips = Vec::new();
    let mut rates = Vec::new();
    for i in 0..runs {
        let (sample, id) = start_once(api, json!({}), i == 0)
            .await
            .map_err(step("cold boot"))?;
        if i == 0 {
            for _ in 0..runs.max(5) {
                let t = Instant::now();
                api.exec(&id, "true", &[])
                    .await
                    .map_err(step("exec round trip"))?;
                round_trips.push(ms(t));
            }
            throughput::throughput(api, &id, quick, runs, &mut rates).await?;
            api.delete(&id).await.map_err(step("delete"))?;
        }
        cold.push(sample);
    }
    push_start(figures, "cold", "cold boot", &cold, None);
    figures.push(Figure::new(
        "exec.round_trip_ms",
        "exec `true` on a running sandbox (round trip)",
        "ms",
        Better::Lower,
        round_trips,
    ));
    figures.append(&mut rates);
    Ok(cold)
}

/// Progress on stderr, with the seconds since the first progress line: a slow step shows
/// itself.
fn say(what: &str) {
    static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let elapsed = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("ember-bench: [{elapsed:>7.1} s] {what}");
}

/// Restores of `bench-base` in each mode, `runs` each (after the service materialised its
/// memory for `file`); the first lazy and prefetch restores' faults over time.
async fn restores(
    api: &Api,
    runs: u32,
    cold: (Option<f64>, Option<f64>),
    figures: &mut Vec<Figure>,
    timelines: &mut Vec<StartTimeline>,
) -> Result<Vec<FaultSeries>, BenchError> {
    // Restores in each mode; `file` maps the memory the service materialised after the
    // snapshot.
    api.wait_materialised("bench-base")
        .await
        .map_err(step("materialising the snapshot's memory"))?;
    let mut fault_series = Vec::new();
    for mode in ["file", "prefetch", "lazy", "eager"] {
        let body = json!({"snapshot": "bench-base", "restore_mode": mode});
        if mode == "prefetch" {
            // The first prefetch restore records the working set the next ones load.
            start_once(api, body.clone(), false)
                .await
                .map_err(step("recording the working set"))?;
        }
        if mode == "file" {
            // A snapshot's first restore is its own figure: in the lab it is the slow one,
            // because the emulator translates the guest's code again wherever it finds it
            // in physical pages it has not run from (the memory file's, new after the
            // snapshot); `benches/restore-cli.sh` shows the same for a restore after the
            // file is moved into new pages. The restores after it make the `file` figure.
            let (first, _) = start_once(api, body.clone(), false)
                .await
                .map_err(step("a snapshot's first restore"))?;
            push_start(
                figures,
                "restore.file_first",
                "file restore, the snapshot's first",
                &[first],
                Some(cold),
            );
        }
        say(&format!("{mode} restore x{runs}"));
        let mut samples = Vec::new();
        for run in 0..runs {
            // The first lazy and prefetch restores also show when their faults came.
            let keep = run == 0 && matches!(mode, "lazy" | "prefetch");
            let (s, id) = start_once(api, body.clone(), keep)
                .await
                .map_err(step(format!("{mode} restore")))?;
            samples.push(s);
            if keep {
                let faults = api.faults(&id).await.map_err(step("reading faults"))?;
                api.delete(&id).await.map_err(step("delete"))?;
                fault_series.push(FaultSeries {
                    mode: mode.to_string(),
                    bucket_ms: faults["bucket_ms"].as_u64().unwrap_or(1),
                    counts: faults["counts"]
                        .as_array()
                        .map(|a| a.iter().map(|n| n.as_u64().unwrap_or(0) as u32).collect())
                        .unwrap_or_default(),
                    prefetched: faults["prefetched"].as_u64().unwrap_or(0),
                });
            }
        }
        push_start(
            figures,
            &format!("restore.{mode}"),
            &format!("{mode} restore"),
            &samples,
            Some(cold),
        );
        timelines.push(timeline_medians(&format!("restore.{mode}"), &samples));
    }
    Ok(fault_series)
}

/// Adds a start's figures: agent ready, first exec done, and the VMM's own view of ready.
fn push_start(
    figures: &mut Vec<Figure>,
    key: &str,
    label: &str,
    samples: &[StartSample],
    cold: Option<(Option<f64>, Option<f64>)>,
) {
    let mut ready = Figure::new(
        &format!("{key}.ready_ms"),
        &format!("{label}: request → agent ready"),
        "ms",
        Better::Lower,
        samples.iter().map(|s| s.ready_ms).collect(),
    );
    let mut first = Figure::new(
        &format!("{key}.first_exec_ms"),
        &format!("{label}: request → first exec done"),
        "ms",
        Better::Lower,
        samples.iter().map(|s| s.first_exec_ms).collect(),
    );
    if let Some((cold_ready, cold_first)) = cold {
        ready.ratio_to_cold = cold_ready.map(|c| c / ready.median);
        first.ratio_to_cold = cold_first.map(|c| c / first.median);
    }
    figures.push(ready);
    figures.push(first);
    let vmm: Vec<f64> = samples.iter().filter_map(|s| s.vmm_ready_ms).collect();
    if !vmm.is_empty() {
        figures.push(Figure::new(
            &format!("{key}.vmm_start_to_ready_ms"),
            &format!("{label}: VMM process start → agent ready"),
            "ms",
            Better::Lower,
            vmm,
        ));
    }
}
