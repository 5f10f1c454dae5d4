//! One trace crosses services: the consumer's span is the child of the
//! producer's, through the `traceparent` header, over real NATS.
//!
//! Its own test binary: it installs the process-wide tracing subscriber
//! (a thread-local one is unreliable while other tests run beside it).
#[path = "../mesh/helpers.rs"]
mod helpers;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::TestMesh;

#[tokio::test]
async fn the_consumer_span_is_a_child_of_the_producer_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber in this binary");

    let t = TestMesh::new("trace");
    let agent = t.context("gpu-agent").await;
    let watcher = t.context("cost-watcher").await;
    let watcher_health = watcher.health.clone();
    tokio::spawn(costmesh_cost_watcher::run(Default::default(), watcher));
    costmesh_testkit::eventually(Duration::from_secs(10), "cost-watcher ready", || {
        let h = watcher_health.clone();
        async move { h.is_ready() }
    })
    .await;
    let cfg = costmesh_gpu_agent::Config {
        node: "n1".into(),
        sample_interval: Duration::from_millis(100),
        ..Default::default()
    };
    tokio::spawn(costmesh_gpu_agent::run(cfg, agent));

    let prefix = t.mesh.subject_prefix.clone();
    let handled = || {
        exporter.get_finished_spans().unwrap().into_iter().find(|s| {
            s.name == format!("process {prefix}.telemetry.gpu.{{node}}.{{gpu}}")
                && s.attributes.iter().any(|kv| kv.key.as_str() == "service" && kv.value.as_str() == "cost-watcher")
        })
    };
    costmesh_testkit::eventually(Duration::from_secs(10), "a handled sample", || {
        let found = handled().is_some();
        async move { found }
    })
    .await;
    let consumer = handled().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let producer = spans
        .iter()
        .find(|s| s.span_context.span_id() == consumer.parent_span_id)
        .expect("the consumer's parent span was exported by the producer");
    assert_eq!(producer.name, format!("publish {prefix}.telemetry.gpu.{{node}}.{{gpu}}"));
    assert_eq!(producer.span_kind, opentelemetry::trace::SpanKind::Producer);
    assert_eq!(consumer.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert_eq!(producer.span_context.trace_id(), consumer.span_context.trace_id());
    let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
        s.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.as_str().to_string())
    };
    assert!(attr(producer, "messaging.destination.name").is_some_and(|v| v.ends_with(".telemetry.gpu.n1.0")));
    for (k, v) in [("messaging.system", "nats"), ("messaging.operation.type", "send")] {
        assert_eq!(attr(producer, k).as_deref(), Some(v), "{k}");
    }
    assert_eq!(attr(&consumer, "messaging.operation.type").as_deref(), Some("process"));
    assert_eq!(attr(&consumer, "messaging.message.id"), attr(producer, "messaging.message.id"));

    // A message handled long after it was sent (its ce-time two minutes
    // back) starts a trace of its own, linked to the producer's span.
    let bus = t.bus().await;
    let subject = costmesh_contracts::Subjects::new(&prefix).unwrap().gpu_telemetry("n1", 0);
    let sample = costmesh_contracts::v1::GpuSample { node: "n1".into(), boot_id: "late".into(), ..Default::default() };
    let meta = costmesh_contracts::EventMeta::new::<costmesh_contracts::v1::GpuSample>(
        "late-producer",
        chrono::Utc::now() - chrono::Duration::minutes(2),
        costmesh_contracts::ContentType::Protobuf,
    );
    let late_id = meta.id.clone();
    let sender = tracing::info_span!("late sender");
    let (mut h, p) = costmesh_contracts::encode(&sample, &meta);
    sender.in_scope(|| costmesh_runtime::telemetry::inject(&mut h));
    bus.publish(&subject, h, p).await.unwrap();
    bus.flush().await.unwrap();
    drop(sender);
    let late = || {
        exporter.get_finished_spans().unwrap().into_iter().find(|s| {
            s.name.starts_with("process ") && attr(s, "messaging.message.id").as_deref() == Some(late_id.as_str())
        })
    };
    costmesh_testkit::eventually(Duration::from_secs(10), "the late sample handled", || {
        let found = late().is_some();
        async move { found }
    })
    .await;
    let late = late().unwrap();
    let sender = exporter.get_finished_spans().unwrap().into_iter().find(|s| s.name == "late sender").unwrap();
    assert_ne!(late.span_context.trace_id(), sender.span_context.trace_id(), "a trace of its own");
    assert_eq!(late.parent_span_id, opentelemetry::trace::SpanId::INVALID);
    assert!(
        late.links.iter().any(|l| l.span_context.span_id() == sender.span_context.span_id()),
        "linked to the sender: {:?}",
        late.links
    );
    t.shutdown.cancel();
}
