//! Telemetry ingest: GPU samples the cost-watcher accounts per second over a
//! real nats-server, next to the raw rate at which the same server and
//! client move the same messages to a subscriber that only counts them.
//! Both in one run, same messages, same machine.
//!
//!     cargo bench -p costmesh-cost-watcher --bench ingest
use std::time::{Duration, Instant};

use bytes::Bytes;
use costmesh_bus::{Bus, Headers, NatsBus};
use costmesh_contracts::v1::GpuSample;
use costmesh_contracts::{ContentType, EventMeta, Subjects};
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::metrics::EventLabels;
use costmesh_runtime::ServiceContext;
use tokio_util::sync::CancellationToken;

const N: usize = 100_000;
const GPUS: u32 = 64;

fn messages(prefix: &str) -> Vec<(String, Headers, Bytes)> {
    let subjects = Subjects::new(prefix).unwrap();
    let now = chrono::Utc::now();
    (0..N)
        .map(|i| {
            let gpu = i as u32 % GPUS;
            let s = GpuSample {
                node: format!("node-{}", gpu / 8),
                gpu_index: gpu % 8,
                boot_id: "bench".into(),
                energy_mj: (i as u64 / GPUS as u64 + 1) * 1_000_000,
                power_draw_mw: 250_000,
                time: Some(costmesh_contracts::timestamp(now)),
                ..Default::default()
            };
            let (h, p) =
                costmesh_contracts::encode(&s, &EventMeta::new::<GpuSample>("gpu-agent", now, ContentType::Protobuf));
            (subjects.gpu_telemetry(&s.node, s.gpu_index), h, p)
        })
        .collect()
}

async fn publish_all(bus: &Bus, msgs: &[(String, Headers, Bytes)]) {
    for (subject, h, p) in msgs {
        bus.publish(subject, h.clone(), p.clone()).await.unwrap();
    }
    bus.flush().await.unwrap();
}

async fn raw(url: &str) -> (usize, f64) {
    let msgs = messages("raw");
    let sub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let mut sub = sub_bus.queue_subscribe("raw.telemetry.gpu.>", "count").await.unwrap();
    sub_bus.flush().await.unwrap();
    let counter = tokio::spawn(async move {
        let mut n = 0;
        let mut first = None;
        while n < N {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(_)) => {
                    first.get_or_insert_with(Instant::now);
                    n += 1;
                }
                _ => break,
            }
        }
        (n, first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(f64::NAN))
    });
    let pub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let t0 = Instant::now();
    publish_all(&pub_bus, &msgs).await;
    let (n, _) = counter.await.unwrap();
    (n, t0.elapsed().as_secs_f64())
}

async fn ingest(url: &str) -> (usize, f64) {
    let msgs = messages("ing");
    let mesh = MeshConfig { subject_prefix: "ing".into(), ..Default::default() };
    let shutdown = CancellationToken::new();
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ServiceContext::new("cost-watcher", None, bus, &mesh, Clock::system(), shutdown.clone());
    let (metrics, health) = (ctx.events.metrics.clone(), ctx.health.clone());
    tokio::spawn(costmesh_cost_watcher::run(Default::default(), ctx));
    while !health.is_ready() {
        tokio::task::yield_now().await;
    }
    let labels = EventLabels { service: "cost-watcher".into(), event_type: "costmesh.v1.GpuSample".into() };
    let pub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let t0 = Instant::now();
    publish_all(&pub_bus, &msgs).await;
    let mut last = (0, Instant::now());
    loop {
        let n = metrics.handled.get_or_create(&labels).get() as usize;
        if n >= N {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break; // messages were dropped (slow consumer); report what arrived
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let n = metrics.handled.get_or_create(&labels).get() as usize;
    shutdown.cancel();
    (n, t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let _ = raw(&nats.url()).await; // warm up
    let (raw_n, raw_s) = raw(&nats.url()).await;
    let (ing_n, ing_s) = ingest(&nats.url()).await;
    let raw_rate = raw_n as f64 / raw_s;
    let ing_rate = ing_n as f64 / ing_s;
    println!("ingest: {N} GpuSamples (protobuf, {GPUS} GPUs), nats-server on loopback");
    println!("  raw (count only): {raw_n} received in {raw_s:.2} s = {raw_rate:.0} msg/s");
    println!("  cost-watcher    : {ing_n} accounted in {ing_s:.2} s = {ing_rate:.0} msg/s");
    println!("  ratio ingest/raw: {:.2} (target >= 0.5)", ing_rate / raw_rate);
}
