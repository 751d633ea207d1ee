//! The page channel: how a VMM restoring a snapshot this host does not hold whole gets the
//! pages its local store lacks. The jailed VMM has neither network nor credentials; the
//! service fetches from the remote tier and answers over a Unix stream socket it hands the
//! VMM at start (on the VMM's stdin, with `SCM_RIGHTS`).
//!
//! One request at a time: the VMM writes a guest page number (u64, little-endian); the
//! service answers with one tag byte, then
//! - [`TAG_PAGE`]: the page's 4 KiB,
//! - [`TAG_ZERO`]: nothing (an all-zero page),
//! - [`TAG_ERROR`]: a u32 length (≤ [`MAX_ERROR_BYTES`]) and that many bytes of UTF-8 saying
//!   why the page cannot be had.
//!
//! The service answers only for the snapshot it prepared, by its own map; the VMM checks
//! every page against its hash before the guest sees it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use ember_vmm::lazy::{PageError, PageSource, PAGE_SIZE};

pub const TAG_PAGE: u8 = 0;
pub const TAG_ZERO: u8 = 1;
pub const TAG_ERROR: u8 = 2;
/// The longest error message either side sends or accepts.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Errors of the page channel.
#[derive(Debug, thiserror::Error)]
pub enum PageChannelError {
    #[error("the page channel to the service: {0}")]
    Io(#[source] io::Error),
    #[error("the service cannot provide guest page {index}: {reason}")]
    Refused { index: u64, reason: String },
    #[error("the service answered page {index} with unknown tag {tag}")]
    BadTag { index: u64, tag: u8 },
    #[error("the service's error message for page {index} is {len} bytes, over the bound")]
    OversizedError { index: u64, len: usize },
}

/// The VMM's end: a [`PageSource`] that asks the service.
pub struct PageChannel {
    stream: Mutex<UnixStream>,
}

impl PageChannel {
    /// Wraps the service's socket; a page not answered within `timeout` is an error (the
    /// service bounds its own fetches well within it).
    pub fn new(stream: UnixStream, timeout: Duration) -> io::Result<PageChannel> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(PageChannel {
            stream: Mutex::new(stream),
        })
    }

    /// Asks for page `index`: `Ok(true)` with `buf` filled, `Ok(false)` for a zero page.
    pub fn fetch(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageChannelError> {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        stream
            .write_all(&index.to_le_bytes())
            .map_err(PageChannelError::Io)?;
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag).map_err(PageChannelError::Io)?;
        match tag[0] {
            TAG_PAGE => {
                stream.read_exact(buf).map_err(PageChannelError::Io)?;
                Ok(true)
            }
            TAG_ZERO => Ok(false),
            TAG_ERROR => {
                let mut len = [0u8; 4];
                stream.read_exact(&mut len).map_err(PageChannelError::Io)?;
                let len = u32::from_le_bytes(len) as usize;
                if len > MAX_ERROR_BYTES {
                    return Err(PageChannelError::OversizedError { index, len });
                }
                let mut message = vec![0u8; len];
                stream
                    .read_exact(&mut message)
                    .map_err(PageChannelError::Io)?;
                Err(PageChannelError::Refused {
                    index,
                    reason: String::from_utf8_lossy(&message).into_owned(),
                })
            }
            tag => Err(PageChannelError::BadTag { index, tag }),
        }
    }
}

impl PageSource for PageChannel {
    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<bool, PageError> {
        self.fetch(index, buf)
            .map_err(|e| PageError::Source(Box::new(e)))
    }
}

/// The service's end: answers requests on `stream` with `page` (`Ok(None)`: a zero page)
/// until the VMM closes its end. Returns how many pages it served.
pub fn serve<E: std::fmt::Display>(
    mut stream: UnixStream,
    mut page: impl FnMut(u64) -> Result<Option<Vec<u8>>, E>,
) -> io::Result<u64> {
    let mut served = 0;
    loop {
        let mut request = [0u8; 8];
        match stream.read_exact(&mut request) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e),
        }
        let index = u64::from_le_bytes(request);
        match page(index) {
            Ok(Some(content)) if content.len() == PAGE_SIZE => {
                stream.write_all(&[TAG_PAGE])?;
                stream.write_all(&content)?;
                served += 1;
            }
            Ok(Some(content)) => {
                send_error(
                    &mut stream,
                    &format!("page {index} is {} bytes, not a page", content.len()),
                )?;
            }
            Ok(None) => stream.write_all(&[TAG_ZERO])?,
            Err(e) => send_error(&mut stream, &e.to_string())?,
        }
    }
}

fn send_error(stream: &mut UnixStream, message: &str) -> io::Result<()> {
    let mut end = message.len().min(MAX_ERROR_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    stream.write_all(&[TAG_ERROR])?;
    stream.write_all(&(message.len() as u32).to_le_bytes())?;
    stream.write_all(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_zero_pages_and_refusals_cross_the_channel() {
        let (vmm_end, service_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve(service_end, |index| match index {
                0 => Ok(Some(vec![7u8; PAGE_SIZE])),
                1 => Ok(None),
                2 => Ok(Some(vec![1u8; 10])),
                _ => Err(format!(
                    "remote down while fetching {index}: {}",
                    "x".repeat(9000)
                )),
            })
        });
        let channel = PageChannel::new(vmm_end, Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        assert!(channel.fetch(0, &mut buf).unwrap());
        assert_eq!(buf, [7u8; PAGE_SIZE]);
        assert!(!channel.fetch(1, &mut buf).unwrap());
        let short = channel.fetch(2, &mut buf).unwrap_err().to_string();
        assert!(short.contains("10 bytes, not a page"), "{short}");
        let refused = channel.fetch(9, &mut buf).unwrap_err();
        match &refused {
            PageChannelError::Refused { index: 9, reason } => {
                assert!(reason.starts_with("remote down while fetching 9"));
                assert_eq!(reason.len(), MAX_ERROR_BYTES);
            }
            other => panic!("{other}"),
        }
        drop(channel);
        assert_eq!(server.join().unwrap().unwrap(), 1);
    }

    #[test]
    fn a_silent_service_is_a_bounded_error() {
        let (vmm_end, _service_end) = UnixStream::pair().unwrap();
        let channel = PageChannel::new(vmm_end, Duration::from_millis(200)).unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; PAGE_SIZE];
        assert!(matches!(
            channel.fetch(0, &mut buf),
            Err(PageChannelError::Io(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
