//! The API's one error type: every failure is `{"error": {"code", "message"}}` with the
//! HTTP status that fits it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ember_client::types::{ErrorBody, ErrorDocument};

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} {id:?}"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            log::warn!("{}: {}", self.code, self.message);
        }
        let body = ErrorDocument {
            error: ErrorBody {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Maps an agent failure to the status a client can act on.
pub fn from_agent(what: &str, err: ember_agent::client::ClientError) -> ApiError {
    use ember_agent::client::ClientError;
    use ember_agent::protocol::ErrorKind;
    match &err {
        ClientError::Remote(remote) => {
            let (status, code) = match remote.kind {
                ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                // A path whose directory is a file (a command's working directory, say):
                // there is no such directory.
                ErrorKind::InvalidInput if remote.errno == Some(libc::ENOTDIR) => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                // Writing a directory as a file: the path is there, as something else.
                ErrorKind::InvalidInput if remote.errno == Some(libc::EISDIR) => {
                    (StatusCode::CONFLICT, "is_a_directory")
                }
                // Removing a folder that is not empty without `recursive`, or renaming a
                // folder over one.
                ErrorKind::Io if remote.errno == Some(libc::ENOTEMPTY) => {
                    (StatusCode::CONFLICT, "not_empty")
                }
                ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
                ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
                ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "invalid_request"),
                ErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                ErrorKind::Io | ErrorKind::Protocol => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "guest_error")
                }
            };
            ApiError::new(status, code, format!("{what}: {remote}"))
        }
        // The guest runs an agent from before this request (a snapshot taken with an older
        // ember): nothing was asked of it.
        ClientError::Unsupported { .. } => ApiError::new(
            StatusCode::CONFLICT,
            "agent_too_old",
            format!("{what}: {err}"),
        ),
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_unreachable",
            format!("{what}: {err}"),
        ),
    }
}

/// As [`from_agent`], for a request on a directory: a path that is there but is not a
/// directory is a conflict (409 `not_a_directory`), not a missing one.
pub fn from_agent_on_dir(what: &str, err: ember_agent::client::ClientError) -> ApiError {
    use ember_agent::client::ClientError;
    use ember_agent::protocol::ErrorKind;
    match &err {
        ClientError::Remote(remote)
            if remote.kind == ErrorKind::InvalidInput && remote.errno == Some(libc::ENOTDIR) =>
        {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_a_directory",
                format!("{what}: {remote}"),
            )
        }
        _ => from_agent(what, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_agent::client::ClientError;
    use ember_agent::protocol::{ErrorKind, RemoteError};

    fn remote(kind: ErrorKind, errno: Option<i32>) -> ClientError {
        ClientError::Remote(RemoteError {
            kind,
            errno,
            message: "refused".into(),
        })
    }

    #[test]
    fn agent_failures_map_to_what_a_client_can_act_on() {
        for (err, status) in [
            (
                remote(ErrorKind::InvalidInput, Some(libc::EISDIR)),
                StatusCode::CONFLICT,
            ),
            (
                remote(ErrorKind::InvalidInput, Some(libc::ENOTDIR)),
                StatusCode::NOT_FOUND,
            ),
            (
                remote(ErrorKind::InvalidInput, None),
                StatusCode::BAD_REQUEST,
            ),
            (remote(ErrorKind::NotFound, None), StatusCode::NOT_FOUND),
            (
                remote(ErrorKind::Io, Some(libc::ENOTEMPTY)),
                StatusCode::CONFLICT,
            ),
            (
                ClientError::Unsupported {
                    what: "list a directory",
                    capability: "files",
                    agent_version: "0.1.0".into(),
                },
                StatusCode::CONFLICT,
            ),
        ] {
            let mapped = from_agent("writing /", err);
            assert_eq!(mapped.status, status, "{}", mapped.message);
            assert!(
                mapped.message.starts_with("writing /: "),
                "{}",
                mapped.message
            );
        }
        let too_old = from_agent(
            "listing /",
            ClientError::Unsupported {
                what: "list a directory",
                capability: "files",
                agent_version: "0.1.0".into(),
            },
        );
        assert_eq!(too_old.code, "agent_too_old");
        assert!(too_old.message.contains("\"files\""), "{}", too_old.message);
    }

    #[test]
    fn a_path_that_is_not_a_directory_is_a_conflict_for_directory_requests() {
        let err = from_agent_on_dir(
            "listing /etc/hostname",
            remote(ErrorKind::InvalidInput, Some(libc::ENOTDIR)),
        );
        assert_eq!(
            (err.status, err.code),
            (StatusCode::CONFLICT, "not_a_directory")
        );
        // A missing parent stays a 404, and other errors map as usual.
        let err = from_agent_on_dir(
            "listing /x/y",
            remote(ErrorKind::NotFound, Some(libc::ENOTDIR)),
        );
        assert_eq!(err.status, StatusCode::NOT_FOUND);
        let err = from_agent_on_dir("listing /x", remote(ErrorKind::InvalidInput, None));
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }
}
