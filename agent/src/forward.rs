//! Exposed ports: the host reaches a TCP port on the guest's loopback through vsock port
//! [`FORWARD_VSOCK_PORT`], so a server in the guest is reachable even when the guest has no
//! network at all. Per connection the host writes `PORT <n>\n` and reads either `OK\n`, after
//! which the connection carries the TCP stream's bytes both ways (each side's end of input is
//! passed on as a half-close), or `ERR <reason>\n` and the end of the connection.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

use crate::protocol::Transport;

/// The guest's vsock port for forwarded connections (the agent's own is 52).
pub const FORWARD_VSOCK_PORT: u32 = 53;
/// The longest `PORT <n>` line accepted, newline included.
pub const MAX_FORWARD_LINE: usize = 16;

/// A stream whose sending side can be closed alone.
pub trait HalfClose {
    /// No more bytes will be written; the peer reads end-of-file.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HalfClose for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Why a forwarded connection's `PORT` line was not taken.
#[derive(Debug, thiserror::Error)]
enum PortLineError {
    #[error("the host closed before its PORT line")]
    Closed,
    #[error("a PORT line longer than {MAX_FORWARD_LINE} bytes")]
    TooLong,
    #[error("reading the PORT line: {0}")]
    Read(#[source] io::Error),
    #[error("malformed line {0:?} (want `PORT <1-65535>`)")]
    Malformed(String),
}

/// Reads the `PORT <n>` line (byte by byte: what follows belongs to the TCP stream).
fn read_port_line(stream: &mut impl Read) -> Result<u16, PortLineError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(PortLineError::Closed),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() >= MAX_FORWARD_LINE {
                    return Err(PortLineError::TooLong);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PortLineError::Read(e)),
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("PORT ")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u16>().ok())
        .filter(|&n| n != 0)
        .ok_or_else(|| PortLineError::Malformed(text.into_owned()))
}

/// Serves one forwarded connection to its end.
pub fn forward_connection<S: Transport + HalfClose>(mut host: S) -> io::Result<()> {
    let port = match read_port_line(&mut host) {
        Ok(port) => port,
        Err(why) => {
            let _ = writeln!(host, "ERR {why}");
            return Ok(());
        }
    };
    let guest = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(stream) => stream,
        Err(e) => {
            let _ = writeln!(host, "ERR cannot connect to port {port} in the guest: {e}");
            return Ok(());
        }
    };
    host.write_all(b"OK\n")?;
    let mut host_in = host.try_clone_transport()?;
    let mut guest_out = guest.try_clone()?;
    // Host → guest on a thread of its own, guest → host here.
    let upstream = std::thread::Builder::new()
        .name(format!("fwd-{port}-in"))
        .spawn(move || {
            let _ = io::copy(&mut host_in, &mut guest_out);
            let _ = guest_out.shutdown(Shutdown::Write);
        })?;
    let mut guest_in = guest;
    let copied = io::copy(&mut guest_in, &mut host);
    let _ = host.shutdown_write();
    let _ = upstream.join();
    copied.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::net::TcpListener;

    fn start(line: &[u8]) -> (UnixStream, std::thread::JoinHandle<io::Result<()>>) {
        let (mut host, agent) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || forward_connection(agent));
        host.write_all(line).unwrap();
        (host, served)
    }

    fn reply(host: &UnixStream) -> String {
        let mut line = String::new();
        io::BufReader::new(host).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn bytes_flow_both_ways_with_half_closes() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // The guest's server: reads to end-of-file, answers with what it read, reversed.
        let guest = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            got.reverse();
            conn.write_all(&got).unwrap();
        });
        // The first bytes of the stream come right behind the PORT line.
        let (mut host, served) = start(format!("PORT {port}\nhello").as_bytes());
        assert_eq!(reply(&host), "OK\n");
        host.write_all(b", guest").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"tseug ,olleh");
        guest.join().unwrap();
        served.join().unwrap().unwrap();
    }

    #[test]
    fn bad_lines_and_closed_ports_are_refused() {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (host, served) = start(format!("PORT {closed}\n").as_bytes());
        let line = reply(&host);
        assert!(line.starts_with("ERR cannot connect to port"), "{line}");
        served.join().unwrap().unwrap();
        for bad in [
            &b"PORT 0\n"[..],
            b"PORT 65536\n",
            b"PORT -1\n",
            b"PORT\n",
            b"port 80\n",
            b"PORT 1234567890123456\n",
        ] {
            let (host, served) = start(bad);
            let line = reply(&host);
            assert!(line.starts_with("ERR "), "{bad:?}: {line}");
            served.join().unwrap().unwrap();
        }
    }
}
