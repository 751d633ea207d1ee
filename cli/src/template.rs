//! `ember template build|ls|rm`: templates through the service.

use std::path::PathBuf;

use base64::Engine;
use ember_client::templates::{
    CopyFile, ReadyCheck, TemplateBody, TemplateInfo, TemplateList, TemplateStep,
};
use ember_client::{empty_body, typed_body};
use hyper::Method;

use crate::remote::{finish, runtime, ServiceArgs};

#[derive(clap::Args, Debug)]
pub struct TemplateArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(subcommand)]
    pub action: TemplateAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum TemplateAction {
    /// Build (or rebuild) a template: boot RUNTIME, run the steps in the order apt, copy,
    /// pip, npm, run, wait for `--ready`, snapshot. Steps an earlier build did are reused.
    Build(Box<BuildArgs>),
    /// List the built templates.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Forget a template (its snapshots stay until deleted).
    Rm { name: String },
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    pub name: String,
    /// `base`, `python3.13`, `node22`, `node24` or an imported image (default: the
    /// service's).
    #[arg(long)]
    pub runtime: Option<String>,
    /// Build on a container image: an OCI image layout or `docker save` tarball on this
    /// host, imported first as runtime NAME (no registry is contacted).
    #[arg(long, value_name = "TARBALL", conflicts_with = "runtime")]
    pub from_oci: Option<PathBuf>,
    /// Debian packages (repeatable; one `apt-get install` step).
    #[arg(long = "apt", value_name = "PKG")]
    pub apt: Vec<String>,
    /// A host file into the template: `SRC:DST` (repeatable; DST absolute; up to ~700 KiB).
    #[arg(long = "copy", value_name = "SRC:DST")]
    pub copy: Vec<String>,
    /// Python packages (repeatable; one `pip install --user` step).
    #[arg(long = "pip", value_name = "PKG")]
    pub pip: Vec<String>,
    /// npm packages (repeatable; one `npm install` step in the working directory).
    #[arg(long = "npm", value_name = "PKG")]
    pub npm: Vec<String>,
    /// A shell command (repeatable; each its own step, in order).
    #[arg(long = "run", value_name = "CMD")]
    pub run: Vec<String>,
    /// Run until it succeeds before the snapshot (a server answering, say).
    #[arg(long)]
    pub ready: Option<String>,
    /// How long `--ready` may take to succeed, in seconds (default 60).
    #[arg(long, requires = "ready")]
    pub ready_timeout_s: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

/// Why `ember template build`'s arguments make no template request.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--copy {0}: expected SRC:DST")]
    CopySpec(String),
    #[error("--copy {spec}: reading {source_path}: {source}")]
    Read {
        spec: String,
        source_path: String,
        #[source]
        source: std::io::Error,
    },
}

impl BuildArgs {
    fn body(&self) -> Result<TemplateBody, ArgsError> {
        let mut steps = Vec::new();
        if !self.apt.is_empty() {
            steps.push(TemplateStep::Apt(self.apt.clone()));
        }
        for copy in &self.copy {
            let (source, dest) = copy
                .split_once(':')
                .ok_or_else(|| ArgsError::CopySpec(copy.clone()))?;
            let bytes = std::fs::read(PathBuf::from(source)).map_err(|e| ArgsError::Read {
                spec: copy.clone(),
                source_path: source.to_string(),
                source: e,
            })?;
            steps.push(TemplateStep::Copy(CopyFile {
                path: dest.to_string(),
                content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                mode: None,
            }));
        }
        if !self.pip.is_empty() {
            steps.push(TemplateStep::Pip(self.pip.clone()));
        }
        if !self.npm.is_empty() {
            steps.push(TemplateStep::Npm(self.npm.clone()));
        }
        steps.extend(self.run.iter().cloned().map(TemplateStep::Run));
        Ok(TemplateBody {
            name: self.name.clone(),
            runtime: self.runtime.clone(),
            steps,
            ready: self.ready.clone().map(|cmd| ReadyCheck {
                cmd,
                timeout_s: self.ready_timeout_s,
            }),
        })
    }
}

pub fn run(args: TemplateArgs) -> i32 {
    let client = args.service.client();
    match args.action {
        TemplateAction::Build(build) => {
            let mut body = match build.body() {
                Ok(body) => body,
                Err(e) => {
                    eprintln!("ember: {e}");
                    return 2;
                }
            };
            finish(runtime().block_on(async {
                if let Some(tarball) = &build.from_oci {
                    let upload = crate::remote::file_body(tarball).await?;
                    let uri = format!("/images?name={}", ember_client::encode_query(&build.name));
                    client.json(Method::POST, &uri, upload).await?;
                    eprintln!("imported {} as runtime {}", tarball.display(), build.name);
                    body.runtime = Some(build.name.clone());
                }
                let answer = client
                    .json(Method::POST, "/templates", typed_body(&body))
                    .await?;
                if build.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&answer).unwrap_or_default()
                    );
                    return Ok(0);
                }
                let info: TemplateInfo = serde_json::from_value(answer).map_err(invalid)?;
                println!(
                    "{} built in {:.1} s ({} of {} steps reused); sandboxes restore {}",
                    info.name,
                    info.build_ms / 1e3,
                    info.steps_cached,
                    info.steps.len(),
                    info.snapshot
                );
                Ok(0)
            }))
        }
        TemplateAction::Ls { json } => finish(runtime().block_on(async {
            let answer = client.json(Method::GET, "/templates", empty_body()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
                return Ok(0);
            }
            let list: TemplateList = serde_json::from_value(answer).map_err(invalid)?;
            println!("{:<24} {:<11} {:>5}  SNAPSHOT", "NAME", "RUNTIME", "STEPS");
            for t in list.templates {
                println!(
                    "{:<24} {:<11} {:>5}  {}",
                    t.name,
                    t.runtime,
                    t.steps.len(),
                    t.snapshot
                );
            }
            Ok(0)
        })),
        TemplateAction::Rm { name } => finish(runtime().block_on(async {
            client
                .send(
                    Method::DELETE,
                    &format!("/templates/{}", ember_client::encode_query(&name)),
                    empty_body(),
                )
                .await?;
            Ok(0)
        })),
    }
}

fn invalid(e: serde_json::Error) -> ember_client::ApiClientError {
    ember_client::ApiClientError::Http(format!("the service's answer is not a template: {e}"))
}
