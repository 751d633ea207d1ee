//! Who may use the API and what others can read: the API socket answers only the users it
//! is told to (checked with `SO_PEERCRED` on every connection), and the service's state is
//! private to it.

use std::collections::BTreeSet;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use axum::serve::Listener;
use tokio::net::{UnixListener, UnixStream};

/// Mode of the service's folders and of the files it writes there (records, specs, logs).
pub const PRIVATE_DIR: u32 = 0o700;
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of the API socket: its owner and group may connect; the peer check then decides.
pub const SOCKET_MODE: u32 = 0o660;

/// The users and groups whose connections the API answers: root, the service's own user,
/// and those named with `--allow-uid`/`--allow-gid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
}

impl PeerPolicy {
    pub fn new(own_uid: u32, allow_uids: &[u32], allow_gids: &[u32]) -> PeerPolicy {
        PeerPolicy {
            uids: [0, own_uid]
                .into_iter()
                .chain(allow_uids.iter().copied())
                .collect(),
            gids: allow_gids.iter().copied().collect(),
        }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// The API socket's listener: connections from peers the policy does not allow are closed
/// unanswered (and logged).
pub struct CheckedListener {
    inner: UnixListener,
    policy: PeerPolicy,
}

impl CheckedListener {
    pub fn new(inner: UnixListener, policy: PeerPolicy) -> CheckedListener {
        CheckedListener { inner, policy }
    }
}

impl Listener for CheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (UnixStream, Self::Addr) {
        loop {
            let (stream, addr) = Listener::accept(&mut self.inner).await;
            match stream.peer_cred() {
                Ok(cred) if self.policy.allows(cred.uid(), cred.gid()) => return (stream, addr),
                Ok(cred) => log::warn!(
                    "API connection refused: uid {} gid {} (pid {:?}) may not use this service \
                     (--allow-uid/--allow-gid)",
                    cred.uid(),
                    cred.gid(),
                    cred.pid()
                ),
                Err(e) => log::warn!("API connection refused: its peer is unknown: {e}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Creates `dir` (and its parents) and makes it private to the service.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR))
}

/// Creates (or truncates) `path` readable and writable by the service only.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    // An existing file keeps its mode through open(2): set it.
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    Ok(file)
}

/// Writes `bytes` to `path` as a private file.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    private_file(path)?.write_all(bytes)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never part:
/// a temp file beside it, fsync, rename, fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_service_and_named_users_and_groups_are_allowed() {
        let policy = PeerPolicy::new(1000, &[1001], &[2000]);
        assert!(policy.allows(0, 5));
        assert!(policy.allows(1000, 5));
        assert!(policy.allows(1001, 5));
        assert!(policy.allows(4242, 2000));
        assert!(!policy.allows(4242, 5));
    }

    #[test]
    fn private_files_and_folders_have_private_modes_even_if_they_existed() {
        let dir = std::env::temp_dir().join(format!("ember-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let file = dir.join("record.json");
        std::fs::write(&file, b"old").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&file, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), PRIVATE_DIR);
        assert_eq!(mode(&file), PRIVATE_FILE);
        assert_eq!(std::fs::read(&file).unwrap(), b"{}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_peer_the_policy_allows_is_answered() {
        let dir = std::env::temp_dir().join(format!("ember-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        // SAFETY: geteuid and getegid take no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut allowed = CheckedListener::new(
            UnixListener::bind(&path).unwrap(),
            PeerPolicy::new(uid, &[], &[]),
        );
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = allowed.accept().await;
        assert_eq!(server.peer_cred().unwrap().uid(), uid);
        drop((client, server, allowed));
        // A policy naming neither this uid nor this gid closes the connection unanswered.
        std::fs::remove_file(&path).unwrap();
        let other = PeerPolicy::new(uid.wrapping_add(1), &[], &[gid.wrapping_add(1)]);
        let refusing = PeerPolicy {
            uids: other.uids.into_iter().filter(|u| *u != uid).collect(),
            gids: other.gids,
        };
        let mut listener = CheckedListener::new(UnixListener::bind(&path).unwrap(), refusing);
        let _client = UnixStream::connect(&path).await.unwrap();
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "a refused peer was accepted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
