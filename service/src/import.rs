//! `POST /images?name=NAME`: a container image (an OCI image layout or a `docker save`
//! tarball, the request's body) becomes runtime NAME: its layers unpacked into a tree
//! ([`crate::oci`]), ember's agent added as init, an ext4 image made, and the image's own
//! user, working directory and environment kept for its commands. Nothing is pulled.
//!
//! The image lands in STATE_DIR/images/NAME/KEY/ (KEY: the start of the config's digest)
//! and is registered only once complete; a failed import leaves nothing but its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ember_client::images::{ImageInfo, RuntimeImage, IMAGE_MANIFEST};
use ember_client::types::ErrorDocument;
use futures_util::TryStreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::api::{parse_query, QueryResult};
use crate::error::ApiError;
use crate::oci::{self, ImportError};
use crate::runtimes::{valid_runtime_name, Image};
use crate::AppState;

/// The largest upload taken.
pub(crate) const MAX_IMPORT_BYTES: u64 = 16 << 30;
/// Room an imported image gets beyond what its tree holds, for the sandbox's own writes.
const SPARE_BYTES: u64 = 1 << 30;

/// The query of `POST /images`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// The runtime's name: lowercase letters, digits, `.`, `_`, `-`; not a built-in one.
    pub name: String,
}

/// Where imported images live.
pub fn imported_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("images")
}

/// Removes the work folders of imports a previous run of the service did not finish.
pub fn remove_unfinished(state_dir: &Path) {
    for entry in std::fs::read_dir(imported_dir(state_dir))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(".import-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn refuse(err: ImportError) -> ApiError {
    let status = match err {
        ImportError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(
        status,
        "image_import_failed",
        format!("importing the image: {err}"),
    )
}

#[utoipa::path(post, path = "/images", tag = "service", operation_id = "import_image",
    params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "An OCI image layout or a `docker save` tarball (layers plain or gzip)"),
    responses(
        (status = 201, description = "Imported: a runtime of that name", body = ImageInfo),
        (status = 400, description = "An invalid or built-in name", body = ErrorDocument),
        (status = 413, description = "Larger than the service takes", body = ErrorDocument),
        (status = 422, description = "Not an image the service can use: the error names the part at fault", body = ErrorDocument),
        (status = 500, description = "The service could not write the image", body = ErrorDocument)))]
/// `POST /images?name=NAME`
pub async fn import(
    State(state): State<Arc<AppState>>,
    query: QueryResult<ImportQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    if !valid_runtime_name(&query.name) || state.config.runtimes.is_built_in(&query.name) {
        return Err(ApiError::bad_request(format!(
            "`name` must be lowercase letters, digits, `.`, `_` or `-` (at most 64), and not \
             a built-in runtime ({:?}), not {:?}",
            state.config.runtimes.built_in(),
            query.name
        )));
    }
    let root = imported_dir(&state.config.state_dir);
    let work = root.join(format!(".import-{}", crate::sandbox::random_id("i")));
    let result = async {
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(|e| ApiError::internal(format!("creating {}: {e}", work.display())))?;
        let upload = work.join("upload.tar");
        receive(body, &upload).await?;
        let base = state.config.rootfs.clone();
        let (name, work_dir, root_dir) = (query.name.clone(), work.clone(), root.clone());
        tokio::task::spawn_blocking(move || build(&name, &upload, &work_dir, &root_dir, &base))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    let image = result?;
    state.config.runtimes.add(&query.name, image.clone());
    log::info!(
        "imported image {} as runtime {} ({})",
        image.info.provides.get("oci").map_or("?", String::as_str),
        query.name,
        image.rootfs.display()
    );
    let size_bytes = std::fs::metadata(&image.rootfs).map_or(0, |m| m.len());
    let info = ImageInfo {
        image: image.info,
        rootfs: image.rootfs,
        size_bytes,
        default: false,
    };
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

/// Streams the request body to `path`, at most [`MAX_IMPORT_BYTES`].
async fn receive(body: Body, path: &Path) -> Result<(), ApiError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", path.display())))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?
    {
        total += chunk.len() as u64;
        if total > MAX_IMPORT_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("an image upload may be at most {MAX_IMPORT_BYTES} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(format!("writing the upload: {e}")))
}

/// Unpacks, adds the agent, makes the ext4 image and its manifest; returns the image.
fn build(
    name: &str,
    upload: &Path,
    work: &Path,
    root: &Path,
    base_rootfs: &Path,
) -> Result<Image, ApiError> {
    let unpacked = oci::unpack(upload, work).map_err(refuse)?;
    let _ = std::fs::remove_file(upload);
    let _ = std::fs::remove_dir_all(work.join("outer"));
    let tree = &unpacked.tree;
    let (user, uid, gid, home) = match &unpacked.config.user {
        None => ("root".to_string(), 0, 0, "/root".to_string()),
        Some(user) => oci::resolve_user(tree, user).ok_or_else(|| {
            refuse(ImportError::Malformed(format!(
                "the image's User {user:?} is not in its /etc/passwd"
            )))
        })?,
    };
    install_agent(tree, base_rootfs, work)?;
    let mut env: BTreeMap<String, String> = unpacked
        .config
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.entry("HOME".into()).or_insert(home);
    let hex = unpacked.digest.trim_start_matches("sha256:");
    let key = hex[..16].to_string();
    let dir = root.join(name).join(&key);
    let image = RuntimeImage {
        runtime: name.to_string(),
        user,
        uid,
        gid,
        workdir: unpacked
            .config
            .workdir
            .clone()
            .unwrap_or_else(|| "/".into()),
        env,
        provides: BTreeMap::from([
            ("oci".into(), unpacked.digest.clone()),
            ("layers".into(), unpacked.layers.to_string()),
        ]),
        key,
        build_ms: None,
    };
    let rootfs = dir.join("rootfs.ext4");
    if rootfs.exists() && dir.join(IMAGE_MANIFEST).exists() {
        // The same image imported again under the same name.
        return Ok(Image {
            rootfs,
            info: image,
        });
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    let tmp = dir.join("rootfs.ext4.tmp");
    make_ext4(tree, &tmp)?;
    let manifest =
        serde_json::to_vec_pretty(&image).map_err(|e| ApiError::internal(e.to_string()))?;
    crate::access::write_atomically(&dir.join(IMAGE_MANIFEST), &manifest)
        .map_err(|e| ApiError::internal(format!("writing the image manifest: {e}")))?;
    std::fs::rename(&tmp, &rootfs)
        .map_err(|e| ApiError::internal(format!("publishing {}: {e}", rootfs.display())))?;
    if let Ok(dir) = std::fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(Image {
        rootfs,
        info: image,
    })
}

/// ember's agent (from the base image, where `cargo xtask` put it) as the tree's init, and
/// the files every sandbox needs: host name, hosts, and resolv.conf as the name server the
/// kernel was given.
fn install_agent(tree: &Path, base_rootfs: &Path, work: &Path) -> Result<(), ApiError> {
    let agent = work.join("ember-agent");
    let dumped = std::process::Command::new("debugfs")
        .args([
            "-R",
            &format!("dump {} {}", ember_agent::AGENT_GUEST_PATH, agent.display()),
        ])
        .arg(base_rootfs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let bytes = match dumped {
        Ok(status) if status.success() => std::fs::read(&agent).unwrap_or_default(),
        _ => Vec::new(),
    };
    if bytes.is_empty() {
        return Err(ApiError::internal(format!(
            "cannot read the agent ({}) from the base image {} (debugfs from e2fsprogs)",
            ember_agent::AGENT_GUEST_PATH,
            base_rootfs.display()
        )));
    }
    let write = |path: &str, bytes: &[u8], mode: u32| {
        oci::write_in_tree(tree, path, bytes, mode).map_err(refuse)
    };
    write(ember_agent::AGENT_GUEST_PATH, &bytes, 0o755)?;
    write("/etc/hostname", b"ember\n", 0o644)?;
    write(
        "/etc/hosts",
        b"127.0.0.1 localhost\n127.0.1.1 ember\n::1 localhost\n",
        0o644,
    )?;
    oci::link_in_tree(tree, "/etc/resolv.conf", "/proc/net/pnp").map_err(refuse)
}

/// A sparse ext4 image of the tree with [`SPARE_BYTES`] to spare.
fn make_ext4(tree: &Path, out: &Path) -> Result<(), ApiError> {
    let used = tree_bytes(tree);
    let size_mib = (used + used / 4 + SPARE_BYTES).div_ceil(1 << 20);
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "ember-root", "-m", "0", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{size_mib}M"))
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| ApiError::internal(format!("running mkfs.ext4 (e2fsprogs): {e}")))?;
    if !status.success() {
        return Err(ApiError::internal(format!(
            "mkfs.ext4 -d {} failed with {status}",
            tree.display()
        )));
    }
    Ok(())
}

/// The bytes of every file under `dir` (links not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(_) => total += entry.metadata().map_or(0, |m| m.len()),
                Err(_) => {}
            }
        }
    }
    total
}
