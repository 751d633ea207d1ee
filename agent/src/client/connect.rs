//! Making a connection to the agent: the vsock device's `CONNECT`/`OK` exchange on the VM's
//! Unix socket, then the hello (on a client, or on the caller's thread so the connection can
//! be passed to another process).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    unexpected, AgentClient, AgentInfo, ClientError, Result, DEFAULT_REQUEST_TIMEOUT,
    HANDSHAKE_HELLO_ID, HANDSHAKE_TIMEOUT,
};
use crate::protocol::{
    decode, encode_frame, read_frame, FrameError, Request, Response, ResponseBody,
};

impl AgentClient {
    /// Connects to the agent's vsock `port` through the VM's vsock Unix socket: sends
    /// `CONNECT <port>\n` and expects `OK <hostport>\n`.
    pub fn connect_uds(vm_socket: &Path, port: u32) -> Result<Self> {
        Self::new(Self::connect_stream(vm_socket, port)?)
    }

    /// Connects as [`connect_uds`](Self::connect_uds) and says hello on the caller's thread,
    /// waiting at most `timeout` for the answer, without a client around the connection:
    /// the stream holds nothing but what follows the hello, so it can be passed to another
    /// process, which [`adopt`](Self::adopt)s it.
    pub fn handshake_uds(
        vm_socket: &Path,
        port: u32,
        timeout: Duration,
    ) -> Result<(UnixStream, AgentInfo)> {
        let mut stream = Self::connect_stream(vm_socket, port)?;
        stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let hello = Request {
            id: HANDSHAKE_HELLO_ID,
            body: Self::hello_request(),
        };
        stream.write_all(&encode_frame(&hello)?)?;
        let payload = match read_frame(&mut stream) {
            Ok(Some(payload)) => payload,
            Ok(None) => {
                return Err(ClientError::Disconnected(
                    "the agent closed the connection before its hello".into(),
                ))
            }
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout {
                    what: "hello".into(),
                    timeout,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let response: Response = decode(&payload)?;
        if response.id != HANDSHAKE_HELLO_ID {
            return Err(unexpected("hello", &response.body));
        }
        let info = match response.body {
            ResponseBody::Error(err) => return Err(ClientError::Remote(err)),
            body => Self::check_hello(body)?,
        };
        stream.set_read_timeout(None)?;
        Ok((stream, info))
    }

    /// The vsock device's `CONNECT`/`OK` exchange on a new connection to `vm_socket`.
    fn connect_stream(vm_socket: &Path, port: u32) -> Result<UnixStream> {
        let handshake_error = |reason: String| ClientError::Handshake {
            path: vm_socket.to_path_buf(),
            port,
            reason,
        };
        let mut stream = UnixStream::connect(vm_socket).map_err(|source| ClientError::Connect {
            path: vm_socket.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(|err| handshake_error(format!("sending CONNECT: {err}")))?;
        // Byte by byte: what follows the line already belongs to the agent's stream.
        let mut line = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => {
                    return Err(handshake_error(format!(
                        "connection closed after {:?} (is the agent listening?)",
                        String::from_utf8_lossy(&line)
                    )))
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() >= 64 => {
                    return Err(handshake_error(format!(
                        "reply too long: {:?}…",
                        String::from_utf8_lossy(&line)
                    )))
                }
                Ok(_) => line.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(handshake_error(format!("reading the reply: {err}"))),
            }
        }
        let line = String::from_utf8_lossy(&line);
        let valid = line
            .strip_prefix("OK ")
            .is_some_and(|n| n.trim().parse::<u32>().is_ok());
        if !valid {
            return Err(handshake_error(format!(
                "expected \"OK <port>\", got {line:?}"
            )));
        }
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        Ok(stream)
    }

    /// Connects and says hello, retrying until the agent answers or `timeout` passes (the
    /// guest boots meanwhile; the socket may not even exist yet).
    pub fn wait_ready(vm_socket: &Path, port: u32, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Self::connect_uds(vm_socket, port).and_then(|mut client| {
                let left = deadline.saturating_duration_since(Instant::now());
                client.request_timeout = left.max(Duration::from_millis(100));
                client.hello()?;
                client.request_timeout = DEFAULT_REQUEST_TIMEOUT;
                Ok(client)
            });
            match attempt {
                Ok(client) => return Ok(client),
                Err(err @ ClientError::Version { .. }) => return Err(err),
                Err(err) if Instant::now() >= deadline => {
                    return Err(ClientError::Timeout {
                        what: format!(
                            "a connection to vsock port {port} via {} (last error: {err})",
                            vm_socket.display()
                        ),
                        timeout,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
