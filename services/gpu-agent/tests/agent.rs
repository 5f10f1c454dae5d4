//! gpu-agent over a real nats-server, on the sim backend, in virtual time.
use std::sync::Arc;
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus, Subscription};
use costmesh_contracts::v1::{self, ActionState, PowerCommand, PowerProfile};
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_gpu_agent::agent::AgentHandle;
use costmesh_gpu_agent::config::{BackendKind, Mode};
use costmesh_gpu_agent::sim::SimBackend;
use costmesh_gpu_agent::Config;
use costmesh_runtime::clock::{Clock, VirtualClock};
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

struct Rig {
    _nats: NatsServer,
    bus: Bus,
    ctx: ServiceContext,
    clock: Arc<VirtualClock>,
    shutdown: CancellationToken,
    samples: Subscription,
    actions: Subscription,
    handle: AgentHandle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Rig {
    async fn start(test: &str, cfg: Config) -> Rig {
        costmesh_runtime::telemetry::init_for_tests();
        let nats = NatsServer::start_new();
        let connect = || async { Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap()) };
        let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
        let (clock, handle_clock) = Clock::manual("2026-07-01T12:00:00Z".parse().unwrap());
        let shutdown = CancellationToken::new();
        let ctx =
            ServiceContext::new("gpu-agent", Some(&cfg.node), connect().await, &mesh, clock.clone(), shutdown.clone());
        let bus = connect().await;
        let samples = bus.subscribe(&ctx.subjects().gpu_telemetry_all()).await.unwrap();
        let actions = bus.subscribe(&ctx.subjects().actions_all()).await.unwrap();
        bus.flush().await.unwrap();
        let backend = Box::new(SimBackend::new(&cfg.node, &cfg.sim, clock.now()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(costmesh_gpu_agent::run_with_backend(cfg, ctx.clone(), backend, Some(tx)));
        let handle = tokio::time::timeout(WAIT, rx).await.expect("agent started").expect("agent handle");
        Rig { _nats: nats, bus, ctx, clock: handle_clock, shutdown, samples, actions, handle, task }
    }

    /// Advances one sample interval and returns the samples of that tick.
    async fn tick(&mut self, interval: Duration, gpus: usize) -> Vec<v1::GpuSample> {
        self.clock.advance(interval).await;
        let mut out = Vec::new();
        for _ in 0..gpus {
            let m = tokio::time::timeout(WAIT, self.samples.next()).await.expect("a sample").unwrap();
            out.push(costmesh_contracts::decode::<v1::GpuSample>(&m.headers, &m.payload).unwrap().1);
        }
        out.sort_by_key(|s| s.gpu_index);
        let now = costmesh_contracts::timestamp(self.clock.now());
        assert!(
            out.iter().all(|s| s.time.as_ref() == Some(&now)),
            "a sample of an earlier tick: is sample_interval the tick length?"
        );
        out
    }

    async fn next_action(&mut self) -> v1::Action {
        let m = tokio::time::timeout(WAIT, self.actions.next()).await.expect("an action").unwrap();
        costmesh_contracts::decode::<v1::Action>(&m.headers, &m.payload).unwrap().1
    }

    async fn command(&self, node: &str, gpu: Option<u32>, profile: PowerProfile) {
        let cmd = PowerCommand { node: node.into(), gpu_index: gpu, profile: profile as i32, reason: "test".into() };
        let (h, p) = costmesh_contracts::encode(
            &cmd,
            &EventMeta::new::<PowerCommand>("test", self.clock.now(), ContentType::Json),
        );
        self.bus.publish_durable(&self.ctx.subjects().node_power(node), h, p).await.unwrap();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task).await.expect("agent stops").unwrap().unwrap();
    }
}

fn config(mode: Mode, gpus: &[&str]) -> Config {
    let mut c = Config { node: "n1".into(), backend: BackendKind::Sim, mode, ..Default::default() };
    c.sim.gpus = gpus.iter().map(|s| s.to_string()).collect();
    c
}

const ALL_MODELS: &[&str] = &["RTX 4070", "RTX 4080", "RTX 4090", "T4", "H100 PCIe", "H100 SXM"];

#[tokio::test]
async fn training_profile_clamps_to_each_models_range_in_enforce_mode() {
    let mut rig = Rig::start("clamp", config(Mode::Enforce, ALL_MODELS)).await;
    let interval = Duration::from_secs(5);
    rig.tick(interval, ALL_MODELS.len()).await;
    rig.command("n1", None, PowerProfile::Training).await;
    for _ in 0..ALL_MODELS.len() {
        let a = rig.next_action().await;
        assert_eq!(a.kind, "power_profile");
        assert_eq!(a.state(), ActionState::Taken);
    }
    let samples = rig.tick(interval, ALL_MODELS.len()).await;
    for s in &samples {
        let expected = 320_000u32.clamp(s.power_limit_min_mw, s.power_limit_max_mw);
        assert_eq!(s.power_limit_mw, expected, "{}", s.model);
        assert_eq!(s.requested_limit_mw, 320_000);
        assert_eq!(s.limit_clamped, expected != 320_000, "{}", s.model);
        assert_eq!(s.active_profile(), PowerProfile::Training);
    }
    // The RTX 4070 tops out at 200 W and says so; the 4090 takes 320 W as asked.
    assert_eq!(samples[0].power_limit_mw, 200_000);
    assert!(samples[0].limit_clamped);
    assert_eq!(samples[2].power_limit_mw, 320_000);
    assert!(!samples[2].limit_clamped);
    // The idle profile (50 W) is below every model's floor.
    rig.command("n1", None, PowerProfile::Idle).await;
    for _ in 0..ALL_MODELS.len() {
        rig.next_action().await;
    }
    for s in rig.tick(interval, ALL_MODELS.len()).await {
        assert_eq!(s.power_limit_mw, s.power_limit_min_mw, "{}", s.model);
    }
    rig.stop().await;
}

#[tokio::test]
async fn observe_mode_reports_and_changes_nothing() {
    let mut rig = Rig::start("observe", config(Mode::Observe, &["RTX 4090"])).await;
    let interval = Duration::from_secs(5);
    let before = rig.tick(interval, 1).await[0].power_limit_mw;
    rig.command("n1", Some(0), PowerProfile::Inference).await;
    let a = rig.next_action().await;
    assert_eq!(a.state(), ActionState::Proposed);
    assert!(a.dry_run);
    assert!(a.reason.contains("would set 220 W"), "{}", a.reason);
    let s = &rig.tick(interval, 1).await[0];
    assert_eq!(s.power_limit_mw, before, "observe mode left the limit alone");
    assert_eq!(s.requested_limit_mw, 220_000);
    assert_eq!(s.mode(), v1::EnforcementMode::Observe);
    assert_eq!(s.active_profile(), PowerProfile::Inference);
    rig.stop().await;
}

#[tokio::test]
async fn enforce_mode_restores_the_original_limit_on_shutdown() {
    let mut cfg = config(Mode::Enforce, &["RTX 4090"]);
    cfg.sample_interval = Duration::from_secs(5);
    let mut rig = Rig::start("restore", cfg).await;
    rig.tick(Duration::from_secs(5), 1).await;
    rig.command("n1", Some(0), PowerProfile::Inference).await;
    rig.next_action().await;
    assert_eq!(rig.tick(Duration::from_secs(5), 1).await[0].power_limit_mw, 220_000);
    let handle = rig.handle.clone();
    rig.stop().await;
    assert_eq!(handle.power_limit_mw(0), Some(450_000), "the 4090's default limit is back");
}

#[tokio::test]
async fn energy_is_monotonic_and_equals_the_integral_of_power() {
    let mut rig = Rig::start("energy", config(Mode::Observe, &["RTX 4080"])).await;
    let interval = Duration::from_secs(5);
    let mut prev: Option<v1::GpuSample> = None;
    let mut integral_mj = 0.0;
    for i in 0..240 {
        rig.handle.set_load(0, [0, 35, 100, 70][(i / 20) % 4]);
        let s = rig.tick(interval, 1).await.remove(0);
        if let Some(p) = &prev {
            assert!(s.energy_mj >= p.energy_mj, "energy went backwards");
            assert_eq!(s.boot_id, p.boot_id);
            integral_mj += (p.power_draw_mw as f64 + s.power_draw_mw as f64) / 2.0 * 5.0;
            assert!(s.power_draw_mw <= s.power_limit_mw);
        }
        prev = Some(s);
    }
    let first_energy = 0.0; // the sim's counter starts at zero at its boot
    let last = prev.unwrap().energy_mj as f64;
    // The first sample's own interval is counted from the sim's start.
    assert!((last - first_energy - integral_mj).abs() / integral_mj < 0.01, "{last} vs {integral_mj}");
    rig.stop().await;
}

#[tokio::test]
async fn the_thermal_guard_holds_an_overheating_gpu_at_its_target() {
    let mut cfg = config(Mode::Enforce, &["RTX 4090"]);
    cfg.sim.ambient_c = 40.0; // a hot room: full load would reach ~82 °C
    let target = cfg.thermal.target_c;
    let mut rig = Rig::start("thermal", cfg).await;
    rig.handle.set_load(0, 100);
    let interval = Duration::from_secs(5);
    let mut temps = Vec::new();
    let mut limits = Vec::new();
    for _ in 0..(2 * 3600 / 5) {
        let s = rig.tick(interval, 1).await.remove(0);
        temps.push(s.temperature_c as f64);
        limits.push(s.power_limit_mw);
    }
    let peak = temps.iter().cloned().fold(f64::MIN, f64::max);
    // From the start the guard holds it below target + 1 °C, and once settled
    // (after 20 minutes) it gives away no more than needed.
    assert!(peak <= target + 1.0, "peak {peak:.2} °C");
    let settled = &temps[240..];
    let max = settled.iter().cloned().fold(f64::MIN, f64::max);
    let min = settled.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!(
        "thermal guard: peak {peak:.2} °C, settled {min:.2}..{max:.2} °C, lowest limit {} W",
        limits.iter().min().unwrap() / 1000
    );
    assert!(max <= target + 1.0, "max {max:.2} °C");
    assert!(min >= target - 5.0, "min {min:.2} °C: the guard gave away too much power");
    assert!(limits.iter().any(|l| *l < 450_000), "the guard lowered the limit");
    let a = rig.next_action().await;
    assert_eq!(a.kind, "thermal_guard");
    assert_eq!(a.state(), ActionState::Taken);
    rig.stop().await;
}

#[tokio::test]
async fn a_gpu_idle_for_ten_minutes_gets_the_idle_profile_and_leaves_it_with_work() {
    let mut cfg = config(Mode::Enforce, &["RTX 4080"]);
    cfg.sample_interval = Duration::from_secs(60);
    let mut rig = Rig::start("idle", cfg).await;
    let interval = Duration::from_secs(60);
    for _ in 0..10 {
        rig.tick(interval, 1).await;
    }
    let s = rig.tick(interval, 1).await.remove(0);
    assert_eq!(s.active_profile(), PowerProfile::Idle);
    let a = rig.next_action().await;
    assert!(a.reason.contains("idle below 5 %"), "{}", a.reason);
    rig.handle.set_load(0, 90);
    rig.tick(interval, 1).await;
    let s = rig.tick(interval, 1).await.remove(0);
    assert_eq!(s.active_profile(), PowerProfile::Unspecified, "back to the device default");
    assert_eq!(s.power_limit_mw, 320_000);
    rig.stop().await;
}

#[tokio::test]
async fn a_fouling_cooler_raises_one_maintenance_event() {
    let mut cfg = config(Mode::Observe, &["RTX 4080"]);
    cfg.sim.cooler_fouling_per_day = 0.03;
    cfg.sample_interval = Duration::from_secs(1800);
    let mut rig = Rig::start("drift", cfg).await;
    rig.handle.set_load(0, 100);
    let mut maintenance = Vec::new();
    for _ in 0..(24 * 2 * 21) {
        rig.tick(Duration::from_secs(1800), 1).await;
    }
    rig.shutdown.cancel();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rig.actions.next()).await {
        let a = costmesh_contracts::decode::<v1::Action>(&m.headers, &m.payload).unwrap().1;
        if a.kind == "maintenance" {
            maintenance.push(a);
        }
    }
    assert!(!maintenance.is_empty(), "no maintenance event after three weeks of fouling");
    assert!(maintenance.len() <= 2, "at most weekly: {}", maintenance.len());
    assert!(maintenance[0].reason.contains("clean the cooler"), "{}", maintenance[0].reason);
    assert_eq!(maintenance[0].state(), ActionState::Proposed);
}

#[tokio::test]
async fn a_command_for_a_missing_gpu_is_dead_lettered() {
    let mut rig = Rig::start("badcmd", config(Mode::Enforce, &["T4"])).await;
    let mut dlq = rig.bus.subscribe(&rig.ctx.subjects().dlq("gpu-agent")).await.unwrap();
    rig.bus.flush().await.unwrap();
    rig.command("n1", Some(7), PowerProfile::Training).await;
    let m = tokio::time::timeout(WAIT, dlq.next()).await.unwrap().unwrap();
    let reason = m.headers.get("costmesh-dlq-reason").unwrap();
    assert!(reason.contains("gpu_index 7 does not exist"), "{reason}");
    // The agent is still sampling.
    rig.tick(Duration::from_secs(5), 1).await;
    rig.stop().await;
}
