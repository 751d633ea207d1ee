//! The files API beyond single files: listings, `stat`, removal, renames, directories as tar
//! streams and watches (`/sandboxes/{id}/files/…`). A guest's file names need not be UTF-8:
//! such a name travels as text with the invalid bytes replaced, and exactly in a
//! `…_base64` field beside it.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The query of `GET /sandboxes/{id}/files/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The directory's absolute path in the guest.
    pub path: String,
    /// Most entries to answer (default 1000, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The query of `GET /sandboxes/{id}/files/stat` and of `GET`/`PUT …/files/tar`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// The absolute path in the guest.
    pub path: String,
}

/// The query of `DELETE /sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    /// The absolute path in the guest (not `/`).
    pub path: String,
    /// Remove a directory and everything under it (symlinks are removed, never followed).
    #[serde(default)]
    pub recursive: bool,
}

/// The query of `GET /sandboxes/{id}/files/watch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// The directory's absolute path in the guest.
    pub path: String,
    /// Watch the directories under it too.
    #[serde(default)]
    pub recursive: bool,
}

/// `POST /sandboxes/{id}/files/rename`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    pub from: String,
    pub to: String,
    /// Replace an existing `to` (by default an existing `to` is a 409).
    #[serde(default)]
    pub overwrite: bool,
}

/// `POST /sandboxes/{id}/files/rename`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Renamed {
    pub from: String,
    pub to: String,
}

/// What an entry is (a symlink is described, not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One directory entry, or what `GET …/files/stat` says of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    /// The name (`/` for the root); invalid UTF-8 replaced.
    pub name: String,
    /// The name's exact bytes, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_base64: Option<String>,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    /// Bytes (a symlink's: its target's length).
    pub size: u64,
    /// Permission bits, octal (e.g. `644`).
    pub mode: String,
    /// Last modified, milliseconds since the epoch.
    pub mtime_unix_ms: i64,
    /// Where a symlink points (invalid UTF-8 replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `GET /sandboxes/{id}/files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub path: String,
    /// Sorted by name.
    pub entries: Vec<FileEntry>,
    /// The directory has more entries than answered: the first `limit` it gave (or as
    /// many as fit 512 KiB of names).
    pub truncated: bool,
}

/// `PUT /sandboxes/{id}/files/tar`: what the archive held, extracted under `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TarExtracted {
    pub path: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries left out: devices, FIFOs, sockets and hard links.
    pub skipped: u64,
}

/// What a watch event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventType {
    /// First: the watch is set up (`path` is the watched directory); changes from now on
    /// are seen.
    Watching,
    Create,
    Modify,
    Delete,
    /// `from` was renamed to `path`.
    Rename,
    /// Events were lost (`dropped` of them; 0 when unknown): the client read too slowly or
    /// the guest's queue was full.
    Overflow,
    /// Last: the watch failed (`message`).
    Error,
}

/// One line of `GET /sandboxes/{id}/files/watch`'s NDJSON stream. The stream ends when the
/// watched directory goes away (after its `delete`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WatchRecord {
    #[serde(rename = "type")]
    pub event: WatchEventType,
    /// The absolute path in the guest (invalid UTF-8 replaced).
    pub path: String,
    /// The path's exact bytes, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_base64: Option<String>,
    /// A rename's old path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_base64: Option<String>,
    pub is_dir: bool,
    /// An `overflow`'s count of lost events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// An `error`'s reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_and_watch_records_have_the_documented_shape() {
        let entry = FileEntry {
            name: "caf\u{fffd}".into(),
            name_base64: Some("Y2Fm6Q==".into()),
            entry_type: EntryType::Symlink,
            size: 4,
            mode: "777".into(),
            mtime_unix_ms: 5,
            target: Some("/etc".into()),
        };
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            json!({"name": "caf\u{fffd}", "name_base64": "Y2Fm6Q==", "type": "symlink",
                   "size": 4, "mode": "777", "mtime_unix_ms": 5, "target": "/etc"})
        );
        let record = WatchRecord {
            event: WatchEventType::Create,
            path: "/tmp/x".into(),
            path_base64: None,
            from: None,
            from_base64: None,
            is_dir: false,
            dropped: None,
            message: None,
        };
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            json!({"type": "create", "path": "/tmp/x", "is_dir": false})
        );
        let query: RemoveQuery = serde_json::from_value(json!({"path": "/x"})).unwrap();
        assert!(!query.recursive);
    }
}
