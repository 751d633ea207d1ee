use super::*;

use std::io::Write;

/// A tar archive of `entries`: (path, Some(content)) files, (path, None) folders, and
/// ("link -> target") symlinks.
fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if let Some((link, target)) = path.split_once(" -> ") {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_mode(0o777);
            builder.append_link(&mut header, link, target).unwrap();
            continue;
        }
        match content {
            Some(bytes) => {
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                builder.append_data(&mut header, path, *bytes).unwrap();
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_mode(0o755);
                header.set_cksum();
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-oci-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

const CONFIG: &[u8] =
    br#"{"config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hi"], "WorkingDir": "/app", "User": "app"}}"#;

fn docker_save(layers: &[Vec<u8>]) -> Vec<u8> {
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest =
        serde_json::json!([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": names}])
            .to_string();
    let mut entries: Vec<(&str, Option<&[u8]>)> = vec![
        ("manifest.json", Some(manifest.as_bytes())),
        ("config.json", Some(CONFIG)),
    ];
    for (name, layer) in names.iter().zip(layers) {
        entries.push((name, Some(layer)));
    }
    tar_of(&entries)
}

#[test]
fn a_docker_save_tarball_unpacks_its_layers_in_order_with_whiteouts() {
    let dir = scratch("docker");
    let base = tar_of(&[
        ("etc", None),
        ("etc/hello", Some(b"one")),
        (
            "etc/passwd",
            Some(b"root:x:0:0:root:/root:/bin/sh\napp:x:1001:1002::/app:/bin/sh\n"),
        ),
        ("app", None),
        ("app/old", Some(b"old")),
        ("usr/sbin", None),
        ("sbin -> usr/sbin", None),
    ]);
    let top = gzip(&tar_of(&[
        ("etc/.wh.hello", Some(b"")),
        ("etc/new", Some(b"two")),
        ("app/.wh..wh..opq", Some(b"")),
        ("app/fresh", Some(b"fresh")),
    ]));
    fs::write(dir.join("image.tar"), docker_save(&[base, top])).unwrap();
    let unpacked = unpack(&dir.join("image.tar"), &dir.join("work")).unwrap();
    let tree = &unpacked.tree;
    assert!(!tree.join("etc/hello").exists());
    assert_eq!(fs::read(tree.join("etc/new")).unwrap(), b"two");
    assert!(!tree.join("app/old").exists(), "the opaque folder hid it");
    assert_eq!(fs::read(tree.join("app/fresh")).unwrap(), b"fresh");
    assert_eq!(unpacked.layers, 2);
    assert_eq!(unpacked.config.workdir.as_deref(), Some("/app"));
    assert_eq!(unpacked.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
    assert!(unpacked.digest.starts_with("sha256:") && unpacked.digest.len() == 71);
    assert_eq!(
        resolve_user(tree, "app"),
        Some(("app".into(), 1001, 1002, "/app".into()))
    );
    assert_eq!(resolve_user(tree, "0").map(|u| u.1), Some(0));
    assert_eq!(resolve_user(tree, "nobody"), None);
    // ember's files go through the image's own links, inside the tree.
    write_in_tree(tree, "/sbin/ember-agent", b"agent", 0o755).unwrap();
    assert_eq!(
        fs::read(tree.join("usr/sbin/ember-agent")).unwrap(),
        b"agent"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_oci_layout_is_read_through_its_index() {
    let dir = scratch("oci");
    let layer = gzip(&tar_of(&[("hello.txt", Some(b"from oci"))]));
    let digest = |bytes: &[u8]| format!("sha256:{}", sha256_hex(bytes));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(CONFIG), "size": CONFIG.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&layer), "size": layer.len()}]
    })
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest.as_bytes()),
         "platform": {"architecture": "arm64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest.as_bytes()),
         "platform": {"architecture": "amd64", "os": "linux"}}
    ]})
    .to_string();
    let blob_path = |bytes: &[u8]| format!("blobs/sha256/{}", sha256_hex(bytes));
    let (config_path, layer_path, manifest_path) = (
        blob_path(CONFIG),
        blob_path(&layer),
        blob_path(manifest.as_bytes()),
    );
    let archive = tar_of(&[
        ("oci-layout", Some(br#"{"imageLayoutVersion": "1.0.0"}"#)),
        ("index.json", Some(index.as_bytes())),
        (&config_path, Some(CONFIG)),
        (&layer_path, Some(&layer)),
        (&manifest_path, Some(manifest.as_bytes())),
    ]);
    fs::write(dir.join("image.tar"), archive).unwrap();
    let unpacked = unpack(&dir.join("image.tar"), &dir.join("work")).unwrap();
    assert_eq!(
        fs::read(unpacked.tree.join("hello.txt")).unwrap(),
        b"from oci"
    );
    assert_eq!(unpacked.digest, digest(CONFIG));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_layers_cannot_reach_outside_the_tree() {
    let dir = scratch("hostile");
    let outside = dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), b"keep me").unwrap();
    let out = outside.display().to_string();
    // A link to a host folder, then a file through it: refused.
    let escape = tar_of(&[
        (&format!("evil -> {out}"), None),
        ("evil/pwned", Some(b"x")),
    ]);
    fs::write(dir.join("escape.tar"), docker_save(&[escape])).unwrap();
    let err = unpack(&dir.join("escape.tar"), &dir.join("w1")).unwrap_err();
    assert!(matches!(err, ImportError::Layer { index: 1, .. }), "{err}");
    assert!(!outside.join("pwned").exists());
    // A whiteout through such a link resolves inside the tree (as in a chroot), where that
    // path does not exist: nothing is removed, outside or in.
    let whiteout = tar_of(&[
        ("victim", Some(b"the tree's")),
        (&format!("link -> {out}"), None),
        ("link/.wh.victim", Some(b"")),
    ]);
    fs::write(dir.join("whiteout.tar"), docker_save(&[whiteout])).unwrap();
    let unpacked = unpack(&dir.join("whiteout.tar"), &dir.join("w2")).unwrap();
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep me");
    assert!(unpacked.tree.join("victim").exists(), "{unpacked:?}");
    // ember's own files never follow a link out either.
    let linked = tar_of(&[("usr/sbin", None), ("sbin -> /usr/sbin", None)]);
    fs::write(dir.join("linked.tar"), docker_save(&[linked])).unwrap();
    let unpacked = unpack(&dir.join("linked.tar"), &dir.join("w3")).unwrap();
    write_in_tree(&unpacked.tree, "/sbin/ember-agent", b"agent", 0o755).unwrap();
    assert!(unpacked.tree.join("usr/sbin/ember-agent").exists());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_tarballs_get_errors_naming_what_is_wrong() {
    let dir = scratch("broken");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not-tar",
            b"this is not a tar archive at all".repeat(40),
            "not a tar",
        ),
        (
            "no-manifest",
            tar_of(&[("readme", Some(b"hi"))]),
            "neither an OCI",
        ),
        (
            "missing-layer",
            tar_of(&[
                (
                    "manifest.json",
                    Some(br#"[{"Config": "c.json", "Layers": ["gone/layer.tar"]}]"#),
                ),
                ("c.json", Some(CONFIG)),
            ]),
            "layer 1",
        ),
        (
            "escaping-manifest",
            tar_of(&[(
                "manifest.json",
                Some(br#"[{"Config": "../../etc/shadow", "Layers": []}]"#),
            )]),
            "outside the tarball",
        ),
        (
            "zstd",
            docker_save(&[vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]]),
            "zstd",
        ),
        (
            "bad-json",
            tar_of(&[("manifest.json", Some(b"{not json"))]),
            "manifest.json is not valid JSON",
        ),
    ];
    for (name, bytes, says) in cases {
        let upload = dir.join(format!("{name}.tar"));
        fs::write(&upload, bytes).unwrap();
        let err = unpack(&upload, &dir.join(name)).unwrap_err();
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
    fs::remove_dir_all(&dir).unwrap();
}
