//! The runtimes a service offers (`base` and the images `cargo xtask images` built), which
//! one a request gets, and which image a snapshot of each must be restored over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    images: BTreeMap<String, Image>,
    default: String,
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
    /// `base` over `base_rootfs`, each of `given` (`RUNTIME=PATH`), and the newest build of
    /// every other runtime that has one.
    pub fn discover(
        base_rootfs: &Path,
        given: &[String],
        default: Option<&str>,
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
        let mut images = BTreeMap::from([(
            BASE_RUNTIME.to_string(),
            Image {
                rootfs: base_rootfs.to_path_buf(),
                info: RuntimeImage::base(),
            },
        )]);
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
        Ok(Runtimes { images, default })
    }

    /// A service of `base` only (tests).
    pub fn base_only(base_rootfs: &Path) -> Runtimes {
        Runtimes {
            images: BTreeMap::from([(
                BASE_RUNTIME.to_string(),
                Image {
                    rootfs: base_rootfs.to_path_buf(),
                    info: RuntimeImage::base(),
                },
            )]),
            default: BASE_RUNTIME.into(),
        }
    }

    /// The image a create gets: its `runtime`, else its legacy `image` (a name of `base`),
    /// else the service's default.
    pub fn choose(&self, runtime: Option<&str>, image: Option<&str>) -> Result<&Image, ApiError> {
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
        self.images.get(name).ok_or_else(|| {
            let hint = if RUNTIMES.contains(&name) {
                format!(" (it is not built on this host: `cargo xtask images {name}`)")
            } else {
                String::new()
            };
            ApiError::bad_request(format!(
                "unknown runtime {name:?}{hint}; this service has {:?}",
                self.names()
            ))
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
        let current = self.images.get(name).ok_or_else(|| {
            conflict(format!(
                "which this service does not have ({:?})",
                self.names()
            ))
        })?;
        if name == BASE_RUNTIME {
            return Ok(current.clone());
        }
        let key = metadata.get(RUNTIME_KEY_LABEL).map_or("", String::as_str);
        if key == current.info.key {
            return Ok(current.clone());
        }
        let well_formed = key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit());
        let older = well_formed
            .then(|| ember_sandbox::defaults::runtime_image_by_key(name, key))
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

    pub fn names(&self) -> Vec<&str> {
        self.images.keys().map(String::as_str).collect()
    }

    /// `GET /images`.
    pub fn list(&self) -> ImageList {
        ImageList {
            images: self
                .images
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
        let runtimes = Runtimes::discover(Path::new("/base"), &given, Some("node22")).unwrap();
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
            (Some("ruby3"), None, "unknown runtime \"ruby3\""),
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
        let err = Runtimes::discover(Path::new("/base"), &wrong, None).unwrap_err();
        assert!(
            err.to_string().contains("says it is \"python3.13\""),
            "{err}"
        );
        let unknown = ["ruby3=/x".to_string()];
        assert!(matches!(
            Runtimes::discover(Path::new("/base"), &unknown, None),
            Err(RuntimesError::Unknown { .. })
        ));
        assert!(matches!(
            Runtimes::discover(Path::new("/base"), &["node22".to_string()], None),
            Err(RuntimesError::Malformed(_))
        ));
        std::fs::remove_dir_all(python.parent().unwrap()).unwrap();
    }

    #[test]
    fn snapshots_restore_over_the_image_they_ran_and_only_that_one() {
        let node = image_dir("node22", "00000000000000cc");
        let given = [format!("node22={}", node.display())];
        let runtimes = Runtimes::discover(Path::new("/base"), &given, None).unwrap();
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
