//! Watching a sandbox (`vmtest_*`: hardware KVM or the lab): per-sandbox metrics from the
//! guest and the host, the labelled series in `/metrics`, and a command's logs replayed and
//! followed.

mod common;
use common::service::{text, Service};

use std::process::Command;

use base64::Engine;
use serde_json::{json, Value};

fn metrics(service: &Service, id: &str) -> Value {
    service.call("GET", &format!("/sandboxes/{id}/metrics"), None, 200)
}

fn number(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn vmtest_sandbox_metrics_count_the_guests_cpu_memory_disk_and_network_and_label_metrics() {
    let service = Service::start("observe");
    let id = service.create(json!({
        "memory_mib": 256,
        "network": {"mode": "egress", "allow": ["192.0.2.0/24"]},
    }));
    let before = metrics(&service, &id);
    assert_eq!(before["state"], "running", "{before}");
    let guest = &before["guest"];
    assert_eq!(guest["cpus"], 1, "{before}");
    let total = number(&guest["memory_total_bytes"]);
    assert!(total > 150 << 20 && total <= 256 << 20, "{before}");
    assert!(number(&guest["memory_used_bytes"]) > 0, "{before}");
    assert!(number(&guest["processes"]) > 0, "{before}");
    let host = &before["host"];
    assert!(number(&host["rss_bytes"]) > 16 << 20, "{before}");
    assert!(number(&host["cpu_usage_us"]) > 0, "{before}");

    // Work of each kind, then the counters moved by at least that much.
    let work = service.sh(
        &id,
        "dd if=/dev/zero of=/root/metrics.bin bs=1M count=8 conv=fsync 2>/dev/null; \
         timeout 2 sh -c 'while :; do :; done'; \
         python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         [s.sendto(b'x' * 1000, ('192.0.2.1', 9)) for _ in range(20)]\"; echo done",
    );
    assert_eq!(work["stdout"], "done\n", "{work}");
    let after = metrics(&service, &id);
    let grew = |path: &[&str]| {
        let at = |doc: &Value| path.iter().fold(doc.clone(), |v, k| v[*k].clone());
        number(&at(&after)).saturating_sub(number(&at(&before)))
    };
    assert!(
        grew(&["host", "io", "disk", "write_bytes"]) >= 8 << 20,
        "{before}\n{after}"
    );
    assert!(grew(&["host", "io", "disk", "write_ops"]) >= 8, "{after}");
    assert!(grew(&["host", "io", "disk", "flush_ops"]) >= 1, "{after}");
    assert!(
        grew(&["host", "io", "net", "tx_bytes"]) >= 20_000,
        "{before}\n{after}"
    );
    assert!(grew(&["host", "io", "net", "tx_frames"]) >= 20, "{after}");
    assert!(
        grew(&["guest", "cpu_user_ms"]) + grew(&["guest", "cpu_system_ms"]) >= 1000,
        "{before}\n{after}"
    );
    assert!(
        grew(&["host", "cpu_usage_us"]) >= 1_000_000,
        "{before}\n{after}"
    );

    // The labelled series name this sandbox.
    let (status, prometheus) = service.curl("GET", "/metrics", None);
    assert_eq!(status, 200);
    for series in [
        "ember_sandbox_rss_bytes",
        "ember_sandbox_disk_write_bytes_total",
        "ember_sandbox_net_tx_bytes_total",
    ] {
        assert!(
            prometheus.contains(&format!("{series}{{sandbox=\"{id}\",runtime=\"base\"}}")),
            "{series} for {id} missing:\n{prometheus}"
        );
    }
    assert!(
        prometheus.contains("ember_sandbox_series_dropped 0"),
        "{prometheus}"
    );

    // Paused: the guest is not asked, the host side still answers.
    service.call("POST", &format!("/sandboxes/{id}/pause"), None, 200);
    let paused = metrics(&service, &id);
    assert!(paused["guest"].is_null(), "{paused}");
    assert!(
        paused["guest_error"].as_str().unwrap().contains("paused"),
        "{paused}"
    );
    assert!(number(&paused["host"]["rss_bytes"]) > 0, "{paused}");
    service.call("POST", &format!("/sandboxes/{id}/resume"), None, 200);

    let cli = service.ember(&["metrics", &id]);
    assert!(cli.status.success(), "{}", text(&cli.stderr));
    let shown = text(&cli.stdout);
    assert!(
        shown.contains("guest: 1 vCPU") && shown.contains("disk:") && shown.contains("net:"),
        "{shown}"
    );
    service.refuse("GET", "/sandboxes/nope/metrics", None, 404, "not_found");
}

/// Reads an NDJSON stream with curl until it ends: its records.
fn ndjson(service: &Service, path: &str) -> Vec<Value> {
    let out = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "120", "--unix-socket"])
        .arg(&service.socket)
        .arg(format!("http://ember{path}"))
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn vmtest_command_logs_replay_a_finished_command_and_follow_a_running_one_in_order() {
    let service = Service::start("logs");
    let id = service.create(json!({}));
    let script = "echo one; echo two >&2; sleep 2; printf '\\377\\n'; echo three; exit 4";
    let started = service.call(
        "POST",
        &format!("/sandboxes/{id}/exec"),
        Some(json!({"cmd": "sh", "args": ["-c", script], "detach": true})),
        202,
    );
    let cid = started["cmd_id"].as_str().unwrap();
    // Followed while it runs: the records come in the order written, the exit last.
    let logs_path = format!("/sandboxes/{id}/commands/{cid}/logs");
    let followed = ndjson(&service, &logs_path);
    let kinds: Vec<&str> = followed
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"started"), "{followed:?}");
    assert_eq!(kinds.last(), Some(&"exit"), "{followed:?}");
    assert_eq!(followed.last().unwrap()["exit_code"], 4);
    let bytes = |r: &Value| match (r["data"].as_str(), r["data_base64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        (None, None) => Vec::new(),
    };
    let stream = |name: &str| -> Vec<u8> {
        followed
            .iter()
            .filter(|r| r["type"] == name)
            .flat_map(bytes)
            .collect()
    };
    assert_eq!(stream("stdout"), b"one\n\xff\nthree\n", "{followed:?}");
    assert_eq!(stream("stderr"), b"two\n", "{followed:?}");
    // (Order across the two streams is the order the agent read its two pipes in: not the
    // order the command wrote, so not asserted.)
    // Replayed once finished: the same records in the same order.
    let replayed = ndjson(&service, &logs_path);
    assert_eq!(replayed, followed);
    // The registry lists it finished.
    let list = service.call("GET", &format!("/sandboxes/{id}/commands"), None, 200);
    let listed = list["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cmd_id"] == cid)
        .unwrap()
        .clone();
    assert_eq!(listed["status"], "finished", "{list}");
    service.refuse(
        "GET",
        &format!("/sandboxes/{id}/commands/nope/logs"),
        None,
        404,
        "not_found",
    );
}
