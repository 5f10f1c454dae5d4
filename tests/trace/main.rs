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

    let handled = || {
        exporter.get_finished_spans().unwrap().into_iter().find(|s| {
            s.name == "handle"
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
    assert_eq!(producer.name, "publish");
    assert_eq!(producer.span_context.trace_id(), consumer.span_context.trace_id());
    assert!(producer
        .attributes
        .iter()
        .any(|kv| kv.key.as_str() == "subject" && kv.value.as_str().contains(".telemetry.gpu.n1.0")));
    t.shutdown.cancel();
}
