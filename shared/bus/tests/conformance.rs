//! One conformance suite, run against both backends: the in-process bus and
//! a real nats-server (JetStream) started for each test.
use std::time::Duration;

use bytes::Bytes;
use costmesh_bus::{Bus, BusErrorKind, ConsumerSpec, DeliverFrom, Headers, NatsBus, StreamSpec};
use costmesh_testkit::NatsServer;

const WAIT: Duration = Duration::from_secs(5);

/// A bus plus whatever keeps its server alive.
struct Fixture {
    bus: Bus,
    _server: Option<NatsServer>,
}

async fn memory() -> Fixture {
    Fixture { bus: Bus::memory(), _server: None }
}

async fn nats() -> Fixture {
    let server = NatsServer::start_new();
    let bus = costmesh_bus::NatsBus::connect(&server.url(), &Default::default()).await.expect("connect");
    Fixture { bus: Bus::Nats(bus), _server: Some(server) }
}

fn hdrs(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().copied().collect()
}

async fn recv(sub: &mut costmesh_bus::Subscription) -> costmesh_bus::Message {
    tokio::time::timeout(WAIT, sub.next()).await.expect("timed out waiting for a message").expect("subscription ended")
}

/// Asserts nothing arrives within a short window (used only to show absence).
async fn assert_silent(sub: &mut costmesh_bus::Subscription) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        panic!("unexpected message on {}", m.subject);
    }
}

async fn wildcards_and_headers(f: Fixture) {
    let bus = &f.bus;
    let mut star = bus.subscribe("w.telemetry.*.0").await.unwrap();
    let mut tail = bus.subscribe("w.telemetry.>").await.unwrap();
    bus.flush().await.unwrap();
    bus.publish("w.telemetry.n1.0", hdrs(&[("ce-type", "x"), ("traceparent", "00-abc")]), Bytes::from_static(b"one"))
        .await
        .unwrap();
    bus.publish("w.telemetry.n1.1", Headers::new(), Bytes::from_static(b"two")).await.unwrap();
    bus.flush().await.unwrap();
    let m = recv(&mut star).await;
    assert_eq!(m.subject, "w.telemetry.n1.0");
    assert_eq!(m.headers.get("ce-type"), Some("x"));
    assert_eq!(m.headers.get("traceparent"), Some("00-abc"));
    assert_eq!(&m.payload[..], b"one");
    assert_silent(&mut star).await;
    assert_eq!(&recv(&mut tail).await.payload[..], b"one");
    assert_eq!(&recv(&mut tail).await.payload[..], b"two");
}

async fn queue_groups(f: Fixture) {
    let bus = &f.bus;
    let mut a = bus.queue_subscribe("q.work", "workers").await.unwrap();
    let mut b = bus.queue_subscribe("q.work", "workers").await.unwrap();
    let mut watcher = bus.subscribe("q.work").await.unwrap();
    bus.flush().await.unwrap();
    for i in 0..20u8 {
        bus.publish("q.work", Headers::new(), Bytes::from(vec![i])).await.unwrap();
    }
    bus.flush().await.unwrap();
    // The plain subscriber sees all 20; the group members split them.
    for _ in 0..20 {
        recv(&mut watcher).await;
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 20 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(m) = a.next() => got.push(("a", m.payload[0])),
            Some(m) = b.next() => got.push(("b", m.payload[0])),
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    assert_eq!(got.len(), 20, "each message reaches exactly one member");
    let mut values: Vec<u8> = got.iter().map(|(_, v)| *v).collect();
    values.sort();
    assert_eq!(values, (0..20).collect::<Vec<_>>());
    assert_silent(&mut a).await;
    assert_silent(&mut b).await;
}

async fn request_reply(f: Fixture) {
    let bus = f.bus.clone();
    let err = bus.request("rr.nobody", Headers::new(), Bytes::new(), Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(err.kind, BusErrorKind::NoResponders);

    let mut sub = bus.subscribe("rr.echo").await.unwrap();
    bus.flush().await.unwrap();
    let responder = bus.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let mut body = b"echo:".to_vec();
            body.extend_from_slice(&m.payload);
            let h = hdrs(&[("x-seen", m.headers.get("x-in").unwrap_or("-"))]);
            responder.respond(&m, h, Bytes::from(body)).await.unwrap();
        }
    });
    let reply = bus.request("rr.echo", hdrs(&[("x-in", "42")]), Bytes::from_static(b"hi"), WAIT).await.unwrap();
    assert_eq!(&reply.payload[..], b"echo:hi");
    assert_eq!(reply.headers.get("x-seen"), Some("42"));
}

async fn jetstream_dedupe_and_redelivery(f: Fixture) {
    let bus = &f.bus;
    let spec = StreamSpec {
        name: "CONF_EVENTS".into(),
        subjects: vec!["js.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::ZERO,
        max_bytes: 0,
    };
    bus.ensure_stream(&spec).await.unwrap();
    bus.ensure_stream(&spec).await.unwrap(); // idempotent

    let err = bus.publish_durable("nostream.x", Headers::new(), Bytes::new()).await.unwrap_err();
    assert_eq!(err.kind, BusErrorKind::NoStream);

    let first = bus.publish_durable("js.a", hdrs(&[("Nats-Msg-Id", "m1")]), Bytes::from_static(b"1")).await.unwrap();
    let again = bus.publish_durable("js.a", hdrs(&[("Nats-Msg-Id", "m1")]), Bytes::from_static(b"1")).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate, "same Nats-Msg-Id inside the window is a duplicate");
    assert_eq!(again.sequence, first.sequence);
    bus.publish_durable("js.b", hdrs(&[("Nats-Msg-Id", "m2")]), Bytes::from_static(b"2")).await.unwrap();

    let consumer = ConsumerSpec {
        stream: "CONF_EVENTS".into(),
        durable: "conf".into(),
        filter_subjects: vec!["js.>".into()],
        ack_wait: Duration::from_secs(1),
        max_deliver: 5,
        deliver_from: DeliverFrom::All,
    };
    let mut sub = bus.consume(&consumer).await.unwrap();
    let one = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert_eq!(&one.message.payload[..], b"1");
    assert_eq!(one.delivered, 1);
    one.ack().await.unwrap();
    // Leave the second unacked: it must come back after ack_wait.
    let two = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert_eq!(&two.message.payload[..], b"2");
    assert_eq!(two.delivered, 1);
    let again = tokio::time::timeout(WAIT, sub.next()).await.expect("redelivery").unwrap();
    assert_eq!(&again.message.payload[..], b"2");
    assert_eq!(again.delivered, 2, "redelivered after ack_wait");
    assert_eq!(again.message.subject, "js.b");
    again.ack().await.unwrap();
    // Acked messages stay acked for a durable consumer bound again.
    drop(sub);
    bus.publish_durable("js.c", hdrs(&[("Nats-Msg-Id", "m3")]), Bytes::from_static(b"3")).await.unwrap();
    let mut sub = bus.consume(&consumer).await.unwrap();
    let three = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert_eq!(&three.message.payload[..], b"3");
    three.ack().await.unwrap();
}

async fn kv_compare_and_set(f: Fixture) {
    let kv = f.bus.kv("conf_kv").await.unwrap();
    assert_eq!(kv.get("job.1").await.unwrap(), None);
    let r1 = kv.create("job.1", Bytes::from_static(b"queued")).await.unwrap();
    let err = kv.create("job.1", Bytes::from_static(b"again")).await.unwrap_err();
    assert_eq!(err.kind, BusErrorKind::AlreadyExists);
    let r2 = kv.update("job.1", Bytes::from_static(b"running"), r1).await.unwrap();
    assert!(r2 > r1);
    // A second writer holding the old revision loses.
    let err = kv.update("job.1", Bytes::from_static(b"stolen"), r1).await.unwrap_err();
    assert_eq!(err.kind, BusErrorKind::WrongRevision);
    let e = kv.get("job.1").await.unwrap().unwrap();
    assert_eq!(&e.value[..], b"running");
    assert_eq!(e.revision, r2);
    kv.put("job.2", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(kv.keys().await.unwrap(), vec!["job.1".to_string(), "job.2".to_string()]);
    kv.delete("job.2").await.unwrap();
    assert_eq!(kv.get("job.2").await.unwrap(), None);
}

async fn invalid_subjects_are_refused(f: Fixture) {
    let err = f.bus.publish("a.*", Headers::new(), Bytes::new()).await.unwrap_err();
    assert_eq!(err.kind, BusErrorKind::InvalidSubject);
    assert!(f.bus.subscribe("a..b").await.is_err());
}

/// A stream bounded in bytes drops its oldest messages; the newest message
/// of each subject is what `last_per_subject` returns, oldest first; a
/// consumer's backlog counts what it has not had acked.
async fn stream_limits_last_per_subject_and_backlog(f: Fixture) {
    let bus = &f.bus;
    let spec = StreamSpec {
        name: "CONF_LIMITS".into(),
        subjects: vec!["lim.>".into()],
        duplicate_window: Duration::from_secs(60),
        max_age: Duration::ZERO,
        max_bytes: 4096,
    };
    bus.ensure_stream(&spec).await.unwrap();
    for i in 0..100u32 {
        let subject = if i % 2 == 0 { "lim.even" } else { "lim.odd" };
        bus.publish_durable(subject, Headers::new(), Bytes::from(vec![i as u8; 200])).await.unwrap();
    }
    let last = bus.last_per_subject("CONF_LIMITS", &["lim.>".into()]).await.unwrap();
    let got: Vec<(String, u8)> = last.iter().map(|(_, m)| (m.subject.clone(), m.payload[0])).collect();
    assert_eq!(got, vec![("lim.even".to_string(), 98), ("lim.odd".to_string(), 99)]);
    let consumer = ConsumerSpec {
        stream: "CONF_LIMITS".into(),
        durable: "lim".into(),
        filter_subjects: vec!["lim.>".into()],
        ack_wait: Duration::from_secs(30),
        max_deliver: 0,
        deliver_from: DeliverFrom::All,
    };
    let mut sub = bus.consume(&consumer).await.unwrap();
    let first = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
    assert!(first.message.payload[0] > 50, "the oldest messages were dropped past max_bytes");
    let kept = 100 - first.message.payload[0] as u64;
    assert!(kept * 200 <= 4096 + 200, "{kept} messages kept");
    let backlog = bus.consumer_backlog("CONF_LIMITS", "lim").await.unwrap();
    assert_eq!(backlog, kept, "nothing acked yet");
    first.ack().await.unwrap();
    costmesh_testkit::eventually(WAIT, "the ack counted", || async {
        bus.consumer_backlog("CONF_LIMITS", "lim").await.unwrap() == kept - 1
    })
    .await;
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory_backend {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(memory().await).await; })*
        }
        mod nats_backend {
            use super::*;
            $(#[tokio::test] async fn $case() { super::$case(nats().await).await; })*
        }
    };
}

conformance!(
    wildcards_and_headers,
    queue_groups,
    request_reply,
    jetstream_dedupe_and_redelivery,
    kv_compare_and_set,
    invalid_subjects_are_refused,
    stream_limits_last_per_subject_and_backlog,
);

/// The harness can kill and restart nats-server mid-test: the client
/// reconnects by itself and durable events survive in the store.
#[tokio::test]
async fn nats_restart_keeps_durable_events_and_reconnects() {
    let mut server = NatsServer::start_new();
    let bus = Bus::Nats(costmesh_bus::NatsBus::connect(&server.url(), &Default::default()).await.unwrap());
    let spec = StreamSpec {
        name: "RESTART".into(),
        subjects: vec!["rs.>".into()],
        duplicate_window: Duration::from_secs(60),
        max_age: Duration::ZERO,
        max_bytes: 0,
    };
    bus.ensure_stream(&spec).await.unwrap();
    bus.publish_durable("rs.before", hdrs(&[("Nats-Msg-Id", "b")]), Bytes::from_static(b"before")).await.unwrap();

    server.stop();
    assert!(!server.is_running());
    server.start();

    // Publishing works again once the client has reconnected.
    costmesh_testkit::eventually(Duration::from_secs(15), "publish after reconnect", || {
        let bus = bus.clone();
        async move {
            bus.publish_durable("rs.after", hdrs(&[("Nats-Msg-Id", "a")]), Bytes::from_static(b"after")).await.is_ok()
        }
    })
    .await;
    let consumer = ConsumerSpec {
        stream: "RESTART".into(),
        durable: "after-restart".into(),
        filter_subjects: vec![],
        ack_wait: Duration::from_secs(5),
        max_deliver: 0,
        deliver_from: DeliverFrom::All,
    };
    let mut sub = bus.consume(&consumer).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(WAIT, sub.next()).await.expect("durable message").unwrap();
        got.push(String::from_utf8(m.message.payload.to_vec()).unwrap());
        m.ack().await.unwrap();
    }
    assert_eq!(got, vec!["before", "after"], "the event stored before the restart survived it");
}

/// Credentials in the URL authenticate (user:password and token, as the
/// nats CLI takes them); a refused connect names the server without them.
#[tokio::test]
async fn credentials_in_the_url_authenticate_and_never_show_in_errors() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "s3cret-pw"]);
    let host = format!("127.0.0.1:{}", server.port());
    let ok = NatsBus::connect(&format!("nats://alice:s3cret-pw@{host}"), &Default::default()).await.unwrap();
    Bus::Nats(ok).flush().await.unwrap();
    let err = NatsBus::connect(&format!("nats://alice:wrong-pw@{host}"), &Default::default()).await.err().unwrap();
    let text = err.to_string();
    assert!(!text.contains("wrong-pw") && text.contains("alice:***@"), "{text}");
    let anonymous = NatsBus::connect(&format!("nats://{host}"), &Default::default()).await;
    assert!(anonymous.is_err(), "an anonymous client is refused");

    let server = NatsServer::start_with_args(&["--auth", "tok-123456"]);
    let host = format!("127.0.0.1:{}", server.port());
    let ok = NatsBus::connect(&format!("nats://tok-123456@{host}"), &Default::default()).await.unwrap();
    Bus::Nats(ok).flush().await.unwrap();
    let err = NatsBus::connect(&format!("nats://bad-token@{host}"), &Default::default()).await.err().unwrap();
    assert!(!err.to_string().contains("bad-token"), "{err}");
}
