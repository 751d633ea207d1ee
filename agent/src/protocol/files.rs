//! The types of the files requests that need [`super::CAP_FILES`]: directory entries, what
//! a tar extraction did, and watch events.

use serde::{Deserialize, Serialize};

use super::FileType;

/// Most entries one `Listing` carries, whatever the request's `limit`.
pub const MAX_LIST_ENTRIES: u32 = 10_000;

/// Most bytes of names and symlink targets one `Listing` carries (it must fit a frame).
pub const MAX_LIST_BYTES: usize = 512 * 1024;

/// One directory entry (or the subject of an `Lstat`). Names are bytes: a Linux file name
/// need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub file_type: FileType,
    pub size: u64,
    /// Permission bits and the file type bits, as `st_mode` (`lstat`: a symlink's own).
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// Where a symlink points (empty for anything else).
    #[serde(with = "serde_bytes")]
    pub link_target: Vec<u8>,
}

impl DirEntry {
    /// Milliseconds since the epoch of the last modification.
    pub fn mtime_unix_ms(&self) -> i64 {
        self.mtime_sec
            .saturating_mul(1000)
            .saturating_add(self.mtime_nsec / 1_000_000)
    }
}

/// What a tar archive held, written (`ReadTar`'s archive) or extracted (`WriteTar`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarSummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries left out: devices, FIFOs, sockets and hard links.
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchKind {
    /// The watch is set up (`path` is the watched directory): changes from now on are seen.
    Watching,
    Create,
    Modify,
    Delete,
    /// `from` was renamed to `path`, both under the watch.
    Rename,
    /// Events were lost (the guest's inotify queue or the stream's window was full):
    /// `dropped` of them, 0 when the kernel does not say.
    Overflow,
}

/// One change under a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: WatchKind,
    /// The absolute path in the guest.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// A rename's old path (empty otherwise).
    #[serde(with = "serde_bytes")]
    pub from: Vec<u8>,
    pub is_dir: bool,
    /// An `Overflow`'s count of lost events.
    pub dropped: u64,
}

/// What one watch event counts against its stream's window: the agent takes it before
/// sending the event, the host acknowledges it once the event is consumed.
pub fn watch_event_cost(event: &WatchEvent) -> u64 {
    32 + event.path.len() as u64 + event.from.len() as u64
}

#[cfg(test)]
mod tests {
    use super::super::{
        decode, encode_frame, read_frame, Request, RequestBody, Response, ResponseBody,
        MAX_FRAME_LEN,
    };
    use super::*;

    #[test]
    fn the_files_requests_come_after_resync_and_round_trip() {
        // Resync is variant 13: the files requests follow it, so an older agent's variants
        // keep their indexes.
        let bodies = [
            RequestBody::ListDir {
                path: "/tmp".into(),
                limit: 5,
            },
            RequestBody::Lstat { path: "/x".into() },
            RequestBody::Remove {
                path: "/x".into(),
                recursive: true,
            },
            RequestBody::Rename {
                from: "/a".into(),
                to: "/b".into(),
                overwrite: false,
            },
            RequestBody::ReadTar { path: "/d".into() },
            RequestBody::WriteTar { path: "/d".into() },
            RequestBody::Watch {
                path: "/d".into(),
                recursive: true,
            },
            RequestBody::Cancel { target: 9 },
        ];
        for (index, body) in bodies.into_iter().enumerate() {
            let request = Request { id: 3, body };
            let frame = encode_frame(&request).unwrap();
            let payload = read_frame(&mut &frame[..]).unwrap().unwrap();
            assert_eq!(payload[1] as usize, 14 + index, "{request:?}");
            assert_eq!(decode::<Request>(&payload).unwrap(), request);
        }
        // The responses follow Ack (variant 9).
        let entry = DirEntry {
            name: vec![b'a', 0xff],
            file_type: FileType::Symlink,
            size: 3,
            mode: 0o120777,
            mtime_sec: 1,
            mtime_nsec: 2_000_000,
            link_target: b"/etc".to_vec(),
        };
        let bodies = [
            ResponseBody::Listing {
                entries: vec![entry.clone()],
                truncated: true,
            },
            ResponseBody::Entry(entry.clone()),
            ResponseBody::Extracted(TarSummary {
                files: 1,
                ..TarSummary::default()
            }),
            ResponseBody::Watch(WatchEvent {
                kind: WatchKind::Rename,
                path: b"/d/b".to_vec(),
                from: b"/d/a".to_vec(),
                is_dir: false,
                dropped: 0,
            }),
        ];
        for (index, body) in bodies.into_iter().enumerate() {
            let final_ = body.is_final();
            assert_eq!(final_, !matches!(body, ResponseBody::Watch(_)));
            let response = Response { id: 4, body };
            let frame = encode_frame(&response).unwrap();
            assert_eq!(frame[5] as usize, 10 + index, "{response:?}");
            let payload = read_frame(&mut &frame[..]).unwrap().unwrap();
            assert_eq!(decode::<Response>(&payload).unwrap(), response);
        }
        assert_eq!(entry.mtime_unix_ms(), 1002);
    }

    #[test]
    fn a_full_listing_fits_a_frame() {
        // MAX_LIST_BYTES of names and targets plus every entry's fixed fields.
        let per_entry = 64;
        let entries = (0..MAX_LIST_ENTRIES)
            .map(|i| DirEntry {
                name: vec![b'n'; MAX_LIST_BYTES / MAX_LIST_ENTRIES as usize],
                file_type: FileType::File,
                size: u64::MAX,
                mode: u32::MAX,
                mtime_sec: i64::MIN,
                mtime_nsec: i64::from(i),
                link_target: Vec::new(),
            })
            .collect();
        let frame = encode_frame(&Response {
            id: u64::MAX,
            body: ResponseBody::Listing {
                entries,
                truncated: true,
            },
        })
        .unwrap();
        assert!(
            frame.len() < MAX_LIST_BYTES + per_entry * MAX_LIST_ENTRIES as usize,
            "{}",
            frame.len()
        );
        assert!(frame.len() <= MAX_FRAME_LEN);
    }
}
