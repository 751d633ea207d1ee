//! Runtimes end to end (`vmtest_*`: hardware KVM or the lab): sandboxes of the `python3.13`
//! and `node22` images run commands as their user in their working directory, keep that
//! across snapshots, and (tests named `uplink`, run only in a lab with an uplink) install
//! packages from the real registries.

mod common;
use common::service::Service;

use std::time::Instant;

use base64::Engine;

use serde_json::{json, Value};

/// `exec?wait=true` of `sh -c script` with more request fields.
fn run(service: &Service, id: &str, script: &str, extra: Value) -> Value {
    let mut body = json!({"cmd": "sh", "args": ["-c", script]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    service.call(
        "POST",
        &format!("/sandboxes/{id}/exec?wait=true"),
        Some(body),
        200,
    )
}

/// Saves sandbox `id` (stopping it); the snapshot's id.
fn snapshot_and_stop(service: &Service, id: &str) -> String {
    let taken = service.call(
        "POST",
        &format!("/sandboxes/{id}/snapshots"),
        Some(json!({"stop": true})),
        201,
    );
    taken["id"].as_str().unwrap().to_string()
}

fn stdout_of(result: &Value) -> String {
    assert_eq!(result["exit_code"], 0, "{result}");
    result["stdout"].as_str().unwrap().trim().to_string()
}

#[test]
fn vmtest_runtimes_run_commands_as_their_user_with_their_tools_and_keep_that_when_restored() {
    let service = Service::start("runtimes");
    let images = service.call("GET", "/images", None, 200);
    let names: Vec<&str> = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["runtime"].as_str().unwrap())
        .collect();
    for want in ["base", "python3.13", "node22"] {
        assert!(names.contains(&want), "{want} missing from {images}");
    }

    let node = service.create(json!({"runtime": "node22"}));
    assert_eq!(service.sandbox(&node)["runtime"], "node22");
    let who = stdout_of(&run(
        &service,
        &node,
        "id -un; pwd; echo $HOME; node --version; npm --version; git --version; sudo -n id -u",
        json!({}),
    ));
    let lines: Vec<&str> = who.lines().collect();
    assert_eq!(lines[..3], ["user", "/home/user", "/home/user"], "{who}");
    assert!(lines[3].starts_with("v22."), "{who}");
    assert!(lines[4].starts_with("10."), "{who}");
    assert!(lines[5].starts_with("git version"), "{who}");
    assert_eq!(lines[6], "0", "passwordless sudo: {who}");
    // The user owns its home; root is a request away.
    let as_root = stdout_of(&run(
        &service,
        &node,
        "id -u; echo $HOME; pwd; touch ~/root-was-here",
        json!({"user": "root", "cwd": "/tmp"}),
    ));
    assert_eq!(as_root, "0\n/root\n/tmp");
    stdout_of(&run(&service, &node, "echo hi > notes.txt", json!({})));
    // Files the API writes in the user's directory are the user's (elsewhere, root's).
    for path in ["/home/user/uploaded.txt", "/tmp/uploaded.txt"] {
        let (status, answer) =
            service.upload("PUT", &format!("/sandboxes/{node}/files?path={path}"), b"x");
        assert_eq!(status, 201, "{answer}");
    }
    let owners = stdout_of(&run(
        &service,
        &node,
        "echo more >> uploaded.txt && stat -c %U uploaded.txt /tmp/uploaded.txt",
        json!({}),
    ));
    assert_eq!(owners, "user\nroot");
    for (user, status, code) in [
        ("nobody", 409, "no_such_user"),
        ("../x", 400, "invalid_request"),
    ] {
        service.refuse(
            "POST",
            &format!("/sandboxes/{node}/exec?wait=true"),
            Some(&json!({"cmd": "true", "user": user}).to_string()),
            status,
            code,
        );
    }

    let python = service.create(json!({"runtime": "python3.13"}));
    let version = stdout_of(&run(&service, &python, "python3 --version", json!({})));
    assert!(version.starts_with("Python 3.13."), "{version}");

    // `base` is what it always was: root in `/`, Python 3.11 and Node 18.
    let base = service.create(json!({}));
    assert_eq!(service.sandbox(&base)["runtime"], "base");
    let base_who = stdout_of(&run(
        &service,
        &base,
        "id -u; pwd; python3 --version",
        json!({}),
    ));
    assert_eq!(base_who, "0\n/\nPython 3.11.2", "{base_who}");
    service.refuse(
        "POST",
        &format!("/sandboxes/{base}/exec?wait=true"),
        Some(r#"{"cmd": "true", "user": "user"}"#),
        409,
        "no_such_user",
    );
    for (body, status, says) in [
        (r#"{"runtime": "ruby3"}"#, 404, "no runtime"),
        (
            r#"{"runtime": "node22", "image": "default"}"#,
            400,
            "not both",
        ),
    ] {
        let (got, answer) = service.curl("POST", "/sandboxes", Some(body));
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }

    // A snapshot of a node22 sandbox restores over the node22 image, as `user` again.
    let snap = snapshot_and_stop(&service, &node);
    let restored = service.create(json!({"snapshot": snap}));
    assert_eq!(service.sandbox(&restored)["runtime"], "node22");
    let after = stdout_of(&run(
        &service,
        &restored,
        "id -un; cat notes.txt; sudo -n ls /root",
        json!({}),
    ));
    assert_eq!(after, "user\nhi\nroot-was-here");
    let (status, answer) = service.curl(
        "POST",
        "/sandboxes",
        Some(&json!({"snapshot": snap, "runtime": "python3.13"}).to_string()),
    );
    assert_eq!(status, 400, "{answer}");

    // The CLI: `ember images` lists what the service offers, `--runtime` and `--user` pass.
    let listed = service.ember(&["images"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && listing.contains("node22"),
        "{listing}"
    );
    let created = service.ember(&["create", "--runtime", "python3.13"]);
    assert!(created.status.success(), "{created:?}");
    let id = String::from_utf8_lossy(&created.stdout).trim().to_string();
    let whoami = service.ember(&["exec", &id, "--user", "root", "--", "id", "-un"]);
    assert_eq!(String::from_utf8_lossy(&whoami.stdout).trim(), "root");
}

/// `npm install` in a node22 sandbox reaches the npm registry through the lab's uplink; the
/// snapshot taken after it restores with the package in place, so the restored sandbox runs
/// the code at once instead of installing again.
#[test]
fn vmtest_uplink_npm_install_in_node22_is_kept_by_a_snapshot() {
    let service = Service::start("npm");
    let egress = json!({"mode": "egress"});
    let sandbox = service.create(json!({"runtime": "node22", "network": egress}));
    let started = Instant::now();
    let install = run(
        &service,
        &sandbox,
        "npm install --no-audit --no-fund is-number@7.0.0 2>&1",
        json!({"timeout_s": 600}),
    );
    let install_ms = started.elapsed().as_millis();
    assert_eq!(install["exit_code"], 0, "npm install failed: {install}");
    let code = "console.log(require('is-number')(42), require('is-number')('x'))";
    let use_it = json!({"cmd": "node", "args": ["-e", code]});
    let first = service.call(
        "POST",
        &format!("/sandboxes/{sandbox}/exec?wait=true"),
        Some(use_it.clone()),
        200,
    );
    assert_eq!(stdout_of(&first), "true false");

    let snap = snapshot_and_stop(&service, &sandbox);
    let started = Instant::now();
    let restored = service.create(json!({"snapshot": snap, "network": egress}));
    let again = service.call(
        "POST",
        &format!("/sandboxes/{restored}/exec?wait=true"),
        Some(use_it),
        200,
    );
    let restore_ms = started.elapsed().as_millis();
    assert_eq!(stdout_of(&again), "true false");
    let owner = stdout_of(&run(
        &service,
        &restored,
        "stat -c %U node_modules/is-number/package.json",
        json!({}),
    ));
    assert_eq!(owner, "user");
    eprintln!(
        "npm install then run: {install_ms} ms; restore then run: {restore_ms} ms (lab, uplink)"
    );
}

/// A template: a node22 sandbox gets a file and a server started in the background, is
/// snapshotted once the server answers, and every sandbox created from it has the server
/// running at once (memory snapshots keep processes). Rebuilds reuse the steps they share;
/// a failing step or a ready command that never succeeds leaves no template.
#[test]
fn vmtest_templates_build_once_restore_ready_and_rebuild_only_what_changed() {
    let service = Service::start("templates");
    let server = "require('http').createServer((q, s) => s.end('hello from a template'))\
                  .listen(8080)";
    let content = base64::engine::general_purpose::STANDARD.encode(server);
    let steps = json!([
        {"copy": {"path": "/home/user/server.js", "content_base64": content}},
        {"run": "setsid node server.js > server.log 2>&1 < /dev/null &"}
    ]);
    let web = json!({
        "name": "web", "runtime": "node22", "steps": steps,
        "ready": {"cmd": "curl -sf http://127.0.0.1:8080/", "timeout_s": 120}
    });
    let built = service.call("POST", "/templates", Some(web.clone()), 201);
    assert_eq!(built["steps_cached"], 0, "{built}");
    assert_eq!(built["runtime"], "node22");
    let snapshot = built["snapshot"].as_str().unwrap().to_string();

    // A sandbox of the template is a restore with the server already answering.
    let id = service.create(json!({"template": "web"}));
    let info = service.sandbox(&id);
    assert_eq!(info["snapshot"], snapshot.as_str(), "{info}");
    assert_eq!(info["runtime"], "node22");
    let answer = run(
        &service,
        &id,
        "curl -s http://127.0.0.1:8080/; echo; stat -c %U server.js",
        json!({}),
    );
    assert_eq!(stdout_of(&answer), "hello from a template\nuser");

    // The same template again is found built; one more step reuses the first two.
    let again = service.call("POST", "/templates", Some(web.clone()), 201);
    assert_eq!(again["steps_cached"], 2, "{again}");
    assert_eq!(again["snapshot"], snapshot.as_str());
    let mut more = web.clone();
    more["steps"]
        .as_array_mut()
        .unwrap()
        .push(json!({"run": "echo v2 > version"}));
    let rebuilt = service.call("POST", "/templates", Some(more), 201);
    assert_eq!(rebuilt["steps_cached"], 2, "{rebuilt}");
    assert_ne!(rebuilt["snapshot"], snapshot.as_str());
    let listed = service.call("GET", "/templates", None, 200);
    assert_eq!(listed["templates"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["templates"][0]["steps"].as_array().unwrap().len(), 3);

    // Failures name the step and quote its output; no template is left.
    let (status, answer) = service.curl(
        "POST",
        "/templates",
        Some(
            &json!({"name": "broken", "runtime": "python3.13", "steps": [
                {"run": "echo fine"}, {"run": "echo oops-123 >&2; exit 3"}]})
            .to_string(),
        ),
    );
    assert_eq!(status, 422, "{answer}");
    for says in [
        "template_step_failed",
        "step 2",
        "exit status 3",
        "oops-123",
    ] {
        assert!(answer.contains(says), "{says}: {answer}");
    }
    service.refuse("GET", "/templates/broken", None, 404, "not_found");
    let (status, answer) = service.curl(
        "POST",
        "/templates",
        Some(r#"{"name": "never", "ready": {"cmd": "echo not-yet; false", "timeout_s": 3}}"#),
    );
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer.contains("template_not_ready") && answer.contains("not-yet"),
        "{answer}"
    );
    service.refuse("GET", "/templates/never", None, 404, "not_found");
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"template": "never"}"#),
        404,
        "not_found",
    );
    service.refuse(
        "POST",
        "/templates",
        Some(r#"{"name": "x", "runtime": "ruby3"}"#),
        404,
        "not_found",
    );
    // No build sandbox outlives its build.
    let sandboxes = service.call("GET", "/sandboxes", None, 200);
    let live: Vec<&Value> = sandboxes["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "running")
        .collect();
    assert_eq!(live.len(), 1, "only the test's own sandbox: {sandboxes}");

    // The CLI.
    let ls = service.ember(&["template", "ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("web"),
        "{ls:?}"
    );
    let created = service.ember(&["create", "--template", "web"]);
    assert!(created.status.success(), "{created:?}");
}

/// A `docker save` tarball made here: static busybox as the userland, an `app` user who owns
/// `/app` (the image's working directory and user), an environment, and a whiteout.
fn busybox_image(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::symlink;
    let sh = |script: &str| {
        let status = std::process::Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    };
    let base = dir.join("base");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", base.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "id", "pwd", "cat", "echo", "ls", "test", "stat", "env", "sleep",
    ] {
        symlink("busybox", base.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        base.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1001:1001:app:/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(base.join("etc/group"), "root:x:0:\napp:x:1001:\n").unwrap();
    std::fs::write(base.join("etc/motd"), "lower layer\n").unwrap();
    let app = dir.join("app-layer/app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("hello.txt"), "hi from oci\n").unwrap();
    std::fs::create_dir_all(dir.join("top/etc")).unwrap();
    std::fs::write(dir.join("top/etc/.wh.motd"), "").unwrap();
    let config = json!({"config": {"Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/app",
                                   "User": "app"}});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let manifest = json!([{"Config": "config.json", "RepoTags": ["busybox-app:1"],
        "Layers": ["1/layer.tar", "2/layer.tar", "3/layer.tar"]}]);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    sh(
        "mkdir -p 1 2 3 && tar -C base --numeric-owner --owner=0 --group=0 -cf 1/layer.tar . \
        && tar -C app-layer --numeric-owner --owner=1001 --group=1001 -cf 2/layer.tar app \
        && tar -C top --numeric-owner --owner=0 --group=0 -cf 3/layer.tar etc/.wh.motd \
        && gzip 2/layer.tar && mv 2/layer.tar.gz 2/layer.tar \
        && tar -cf image.tar manifest.json config.json 1 2 3",
    );
    dir.join("image.tar")
}

/// A container image on disk becomes a runtime (its user, working directory, environment
/// and layers kept, ember's agent added), then a template; a broken tarball or a built-in
/// name is refused and leaves no runtime.
#[test]
fn vmtest_a_docker_save_tarball_becomes_a_runtime_and_a_template() {
    let service = Service::start("oci");
    let dir = service.state.join("oci-input");
    std::fs::create_dir_all(&dir).unwrap();
    let tarball = busybox_image(&dir);
    let built = service.ember(&[
        "template",
        "build",
        "bbapp",
        "--from-oci",
        tarball.to_str().unwrap(),
        "--run",
        "echo built > /app/built.txt",
        "--ready",
        "test -f /app/built.txt",
    ]);
    assert!(built.status.success(), "{built:?}\n{}", service.log());
    let images = service.call("GET", "/images", None, 200);
    let image = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["runtime"] == "bbapp")
        .unwrap_or_else(|| panic!("bbapp missing: {images}"))
        .clone();
    assert_eq!(image["user"], "app", "{image}");
    assert_eq!(image["uid"], 1001);
    assert_eq!(image["workdir"], "/app");
    assert!(image["provides"]["oci"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    let id = service.create(json!({"template": "bbapp"}));
    assert_eq!(service.sandbox(&id)["runtime"], "bbapp");
    let seen = stdout_of(&run(
        &service,
        &id,
        "id -u; pwd; echo $GREETING; cat hello.txt built.txt; test -e /etc/motd || echo gone",
        json!({}),
    ));
    assert_eq!(seen, "1001\n/app\nhi\nhi from oci\nbuilt\ngone");
    let as_root = stdout_of(&run(&service, &id, "id -u", json!({"user": "root"})));
    assert_eq!(as_root, "0");

    for (name, body, status, says) in [
        (
            "broken",
            b"not a tarball".to_vec(),
            422,
            "importing the image",
        ),
        ("node22", std::fs::read(&tarball).unwrap(), 400, "built-in"),
    ] {
        let (got, answer) = service.upload("POST", &format!("/images?name={name}"), &body);
        assert_eq!(got, status, "{name}: {answer}");
        assert!(answer.contains(says), "{name}: {answer}");
    }
    let images = service.call("GET", "/images", None, 200);
    assert!(!images.to_string().contains("\"broken\""), "{images}");
    // Nothing of the failed import is left in the service's folder.
    let leftovers: Vec<_> = std::fs::read_dir(service.state.join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["bbapp"], "{leftovers:?}");
}
