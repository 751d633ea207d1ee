//! Sandbox networks end to end (`vmtest_*`: hardware KVM or the lab): egress through NAT to
//! servers the tests start on this machine, allow- and deny-lists by network and by name,
//! the sandbox's own name server, exposed ports, clones, and nothing left behind.

mod common;
use common::service::{steps, text, Service};
use common::www::{ember_network_leftovers, guest_fetch, http_get_text, TestDns, TestServers};

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

#[test]
fn vmtest_sandbox_networks_egress_allow_lists_none_exposed_ports_and_four_clones_leave_nothing_behind(
) {
    // Two stand-ins for public servers (documentation ranges), one on a private range, one
    // where cloud metadata services answer.
    let forwarding_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let servers = TestServers::start(&[
        "198.51.100.1",
        "203.0.113.1",
        "10.99.0.1",
        "169.254.169.254",
    ]);
    // Sandboxes here live 30 minutes: four restores at once in the lab can take longer than
    // the default 300 s to come up and fetch, and a sandbox stopped at its timeout would look
    // like a network failure. A warm pool of one: the egress sandbox below gets its TAP
    // handed to a pooled VMM, the four clones mostly get VMMs started for them.
    let service = Service::start_with("net", &["--warm-pool", "1"]);
    // None (the default): no interface but lo, and the fetch fails at once; an exposed port
    // still reaches a server in the guest (through vsock).
    let none = service.create(json!({"ports": [8000], "timeout_s": 1800}));
    let shown = service.sandbox(&none);
    assert_eq!(shown["network"]["mode"], "none", "{shown}");
    assert_eq!(shown["ports"][0]["guest_port"], 8000, "{shown}");
    let host: std::net::SocketAddr = shown["ports"][0]["host"].as_str().unwrap().parse().unwrap();
    assert!(host.ip().is_loopback(), "{shown}");
    let out = service.sh(
        &none,
        "mkdir -p /srv && echo served-from-the-guest > /srv/token && cd /srv && \
         setsid python3 -m http.server 8000 > /dev/null 2>&1 < /dev/null & \
         ok=down; for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))' 2>/dev/null && { ok=up; break; }; sleep 0.2; done; echo $ok",
    );
    assert_eq!(out["stdout"], "up\n", "{out}");
    let page = http_get_text(host, "/token").unwrap_or_else(|e| {
        panic!(
            "GET through the exposed port: {e}; the service's log:\n{}",
            service.log()
        )
    });
    assert!(
        page.starts_with("HTTP/1.0 200") && page.ends_with("served-from-the-guest\n"),
        "{page}"
    );
    let out = service.sh(&none, "ls /sys/class/net");
    assert_eq!(out["stdout"], "lo\n", "{out}");
    let started = Instant::now();
    let failed = guest_fetch(&service, &none, "198.51.100.1", 60);
    assert!(failed.starts_with("error"), "{failed}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a sandbox without network waited for it ({:?})",
        started.elapsed()
    );
    // Egress: both servers; the sandbox shows its mode and address.
    service.wait_pool_idle(1);
    let open = service.create(json!({"network": {"mode": "egress"}, "timeout_s": 1800}));
    let described = service.sandbox(&open);
    assert!(
        steps(&described).contains(&"vmm_assigned".to_string()),
        "a pooled VMM runs the egress sandbox: {described}"
    );
    let shown = described["network"].clone();
    assert_eq!(shown["mode"], "egress", "{shown}");
    assert_eq!(shown["guest_address"], "172.16.0.2", "{shown}");
    // Its name server is its own resolver, on the TAP's host side.
    let resolv = service.sh(&open, "cat /etc/resolv.conf");
    assert!(
        resolv["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("nameserver 172.16.0.1"),
        "{resolv}"
    );
    for address in ["198.51.100.1", "203.0.113.1"] {
        assert_eq!(
            guest_fetch(&service, &open, address, 60),
            format!("served by {address}")
        );
    }
    // Without an allow-list: no private range, no link-local (metadata) address, and not the
    // host, by any of its addresses (its server listens on all of them).
    for address in ["10.99.0.1", "169.254.169.254"] {
        let refused = guest_fetch(&service, &open, address, 5);
        assert!(refused.starts_with("error"), "{address}: {refused}");
    }
    let host_addresses = TestServers::host_addresses();
    assert!(!host_addresses.is_empty());
    for address in &host_addresses {
        let script = format!(
            "python3 -c \"import urllib.request as u\ntry: print(u.urlopen('http://{address}:8081/token', timeout=5).read().decode())\nexcept Exception as e: print('error', type(e).__name__)\""
        );
        let out = service.sh(&open, &script);
        assert!(
            out["stdout"]
                .as_str()
                .unwrap_or_default()
                .starts_with("error"),
            "the guest reached the host at {address}: {out}"
        );
    }
    // An allow-list entry for a private range opens exactly that range.
    let listed = service.create(
        json!({"network": {"mode": "egress", "allow": ["10.99.0.0/24"]}, "timeout_s": 1800}),
    );
    assert_eq!(
        guest_fetch(&service, &listed, "10.99.0.1", 60),
        "served by 10.99.0.1"
    );
    for address in ["198.51.100.1", "169.254.169.254"] {
        let refused = guest_fetch(&service, &listed, address, 5);
        assert!(refused.starts_with("error"), "{address}: {refused}");
    }
    // Bad network requests are refused.
    for body in [
        r#"{"network": {"mode": "bridge"}}"#,
        r#"{"network": {"mode": "egress", "allow": ["10.0.0.0/33"]}}"#,
        r#"{"network": {"mode": "none", "allow": []}}"#,
    ] {
        service.refuse("POST", "/sandboxes", Some(body), 400, "invalid_json");
    }
    // Four clones of a snapshot of the egress sandbox, each in a namespace of its own with the
    // same guest address, reach the server at the same time.
    service.call(
        "POST",
        &format!("/sandboxes/{open}/snapshots"),
        Some(json!({"name": "net-base"})),
        201,
    );
    let forked = service.call(
        "POST",
        "/snapshots/net-base/fork",
        Some(json!({"count": 4, "network": {"mode": "egress"}, "timeout_s": 1800})),
        201,
    );
    let clones: Vec<String> = forked["sandboxes"]
        .as_array()
        .unwrap_or_else(|| panic!("{forked}"))
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(clones.len(), 4, "{forked}");
    let fetched: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = clones
            .iter()
            .map(|id| {
                let service = &service;
                scope.spawn(move || guest_fetch(service, id, "198.51.100.1", 120))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (id, got) in clones.iter().zip(&fetched) {
        // On failure, the clone's record (a VMM that died says why, e.g. a guest triple
        // fault) and the service's log.
        assert_eq!(
            got,
            "served by 198.51.100.1",
            "clone {id}: {}\nthe service's log:\n{}",
            service.sandbox(id),
            service.log()
        );
        assert_eq!(
            service.sandbox(id)["network"]["guest_address"],
            "172.16.0.2"
        );
    }
    // A snapshot of a sandbox without network cannot come back with one.
    service.call(
        "POST",
        &format!("/sandboxes/{none}/snapshots"),
        Some(json!({"name": "no-net"})),
        201,
    );
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"snapshot": "no-net", "network": {"mode": "egress"}}"#),
        409,
        "conflict",
    );
    // Deleting every sandbox removes every namespace, veth and rule ember made.
    for id in clones.iter().chain([&open, &listed, &none]) {
        service.call("DELETE", &format!("/sandboxes/{id}"), None, 204);
    }
    assert_eq!(ember_network_leftovers(), Vec::<String>::new());
    // IPv4 forwarding is as the host had it before the first sandbox network.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        forwarding_before
    );
    drop(servers);
}

/// The addresses in a name set: `nft list set` of `set` (`ip sandbox names` in sandbox `id`'s
/// namespace, or the host's per-link set).
fn name_set(id: &str, host_side: bool) -> String {
    let veth: String = {
        let tail: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
        format!("em{}", &tail[tail.len().saturating_sub(12)..])
    };
    let out = if host_side {
        Command::new("nft")
            .args(["list", "set", "ip", "ember", &format!("{veth}_names")])
            .output()
            .unwrap()
    } else {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("ember-{id}"),
                "nft",
                "list",
                "set",
                "ip",
                "sandbox",
                "names",
            ])
            .output()
            .unwrap()
    };
    assert!(out.status.success(), "nft list set: {}", text(&out.stderr));
    text(&out.stdout)
}

/// What `getent hosts NAME` prints in the guest, and its exit code.
fn guest_lookup(service: &Service, id: &str, name: &str) -> String {
    let out = service.sh(id, &format!("getent ahostsv4 {name} | head -1; echo rc=$?"));
    let stdout = out["stdout"].as_str().unwrap_or_default();
    // `getent | head` reports head's status: the lookup's shows as an empty first line.
    match stdout.lines().next() {
        Some(line) if line.starts_with("rc=") => "unresolved".to_string(),
        Some(line) => line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => format!("no output: {out}"),
    }
}

/// One A question for `name` over TCP to the guest's name server, from the guest: `ID RCODE
/// ANSWERS LAST-ADDRESS`.
fn guest_tcp_question(service: &Service, id: &str, name: &str) -> String {
    let script = format!(
        r#"python3 -c '
import socket, struct
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in "{name}".split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection(("172.16.0.1", 53), timeout=30)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print(struct.unpack(">H", r[:2])[0], r[3] & 15, struct.unpack(">H", r[6:8])[0], ".".join(str(b) for b in r[-4:]))
'"#
    );
    service.sh(id, &script)["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn vmtest_egress_by_name_resolves_only_allowed_names_opens_only_their_addresses_for_their_ttl_and_changes_live(
) {
    let servers = TestServers::start(&[
        "198.51.100.1",
        "198.51.100.2",
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.3",
        "10.99.0.1",
        "169.254.169.254",
    ]);
    let dns = TestDns::start(&[
        ("api.example.org", &["198.51.100.1"], 300),
        ("other.example.org", &["198.51.100.2"], 300),
        ("a.svc.example.com", &["203.0.113.1"], 300),
        // A TTL of 1 s: the resolver holds the address open for its minimum, 5 s.
        ("short.svc.example.com", &["203.0.113.2"], 1),
        ("secret.svc.example.com", &["203.0.113.3"], 300),
        // DNS rebinding: an allowed name pointing inside.
        (
            "rebind.svc.example.com",
            &["169.254.169.254", "10.99.0.1"],
            300,
        ),
    ]);
    let upstream = dns.address.to_string();
    let mut service = Service::start_with("egress-names", &["--dns-upstream", &upstream]);
    let id = service.create(json!({
        "network": {"mode": "egress",
                    "allow": ["api.example.org", "*.svc.example.com"],
                    "deny": ["secret.svc.example.com"]},
        "timeout_s": 1800,
    }));
    let shown = service.sandbox(&id)["network"].clone();
    assert_eq!(
        shown["allow"],
        json!(["api.example.org", "*.svc.example.com"]),
        "{shown}"
    );
    assert_eq!(shown["deny"], json!(["secret.svc.example.com"]), "{shown}");

    // An address no allowed name gave is closed, even the neighbour of one that will be.
    for address in ["198.51.100.1", "198.51.100.2", "203.0.113.1"] {
        let refused = guest_fetch(&service, &id, address, 5);
        assert!(refused.starts_with("error"), "{address}: {refused}");
    }
    // An allowed name resolves, opens its address (in both name sets) and serves.
    assert_eq!(
        guest_fetch(&service, &id, "api.example.org", 60),
        "served by 198.51.100.1"
    );
    assert_eq!(
        guest_fetch(&service, &id, "a.svc.example.com", 60),
        "served by 203.0.113.1"
    );
    for host_side in [false, true] {
        let set = name_set(&id, host_side);
        assert!(
            set.contains("198.51.100.1") && set.contains("203.0.113.1"),
            "{set}"
        );
        assert!(!set.contains("198.51.100.2"), "{set}");
    }
    // ... and only its address: the neighbour stays closed.
    let refused = guest_fetch(&service, &id, "198.51.100.2", 5);
    assert!(refused.starts_with("error"), "{refused}");
    // Names outside the allow-list, or denied under a wildcard, do not resolve, and their
    // questions never leave the host (and are counted as refused).
    let refused_before = service.metric(r#"ember_dns_questions_total{outcome="refused"}"#);
    for name in [
        "other.example.org",
        "secret.svc.example.com",
        "svc.example.com",
    ] {
        assert_eq!(guest_lookup(&service, &id, name), "unresolved", "{name}");
        assert_eq!(dns.asked(name), 0, "{name} reached the upstream");
    }
    assert!(
        service.metric(r#"ember_dns_questions_total{outcome="refused"}"#) >= refused_before + 3
    );
    assert!(service.metric(r#"ember_dns_questions_total{outcome="answered"}"#) > 0);
    // An allowed name pointing at a link-local or private address resolves to nothing.
    assert_eq!(
        guest_lookup(&service, &id, "rebind.svc.example.com"),
        "unresolved"
    );
    assert!(dns.asked("rebind.svc.example.com") > 0);
    for address in ["169.254.169.254", "10.99.0.1"] {
        let refused = guest_fetch(&service, &id, address, 5);
        assert!(refused.starts_with("error"), "{address}: {refused}");
    }
    // Over TCP too (id echoed, NOERROR, one answer, the address).
    assert_eq!(
        guest_tcp_question(&service, &id, "api.example.org"),
        "16962 0 1 198.51.100.1"
    );
    // An address is open for its TTL (at least the minimum), then closed again.
    assert_eq!(
        guest_lookup(&service, &id, "short.svc.example.com"),
        "203.0.113.2"
    );
    let resolved = Instant::now();
    assert!(name_set(&id, false).contains("203.0.113.2"));
    while name_set(&id, false).contains("203.0.113.2") {
        assert!(
            resolved.elapsed() < Duration::from_secs(60),
            "203.0.113.2 is still open {:?} after a 1 s TTL",
            resolved.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        resolved.elapsed() >= Duration::from_secs(4),
        "closed after {:?}, before the minimum TTL",
        resolved.elapsed()
    );
    assert!(!name_set(&id, true).contains("203.0.113.2"));
    let refused = guest_fetch(&service, &id, "203.0.113.2", 5);
    assert!(refused.starts_with("error"), "{refused}");

    // A live change: other names and a private network; what the old names opened closes.
    let changed = service.call(
        "PATCH",
        &format!("/sandboxes/{id}/network"),
        Some(json!({"allow": ["other.example.org", "10.99.0.0/24"]})),
        200,
    );
    assert_eq!(
        changed["allow"],
        json!(["other.example.org", "10.99.0.0/24"])
    );
    assert_eq!(service.sandbox(&id)["network"]["allow"], changed["allow"]);
    let refused = guest_fetch(&service, &id, "198.51.100.1", 5);
    assert!(refused.starts_with("error"), "{refused}");
    assert!(!name_set(&id, false).contains("198.51.100.1"));
    assert_eq!(guest_lookup(&service, &id, "api.example.org"), "unresolved");
    assert_eq!(
        guest_fetch(&service, &id, "other.example.org", 60),
        "served by 198.51.100.2"
    );
    assert_eq!(
        guest_fetch(&service, &id, "10.99.0.1", 60),
        "served by 10.99.0.1"
    );
    // The CLI: no allow-list (public addresses) but a denied name.
    let out = service.ember(&["network", &id, "--deny", "other.example.org"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{id}: allow any public address; deny other.example.org")
    );
    assert_eq!(
        guest_lookup(&service, &id, "other.example.org"),
        "unresolved"
    );
    assert_eq!(
        guest_fetch(&service, &id, "198.51.100.1", 60),
        "served by 198.51.100.1"
    );
    let refused = guest_fetch(&service, &id, "10.99.0.1", 5);
    assert!(refused.starts_with("error"), "{refused}");
    // A restarted service adopts the sandbox and starts its name server again, with the
    // policy it last had.
    service.terminate();
    service.launch();
    assert_eq!(
        guest_lookup(&service, &id, "other.example.org"),
        "unresolved"
    );
    assert_eq!(
        guest_lookup(&service, &id, "api.example.org"),
        "198.51.100.1"
    );

    // Bad policies and a sandbox without a network are refused; nothing changes.
    let path = format!("/sandboxes/{id}/network");
    for body in [
        r#"{"allow": ["*.com"]}"#,
        r#"{"allow": ["exa mple.com"]}"#,
        r#"{"allow": ["10.0.0.0/33"]}"#,
        r#"{"deny": ["a.*.example.com"]}"#,
        r#"{"mode": "egress"}"#,
    ] {
        service.refuse("PATCH", &path, Some(body), 400, "invalid_json");
    }
    service.refuse(
        "POST",
        "/sandboxes",
        Some(r#"{"network": {"mode": "egress", "allow": ["*"]}}"#),
        400,
        "invalid_json",
    );
    let none = service.create(json!({"memory_mib": 256}));
    service.refuse(
        "PATCH",
        &format!("/sandboxes/{none}/network"),
        Some(r#"{"allow": ["api.example.org"]}"#),
        409,
        "conflict",
    );
    assert_eq!(
        service.sandbox(&id)["network"]["deny"],
        json!(["other.example.org"])
    );

    for sandbox in [&id, &none] {
        service.call("DELETE", &format!("/sandboxes/{sandbox}"), None, 204);
    }
    assert_eq!(ember_network_leftovers(), Vec::<String>::new());
    drop(servers);
}
