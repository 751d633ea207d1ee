//! Sandboxes that pause or save themselves (`vmtest_*`: hardware KVM or the lab): on idleness
//! or at their timeout, per `on_timeout`, and resume on use under the same id with their
//! processes still running.

mod common;
use common::service::{text, Service};

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Starts a counter in the background that outlives the exec (its own session).
const COUNTER: &str =
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done' \
                       </dev/null >/dev/null 2>&1 & echo started";

/// `exec?wait=true` of `sh -c script` by curl, with the response's headers: (status,
/// headers, result).
fn exec_with_headers(service: &Service, id: &str, script: &str) -> (u16, String, Value) {
    let body = json!({"cmd": "sh", "args": ["-c", script]}).to_string();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "300",
            "-D",
            "-",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(&service.socket)
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
        ])
        .arg(format!("http://ember/sandboxes/{id}/exec?wait=true"))
        .output()
        .unwrap();
    let all = text(&out.stdout);
    let (rest, code) = all.rsplit_once('\n').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap(),
        headers.to_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn wait_for(
    service: &Service,
    id: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let info = service.sandbox(id);
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened: {info}\n{}",
            service.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn count(result: &Value) -> u64 {
    result["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{result}"))
}

#[test]
fn vmtest_an_idle_sandbox_pauses_and_its_next_exec_resumes_it_with_its_background_process() {
    let service = Service::start("idle");
    let id = service.create(json!({"idle_timeout_s": 3, "on_timeout": "pause", "timeout_s": 900}));
    assert_eq!(service.sh(&id, COUNTER)["stdout"], "started\n");
    let paused = wait_for(
        &service,
        &id,
        "an idle pause",
        Duration::from_secs(30),
        |s| s["state"] == "paused",
    );
    assert_eq!(paused["suspended"]["reason"], "idle", "{paused}");
    assert_eq!(paused["suspended"]["how"], "pause", "{paused}");
    // Paused means no guest CPU: the counter stands still.
    std::thread::sleep(Duration::from_secs(2));
    let (status, headers, first) = exec_with_headers(&service, &id, "cat /tmp/count");
    assert_eq!(status, 200, "{first}");
    assert!(headers.contains("ember-resumed: pause"), "{headers}");
    let resumed = service.sandbox(&id);
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert!(resumed["suspended"].is_null(), "{resumed}");
    // Its background process lives on, from where it was.
    std::thread::sleep(Duration::from_secs(1));
    let (_, headers, second) = exec_with_headers(&service, &id, "cat /tmp/count");
    assert!(!headers.contains("ember-resumed"), "{headers}");
    assert!(count(&second) > count(&first), "{first} then {second}");

    // With auto_resume off, use is refused until an explicit resume.
    let manual =
        service.create(json!({"idle_timeout_s": 2, "on_timeout": "pause", "auto_resume": false}));
    wait_for(
        &service,
        &manual,
        "an idle pause",
        Duration::from_secs(30),
        |s| s["state"] == "paused",
    );
    let (status, _, refused) = exec_with_headers(&service, &manual, "true");
    assert_eq!(status, 409, "{refused}");
    let info = service.call("POST", &format!("/sandboxes/{manual}/resume"), None, 200);
    assert!(info["suspended"].is_null(), "{info}");
    assert_eq!(service.sh(&manual, "echo ok")["stdout"], "ok\n");
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"idle_timeout_s": 1}"#),
        400,
        "invalid_request",
    );
}

#[test]
fn vmtest_a_sandbox_saved_at_its_timeout_restores_under_its_id_with_its_processes_on_use() {
    let service = Service::start("save");
    // The timeout counts from the request; a lab boot takes seconds of it.
    let id = service.create(json!({"timeout_s": 30, "on_timeout": "snapshot"}));
    assert_eq!(
        service.sh(&id, &format!("echo kept > /root/mark; {COUNTER}"))["stdout"],
        "started\n"
    );
    let saved = wait_for(
        &service,
        &id,
        "a save at the timeout",
        Duration::from_secs(120),
        |s| s["suspended"]["snapshot"].is_string(),
    );
    assert_eq!(saved["state"], "stopped", "{saved}");
    assert_eq!(saved["suspended"]["reason"], "timeout", "{saved}");
    assert!(
        saved["pid"].is_null() || saved["state"] == "stopped",
        "{saved}"
    );
    let snapshot = saved["suspended"]["snapshot"].as_str().unwrap().to_string();
    service.call("GET", &format!("/snapshots/{snapshot}"), None, 200);

    let (status, headers, first) = exec_with_headers(&service, &id, "cat /tmp/count");
    assert_eq!(status, 200, "{first}\n{}", service.log());
    assert!(headers.contains("ember-resumed: snapshot"), "{headers}");
    let info = service.sandbox(&id);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["snapshot"], snapshot.as_str(), "{info}");
    assert!(info["suspended"].is_null(), "{info}");
    assert_eq!(info["on_timeout"], "snapshot", "{info}");
    // Same files, and the counter still counts: its memory came back with it.
    assert_eq!(service.sh(&id, "cat /root/mark")["stdout"], "kept\n");
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, second) = exec_with_headers(&service, &id, "cat /tmp/count");
    assert!(count(&second) > count(&first), "{first} then {second}");
    // Its timeout was armed again: it saves itself a second time.
    let again = wait_for(
        &service,
        &id,
        "a second save",
        Duration::from_secs(120),
        |s| {
            s["suspended"]["snapshot"].is_string()
                && s["suspended"]["snapshot"] != snapshot.as_str()
        },
    );
    assert_eq!(again["state"], "stopped", "{again}");
    let listed = service.call("GET", "/sandboxes", None, 200);
    let with_id = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["id"] == id.as_str())
        .count();
    assert_eq!(with_id, 1, "{listed}");
}
