//! The CLI commands that talk to `ember serve`: create, ls, exec, cp, pause, resume,
//! snapshot, fork, rm (and `ember snapshots --socket`).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Method;
use serde_json::Value;

use ember_client::responses::OutputRecord;
use ember_client::types::{
    CreateBody, EgressRule, ExecBody, ForkBody, NetRateLimits, NetworkMode, RateLimit, SnapshotBody,
};
use ember_client::{empty_body, encode_query, typed_body, ApiClient, ApiClientError};

/// Where the service listens.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceArgs {
    /// The service's socket (default: $EMBER_SOCKET, else STATE_DIR/ember.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
}

impl ServiceArgs {
    pub(crate) fn client(&self) -> ApiClient {
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| ember_service::default_socket(None));
        ApiClient::new(&socket)
    }
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Restore this snapshot instead of booting.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// `base`, `python3.13`, `node22` or `node24` (default: the service's; `ember images`
    /// lists what this host has built).
    #[arg(long, conflicts_with = "snapshot")]
    pub runtime: Option<String>,
    /// Restore this template (`ember template ls`).
    #[arg(long, conflicts_with_all = ["snapshot", "runtime"])]
    pub template: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u8>,
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Stop the sandbox after this many seconds (default 300).
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// KEY=VALUE for every command in the sandbox (repeatable).
    #[arg(long, value_parser = ember_sandbox::session::parse_env)]
    pub env: Vec<(String, String)>,
    /// Network, exposed ports and limits.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Print the sandbox as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// What a new sandbox (or each clone of a fork) is connected to and limited by.
#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// `none` (default: no network device) or `egress` (outgoing connections through NAT).
    #[arg(long, value_parser = ["none", "egress"])]
    pub network: Option<String>,
    /// With `--network egress`: reach only this network or name (`192.0.2.0/24`,
    /// `api.example.org`, `*.example.com`; repeatable; default: any public address).
    #[arg(long = "allow", value_name = "CIDR|NAME", requires = "network")]
    pub allow: Vec<EgressRule>,
    /// With `--network egress`: never reach this network or name (repeatable).
    #[arg(long = "deny", value_name = "CIDR|NAME", requires = "network")]
    pub deny: Vec<EgressRule>,
    /// Expose this guest TCP port on the host's loopback (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Limits on the sandbox's disk and network traffic.
    #[command(flatten)]
    pub limits: ember_sandbox::session::LimitArgs,
}

/// What [`SetupArgs`] ask for, as the fields `POST /sandboxes` and forks share.
#[derive(Debug, Default, PartialEq)]
struct Setup {
    network: Option<NetworkMode>,
    ports: Vec<u16>,
    disk_limits: Option<RateLimit>,
    net_limits: Option<NetRateLimits>,
}

impl SetupArgs {
    fn setup(&self) -> Setup {
        let network = self.network.as_deref().map(|mode| match mode {
            "egress" => NetworkMode::Egress {
                allow: (!self.allow.is_empty()).then(|| self.allow.clone()),
                deny: self.deny.clone(),
            },
            _ => NetworkMode::None {},
        });
        let disk = self.limits.disk_rate_limit();
        let net = self.limits.net_rate_limits();
        Setup {
            network,
            ports: self.ports.clone(),
            disk_limits: disk.is_limited().then_some(disk),
            net_limits: net.is_limited().then_some(net),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sandbox.
    pub id: String,
    #[arg(long, value_parser = ember_sandbox::session::parse_env)]
    pub env: Vec<(String, String)>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// Run as `root` or as the runtime's user (`user`); default: the runtime's.
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds (ember exits 124).
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Send ember's stdin (read to its end, at most 1 MiB) to the command.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Start the command and print its id; `GET /sandboxes/ID/commands/CID` shows it later.
    #[arg(long)]
    pub detach: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct CpArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// A host path, or SANDBOX:/guest/path.
    pub source: String,
    /// A host path, or SANDBOX:/guest/path.
    pub destination: String,
    /// Permission bits (octal) for a file copied into a sandbox.
    #[arg(long)]
    pub mode: Option<String>,
    /// Copy a folder: DESTINATION (created if missing) gets SOURCE's content, as a tar
    /// stream (symlinks kept as symlinks). A file is copied as without it.
    #[arg(short, long)]
    pub recursive: bool,
}

#[derive(clap::Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sandbox to save.
    pub id: String,
    /// The snapshot's id (default: a fresh one).
    #[arg(long)]
    pub name: Option<String>,
    /// Store only the pages written since this sandbox's last snapshot (or its origin).
    #[arg(long)]
    pub diff: bool,
    /// Stop the sandbox once it is saved.
    #[arg(long)]
    pub stop: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ForkArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The snapshot to start from.
    pub snapshot: String,
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Each clone's network, exposed ports and limits.
    #[command(flatten)]
    pub setup: SetupArgs,
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Runs an async command; an error is printed and exits 1.
pub(crate) fn finish(result: Result<i32, ApiClientError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {e}");
            1
        }
    }
}

/// Shows `what… N s` on a terminal while a long request runs.
async fn with_progress<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let start = Instant::now();
    let ticker = async {
        loop {
            eprint!("\r{what}… {:.0} s", start.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let result = tokio::select! {
        result = work => result,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    eprintln!("\r{what}: {:.1} s", start.elapsed().as_secs_f64());
    result
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub fn create(args: CreateArgs) -> i32 {
    let client = args.service.client();
    let setup = args.setup.setup();
    let body = CreateBody {
        snapshot: args.snapshot.clone(),
        runtime: args.runtime.clone(),
        template: args.template.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        timeout_s: args.timeout_s,
        env: args.env.iter().cloned().collect(),
        network: setup.network,
        ports: setup.ports,
        disk_limits: setup.disk_limits,
        net_limits: setup.net_limits,
        ..Default::default()
    };
    let what = if args.snapshot.is_some() || args.template.is_some() {
        "restoring a sandbox"
    } else {
        "booting a sandbox"
    };
    finish(runtime().block_on(async {
        let sandbox = with_progress(
            what,
            client.json(Method::POST, "/sandboxes", typed_body(&body)),
        )
        .await?;
        if args.json {
            print_json(&sandbox);
        } else {
            println!("{}", sandbox["id"].as_str().unwrap_or(""));
        }
        Ok(0)
    }))
}

pub fn ls(args: LsArgs) -> i32 {
    let client = args.service.client();
    finish(runtime().block_on(async {
        let list = client.json(Method::GET, "/sandboxes", empty_body()).await?;
        if args.json {
            print_json(&list["sandboxes"]);
            return Ok(0);
        }
        println!(
            "{:<16} {:<8} {:>5} {:>7} {:>9}  SNAPSHOT",
            "ID", "STATE", "VCPUS", "MEMORY", "READY(ms)"
        );
        for s in list["sandboxes"].as_array().into_iter().flatten() {
            println!(
                "{:<16} {:<8} {:>5} {:>7} {:>9}  {}",
                s["id"].as_str().unwrap_or("-"),
                s["state"].as_str().unwrap_or("-"),
                s["vcpus"],
                format!("{}M", s["memory_mib"]),
                s["ready_ms"]
                    .as_f64()
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or("-".into()),
                s["snapshot"].as_str().unwrap_or("-"),
            );
        }
        Ok(0)
    }))
}

pub fn exec(args: ExecArgs) -> i32 {
    let client = args.service.client();
    let mut body = ExecBody {
        cmd: args.command[0].clone(),
        args: args.command[1..].to_vec(),
        env: args.env.iter().cloned().collect(),
        cwd: args.cwd.clone(),
        user: args.user.clone(),
        timeout_s: args.timeout_s,
        detach: args.detach,
        ..Default::default()
    };
    if args.interactive {
        let mut input = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut input) {
            eprintln!("ember: cannot read stdin: {e}");
            return 1;
        }
        body.stdin_base64 = Some(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let uri = format!("/sandboxes/{}/exec", args.id);
    finish(runtime().block_on(async {
        if args.detach {
            let record = client.json(Method::POST, &uri, typed_body(&body)).await?;
            println!("{}", record["cmd_id"].as_str().unwrap_or(""));
            return Ok(0);
        }
        let response = client.send(Method::POST, &uri, typed_body(&body)).await?;
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        let mut code = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiClientError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Some(c) = handle_record(&line) {
                    code = Some(c);
                }
            }
        }
        Ok(code.unwrap_or_else(|| {
            eprintln!("ember: the output stream ended before the command's exit");
            1
        }))
    }))
}

/// Writes one NDJSON record's output; returns ember's exit code for the final record.
fn handle_record(line: &[u8]) -> Option<i32> {
    let decode = |data: Option<String>, data_base64: Option<String>| -> Vec<u8> {
        match (data, data_base64) {
            (Some(text), _) => text.into_bytes(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    };
    match serde_json::from_slice::<OutputRecord>(line).ok()? {
        OutputRecord::Stdout { data, data_base64 } => {
            let mut out = std::io::stdout().lock();
            let _ = out
                .write_all(&decode(data, data_base64))
                .and_then(|_| out.flush());
            None
        }
        OutputRecord::Stderr { data, data_base64 } => {
            let _ = std::io::stderr().write_all(&decode(data, data_base64));
            None
        }
        OutputRecord::Exit {
            exit_code,
            signal,
            timed_out,
            error,
            ..
        } => Some(match (exit_code, signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => {
                eprintln!("ember: the command was killed by signal {signal}");
                128 + signal
            }
            (None, None) if timed_out => {
                eprintln!("ember: the command timed out and was killed");
                124
            }
            (None, None) => {
                eprintln!(
                    "ember: the command failed: {}",
                    error.as_deref().unwrap_or("unknown error")
                );
                1
            }
        }),
        OutputRecord::Started { .. } => None,
    }
}

/// `SANDBOX:/path` → (sandbox, path); anything else is a host path.
pub(crate) fn split_remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

/// A request body streamed from the file at `path`.
pub(crate) async fn file_body(
    path: &std::path::Path,
) -> Result<ember_client::RequestBody, ApiClientError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiClientError::Http(format!("cannot open {}: {e}", path.display())))?;
    let stream = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data);
    Ok(BodyExt::boxed(StreamBody::new(stream)))
}

pub fn cp(args: CpArgs) -> i32 {
    let client = args.service.client();
    let source = split_remote(&args.source);
    let destination = split_remote(&args.destination);
    finish(runtime().block_on(async {
        match (source, destination) {
            (None, Some((id, path))) if std::path::Path::new(&args.source).is_dir() => {
                if !args.recursive {
                    return Err(ApiClientError::Http(format!(
                        "{} is a folder: copy it with -r",
                        args.source
                    )));
                }
                if args.mode.is_some() {
                    return Err(ApiClientError::Http(
                        "--mode is for a file; a folder's files keep their own modes".into(),
                    ));
                }
                let source = std::path::Path::new(&args.source);
                let done = crate::files::copy_dir_in(&client, source, id, path).await?;
                report_copy(
                    done.files,
                    done.dirs,
                    done.symlinks,
                    done.bytes,
                    done.skipped,
                );
                Ok(0)
            }
            (Some((id, path)), None) if args.recursive => {
                let destination = std::path::Path::new(&args.destination);
                match crate::files::copy_dir_out(&client, id, path, destination).await {
                    Ok(done) => {
                        report_copy(
                            done.files,
                            done.dirs,
                            done.symlinks,
                            done.bytes,
                            done.skipped,
                        );
                        Ok(0)
                    }
                    // A file: copied as one.
                    Err(ApiClientError::Api { code, .. }) if code == "not_a_directory" => {
                        download(&client, id, path, &args.destination).await
                    }
                    Err(e) => Err(e),
                }
            }
            (None, Some((id, path))) => {
                let body = file_body(std::path::Path::new(&args.source)).await?;
                let mut uri = format!("/sandboxes/{id}/files?path={}", encode_query(path));
                if let Some(mode) = &args.mode {
                    uri.push_str(&format!("&mode={}", encode_query(mode)));
                }
                let answer = client.json(Method::PUT, &uri, body).await?;
                eprintln!("copied {} bytes", answer["bytes"]);
                Ok(0)
            }
            (Some((id, path)), None) => download(&client, id, path, &args.destination).await,
            _ => Err(ApiClientError::Http(
                "exactly one of SOURCE and DESTINATION must be SANDBOX:/absolute/path".into(),
            )),
        }
    }))
}

/// `, N skipped (…)` when a folder copy left entries out.
/// What a folder copy (`cp -r`, either way) moved, on stderr.
fn report_copy(files: u64, dirs: u64, symlinks: u64, bytes: u64, skipped: u64) {
    let skipped = match skipped {
        0 => String::new(),
        n => format!("; {n} devices, FIFOs, sockets or hard links skipped"),
    };
    eprintln!(
        "copied {files} files, {dirs} folders and {symlinks} symlinks ({bytes} bytes){skipped}"
    );
}

/// Downloads the sandbox's file `path` into the host file `destination`.
async fn download(
    client: &ApiClient,
    id: &str,
    path: &str,
    destination: &str,
) -> Result<i32, ApiClientError> {
    let uri = format!("/sandboxes/{id}/files?path={}", encode_query(path));
    let response = match client.send(Method::GET, &uri, empty_body()).await {
        Err(ApiClientError::Api {
            code,
            message,
            status,
        }) if code == "conflict" => {
            return Err(ApiClientError::Api {
                status,
                code,
                message: format!("{message} (a folder is copied with -r)"),
            })
        }
        other => other?,
    };
    let mut out = std::fs::File::create(destination)
        .map_err(|e| ApiClientError::Http(format!("cannot create {destination}: {e}")))?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiClientError::Http(format!("the download broke off: {e}")))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)
                .map_err(|e| ApiClientError::Http(format!("writing {destination}: {e}")))?;
        }
    }
    Ok(0)
}

/// A body-less POST that answers the sandbox (pause, resume): prints its new state.
fn change_state(args: &IdArgs, uri: String) -> i32 {
    let client = args.service.client();
    finish(runtime().block_on(async {
        let answer = client.json(Method::POST, &uri, empty_body()).await?;
        if let Some(state) = answer["state"].as_str() {
            println!("{} {state}", args.id);
        }
        Ok(0)
    }))
}

pub fn pause(args: IdArgs) -> i32 {
    let uri = format!("/sandboxes/{}/pause", args.id);
    change_state(&args, uri)
}

pub fn resume(args: IdArgs) -> i32 {
    let uri = format!("/sandboxes/{}/resume", args.id);
    change_state(&args, uri)
}

pub fn rm(args: RmArgs) -> i32 {
    let client = args.service.client();
    finish(runtime().block_on(async {
        let mut code = 0;
        for id in &args.ids {
            match client
                .send(Method::DELETE, &format!("/sandboxes/{id}"), empty_body())
                .await
            {
                Ok(_) => println!("{id} deleted"),
                Err(e) => {
                    eprintln!("ember: {id}: {e}");
                    code = 1;
                }
            }
        }
        Ok(code)
    }))
}

pub fn snapshot(args: SnapshotArgs) -> i32 {
    let client = args.service.client();
    let body = SnapshotBody {
        name: args.name.clone(),
        diff: args.diff,
        stop: args.stop,
    };
    let uri = format!("/sandboxes/{}/snapshots", args.id);
    finish(runtime().block_on(async {
        let snap = with_progress(
            "saving a snapshot",
            client.json(Method::POST, &uri, typed_body(&body)),
        )
        .await?;
        if args.json {
            print_json(&snap);
        } else {
            println!("{}", snap["id"].as_str().unwrap_or(""));
        }
        Ok(0)
    }))
}

pub fn fork(args: ForkArgs) -> i32 {
    let client = args.service.client();
    let setup = args.setup.setup();
    let body = ForkBody {
        count: args.count,
        timeout_s: args.timeout_s,
        network: setup.network,
        ports: setup.ports,
        disk_limits: setup.disk_limits,
        net_limits: setup.net_limits,
        ..Default::default()
    };
    let uri = format!("/snapshots/{}/fork", args.snapshot);
    finish(runtime().block_on(async {
        let answer = with_progress(
            "restoring sandboxes",
            client.json(Method::POST, &uri, typed_body(&body)),
        )
        .await?;
        if args.json {
            print_json(&answer["sandboxes"]);
        } else {
            for s in answer["sandboxes"].as_array().into_iter().flatten() {
                println!("{}", s["id"].as_str().unwrap_or(""));
            }
        }
        Ok(0)
    }))
}

/// `ember snapshots --socket PATH`: the service's snapshots.
pub fn snapshots(service: &ServiceArgs, as_json: bool) -> i32 {
    let client = service.client();
    finish(runtime().block_on(async {
        let list = client.json(Method::GET, "/snapshots", empty_body()).await?;
        if as_json {
            print_json(&list["snapshots"]);
        } else {
            for s in list["snapshots"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {:.0} MiB  parent {}",
                    s["id"].as_str().unwrap_or("-"),
                    s["created"].as_str().unwrap_or("-"),
                    s["memory_mib"].as_f64().unwrap_or(0.0),
                    s["parent"].as_str().unwrap_or("-")
                );
            }
        }
        Ok(0)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn remote_paths() {
        assert_eq!(split_remote("sb-1:/tmp/x"), Some(("sb-1", "/tmp/x")));
        assert_eq!(split_remote("./local:file"), None);
        assert_eq!(split_remote("sb-1:relative"), None);
        assert_eq!(split_remote("/abs/path"), None);
    }

    #[test]
    fn exit_records_give_exit_codes() {
        let exit = |fields: &str| {
            let line = format!(r#"{{"type":"exit","timed_out":false,"duration_ms":1.0,{fields}}}"#);
            handle_record(line.as_bytes())
        };
        assert_eq!(exit(r#""exit_code":7"#), Some(7));
        assert_eq!(exit(r#""exit_code":null,"signal":9"#), Some(137));
        assert_eq!(
            handle_record(
                br#"{"type":"exit","exit_code":null,"signal":null,"timed_out":true,"duration_ms":1}"#
            ),
            Some(124)
        );
        assert_eq!(exit(r#""error":"agent gone""#), Some(1));
        assert_eq!(
            handle_record(br#"{"type":"started","cmd_id":"c","pid":3}"#),
            None
        );
    }

    #[derive(clap::Parser)]
    struct SetupCli {
        #[command(flatten)]
        setup: SetupArgs,
    }

    fn body_for(args: &[&str]) -> serde_json::Value {
        use clap::Parser;
        let parsed =
            SetupCli::try_parse_from(std::iter::once("ember").chain(args.iter().copied())).unwrap();
        let setup = parsed.setup.setup();
        serde_json::to_value(CreateBody {
            network: setup.network,
            ports: setup.ports,
            disk_limits: setup.disk_limits,
            net_limits: setup.net_limits,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn setup_flags_make_the_body_the_service_takes() {
        let body = body_for(&[
            "--network",
            "egress",
            "--allow",
            "10.1.0.0/16",
            "--allow",
            "192.168.1.7/32",
            "--port",
            "8080",
            "--disk-bytes-per-sec",
            "1000000",
            "--net-tx-bytes-per-sec",
            "125000",
            "--net-rx-ops-per-sec",
            "500",
        ]);
        assert_eq!(
            body,
            json!({
                "network": {"mode": "egress", "allow": ["10.1.0.0/16", "192.168.1.7/32"]},
                "ports": [8080],
                "disk_limits": {"bytes_per_sec": 1000000, "ops_per_sec": null},
                "net_limits": {
                    "rx": {"bytes_per_sec": null, "ops_per_sec": 500},
                    "tx": {"bytes_per_sec": 125000, "ops_per_sec": null}
                }
            })
        );
        // The service's own body type takes it, unknown fields refused and all.
        let parsed: ember_client::types::CreateBody = serde_json::from_value(body).unwrap();
        assert_eq!(parsed.net_limits.unwrap().tx.bytes_per_sec, Some(125_000));
        // Nothing asked: nothing sent (the service's defaults apply).
        assert_eq!(body_for(&[]), json!({}));
        for bad in [
            ["ember", "--network", "bridge"].as_slice(),
            &["ember", "--network", "egress", "--allow", "10.0.0.0/33"],
        ] {
            assert!(<SetupCli as clap::Parser>::try_parse_from(bad).is_err());
        }
    }
}
