//! `Resync` ([`crate::protocol::RequestBody::Resync`]): after a restore the guest's wall clock
//! is where it was when the snapshot was taken, and every clone of one snapshot has the same
//! kernel RNG state. The host sends the current time and fresh entropy; the agent
//!
//! 1. sets `CLOCK_REALTIME` (`clock_settime`, needs `CAP_SYS_TIME`);
//! 2. mixes the entropy into the kernel's pool with `RNDADDENTROPY` on `/dev/urandom`,
//!    crediting 8 bits per byte, then forces the CRNG to reseed from the pool
//!    (`RNDRESEEDCRNG`), so the very next `getrandom` differs between clones (both need
//!    `CAP_SYS_ADMIN`).
//!
//! Both steps are attempted; the error, if any, says which failed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::protocol::{ErrorKind, RemoteError, MAX_RESYNC_ENTROPY};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` (linux/random.h).
pub const RNDADDENTROPY: u32 = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)` (linux/random.h, Linux 4.17+).
pub const RNDRESEEDCRNG: u32 = 0x0000_5207;

/// The device the RNG ioctls go to.
const RANDOM_DEVICE: &str = "/dev/urandom";

/// Handles a `Resync`: returns the entropy bytes mixed in, or which step failed and why.
/// Oversized entropy is refused before anything is changed.
pub fn resync(unix_time_ns: u64, entropy: &[u8]) -> Result<u64, RemoteError> {
    check_entropy(entropy)?;
    let clock = set_realtime(unix_time_ns).map_err(|err| {
        RemoteError::from_io(
            format!("clock_settime(CLOCK_REALTIME, {unix_time_ns} ns since the epoch)"),
            &err,
        )
    });
    let rng = add_entropy(entropy);
    match (clock, rng) {
        (Ok(()), Ok(())) => Ok(entropy.len() as u64),
        (Err(clock), Ok(())) => Err(RemoteError {
            message: format!(
                "resync step 1 (clock) failed: {}; step 2 (entropy) succeeded",
                clock.message
            ),
            ..clock
        }),
        (Ok(()), Err(rng)) => Err(RemoteError {
            message: format!(
                "resync step 2 (entropy) failed: {}; step 1 (clock) succeeded",
                rng.message
            ),
            ..rng
        }),
        (Err(clock), Err(rng)) => Err(RemoteError {
            message: format!(
                "resync step 1 (clock) failed: {}; step 2 (entropy) failed: {}",
                clock.message, rng.message
            ),
            ..clock
        }),
    }
}

/// Refuses entropy over [`MAX_RESYNC_ENTROPY`] bytes.
pub fn check_entropy(entropy: &[u8]) -> Result<(), RemoteError> {
    if entropy.len() > MAX_RESYNC_ENTROPY {
        return Err(RemoteError::new(
            ErrorKind::TooLarge,
            format!(
                "resync: {} bytes of entropy, more than the {MAX_RESYNC_ENTROPY} allowed; \
                 nothing was changed",
                entropy.len()
            ),
        ));
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns` nanoseconds after the epoch.
fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    let secs = libc::time_t::try_from(unix_time_ns / 1_000_000_000)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // Below 10^9, so it fits every `c_long`.
    let nanos = (unix_time_ns % 1_000_000_000) as libc::c_long;
    // SAFETY: timespec is plain data (on some targets with private padding fields, hence
    // zeroed rather than a struct literal); all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    ts.tv_sec = secs;
    ts.tv_nsec = nanos;
    // SAFETY: clock_settime only reads the timespec, which lives across the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The argument of `RNDADDENTROPY` for `entropy` as bytes, in native byte order:
/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` with
/// `entropy_count` the bits credited (8 per byte), `buf_size` the length of `buf` in bytes,
/// and `buf` the entropy, zero-padded to whole `__u32`s.
pub fn rand_pool_info(entropy: &[u8]) -> Vec<u8> {
    // At most MAX_RESYNC_ENTROPY bytes reach here; saturate rather than wrap otherwise.
    let len = i32::try_from(entropy.len()).unwrap_or(i32::MAX / 8);
    let bits = len.saturating_mul(8);
    let mut out = Vec::with_capacity(8 + entropy.len().next_multiple_of(4));
    out.extend_from_slice(&bits.to_ne_bytes());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(entropy);
    out.resize(8 + entropy.len().next_multiple_of(4), 0);
    out
}

/// Mixes `entropy` into the kernel's pool, credited, then reseeds the CRNG. `what` of the
/// error names the ioctl.
pub fn add_entropy(entropy: &[u8]) -> Result<(), RemoteError> {
    check_entropy(entropy)?;
    let device = File::open(RANDOM_DEVICE)
        .map_err(|err| RemoteError::from_io(format!("open {RANDOM_DEVICE}"), &err))?;
    if !entropy.is_empty() {
        // The ioctl reads `int`s and `__u32`s: hand it u32-aligned memory.
        let words: Vec<u32> = rand_pool_info(entropy)
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints, then buf_size bytes; the
        // buffer holds 8 + buf_size bytes rounded up to 4 and lives across the call. The
        // kernel does not write to it.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                RNDADDENTROPY as libc::Ioctl,
                words.as_ptr(),
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(RemoteError::from_io(
                format!("ioctl RNDADDENTROPY on {RANDOM_DEVICE}"),
                &err,
            ));
        }
    }
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), RNDRESEEDCRNG as libc::Ioctl) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // A kernel before 4.17 does not know it; the credited entropy reseeds it later.
        if !matches!(err.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) {
            return Err(RemoteError::from_io(
                format!("ioctl RNDRESEEDCRNG on {RANDOM_DEVICE}"),
                &err,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_pool_info_layout() {
        let entropy: Vec<u8> = (1..=6).collect();
        let b = rand_pool_info(&entropy);
        assert_eq!(b.len(), 8 + 8, "6 bytes padded to two u32s");
        assert_eq!(i32::from_ne_bytes(b[0..4].try_into().unwrap()), 48, "bits");
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), 6, "bytes");
        assert_eq!(&b[8..14], &entropy[..]);
        assert_eq!(&b[14..], &[0, 0]);

        let full = vec![0xa5u8; MAX_RESYNC_ENTROPY];
        let b = rand_pool_info(&full);
        assert_eq!(b.len(), 8 + MAX_RESYNC_ENTROPY);
        assert_eq!(i32::from_ne_bytes(b[0..4].try_into().unwrap()), 4096);
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().unwrap()), 512);
        assert!(b[8..].iter().all(|&x| x == 0xa5));

        assert_eq!(rand_pool_info(&[]), vec![0u8; 8]);
        // On x86 (little-endian) the header is exactly these bytes.
        if cfg!(target_endian = "little") {
            assert_eq!(&rand_pool_info(&[9; 64])[..8], &[0, 2, 0, 0, 64, 0, 0, 0]);
        }
    }

    #[test]
    fn ioctl_numbers_match_linux_random_h() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr.
        let ioc = |dir: u32, ty: u8, nr: u32, size: usize| {
            (dir << 30) | ((size as u32) << 16) | (u32::from(ty) << 8) | nr
        };
        assert_eq!(RNDADDENTROPY, ioc(1, b'R', 0x03, 2 * 4));
        assert_eq!(RNDRESEEDCRNG, ioc(0, b'R', 0x07, 0));
    }

    #[test]
    fn oversized_entropy_is_an_error_value_and_changes_nothing() {
        // Refused before the clock is touched (a valid request would set the host's clock).
        let err = resync(1, &[0u8; MAX_RESYNC_ENTROPY + 1]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge);
        assert!(err.message.contains("513 bytes"), "{}", err.message);
        let err = add_entropy(&vec![0u8; 1 << 20]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge);
        assert!(check_entropy(&[0u8; MAX_RESYNC_ENTROPY]).is_ok());
    }

    #[test]
    fn entropy_reaches_the_hosts_kernel_or_is_refused_for_lack_of_privilege() {
        // Harmless on the host: 32 bytes from its own /dev/urandom, mixed back in. The
        // kernel checks the struct: a wrong layout gives EINVAL or EFAULT, not EPERM.
        let mut entropy = [0u8; 32];
        std::io::Read::read_exact(&mut File::open("/dev/urandom").unwrap(), &mut entropy).unwrap();
        match add_entropy(&entropy) {
            Ok(()) => eprintln!("RNDADDENTROPY and RNDRESEEDCRNG accepted by the host's kernel"),
            Err(err) => {
                assert_eq!(err.errno, Some(libc::EPERM), "{err}");
                assert_eq!(err.kind, ErrorKind::PermissionDenied, "{err}");
                assert!(err.message.contains("RNDADDENTROPY"), "{err}");
            }
        }
    }
}
