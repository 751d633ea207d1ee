//! Runtime images: the root filesystems a sandbox boots from, and what each one says about
//! itself in the `image.json` beside its `rootfs.ext4` (written by `cargo xtask images`, read
//! by `ember serve` and `ember images`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The runtime a sandbox gets when a request names none (and `ember serve` is not told
/// otherwise): Debian bookworm with Python 3.11 and Node 18, commands run as root in `/`.
pub const BASE_RUNTIME: &str = "base";

/// The runtimes ember builds images for, besides [`BASE_RUNTIME`].
pub const RUNTIMES: &[&str] = &["python3.13", "node22", "node24"];

/// Names `image` used to take before runtimes existed; each means [`BASE_RUNTIME`].
pub const BASE_ALIASES: &[&str] = &["default", "python", "node"];

/// The unprivileged account of every runtime image but `base`.
pub const RUNTIME_USER: &str = "user";

/// The file beside a runtime image's `rootfs.ext4` that describes it.
pub const IMAGE_MANIFEST: &str = "image.json";

/// What a runtime image provides and how commands run in it by default. (Unknown fields are
/// ignored: an older service reads a newer image's manifest.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RuntimeImage {
    /// `base`, `python3.13`, `node22` or `node24`.
    pub runtime: String,
    /// The account commands run as unless a request says `user`.
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// The working directory of commands that give no `cwd`.
    pub workdir: String,
    /// The environment every command starts from (a request's `env` is applied over it).
    pub env: BTreeMap<String, String>,
    /// What is installed, by name: `debian`, `python`, `node`, `npm` and their versions.
    pub provides: BTreeMap<String, String>,
    /// The hash of the image's inputs (its cache key).
    pub key: String,
    /// How long building it took (the tree it shares with other runtimes included if it
    /// was built for this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
}

impl RuntimeImage {
    /// The image every service has: the rootfs it was started with, run as root in `/` with
    /// the agent's default environment.
    pub fn base() -> RuntimeImage {
        RuntimeImage {
            runtime: BASE_RUNTIME.into(),
            user: "root".into(),
            uid: 0,
            gid: 0,
            workdir: "/".into(),
            env: BTreeMap::new(),
            provides: BTreeMap::from([
                ("debian".into(), "bookworm".into()),
                ("python".into(), "3.11".into()),
                ("node".into(), "18".into()),
            ]),
            key: String::new(),
            build_ms: None,
        }
    }

    /// The uid and gid of `user` in this image: `root`, or the image's own user.
    pub fn ids_of(&self, user: &str) -> Option<(u32, u32)> {
        match user {
            "root" => Some((0, 0)),
            name if name == self.user => Some((self.uid, self.gid)),
            _ => None,
        }
    }

    /// Reads the manifest beside `rootfs`.
    pub fn read_beside(rootfs: &Path) -> Result<RuntimeImage, ImageError> {
        let path = rootfs.with_file_name(IMAGE_MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ImageError::Parse { path, source })
    }
}

/// A runtime image as `GET /images` and `ember images` list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub image: RuntimeImage,
    /// Where its root filesystem is.
    #[schema(value_type = String)]
    pub rootfs: PathBuf,
    pub size_bytes: u64,
    /// Whether sandboxes that name no runtime get this one.
    pub default: bool,
}

/// `GET /images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// Why a runtime image's manifest is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an image manifest: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_names_its_users() {
        let image = RuntimeImage {
            runtime: "node22".into(),
            user: "user".into(),
            uid: 1000,
            gid: 1000,
            workdir: "/home/user".into(),
            env: BTreeMap::from([("HOME".into(), "/home/user".into())]),
            provides: BTreeMap::from([("node".into(), "22.23.5".into())]),
            key: "0123456789abcdef".into(),
            build_ms: Some(15_000),
        };
        let text = serde_json::to_string(&image).unwrap();
        assert_eq!(serde_json::from_str::<RuntimeImage>(&text).unwrap(), image);
        assert_eq!(image.ids_of("user"), Some((1000, 1000)));
        assert_eq!(image.ids_of("root"), Some((0, 0)));
        assert_eq!(image.ids_of("nobody"), None);
        assert_eq!(RuntimeImage::base().ids_of("user"), None);
    }

    #[test]
    fn a_missing_or_foreign_manifest_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("ember-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rootfs = dir.join("rootfs.ext4");
        let err = RuntimeImage::read_beside(&rootfs).unwrap_err();
        assert!(err.to_string().contains("image.json"), "{err}");
        std::fs::write(dir.join(IMAGE_MANIFEST), b"{\"runtime\": 3}").unwrap();
        let err = RuntimeImage::read_beside(&rootfs).unwrap_err();
        assert!(err.to_string().contains("not an image manifest"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
