//! `ember shell ID [--attach PTY_ID] [-- CMD ARGS...]`: an interactive terminal in a sandbox,
//! over the service's WebSocket (`GET /sandboxes/{id}/pty/{pty_id}/connect`).
//!
//! The local terminal is put in raw mode for the session (restored on every way out: the end,
//! an error, SIGTERM/SIGHUP/SIGINT/SIGQUIT, a panic), its size follows the window (SIGWINCH),
//! and ember exits with the remote command's exit code. Without a terminal on stdin it still
//! works: input is passed on as it comes, and its end is typed as ^D.

use std::io::{IsTerminal, Read, Write};
use std::sync::Mutex;

use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::{self, Message};

use ember_client::responses::PtyEvent;
use ember_client::types::{PtyBody, PtyControl};
use ember_client::{typed_body, ApiClientError};

use crate::remote::{finish, runtime, ServiceArgs};

#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The sandbox.
    pub id: String,
    /// Connect to this running terminal (its id was printed when it started) instead of
    /// starting one.
    #[arg(long, value_name = "PTY_ID")]
    pub attach: Option<String>,
    /// KEY=VALUE for the command (repeatable).
    #[arg(long, value_parser = ember_sandbox::session::parse_env, conflicts_with = "attach")]
    pub env: Vec<(String, String)>,
    #[arg(long, conflicts_with = "attach")]
    pub cwd: Option<String>,
    /// Run as `root` or as the runtime's user (`user`); default: the runtime's.
    #[arg(long, conflicts_with = "attach")]
    pub user: Option<String>,
    /// The command and its arguments (default: the user's login shell).
    #[arg(last = true, conflicts_with = "attach")]
    pub command: Vec<String>,
}

/// The terminal settings to put back, for the panic hook (a panic aborts in release builds,
/// so no destructor would run).
static SAVED: Mutex<Option<(i32, libc::termios)>> = Mutex::new(None);

/// The local terminal in raw mode until dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> std::io::Result<RawMode> {
        // SAFETY: termios is plain data; all-zero is a valid value for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into the valid pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw changes the flags of the valid termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_saved();
                previous(info);
            }));
        });
        // SAFETY: tcsetattr reads one termios from the valid pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

fn restore_saved() {
    if let Some((fd, saved)) = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // SAFETY: tcsetattr reads one termios from the valid pointer.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
        // SAFETY: tcsetattr reads one termios from the valid pointer.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The local terminal's size (columns, rows), if stdout or stdin is one.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [1, 0, 2] {
        // SAFETY: winsize is plain data; all-zero is a valid value.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize into the valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0
            && size.ws_col > 0
            && size.ws_row > 0
        {
            return Some((size.ws_col, size.ws_row));
        }
    }
    None
}

fn http_error(e: impl std::fmt::Display) -> ApiClientError {
    ApiClientError::Http(e.to_string())
}

/// Why the WebSocket could not be opened: the service's error document when it sent one.
fn connect_error(e: tungstenite::Error) -> ApiClientError {
    if let tungstenite::Error::Http(response) = &e {
        let body = response.body().as_deref().unwrap_or_default();
        if let Ok(doc) = serde_json::from_slice::<ember_client::types::ErrorDocument>(body) {
            return ApiClientError::Api {
                status: response.status().as_u16(),
                code: doc.error.code,
                message: doc.error.message,
            };
        }
    }
    http_error(format!("cannot connect to the terminal: {e}"))
}

fn resize_message(cols: u16, rows: u16) -> Message {
    let control = PtyControl::Resize { cols, rows };
    Message::text(serde_json::to_string(&control).unwrap_or_default())
}

pub fn shell(args: ShellArgs) -> i32 {
    let socket = args
        .service
        .socket
        .clone()
        .unwrap_or_else(|| ember_service::default_socket(None));
    let client = args.service.client();
    let interactive = std::io::stdin().is_terminal();
    let (cols, rows) = terminal_size().unwrap_or((80, 24));
    finish(runtime().block_on(async move {
        let pty_id = match &args.attach {
            Some(pty_id) => pty_id.clone(),
            None => {
                let body = PtyBody {
                    cmd: args.command.first().cloned(),
                    args: args.command.iter().skip(1).cloned().collect(),
                    cols,
                    rows,
                    env: args.env.iter().cloned().collect(),
                    cwd: args.cwd.clone(),
                    user: args.user.clone(),
                };
                let uri = format!("/sandboxes/{}/pty", args.id);
                let info = client.json(Method::POST, &uri, typed_body(&body)).await?;
                info["pty_id"].as_str().unwrap_or_default().to_string()
            }
        };
        eprintln!(
            "ember: terminal {pty_id} (`ember shell {} --attach {pty_id}` connects to it again)",
            args.id
        );
        let stream = tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|source| ApiClientError::Connect {
                path: socket.clone(),
                source,
            })?;
        let url = format!("ws://ember/sandboxes/{}/pty/{pty_id}/connect", args.id);
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(connect_error)?;
        let raw = if interactive {
            Some(RawMode::enter(0).map_err(|e| http_error(format!("raw mode: {e}")))?)
        } else {
            None
        };
        let outcome = session(ws, interactive, args.attach.is_some()).await;
        drop(raw);
        match outcome? {
            Ending::Exit(code) => Ok(code),
            Ending::Closed(reason) => {
                eprintln!("ember: the terminal's connection closed: {reason}");
                Ok(1)
            }
            Ending::Signal(signal) => {
                eprintln!(
                    "ember: left terminal {pty_id} running (`ember shell {} --attach {pty_id}`)",
                    args.id
                );
                Ok(128 + signal)
            }
        }
    }))
}

enum Ending {
    /// The command's exit code (128+N for signal N).
    Exit(i32),
    /// The service closed the connection without an exit (another client took over).
    Closed(String),
    /// ember itself got this signal.
    Signal(i32),
}

/// Moves bytes both ways until the command ends, the connection does, or ember is signalled.
async fn session(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>,
    interactive: bool,
    attach: bool,
) -> Result<Ending, ApiClientError> {
    let (mut sink, mut stream) = ws.split();
    // stdin on a thread of its own (a blocking read cannot be cancelled; exiting ends it).
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::Builder::new()
        .name("ember-shell-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .map_err(|e| http_error(format!("cannot start the input thread: {e}")))?;
    let mut input_open = true;
    let mut winch = signal(SignalKind::window_change()).map_err(http_error)?;
    let mut term = signal(SignalKind::terminate()).map_err(http_error)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(http_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(http_error)?;
    let mut quit = signal(SignalKind::quit()).map_err(http_error)?;
    if attach {
        // Our window's size, which also makes a full-screen program redraw.
        if let Some((cols, rows)) = terminal_size() {
            sink.send(resize_message(cols, rows))
                .await
                .map_err(http_error)?;
        }
    }
    let mut exit = None;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    stdout.write_all(&data).and_then(|()| stdout.flush()).map_err(http_error)?;
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<PtyEvent>(&text) {
                    Ok(PtyEvent::Exit { exit_code, signal, error }) => {
                        exit = Some(match (exit_code, signal) {
                            (Some(code), _) => code,
                            (None, Some(signal)) => 128 + signal,
                            (None, None) => {
                                eprint!("ember: the command's end is unknown: {}\r\n",
                                    error.unwrap_or_default());
                                1
                            }
                        });
                    }
                    Ok(PtyEvent::Error { message }) => eprint!("ember: {message}\r\n"),
                    Err(_) => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    if let Some(code) = exit {
                        return Ok(Ending::Exit(code));
                    }
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    return Ok(Ending::Closed(if reason.is_empty() { "no reason given".into() } else { reason }));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if let Some(code) = exit {
                        return Ok(Ending::Exit(code));
                    }
                    return Err(http_error(format!("the terminal's connection broke: {e}")));
                }
                None => {
                    return Ok(match exit {
                        Some(code) => Ending::Exit(code),
                        None => Ending::Closed("the service closed it".into()),
                    });
                }
            },
            data = input_rx.recv(), if input_open => match data {
                Some(data) => sink.send(Message::binary(data)).await.map_err(http_error)?,
                None => {
                    input_open = false;
                    if !interactive {
                        // The end of piped input, typed as ^D (end of file at a line's start).
                        sink.send(Message::binary(vec![4u8])).await.map_err(http_error)?;
                    }
                }
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = terminal_size() {
                    sink.send(resize_message(cols, rows)).await.map_err(http_error)?;
                }
            }
            _ = term.recv() => return Ok(Ending::Signal(libc::SIGTERM)),
            _ = hangup.recv() => return Ok(Ending::Signal(libc::SIGHUP)),
            _ = interrupt.recv() => return Ok(Ending::Signal(libc::SIGINT)),
            _ = quit.recv() => return Ok(Ending::Signal(libc::SIGQUIT)),
        }
    }
}
