//! Shared set-up: the gateway as a service on a real nats-server.
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus};
use costmesh_cache_gateway::Config;
use costmesh_contracts::Subjects;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// A running gateway service and what a test needs to talk to it.
pub struct Running {
    pub bus: Bus,
    pub subjects: Subjects,
    pub shutdown: CancellationToken,
}

/// Starts `run(cfg)` on its own prefix and waits until it is ready.
#[allow(dead_code)] // not every test binary uses both
pub async fn start(nats: &NatsServer, test: &str, cfg: Config) -> Running {
    start_on(nats, test, cfg, Clock::system()).await
}

/// The same, on the given clock.
pub async fn start_on(nats: &NatsServer, test: &str, cfg: Config, clock: Clock) -> Running {
    start_prefixed(nats, &costmesh_testkit::unique_prefix(test), cfg, clock).await
}

/// The same, on a given prefix (a restarted gateway uses its predecessor's).
pub async fn start_prefixed(nats: &NatsServer, prefix: &str, cfg: Config, clock: Clock) -> Running {
    costmesh_runtime::telemetry::init_for_tests();
    let mesh = MeshConfig { subject_prefix: prefix.to_string(), ..Default::default() };
    let bus = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    let shutdown = CancellationToken::new();
    let ctx = ServiceContext::new("cache-gateway", None, bus.clone(), &mesh, clock, shutdown.clone());
    let (subjects, health) = (ctx.subjects().clone(), ctx.health.clone());
    ctx.events.ensure_stream().await.unwrap();
    tokio::spawn(costmesh_cache_gateway::run(cfg, ctx));
    costmesh_testkit::eventually(Duration::from_secs(10), "gateway ready", || {
        let h = health.clone();
        async move { h.is_ready() }
    })
    .await;
    Running { bus, subjects, shutdown }
}
