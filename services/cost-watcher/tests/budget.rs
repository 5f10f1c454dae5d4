//! The cost-watcher over a real nats-server, in virtual time: exact energy
//! cost through gaps, duplicates and an agent restart; budget events once
//! each, also across a cost-watcher restart; month rollover.
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use costmesh_bus::{Bus, NatsBus, Subscription};
use costmesh_contracts::v1::{self, BudgetState};
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_cost_watcher::Config;
use costmesh_runtime::clock::{Clock, VirtualClock};
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::metrics::SharedRegistry;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

struct Rig {
    nats: NatsServer,
    mesh: MeshConfig,
    clock: Clock,
    handle: Arc<VirtualClock>,
    producer: Bus,
    budgets: Subscription,
}

struct Watcher {
    shutdown: CancellationToken,
    registry: SharedRegistry,
    health: costmesh_runtime::admin::Health,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn config() -> Config {
    Config { monthly_budget: 10.0, evaluate_interval: Duration::from_secs(3600), ..Default::default() }
}

impl Rig {
    async fn new(test: &str, start: &str) -> Rig {
        costmesh_runtime::telemetry::init_for_tests();
        let nats = NatsServer::start_new();
        let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
        let (clock, handle) = Clock::manual(start.parse().unwrap());
        let producer = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
        let subjects = costmesh_contracts::Subjects::new(&mesh.subject_prefix).unwrap();
        let budgets = producer.subscribe(&subjects.budget_all()).await.unwrap();
        producer.flush().await.unwrap();
        Rig { nats, mesh, clock, handle, producer, budgets }
    }

    async fn start_watcher(&self) -> Watcher {
        self.start_watcher_with(config()).await
    }

    async fn start_watcher_with(&self, cfg: Config) -> Watcher {
        let bus = Bus::Nats(NatsBus::connect(&self.nats.url(), &Default::default()).await.unwrap());
        let shutdown = CancellationToken::new();
        let ctx = ServiceContext::new("cost-watcher", None, bus, &self.mesh, self.clock.clone(), shutdown.clone());
        let (registry, health) = (ctx.registry.clone(), ctx.health.clone());
        let task = tokio::spawn(costmesh_cost_watcher::run(cfg, ctx));
        costmesh_testkit::eventually(Duration::from_secs(10), "cost-watcher ready", || {
            let h = health.clone();
            async move { h.is_ready() }
        })
        .await;
        Watcher { shutdown, registry, health, task }
    }

    /// Publishes a sample and waits until the watcher has accounted it.
    async fn sample(&self, w: &Watcher, boot: &str, energy_mj: u64, time: DateTime<Utc>) {
        let s = v1::GpuSample {
            node: "n1".into(),
            gpu_index: 0,
            boot_id: boot.into(),
            energy_mj,
            time: Some(costmesh_contracts::timestamp(time)),
            ..Default::default()
        };
        let (h, p) = costmesh_contracts::encode(
            &s,
            &EventMeta::new::<v1::GpuSample>("gpu-agent/n1", time, ContentType::Protobuf),
        );
        let subject = costmesh_contracts::Subjects::new(&self.mesh.subject_prefix).unwrap().gpu_telemetry("n1", 0);
        let before = handled(&w.registry);
        self.producer.publish(&subject, h, p).await.unwrap();
        self.producer.flush().await.unwrap();
        costmesh_testkit::eventually(Duration::from_secs(10), "sample handled", || {
            let r = w.registry.clone();
            async move {
                handled(&r) > before
                    || costmesh_runtime::metrics::render(&r).contains("costmesh_events_duplicate_total")
            }
        })
        .await;
    }

    async fn next_budget(&mut self) -> v1::BudgetEvent {
        let m =
            tokio::time::timeout(Duration::from_secs(10), self.budgets.next()).await.expect("a budget event").unwrap();
        costmesh_contracts::decode::<v1::BudgetEvent>(&m.headers, &m.payload).unwrap().1
    }

    async fn no_budget_event(&mut self) {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), self.budgets.next()).await {
            let e = costmesh_contracts::decode::<v1::BudgetEvent>(&m.headers, &m.payload).unwrap().1;
            panic!("unexpected budget event {:?} for {}", e.state(), e.period);
        }
    }
}

fn handled(r: &SharedRegistry) -> u64 {
    let text = costmesh_runtime::metrics::render(r);
    text.lines()
        .find(|l| l.starts_with("costmesh_events_handled_total{") && l.contains("GpuSample"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn gauge(r: &SharedRegistry, name: &str) -> f64 {
    let text = costmesh_runtime::metrics::render(r);
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

impl Watcher {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Gone at once, as on SIGKILL: the main loop dies first (no drain, no
    /// final save), then its consumers and responders stop.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.shutdown.cancel();
    }
}

impl Rig {
    /// Kills `w` (see [`Watcher::kill`]) and waits until the handler it had
    /// in flight is done with: in one process a "killed" watcher's report
    /// handler can still be saving, which a real SIGKILL would have cut.
    async fn kill(&self, w: Watcher) {
        w.kill().await;
        let subjects = costmesh_contracts::Subjects::new(&self.mesh.subject_prefix).unwrap();
        costmesh_testkit::eventually(Duration::from_secs(10), "the killed watcher's handlers done", || async {
            self.producer.consumer_backlog(&subjects.stream_name(), "cost-watcher-reports").await.is_ok_and(|n| n == 0)
        })
        .await;
    }

    async fn summary(&self) -> serde_json::Value {
        let subjects = costmesh_contracts::Subjects::new(&self.mesh.subject_prefix).unwrap();
        let r = self
            .producer
            .request(
                &subjects.api("cost-watcher", "summary"),
                Default::default(),
                Default::default(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()
    }

    async fn storage_report(&self, at: DateTime<Utc>, monthly_micros: i64) {
        let subjects = costmesh_contracts::Subjects::new(&self.mesh.subject_prefix).unwrap();
        let r = v1::StorageReport {
            time: Some(costmesh_contracts::timestamp(at)),
            usage: vec![v1::StorageUsage {
                root: "/data".into(),
                bytes: 1,
                objects: 1,
                monthly_cost: Some(v1::Money { currency_code: "TWD".into(), micros: monthly_micros }),
                ..Default::default()
            }],
            used_bytes: 70,
            provisioned_bytes: 100,
            ..Default::default()
        };
        let (h, p) = costmesh_contracts::encode(
            &r,
            &EventMeta::new::<v1::StorageReport>("storage-janitor", at, ContentType::Protobuf),
        );
        self.producer.publish_durable(&subjects.storage_report(), h, p).await.unwrap();
    }
}

const KWH_MJ: u64 = 3_600_000_000;

#[tokio::test]
async fn energy_cost_is_exact_through_gaps_duplicates_and_an_agent_restart() {
    let rig = Rig::new("exact", "2026-07-10T04:00:00Z").await;
    let w = rig.start_watcher().await;
    let t = rig.clock.now();
    rig.sample(&w, "boot-a", 1_000_000, t).await; // baseline
    rig.sample(&w, "boot-a", 1_000_000 + KWH_MJ, t).await; // +1 kWh
    rig.sample(&w, "boot-a", 1_000_000 + KWH_MJ, t).await; // duplicate
    rig.sample(&w, "boot-a", 1_000_000 + 3 * KWH_MJ, t).await; // after a gap: +2 kWh
    rig.sample(&w, "boot-a", 1_000_000 + 2 * KWH_MJ, t).await; // late and out of order
    rig.sample(&w, "boot-b", KWH_MJ / 2, t).await; // the agent restarted: +0.5 kWh since its boot
    rig.sample(&w, "boot-a", 9 * KWH_MJ, t).await; // a stray sample of the old boot
    rig.sample(&w, "boot-b", KWH_MJ, t).await; // +0.5 kWh
                                               // 4 kWh at 2.6 per kWh = 10.40, exactly.
    assert_eq!(gauge(&w.registry, "costmesh_energy_kwh"), 4.0);
    assert_eq!(gauge(&w.registry, "costmesh_electricity_cost"), 10.4);
    w.stop().await;
}

#[tokio::test]
async fn budget_events_are_published_once_across_restarts_and_reset_with_the_month() {
    let mut rig = Rig::new("budget", "2026-07-10T04:00:00Z").await;
    let hour = Duration::from_secs(3600);
    let w = rig.start_watcher().await;
    let t = rig.clock.now();
    rig.sample(&w, "b", 0, t).await;
    // 3 kWh = 7.80 of a 10.00 budget: still OK.
    rig.sample(&w, "b", 3 * KWH_MJ, t).await;
    rig.handle.advance(hour).await;
    rig.no_budget_event().await;
    // 3.2 kWh = 8.32: WARNING.
    rig.sample(&w, "b", 3 * KWH_MJ + KWH_MJ / 5, t).await;
    rig.handle.advance(hour).await;
    let e = rig.next_budget().await;
    assert_eq!(e.state(), BudgetState::Warning);
    assert_eq!(e.previous_state(), BudgetState::Ok);
    assert_eq!(e.period, "2026-07");
    assert_eq!(e.spent.as_ref().unwrap().micros, 8_320_000);
    rig.handle.advance(hour).await;
    rig.no_budget_event().await;

    // The cost-watcher restarts; the telemetry it had is delivered again.
    w.stop().await;
    let w = rig.start_watcher().await;
    rig.sample(&w, "b", 3 * KWH_MJ + KWH_MJ / 5, t).await;
    rig.handle.advance(hour).await;
    rig.no_budget_event().await;

    // 4 kWh = 10.40: EXCEEDED, once.
    rig.sample(&w, "b", 4 * KWH_MJ, t).await;
    rig.handle.advance(hour).await;
    let e = rig.next_budget().await;
    assert_eq!(e.state(), BudgetState::Exceeded);
    assert_eq!(e.previous_state(), BudgetState::Warning);
    for _ in 0..3 {
        rig.handle.advance(hour).await;
    }
    rig.no_budget_event().await;

    // Into August (Taipei time): the budget resets, the July forecast is scored.
    rig.handle.advance_to("2026-07-31T16:30:00Z".parse().unwrap()).await;
    let e = rig.next_budget().await;
    assert_eq!(e.state(), BudgetState::Ok);
    assert_eq!(e.previous_state(), BudgetState::Exceeded);
    assert_eq!(e.period, "2026-08");
    // Mid-July forecast: 10.40 spent by July 16 projected to ~20; actual 10.40.
    let err = gauge(&w.registry, "costmesh_forecast_error_ratio");
    assert!(err > 0.5 && err < 1.5, "forecast error {err}");
    // The KPIs are on /metrics: last month's forecast accuracy is 1 - error.
    let acc = gauge(&w.registry, "costmesh_kpi{kpi=\"forecast_accuracy\"}");
    assert!((acc - (1.0 - err)).abs() < 1e-9, "accuracy {acc} vs error {err}");
    assert!(gauge(&w.registry, "costmesh_kpi{kpi=\"budget_execution\"}").is_finite());
    w.stop().await;
}

#[tokio::test]
async fn a_jump_past_the_budget_publishes_the_warning_then_the_exceeded_event() {
    let mut rig = Rig::new("jump", "2026-07-10T04:00:00Z").await;
    let w = rig.start_watcher().await;
    let t = rig.clock.now();
    rig.sample(&w, "b", 0, t).await;
    // 5 kWh = 13.00 of a 10.00 budget in one step: past 80 % and 100 %.
    rig.sample(&w, "b", 5 * KWH_MJ, t).await;
    rig.handle.advance(Duration::from_secs(3600)).await;
    let (first, second) = (rig.next_budget().await, rig.next_budget().await);
    assert_eq!((first.state(), first.previous_state(), first.threshold), (BudgetState::Warning, BudgetState::Ok, 0.8));
    assert_eq!((second.state(), second.previous_state()), (BudgetState::Exceeded, BudgetState::Warning));
    rig.no_budget_event().await;
    // The share of the month elapsed, in the ledger's zone (Asia/Taipei), to
    // the second: 2026-07-10T05:00Z is 13:00 on July 10th there.
    let elapsed = gauge(&w.registry, "costmesh_budget_period_elapsed_ratio{budget=\"monthly\"}");
    let want = (9.0 * 86400.0 + 13.0 * 3600.0) / (31.0 * 86400.0);
    assert!((elapsed - want).abs() < 1e-6, "elapsed {elapsed}, want {want}");
    w.stop().await;
}

#[tokio::test]
async fn storage_reports_and_cache_stats_reach_the_ledger_and_kpis() {
    let rig = Rig::new("sources", "2026-07-10T04:00:00Z").await;
    let w = rig.start_watcher().await;
    let subjects = costmesh_contracts::Subjects::new(&rig.mesh.subject_prefix).unwrap();
    let t0 = rig.clock.now();
    // Two reports a day apart: a 31-day month at 31/month costs 1.00 for that day.
    for at in [t0, t0 + chrono::Duration::days(1)] {
        rig.storage_report(at, 31_000_000).await;
    }
    let stats = |started: i64, requests: u64| v1::CacheStats {
        instance: "gw-1".into(),
        started_at: Some(costmesh_contracts::Timestamp { seconds: started, nanos: 0 }),
        routes: vec![v1::RouteStats { route: "/v1/generate".into(), requests, ..Default::default() }],
        ..Default::default()
    };
    // Cumulative counters: 100, then 250 (same start), then a restart at 30.
    for (started, requests) in [(1, 100), (1, 250), (1, 250), (2, 30)] {
        let (h, p) = costmesh_contracts::encode(
            &stats(started, requests),
            &EventMeta::new::<v1::CacheStats>("cache-gateway", t0, ContentType::Protobuf),
        );
        rig.producer.publish(&subjects.cache_stats(), h, p).await.unwrap();
    }
    rig.producer.flush().await.unwrap();
    costmesh_testkit::eventually(Duration::from_secs(10), "both sources accounted", || async {
        rig.handle.advance(Duration::from_secs(3600)).await;
        let v = rig.summary().await;
        v["cost"]["storage"].as_f64() == Some(1.0) && v["kpis"]["storage_utilisation"].as_f64() == Some(0.7)
    })
    .await;
    let v = rig.summary().await;
    assert_eq!(v["period"], "2026-07");
    // 280 requests and no cloud cost yet: 0 per request (defined, not absent).
    assert_eq!(v["kpis"]["cost_per_inference_request"].as_f64(), Some(0.0), "{v}");
    w.stop().await;
}

#[tokio::test]
async fn a_time_of_use_tariff_prices_energy_when_it_was_used() {
    let rig = Rig::new("tou", "2026-07-15T00:00:00Z").await;
    let cfg = Config { tariff: costmesh_runtime::tariff::Tariff::taipower_example(), ..config() };
    let w = rig.start_watcher_with(cfg).await;
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    rig.sample(&w, "b", 0, at("2026-07-14T23:00:00Z")).await; // baseline, 07:00 Taipei
    rig.sample(&w, "b", KWH_MJ, at("2026-07-15T00:00:00Z")).await; // 1 kWh by 08:00: off-peak 2.06
    rig.sample(&w, "b", 2 * KWH_MJ, at("2026-07-15T02:00:00Z")).await; // 1 kWh by 10:00: peak 5.16
    assert_eq!(gauge(&w.registry, "costmesh_electricity_cost"), 7.22);
    w.stop().await;
}

#[tokio::test]
async fn after_a_nats_restart_the_ledger_is_saved_again_and_the_budget_event_goes_out() {
    let mut rig = Rig::new("natsrestart", "2026-07-10T04:00:00Z").await;
    let hour = Duration::from_secs(3600);
    let w = rig.start_watcher().await;
    let t = rig.clock.now();
    rig.sample(&w, "b", 0, t).await;
    rig.sample(&w, "b", KWH_MJ, t).await; // 2.60 of 10.00
                                          // NATS dies with a change unsaved; the evaluation tries to save meanwhile.
    rig.nats.stop();
    costmesh_testkit::eventually(Duration::from_secs(10), "readiness follows the outage", || {
        let h = w.health.clone();
        async move { !h.is_ready() && h.report().contains("disconnected") }
    })
    .await;
    rig.handle.advance(hour).await;
    costmesh_testkit::eventually(Duration::from_secs(10), "a save tried during the outage", || {
        let r = w.registry.clone();
        async move { gauge(&r, "costmesh_cost_watcher_ledger_save_failures_total") >= 1.0 }
    })
    .await;
    rig.nats.start();
    costmesh_testkit::eventually(Duration::from_secs(20), "ready again after the restart", || {
        let h = w.health.clone();
        async move { h.is_ready() }
    })
    .await;
    rig.handle.advance(hour).await;
    // Past the budget: 4 kWh = 10.40.
    rig.sample(&w, "b", 4 * KWH_MJ, t).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let e = loop {
        assert!(tokio::time::Instant::now() < deadline, "no budget event after the NATS restart");
        rig.handle.advance(hour).await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rig.budgets.next()).await {
            break costmesh_contracts::decode::<v1::BudgetEvent>(&m.headers, &m.payload).unwrap().1;
        }
    };
    // From OK past 100 % at once: the warning first, then the exceeded event.
    assert_eq!(e.state(), BudgetState::Warning);
    let e = rig.next_budget().await;
    assert_eq!(e.state(), BudgetState::Exceeded);
    assert_eq!(gauge(&w.registry, "costmesh_cost_watcher_ledger_conflicts_total"), 0.0);
    // What was saved is what was booked: a restarted watcher reads 10.40.
    rig.kill(w).await;
    let w = rig.start_watcher().await;
    assert_eq!(rig.summary().await["cost"]["local"].as_f64(), Some(10.4));
    w.stop().await;
}

#[tokio::test]
async fn storage_cost_survives_sigkill_and_cache_counts_survive_sigterm() {
    let rig = Rig::new("storagekill", "2026-07-10T04:00:00Z").await;
    let w = rig.start_watcher().await;
    let t0 = rig.clock.now();
    // Two reports a day apart: 31.00 a month over one day of July = 1.00.
    rig.storage_report(t0, 31_000_000).await;
    rig.storage_report(t0 + chrono::Duration::days(1), 31_000_000).await;
    costmesh_testkit::wait_for(Duration::from_secs(10), "storage booked", || async {
        let v = rig.summary().await;
        if v["cost"]["storage"].as_f64() == Some(1.0) {
            Ok(())
        } else {
            Err(v["cost"].to_string())
        }
    })
    .await;
    // SIGKILL: no tick has run since, no shutdown save.
    rig.kill(w).await;
    let w = rig.start_watcher().await;
    assert_eq!(rig.summary().await["cost"]["storage"].as_f64(), Some(1.0), "storage cost lost on a kill");

    // Cache statistics are core NATS: booked in memory, saved at shutdown.
    let subjects = costmesh_contracts::Subjects::new(&rig.mesh.subject_prefix).unwrap();
    let stats = v1::CacheStats {
        instance: "gw-1".into(),
        started_at: Some(costmesh_contracts::Timestamp { seconds: 1, nanos: 0 }),
        routes: vec![v1::RouteStats { route: "/v1/generate".into(), requests: 40, ..Default::default() }],
        ..Default::default()
    };
    let (h, p) = costmesh_contracts::encode(
        &stats,
        &EventMeta::new::<v1::CacheStats>("cache-gateway", t0, ContentType::Protobuf),
    );
    rig.producer.publish(&subjects.cache_stats(), h, p).await.unwrap();
    rig.producer.flush().await.unwrap();
    costmesh_testkit::wait_for(Duration::from_secs(10), "requests counted", || async {
        let v = rig.summary().await;
        if v["kpis"]["cost_per_inference_request"].is_number() {
            Ok(())
        } else {
            Err(v["kpis"].to_string())
        }
    })
    .await;
    w.stop().await; // SIGTERM
    let w = rig.start_watcher().await;
    let v = rig.summary().await;
    assert!(v["kpis"]["cost_per_inference_request"].is_number(), "requests lost on SIGTERM: {v}");
    w.stop().await;
}

#[test]
fn zero_evaluation_interval_is_refused_naming_the_key() {
    use costmesh_runtime::config::load_service;
    let e = load_service::<Config>(
        Some("[cost_watcher]\nevaluate_interval = \"0s\"\n"),
        &Default::default(),
        "cost_watcher",
    )
    .unwrap_err();
    assert_eq!(e.key, "cost_watcher.evaluate_interval", "{e}");
}
