//! HTTP/1.1 to `ember serve` over its Unix socket, with hyper.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::types::ErrorDocument;

pub type RequestBody = BoxBody<Bytes, std::io::Error>;

#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("cannot reach the ember service at {path}: {source} (is `ember serve` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP to the ember service: {0}")]
    Http(String),
    /// The service answered with an error document.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

pub struct ApiClient {
    socket: PathBuf,
}

pub fn json_body(value: &Value) -> RequestBody {
    Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

/// `value` as a JSON request body (one of [`crate::types`]).
pub fn typed_body<T: serde::Serialize>(value: &T) -> RequestBody {
    Full::new(Bytes::from(
        serde_json::to_vec(value).expect("API types serialise to JSON"),
    ))
    .map_err(|never| match never {})
    .boxed()
}

pub fn empty_body() -> RequestBody {
    json_body(&Value::Object(Default::default()))
}

impl ApiClient {
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends a request; an error status becomes [`ApiClientError::Api`].
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        body: RequestBody,
    ) -> Result<Response<Incoming>, ApiClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "ember")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| ApiClientError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ApiClientError::Http(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(api_error(status, &bytes))
    }

    /// Sends a body-less request and returns its answer as text (e.g. `/metrics`).
    pub async fn text(&self, method: Method, uri: &str) -> Result<String, ApiClientError> {
        let bytes = body_bytes(self.send(method, uri, empty_body()).await?).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends a request and parses the JSON answer (`null` for an empty one).
    pub async fn json(
        &self,
        method: Method,
        uri: &str,
        body: RequestBody,
    ) -> Result<Value, ApiClientError> {
        let bytes = body_bytes(self.send(method, uri, body).await?).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiClientError::Http(format!("the answer is not JSON: {e}")))
    }
}

/// A response's whole body.
async fn body_bytes(response: Response<Incoming>) -> Result<Bytes, ApiClientError> {
    Ok(response
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiClientError::Http(e.to_string()))?
        .to_bytes())
}

fn api_error(status: StatusCode, bytes: &[u8]) -> ApiClientError {
    let (code, message) = match serde_json::from_slice::<ErrorDocument>(bytes) {
        Ok(doc) => (doc.error.code, doc.error.message),
        Err(_) => (
            "unknown".to_string(),
            String::from_utf8_lossy(bytes).into_owned(),
        ),
    };
    ApiClientError::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query("/tmp/a b&c=d"), "/tmp/a%20b%26c%3Dd");
        assert_eq!(encode_query("/ü"), "/%C3%BC");
    }

    #[test]
    fn error_documents_become_api_errors() {
        let e = api_error(
            StatusCode::NOT_FOUND,
            br#"{"error":{"code":"not_found","message":"no sandbox \"x\""}}"#,
        );
        assert_eq!(e.to_string(), "no sandbox \"x\" (not_found, HTTP 404)");
    }
}
