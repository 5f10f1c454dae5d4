//! Telemetry ingest: GPU samples the cost-watcher accounts per second over a
//! real nats-server, next to the raw rate at which the same server and
//! client move the same messages to a subscriber that only counts them.
//! Both in one run, same messages, same machine. Attribution is on: half
//! the GPUs are held by one of 16 jobs of 4 teams, one node of 8 is a
//! priced cloud node, and samples are 5 s apart, so every sample books
//! energy, GPU time and carbon (and node time) to a job or an idle row.
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
            let round = i as u64 / GPUS as u64;
            let at = now + chrono::Duration::seconds(5 * round as i64);
            let held = gpu.is_multiple_of(2);
            let s = GpuSample {
                node: format!("node-{}", gpu / 8),
                gpu_index: gpu % 8,
                boot_id: "bench".into(),
                energy_mj: (round + 1) * 1_000_000,
                power_draw_mw: 250_000,
                time: Some(costmesh_contracts::timestamp(at)),
                job_id: if held { format!("job-{}", (gpu / 2) % 16) } else { String::new() },
                job_attempt: 1,
                job_team: if held { format!("team-{}", (gpu / 2) % 4) } else { String::new() },
                cloud: gpu / 8 == 7,
                node_gpu_count: 8,
                ..Default::default()
            };
            let (h, p) =
                costmesh_contracts::encode(&s, &EventMeta::new::<GpuSample>("gpu-agent", now, ContentType::Protobuf));
            (subjects.gpu_telemetry(&s.node, s.gpu_index), h, p)
        })
        .collect()
}

/// Messages go out in batches; the next batch waits until the consumer has
/// taken the last one, so neither side overflows and drops (a sustained
/// rate, not a burst into a buffer).
const BATCH: usize = 5_000;

async fn publish_paced(bus: &Bus, msgs: &[(String, Headers, Bytes)], consumed: impl Fn() -> usize) -> bool {
    for (i, chunk) in msgs.chunks(BATCH).enumerate() {
        for (subject, h, p) in chunk {
            bus.publish(subject, h.clone(), p.clone()).await.unwrap();
        }
        bus.flush().await.unwrap();
        let target = (i + 1) * BATCH.min(msgs.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        while consumed() < target.min(msgs.len()) {
            if Instant::now() > deadline {
                eprintln!("stalled at {} of {}", consumed(), target);
                return false;
            }
            tokio::task::yield_now().await;
        }
    }
    true
}

async fn raw(url: &str, prefix: &str) -> (usize, f64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let msgs = messages(prefix);
    let sub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let mut sub = sub_bus.subscribe(&format!("{prefix}.telemetry.gpu.>")).await.unwrap();
    sub_bus.flush().await.unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while sub.next().await.is_some() {
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    let pub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let t0 = Instant::now();
    let ok = publish_paced(&pub_bus, &msgs, || count.load(Ordering::Relaxed)).await;
    assert!(ok, "raw subscriber fell behind");
    (count.load(Ordering::Relaxed), t0.elapsed().as_secs_f64())
}

async fn ingest(url: &str) -> (usize, f64) {
    let msgs = messages("ing");
    let mesh = MeshConfig { subject_prefix: "ing".into(), ..Default::default() };
    let shutdown = CancellationToken::new();
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ServiceContext::new("cost-watcher", None, bus, &mesh, Clock::system(), shutdown.clone());
    let (metrics, health) = (ctx.events.metrics.clone(), ctx.health.clone());
    let mut cfg = costmesh_cost_watcher::Config::default();
    cfg.cloud_prices.insert(
        "node-7".into(),
        costmesh_cost_watcher::config::CloudPrice { on_demand_per_hour: 43.0, spot_per_hour: None },
    );
    tokio::spawn(costmesh_cost_watcher::run(cfg, ctx));
    while !health.is_ready() {
        tokio::task::yield_now().await;
    }
    let labels = EventLabels { service: "cost-watcher".into(), event_type: "costmesh.v1.GpuSample".into() };
    let counter = metrics.handled.get_or_create(&labels).clone();
    let pub_bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let t0 = Instant::now();
    let ok = publish_paced(&pub_bus, &msgs, || counter.get() as usize).await;
    assert!(ok, "the cost-watcher fell behind (messages dropped)");
    let out = (counter.get() as usize, t0.elapsed().as_secs_f64());
    shutdown.cancel();
    out
}

#[tokio::main]
async fn main() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let _ = raw(&nats.url(), "warm").await;
    let (raw_n, raw_s) = raw(&nats.url(), "raw").await;
    let (ing_n, ing_s) = ingest(&nats.url()).await;
    let raw_rate = raw_n as f64 / raw_s;
    let ing_rate = ing_n as f64 / ing_s;
    println!("ingest: {N} GpuSamples (protobuf, {GPUS} GPUs, attribution on) in paced batches of {BATCH}, nats-server on loopback");
    println!("  raw (count only): {raw_n} received in {raw_s:.2} s = {raw_rate:.0} msg/s");
    println!("  cost-watcher    : {ing_n} accounted in {ing_s:.2} s = {ing_rate:.0} msg/s");
    println!("  ratio ingest/raw: {:.2} (target >= 0.5)", ing_rate / raw_rate);
}
