//! Container images as runtimes: an OCI image layout or a `docker save` tarball, uploaded
//! whole (no registry is contacted), becomes a root filesystem with ember's agent as init.
//!
//! The service runs as root and the tarball is a client's, so nothing in it is trusted: the
//! outer tarball and each layer are unpacked by the `tar` crate, which keeps every entry
//! inside its destination; whiteouts remove only what resolves inside the tree; and the files
//! ember adds are written through a resolution of the image's own symlinks that is confined to
//! the tree, as a chroot would be.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// What an image's config says about how its commands run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// An image unpacked into a tree.
#[derive(Debug)]
pub struct Unpacked {
    pub tree: PathBuf,
    pub config: ImageConfig,
    /// The digest of its config (the image id), `sha256:…`.
    pub digest: String,
    pub layers: usize,
}

/// Why an image could not be imported; each names the part of the tarball at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the upload is not a tar archive: {0}")]
    NotATar(#[source] std::io::Error),
    #[error(
        "neither an OCI image layout (index.json) nor a `docker save` tarball (manifest.json)"
    )]
    NoManifest,
    #[error("{what} is not valid JSON of its kind: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Malformed(String),
    #[error("{what} is missing from the tarball")]
    Missing { what: String },
    #[error(
        "layer {index} ({path}) uses {compression}, which is not supported (gzip or plain tar)"
    )]
    Compression {
        index: usize,
        path: String,
        compression: &'static str,
    },
    #[error("layer {index} ({path}): {source}")]
    Layer {
        index: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImportError {
    let what = what.into();
    move |source| ImportError::Io { what, source }
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<OciPlatform>,
}

#[derive(Deserialize)]
struct OciPlatform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ConfigSection>,
}

#[derive(Deserialize, Default)]
struct ConfigSection {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, ImportError> {
    let bytes = fs::read(path).map_err(|_| ImportError::Missing { what: what.into() })?;
    serde_json::from_slice(&bytes).map_err(|source| ImportError::Json {
        what: what.into(),
        source,
    })
}

/// `outer/blobs/sha256/HEX` of a `sha256:HEX` digest (anything else is refused).
fn blob(outer: &Path, digest: &str) -> Result<PathBuf, ImportError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImportError::Malformed(format!("{digest:?} is not a sha256 digest")))?;
    Ok(outer.join("blobs/sha256").join(hex))
}

/// A path inside the tarball named by its manifest: relative, without `..`.
fn inside(outer: &Path, name: &str) -> Result<PathBuf, ImportError> {
    let relative = Path::new(name);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ImportError::Malformed(format!(
            "the manifest names {name:?}, outside the tarball"
        )));
    }
    Ok(outer.join(relative))
}

/// The config file and layer files of the image in the unpacked tarball `outer`.
fn locate(outer: &Path) -> Result<(PathBuf, Vec<PathBuf>), ImportError> {
    if outer.join("manifest.json").exists() {
        let entries: Vec<DockerEntry> = read_json(&outer.join("manifest.json"), "manifest.json")?;
        let entry = entries
            .into_iter()
            .next()
            .ok_or_else(|| ImportError::Malformed("manifest.json lists no image".into()))?;
        let layers = entry
            .layers
            .iter()
            .map(|l| inside(outer, l))
            .collect::<Result<_, _>>()?;
        return Ok((inside(outer, &entry.config)?, layers));
    }
    if !outer.join("index.json").exists() {
        return Err(ImportError::NoManifest);
    }
    let mut index: OciIndex = read_json(&outer.join("index.json"), "index.json")?;
    // An index may name per-platform manifests through a nested index: one level is followed.
    for _ in 0..2 {
        let chosen = pick(&index.manifests)
            .ok_or_else(|| ImportError::Malformed("the index lists no linux/amd64 image".into()))?;
        let path = blob(outer, &chosen.digest)?;
        if chosen.media_type.contains("image.index") || chosen.media_type.contains("manifest.list")
        {
            index = read_json(&path, &format!("the index {}", chosen.digest))?;
            continue;
        }
        let manifest: OciManifest = read_json(&path, &format!("the manifest {}", chosen.digest))?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| blob(outer, &l.digest))
            .collect::<Result<_, _>>()?;
        return Ok((blob(outer, &manifest.config.digest)?, layers));
    }
    Err(ImportError::Malformed("indexes nested too deep".into()))
}

/// The linux/amd64 entry, else the only or first one without a platform.
fn pick(manifests: &[OciDescriptor]) -> Option<&OciDescriptor> {
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| manifests.iter().find(|m| m.platform.is_none()))
}

/// Unpacks the tarball at `upload` under `work` (`work/outer`, then `work/tree`).
pub fn unpack(upload: &Path, work: &Path) -> Result<Unpacked, ImportError> {
    let outer = work.join("outer");
    fs::create_dir_all(&outer).map_err(io(format!("creating {}", outer.display())))?;
    let file = fs::File::open(upload).map_err(io("reading the upload"))?;
    tar::Archive::new(BufReader::new(file))
        .unpack(&outer)
        .map_err(ImportError::NotATar)?;
    let (config_path, layers) = locate(&outer)?;
    let config_bytes = fs::read(&config_path).map_err(|_| ImportError::Missing {
        what: format!("the image config {}", config_path.display()),
    })?;
    let digest = format!("sha256:{}", sha256_hex(&config_bytes));
    let config: ConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|source| ImportError::Json {
            what: "the image config".into(),
            source,
        })?;
    let tree = work.join("tree");
    fs::create_dir_all(&tree).map_err(io("creating the tree"))?;
    for (index, layer) in layers.iter().enumerate() {
        apply_layer(&tree, layer, index + 1)?;
    }
    let section = config.config.unwrap_or_default();
    Ok(Unpacked {
        tree,
        config: ImageConfig {
            env: section.env.unwrap_or_default(),
            workdir: section.working_dir.filter(|w| !w.is_empty()),
            user: section.user.filter(|u| !u.is_empty()),
        },
        digest,
        layers: layers.len(),
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies one layer (plain or gzip tar) to `tree`, whiteouts included.
fn apply_layer(tree: &Path, layer: &Path, index: usize) -> Result<(), ImportError> {
    let shown = layer
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(24).collect::<String>())
        .unwrap_or_default();
    let fail = |source: std::io::Error| ImportError::Layer {
        index,
        path: shown.clone(),
        source,
    };
    let mut file = fs::File::open(layer).map_err(|_| ImportError::Missing {
        what: format!("layer {index} ({shown})"),
    })?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(fail)?;
    drop(file);
    let compression = match &magic[..n] {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            return Err(ImportError::Compression {
                index,
                path: shown.clone(),
                compression: "zstd",
            })
        }
        _ => None,
    };
    let file = BufReader::new(fs::File::open(layer).map_err(fail)?);
    let reader: Box<dyn Read> = match compression {
        Some(_) => Box::new(flate2::read::GzDecoder::new(file)),
        None => Box::new(file),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let root = fs::canonicalize(tree).map_err(fail)?;
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let path = entry.path().map_err(fail)?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = path.parent().unwrap_or(Path::new(""));
            let Some(dir) = confined(&root, parent) else {
                continue;
            };
            if hidden == ".wh..opq" {
                // An opaque folder: what lower layers put in it is gone.
                for child in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    remove(&child.path()).map_err(fail)?;
                }
            } else {
                remove(&dir.join(hidden)).map_err(fail)?;
            }
            continue;
        }
        entry.unpack_in(tree).map_err(fail)?;
    }
    Ok(())
}

/// Removes a file, link or folder without following links.
fn remove(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `relative` resolved inside `root` as a chroot would (absolute links start again at
/// `root`; `..` stops at it), or `None` if it leads nowhere or loops.
fn confined(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut resolved = root.to_path_buf();
    let mut pending: Vec<std::ffi::OsString> = relative
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            if resolved != root {
                resolved.pop();
            }
            continue;
        }
        let next = resolved.join(&part);
        match fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = fs::read_link(&next).ok()?;
                if target.is_absolute() {
                    resolved = root.to_path_buf();
                }
                pending.extend(target.components().rev().filter_map(|c| match c {
                    Component::Normal(p) => Some(p.to_os_string()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                }));
            }
            Ok(_) => resolved = next,
            Err(_) => return None,
        }
    }
    Some(resolved)
}

/// Writes `bytes` to `path` in the image's tree (its folders made, a link there replaced),
/// resolving the image's links inside the tree only.
pub fn write_in_tree(tree: &Path, path: &str, bytes: &[u8], mode: u32) -> Result<(), ImportError> {
    use std::os::unix::fs::PermissionsExt;
    let relative = Path::new(path.trim_start_matches('/'));
    let parent = relative.parent().unwrap_or(Path::new(""));
    let name = relative
        .file_name()
        .ok_or_else(|| ImportError::Malformed(format!("{path} has no file name")))?;
    let root = fs::canonicalize(tree).map_err(io("the tree"))?;
    // Make the folders part by part, each resolved inside the tree.
    let mut made = PathBuf::new();
    for part in parent.components() {
        made.push(part);
        if confined(&root, &made).is_none() {
            let at = confined(&root, made.parent().unwrap_or(Path::new("")))
                .ok_or_else(|| ImportError::Malformed(format!("cannot place {path}")))?;
            fs::create_dir(at.join(part)).map_err(io(format!("creating /{}", made.display())))?;
        }
    }
    let dir = confined(&root, parent)
        .ok_or_else(|| ImportError::Malformed(format!("cannot place {path}")))?;
    let target = dir.join(name);
    remove(&target).map_err(io(format!("replacing {path}")))?;
    fs::write(&target, bytes).map_err(io(format!("writing {path}")))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {path}")))
}

/// Makes `path` in the image's tree a symbolic link to `target` (replacing what is there),
/// its folder resolved inside the tree.
pub fn link_in_tree(tree: &Path, path: &str, target: &str) -> Result<(), ImportError> {
    write_in_tree(tree, path, b"", 0o644)?;
    let root = fs::canonicalize(tree).map_err(io("the tree"))?;
    let relative = Path::new(path.trim_start_matches('/'));
    let dir = confined(&root, relative.parent().unwrap_or(Path::new("")))
        .ok_or_else(|| ImportError::Malformed(format!("cannot place {path}")))?;
    let link = dir.join(relative.file_name().unwrap_or_default());
    fs::remove_file(&link).map_err(io(format!("replacing {path}")))?;
    std::os::unix::fs::symlink(target, &link).map_err(io(format!("linking {path}")))
}

/// The uid, gid and home of `user` (a name, `uid`, or `uid:gid`) in the tree's /etc/passwd.
pub fn resolve_user(tree: &Path, user: &str) -> Option<(String, u32, u32, String)> {
    let root = fs::canonicalize(tree).ok()?;
    let passwd = confined(&root, Path::new("etc/passwd"))
        .and_then(|p| fs::read_to_string(p).ok())
        .unwrap_or_default();
    let (who, group) = match user.split_once(':') {
        Some((who, group)) => (who, group.parse::<u32>().ok()),
        None => (user, None),
    };
    let entries: BTreeMap<String, (u32, u32, String)> = passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some((
                fields.first()?.to_string(),
                (
                    fields.get(2)?.parse().ok()?,
                    fields.get(3)?.parse().ok()?,
                    fields.get(5)?.to_string(),
                ),
            ))
        })
        .collect();
    let (name, (uid, gid, home)) = match who.parse::<u32>() {
        Ok(uid) => entries
            .iter()
            .find(|(_, (u, _, _))| *u == uid)
            .map(|(n, e)| (n.clone(), e.clone()))
            .unwrap_or_else(|| (uid.to_string(), (uid, uid, "/".into()))),
        Err(_) => {
            let entry = entries.get(who)?.clone();
            (who.to_string(), entry)
        }
    };
    Some((name, uid, group.unwrap_or(gid), home))
}

#[cfg(test)]
mod tests;
