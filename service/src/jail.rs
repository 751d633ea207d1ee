//! What the service prepares for each VMM's jail (`ember-jail` builds it inside the VMM
//! process): the user it runs as, the folders that user must be able to write, and the list of
//! host paths it may see.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ember_jail::{JailMount, JailSpec};

use ember_sandbox::control::WorkerSpec;

/// The uid and gid VMMs run as unless `--jail-uid`/`--jail-gid` say otherwise: a number no
/// Debian-family system hands out to accounts of its own (above the dynamic ranges, below
/// the subordinate ids of user namespaces).
pub const DEFAULT_JAIL_ID: u32 = 64_177;

/// Why the service cannot jail its VMMs as asked.
#[derive(Debug, thiserror::Error)]
pub enum JailSetupError {
    #[error("--jail-uid and --jail-gid must not be 0 (got {uid}:{gid})")]
    RootIds { uid: u32, gid: u32 },
    #[error("cannot make the store {} readable by the jail's group: {source}", store.display())]
    ShareStore {
        store: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
}

impl JailIds {
    /// Whether this service jails its VMMs: yes when it runs as root (the jail needs
    /// namespaces, mounts and a change of user) and was not told `--no-jail`. The store then
    /// stays the service's, readable by the jail's group: VMMs see it read-only and write
    /// snapshots into staging folders of their own, which the service ingests.
    pub fn for_service(
        args: &super::ServeArgs,
        store_dir: &Path,
    ) -> Result<Option<JailIds>, JailSetupError> {
        if args.no_jail {
            log::warn!("--no-jail: VMMs run without their jail");
            return Ok(None);
        }
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            log::warn!(
                "the service does not run as root: VMMs run without their jail (namespaces, \
                 a private root, an unprivileged user); seccomp filters and limits still apply"
            );
            return Ok(None);
        }
        let ids = JailIds {
            uid: args.jail_uid,
            gid: args.jail_gid,
        };
        if ids.uid == 0 || ids.gid == 0 {
            return Err(JailSetupError::RootIds {
                uid: ids.uid,
                gid: ids.gid,
            });
        }
        ids.share_read_only(store_dir)
            .map_err(|source| JailSetupError::ShareStore {
                store: store_dir.to_path_buf(),
                source,
            })?;
        log::info!(
            "VMMs run jailed as uid {} gid {} (new namespaces, a private root)",
            ids.uid,
            ids.gid
        );
        Ok(Some(ids))
    }

    /// Makes `path` and everything under it the service's and readable, not writable, by
    /// the jail's group (directories 0750, files 0640; symbolic links are left alone). A
    /// store an earlier version handed to the jail's user is taken back this way.
    pub fn share_read_only(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        // SAFETY: geteuid takes no arguments and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid || meta.gid() != self.gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(self.gid))?;
        }
        let mode = if meta.is_dir() { 0o750 } else { 0o640 };
        if meta.mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                self.share_read_only(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// The jail of the VMM of `spec`, in the sandbox's folder `sandbox_dir`, whose own
    /// folders are `vmm_dir` (overlay, stall reports) and `sockets_dir`: it sees the kernel
    /// and base rootfs (read-only), those two folders and the store, nothing else (not the
    /// sandbox's record, which the service trusts after a restart). The store is read-only
    /// to it.
    pub fn prepare(
        &self,
        spec: &WorkerSpec,
        sandbox_dir: &Path,
        vmm_dir: &Path,
        sockets_dir: &Path,
    ) -> io::Result<JailSpec> {
        let root = sandbox_dir.join("jail");
        std::fs::create_dir_all(&root)?;
        for dir in [vmm_dir, sockets_dir] {
            std::os::unix::fs::chown(dir, Some(self.uid), Some(self.gid))?;
        }
        let mount = |path: &Path, writable: bool| JailMount {
            path: path.to_path_buf(),
            writable,
        };
        Ok(JailSpec {
            root,
            uid: self.uid,
            gid: self.gid,
            mounts: vec![
                mount(&spec.kernel, false),
                mount(&spec.rootfs, false),
                mount(vmm_dir, true),
                mount(sockets_dir, true),
                mount(&spec.store_dir, false),
            ]
            .into_iter()
            .chain(spec.mem_cache.as_deref().map(|dir| mount(dir, false)))
            .collect(),
            netns: spec
                .net
                .as_ref()
                .map(|_| super::network::netns_path(&spec.sandbox_id)),
        })
    }
}
