//! What a sandbox's timeout and idleness do (`on_timeout`: stop, pause, snapshot), and the
//! resume on use of a suspended sandbox: every exec, files and commands request passes
//! [`on_use`], which counts it as activity and, when the sandbox was suspended by its
//! `on_timeout`, resumes it first and says so in the `ember-resumed` header.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ember_client::responses::{SandboxState, Suspension};
use ember_client::types::OnTimeout;
use ember_sandbox::control::ControlRequest;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::sandbox::{unix_ms, Sandbox};
use crate::AppState;

/// The response header that says a request resumed its sandbox (`pause` or `snapshot`: how
/// it had been suspended).
pub const RESUMED_HEADER: &str = "ember-resumed";
/// The shortest idle timeout: less would pause a sandbox between a client's requests.
pub const MIN_IDLE_TIMEOUT_S: u64 = 2;

/// A sandbox's lifecycle settings and whether it is suspended, kept in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lifecycle {
    pub on_timeout: OnTimeout,
    pub auto_resume: bool,
    pub idle_timeout_ms: Option<u64>,
    /// The length of its timeout, to arm it again when it resumes.
    pub timeout_ms: Option<u64>,
    pub suspended: Option<Suspension>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            on_timeout: OnTimeout::Stop,
            auto_resume: true,
            idle_timeout_ms: None,
            timeout_ms: None,
            suspended: None,
        }
    }
}

impl Lifecycle {
    /// A sandbox stopped at its timeout (clones and the like).
    pub fn stop_at(timeout: Duration) -> Lifecycle {
        Lifecycle {
            timeout_ms: Some(timeout.as_millis() as u64),
            ..Default::default()
        }
    }

    /// The settings a create request asks for, checked.
    pub fn from_request(
        timeout: Duration,
        on_timeout: Option<OnTimeout>,
        auto_resume: Option<bool>,
        idle_timeout_s: Option<u64>,
    ) -> Result<Lifecycle, ApiError> {
        if let Some(idle) = idle_timeout_s {
            if !(MIN_IDLE_TIMEOUT_S..=crate::MAX_TIMEOUT_S).contains(&idle) {
                return Err(ApiError::bad_request(format!(
                    "`idle_timeout_s` must be between {MIN_IDLE_TIMEOUT_S} and {}",
                    crate::MAX_TIMEOUT_S
                )));
            }
        }
        Ok(Lifecycle {
            on_timeout: on_timeout.unwrap_or_default(),
            auto_resume: auto_resume.unwrap_or(true),
            idle_timeout_ms: idle_timeout_s.map(|s| s * 1000),
            timeout_ms: Some(timeout.as_millis() as u64),
            suspended: None,
        })
    }
}

/// A sandbox's use, in memory: requests in flight and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last_unix_ms: AtomicU64,
    /// Resumes and suspensions go one at a time.
    pub turn: tokio::sync::Mutex<()>,
}

impl Default for Activity {
    /// Made with its sandbox: idle from now.
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_unix_ms: AtomicU64::new(unix_ms()),
            turn: Default::default(),
        }
    }
}

impl Activity {
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.last_unix_ms.store(unix_ms(), Ordering::SeqCst);
    }

    fn end(&self) {
        self.last_unix_ms.store(unix_ms(), Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Counts the sandbox as used now (its start, a resume).
    pub fn touch(&self) {
        self.last_unix_ms.store(unix_ms(), Ordering::SeqCst);
    }

    /// How long nothing has used the sandbox, if nothing is using it now.
    fn idle_for_ms(&self, now: u64) -> Option<u64> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| now.saturating_sub(self.last_unix_ms.load(Ordering::SeqCst)))
    }
}

/// Whether `path` is a request that uses sandbox `id`'s guest (`/sandboxes/ID/exec`,
/// `…/files…`, `…/commands…`, `…/pty…`): its id. The OpenAPI document marks the same
/// operations with the `ember-resumed` header.
pub(crate) fn used_sandbox(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/sandboxes/")?;
    let (id, what) = rest.split_once('/')?;
    let what = what.split('/').next()?;
    matches!(what, "exec" | "files" | "commands" | "pty").then_some(id)
}

/// The middleware every request passes.
pub async fn on_use(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(sandbox) = used_sandbox(request.uri().path()).and_then(|id| state.sandbox(id).ok())
    else {
        return next.run(request).await;
    };
    let resumed = match resume_if_suspended(&state, &sandbox).await {
        Ok(resumed) => resumed,
        Err(e) => return e.into_response(),
    };
    // A resume from a snapshot made a new sandbox under the same id.
    let sandbox = state.sandbox(&sandbox.id).unwrap_or(sandbox);
    sandbox.activity.begin();
    let guard = InUse(sandbox);
    let mut response = next.run(request).await;
    if let Some(how) = resumed {
        response
            .headers_mut()
            .insert(RESUMED_HEADER, HeaderValue::from_static(how.label()));
    }
    // A streamed answer (a download, a command's output) is use until its last byte.
    use axum::body::HttpBody;
    if response.body().size_hint().exact().is_some() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _in_use = &guard;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// A request using a sandbox; its end (the response's last byte, or the client leaving) is
/// when it stops counting as activity.
struct InUse(Arc<Sandbox>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// Resumes a sandbox its `on_timeout` suspended (unless `auto_resume` is off): how it had
/// been suspended, or `None` if it was not.
pub async fn resume_if_suspended(
    state: &Arc<AppState>,
    sandbox: &Arc<Sandbox>,
) -> Result<Option<OnTimeout>, ApiError> {
    // Taken first: a request that comes while the sandbox is being paused or saved waits
    // for that to finish, then resumes it.
    let _turn = sandbox.activity.turn.lock().await;
    let lifecycle = sandbox.record().lifecycle;
    let Some(suspension) = lifecycle.suspended.filter(|_| lifecycle.auto_resume) else {
        return Ok(None);
    };
    let sandbox = match (suspension.how, &suspension.snapshot) {
        // Paused by hand since (`POST …/pause`): it stays paused.
        (OnTimeout::Pause, _) if sandbox.state() != SandboxState::Paused => return Ok(None),
        (OnTimeout::Snapshot, Some(snapshot)) => restore_in_place(state, sandbox, snapshot).await?,
        _ => {
            crate::control(sandbox, ControlRequest::Resume).await?;
            sandbox.clone()
        }
    };
    let now = unix_ms();
    sandbox.update(|r| {
        r.state = SandboxState::Running;
        r.lifecycle.suspended = None;
        r.deadline_unix_ms = now
            + r.lifecycle
                .timeout_ms
                .unwrap_or(crate::DEFAULT_TIMEOUT_S * 1000);
    });
    sandbox.activity.touch();
    log::info!(
        "sandbox {}: resumed on use ({} since its {})",
        sandbox.id,
        suspension.how.label(),
        suspension.reason
    );
    Ok(Some(suspension.how))
}

/// Starts sandbox `old`'s successor from the snapshot its `on_timeout` saved: the same id,
/// size, environment, network, exposed guest ports, limits and lifecycle.
async fn restore_in_place(
    state: &Arc<AppState>,
    old: &Arc<Sandbox>,
    snapshot: &str,
) -> Result<Arc<Sandbox>, ApiError> {
    let r = old.record();
    let crate::snapshots::RestoreSpec {
        origin,
        vcpus,
        mem_mib,
        had_network,
        image,
        partial,
    } = crate::snapshots::restore_spec(state, snapshot, None).await?;
    let network = r
        .net
        .as_ref()
        .map_or(crate::network::NetworkMode::None {}, |n| n.mode.clone());
    let timeout = Duration::from_millis(
        r.lifecycle
            .timeout_ms
            .unwrap_or(crate::DEFAULT_TIMEOUT_S * 1000),
    );
    // The stopped VMM's cgroup and network are its successor's to make again.
    let id = old.id.clone();
    let had_namespace = r.net.is_some();
    let cgroups_state = state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(cgroups) = &cgroups_state.cgroups {
            cgroups.remove(&id);
        }
        if had_namespace {
            crate::network::remove(&id);
        }
    })
    .await;
    old.close_ports();
    crate::sandbox::create(
        state,
        crate::sandbox::NewSandbox {
            origin,
            vcpus,
            mem_mib,
            timeout,
            env: r.env,
            disk_rate_limit: r.spec.disk_rate_limit,
            net_rate_limits: r.spec.net_rate_limits,
            network,
            restored_nic: had_network,
            ports: r.ports.iter().map(|p| p.guest_port).collect(),
            partial,
            image,
            lifecycle: Lifecycle {
                suspended: None,
                ..r.lifecycle
            },
            continues: Some(old.id.clone()),
        },
    )
    .await
}

/// Why a running sandbox's lifecycle acts now, if it does.
pub fn due(sandbox: &Sandbox, now: u64) -> Option<&'static str> {
    let r = sandbox.record();
    if r.lifecycle.suspended.is_some() {
        return None;
    }
    match r.state {
        SandboxState::Running | SandboxState::Paused if r.deadline_unix_ms <= now => {
            Some("timeout")
        }
        SandboxState::Running => {
            let idle = r.lifecycle.idle_timeout_ms?;
            let running_commands = sandbox.has_running_commands();
            let idle_for = sandbox.activity.idle_for_ms(now)?;
            (!running_commands && idle_for >= idle).then_some("idle")
        }
        _ => None,
    }
}

/// Applies a sandbox's `on_timeout` (it is due for `reason`).
pub async fn act(state: Arc<AppState>, sandbox: Arc<Sandbox>, reason: &'static str) {
    let on_timeout = sandbox.record().lifecycle.on_timeout;
    let paused_already = sandbox.state() == SandboxState::Paused;
    if on_timeout == OnTimeout::Stop {
        stop(&state, &sandbox, reason).await;
        return;
    }
    let _turn = sandbox.activity.turn.lock().await;
    // Looked at again under the turn: a request may have used it meanwhile.
    if due(&sandbox, unix_ms()).is_none() {
        return;
    }
    let suspended = match on_timeout {
        OnTimeout::Pause if paused_already => Ok(None),
        OnTimeout::Pause => crate::control(&sandbox, ControlRequest::Pause)
            .await
            .map(|_| None),
        OnTimeout::Snapshot | OnTimeout::Stop => {
            save_and_stop(&state, &sandbox, reason).await.map(Some)
        }
    };
    match suspended {
        Ok(snapshot) => {
            sandbox.update(|r| {
                // A saved sandbox's VMM is gone: it shows as stopped, and resumes on use.
                r.state = match on_timeout {
                    OnTimeout::Pause => SandboxState::Paused,
                    _ => SandboxState::Stopped,
                };
                r.lifecycle.suspended = Some(Suspension {
                    reason: reason.to_string(),
                    how: on_timeout,
                    at_unix_ms: unix_ms(),
                    snapshot,
                });
            });
            log::info!(
                "sandbox {}: {} at its {reason}",
                sandbox.id,
                on_timeout.label()
            );
        }
        Err(e) => {
            log::warn!(
                "sandbox {}: cannot {} it at its {reason} ({}); stopping it",
                sandbox.id,
                on_timeout.label(),
                e.message
            );
            drop(_turn);
            stop(&state, &sandbox, reason).await;
        }
    }
}

/// Saves the sandbox to the store and stops its VMM: the snapshot's id.
async fn save_and_stop(
    state: &Arc<AppState>,
    sandbox: &Sandbox,
    reason: &str,
) -> Result<String, ApiError> {
    let name = format!("{}-{reason}-{}", sandbox.id, unix_ms());
    let body = serde_json::json!({"name": name, "stop": true}).to_string();
    let response = crate::snapshots::create(
        State(state.clone()),
        axum::extract::Path(sandbox.id.clone()),
        Ok(axum::body::Bytes::from(body)),
    )
    .await?;
    if response.status() != axum::http::StatusCode::CREATED {
        return Err(ApiError::internal(format!(
            "saving sandbox {} answered {}",
            sandbox.id,
            response.status()
        )));
    }
    Ok(name)
}

async fn stop(state: &AppState, sandbox: &Sandbox, reason: &str) {
    state.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
    sandbox
        .stop(&format!("its {reason} passed"), state.cgroups.as_ref())
        .await;
    sandbox.update(|r| r.failure = Some(format!("stopped at its {reason}")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_use_a_guest_are_told_apart() {
        assert_eq!(used_sandbox("/sandboxes/sb-1/exec"), Some("sb-1"));
        assert_eq!(used_sandbox("/sandboxes/sb-1/files/list"), Some("sb-1"));
        assert_eq!(
            used_sandbox("/sandboxes/sb-1/commands/c1/logs"),
            Some("sb-1")
        );
        assert_eq!(used_sandbox("/sandboxes/sb-1"), None);
        assert_eq!(used_sandbox("/sandboxes/sb-1/pause"), None);
        assert_eq!(used_sandbox("/sandboxes/sb-1/timeout"), None);
        assert_eq!(used_sandbox("/snapshots/x/fork"), None);
    }

    #[test]
    fn idle_timeouts_are_bounded_and_resume_is_on_by_default() {
        let t = Duration::from_secs(60);
        assert!(Lifecycle::from_request(t, None, None, Some(1)).is_err());
        let l = Lifecycle::from_request(t, Some(OnTimeout::Pause), None, Some(5)).unwrap();
        assert!(l.auto_resume);
        assert_eq!(l.idle_timeout_ms, Some(5000));
        assert_eq!(l.timeout_ms, Some(60_000));
        // Records from before lifecycles read as "stop, resume on use".
        let old: Lifecycle = serde_json::from_str("{}").unwrap();
        assert_eq!(old, Lifecycle::default());
    }

    #[test]
    fn activity_in_flight_is_never_idle() {
        let a = Activity::default();
        a.begin();
        assert_eq!(a.idle_for_ms(unix_ms() + 10_000), None);
        a.end();
        assert!(a.idle_for_ms(unix_ms() + 10_000).unwrap() >= 9_000);
    }
}
