//! A TAP interface opened through `/dev/net/tun`: one `read` is one frame from the host, one
//! `write` one frame to it, each preceded by a `virtio_net_hdr_v1` (`IFF_VNET_HDR` with the
//! header size set to [`VNET_HDR_LEN`]), the same header the guest uses, so frames are copied
//! without conversion.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_LEN};

const TUN_PATH: &str = "/dev/net/tun";
/// Linux's `IFNAMSIZ`, terminating NUL included.
pub const IFNAMSIZ: usize = 16;

// From <linux/if_tun.h>: _IOW('T', 202, int), _IOW('T', 216, int), _IOW('T', 208, unsigned int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// Sets which offloads frames read from the TAP may use (`TUN_F_*`).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// The reader accepts frames with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
pub const TUN_F_CSUM: u32 = 0x01;
/// The reader accepts TCP segmentation offload frames over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// The reader accepts TCP segmentation offload frames over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name` (creating a non-persistent one if it does not
    /// exist and the caller may), non-blocking, with virtio headers and no offloads.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(NetError::TapName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| NetError::Tun {
                what: "open /dev/net/tun",
                tap: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tun_err = |what| {
            let source = io::Error::last_os_error();
            NetError::Tun {
                what,
                tap: name.to_string(),
                source,
            }
        };
        // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`; `req` has its layout and
        // size and outlives the call. The result is checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(tun_err("attach (TUNSETIFF) to"));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call. The result is checked.
        if unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        } < 0
        {
            return Err(tun_err("set the virtio header size (TUNSETVNETHDRSZ) of"));
        }
        // No offloads: frames read are whole and checksummed, as a guest that negotiated no
        // offload features expects.
        // SAFETY: TUNSETOFFLOAD takes its flags by value. The result is checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(tun_err("turn off offloads (TUNSETOFFLOAD) of"));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// A frame channel from an already open descriptor that keeps message boundaries and
    /// carries the same header (a TAP queue opened elsewhere, or a `SOCK_SEQPACKET` socket in
    /// tests). It is made non-blocking.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Tap, NetError> {
        let file = File::from(fd);
        let tun_err = |what| NetError::Tun {
            what,
            tap: name.to_string(),
            source: io::Error::last_os_error(),
        };
        // SAFETY: fcntl on a descriptor we own; the result is checked.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(tun_err("read the flags of"));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(tun_err("make non-blocking"));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The open queue's descriptor, to hand to another process (which takes it back with
    /// [`Tap::from_fd`]).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// Lets frames read from the TAP carry the offloads in `flags` (`TUN_F_*`): the guest
    /// negotiated them.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value. The result is checked.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether this is a TAP that takes checksum and segmentation offloads both ways (a
    /// stand-in such as a socket does not). Leaves them off.
    pub fn supports_offloads(&self) -> bool {
        self.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok()
            && self.set_offload(0).is_ok()
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
