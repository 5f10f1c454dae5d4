//! Malformed messages land in the DLQ with a reason; the service goes on.
use std::time::Duration;

use bytes::Bytes;
use costmesh_bus::Headers;
use costmesh_contracts::headers::names;
use costmesh_contracts::{v1, ContentType, EventMeta};

use crate::helpers::TestMesh;

const WAIT: Duration = Duration::from_secs(10);

fn hdrs(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().copied().collect()
}

/// A cost-watcher on its own prefix, ready: its subjects and metrics.
async fn cost_watcher(t: &TestMesh) -> (costmesh_contracts::Subjects, costmesh_runtime::metrics::SharedRegistry) {
    costmesh_runtime::telemetry::init_for_tests();
    let watcher = t.context("cost-watcher").await;
    let subjects = watcher.subjects().clone();
    let registry = watcher.registry.clone();
    let health = watcher.health.clone();
    watcher.events.ensure_stream().await.unwrap();
    tokio::spawn(costmesh_cost_watcher::run(Default::default(), watcher));
    costmesh_testkit::eventually(WAIT, "cost-watcher ready", || {
        let h = health.clone();
        async move { h.is_ready() }
    })
    .await;
    (subjects, registry)
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_the_next_good_one_is_handled() {
    let t = TestMesh::new("dlq");
    let (subjects, registry) = cost_watcher(&t).await;

    let producer = t.bus().await;
    let mut dlq = producer.subscribe(&subjects.dlq("cost-watcher")).await.unwrap();
    producer.flush().await.unwrap();
    let subject = subjects.gpu_telemetry("n1", 0);

    let bad: Vec<(Headers, &[u8], &str)> = vec![
        (
            hdrs(&[("ce-type", "costmesh.v1.GpuSample"), ("content-type", "application/protobuf")]),
            b"\xff\xff\xff\xff garbage",
            "malformed_payload",
        ),
        (
            hdrs(&[("ce-type", "costmesh.v1.GpuSample"), ("content-type", "text/plain")]),
            b"power=100",
            "unsupported_content_type",
        ),
        (hdrs(&[("ce-type", "costmesh.v1.Bogus"), ("content-type", "application/json")]), b"{}", "unknown_event_type"),
        (Headers::new(), b"no headers at all", "missing_header"),
    ];
    for (h, payload, _) in &bad {
        producer.publish(&subject, h.clone(), Bytes::copy_from_slice(payload)).await.unwrap();
    }
    // Then two good samples (the first is the energy baseline).
    for energy in [1_000_000_000u64, 4_600_000_000] {
        let s = v1::GpuSample {
            node: "n1".into(),
            gpu_index: 0,
            boot_id: "boot-a".into(),
            energy_mj: energy,
            ..Default::default()
        };
        let meta = EventMeta::new::<v1::GpuSample>("test", chrono::Utc::now(), ContentType::Json);
        let (h, p) = costmesh_contracts::encode(&s, &meta);
        producer.publish(&subject, h, p).await.unwrap();
    }
    producer.flush().await.unwrap();

    for (_, payload, kind) in &bad {
        let m = tokio::time::timeout(WAIT, dlq.next()).await.expect("dead letter").unwrap();
        let reason = m.headers.get(names::DLQ_REASON).unwrap_or_default();
        assert!(reason.starts_with(kind), "reason {reason:?} should start with {kind}");
        assert_eq!(m.headers.get(names::DLQ_SUBJECT), Some(subject.as_str()));
        assert_eq!(m.headers.get(names::DLQ_SERVICE), Some("cost-watcher"));
        assert_eq!(&m.payload[..], *payload, "the original payload is kept");
    }

    // The good samples were handled after the bad ones: 3.6 MJ (3.6e9 mJ) = 1 kWh.
    costmesh_testkit::eventually(WAIT, "energy accounted", || {
        let r = registry.clone();
        async move { costmesh_runtime::metrics::render(&r).contains("costmesh_energy_kwh 1.0") }
    })
    .await;
    let metrics = costmesh_runtime::metrics::render(&registry);
    assert!(metrics.contains("costmesh_electricity_cost 2.6"), "{metrics}");
    for (_, _, kind) in &bad {
        assert!(
            metrics.contains(&format!("costmesh_dead_letters_total{{service=\"cost-watcher\",reason=\"{kind}\"}} 1")),
            "{metrics}"
        );
    }
}

/// A message just under NATS's max payload cannot be dead-lettered whole
/// (the DLQ headers push it over): its headers and reason are kept with the
/// payload cut to fit, and the cut is said in a header.
#[tokio::test]
async fn a_message_near_the_max_payload_is_dead_lettered_with_its_payload_cut() {
    let t = TestMesh::new("dlqbig");
    let (subjects, _) = cost_watcher(&t).await;
    let producer = t.bus().await;
    let mut dlq = producer.subscribe(&subjects.dlq("cost-watcher")).await.unwrap();
    producer.flush().await.unwrap();
    let max = producer.max_payload();
    let payload = vec![0xffu8; max - 512];
    let h = hdrs(&[("ce-type", "costmesh.v1.GpuSample"), ("content-type", "application/protobuf")]);
    producer.publish(&subjects.gpu_telemetry("n1", 0), h, Bytes::from(payload.clone())).await.unwrap();
    producer.flush().await.unwrap();
    let m = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter for the big message").unwrap();
    assert!(m.headers.get(names::DLQ_REASON).unwrap_or_default().starts_with("malformed_payload"));
    let cut = m.headers.get(names::DLQ_TRUNCATED).unwrap_or_default().to_string();
    assert!(cut.ends_with(&format!("of {} bytes kept", payload.len())), "{cut}");
    assert!(m.payload.len() < payload.len() && m.payload[..] == payload[..m.payload.len()]);
}
