//! The guest's AF_VSOCK transport and the accept loops of the agent and of port forwards.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::Transport;

use super::{serve_connection, spawn_thread, ServerConfig, ServerError};

/// A connected AF_VSOCK stream socket.
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for VsockStream {
    fn try_clone_transport(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }
    fn shutdown_transport(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd this value owns.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl crate::forward::HalfClose for VsockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket fd this value owns.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A listening AF_VSOCK socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for any CID (the host connects through the VMM's vsock device).
    pub fn bind(port: u32) -> Result<Self, ServerError> {
        // SAFETY: socket has no memory-safety preconditions.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(ServerError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh socket fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ServerError::Bind {
                port,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: listen on a bound socket fd this value owns.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(ServerError::Listen {
                port,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { fd })
    }

    pub fn accept(&self) -> io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 with NULL address pointers (the peer's address is not needed).
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: `raw` is a fresh connected socket fd that nothing else owns.
                return Ok(VsockStream(unsafe { File::from_raw_fd(raw) }));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// Accepts forwarded connections ([`crate::forward`]) on `listener` forever, one thread
/// each.
pub fn serve_forwards_forever(listener: VsockListener) -> ! {
    let mut connections = 0u64;
    loop {
        match listener.accept() {
            Ok(stream) => {
                connections += 1;
                let spawned = spawn_thread(format!("fwd-{connections}"), move || {
                    if let Err(err) = crate::forward::forward_connection(stream) {
                        eprintln!("ember-agent: forwarded connection {connections}: {err}");
                    }
                });
                if let Err(err) = spawned {
                    eprintln!("ember-agent: forwarded connection {connections}: {err}");
                }
            }
            Err(err) => {
                eprintln!("ember-agent: accept on the forwarding port: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Accepts connections on `listener` forever, one thread per connection.
pub fn serve_forever(listener: VsockListener, config: Arc<ServerConfig>) -> ! {
    let mut connections = 0u64;
    loop {
        match listener.accept() {
            Ok(stream) => {
                connections += 1;
                let config = config.clone();
                if let Err(err) = spawn_thread(format!("conn-{connections}"), move || {
                    if let Err(err) = serve_connection(stream, config) {
                        eprintln!("ember-agent: connection {connections}: {err}");
                    }
                }) {
                    eprintln!("ember-agent: connection {connections}: {err}");
                }
            }
            Err(err) => {
                eprintln!("ember-agent: accept on vsock: {err}");
                // E.g. EMFILE: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
