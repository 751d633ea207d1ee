//! Taking in what a VMM wrote into its staging folder. A VMM cannot write the shared store:
//! it snapshots into a staging store of its own (`vmm/staging/` in its sandbox's folder). The
//! service moves that out of the VMM's reach first, then the store verifies and copies what
//! the snapshot needs ([`Store::ingest`]); the staging copy is removed either way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ember_sandbox::control::{STAGED_SNAPSHOTS, STAGED_WORKING_SET};
use ember_snapshot_store::{IngestLimits, IngestReport, Store, StoreError};

use crate::sandbox::Sandbox;

/// Room in a staged snapshot beyond its memory and disk: the VM state, maps and pack indexes.
const STAGED_OVERHEAD_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot take the VMM's staged {what} into the service: {source}")]
    Move {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's snapshot {id} was refused: {source}")]
    Refused {
        id: String,
        #[source]
        source: StoreError,
    },
    #[error("ingesting a staged snapshot: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Ingests snapshot `id`, just written by `sandbox`'s VMM into its staging folder.
pub async fn snapshot(
    store: &Arc<Store>,
    sandbox: &Sandbox,
    id: &str,
) -> Result<IngestReport, IngestError> {
    let record = sandbox.record();
    let Some(staging) = record.spec.staging_dir.as_deref() else {
        // This VMM wrote the store itself (it predates staging folders).
        return Ok(IngestReport::default());
    };
    let memory_bytes = u64::from(record.spec.mem_mib) << 20;
    let disk_bytes = std::fs::metadata(&record.spec.rootfs).map_or(0, |m| m.len());
    let limits = IngestLimits {
        memory_bytes,
        max_disks: 1,
        max_disk_bytes: disk_bytes,
        max_staged_bytes: memory_bytes + disk_bytes + STAGED_OVERHEAD_BYTES,
    };
    let private = move_out_of_reach(&sandbox.dir, staging, &[STAGED_SNAPSHOTS, id], "snapshot")?;
    let (store, owned_id) = (store.clone(), id.to_string());
    let result = tokio::task::spawn_blocking(move || {
        let result = store.ingest(&private, &owned_id, &limits);
        remove(&private);
        result
    })
    .await?;
    result.map_err(|source| IngestError::Refused {
        id: id.to_string(),
        source,
    })
}

/// Ingests the working set `sandbox`'s VMM recorded for `snapshot`, the snapshot it was
/// restored from, if it recorded one. Working sets are advisory: a refused one is logged.
/// With a remote tier, a working set for a snapshot the remote has goes there too.
pub async fn working_set(
    store: &Arc<Store>,
    remote: Option<&Arc<crate::remote::RemoteTier>>,
    sandbox: &Sandbox,
    snapshot: &str,
) {
    let record = sandbox.record();
    let Some(staging) = record.spec.staging_dir.as_deref() else {
        return;
    };
    let private =
        match move_out_of_reach(&sandbox.dir, staging, &[STAGED_WORKING_SET], "working set") {
            Ok(private) => private,
            Err(IngestError::Move { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return
            }
            Err(e) => {
                log::warn!("sandbox {}: {e}", sandbox.id);
                return;
            }
        };
    let memory_bytes = u64::from(record.spec.mem_mib) << 20;
    let (shared, id) = (store.clone(), snapshot.to_string());
    let result = tokio::task::spawn_blocking(move || {
        let result = shared.ingest_working_set(&private, &id, memory_bytes);
        remove(&private);
        result
    })
    .await;
    match result {
        Ok(Ok(Some(pages))) => {
            log::info!(
                "sandbox {}: recorded a working set of {pages} pages for snapshot {snapshot}",
                sandbox.id
            );
            if let Some(tier) = remote {
                tier.push_working_set_later(store.clone(), snapshot.to_string());
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => log::warn!(
            "sandbox {}: the working set for snapshot {snapshot} was refused: {e}",
            sandbox.id
        ),
        Err(e) => log::warn!("sandbox {}: ingesting a working set: {e}", sandbox.id),
    }
}

/// Renames the staged folder at `staging`/`rest…` into the sandbox's own folder (the
/// service's, which the VMM's jail does not see), under a name of its own. The VMM owns
/// everything below `staging`'s parent and could put symbolic links there: each step is
/// opened relative to the last without following links, so the rename moves what is there,
/// never something a link points to.
fn move_out_of_reach(
    sandbox_dir: &Path,
    staging: &Path,
    rest: &[&str],
    what: &'static str,
) -> Result<PathBuf, IngestError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let fail = |source| IngestError::Move { what, source };
    let dir = sandbox_dir.join("ingest");
    crate::access::private_dir(&dir).map_err(fail)?;
    let name = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (Some(parent), Some(first)) = (staging.parent(), staging.file_name()) else {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("staging folder {} has no parent", staging.display()),
        )));
    };
    let first = first.to_str().ok_or_else(|| {
        fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "staging folder name is not UTF-8",
        ))
    })?;
    let steps: Vec<&str> = std::iter::once(first).chain(rest.iter().copied()).collect();
    let (last, folders) = steps.split_last().expect("at least the staging folder");
    let mut at = std::fs::File::open(parent).map_err(fail)?;
    for step in folders {
        at = open_folder_at(&at, step).map_err(fail)?;
    }
    let target = std::fs::File::open(&dir).map_err(fail)?;
    rename_at(&at, last, &target, &name).map_err(fail)?;
    Ok(dir.join(name))
}

fn c_name(name: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in a name"))
}

/// Opens the folder `name` in `dir`, refusing a symbolic link.
fn open_folder_at(dir: &std::fs::File, name: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = c_name(name)?;
    // SAFETY: openat reads the NUL-terminated name and the descriptor `dir` keeps open; a
    // descriptor it returns is ours alone, so the File takes ownership of it.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Renames `from` in folder `from_dir` to `to` in folder `to_dir` (the entry itself, not
/// what a link there points to).
fn rename_at(
    from_dir: &std::fs::File,
    from: &str,
    to_dir: &std::fs::File,
    to: &str,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (from, to) = (c_name(from)?, c_name(to)?);
    // SAFETY: renameat reads two NUL-terminated names and two descriptors the Files keep
    // open.
    let rc = unsafe {
        libc::renameat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        log::warn!("cannot remove the ingested {}: {e}", path.display());
    }
}
