//! `ember network ID`: a running sandbox's egress policy, replaced
//! (`PATCH /sandboxes/{id}/network`).

use hyper::Method;

use ember_client::responses::SandboxNetwork;
use ember_client::typed_body;
use ember_client::types::{EgressRule, NetworkPolicy};

use crate::remote::{finish, runtime, ServiceArgs};

#[derive(clap::Args, Debug)]
pub struct NetworkArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sandbox (created with `--network egress`).
    pub id: String,
    /// Reach only this network or name (`192.0.2.0/24`, `api.example.org`, `*.example.com`;
    /// repeatable). Without any: any public address.
    #[arg(long = "allow", value_name = "CIDR|NAME")]
    pub allow: Vec<EgressRule>,
    /// Never reach this network or name (repeatable).
    #[arg(long = "deny", value_name = "CIDR|NAME")]
    pub deny: Vec<EgressRule>,
}

/// `ember network ID [--allow R]... [--deny R]...`: the new policy replaces the old one.
pub fn network(args: NetworkArgs) -> i32 {
    let client = args.service.client();
    let policy = NetworkPolicy {
        allow: (!args.allow.is_empty()).then(|| args.allow.clone()),
        deny: args.deny.clone(),
    };
    finish(runtime().block_on(async {
        let uri = format!("/sandboxes/{}/network", args.id);
        let answer = client
            .json(Method::PATCH, &uri, typed_body(&policy))
            .await?;
        let shown: SandboxNetwork = serde_json::from_value(answer).map_err(|e| {
            ember_client::ApiClientError::Http(format!("the answer is not a network: {e}"))
        })?;
        let list = |rules: &[EgressRule]| {
            rules
                .iter()
                .map(EgressRule::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let allow = shown
            .allow
            .as_deref()
            .map_or_else(|| "any public address".to_string(), list);
        let deny = if shown.deny.is_empty() {
            "nothing".to_string()
        } else {
            list(&shown.deny)
        };
        println!("{}: allow {allow}; deny {deny}", args.id);
        Ok(0)
    }))
}
