//! Submits per second through NATS: `api.scheduler.submit` requests
//! answered by a real scheduler (validate, store the job with
//! compare-and-set, publish `submitted`, then a decision pass over the
//! whole queue, which writes the job's first decision and publishes it).
//! No node is known, so every job stays queued and each pass looks at a
//! queue that grows by one per submit: the cost of a long queue is in the
//! figure. Peer in the same run, same server, same clients: a responder
//! that does the least a stored submit needs, one KV create and one durable
//! event per request, answered from one task as the scheduler's loop is.
//!
//!   cargo bench -p costmesh-scheduler --bench submit
use std::time::{Duration, Instant};

use bytes::Bytes;
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{JobEvent, JobEventKind};
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use tokio_util::sync::CancellationToken;

/// Submits per run.
const N: usize = 2_000;

fn spec(i: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "name": format!("bench-{i}"),
            "command": "/opt/train",
            "gpus": 1 + i % 4,
            "estimatedDurationS": "3600",
            "class": "JOB_CLASS_TRAINING",
        })
        .to_string(),
    )
}

fn ctx(prefix: &str, service: &str, bus: Bus, shutdown: CancellationToken) -> ServiceContext {
    let mesh = MeshConfig { subject_prefix: prefix.into(), ..Default::default() };
    ServiceContext::new(service, None, bus, &mesh, Clock::system(), shutdown)
}

/// `N` submits to `subject` from `clients` concurrent clients: the rate
/// overall and in each quarter (the queue grows as they go).
async fn drive(url: &str, subject: &str, clients: usize) -> (f64, Vec<f64>) {
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let per = N / clients;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (bus, subject, done) = (bus.clone(), subject.to_string(), done.clone());
            tokio::spawn(async move {
                let mut at = Vec::new();
                for i in 0..per {
                    let r = bus.request(&subject, Default::default(), spec(c * per + i), Duration::from_secs(30)).await;
                    let v: serde_json::Value = serde_json::from_slice(&r.unwrap().payload).unwrap();
                    assert!(v["job"]["id"].is_string(), "{v}");
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n % (N / 4) == 0 {
                        at.push((n, t0.elapsed().as_secs_f64()));
                    }
                }
                at
            })
        })
        .collect();
    let mut marks = vec![(0, 0.0)];
    for t in tasks {
        marks.extend(t.await.unwrap());
    }
    marks.sort_by_key(|m| m.0);
    let quarters = marks.windows(2).map(|w| (w[1].0 - w[0].0) as f64 / (w[1].1 - w[0].1)).collect();
    ((per * clients) as f64 / t0.elapsed().as_secs_f64(), quarters)
}

/// The peer: one KV create and one durable event per request, in order.
async fn peer(url: &str, prefix: &str, shutdown: CancellationToken) {
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ctx(prefix, "peer", bus.clone(), shutdown.clone());
    ctx.events.ensure_stream().await.unwrap();
    let kv = ctx.kv("jobs").await.unwrap();
    let mut sub = bus.subscribe(&ctx.subjects().api("scheduler", "submit")).await.unwrap();
    bus.flush().await.unwrap();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(msg) = sub.next().await {
            n += 1;
            let id = format!("j-{n:012}");
            kv.create(&id, msg.payload.clone()).await.unwrap();
            let e = JobEvent { job_id: id.clone(), kind: JobEventKind::Submitted as i32, ..Default::default() };
            ctx.events.publish_durable(&ctx.subjects().job(&id, JobEventKind::Submitted), &e).await.unwrap();
            let body = serde_json::json!({"job": {"id": id}}).to_string();
            bus.respond(&msg, Default::default(), Bytes::from(body)).await.unwrap();
        }
    });
}

async fn scheduler(url: &str, prefix: &str, shutdown: CancellationToken) {
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ctx(prefix, "scheduler", bus, shutdown);
    let health = ctx.health.clone();
    let cfg = costmesh_scheduler::Config::default();
    let actuator = std::sync::Arc::new(costmesh_scheduler::actuator::DryRun::default());
    tokio::spawn(costmesh_scheduler::run_with_actuator(cfg, ctx, actuator));
    while !health.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let url = nats.url();
    let shutdown = CancellationToken::new();
    println!("submit: {N} job submits per run over request/reply, nats-server on loopback (JetStream on disk)");
    for clients in [1, 16] {
        let p = format!("peer{clients}");
        peer(&url, &p, shutdown.clone()).await;
        let (peer_rate, _) = drive(&url, &format!("{p}.api.scheduler.submit"), clients).await;
        let s = format!("sched{clients}");
        scheduler(&url, &s, shutdown.clone()).await;
        let (rate, quarters) = drive(&url, &format!("{s}.api.scheduler.submit"), clients).await;
        let q: Vec<String> = quarters.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "  {clients:>2} client(s): scheduler {rate:.0} submits/s (queue 0 -> {N}; by quarter {}), peer (KV create + \
             durable event) {peer_rate:.0}/s, ratio {:.2}",
            q.join(" / "),
            rate / peer_rate
        );
    }
    shutdown.cancel();
}
