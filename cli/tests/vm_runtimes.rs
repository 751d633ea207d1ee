//! Runtimes end to end (`vmtest_*`: hardware KVM or the lab): sandboxes of the `python3.13`
//! and `node22` images run commands as their user in their working directory, keep that
//! across snapshots, and (tests named `uplink`, run only in a lab with an uplink) install
//! packages from the real registries.

mod common;
use common::service::Service;

use std::time::Instant;

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
    service.refuse(
        "POST",
        &format!("/sandboxes/{node}/exec?wait=true"),
        Some(r#"{"cmd": "true", "user": "nobody"}"#),
        400,
        "invalid_request",
    );

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
    for (body, says) in [
        (r#"{"runtime": "ruby3"}"#, "unknown runtime"),
        (r#"{"runtime": "node22", "image": "default"}"#, "not both"),
    ] {
        let (status, answer) = service.curl("POST", "/sandboxes", Some(body));
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }

    // A snapshot of a node22 sandbox restores over the node22 image, as `user` again.
    let snap = service.call(
        "POST",
        &format!("/sandboxes/{node}/snapshots"),
        Some(json!({"stop": true})),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
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

    let snap = service.call(
        "POST",
        &format!("/sandboxes/{sandbox}/snapshots"),
        Some(json!({"stop": true})),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
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
