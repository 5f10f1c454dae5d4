//! The agent's own CPU cost per sample, over a real nats-server.
//!
//! Drives the agent with 8 simulated GPUs through N one-second ticks on a
//! virtual clock as fast as it can, and measures the process's CPU time
//! (user + system, /proc/self/stat). The peer, in the same run: a bare loop
//! that only encodes and publishes the same number of ready-made samples, the
//! floor any agent pays to put telemetry on the bus.
//!
//!     cargo bench -p costmesh-gpu-agent --bench agent_cost
use std::time::{Duration, Instant};

use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::GpuSample;
use costmesh_gpu_agent::config::{BackendKind, Mode};
use costmesh_gpu_agent::sim::SimBackend;
use costmesh_gpu_agent::Config;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::metrics::EventLabels;
use costmesh_runtime::ServiceContext;
use tokio_util::sync::CancellationToken;

const GPUS: usize = 8;
const TICKS: u64 = 3000;

/// CPU seconds used by this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

async fn published(ctx: &ServiceContext) -> u64 {
    ctx.events
        .metrics
        .published
        .get_or_create(&EventLabels { service: "gpu-agent".into(), event_type: "costmesh.v1.GpuSample".into() })
        .get()
}

async fn agent_run(url: &str) -> (f64, f64) {
    let (clock, handle) = Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let mesh = MeshConfig { subject_prefix: "bench".into(), ..Default::default() };
    let shutdown = CancellationToken::new();
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ServiceContext::new("gpu-agent", Some("bench"), bus, &mesh, clock.clone(), shutdown.clone());
    let mut cfg = Config { node: "bench".into(), backend: BackendKind::Sim, mode: Mode::Enforce, ..Default::default() };
    cfg.sample_interval = Duration::from_secs(1);
    cfg.sim.gpus = ["RTX 4070", "RTX 4080", "RTX 4090", "T4", "H100 PCIe", "H100 SXM", "RTX 4090", "RTX 4070"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cfg.sim.demo_load = true;
    let backend = Box::new(SimBackend::new(&cfg.node, &cfg.sim, clock.now()));
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(costmesh_gpu_agent::run_with_backend(cfg, ctx.clone(), backend, Some(tx)));
    rx.await.unwrap();
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..TICKS {
        handle.advance(Duration::from_secs(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while published(&ctx).await < TICKS * GPUS as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {} samples published",
            published(&ctx).await,
            TICKS * GPUS as u64
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    ctx.bus().flush().await.unwrap();
    let out = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    shutdown.cancel();
    out
}

async fn bare_run(url: &str) -> (f64, f64) {
    let (clock, handle) = Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let mesh = MeshConfig { subject_prefix: "bare".into(), ..Default::default() };
    let bus = Bus::Nats(NatsBus::connect(url, &Default::default()).await.unwrap());
    let ctx = ServiceContext::new("gpu-agent", Some("bench"), bus, &mesh, clock.clone(), CancellationToken::new());
    let sample = GpuSample {
        node: "bench".into(),
        model: "NVIDIA GeForce RTX 4090".into(),
        boot_id: "b".into(),
        energy_mj: 123_456_789,
        ..Default::default()
    };
    let subjects: Vec<String> = (0..GPUS as u32).map(|i| ctx.subjects().gpu_telemetry("bench", i)).collect();
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut ticker = clock.ticker(Duration::from_secs(1));
    let publisher = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            for _ in 0..TICKS {
                ticker.tick().await;
                for s in &subjects {
                    ctx.events.publish(s, &sample).await.unwrap();
                }
            }
        })
    };
    for _ in 0..TICKS {
        handle.advance(Duration::from_secs(1)).await;
    }
    publisher.await.unwrap();
    ctx.bus().flush().await.unwrap();
    (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let nats = costmesh_testkit::NatsServer::start_new();
    // Warm up connections and code paths once.
    let _ = bare_run(&nats.url()).await;
    let (bare_cpu, bare_wall) = bare_run(&nats.url()).await;
    let (agent_cpu, agent_wall) = agent_run(&nats.url()).await;
    let samples = (TICKS * GPUS as u64) as f64;
    let per_sample_us = agent_cpu / samples * 1e6;
    let bare_us = bare_cpu / samples * 1e6;
    // 8 GPUs at 1 Hz: 8 samples per second of wall time.
    let share = per_sample_us * GPUS as f64 / 1e6 * 100.0;
    println!("agent_cost: {GPUS} simulated GPUs, {TICKS} ticks, {samples} samples, nats-server {}", nats.url());
    println!("  agent : {agent_cpu:.2} s CPU ({agent_wall:.2} s wall)  = {per_sample_us:.1} µs CPU per sample");
    println!("  bare publish (peer): {bare_cpu:.2} s CPU ({bare_wall:.2} s wall) = {bare_us:.1} µs CPU per sample");
    println!("  ratio agent/bare: {:.2}", agent_cpu / bare_cpu.max(1e-9));
    println!("  at 8 GPUs x 1 Hz: {share:.3} % of one core (target < 1 %)");
}
