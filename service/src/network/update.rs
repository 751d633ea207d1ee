//! `PATCH /sandboxes/{id}/network`: a running sandbox's egress policy, replaced.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use ember_client::responses::{SandboxNetwork, SandboxState};
use ember_client::types::{EgressRule, NetworkMode, NetworkPolicy};

use crate::api::{parse_body, JsonBody, SandboxId};
use crate::error::ApiError;
use crate::AppState;
use ember_client::types::ErrorDocument;

/// The most entries an allow- or deny-list may have.
pub const MAX_RULES: usize = 256;

/// Refuses lists longer than [`MAX_RULES`].
pub fn check_mode(mode: &NetworkMode) -> Result<(), ApiError> {
    match mode.policy() {
        Some(policy) => check_policy(&policy),
        None => Ok(()),
    }
}

fn check_policy(policy: &NetworkPolicy) -> Result<(), ApiError> {
    let lists: [(&str, &[EgressRule]); 2] = [
        ("allow", policy.allow.as_deref().unwrap_or_default()),
        ("deny", &policy.deny),
    ];
    for (name, list) in lists {
        if list.len() > MAX_RULES {
            return Err(ApiError::bad_request(format!(
                "`network.{name}` has {} entries; at most {MAX_RULES} are allowed",
                list.len()
            )));
        }
    }
    Ok(())
}

/// Policy changes go one at a time: the rules, the name sets and the record change together.
static UPDATES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[utoipa::path(patch, path = "/sandboxes/{id}/network", tag = "sandboxes", params(SandboxId),
    request_body(content = NetworkPolicy, description = "The new allow- and deny-lists (they replace the old ones)"),
    responses(
        (status = 200, description = "The policy is in force: new connections and name lookups follow it (connections already made go on)", body = SandboxNetwork),
        (status = 400, description = "Malformed JSON, unknown field or invalid entry", body = ErrorDocument),
        (status = 404, description = "No such sandbox", body = ErrorDocument),
        (status = 409, description = "The sandbox has no egress network, is still starting, or has ended", body = ErrorDocument),
        (status = 413, description = "Request body too large", body = ErrorDocument),
        (status = 500, description = "Its rules could not be changed (the old policy stays)", body = ErrorDocument)))]
/// `PATCH /sandboxes/{id}/network`
pub async fn update_policy(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let policy: NetworkPolicy = parse_body(body)?;
    check_policy(&policy)?;
    let _turn = UPDATES.lock().await;
    let sandbox = state.sandbox(&id)?;
    let record = sandbox.record();
    if !matches!(
        record.net.as_ref().map(|n| &n.mode),
        Some(NetworkMode::Egress { .. })
    ) {
        return Err(ApiError::conflict(format!(
            "sandbox {id} has no egress network (its network mode is set when it is created)"
        )));
    }
    let suspended = record.lifecycle.suspended.is_some();
    match record.state {
        SandboxState::Starting => {
            return Err(ApiError::conflict(format!(
                "sandbox {id} is still starting; change its network once it runs"
            )))
        }
        state if !state.is_live() && !suspended => {
            return Err(ApiError::conflict(format!(
                "sandbox {id} has ended ({}): it has no network to change",
                serde_json::to_value(state).unwrap_or_default()
            )))
        }
        _ => {}
    }
    // A sandbox saved by its lifecycle has no resolver now: its record is what it resumes with.
    if let Some(resolver) = sandbox.resolver() {
        resolver
            .set_policy(policy.clone())
            .await
            .map_err(|e| ApiError::internal(format!("changing sandbox {id}'s network: {e}")))?;
    }
    sandbox.update(|r| {
        if let Some(net) = &mut r.net {
            net.mode = policy.clone().into();
        }
    });
    let shown: Option<SandboxNetwork> = sandbox.record().net.map(|net| net.info());
    Ok(axum::Json(shown).into_response())
}
