//! A sandbox's own name server, run by the service on the host side of the sandbox's TAP
//! (172.16.0.1:53, UDP and TCP, bound inside the sandbox's namespace): the only name server
//! the guest can reach (its rules drop name-server traffic to anywhere else).
//!
//! It answers only names its policy allows (others get NXDOMAIN and never leave the host),
//! asks the host's name servers for them, and returns only IPv4 addresses the guest may reach:
//! public ones, or ones in an allowed network, never a denied one. So an allowed name that
//! resolves to a private, link-local or loopback address (DNS rebinding) opens nothing. When
//! the allow-list names domains, the addresses it returns go into the sandbox's name sets
//! ([`super::rules`]) before the guest has the answer, and leave them when their TTL (bounded
//! to [`MIN_TTL`]..[`MAX_TTL`], and the answer's TTL says the same) has passed. AAAA questions
//! are answered empty: the guest's network is IPv4 only.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_client::types::{EgressRule, NetworkPolicy};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::rules::Reach;
use super::{NetworkError, LINKS, NON_PUBLIC, TAP_ADDRESS};

/// The shortest time an address stays reachable after its answer (a guest connects right
/// after it resolves; an upstream TTL of 0 would otherwise close the door first).
pub const MIN_TTL: Duration = Duration::from_secs(5);
/// The longest.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long one upstream name server gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Questions one sandbox has in flight at once; more are dropped (UDP) or wait (TCP).
const MAX_IN_FLIGHT: usize = 64;
/// TCP connections one sandbox may hold to its name server.
const MAX_TCP_CONNECTIONS: usize = 8;
/// How long a TCP connection may sit without a question.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Addresses one sandbox's names may hold open at once; an answer past it is SERVFAIL.
pub const MAX_LEARNED: usize = 4096;
/// The largest UDP answer, whatever the guest advertises.
const MAX_UDP_PAYLOAD: u16 = 4096;
/// How often expired addresses are taken out of the name sets.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// What failed starting a sandbox's name server.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("entering the network namespace {netns}: {source}")]
    Namespace {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the name server on {address} ({transport}): {source}")]
    Bind {
        address: SocketAddr,
        transport: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Enter(NetworkError),
    #[error("the thread binding the name server ended without an answer")]
    Thread,
    #[error("setting the sandbox's rules: {0}")]
    Rules(#[source] NetworkError),
}

/// A running name server; dropping it stops it.
pub struct Resolver {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    id: String,
    upstreams: Vec<SocketAddr>,
    state: tokio::sync::Mutex<State>,
    in_flight: Arc<Semaphore>,
    counters: Arc<QuestionCounters>,
}

/// What the service's name servers did with the questions guests asked (all sandboxes).
#[derive(Default)]
pub struct QuestionCounters {
    /// Answered from an upstream (addresses the guest may not reach stripped), or empty for
    /// AAAA.
    pub answered: AtomicU64,
    /// NXDOMAIN: a name the policy does not allow (never sent upstream).
    pub refused: AtomicU64,
    /// SERVFAIL: no upstream answered, or the sandbox's names hold too many addresses.
    pub failed: AtomicU64,
    /// FORMERR or NOTIMP: bytes that are no question, or one this server does not answer.
    pub malformed: AtomicU64,
    /// UDP questions dropped while the sandbox had as many in flight as it may.
    pub dropped: AtomicU64,
}

impl QuestionCounters {
    /// `(outcome label, count)` for each counter.
    pub fn outcomes(&self) -> [(&'static str, u64); 5] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("answered", load(&self.answered)),
            ("refused", load(&self.refused)),
            ("failed", load(&self.failed)),
            ("malformed", load(&self.malformed)),
            ("dropped", load(&self.dropped)),
        ]
    }

    fn count(&self, code: ResponseCode) {
        let counter = match code {
            ResponseCode::NoError => &self.answered,
            ResponseCode::NXDomain => &self.refused,
            ResponseCode::ServFail => &self.failed,
            _ => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The policy, what its names resolved to, and what of that is in the name sets now.
struct State {
    policy: NetworkPolicy,
    reach: Reach,
    /// Per name: its addresses and until when each is reachable.
    learned: HashMap<String, HashMap<Ipv4Addr, Instant>>,
    /// What the name sets hold (kept equal to them).
    applied: BTreeSet<Ipv4Addr>,
}

impl State {
    fn new(policy: NetworkPolicy) -> State {
        State {
            reach: Reach::of(&policy),
            policy,
            learned: HashMap::new(),
            applied: BTreeSet::new(),
        }
    }

    /// The addresses the name sets should hold now.
    fn wanted(&self, now: Instant) -> BTreeSet<Ipv4Addr> {
        if !self.reach.names {
            return BTreeSet::new();
        }
        self.learned
            .values()
            .flat_map(|addresses| addresses.iter())
            .filter(|(_, until)| **until > now)
            .map(|(address, _)| *address)
            .collect()
    }

    fn learned_count(&self) -> usize {
        self.learned.values().map(HashMap::len).sum()
    }

    /// Forgets expired addresses, and those the policy no longer gives.
    fn prune(&mut self, now: Instant) {
        let policy = self.policy.clone();
        self.learned.retain(|name, addresses| {
            addresses.retain(|address, until| *until > now && address_allowed(&policy, *address));
            !addresses.is_empty() && name_allowed(&policy, name)
        });
    }

    /// Brings the name sets to [`State::wanted`].
    async fn sync(&mut self, id: &str) -> Result<(), NetworkError> {
        let wanted = self.wanted(Instant::now());
        let added: Vec<Ipv4Addr> = wanted.difference(&self.applied).copied().collect();
        let removed: Vec<Ipv4Addr> = self.applied.difference(&wanted).copied().collect();
        if added.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let id = id.to_string();
        tokio::task::spawn_blocking(move || super::change_names(&id, &added, &removed))
            .await
            .unwrap_or(Err(NetworkError::TapThread))?;
        self.applied = wanted;
        Ok(())
    }
}

/// Whether the policy lets `name` resolve: not denied, and allowed (no allow-list: every
/// name is).
pub fn name_allowed(policy: &NetworkPolicy, name: &str) -> bool {
    let matches = |rule: &EgressRule| matches!(rule, EgressRule::Domain(d) if d.matches(name));
    if policy.deny.iter().any(matches) {
        return false;
    }
    match &policy.allow {
        None => true,
        Some(allow) => allow.iter().any(matches),
    }
}

/// [`NON_PUBLIC`] and the sandboxes' links, parsed once (every answer's addresses are checked).
static NOT_PUBLIC: std::sync::LazyLock<Vec<ember_client::types::Cidr>> =
    std::sync::LazyLock::new(|| {
        let (address, prefix_len) = LINKS;
        NON_PUBLIC
            .iter()
            .map(|net| net.parse().expect("NON_PUBLIC holds networks"))
            .chain([ember_client::types::Cidr {
                address,
                prefix_len,
            }])
            .collect()
    });

/// Whether an answer may give the guest `address`: not denied, and public or in an allowed
/// network.
pub fn address_allowed(policy: &NetworkPolicy, address: Ipv4Addr) -> bool {
    let in_rules = |rules: &[EgressRule]| {
        rules
            .iter()
            .any(|rule| matches!(rule, EgressRule::Network(net) if net.contains(address)))
    };
    if in_rules(&policy.deny) {
        return false;
    }
    let public = NOT_PUBLIC.iter().all(|net| !net.contains(address));
    public || policy.allow.as_deref().is_some_and(in_rules)
}

/// How a question arrived (a UDP answer is bounded by the guest's payload size).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Resolver {
    /// Starts sandbox `id`'s name server with `policy`, asking `upstreams`. `reset`: also
    /// write the sandbox's rules and empty its name sets (a sandbox the service adopted after
    /// a restart; a new one's were just made).
    pub async fn start(
        id: &str,
        policy: NetworkPolicy,
        upstreams: Vec<SocketAddr>,
        reset: bool,
        counters: Arc<QuestionCounters>,
    ) -> Result<Resolver, ResolverError> {
        if reset {
            let (id, reach) = (id.to_string(), Reach::of(&policy));
            tokio::task::spawn_blocking(move || super::apply_policy(&id, &reach, &[]))
                .await
                .unwrap_or(Err(NetworkError::TapThread))
                .map_err(ResolverError::Rules)?;
        }
        let (udp, tcp) = bind_in_namespace(id).await?;
        let shared = Arc::new(Shared {
            id: id.to_string(),
            upstreams,
            state: tokio::sync::Mutex::new(State::new(policy)),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            counters,
        });
        let tasks = vec![
            tokio::spawn(serve_udp(shared.clone(), udp)),
            tokio::spawn(serve_tcp(shared.clone(), tcp)),
            tokio::spawn(expire(shared.clone())),
        ];
        Ok(Resolver { shared, tasks })
    }

    /// Replaces the policy: the sandbox's rules are rewritten and its name sets keep only
    /// addresses of names the new policy still allows, in one transaction each.
    pub async fn set_policy(&self, policy: NetworkPolicy) -> Result<(), NetworkError> {
        let mut state = self.shared.state.lock().await;
        state.reach = Reach::of(&policy);
        state.policy = policy;
        state.prune(Instant::now());
        let names: Vec<Ipv4Addr> = state.wanted(Instant::now()).into_iter().collect();
        let (id, reach, applied) = (self.shared.id.clone(), state.reach.clone(), names.clone());
        tokio::task::spawn_blocking(move || super::apply_policy(&id, &reach, &applied))
            .await
            .unwrap_or(Err(NetworkError::TapThread))?;
        state.applied = names.into_iter().collect();
        Ok(())
    }

    /// The addresses its names hold open now (for tests and diagnostics).
    pub async fn open_addresses(&self) -> Vec<Ipv4Addr> {
        let state = self.shared.state.lock().await;
        state.applied.iter().copied().collect()
    }
}

/// Binds 172.16.0.1:53 (UDP and TCP) inside sandbox `id`'s namespace, from a thread that
/// enters it (a socket stays in the namespace it was made in).
async fn bind_in_namespace(id: &str) -> Result<(UdpSocket, TcpListener), ResolverError> {
    let netns = super::netns_path(id);
    let (bound_tx, bound) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ember-dns-bind".into())
        .spawn(move || {
            let _ = bound_tx.send(bind_in(&netns));
        })
        .map_err(|source| ResolverError::Namespace {
            netns: id.to_string(),
            source,
        })?;
    let (udp, tcp) = bound.await.map_err(|_| ResolverError::Thread)??;
    let address = SocketAddr::from((TAP_ADDRESS, 53));
    let udp = UdpSocket::from_std(udp).map_err(|source| ResolverError::Bind {
        address,
        transport: "udp",
        source,
    })?;
    let tcp = TcpListener::from_std(tcp).map_err(|source| ResolverError::Bind {
        address,
        transport: "tcp",
        source,
    })?;
    Ok((udp, tcp))
}

fn bind_in(
    netns: &std::path::Path,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), ResolverError> {
    super::enter_namespace(netns).map_err(ResolverError::Enter)?;
    let address = SocketAddr::from((TAP_ADDRESS, 53));
    let bind_error = |transport| {
        move |source| ResolverError::Bind {
            address,
            transport,
            source,
        }
    };
    let udp = std::net::UdpSocket::bind(address).map_err(bind_error("udp"))?;
    udp.set_nonblocking(true).map_err(bind_error("udp"))?;
    let tcp = std::net::TcpListener::bind(address).map_err(bind_error("tcp"))?;
    tcp.set_nonblocking(true).map_err(bind_error("tcp"))?;
    Ok((udp, tcp))
}

async fn serve_udp(shared: Arc<Shared>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut buffer = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(e) => {
                log::warn!("sandbox {}: its name server (udp): {e}", shared.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A guest asking faster than upstreams answer loses questions, as on any network.
        let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let question = buffer[..len].to_vec();
        let (shared, socket) = (shared.clone(), socket.clone());
        tokio::spawn(async move {
            if let Some(reply) = shared.answer(&question, Transport::Udp).await {
                let _ = socket.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("sandbox {}: its name server (tcp): {e}", shared.id);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_tcp_connection(&shared, stream).await;
            drop(permit);
        });
    }
}

/// Questions on one TCP connection, each a 2-byte length and a message, until it is idle.
async fn serve_tcp_connection(shared: &Shared, mut stream: TcpStream) {
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        let mut question = vec![0u8; usize::from(len)];
        let read = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut question)).await;
        if !matches!(read, Ok(Ok(_))) {
            return;
        }
        let Ok(permit) = shared.in_flight.acquire().await else {
            return;
        };
        let reply = shared.answer(&question, Transport::Tcp).await;
        drop(permit);
        let Some(reply) = reply else { return };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// Takes addresses out of the name sets once their TTL has passed.
async fn expire(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut state = shared.state.lock().await;
        state.prune(Instant::now());
        if let Err(e) = state.sync(&shared.id).await {
            log::warn!("sandbox {}: expiring resolved addresses: {e}", shared.id);
        }
    }
}

/// `name` as policies match it: lowercase, no trailing dot.
fn plain_name(name: &hickory_proto::rr::Name) -> String {
    let text = name.to_lowercase().to_ascii();
    text.strip_suffix('.').unwrap_or(&text).to_string()
}

/// An answer with `code` and no records, to `request`.
fn empty_reply(request: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    reply.add_queries(request.queries.iter().cloned());
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply
}

impl Shared {
    /// The bytes answering `question` (none: not a question, or not even a header).
    async fn answer(&self, question: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let request = match Message::from_vec(question) {
            Ok(request) => request,
            Err(_) => {
                let reply = format_error(question);
                if reply.is_some() {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                }
                return reply;
            }
        };
        // Answering answers would let two name servers talk to each other forever.
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let reply = self.reply(&request).await;
        self.counters.count(reply.metadata.response_code);
        let bytes = reply.to_vec().ok()?;
        let limit = usize::from(request.max_payload().min(MAX_UDP_PAYLOAD));
        if transport == Transport::Udp && bytes.len() > limit {
            return reply.truncate().to_vec().ok();
        }
        Some(bytes)
    }

    async fn reply(&self, request: &Message) -> Message {
        if request.metadata.op_code != OpCode::Query {
            return empty_reply(request, ResponseCode::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return empty_reply(request, ResponseCode::FormErr);
        };
        if query.query_class != DNSClass::IN {
            return empty_reply(request, ResponseCode::NotImp);
        }
        let name = plain_name(&query.name);
        let allowed = name_allowed(&self.state.lock().await.policy, &name);
        if !allowed {
            log::debug!("sandbox {}: {name} is not allowed", self.id);
            return empty_reply(request, ResponseCode::NXDomain);
        }
        if query.query_type == RecordType::AAAA {
            return empty_reply(request, ResponseCode::NoError);
        }
        let mut reply = match self.ask_upstreams(query).await {
            Some(reply) => reply,
            None => return empty_reply(request, ResponseCode::ServFail),
        };
        reply.metadata.id = request.metadata.id;
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        // The upstream answered this resolver's EDNS; the guest gets an OPT record only if it
        // sent one (RFC 6891), with this resolver's payload size.
        reply.edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP_PAYLOAD);
            edns
        });
        match self.keep_reachable(&name, &mut reply).await {
            Ok(()) => reply,
            Err(code) => empty_reply(request, code),
        }
    }

    /// Strips the addresses the guest may not have, bounds TTLs, and opens the addresses
    /// kept (before the guest sees them).
    async fn keep_reachable(&self, name: &str, reply: &mut Message) -> Result<(), ResponseCode> {
        let mut state = self.state.lock().await;
        // The policy may have changed while upstreams were asked.
        if !name_allowed(&state.policy, name) {
            return Err(ResponseCode::NXDomain);
        }
        let now = Instant::now();
        let mut opened = Vec::new();
        let policy = &state.policy;
        reply.answers.retain_mut(|record| match &record.data {
            RData::A(a) if address_allowed(policy, a.0) => {
                record.ttl = record
                    .ttl
                    .clamp(MIN_TTL.as_secs() as u32, MAX_TTL.as_secs() as u32);
                opened.push((a.0, now + Duration::from_secs(u64::from(record.ttl))));
                true
            }
            RData::A(_) | RData::AAAA(_) => false,
            _ => {
                record.ttl = record.ttl.min(MAX_TTL.as_secs() as u32);
                true
            }
        });
        reply
            .additionals
            .retain(|record| !matches!(record.data, RData::A(_) | RData::AAAA(_)));
        if opened.is_empty() {
            return Ok(());
        }
        if state.learned_count() + opened.len() > MAX_LEARNED {
            state.prune(now);
            if state.learned_count() + opened.len() > MAX_LEARNED {
                log::warn!(
                    "sandbox {}: its names hold {MAX_LEARNED} addresses open; {name} is refused",
                    self.id
                );
                return Err(ResponseCode::ServFail);
            }
        }
        let addresses = state.learned.entry(name.to_string()).or_default();
        for (address, until) in opened {
            let entry = addresses.entry(address).or_insert(until);
            *entry = (*entry).max(until);
        }
        state.sync(&self.id).await.map_err(|e| {
            log::warn!("sandbox {}: opening the addresses of {name}: {e}", self.id);
            ResponseCode::ServFail
        })
    }

    /// The first upstream's valid answer to `query` (UDP, then TCP if it was truncated).
    async fn ask_upstreams(&self, query: &hickory_proto::op::Query) -> Option<Message> {
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        request.set_edns(edns);
        let bytes = request.to_vec().ok()?;
        for upstream in &self.upstreams {
            let valid = |reply: &Message| {
                reply.metadata.id == request.metadata.id
                    && reply.metadata.message_type == MessageType::Response
                    && reply.queries == request.queries
            };
            let answer = match ask_udp(*upstream, &bytes, &valid).await {
                Ok(reply) if reply.metadata.truncation => ask_tcp(*upstream, &bytes).await,
                other => other,
            };
            match answer {
                Ok(reply) if valid(&reply) => return Some(reply),
                Ok(_) => log::debug!("{upstream} answered another question"),
                Err(e) => log::debug!("asking {upstream}: {e}"),
            }
        }
        None
    }
}

/// A FORMERR answer to bytes that do not parse, if they hold at least an id.
fn format_error(question: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*question.first()?, *question.get(1)?]);
    // A response's bytes (QR set) get no answer either.
    if question.get(2).is_some_and(|flags| flags & 0x80 != 0) {
        return None;
    }
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

async fn ask_udp(
    upstream: SocketAddr,
    question: &[u8],
    valid: &(dyn Fn(&Message) -> bool + Sync),
) -> std::io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(question).await?;
    let mut buffer = vec![0u8; usize::from(MAX_UDP_PAYLOAD)];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let len = tokio::time::timeout_at(deadline, socket.recv(&mut buffer))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        // Stray datagrams (a late answer to an earlier question) are skipped.
        if let Ok(reply) = Message::from_vec(&buffer[..len]) {
            if valid(&reply) {
                return Ok(reply);
            }
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, question: &[u8]) -> std::io::Result<Message> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let len = u16::try_from(question.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "question too long")
        })?;
        stream.write_u16(len).await?;
        stream.write_all(question).await?;
        let len = stream.read_u16().await?;
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await?;
        Message::from_vec(&reply)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

#[cfg(test)]
mod tests;
