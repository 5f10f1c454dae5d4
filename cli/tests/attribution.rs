//! Cost attribution over a real nats-server: two teams, three jobs on two
//! nodes (one a spot cloud node), idle gaps, a job preempted on the spot
//! node and resumed on the other, a duplicated, a lost and a late sample,
//! an agent restart and a cost-watcher restart. Every figure is computed by
//! hand below; `costmesh cost --by ...` is read back as CSV and JSON.
//!
//! The cost-watcher (and, for the label check, the scheduler) run in this
//! process on a virtual clock; the test publishes what the agents and the
//! scheduler publish, with their sources.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{self, JobEventKind};
use costmesh_contracts::{ContentType, EventMeta, Subjects};
use costmesh_runtime::clock::{Clock, VirtualClock};
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
/// 1 Wh in mJ: at 3.6 TWD/kWh it costs 3,600 micros; at 500 g/kWh it emits 500 mg.
const WH: u64 = 3_600_000;

struct Rig {
    nats: NatsServer,
    mesh: MeshConfig,
    subjects: Subjects,
    clock: Clock,
    handle: Arc<VirtualClock>,
    bus: Bus,
    t0: DateTime<Utc>,
}

struct Watcher {
    shutdown: CancellationToken,
    registry: costmesh_runtime::metrics::SharedRegistry,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn config() -> costmesh_cost_watcher::Config {
    let mut c = costmesh_cost_watcher::Config {
        electricity_price_per_kwh: 3.6,
        evaluate_interval: Duration::from_secs(60),
        job_cost_settle: Duration::from_secs(30),
        ..Default::default()
    };
    c.carbon.intensity_g_per_kwh = 500.0;
    // The spot node is priced by its machine type: 36 TWD an hour on spot,
    // 10,000 micros a second.
    c.cloud_prices.insert(
        "g2-t4".into(),
        costmesh_cost_watcher::config::CloudPrice { on_demand_per_hour: 108.0, spot_per_hour: Some(36.0) },
    );
    c.routes.insert(
        "demo".into(),
        costmesh_cost_watcher::config::RoutePriceConfig { per_call: 0.002, per_backend_second: 0.0 },
    );
    c
}

/// Who holds a GPU in a sample.
type Held<'a> = Option<(&'a str, u32, &'a str)>;

impl Rig {
    async fn new() -> Rig {
        costmesh_runtime::telemetry::init_for_tests();
        let nats = NatsServer::start_new();
        let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix("attribution"), ..Default::default() };
        let subjects = Subjects::new(&mesh.subject_prefix).unwrap();
        let t0: DateTime<Utc> = "2026-12-10T02:00:00Z".parse().unwrap();
        let (clock, handle) = Clock::manual(t0);
        let bus = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
        Rig { nats, mesh, subjects, clock, handle, bus, t0 }
    }

    async fn ctx(&self, service: &str, shutdown: &CancellationToken) -> ServiceContext {
        let bus = Bus::Nats(NatsBus::connect(&self.nats.url(), &Default::default()).await.unwrap());
        ServiceContext::new(service, None, bus, &self.mesh, self.clock.clone(), shutdown.clone())
    }

    async fn start_watcher(&self) -> Watcher {
        let shutdown = CancellationToken::new();
        let ctx = self.ctx("cost-watcher", &shutdown).await;
        let (registry, health) = (ctx.registry.clone(), ctx.health.clone());
        let task = tokio::spawn(costmesh_cost_watcher::run(config(), ctx));
        costmesh_testkit::eventually(WAIT, "cost-watcher ready", || {
            let h = health.clone();
            async move { h.is_ready() }
        })
        .await;
        Watcher { shutdown, registry, task }
    }

    fn at(&self, secs: i64) -> DateTime<Utc> {
        self.t0 + chrono::Duration::seconds(secs)
    }

    /// Publishes what a node's agent publishes, and waits until it is handled.
    /// (Its arguments read as the columns of the schedule below.)
    #[allow(clippy::too_many_arguments)]
    async fn sample(&self, w: &Watcher, node: &str, gpu: u32, boot: &str, wh: u64, secs: i64, held: Held<'_>) {
        let spot = node == "spot-b";
        let s = v1::GpuSample {
            node: node.into(),
            gpu_index: gpu,
            boot_id: boot.into(),
            energy_mj: wh * WH,
            time: Some(costmesh_contracts::timestamp(self.at(secs))),
            job_id: held.map(|h| h.0.to_string()).unwrap_or_default(),
            job_attempt: held.map_or(0, |h| h.1),
            job_team: held.map(|h| h.2.to_string()).unwrap_or_default(),
            cloud: spot,
            preemptible: spot,
            machine_type: if spot { "g2-t4".into() } else { String::new() },
            node_gpu_count: if spot { 1 } else { 2 },
            ..Default::default()
        };
        let (h, p) = costmesh_contracts::encode(
            &s,
            &EventMeta::new::<v1::GpuSample>(format!("gpu-agent/{node}"), self.at(secs), ContentType::Protobuf),
        );
        let before = handled(&w.registry);
        self.bus.publish(&self.subjects.gpu_telemetry(node, gpu), h, p).await.unwrap();
        self.bus.flush().await.unwrap();
        costmesh_testkit::eventually(WAIT, "sample handled", || {
            let r = w.registry.clone();
            async move { handled(&r) > before }
        })
        .await;
    }

    /// A decision the scheduler publishes about a job.
    async fn job_event(&self, job: &str, kind: JobEventKind, attempt: u32, team: &str, secs: i64) {
        let e = v1::JobEvent {
            job_id: job.into(),
            kind: kind as i32,
            attempt,
            team: team.into(),
            labels: [("model".to_string(), format!("{job}-model"))].into(),
            time: Some(costmesh_contracts::timestamp(self.at(secs))),
            ..Default::default()
        };
        let (h, p) = costmesh_contracts::encode(
            &e,
            &EventMeta::new::<v1::JobEvent>("scheduler", self.at(secs), ContentType::Protobuf),
        );
        self.bus.publish_durable(&self.subjects.job(job, kind), h, p).await.unwrap();
    }

    async fn ask(&self, body: Value) -> Value {
        let subject = self.subjects.api("cost-watcher", "attribution");
        let r =
            self.bus.request(&subject, Default::default(), bytes::Bytes::from(body.to_string()), WAIT).await.unwrap();
        serde_json::from_slice(&r.payload).unwrap()
    }

    /// `by` rows keyed by their first column.
    async fn rows(&self, by: &str) -> BTreeMap<String, Value> {
        let v = self.ask(json!({ "by": by })).await;
        let first = v["columns"][0].as_str().unwrap().to_string();
        v["rows"].as_array().unwrap().iter().map(|r| (r[&first].as_str().unwrap().to_string(), r.clone())).collect()
    }

    /// Runs the CLI against this rig's server and prefix.
    async fn cli(&self, args: &[&str]) -> std::process::Output {
        let url = self.nats.url();
        let conn = ["--nats", url.as_str(), "--prefix", self.mesh.subject_prefix.as_str()];
        // The connection flags go before a `--` (what follows is a job's command).
        let at = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        // Not blocking: the services answering it run on this test's runtime.
        tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"))
            .args(&args[..at])
            .args(conn)
            .args(&args[at..])
            .output()
            .await
            .unwrap()
    }
}

impl Watcher {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn handled(r: &costmesh_runtime::metrics::SharedRegistry) -> u64 {
    costmesh_runtime::metrics::render(r)
        .lines()
        .filter(|l| l.starts_with("costmesh_events_handled_total{") && l.contains("GpuSample"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The exact figures of a row.
fn exact(row: &Value) -> (u64, u64, i64, i64, u64) {
    let e = &row["exact"];
    (
        e["energy_mj"].as_u64().unwrap(),
        e["gpu_ms"].as_u64().unwrap(),
        e["electricity_micros"].as_i64().unwrap(),
        e["cloud_micros"].as_i64().unwrap(),
        e["carbon_mg"].as_u64().unwrap(),
    )
}

/// Energy (Wh), GPU time (s) and cloud time (s on the spot node) -> the
/// exact figures: 3,600 micros and 500 mg per Wh, 10,000 micros per spot second.
fn figures(wh: u64, secs: u64, spot_secs: i64) -> (u64, u64, i64, i64, u64) {
    (wh * WH, secs * 1000, wh as i64 * 3_600, spot_secs * 10_000, wh * 500)
}

#[tokio::test]
async fn every_job_team_and_idle_row_matches_the_hand_computed_figures() {
    use JobEventKind::*;
    let rig = Rig::new().await;
    let mut costs = rig.bus.subscribe(&format!("{}.cost.job.*", rig.mesh.subject_prefix)).await.unwrap();
    rig.bus.flush().await.unwrap();
    let w = rig.start_watcher().await;
    let (j1, j2, j3) = (Some(("j1", 1, "vision")), Some(("j2", 1, "vision")), Some(("j3", 1, "nlp")));
    let j2b = Some(("j2", 2, "vision"));

    rig.job_event("j1", Submitted, 0, "vision", 0).await;
    rig.job_event("j2", Submitted, 0, "vision", 0).await;
    rig.job_event("j3", Submitted, 0, "nlp", 0).await;
    // Baselines: energy before the ledger watched is nobody's.
    rig.sample(&w, "local-a", 0, "a1", 100, 0, None).await;
    rig.sample(&w, "local-a", 1, "a1", 50, 0, None).await;
    rig.sample(&w, "spot-b", 0, "b1", 10, 0, None).await;
    // t=10: j1 on local-a/0; local-a/1 idle; j2 (attempt 1) on the spot node.
    rig.sample(&w, "local-a", 0, "a1", 101, 10, j1).await; // j1 +1 Wh 10 s
    rig.sample(&w, "local-a", 1, "a1", 51, 10, None).await; // idle +1 Wh 10 s
    rig.sample(&w, "spot-b", 0, "b1", 12, 10, j2).await; // j2 +2 Wh 10 s, 10 spot s
                                                         // t=20
    rig.sample(&w, "local-a", 0, "a1", 103, 20, j1).await; // j1 +2 Wh 10 s
    rig.sample(&w, "local-a", 0, "a1", 103, 20, j1).await; // the same sample again: nothing
    rig.sample(&w, "local-a", 1, "a1", 53, 20, j3).await; // j3 +2 Wh 10 s
    rig.sample(&w, "spot-b", 0, "b1", 15, 20, j2).await; // j2 +3 Wh 10 s, 10 spot s
                                                         // t=25: the spot node is preempted; the scheduler requeues j2.
    rig.job_event("j2", Interrupted, 1, "vision", 25).await;
    // t=30: local-a/0's sample is lost (it would have said 105 Wh).
    rig.sample(&w, "local-a", 1, "a1", 56, 30, j3).await; // j3 +3 Wh 10 s
    rig.sample(&w, "spot-b", 0, "b1", 16, 30, None).await; // idle +1 Wh 10 s, 10 spot s
    rig.job_event("j3", Exited, 1, "nlp", 35).await;
    // t=40
    rig.sample(&w, "local-a", 0, "a1", 107, 40, j1).await; // j1 +4 Wh 20 s (covers the lost one)
    rig.sample(&w, "local-a", 1, "a1", 57, 40, None).await; // idle +1 Wh 10 s
    rig.sample(&w, "spot-b", 0, "b1", 16, 40, None).await; // idle +0 Wh 10 s, 10 spot s
    rig.job_event("j1", Exited, 1, "vision", 45).await;
    // (An event a stopping consumer has pulled but not acked comes back
    // only after the consumer's ack wait, so the restart waits for it.)
    costmesh_testkit::eventually(WAIT, "j1's end booked", || async {
        rig.rows("job").await.get("j1").is_some_and(|r| r["state"] == "exited")
    })
    .await;

    // The cost-watcher restarts; what it booked is in its saved state.
    w.stop().await;
    let w = rig.start_watcher().await;

    // t=50: j2 resumes (attempt 2) on local-a/1.
    rig.job_event("j2", Assigned, 2, "vision", 45).await;
    rig.sample(&w, "local-a", 0, "a1", 108, 50, None).await; // idle +1 Wh 10 s
    rig.sample(&w, "local-a", 1, "a1", 59, 50, j2b).await; // j2 +2 Wh 10 s
                                                           // t=60: local-a's agent restarted: a new counter from zero.
    rig.sample(&w, "local-a", 0, "a2", 1, 60, None).await; // idle +1 Wh 10 s
    rig.sample(&w, "local-a", 1, "a2", 3, 60, j2b).await; // j2 +3 Wh 10 s
                                                          // t=70, and a late sample of the old counter: nothing.
    rig.sample(&w, "local-a", 1, "a2", 5, 70, j2b).await; // j2 +2 Wh 10 s
    rig.sample(&w, "local-a", 1, "a1", 58, 55, j2b).await;
    rig.job_event("j2", Exited, 2, "vision", 75).await;
    rig.sample(&w, "local-a", 1, "a2", 6, 80, None).await; // idle +1 Wh 10 s

    // By hand:
    //   j1: 1 + 2 + 4 = 7 Wh in 10 + 10 + 20 = 40 s, all on local-a.
    //   j2: spot 2 + 3 = 5 Wh in 20 s (20 spot s), local 2 + 3 + 2 = 7 Wh in 30 s.
    //   j3: 2 + 3 = 5 Wh in 20 s.
    //   idle on local-a: GPU 0 1 + 1 = 2 Wh in 20 s, GPU 1 1 + 1 + 1 = 3 Wh in 30 s;
    //   idle on spot-b: 1 + 0 = 1 Wh in 20 s (20 spot s).
    let want_jobs = BTreeMap::from([
        ("j1".to_string(), figures(7, 40, 0)),
        ("j2".to_string(), figures(12, 50, 20)),
        ("j3".to_string(), figures(5, 20, 0)),
        ("__idle__".to_string(), figures(6, 70, 20)),
    ]);
    let jobs = costmesh_testkit::wait_for(WAIT, "every sample and job event booked", || async {
        let rows = rig.rows("job").await;
        let got: BTreeMap<String, _> = rows.iter().map(|(k, r)| (k.clone(), exact(r))).collect();
        let done = rows.get("j2").is_some_and(|r| r["state"] == "exited");
        if got == want_jobs && done {
            Ok(rows)
        } else {
            Err(format!("{got:#?} (want {want_jobs:#?}); j2: {:?}", rows.get("j2")))
        }
    })
    .await;
    // The resumed job is one record covering both attempts and both nodes.
    assert_eq!(jobs["j2"]["attempts"], "1 2", "{:?}", jobs["j2"]);
    assert_eq!(jobs["j2"]["nodes"], "local-a spot-b");
    assert_eq!(jobs["j2"]["team"], "vision");
    assert_eq!(jobs["j1"]["labels"]["model"], "j1-model");
    assert_eq!(jobs["__idle__"]["nodes"], "local-a spot-b");

    // Jobs + idle equal the node totals exactly; idle per node as by hand.
    let nodes = rig.rows("node").await;
    let (a, b) = (exact(&nodes["local-a"]), exact(&nodes["spot-b"]));
    assert_eq!(a, figures(7 + 7 + 5 + 5, 40 + 30 + 20 + 50, 0), "{:?}", nodes["local-a"]);
    assert_eq!(b, figures(5 + 1, 20 + 20, 40), "{:?}", nodes["spot-b"]);
    let sum = want_jobs.values().fold((0, 0, 0, 0, 0), |s, f| (s.0 + f.0, s.1 + f.1, s.2 + f.2, s.3 + f.3, s.4 + f.4));
    assert_eq!(sum, (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3, a.4 + b.4));
    assert_eq!(nodes["local-a"]["idle_cost"], json!(5.0 * 3_600.0 / 1e6));
    assert_eq!(nodes["spot-b"]["kind"], "cloud");
    assert_eq!(nodes["spot-b"]["idle_cost"], json!((3_600.0 + 200_000.0) / 1e6));

    // Each ended job's JobCost arrives once, after the settle time.
    rig.handle.advance(Duration::from_secs(180)).await;
    let mut got: BTreeMap<String, v1::JobCost> = BTreeMap::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(WAIT, costs.next()).await.expect("a JobCost").unwrap();
        let c = costmesh_contracts::decode::<v1::JobCost>(&m.headers, &m.payload).unwrap().1;
        assert!(got.insert(c.job_id.clone(), c).is_none(), "a second JobCost for a job");
    }
    let j2 = &got["j2"];
    assert_eq!((j2.energy_mj, j2.gpu_ms, j2.carbon_mg), (12 * WH, 50_000, 6_000));
    assert_eq!(j2.cost.as_ref().unwrap().micros, 12 * 3_600 + 200_000);
    assert_eq!(j2.cloud.as_ref().unwrap().micros, 200_000);
    assert_eq!(
        (j2.attempts.clone(), j2.nodes.clone()),
        (vec![1, 2], vec!["local-a".to_string(), "spot-b".to_string()])
    );
    assert_eq!(j2.outcome(), Exited);
    assert_eq!(got["j3"].team, "nlp");
    // A restart and more evaluations send none of them again.
    w.stop().await;
    let w = rig.start_watcher().await;
    rig.handle.advance(Duration::from_secs(180)).await;
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), costs.next()).await {
        let c = costmesh_contracts::decode::<v1::JobCost>(&m.headers, &m.payload).unwrap().1;
        panic!("JobCost for {} sent again", c.job_id);
    }

    // By team, through the CLI, as CSV.
    let out = rig.cli(&["cost", "--by", "team", "--format", "csv"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut csv = csv::Reader::from_reader(out.stdout.as_slice());
    let header: Vec<String> = csv.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(header, ["team", "jobs", "energy_kwh", "gpu_hours", "electricity", "cloud", "cost", "carbon_kg"]);
    let teams: BTreeMap<String, BTreeMap<String, String>> =
        csv.deserialize::<BTreeMap<String, String>>().map(|r| r.unwrap()).map(|r| (r["team"].clone(), r)).collect();
    let money = |team: &str, col: &str| teams[team][col].parse::<f64>().unwrap();
    // vision: 19 Wh (68,400 micros) + 20 s of spot time (200,000); nlp: 5 Wh;
    // idle: 6 Wh (21,600) + 20 spot s.
    assert_eq!(money("vision", "cost"), 0.2684);
    assert_eq!(money("vision", "cloud"), 0.2);
    assert_eq!(money("nlp", "cost"), 0.018);
    assert_eq!(money("__idle__", "cost"), 0.2216);
    assert_eq!(teams["vision"]["jobs"], "2");
    assert_eq!(money("vision", "carbon_kg"), 0.0095);
    assert!((money("vision", "gpu_hours") - 90.0 / 3600.0).abs() < 1e-12);

    // By tenant: what the cache saved. Route `demo` costs 0.002 a backend call.
    let stats = v1::CacheStats {
        instance: "cache-gateway/test".into(),
        started_at: Some(costmesh_contracts::timestamp(rig.t0)),
        time: Some(costmesh_contracts::timestamp(rig.at(100))),
        routes: vec![
            v1::RouteStats {
                route: "demo".into(),
                tenant: "acme".into(),
                requests: 10,
                hits: 6,
                stale: 1,
                misses: 3,
                backend_calls: 3,
                backend_time_ms: 900,
                ..Default::default()
            },
            v1::RouteStats {
                route: "demo".into(),
                tenant: String::new(),
                requests: 4,
                hits: 0,
                misses: 4,
                backend_calls: 4,
                backend_time_ms: 1200,
                ..Default::default()
            },
        ],
        backends: Vec::new(),
    };
    let (h, p) = costmesh_contracts::encode(
        &stats,
        &EventMeta::new::<v1::CacheStats>("cache-gateway", rig.at(100), ContentType::Protobuf),
    );
    rig.bus.publish(&rig.subjects.cache_stats(), h.clone(), p.clone()).await.unwrap();
    let tenants = costmesh_testkit::wait_for(WAIT, "the gateway's report booked", || async {
        let r = rig.rows("tenant").await;
        if r.contains_key("acme") {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    // acme: 3 calls = 0.006; 6 hits + 1 stale answer avoided 7 calls = 0.014.
    assert_eq!((tenants["acme"]["cost"].as_f64(), tenants["acme"]["saved"].as_f64()), (Some(0.006), Some(0.014)));
    assert_eq!(
        (tenants["__anonymous__"]["cost"].as_f64(), tenants["__anonymous__"]["saved"].as_f64()),
        (Some(0.008), Some(0.0))
    );
    // The same report again (a repeat on core NATS) books nothing more.
    rig.bus.publish(&rig.subjects.cache_stats(), h, p).await.unwrap();
    rig.bus.flush().await.unwrap();
    let out = rig.cli(&["cost", "--by", "tenant", "--format", "csv"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("tenant,requests,hits,stale,misses,backend_calls,backend_seconds,cost,saved,hit_rate\n"),
        "{text}"
    );
    assert!(text.contains("\nacme,10,6,1,3,3,0.9,0.006,0.014,0.7\n"), "{text}");
    w.stop().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_that_names_it() {
    let rig = Rig::new().await;
    let w = rig.start_watcher().await;
    // The CLI refuses before asking.
    let out = rig.cli(&["cost", "--by", "teams"]).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("'teams'") && err.contains("--by"), "{err}");
    let out = rig.cli(&["cost", "--by", "team", "--month", "2026-13"]).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("--month \"2026-13\": must be YYYY-MM"), "{err}");
    // The API says the same to a client that does not use the CLI.
    let v = rig.ask(json!({"by": "teams"})).await;
    assert!(v["error"].as_str().unwrap().contains("\"teams\""), "{v}");
    let v = rig.ask(json!({"by": "team", "month": "12/2026"})).await;
    assert!(v["error"].as_str().unwrap().contains("\"12/2026\""), "{v}");
    let v = rig.ask(json!({"by": "team", "month": "2026-11"})).await;
    assert_eq!(v["period"], "2026-11");

    // A label too long: the scheduler refuses the job and names the field.
    let shutdown = CancellationToken::new();
    let ctx = rig.ctx("scheduler", &shutdown).await;
    let health = ctx.health.clone();
    tokio::spawn(costmesh_scheduler::run(Default::default(), ctx));
    costmesh_testkit::eventually(WAIT, "scheduler ready", || {
        let h = health.clone();
        async move { h.is_ready() }
    })
    .await;
    let long = format!("model={}", "x".repeat(129));
    let out =
        rig.cli(&["jobs", "submit", "--name", "t", "--team", "vision", "--label", &long, "--", "/bin/true"]).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("labels") && err.contains("at most 128"), "{err}");
    let out = rig.cli(&["jobs", "submit", "--name", "t", "--team", "ml.vision", "--", "/bin/true"]).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("team"), "{err}");
    shutdown.cancel();
    w.stop().await;
}
