//! The scenarios.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use costmesh_contracts::v1::{BudgetState, JobEventKind};
use costmesh_contracts::AnyEvent;
use serde_json::json;

use super::{Host, Mesh, WAIT};

pub(crate) const fn host(name: &'static str, cloud: bool, preemptible: bool) -> Host {
    Host { name, cloud, preemptible }
}

/// Requests through the gateway in a loop until stopped; counts failures.
pub(crate) fn client_loop(
    m: &Mesh,
) -> (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let (stop, ok, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gw = m.gateway.clone();
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut i = 0u64;
        while !s.load(Ordering::SeqCst) {
            i += 1;
            let r = client
                .post(format!("http://{gw}/chat/v1/generate"))
                .header("content-type", "application/json")
                .header("cache-control", "no-store")
                .body(format!(r#"{{"i":{i}}}"#))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => o.fetch_add(1, Ordering::SeqCst),
                _ => f.fetch_add(1, Ordering::SeqCst),
            };
        }
    });
    (stop, ok, failed, task)
}

/// The metadata server flips `preempted`: the job checkpoints and resumes
/// on another node, the gateway drains that node's backend, no client
/// request fails.
#[tokio::test]
async fn preemption_moves_the_job_and_drains_the_backend_without_a_failed_request() {
    let hosts = [host("local-1", false, false), host("spot-1", true, true), host("spot-2", true, true)];
    let m = Mesh::start("e2epreempt", &hosts, &[]).await;
    // Own GPUs first: a local job takes local-1, so the spot-friendly job goes to spot-1.
    let local = m.submit(m.train_job("local", json!({}))).await;
    m.wait_job(&local, "local running", |j| j["state"] == "running").await;
    let spotty = m.submit(m.train_job("spotty", json!({"cloudOk": true, "preemptibleOk": true}))).await;
    let j = m.wait_job(&spotty, "spotty running", |j| j["state"] == "running").await;
    assert_eq!(j["node"], "spot-1", "{j}");
    costmesh_testkit::eventually(WAIT, "the job ready", || async {
        m.job_log("spot-1", &spotty, 1).contains(": ready")
    })
    .await;

    let (stop, ok, failed, task) = client_loop(&m);
    costmesh_testkit::eventually(WAIT, "traffic on the spot backend", || async {
        m.spot.calls.load(Ordering::SeqCst) > 5
    })
    .await;
    m.metadata["spot-1"].set_preempted(true);

    let moved = m.wait_job(&spotty, "spotty resumed elsewhere", |j| j["state"] == "running" && j["attempt"] == 2).await;
    assert_eq!(moved["node"], "spot-2", "{moved}");
    let checkpoints = m.job_events(&spotty, JobEventKind::Checkpointed);
    let resumed_from = moved["last_checkpoint"].as_str().unwrap_or_default().to_string();
    assert!(!checkpoints.is_empty() && !resumed_from.is_empty(), "no checkpoint before the move: {moved}");
    costmesh_testkit::eventually(WAIT, "the resumed job's log", || async {
        m.job_log("spot-2", &spotty, 2).contains(&format!("resumed from {resumed_from}"))
    })
    .await;
    // The drained spot backend gets nothing more.
    let spot_calls = m.spot.calls.load(Ordering::SeqCst);
    let before = ok.load(Ordering::SeqCst);
    costmesh_testkit::eventually(WAIT, "more traffic after the drain", || async {
        ok.load(Ordering::SeqCst) > before + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "client requests failed during the preemption");
    assert!(m.spot.calls.load(Ordering::SeqCst) <= spot_calls + 1, "the drained backend still got traffic");
    assert_eq!(m.seen("preemption.spot-1").len(), 1);
    // Both attempts' assignments, and the resumed attempt's start, are in
    // the job's one trace (the scheduler kept its context across the move).
    let by_id = |id: String| {
        move |s: &costmesh_testkit::otlp::ReceivedSpan| {
            s.name.starts_with("publish ") && s.attr("messaging.message.id") == Some(id.as_str())
        }
    };
    costmesh_testkit::eventually(WAIT, "both assignments exported", || async {
        let spans = m.otlp.spans();
        spans.iter().any(by_id(format!("assign-{spotty}-1"))) && spans.iter().any(by_id(format!("assign-{spotty}-2")))
    })
    .await;
    let spans = m.otlp.spans();
    let first = spans.iter().find(|s| by_id(format!("assign-{spotty}-1"))(s)).unwrap();
    let second = spans.iter().find(|s| by_id(format!("assign-{spotty}-2"))(s)).unwrap();
    assert_eq!(first.trace_id, second.trace_id, "the resumed attempt left the job's trace");
    let started_on_spot_2 = format!("{}.jobs.{spotty}.started", m.subjects.prefix());
    costmesh_testkit::eventually(WAIT, "the resumed start in the job's trace", || async {
        m.otlp.spans().iter().any(|s| {
            s.trace_id == first.trace_id
                && s.service == "gpu-agent"
                && s.attr("messaging.destination.name") == Some(started_on_spot_2.as_str())
                && s.resource.iter().any(|(k, v)| k == "costmesh.node" && v == "spot-2")
        })
    })
    .await;
}

fn notification(cost_usd: f64) -> Vec<u8> {
    format!(
        r#"{{"budgetDisplayName":"cloud-inference","costAmount":{cost_usd},"costIntervalStart":"2026-11-01T00:00:00Z","budgetAmount":100.0,"budgetAmountType":"SPECIFIED_AMOUNT","currencyCode":"USD"}}"#
    )
    .into_bytes()
}

pub(crate) fn attrs() -> std::collections::HashMap<String, String> {
    [("billingAccountId", "01D4EE-079462-DFD6EC"), ("budgetId", "b-cloud"), ("schemaVersion", "1.0")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Pub/Sub budget notifications cross 80 % then 100 %: each budget event
/// exactly once; the janitor runs its extra pass, the scheduler stops cloud
/// work, the gateway sheds its low-priority route; one trace spans the
/// cost-watcher and the services that reacted.
#[tokio::test]
async fn budget_notifications_gate_cloud_work_degrade_the_gateway_and_trace_across_services() {
    let hosts = [host("local-1", false, false), host("cloud-1", true, false)];
    let m = Mesh::start_with_billing("e2ebudget", &hosts, &[]).await;
    let local = m.submit(m.train_job("local", json!({}))).await;
    m.wait_job(&local, "local running", |j| j["state"] == "running").await;
    let cloud = m.submit(m.train_job("cloudy", json!({"cloudOk": true}))).await;
    let j = m.wait_job(&cloud, "cloud job running", |j| j["state"] == "running").await;
    assert_eq!(j["node"], "cloud-1");
    assert_eq!(m.ask("batch", r#"{"q":1}"#, false).await.0, 200);
    let reports_before = m.seen("storage.report").len();

    m.notify(notification(85.0), attrs());
    m.wait_seen("budget.cloud.warning", "the warning", 1).await;
    m.wait_seen("storage.report", "the janitor's extra pass", reports_before + 1).await;

    m.notify(notification(105.0), attrs());
    m.wait_seen("budget.cloud.exceeded", "exceeded", 1).await;
    let stopped = m.wait_job(&cloud, "cloud job stopped", |j| j["state"] == "queued").await;
    assert!(stopped["reason"].as_str().unwrap().starts_with("budget exceeded"), "{stopped}");
    costmesh_testkit::eventually(WAIT, "the low-priority route shed", || async {
        m.ask("batch", r#"{"q":2}"#, false).await.0 == 503
    })
    .await;
    assert_eq!(m.ask("chat", r#"{"q":3}"#, false).await.0, 200, "normal routes keep working");
    assert_eq!(m.api("show", json!({"id": local})).await["job"]["state"], "running", "local work goes on");

    // A redelivered notification changes nothing: each state exactly once.
    let relayed = m.seen("billing.gcp").len();
    m.notify(notification(105.0), attrs());
    costmesh_testkit::eventually(WAIT, "the repeat read and relayed", || async {
        m.seen("billing.gcp").len() > relayed
    })
    .await;
    // 105 USD is also over the overall monthly budget (3,000 TWD): that
    // budget moves too, once per state as well.
    let counts = m.budget_counts();
    assert_eq!(counts.get(&("cloud".to_string(), BudgetState::Warning)), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&("cloud".to_string(), BudgetState::Exceeded)), Some(&1), "{counts:?}");
    assert!(counts.values().all(|n| *n == 1), "a budget state published twice: {counts:?}");
    assert_eq!(m.job_events(&cloud, JobEventKind::Interrupted).len(), 1);

    // One trace: the exceeded event from the cost-watcher to its consumers.
    let publish = || {
        m.otlp.spans().into_iter().find(|s| {
            s.service == "cost-watcher"
                && s.name.starts_with("publish ")
                && s.attr("messaging.destination.name").is_some_and(|v| v.ends_with("budget.cloud.exceeded"))
        })
    };
    costmesh_testkit::eventually(WAIT, "the exceeded event's publish span", || async { publish().is_some() }).await;
    let trace = publish().unwrap().trace_id;
    // The cost-watcher's publish and a consumer span in each service that follows budgets.
    costmesh_testkit::eventually(WAIT, "the trace in cost-watcher, scheduler, janitor and gateway", || async {
        let s = m.trace_services(&trace);
        ["cost-watcher", "scheduler", "storage-janitor", "cache-gateway"].iter().all(|k| s.contains_key(*k))
    })
    .await;
    // It starts at the handling of the Pub/Sub notification behind it.
    let root =
        m.otlp.spans().into_iter().find(|s| s.trace_id == trace && s.attr("messaging.system") == Some("gcp_pubsub"));
    let root = root.expect("the Pub/Sub notification's span in the exceeded event's trace");
    assert_eq!(root.service, "cost-watcher");
    assert!(root.parent_span_id.is_empty(), "the notification's handling is the trace's root");
}

/// nats-server killed and restarted mid-scenario, then Redis: no durable
/// event lost, every service recovers by itself, no process exits.
#[tokio::test]
async fn nats_then_redis_restarts_lose_no_durable_event_and_every_service_recovers() {
    let hosts = [host("local-1", false, false)];
    let mut m = Mesh::start("e2efaults", &hosts, &[]).await;
    let short = m.submit(m.train_job("short", json!({"env": {"STEPS": "40", "STEP_SECONDS": "0.05"}}))).await;
    m.wait_job(&short, "short running", |j| j["state"] == "running").await;

    m.nats.stop();
    // The job finishes while NATS is down; its node writes the log meanwhile.
    costmesh_testkit::eventually(WAIT, "the job done", || async {
        m.job_log("local-1", &short, 1).contains("finished")
    })
    .await;
    m.nats.start();
    // Its exit, published after the reconnect, reaches the scheduler.
    m.wait_job(&short, "short succeeded", |j| j["state"] == "succeeded").await;
    m.wait_ready().await;
    let next = m.submit(m.train_job("after-nats", json!({}))).await;
    m.wait_job(&next, "a new job runs", |j| j["state"] == "running").await;

    // Redis down: the gateway still answers every request; back: caching resumes.
    m.redis.stop();
    for i in 0..20 {
        let (status, cs) = m.ask("chat", &format!(r#"{{"r":{i}}}"#), false).await;
        assert_eq!(status, 200, "request {i} during the Redis outage: {cs}");
    }
    m.redis.start();
    costmesh_testkit::eventually(WAIT, "caching after Redis returns", || async {
        let body = r#"{"after":"redis"}"#;
        m.ask("chat", body, false).await;
        m.ask("chat", body, false).await.1.contains("hit")
    })
    .await;
    m.wait_ready().await;
    m.all_alive();
    // (The job's exit reached the scheduler through its durable consumer:
    // "short" succeeded above. The test's own recorder is a core
    // subscription and may miss events around the NATS restart.)
}

/// A day in the life, on a simulated clock shared by every process (1200x:
/// one real second is twenty minutes): telemetry flows and energy cost accrues
/// in the ledger, a large training job submitted in the afternoon starts in
/// the off-peak window at 23:00 and checkpoints every 15 minutes, the
/// janitor's report reaches the ledger and the gateway's hit rate reaches
/// the cost-watcher's KPI.
#[tokio::test]
async fn a_day_in_the_life_on_a_simulated_clock() {
    let clock = [
        ("COSTMESH__MESH__SIMULATED_CLOCK__START", "2026-07-01T05:50:00Z"), // 13:50 in Taipei
        ("COSTMESH__MESH__SIMULATED_CLOCK__EPOCH", super::STARTED_AT),
        ("COSTMESH__MESH__SIMULATED_CLOCK__SPEED", "1200"),
        // Intervals are simulated time too.
        ("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "60s"),
        ("COSTMESH__SCHEDULER__DECIDE_INTERVAL", "1m"),
        ("COSTMESH__SCHEDULER__NODE_TIMEOUT", "2h"),
        ("COSTMESH__SCHEDULER__NODE_LOST_AFTER", "2h"),
        ("COSTMESH__COST_WATCHER__EVALUATE_INTERVAL", "5m"),
        ("COSTMESH__CACHE_GATEWAY__STATS_INTERVAL", "10m"),
        ("COSTMESH__STORAGE_JANITOR__INTERVAL", "1h"),
        ("COSTMESH__STORAGE_JANITOR__PRESSURE_CHECK", "1h"),
    ];
    let m = Mesh::start("e2eday", &[host("local-1", false, false)], &clock).await;

    // The afternoon: a large training job, and inference traffic that repeats.
    let big = m.submit(m.train_job("nightly", json!({"estimatedDurationS": "14400"}))).await;
    let deferred = m.wait_job(&big, "deferred to off-peak", |j| j["planned_start"].is_string()).await;
    assert_eq!(deferred["planned_start"], "2026-07-01T15:00:00Z", "{deferred}");
    for i in 0..40 {
        let (status, _) = m.ask("chat", &format!(r#"{{"q":{}}}"#, i % 4), false).await;
        assert_eq!(status, 200);
    }

    // 23:00 in Taipei: it starts, and checkpoints every 15 minutes.
    // (about half a real minute away)
    let started = m.wait_job_for(Duration::from_secs(90), &big, "started off-peak", |j| j["state"] == "running").await;
    let at: chrono::DateTime<chrono::Utc> = started["assigned_at"].as_str().unwrap().parse().unwrap();
    let window: chrono::DateTime<chrono::Utc> = "2026-07-01T15:00:00Z".parse().unwrap();
    // Exactly at 23:00 unless this machine lags (30 simulated min = 1.5 real s).
    assert!(at >= window && at < window + chrono::Duration::minutes(30), "assigned at {at}");
    costmesh_testkit::eventually(WAIT, "two periodic checkpoints", || async {
        m.job_events(&big, JobEventKind::Checkpointed).len() >= 2
    })
    .await;

    // The ledger: energy cost, the janitor's storage report, the gateway's hit rate.
    let summary = || async {
        let r = m
            .bus
            .request(&m.subjects.api("cost-watcher", "summary"), Default::default(), Default::default(), WAIT)
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()
    };
    costmesh_testkit::eventually(WAIT, "energy, storage and cache in the ledger", || async {
        let v = summary().await;
        v["energy_kwh"].as_f64().is_some_and(|e| e > 0.0)
            && v["cost"]["local"].as_f64().is_some_and(|c| c > 0.0)
            && v["kpis"]["storage_utilisation"].as_f64().is_some()
            && v["kpis"]["cache_hit_rate"].as_f64().is_some_and(|h| h >= 0.85)
    })
    .await;
    assert!(!m.seen("storage.report").is_empty());
}

/// `costmesh jobs submit` starts a trace that holds the whole job: the
/// scheduler's answer, the assignment it publishes from a later planning
/// pass, the agent's handling of it, the start and the exit its watcher
/// tasks report, and the scheduler's handling of those; every span follows
/// the messaging conventions; each process exports under its own
/// `service.name`.
#[tokio::test]
async fn a_job_is_one_trace_from_cli_submit_to_exit_across_five_named_services() {
    let hosts = [host("local-1", false, false)];
    let m = Mesh::start("e2etrace", &hosts, &[]).await;
    let ckpt = m.work.path().join("ckpt").join("traced").display().to_string();
    let script = super::workspace_root().join("examples/jobs/train.sh").display().to_string();
    let out = tokio::process::Command::new(super::bin_dir().join("costmesh"))
        .args(["jobs", "submit", "--nats", &m.nats.url(), "--prefix", m.subjects.prefix()])
        .args(["--name", "traced", "--duration", "30m", "--checkpoint-dir", &ckpt, "--env", "STEPS=10", "--", &script])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", m.otlp.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{printed}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    m.wait_job(&id, "the traced job succeeds", |j| j["state"] == "succeeded").await;

    let p = m.subjects.prefix().to_string();
    let submit = || {
        m.otlp
            .spans()
            .into_iter()
            .find(|s| s.service == "costmesh-cli" && s.name == format!("send {p}.api.scheduler.{{verb}}"))
    };
    let trace = costmesh_testkit::wait_for(WAIT, "the CLI's submit span", || async {
        submit().map(|s| s.trace_id).ok_or_else(|| {
            let seen: std::collections::BTreeSet<(String, String)> =
                m.otlp.spans().into_iter().map(|s| (s.service, s.name)).collect();
            format!("spans seen: {seen:?}")
        })
    })
    .await;
    let job = |s: &costmesh_testkit::otlp::ReceivedSpan, service: &str, name: &str, subject: &str| {
        s.service == service && s.name == name && s.attr("messaging.destination.name") == Some(subject)
    };
    let wanted = [
        ("scheduler", format!("process {p}.api.scheduler.{{verb}}"), format!("{p}.api.scheduler.submit")),
        ("scheduler", format!("publish {p}.node.{{node}}.assign"), format!("{p}.node.local-1.assign")),
        ("gpu-agent", format!("process {p}.node.{{node}}.assign"), format!("{p}.node.local-1.assign")),
        ("gpu-agent", format!("publish {p}.jobs.{{job}}.{{event}}"), format!("{p}.jobs.{id}.started")),
        ("gpu-agent", format!("publish {p}.jobs.{{job}}.{{event}}"), format!("{p}.jobs.{id}.exited")),
        ("scheduler", format!("process {p}.jobs.{{job}}.{{event}}"), format!("{p}.jobs.{id}.exited")),
    ];
    costmesh_testkit::eventually(WAIT, "submit, assignment, start and exit in one trace", || async {
        let spans: Vec<_> = m.otlp.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        wanted.iter().all(|(svc, name, subject)| spans.iter().any(|s| job(s, svc, name, subject)))
    })
    .await;
    let spans: Vec<_> = m.otlp.spans().into_iter().filter(|s| s.trace_id == trace).collect();
    for s in &spans {
        for key in ["messaging.system", "messaging.destination.name", "messaging.operation.type"] {
            assert!(s.attr(key).is_some(), "span {:?} of {} has no {key}: {:?}", s.name, s.service, s.attributes);
        }
        assert_eq!(s.attr("messaging.system"), Some("nats"));
        if s.name.starts_with("publish ") || s.name.starts_with("process ") && s.attr("event_id").is_some() {
            assert!(s.attr("messaging.message.id").is_some(), "span {:?} has no message id", s.name);
        }
    }
    // The assignment the agent handled is the one the scheduler published:
    // parent and child, across processes.
    let published = spans.iter().find(|s| job(s, wanted[1].0, &wanted[1].1, &wanted[1].2)).unwrap();
    let handled = spans.iter().find(|s| job(s, wanted[2].0, &wanted[2].1, &wanted[2].2)).unwrap();
    assert_eq!(handled.parent_span_id, published.span_id);

    // Five services under five names (and the CLI under its own), each with
    // an instance id; the agent's resource names its node.
    costmesh_testkit::eventually(WAIT, "spans from all five services", || async {
        let names: std::collections::BTreeSet<String> = m.otlp.spans().into_iter().map(|s| s.service).collect();
        ["gpu-agent", "scheduler", "storage-janitor", "cost-watcher", "cache-gateway"]
            .iter()
            .all(|n| names.contains(*n))
    })
    .await;
    let all = m.otlp.spans();
    for s in &all {
        assert!(s.resource.iter().any(|(k, _)| k == "service.instance.id"), "{} has no instance id", s.service);
    }
    let agent = all.iter().find(|s| s.service == "gpu-agent").unwrap();
    assert!(agent.resource.iter().any(|(k, v)| k == "costmesh.node" && v == "local-1"), "{:?}", agent.resource);

    // What the job cost: one JobCost with the energy and GPU time its agent's
    // samples named it for, in the job's trace.
    let cost = costmesh_testkit::wait_for(WAIT, "the job's JobCost", || async {
        m.seen(&format!("cost.job.{id}"))
            .into_iter()
            .find_map(|(_, e)| match e {
                AnyEvent::JobCost(c) => Some(c),
                _ => None,
            })
            .ok_or_else(|| "no JobCost yet".to_string())
    })
    .await;
    assert!(cost.energy_mj > 0 && cost.gpu_ms > 0, "{cost:?}");
    assert_eq!((cost.attempts.clone(), cost.nodes.clone()), (vec![1], vec!["local-1".to_string()]));
    assert_eq!(cost.outcome(), JobEventKind::Exited);
    costmesh_testkit::eventually(WAIT, "the JobCost's publish span in the job's trace", || async {
        m.otlp.spans().into_iter().any(|s| {
            s.trace_id == trace && s.service == "cost-watcher" && s.name == format!("publish {p}.cost.job.{{job}}")
        })
    })
    .await;
}
