//! A typed client of ember's HTTP API, and the API's request and response types.
//!
//! Owns [`types`] and [`responses`], the bodies `ember serve` parses and answers (the service
//! uses these same types, and derives its OpenAPI document from them), and [`ApiClient`], HTTP/1.1 over the service's Unix socket. Used by the `ember`
//! CLI, `ember-bench` and SDK tests.
//!
//! Must not depend on the service, the CLI or the VMM process's crates: clients link it
//! without them.

#[cfg(feature = "api")]
mod connection;
#[cfg(feature = "api")]
pub mod files;
pub mod images;
#[cfg(feature = "api")]
pub mod network;
#[cfg(feature = "api")]
pub mod responses;
#[cfg(feature = "api")]
pub mod templates;
#[cfg(feature = "api")]
pub mod types;

#[cfg(feature = "api")]
pub use connection::{
    empty_body, encode_query, json_body, typed_body, ApiClient, ApiClientError, RequestBody,
};
