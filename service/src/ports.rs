//! Exposed ports: a TCP port on the host's loopback per guest port a sandbox asked for. Each
//! connection to it becomes a vsock connection to the guest agent's forwarding port, which
//! connects to the guest port on the guest's loopback (`ember_agent::forward`). Nothing of the
//! guest's network is involved, so ports work in network mode `none` too.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ember_agent::forward::FORWARD_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinHandle;

/// Most ports one sandbox may expose.
pub const MAX_PORTS: usize = 16;
/// The longest handshake line read from the VMM or the agent.
const MAX_LINE: usize = 256;

pub use ember_client::responses::ExposedPort;

/// Why a create request's port list is refused, or a forwarded connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("{asked} ports asked for; a sandbox exposes at most {MAX_PORTS}")]
    TooMany { asked: usize },
    #[error("port 0 cannot be exposed")]
    Zero,
    #[error("port {0} is listed twice")]
    Twice(u16),
    #[error("the connection ended during its handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("a handshake line is longer than {MAX_LINE} bytes")]
    LongLine,
    #[error("cannot reach the VMM: {0}")]
    Vmm(#[source] std::io::Error),
    #[error("the guest agent is not forwarding ports ({0:?})")]
    NotForwarding(String),
    #[error("the guest agent refused the connection: {0}")]
    Refused(String),
    #[error("forwarding: {0}")]
    Copy(#[source] std::io::Error),
    #[error("cannot listen on the host for guest port {guest_port}: {source}")]
    Listen {
        guest_port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Checks the ports a create request asks for.
pub fn check(ports: &[u16]) -> Result<(), PortError> {
    if ports.len() > MAX_PORTS {
        return Err(PortError::TooMany { asked: ports.len() });
    }
    if ports.contains(&0) {
        return Err(PortError::Zero);
    }
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(PortError::Twice(w[0]));
    }
    Ok(())
}

/// Listens on loopback (on `host_port`, or any free port for 0) for `guest_port` of the
/// sandbox whose vsock socket is `vsock_socket`; the task forwards every connection until
/// aborted.
pub async fn expose(
    vsock_socket: PathBuf,
    guest_port: u16,
    host_port: u16,
) -> std::io::Result<(ExposedPort, JoinHandle<()>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, host_port)).await?;
    let host = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    log::warn!("exposed port {host}: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let socket = vsock_socket.clone();
            tokio::spawn(async move {
                if let Err(e) = forward(&socket, guest_port, tcp).await {
                    log::warn!("exposed port {host} → guest port {guest_port}: {e}");
                }
            });
        }
    });
    Ok((ExposedPort { guest_port, host }, task))
}

/// Reads one `\n`-terminated line, byte by byte (what follows is the stream's).
async fn read_line(stream: &mut (impl AsyncRead + Unpin)) -> Result<String, PortError> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(PortError::Handshake)?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte);
        if line.len() > MAX_LINE {
            return Err(PortError::LongLine);
        }
    }
}

/// One connection: through the VMM's vsock socket to the agent's forwarding port, then to the
/// guest port; bytes flow until both sides are done.
async fn forward(
    vsock_socket: &Path,
    guest_port: u16,
    mut tcp: TcpStream,
) -> Result<(), PortError> {
    let mut guest = UnixStream::connect(vsock_socket)
        .await
        .map_err(PortError::Vmm)?;
    guest
        .write_all(format!("CONNECT {FORWARD_VSOCK_PORT}\n").as_bytes())
        .await
        .map_err(PortError::Handshake)?;
    let line = read_line(&mut guest).await?;
    if !line.starts_with("OK ") {
        return Err(PortError::NotForwarding(line));
    }
    guest
        .write_all(format!("PORT {guest_port}\n").as_bytes())
        .await
        .map_err(PortError::Handshake)?;
    let line = read_line(&mut guest).await?;
    if line != "OK" {
        return Err(PortError::Refused(line));
    }
    tokio::io::copy_bidirectional(&mut tcp, &mut guest)
        .await
        .map(|_| ())
        .map_err(PortError::Copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_are_checked() {
        assert!(check(&[]).is_ok());
        assert!(check(&[8000, 3000]).is_ok());
        assert!(check(&[0]).is_err());
        assert!(check(&[80, 80]).is_err());
        let many: Vec<u16> = (1..=MAX_PORTS as u16 + 1).collect();
        assert!(check(&many).is_err());
    }

    /// The service's half against a fake VMM socket that answers like the vsock device and
    /// the agent, then echoes.
    #[tokio::test]
    async fn a_connection_goes_through_the_handshakes_then_both_ways() {
        let dir = std::env::temp_dir().join(format!("ember-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock");
        let _ = std::fs::remove_file(&socket);
        let vmm = tokio::net::UnixListener::bind(&socket).unwrap();
        let fake = tokio::spawn(async move {
            let (mut conn, _) = vmm.accept().await.unwrap();
            assert_eq!(read_line(&mut conn).await.unwrap(), "CONNECT 53");
            conn.write_all(b"OK 1024\n").await.unwrap();
            assert_eq!(read_line(&mut conn).await.unwrap(), "PORT 8000");
            conn.write_all(b"OK\n").await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            conn.write_all(&got).await.unwrap();
        });
        let (exposed, task) = expose(socket.clone(), 8000, 0).await.unwrap();
        assert_eq!(exposed.guest_port, 8000);
        assert!(exposed.host.ip().is_loopback());
        let mut client = TcpStream::connect(exposed.host).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ping");
        fake.await.unwrap();
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
