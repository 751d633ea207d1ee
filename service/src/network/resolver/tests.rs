use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::Query;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, Record};

use super::*;

fn policy(allow: Option<&[&str]>, deny: &[&str]) -> NetworkPolicy {
    let parse = |list: &[&str]| list.iter().map(|r| r.parse().unwrap()).collect();
    NetworkPolicy {
        allow: allow.map(parse),
        deny: parse(deny),
    }
}

#[test]
fn names_resolve_when_allowed_and_not_denied() {
    let open = policy(None, &["blocked.example.com"]);
    assert!(name_allowed(&open, "api.example.org"));
    assert!(!name_allowed(&open, "blocked.example.com"));
    let listed = policy(
        Some(&["api.example.org", "*.svc.example.com", "192.0.2.0/24"]),
        &["secret.svc.example.com"],
    );
    for name in [
        "api.example.org",
        "a.svc.example.com",
        "a.b.svc.example.com",
    ] {
        assert!(name_allowed(&listed, name), "{name}");
    }
    for name in [
        "svc.example.com",
        "secret.svc.example.com",
        "other.example.org",
        "api.example.org.evil.net",
    ] {
        assert!(!name_allowed(&listed, name), "{name}");
    }
    // An allow-list of networks only resolves no name.
    assert!(!name_allowed(
        &policy(Some(&["192.0.2.0/24"]), &[]),
        "api.example.org"
    ));
}

#[test]
fn answers_give_public_or_allowed_addresses_only() {
    let open = policy(None, &["198.51.100.66"]);
    let address = |text: &str| text.parse::<Ipv4Addr>().unwrap();
    assert!(address_allowed(&open, address("198.51.100.1")));
    assert!(address_allowed(&open, address("8.8.8.8")));
    for rebound in [
        "127.0.0.1",
        "169.254.169.254",
        "10.200.0.1",
        "10.0.0.5",
        "192.168.1.1",
        "172.16.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "198.51.100.66",
    ] {
        assert!(!address_allowed(&open, address(rebound)), "{rebound}");
    }
    let private = policy(Some(&["*.corp.example.com", "10.99.0.0/24"]), &[]);
    assert!(address_allowed(&private, address("10.99.0.7")));
    assert!(!address_allowed(&private, address("10.98.0.7")));
}

/// A name server on loopback that answers every A question with `records` and counts the
/// questions it got.
struct FakeUpstream {
    address: SocketAddr,
    asked: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_upstream(records: Vec<(RData, u32)>) -> FakeUpstream {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let task = tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let (len, peer) = socket.recv_from(&mut buffer).await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let question = Message::from_vec(&buffer[..len]).unwrap();
            let mut reply = Message::response(question.metadata.id, OpCode::Query);
            reply.add_queries(question.queries.iter().cloned());
            // As a real server does: EDNS answered with EDNS.
            if let Some(edns) = &question.edns {
                reply.set_edns(edns.clone());
            }
            let name = question.queries[0].name.clone();
            for (data, ttl) in &records {
                reply.add_answer(Record::from_rdata(name.clone(), *ttl, data.clone()));
            }
            socket
                .send_to(&reply.to_vec().unwrap(), peer)
                .await
                .unwrap();
        }
    });
    FakeUpstream {
        address,
        asked,
        task,
    }
}

fn shared(policy: NetworkPolicy, upstreams: Vec<SocketAddr>) -> Shared {
    Shared {
        id: "sb-test".into(),
        upstreams,
        state: tokio::sync::Mutex::new(State::new(policy)),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        counters: Arc::default(),
    }
}

fn question(name: &str, kind: RecordType) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 0x1234;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    message.to_vec().unwrap()
}

async fn ask(resolver: &Shared, name: &str, kind: RecordType) -> Message {
    let reply = resolver
        .answer(&question(name, kind), Transport::Udp)
        .await
        .expect("an answer");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

fn addresses(reply: &Message) -> Vec<(Ipv4Addr, u32)> {
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn rebound_addresses_are_stripped_and_ttls_bounded() {
    let upstream = fake_upstream(vec![
        (RData::A(A("198.51.100.1".parse().unwrap())), 0),
        (RData::A(A("203.0.113.1".parse().unwrap())), 10_000_000),
        (RData::A(A("169.254.169.254".parse().unwrap())), 60),
        (RData::A(A("127.0.0.1".parse().unwrap())), 60),
        (RData::AAAA(AAAA("2001:db8::1".parse().unwrap())), 60),
    ])
    .await;
    let resolver = shared(policy(None, &[]), vec![upstream.address]);
    let reply = ask(&resolver, "api.example.org", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        addresses(&reply),
        vec![
            ("198.51.100.1".parse().unwrap(), MIN_TTL.as_secs() as u32),
            ("203.0.113.1".parse().unwrap(), MAX_TTL.as_secs() as u32),
        ]
    );
    assert_eq!(reply.answers.len(), 2, "no AAAA record: {reply:?}");
    // The question had no OPT record: neither has the answer.
    assert!(reply.edns.is_none(), "{reply:?}");
    // An open policy holds no name set open (public addresses are reachable anyway).
    assert!(resolver
        .state
        .lock()
        .await
        .wanted(Instant::now())
        .is_empty());
}

#[tokio::test]
async fn denied_names_never_reach_the_upstream_and_aaaa_is_answered_empty() {
    let upstream = fake_upstream(vec![(RData::A(A("198.51.100.1".parse().unwrap())), 60)]).await;
    let resolver = shared(
        policy(Some(&["*.example.org"]), &["secret.example.org"]),
        vec![upstream.address],
    );
    for name in ["secret.example.org", "example.org", "api.example.net"] {
        let reply = ask(&resolver, name, RecordType::A).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(reply.answers.is_empty());
    }
    let reply = ask(&resolver, "api.example.org", RecordType::AAAA).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty());
    assert_eq!(upstream.asked.load(Ordering::SeqCst), 0);
    let outcomes = resolver.counters.outcomes();
    assert_eq!(
        outcomes,
        [
            ("answered", 1),
            ("refused", 3),
            ("failed", 0),
            ("malformed", 0),
            ("dropped", 0)
        ]
    );
}

#[tokio::test]
async fn bad_questions_get_format_errors_and_a_dead_upstream_servfail() {
    let resolver = shared(policy(None, &[]), Vec::new());
    let reply = resolver
        .answer(&[0xab, 0xcd, 0x01, 0x00, 0xff], Transport::Udp)
        .await
        .unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.metadata.id, 0xabcd);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert!(resolver.answer(&[0x01], Transport::Udp).await.is_none());
    // A response is never answered.
    let mut response = Message::from_vec(&question("a.example.org", RecordType::A)).unwrap();
    response.metadata.message_type = MessageType::Response;
    let bytes = response.to_vec().unwrap();
    assert!(resolver.answer(&bytes, Transport::Udp).await.is_none());
    // Only the FORMERR counts: bytes without an id, and responses, get no answer at all.
    assert_eq!(resolver.counters.malformed.load(Ordering::Relaxed), 1);
    // No upstream answers: SERVFAIL, within the upstream timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = shared(policy(None, &[]), vec![silent.local_addr().unwrap()]);
    let started = Instant::now();
    let reply = ask(&resolver, "api.example.org", RecordType::A).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < UPSTREAM_TIMEOUT * 2);
    assert_eq!(resolver.counters.failed.load(Ordering::Relaxed), 1);
}

#[test]
fn learned_addresses_expire_and_follow_the_policy() {
    let mut state = State::new(policy(Some(&["*.example.org"]), &[]));
    let now = Instant::now();
    let a: Ipv4Addr = "198.51.100.1".parse().unwrap();
    let b: Ipv4Addr = "198.51.100.2".parse().unwrap();
    state.learned.insert(
        "a.example.org".into(),
        [(a, now + Duration::from_secs(60))].into(),
    );
    state.learned.insert(
        "b.example.org".into(),
        [(b, now + Duration::from_secs(1))].into(),
    );
    assert_eq!(state.wanted(now), [a, b].into());
    state.prune(now + Duration::from_secs(2));
    assert_eq!(state.wanted(now + Duration::from_secs(2)), [a].into());
    // A policy that no longer allows the name forgets its addresses.
    state.policy = policy(Some(&["b.example.org"]), &[]);
    state.reach = Reach::of(&state.policy);
    state.prune(now);
    assert!(state.learned.is_empty());
}
