//! The "internet" of the network tests, all on this machine: HTTP servers on documentation
//! (TEST-NET) and private addresses in a network namespace the test makes, a server on the
//! host itself, and a name server on the host's loopback.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use super::service::{text, Service};

const WWW_NS: &str = "etest-www";
const WWW_HOST_LINK: &str = "etw-host";

/// One HTTP server (port `PORT`, every address): `GET` anything answers
/// "served by ADDRESS", the address the client reached it on.
const SERVER: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("served by " + self.connection.getsockname()[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"#;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

/// A namespace (`etest-www`) reached from the host through a veth on 192.0.2.0/30
/// (TEST-NET-1), holding `addresses` with an HTTP server on port 8080 of each, the host
/// routing those addresses there; plus a server on the host itself, on every address (port
/// 8081), which no guest may reach.
pub struct TestServers {
    children: Vec<Child>,
}

impl TestServers {
    pub fn start(addresses: &[&str]) -> TestServers {
        // What an earlier attempt of this test, killed at its timeout, may have left.
        let _ = Command::new("pkill")
            .args(["-f", "BaseHTTPRequestHandler"])
            .status();
        let _ = Command::new("ip").args(["netns", "del", WWW_NS]).output();
        let _ = Command::new("ip")
            .args(["link", "del", WWW_HOST_LINK])
            .output();
        ip(&["netns", "add", WWW_NS]);
        ip(&[
            "link",
            "add",
            WWW_HOST_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "etw-ns",
            "netns",
            WWW_NS,
        ]);
        ip(&["addr", "add", "192.0.2.1/30", "dev", WWW_HOST_LINK]);
        ip(&["link", "set", WWW_HOST_LINK, "up"]);
        ip(&["-n", WWW_NS, "addr", "add", "192.0.2.2/30", "dev", "etw-ns"]);
        ip(&["-n", WWW_NS, "link", "set", "etw-ns", "up"]);
        ip(&["-n", WWW_NS, "link", "set", "lo", "up"]);
        ip(&["-n", WWW_NS, "route", "add", "default", "via", "192.0.2.1"]);
        for address in addresses {
            ip(&[
                "-n",
                WWW_NS,
                "addr",
                "add",
                &format!("{address}/32"),
                "dev",
                "lo",
            ]);
            ip(&["route", "add", &format!("{address}/32"), "via", "192.0.2.2"]);
        }
        let serve = |port: &str, netns: Option<&str>| {
            let mut command = match netns {
                Some(ns) => {
                    let mut command = Command::new("ip");
                    command.args(["netns", "exec", ns, "python3"]);
                    command
                }
                None => Command::new("python3"),
            };
            command
                .args(["-c", SERVER, port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let servers = TestServers {
            children: vec![serve("8080", Some(WWW_NS)), serve("8081", None)],
        };
        // Python importing from the lab's share beside another lab's tests: minutes, not
        // seconds, when the host is busy.
        let up = |address: &str, port: u16| {
            let deadline = Instant::now() + Duration::from_secs(240);
            while std::net::TcpStream::connect((address, port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the server on {address}:{port} did not start"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        for address in addresses {
            up(address, 8080);
        }
        up("127.0.0.1", 8081);
        servers
    }

    /// The host's own IPv4 addresses but loopback (each a way a guest might try to reach it).
    pub fn host_addresses() -> Vec<String> {
        let out = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|cidr| cidr.split('/').next())
            .filter(|a| !a.starts_with("127."))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestServers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespace takes its veth, and the host's routes through it, along.
        let _ = Command::new("ip").args(["netns", "del", WWW_NS]).output();
    }
}

/// GET `path` from `addr` over HTTP/1.0: the whole response.
pub fn http_get_text(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// What the guest got fetching `http://HOST:8080/token` (an address or a name) within
/// `timeout_s`: the body, or `error <kind>`.
pub fn guest_fetch(service: &Service, id: &str, host: &str, timeout_s: u32) -> String {
    let script = format!(
        "python3 -c \"import urllib.request as u, sys\ntry: print(u.urlopen('http://{host}:8080/token', timeout={timeout_s}).read().decode())\nexcept Exception as e: print('error', type(e).__name__, e)\""
    );
    let out = service.sh(id, &script);
    let stdout = out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    if stdout.is_empty() {
        // Nothing printed: say what the command did instead.
        return format!("no output: {out}");
    }
    stdout
}

/// What of sandbox networking is left on the host: namespaces, host-side veths, the table.
pub fn ember_network_leftovers() -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ember-"))
                .collect()
        })
        .unwrap_or_default();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    left.extend(
        text(&links.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with("em") && n.len() == 14),
    );
    let table = Command::new("nft")
        .args(["list", "table", "ip", "ember"])
        .output()
        .unwrap();
    if table.status.success() {
        left.push("nft table ip ember".into());
    }
    left
}

/// A name server on the host's loopback (UDP) answering A questions from `zone` (name →
/// addresses and TTL; other names: NXDOMAIN, other types: no records), counting the
/// questions it gets per name. Stands in for the host's upstream name server.
pub struct TestDns {
    pub address: SocketAddr,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

impl TestDns {
    pub fn start(zone: &[(&str, &[&str], u32)]) -> TestDns {
        let zone: HashMap<String, (Vec<Ipv4Addr>, u32)> = zone
            .iter()
            .map(|(name, addresses, ttl)| {
                let addresses = addresses.iter().map(|a| a.parse().unwrap()).collect();
                (name.to_string(), (addresses, *ttl))
            })
            .collect();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(HashMap::new()));
        let counts = asked.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok((len, peer)) = socket.recv_from(&mut buffer) {
                let Ok(question) = Message::from_vec(&buffer[..len]) else {
                    continue;
                };
                if let Some(reply) = answer(&zone, &question, &counts) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        TestDns { address, asked }
    }

    /// How many questions for `name` it got.
    pub fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

fn answer(
    zone: &HashMap<String, (Vec<Ipv4Addr>, u32)>,
    question: &Message,
    counts: &Mutex<HashMap<String, usize>>,
) -> Option<Vec<u8>> {
    if question.metadata.message_type != MessageType::Query {
        return None;
    }
    let query = question.queries.first()?;
    let name = query.name.to_ascii().trim_end_matches('.').to_lowercase();
    *counts.lock().unwrap().entry(name.clone()).or_default() += 1;
    let mut reply = Message::response(question.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = question.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(question.queries.iter().cloned());
    match zone.get(&name) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some((addresses, ttl)) if query.query_type == RecordType::A => {
            for address in addresses {
                reply.add_answer(Record::from_rdata(
                    query.name.clone(),
                    *ttl,
                    RData::A(A(*address)),
                ));
            }
        }
        Some(_) => {}
    }
    reply.to_vec().ok()
}
