//! Reaching the API from other hosts: `--listen ADDR:PORT` serves the same router over TCP,
//! HTTPS with `--tls-cert`/`--tls-key` (plain HTTP only on loopback), every request
//! authenticated by a bearer token from `--token-file` (re-read on SIGHUP) and limited per
//! token. The Unix socket keeps its own check (the peer's uid).

mod tls;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use self::tokens::{Budgets, TokenFileError, Tokens};
use crate::error::ApiError;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteAccessArgs {
    /// Also serve the API on this TCP address (`0.0.0.0:7443`, `127.0.0.1:7080`), to
    /// clients with a token from --token-file. Without --tls-cert/--tls-key only a
    /// loopback address is allowed.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// The server's certificate chain (PEM) for HTTPS on --listen.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The bearer tokens remote clients may present, one per line (`TOKEN` or
    /// `NAME TOKEN`); re-read when the service gets SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Requests per second each token may make on average (429 with Retry-After beyond).
    #[arg(long, default_value_t = 100)]
    pub token_rate: u32,
    /// Requests a token may make at once above its rate.
    #[arg(long, default_value_t = 200)]
    pub token_burst: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteAccessError {
    #[error("--listen needs --token-file: every remote request must carry a token")]
    NoTokenFile,
    #[error(
        "refusing to listen on {0} without TLS: give --tls-cert and --tls-key, or listen on a \
         loopback address (tokens would cross the network in clear text)"
    )]
    PlainTextOffLoopback(SocketAddr),
    #[error("--tls-cert, --tls-key and --token-file need --listen")]
    NoListenAddress,
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who may call over TCP, and how often.
pub struct Gate {
    token_file: PathBuf,
    tokens: RwLock<Tokens>,
    budgets: Mutex<Budgets>,
}

impl Gate {
    pub fn new(token_file: PathBuf, tokens: Tokens, rate: u32, burst: u32) -> Gate {
        Gate {
            token_file,
            tokens: RwLock::new(tokens),
            budgets: Mutex::new(Budgets::new(rate, burst)),
        }
    }

    /// Re-reads the token file; on an error the tokens in use stay.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let fresh = Tokens::read(&self.token_file)?;
        let count = fresh.len();
        self.budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep_only(fresh.names());
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(count)
    }

    /// The name of the token in an `Authorization: Bearer …` header.
    fn authenticate(&self, authorization: Option<&HeaderValue>) -> Option<String> {
        let value = authorization?.as_bytes();
        let scheme = value.get(..7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let presented = value[7..].trim_ascii();
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .find(presented)
            .map(str::to_string)
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The middleware every TCP request passes: a valid token, within its budget.
async fn authorize(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION);
    let Some(name) = gate.authenticate(authorization) else {
        let message = if authorization.is_some() {
            "the bearer token is not one this service accepts"
        } else {
            "this service needs `Authorization: Bearer TOKEN`"
        };
        return unauthorized(message);
    };
    let taken = gate
        .budgets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(&name, Instant::now());
    if let Err(wait) = taken {
        let retry_after = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("token {name:?} is over its request rate; retry in {retry_after} s"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        return response;
    }
    next.run(request).await
}

/// The TCP side of the service, checked and ready to serve.
pub struct RemoteAccess {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    pub gate: Arc<Gate>,
}

impl RemoteAccess {
    /// Checks the options: `None` when `--listen` is not given.
    pub fn from_args(args: &RemoteAccessArgs) -> Result<Option<RemoteAccess>, RemoteAccessError> {
        let Some(addr) = args.listen else {
            if args.tls_cert.is_some() || args.token_file.is_some() {
                return Err(RemoteAccessError::NoListenAddress);
            }
            return Ok(None);
        };
        let token_file = args
            .token_file
            .clone()
            .ok_or(RemoteAccessError::NoTokenFile)?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            _ if addr.ip().is_loopback() => None,
            _ => return Err(RemoteAccessError::PlainTextOffLoopback(addr)),
        };
        let tokens = Tokens::read(&token_file)?;
        Ok(Some(RemoteAccess {
            addr,
            tls,
            gate: Arc::new(Gate::new(
                token_file,
                tokens,
                args.token_rate,
                args.token_burst,
            )),
        }))
    }

    /// Binds the address (so a taken port fails the start, not later).
    pub async fn bind(self) -> Result<BoundRemote, RemoteAccessError> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|source| RemoteAccessError::Bind {
                addr: self.addr,
                source,
            })?;
        Ok(BoundRemote {
            listener,
            access: self,
        })
    }
}

pub struct BoundRemote {
    listener: tokio::net::TcpListener,
    access: RemoteAccess,
}

impl BoundRemote {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Re-reads the token file on each SIGHUP.
    pub fn reload_tokens_on_sighup(&self) -> std::io::Result<()> {
        let gate = self.access.gate.clone();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match gate.reload() {
                    Ok(count) => log::info!(
                        "SIGHUP: {count} token(s) from {}",
                        gate.token_file.display()
                    ),
                    Err(e) => log::error!("SIGHUP: keeping the tokens in use: {e}"),
                }
            }
        });
        Ok(())
    }

    /// Serves `app` behind the token check until `shutdown` resolves.
    pub async fn serve(
        self,
        app: Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = app.layer(axum::middleware::from_fn_with_state(
            self.access.gate.clone(),
            authorize,
        ));
        let addr = self.access.addr;
        match self.access.tls {
            Some(config) => {
                log::info!("ember serve: HTTPS on {addr}");
                let listener = tls::TlsListener::new(self.listener, config)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            None => {
                log::info!("ember serve: HTTP on {addr} (loopback, no TLS)");
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    const ALICE: &str = "alice-0123456789abcdef";
    const BOB: &str = "bob-fedcba9876543210fe";

    fn gated(gate: Arc<Gate>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(gate, authorize))
    }

    async fn status_of(app: &Router, authorization: Option<&str>) -> (StatusCode, Response) {
        let mut request = Request::builder().uri("/healthz");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        (response.status(), response)
    }

    fn token_file(dir: &std::path::Path, text: &str) -> PathBuf {
        let path = dir.join("tokens");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn requests_need_a_known_bearer_token_and_rotation_takes_effect() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), &format!("alice {ALICE}\n"));
        let gate = Arc::new(Gate::new(
            path.clone(),
            Tokens::read(&path).unwrap(),
            100,
            100,
        ));
        let app = gated(gate.clone());
        let (status, response) = status_of(&app, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            status_of(&app, Some(&format!("Bearer {BOB}"))).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&app, Some(ALICE)).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&app, Some(&format!("Basic {ALICE}"))).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&app, Some(&format!("bearer {ALICE}"))).await.0,
            StatusCode::OK
        );
        // Rotation: bob replaces alice.
        token_file(dir.path(), &format!("bob {BOB}\n"));
        assert_eq!(gate.reload().unwrap(), 1);
        assert_eq!(
            status_of(&app, Some(&format!("Bearer {ALICE}"))).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&app, Some(&format!("Bearer {BOB}"))).await.0,
            StatusCode::OK
        );
        // A broken file keeps the tokens in use.
        token_file(dir.path(), "short\n");
        assert!(gate.reload().is_err());
        assert_eq!(
            status_of(&app, Some(&format!("Bearer {BOB}"))).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn each_token_has_its_own_rate_and_hears_when_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), &format!("alice {ALICE}\nbob {BOB}\n"));
        let gate = Arc::new(Gate::new(path.clone(), Tokens::read(&path).unwrap(), 1, 2));
        let app = gated(gate);
        let alice = format!("Bearer {ALICE}");
        assert_eq!(status_of(&app, Some(&alice)).await.0, StatusCode::OK);
        assert_eq!(status_of(&app, Some(&alice)).await.0, StatusCode::OK);
        let (status, response) = status_of(&app, Some(&alice)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            status_of(&app, Some(&format!("Bearer {BOB}"))).await.0,
            StatusCode::OK
        );
    }

    /// A real TLS handshake and request, with a certificate openssl makes and curl as the
    /// client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_with_a_token_answers_and_plain_http_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ember_testkit::tls::self_signed(dir.path(), "IP:127.0.0.1");
        let args = RemoteAccessArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            tls_cert: Some(cert.clone()),
            tls_key: Some(key),
            token_file: Some(token_file(dir.path(), &format!("{ALICE}\n"))),
            token_rate: 100,
            token_burst: 100,
        };
        let bound = RemoteAccess::from_args(&args)
            .unwrap()
            .unwrap()
            .bind()
            .await
            .unwrap();
        let port = bound.local_addr().unwrap().port();
        let app = Router::new().route("/healthz", get(|| async { "ok" }));
        tokio::spawn(bound.serve(app, std::future::pending()));
        let curl = |scheme: &'static str, token: Option<&'static str>| {
            let cert = cert.clone();
            tokio::task::spawn_blocking(move || {
                let mut command = std::process::Command::new("curl");
                command
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "10",
                    ])
                    .arg("--cacert")
                    .arg(&cert)
                    .arg(format!("{scheme}://127.0.0.1:{port}/healthz"));
                if let Some(token) = token {
                    command.args(["-H", &format!("Authorization: Bearer {token}")]);
                }
                String::from_utf8(command.output().unwrap().stdout).unwrap()
            })
        };
        assert_eq!(curl("https", Some(ALICE)).await.unwrap(), "200");
        assert_eq!(curl("https", None).await.unwrap(), "401");
        assert_eq!(curl("https", Some(BOB)).await.unwrap(), "401");
        assert_eq!(curl("http", Some(ALICE)).await.unwrap(), "000");
    }

    #[test]
    fn listening_off_loopback_needs_tls_and_every_listener_needs_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = token_file(dir.path(), &format!("{ALICE}\n"));
        let args = |listen: &str, token_file: Option<&PathBuf>| RemoteAccessArgs {
            listen: Some(listen.parse().unwrap()),
            token_file: token_file.cloned(),
            ..Default::default()
        };
        assert!(matches!(
            RemoteAccess::from_args(&args("0.0.0.0:7443", Some(&tokens))),
            Err(RemoteAccessError::PlainTextOffLoopback(_))
        ));
        assert!(matches!(
            RemoteAccess::from_args(&args("127.0.0.1:7080", None)),
            Err(RemoteAccessError::NoTokenFile)
        ));
        assert!(
            RemoteAccess::from_args(&args("127.0.0.1:7080", Some(&tokens)))
                .unwrap()
                .is_some()
        );
        assert!(RemoteAccess::from_args(&args("[::1]:7080", Some(&tokens)))
            .unwrap()
            .is_some());
        let no_listen = RemoteAccessArgs {
            token_file: Some(tokens.clone()),
            ..Default::default()
        };
        assert!(matches!(
            RemoteAccess::from_args(&no_listen),
            Err(RemoteAccessError::NoListenAddress)
        ));
        assert!(RemoteAccess::from_args(&RemoteAccessArgs::default())
            .unwrap()
            .is_none());
        let missing_cert = RemoteAccessArgs {
            tls_cert: Some(dir.path().join("nope.pem")),
            tls_key: Some(dir.path().join("nope.key")),
            ..args("0.0.0.0:7443", Some(&tokens))
        };
        let e = RemoteAccess::from_args(&missing_cert)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }
}
