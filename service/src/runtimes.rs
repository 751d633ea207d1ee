//! The runtimes a service offers (`base`, the images `cargo xtask images` built, and
//! container images imported with `POST /images`), which one a request gets, and which image
//! a snapshot of each must be restored over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ember_client::images::{
    ImageInfo, ImageList, RuntimeImage, BASE_ALIASES, BASE_RUNTIME, RUNTIMES,
};

use crate::error::ApiError;

/// The snapshot metadata keys that name the image a snapshot's guest ran.
pub const RUNTIME_LABEL: &str = "runtime";
pub const RUNTIME_KEY_LABEL: &str = "runtime_key";

/// One runtime's image.
#[derive(Debug, Clone)]
pub struct Image {
    pub rootfs: PathBuf,
    pub info: RuntimeImage,
}

/// The runtimes of one service.
#[derive(Debug)]
pub struct Runtimes {
    images: RwLock<BTreeMap<String, Image>>,
    default: String,
    /// Where imported images live (STATE_DIR/images), if this service imports any.
    imported: Option<PathBuf>,
}

/// Whether `name` may name an imported runtime: lowercase letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit, at most 64.
pub fn valid_runtime_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

/// The runtimes every service has: `base` over `rootfs`.
fn base_images(rootfs: &Path) -> BTreeMap<String, Image> {
    BTreeMap::from([(
        BASE_RUNTIME.to_string(),
        Image {
            rootfs: rootfs.to_path_buf(),
            info: RuntimeImage::base(),
        },
    )])
}

/// The newest complete image (`rootfs.ext4` and its manifest) under `dir/KEY/`.
fn newest_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join("rootfs.ext4"))
        .filter(|p| {
            p.with_file_name(ember_client::images::IMAGE_MANIFEST)
                .exists()
        })
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// Why a service cannot offer its runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimesError {
    #[error("`--image {0}`: expected RUNTIME=PATH")]
    Malformed(String),
    #[error("`--image {name}=…`: unknown runtime; ember has {BASE_RUNTIME:?} and {RUNTIMES:?}")]
    Unknown { name: String },
    #[error("the {name} image {}: {source}", path.display())]
    Manifest {
        name: String,
        path: PathBuf,
        #[source]
        source: ember_client::images::ImageError,
    },
    #[error("the {name} image {} says it is {found:?}", path.display())]
    Mismatch {
        name: String,
        path: PathBuf,
        found: String,
    },
    #[error("`--default-runtime {0}`: no such image on this host (built: {1:?}; `cargo xtask images {0}` builds it)")]
    NoDefault(String, Vec<String>),
}

impl Runtimes {
    /// `base` over `base_rootfs`, each of `given` (`RUNTIME=PATH`), the newest build of
    /// every other runtime that has one, and the images imported under `imported`.
    pub fn discover(
        base_rootfs: &Path,
        given: &[String],
        default: Option<&str>,
        imported: Option<&Path>,
    ) -> Result<Runtimes, RuntimesError> {
        let mut paths: BTreeMap<String, PathBuf> = BTreeMap::new();
        for spec in given {
            let (name, path) = spec
                .split_once('=')
                .ok_or_else(|| RuntimesError::Malformed(spec.clone()))?;
            if !RUNTIMES.contains(&name) {
                return Err(RuntimesError::Unknown { name: name.into() });
            }
            paths.insert(name.into(), PathBuf::from(path));
        }
        for name in RUNTIMES {
            if !paths.contains_key(*name) {
                if let Some(path) = ember_sandbox::defaults::default_runtime_image(name) {
                    paths.insert(name.to_string(), path);
                }
            }
        }
        let imported_names: Vec<String> = imported
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                valid_runtime_name(n) && n != BASE_RUNTIME && !RUNTIMES.contains(&n.as_str())
            })
            .collect();
        for name in imported_names {
            if let Some(path) = imported.and_then(|dir| newest_in(&dir.join(&name))) {
                paths.insert(name, path);
            }
        }
        let mut images = base_images(base_rootfs);
        for (name, rootfs) in paths {
            let info =
                RuntimeImage::read_beside(&rootfs).map_err(|source| RuntimesError::Manifest {
                    name: name.clone(),
                    path: rootfs.clone(),
                    source,
                })?;
            if info.runtime != name {
                return Err(RuntimesError::Mismatch {
                    name,
                    path: rootfs,
                    found: info.runtime,
                });
            }
            images.insert(name, Image { rootfs, info });
        }
        let default = default.unwrap_or(BASE_RUNTIME).to_string();
        if !images.contains_key(&default) {
            return Err(RuntimesError::NoDefault(
                default,
                images.keys().cloned().collect(),
            ));
        }
        Ok(Runtimes {
            images: RwLock::new(images),
            default,
            imported: imported.map(Path::to_path_buf),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Image>> {
        self.images.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers `image` (an import) as runtime `name` from now on.
    pub fn add(&self, name: &str, image: Image) {
        self.images
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), image);
    }

    /// Whether `name` is one of ember's own runtimes (which imports may not replace).
    pub fn is_built_in(&self, name: &str) -> bool {
        name == BASE_RUNTIME || RUNTIMES.contains(&name)
    }

    pub fn built_in(&self) -> Vec<&'static str> {
        std::iter::once(BASE_RUNTIME)
            .chain(RUNTIMES.iter().copied())
            .collect()
    }

    /// A service of `base` only (tests).
    pub fn base_only(base_rootfs: &Path) -> Runtimes {
        Runtimes {
            imported: None,
            images: RwLock::new(base_images(base_rootfs)),
            default: BASE_RUNTIME.into(),
        }
    }

    /// The image a create gets: its `runtime`, else its legacy `image` (a name of `base`),
    /// else the service's default.
    pub fn choose(&self, runtime: Option<&str>, image: Option<&str>) -> Result<Image, ApiError> {
        let name = match (runtime, image) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give `runtime` (or the older `image`), not both",
                ))
            }
            (Some(runtime), None) => runtime,
            (None, Some(image)) if BASE_ALIASES.contains(&image) => BASE_RUNTIME,
            (None, Some(image)) => {
                return Err(ApiError::bad_request(format!(
                    "unknown image {image:?}; `image` takes {BASE_ALIASES:?} (all the base \
                     runtime); choose a runtime with `runtime` ({:?})",
                    self.names()
                )))
            }
            (None, None) => &self.default,
        };
        let found = self.read().get(name).cloned();
        found.ok_or_else(|| {
            let hint = if RUNTIMES.contains(&name) {
                " (it is not built on this host: `cargo xtask images`)"
            } else {
                ""
            };
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no runtime {name:?}{hint}; this service has {:?} (`POST /images` imports \
                     a container image as one)",
                    self.names()
                ),
            )
        })
    }

    /// The image a snapshot with `metadata` was taken over: the one with its inputs' key if
    /// it is still built, else none (a rebuilt image is a different disk).
    pub fn for_snapshot(
        &self,
        snapshot: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Image, ApiError> {
        let name = metadata
            .get(RUNTIME_LABEL)
            .map_or(BASE_RUNTIME, String::as_str);
        let conflict = |why: String| {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "runtime_unavailable",
                format!("snapshot {snapshot} ran the {name} runtime, {why}"),
            )
        };
        // (The lookup's read lock ends before the error takes another.)
        let found = self.read().get(name).cloned();
        let current = found.ok_or_else(|| {
            conflict(format!(
                "which this service does not have ({:?})",
                self.names()
            ))
        })?;
        if name == BASE_RUNTIME {
            return Ok(current);
        }
        let key = metadata.get(RUNTIME_KEY_LABEL).map_or("", String::as_str);
        if key == current.info.key {
            return Ok(current);
        }
        let well_formed = key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit());
        let older_path = |key: &str| {
            if self.is_built_in(name) {
                ember_sandbox::defaults::runtime_image_by_key(name, key)
            } else {
                self.imported
                    .as_ref()
                    .map(|dir| dir.join(name).join(key).join("rootfs.ext4"))
                    .filter(|p| p.exists())
            }
        };
        let older = well_formed
            .then(|| older_path(key))
            .flatten()
            .and_then(|rootfs| {
                let info = RuntimeImage::read_beside(&rootfs).ok()?;
                Some(Image { rootfs, info })
            });
        older.ok_or_else(|| {
            conflict(format!(
                "image {key:?}, which is no longer built here (this host has {:?})",
                current.info.key
            ))
        })
    }

    /// What a snapshot of a sandbox of `image` records about it.
    pub fn labels(image: &RuntimeImage) -> BTreeMap<String, String> {
        if image.runtime == BASE_RUNTIME {
            return BTreeMap::new();
        }
        BTreeMap::from([
            (RUNTIME_LABEL.to_string(), image.runtime.clone()),
            (RUNTIME_KEY_LABEL.to_string(), image.key.clone()),
        ])
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// `GET /images`.
    pub fn list(&self) -> ImageList {
        ImageList {
            images: self
                .read()
                .values()
                .map(|image| ImageInfo {
                    image: image.info.clone(),
                    rootfs: image.rootfs.clone(),
                    size_bytes: std::fs::metadata(&image.rootfs).map_or(0, |m| m.len()),
                    default: image.info.runtime == self.default,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir(runtime: &str, key: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ember-runtimes-{}-{runtime}-{key}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut info = RuntimeImage::base();
        info.runtime = runtime.into();
        info.user = "user".into();
        info.uid = 1000;
        info.gid = 1000;
        info.key = key.into();
        std::fs::write(dir.join("rootfs.ext4"), b"").unwrap();
        std::fs::write(
            dir.join(ember_client::images::IMAGE_MANIFEST),
            serde_json::to_vec(&info).unwrap(),
        )
        .unwrap();
        dir.join("rootfs.ext4")
    }

    #[test]
    fn requests_get_their_runtime_the_legacy_image_names_or_the_default() {
        let node = image_dir("node22", "00000000000000aa");
        let given = [format!("node22={}", node.display())];
        let runtimes =
            Runtimes::discover(Path::new("/base"), &given, Some("node22"), None).unwrap();
        assert_eq!(runtimes.choose(None, None).unwrap().info.runtime, "node22");
        assert_eq!(
            runtimes.choose(None, Some("python")).unwrap().info.runtime,
            "base"
        );
        assert_eq!(
            runtimes.choose(Some("base"), None).unwrap().rootfs,
            Path::new("/base")
        );
        for (runtime, image, says) in [
            (Some("ruby3"), None, "no runtime \"ruby3\""),
            (Some("node22"), Some("default"), "not both"),
            (None, Some("node22"), "`image` takes"),
        ] {
            let err = runtimes.choose(runtime, image).unwrap_err();
            assert!(err.message.contains(says), "{}", err.message);
        }
        std::fs::remove_dir_all(node.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_service_refuses_images_it_cannot_use() {
        let python = image_dir("python3.13", "00000000000000bb");
        let wrong = [format!("node22={}", python.display())];
        let err = Runtimes::discover(Path::new("/base"), &wrong, None, None).unwrap_err();
        assert!(
            err.to_string().contains("says it is \"python3.13\""),
            "{err}"
        );
        let unknown = ["ruby3=/x".to_string()];
        assert!(matches!(
            Runtimes::discover(Path::new("/base"), &unknown, None, None),
            Err(RuntimesError::Unknown { .. })
        ));
        assert!(matches!(
            Runtimes::discover(Path::new("/base"), &["node22".to_string()], None, None),
            Err(RuntimesError::Malformed(_))
        ));
        std::fs::remove_dir_all(python.parent().unwrap()).unwrap();
    }

    #[test]
    fn snapshots_restore_over_the_image_they_ran_and_only_that_one() {
        let node = image_dir("node22", "00000000000000cc");
        let given = [format!("node22={}", node.display())];
        let runtimes = Runtimes::discover(Path::new("/base"), &given, None, None).unwrap();
        let labels = Runtimes::labels(&runtimes.choose(Some("node22"), None).unwrap().info);
        assert_eq!(runtimes.for_snapshot("s", &labels).unwrap().rootfs, node);
        assert_eq!(
            runtimes.for_snapshot("s", &BTreeMap::new()).unwrap().rootfs,
            Path::new("/base")
        );
        for metadata in [
            BTreeMap::from([("runtime".into(), "node24".into())]),
            BTreeMap::from([
                ("runtime".into(), "node22".into()),
                ("runtime_key".into(), "../../../etc".into()),
            ]),
            BTreeMap::from([
                ("runtime".into(), "node22".into()),
                ("runtime_key".into(), "ffffffffffffffff".into()),
            ]),
        ] {
            let err = runtimes.for_snapshot("s", &metadata).unwrap_err();
            assert_eq!(
                err.status,
                axum::http::StatusCode::CONFLICT,
                "{}",
                err.message
            );
        }
        std::fs::remove_dir_all(node.parent().unwrap()).unwrap();
    }
}
