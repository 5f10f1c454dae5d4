//! Processes killed the way hosts and OOM killers kill them (SIGKILL) and
//! started again: nothing promised is lost or done twice.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use costmesh_contracts::v1::{BudgetState, JobEventKind};
use costmesh_contracts::AnyEvent;
use serde_json::json;

use super::scenarios::host;
use super::{Mesh, WAIT};

/// The job processes alive on this machine, from `/proc`: job id -> attempts.
/// The ground truth for "running twice at once", whatever the services say.
pub fn job_processes() -> BTreeMap<String, BTreeSet<u32>> {
    let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        // Zombies hold no resources; they are gone for this purpose.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: BTreeMap<String, String> = env
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        if let (Some(job), Some(attempt)) = (vars.get("COSTMESH_JOB_ID"), vars.get("COSTMESH_ATTEMPT")) {
            if let Ok(a) = attempt.parse() {
                out.entry(job.clone()).or_default().insert(a);
            }
        }
    }
    out
}

/// A job and the attempts seen alive at one moment.
type Double = (String, BTreeSet<u32>);

/// Watches `/proc` until stopped; records every moment a job had two attempts alive.
pub struct DoubleRunWatch {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<Double>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DoubleRunWatch {
    pub fn start(jobs_of_this_test: Arc<Mutex<BTreeSet<String>>>) -> Self {
        let (stop, doubles) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (s, d) = (stop.clone(), doubles.clone());
        let task = tokio::spawn(async move {
            // A sample of /proc every 50 ms: a double run shorter than that
            // is not seen, one of any length that matters is.
            let mut every = tokio::time::interval(Duration::from_millis(50));
            while !s.load(Ordering::SeqCst) {
                every.tick().await;
                let mine = jobs_of_this_test.lock().unwrap().clone();
                let seen = tokio::task::spawn_blocking(job_processes).await.unwrap_or_default();
                for (job, attempts) in seen {
                    if attempts.len() > 1 && mine.contains(&job) {
                        d.lock().unwrap().push((job, attempts));
                    }
                }
            }
        });
        Self { stop, doubles, task }
    }

    pub async fn finish(self) -> Vec<Double> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let d = self.doubles.lock().unwrap().clone();
        d
    }
}

fn pid_of(reason: &str) -> Option<u32> {
    reason.strip_prefix("pid ")?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// A gpu-agent SIGKILLed with two jobs running: its jobs die with it (no
/// orphans), the scheduler declares the node lost after `node_lost_after`,
/// both jobs resume on the other node from their newest checkpoints, and the
/// restarted agent starts nothing stale.
#[tokio::test]
async fn a_killed_gpu_agent_leaves_no_orphans_and_its_jobs_resume_elsewhere_from_their_checkpoints() {
    let clock = [
        // 60x: a simulated minute is a real second.
        ("COSTMESH__MESH__SIMULATED_CLOCK__START", "2026-07-01T02:00:00Z"), // 10:00 in Taipei
        ("COSTMESH__MESH__SIMULATED_CLOCK__EPOCH", super::STARTED_AT),
        ("COSTMESH__MESH__SIMULATED_CLOCK__SPEED", "60"),
        ("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "10s"),
        ("COSTMESH__GPU_AGENT__SIM__GPUS", r#"["RTX 4090", "RTX 4090"]"#),
        ("COSTMESH__SCHEDULER__CHECKPOINT_INTERVAL", "1m"),
        ("COSTMESH__SCHEDULER__NODE_LOST_AFTER", "2m"),
        ("COSTMESH__SCHEDULER__DECIDE_INTERVAL", "10s"),
        ("COSTMESH__SCHEDULER__RETRY_BACKOFF", "10s"),
    ];
    let mut m = Mesh::start("e2eagentkill", &[host("gpu-a", false, false), host("gpu-b", false, false)], &clock).await;
    let mine: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let watch = DoubleRunWatch::start(mine.clone());
    let a = m.submit(m.train_job("a", json!({}))).await;
    mine.lock().unwrap().insert(a.clone());
    let ja = m.wait_job(&a, "a running", |j| j["state"] == "running").await;
    let node = ja["node"].as_str().unwrap().to_string();
    let other = if node == "gpu-a" { "gpu-b" } else { "gpu-a" }.to_string();
    let b = m.submit(m.train_job("b", json!({}))).await;
    mine.lock().unwrap().insert(b.clone());
    let jb = m.wait_job(&b, "b running", |j| j["state"] == "running").await;
    assert_eq!(jb["node"].as_str(), Some(node.as_str()), "tightest fit puts both on one node: {jb}");
    for id in [&a, &b] {
        m.wait_job(id, "a checkpoint", |j| j["last_checkpoint"].is_string()).await;
    }
    let pids: Vec<u32> = [&a, &b]
        .iter()
        .filter_map(|id| m.job_events(id, JobEventKind::Started).first().and_then(|e| pid_of(&e.reason)))
        .collect();
    assert_eq!(pids.len(), 2, "both jobs' pids from their started events");
    assert!(pids.iter().all(|p| alive(*p)));

    m.kill(&node).await;
    // PR_SET_PDEATHSIG: the jobs die with their agent.
    costmesh_testkit::eventually(WAIT, "the killed agent's jobs gone", || async { pids.iter().all(|p| !alive(*p)) })
        .await;
    for id in [&a, &b] {
        let j = m
            .wait_job(id, "running on the other node as attempt 2", |j| {
                j["state"] == "running" && j["attempt"] == 2 && j["node"] == other.as_str()
            })
            .await;
        let from = j["last_checkpoint"].as_str().unwrap().to_string();
        costmesh_testkit::eventually(WAIT, "resumed from its newest checkpoint", || async {
            m.job_log(&other, id, 2).contains(&format!("resumed from {from}"))
        })
        .await;
        let lost = m.job_events(id, JobEventKind::Lost);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].reason.contains(&format!("node {node} silent")), "{}", lost[0].reason);
    }

    // The agent comes back: nothing stale starts, the jobs stay where they are.
    m.restart(&node).await;
    m.wait_nodes(2).await;
    // Once its assignments and signals are all handled, anything stale it
    // would have started has started.
    let durable = format!("gpu-agent-node-{node}");
    costmesh_testkit::eventually(WAIT, "the restarted agent caught up with its assignments", || async {
        m.bus.consumer_backlog(&m.subjects.stream_name(), &durable).await.is_ok_and(|n| n == 0)
    })
    .await;
    for id in [&a, &b] {
        let starts: Vec<(String, u32)> =
            m.job_events(id, JobEventKind::Started).iter().map(|e| (e.node.clone(), e.attempt)).collect();
        assert_eq!(starts, vec![(node.clone(), 1), (other.clone(), 2)], "{id}");
        let j = m.api("show", json!({ "id": id })).await["job"].clone();
        assert_eq!((j["state"].as_str(), j["attempt"].as_u64()), (Some("running"), Some(2)), "{j}");
    }
    let doubles = watch.finish().await;
    assert!(doubles.is_empty(), "jobs ran twice at once: {doubles:?}");
    m.all_alive();
    for id in [&a, &b] {
        m.api("cancel", json!({ "id": id })).await;
    }
    costmesh_testkit::eventually(WAIT, "cancelled jobs' processes gone", || async {
        let p = job_processes();
        !p.contains_key(&a) && !p.contains_key(&b)
    })
    .await;
}

/// A GCP budget notification for this month (in the ledger's time zone), so
/// it counts against the monthly budget too.
fn notification(cost_usd: f64) -> Vec<u8> {
    use chrono::Datelike;
    let now = chrono::Utc::now().with_timezone(&chrono_tz::Asia::Taipei);
    let start = format!("{:04}-{:02}-01T00:00:00+08:00", now.year(), now.month());
    format!(
        r#"{{"budgetDisplayName":"cloud-inference","costAmount":{cost_usd},"costIntervalStart":"{start}","budgetAmount":100.0,"budgetAmountType":"SPECIFIED_AMOUNT","currencyCode":"USD"}}"#
    )
    .into_bytes()
}

/// Every stored event under `filter`, oldest first: (subject, ce-source, event).
async fn stored(m: &Mesh, filter: &str) -> Vec<(String, String, AnyEvent)> {
    stored_with_terms(m, filter).await.into_iter().map(|(subject, source, _, e)| (subject, source, e)).collect()
}

/// [`stored`] with the lease term each event was published under.
async fn stored_with_terms(m: &Mesh, filter: &str) -> Vec<(String, String, Option<u64>, AnyEvent)> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let spec = costmesh_bus::ConsumerSpec {
        stream: m.subjects.stream_name(),
        durable: format!("test-audit-{}", N.fetch_add(1, Ordering::SeqCst)),
        filter_subjects: vec![filter.to_string()],
        ack_wait: Duration::from_secs(30),
        max_deliver: 1,
        deliver_from: costmesh_bus::DeliverFrom::All,
    };
    let mut sub = m.bus.consume(&spec).await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(dm)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        let _ = dm.ack().await;
        let msg = &dm.message;
        let source = msg.headers.get(costmesh_contracts::headers::names::SOURCE).unwrap_or_default().to_string();
        let term = msg.headers.get(costmesh_runtime::events::LEASE_TERM).and_then(|t| t.parse().ok());
        if let Ok((_, e)) = costmesh_contracts::decode_any(&msg.headers, &msg.payload) {
            out.push((msg.subject.clone(), source, term, e));
        }
    }
    out
}

/// What the storage reports on the stream should have booked: each report
/// books its monthly cost for the time since the one before (as the
/// cost-watcher's rule says), so any report lost or booked twice shows.
fn expected_storage_micros(reports: &[(String, String, AnyEvent)], tz: chrono_tz::Tz) -> i64 {
    let mut times: Vec<(chrono::DateTime<chrono::Utc>, i64)> = reports
        .iter()
        .filter_map(|(_, _, e)| match e {
            AnyEvent::StorageReport(r) => Some((
                r.time.as_ref().and_then(costmesh_contracts::from_timestamp)?,
                r.usage.iter().filter_map(|u| u.monthly_cost.as_ref()).map(|c| c.micros).sum(),
            )),
            _ => None,
        })
        .collect();
    times.sort();
    let mut total = 0;
    for w in times.windows(2) {
        let ((prev, _), (at, monthly)) = (w[0], w[1]);
        if at > prev {
            let period = costmesh_cost_watcher::ledger::period_of(at, tz);
            let (start, end) = costmesh_cost_watcher::ledger::period_bounds(&period, tz).unwrap();
            let share = (at - prev).num_seconds() as f64 / (end - start).num_seconds() as f64;
            total += (monthly as f64 * share).round() as i64;
        }
    }
    total
}

async fn summary(m: &Mesh) -> serde_json::Value {
    costmesh_testkit::wait_for(WAIT, "the cost-watcher's summary", || async {
        match m
            .bus
            .request(
                &m.subjects.api("cost-watcher", "summary"),
                Default::default(),
                Default::default(),
                Duration::from_secs(3),
            )
            .await
        {
            Ok(r) => serde_json::from_slice::<serde_json::Value>(&r.payload).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// The kill matrix: each of the five services SIGKILLed and restarted while
/// jobs run, requests flow, storage reports and telemetry are booked and a
/// budget is exceeded; then nats-server SIGKILLed and restarted. Printed and
/// asserted: jobs lost, jobs running twice at once, ledger amounts lost or
/// double-booked, budget events missing or repeated, budget reactions
/// forgotten after a restart, in-use models planned for retirement: all 0.
#[tokio::test]
async fn kill_matrix_every_service_and_nats_sigkilled_and_restarted_loses_and_repeats_nothing() {
    let env = [
        ("COSTMESH__GPU_AGENT__SIM__GPUS", r#"["RTX 4090", "RTX 4090"]"#),
        ("COSTMESH__SCHEDULER__NODE_LOST_AFTER", "3s"),
    ];
    let hosts = [host("local-1", false, false), host("cloud-1", true, false)];
    let mut m = Mesh::start_with_billing("e2ekills", &hosts, &env).await;
    let tz = chrono_tz::Asia::Taipei;
    // Model versions on the janitor's disk; the local job uses the oldest.
    let models = m.work.path().join("storage/models/llm");
    for v in 0..5u64 {
        let p = models.join(format!("v{v}/weights.bin"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![v as u8; 4096]).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs((20 - v) * 86_400)).unwrap();
    }
    // The newest version is big (sparse: no disk used), so storage cost
    // books whole micros between reports.
    std::fs::File::options().write(true).open(models.join("v4/weights.bin")).unwrap().set_len(200 << 30).unwrap();
    let in_use = models.join("v0");
    let mine: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let watch = DoubleRunWatch::start(mine.clone());
    let (stop, ok, failed, clients) = super::scenarios::client_loop(&m);

    let local =
        m.submit(m.train_job("local", json!({"args": [in_use.join("weights.bin").display().to_string()]}))).await;
    mine.lock().unwrap().insert(local.clone());
    m.wait_job(&local, "local running", |j| j["state"] == "running" && j["node"] == "local-1").await;
    // Fill local-1 so the cloud job goes to the cloud.
    let filler = m.submit(m.train_job("filler", json!({}))).await;
    mine.lock().unwrap().insert(filler.clone());
    m.wait_job(&filler, "filler running", |j| j["state"] == "running" && j["node"] == "local-1").await;
    let cloud = m.submit(m.train_job("cloudy", json!({"cloudOk": true}))).await;
    mine.lock().unwrap().insert(cloud.clone());
    m.wait_job(&cloud, "cloud job running", |j| j["state"] == "running" && j["node"] == "cloud-1").await;
    let mut submitted = vec![local.clone(), filler.clone(), cloud.clone()];

    // 1. cost-watcher killed; the 85 % notification waits in Pub/Sub (Google's emulator).
    m.kill("cost-watcher").await;
    m.notify(notification(85.0), super::scenarios::attrs());
    m.restart("cost-watcher").await;
    // The emulator may have handed it to the killed subscriber's stream: it
    // comes back when that lease lapses, every 10 s, to a stream it picks,
    // sometimes the dead one again (see services/cost-watcher/tests/pubsub.rs).
    costmesh_testkit::eventually(super::PUBSUB_WAIT, "the warning", || async {
        !m.seen("budget.cloud.warning").is_empty()
    })
    .await;
    let at_85 = summary(&m).await["cost"]["cloud"].as_f64().unwrap();

    // 2. storage-janitor killed around its warning pass, then restarted.
    m.kill("storage-janitor").await;
    m.restart("storage-janitor").await;

    // 3. scheduler killed with three jobs running; restarted, it carries on.
    m.kill("scheduler").await;
    m.restart("scheduler").await;
    m.wait_nodes(2).await;

    // 4. nats-server killed and restarted: every service reconnects.
    m.nats.stop();
    costmesh_testkit::eventually(WAIT, "readiness follows the outage", || async {
        let (status, body) = m.readyz("scheduler").await;
        status == 503 && body.contains("disconnected")
    })
    .await;
    m.nats.start();
    m.wait_ready().await;

    // 5. Over budget: cloud work stops, the low-priority route is shed.
    m.notify(notification(105.0), super::scenarios::attrs());
    // The emulator still holds the stream of the cost-watcher killed in
    // step 1 and may hand the notification there first (see step 1).
    costmesh_testkit::eventually(super::PUBSUB_WAIT, "exceeded", || async {
        !m.seen("budget.cloud.exceeded").is_empty()
    })
    .await;
    m.wait_job(&cloud, "cloud job stopped", |j| j["state"] == "queued").await;
    costmesh_testkit::eventually(WAIT, "the low-priority route shed", || async {
        m.ask("batch", r#"{"q":"shed"}"#, false).await.0 == 503
    })
    .await;
    let at_105 = summary(&m).await["cost"]["cloud"].as_f64().unwrap();

    // 6. scheduler killed and restarted: it still gates cloud work.
    m.kill("scheduler").await;
    m.restart("scheduler").await;
    m.wait_nodes(2).await;
    let late = m.submit(m.train_job("late-cloud", json!({"cloudOk": true}))).await;
    mine.lock().unwrap().insert(late.clone());
    submitted.push(late.clone());
    let gated = m
        .wait_job(&late, "new cloud work gated after the restart", |j| {
            j["reason"].as_str().is_some_and(|r| r.contains("budget exceeded"))
        })
        .await;
    assert_eq!(gated["state"], "queued", "{gated}");

    // 7. cache-gateway killed and restarted: still shedding.
    m.kill("cache-gateway").await;
    m.restart("cache-gateway").await;
    let (status, _) = m.ask("batch", r#"{"q":"after-restart"}"#, false).await;
    let shed_forgotten = usize::from(status != 503);

    // 8. cost-watcher killed again; a repeated notification changes nothing.
    m.kill("cost-watcher").await;
    m.restart("cost-watcher").await;
    let relayed = m.seen("billing.gcp").len();
    m.notify(notification(105.0), super::scenarios::attrs());
    // Two killed subscribers' streams are still held by the emulator now.
    costmesh_testkit::eventually(super::PUBSUB_WAIT, "the repeat read and relayed", || async {
        m.seen("billing.gcp").len() > relayed
    })
    .await;

    // 9. storage-janitor killed; after its restart a pass (asked for by a
    // budget warning on a scope of the test's) still spares the model in use.
    m.kill("storage-janitor").await;
    m.restart("storage-janitor").await;
    let reports_before = m.seen("storage.report").len();
    let nudge = costmesh_contracts::v1::BudgetEvent {
        scope: "test".into(),
        state: BudgetState::Warning as i32,
        period: "test".into(),
        ..Default::default()
    };
    let (h, p) = costmesh_contracts::encode(
        &nudge,
        &costmesh_contracts::EventMeta::new::<costmesh_contracts::v1::BudgetEvent>(
            "kill-matrix",
            chrono::Utc::now(),
            costmesh_contracts::ContentType::Protobuf,
        ),
    );
    m.bus.publish_durable(&m.subjects.budget("test", BudgetState::Warning), h, p).await.unwrap();
    m.wait_seen("storage.report", "a pass after the janitor restart", reports_before + 1).await;

    // The audit. Telemetry is cumulative: energy a killed cost-watcher had
    // booked but not saved is booked again from the next sample, so the
    // restarted one must have seen a sample before the agents stop.
    let before = summary(&m).await["energy_kwh"].as_f64().unwrap_or_default();
    costmesh_testkit::eventually(WAIT, "the cost-watcher booking telemetry again", || async {
        summary(&m).await["energy_kwh"].as_f64().is_some_and(|e| e > before)
    })
    .await;
    // Telemetry stops so the energy ledger can be compared exactly.
    stop.store(true, Ordering::SeqCst);
    let _ = clients.await;
    let doubles = watch.finish().await;
    m.kill("local-1").await;
    m.kill("cloud-1").await;
    // Telemetry as the cost-watcher should book it: the same rule, fed every
    // sample the mesh's recorder saw (it subscribed before any agent started).
    // The last samples are booked when the ledger and the recorder agree;
    // if they never do, the comparison below says by how much.
    let truth_kwh = || recorded_energy(&m).total_kwh();
    ledger_agrees_with_telemetry(&m).await;
    let s = summary(&m).await;

    // Attribution, through every kill: the node rows hold exactly the
    // recorded energy, and the job and idle rows add up to them.
    let m_ref = &m;
    let by = |by: &'static str| async move {
        let m = m_ref;
        let r = m
            .bus
            .request(
                &m.subjects.api("cost-watcher", "attribution"),
                Default::default(),
                bytes::Bytes::from(json!({ "by": by }).to_string()),
                WAIT,
            )
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["rows"].as_array().cloned().unwrap_or_default()
    };
    let exact = |rows: &[serde_json::Value], key: &str| -> u64 {
        rows.iter().map(|r| r["exact"][key].as_u64().unwrap_or(0)).sum()
    };
    let (nodes, jobs_rows) = (by("node").await, by("job").await);
    let truth_mj: u64 = recorded_energy(&m).total_mj();
    let attribution_off = usize::from(exact(&nodes, "energy_mj") != truth_mj)
        + usize::from(exact(&jobs_rows, "energy_mj") != exact(&nodes, "energy_mj"))
        + usize::from(exact(&jobs_rows, "gpu_ms") != exact(&nodes, "gpu_ms"))
        + usize::from(exact(&jobs_rows, "electricity_micros") != exact(&nodes, "electricity_micros"));
    let job_costs = stored(&m, &format!("{}.cost.job.>", m.subjects.prefix())).await;
    let mut costs_per_job: BTreeMap<String, usize> = BTreeMap::new();
    for (subject, _, _) in &job_costs {
        *costs_per_job.entry(subject.clone()).or_default() += 1;
    }
    let job_costs_repeated: usize = costs_per_job.values().map(|n| n - 1).sum();

    let jobs = m.api("list", json!({})).await;
    let known: BTreeSet<String> =
        jobs["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    let jobs_lost = submitted.iter().filter(|id| !known.contains(*id)).count()
        + jobs["jobs"].as_array().unwrap().iter().filter(|j| j["state"] == "failed").count();

    let (by, _) = budget_events(&m).await;
    let repeated: usize = by.values().map(|n| n - 1).sum();
    let missing = [("cloud", BudgetState::Warning), ("cloud", BudgetState::Exceeded), ("total", BudgetState::Exceeded)]
        .iter()
        .filter(|(scope, state)| !by.keys().any(|(s, st, _)| s == scope && *st == *state as i32))
        .count();

    let reports = stored(&m, &m.subjects.storage_report()).await;
    let expected_storage = expected_storage_micros(&reports, tz) as f64 / 1e6;
    let booked_storage = s["cost"]["storage"].as_f64().unwrap_or(f64::NAN);
    let expected_kwh = truth_kwh();
    let booked_kwh = s["energy_kwh"].as_f64().unwrap_or(f64::NAN);
    let booked_cloud = s["cost"]["cloud"].as_f64().unwrap_or(f64::NAN);
    // The 85 and 105 USD totals at one exchange rate: neither lost nor added twice.
    let cloud_off = ((at_105 / at_85) - 105.0 / 85.0).abs() > 1e-6 || (booked_cloud - at_105).abs() > 1e-6;
    let storage_off = (booked_storage - expected_storage).abs() > 1e-6;
    let energy_off = (booked_kwh - expected_kwh).abs() > 1e-9 * expected_kwh.max(1.0);
    let ledger_off = usize::from(cloud_off) + usize::from(storage_off) + usize::from(energy_off);

    let cloud_after_exceeded = m
        .seen("jobs.")
        .iter()
        .filter(|(_, e)| {
            matches!(e, AnyEvent::JobEvent(j) if j.kind() == JobEventKind::Assigned && j.node == "cloud-1" && j.job_id != cloud)
        })
        .count();
    let reactions_forgotten = shed_forgotten + cloud_after_exceeded;

    let model_planned = m
        .seen("storage.report")
        .iter()
        .filter_map(|(_, e)| match e {
            AnyEvent::StorageReport(r) => Some(r.actions.iter().filter(|a| a.path.contains("models/llm/v0")).count()),
            _ => None,
        })
        .sum::<usize>();

    println!(
        "kill matrix: jobs lost {jobs_lost}, jobs running twice at once {}, ledger amounts lost or double-booked {ledger_off} \
         (cloud {booked_cloud:.2} after 85 {at_85:.2} / 105 {at_105:.2}; storage {booked_storage:.6} vs {expected_storage:.6} \
         from {} reports; energy {booked_kwh:.9} vs {expected_kwh:.9} kWh), budget events missing {missing} repeated {repeated} \
         ({by:?}), budget reactions forgotten {reactions_forgotten}, in-use models planned for retirement {model_planned}; \
         attribution rows off {attribution_off} ({} node rows, {} job rows, {truth_mj} mJ recorded), job costs {} ({job_costs_repeated} repeated); \
         gateway requests ok {} failed {}",
        doubles.len(),
        reports.len(),
        nodes.len(),
        jobs_rows.len(),
        job_costs.len(),
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    assert_eq!(jobs_lost, 0, "{jobs}");
    assert!(doubles.is_empty(), "jobs ran twice at once: {doubles:?}");
    assert_eq!(ledger_off, 0, "ledger: {s}");
    assert_eq!((missing, repeated), (0, 0), "{by:?}");
    assert_eq!(reactions_forgotten, 0);
    assert_eq!(model_planned, 0);
    assert_eq!(attribution_off, 0, "attribution: nodes {nodes:#?} jobs {jobs_rows:#?}");
    assert_eq!(job_costs_repeated, 0, "{costs_per_job:?}");
    assert!(reports.len() >= 3, "the janitor reported across its restarts");
}

/// The cost-watcher's stored budget events counted by (scope, state,
/// threshold), and the lease terms they were published under.
async fn budget_events(m: &Mesh) -> (BTreeMap<(String, i32, String), usize>, BTreeSet<u64>) {
    let (mut by, mut terms) = (BTreeMap::new(), BTreeSet::new());
    for (_, source, term, e) in stored_with_terms(m, &format!("{}.budget.>", m.subjects.prefix())).await {
        if let AnyEvent::BudgetEvent(b) = e {
            if source == "cost-watcher" {
                *by.entry((b.scope.clone(), b.state, format!("{}", b.threshold))).or_default() += 1;
                terms.extend(term);
            }
        }
    }
    (by, terms)
}

/// Telemetry as the cost-watcher should book it: the same rule, fed every
/// sample the mesh's recorder saw (it subscribed before any agent started).
fn recorded_energy(m: &Mesh) -> costmesh_cost_watcher::energy::EnergyLedger {
    let telemetry = format!("{}.telemetry.gpu.", m.subjects.prefix());
    let mut truth = costmesh_cost_watcher::energy::EnergyLedger::default();
    for (subject, e) in m.events.lock().unwrap().iter() {
        if let AnyEvent::GpuSample(s) = e {
            if subject.starts_with(&telemetry) {
                truth.observe(&s.node, s.gpu_index, &s.boot_id, s.energy_mj);
            }
        }
    }
    truth
}

/// Waits until the ledger holds exactly the recorded energy (the last
/// samples are booked when they agree; if they never do, the failure says by
/// how much): (booked, recorded) kWh.
async fn ledger_agrees_with_telemetry(m: &Mesh) -> (f64, f64) {
    costmesh_testkit::wait_for(WAIT, "the ledger agreeing with the recorded telemetry", || async {
        let (booked, recorded) =
            (summary(m).await["energy_kwh"].as_f64().unwrap_or_default(), recorded_energy(m).total_kwh());
        if (booked - recorded).abs() <= 1e-9 * recorded.max(1.0) {
            Ok((booked, recorded))
        } else {
            Err(format!("booked {booked:.9} kWh, recorded {recorded:.9} kWh"))
        }
    })
    .await
}

/// Two simulated RTX 4090s and a budget whose thresholds their draw
/// crosses every few seconds (8 TWD at 1,000 TWD/kWh, warnings every 10 %).
const BURN: [(&str, &str); 4] = [
    ("COSTMESH__GPU_AGENT__SIM__GPUS", r#"["RTX 4090", "RTX 4090"]"#),
    ("COSTMESH__COST_WATCHER__ELECTRICITY_PRICE_PER_KWH", "1000"),
    ("COSTMESH__COST_WATCHER__MONTHLY_BUDGET", "8"),
    ("COSTMESH__COST_WATCHER__EXTRA_THRESHOLDS", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]"),
];

/// `Assigned` job events counted by (job, attempt).
fn assignments<'a>(events: impl Iterator<Item = &'a AnyEvent>) -> BTreeMap<(String, u32), usize> {
    let mut assigned = BTreeMap::new();
    for e in events {
        if let AnyEvent::JobEvent(j) = e {
            if j.kind() == JobEventKind::Assigned {
                *assigned.entry((j.job_id.clone(), j.attempt)).or_default() += 1;
            }
        }
    }
    assigned
}

/// Submits `spec`, asking again while no scheduler answers (between an
/// active one's death and its standby's takeover the API has no responder).
async fn submit_when_answered(m: &Mesh, spec: serde_json::Value) -> String {
    // One request id for every try, as `costmesh jobs submit` does: a try
    // that landed but whose answer was lost is the same job, not a second.
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    costmesh_testkit::wait_for(WAIT, "a scheduler taking the job", || async {
        let r = m.api_as("submit", spec.clone(), Some(&request_id)).await;
        r["job"]["id"].as_str().map(str::to_string).ok_or_else(|| r.to_string())
    })
    .await
}

/// Two schedulers and two cost-watchers. The active one of each is
/// SIGKILLed while a job runs and budget events flow; the standbys take
/// over within the lease's TTL plus a pass. Then the new active scheduler is
/// cut off from NATS (its connection, through a proxy, not its process): it
/// stops acting once its lease runs out, the restarted first one takes
/// over, and nothing stamped with the cut-off one's term lands after the
/// new term began. Printed and asserted: jobs placed twice, jobs running
/// twice at once, budget events repeated, energy booked twice.
#[tokio::test]
async fn standby_deciders_take_over_from_killed_and_cut_off_active_ones_and_nothing_is_done_twice() {
    let mut m = Mesh::start_with_standbys("e2estandby", &[host("local-1", false, false)], &BURN).await;
    let ttl = Duration::from_secs(3);
    assert_eq!(m.active_of(&["scheduler", "scheduler-2"], WAIT).await, "scheduler");
    assert_eq!(m.active_of(&["cost-watcher", "cost-watcher-2"], WAIT).await, "cost-watcher");
    for standby in ["scheduler-2", "cost-watcher-2"] {
        let (status, body) = m.readyz(standby).await;
        assert!(status == 200 && body.contains("lease: ok, standby (active: "), "{standby}: {status} {body}");
    }
    let mine: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let watch = DoubleRunWatch::start(mine.clone());
    let a = m.submit(m.train_job("a", json!({}))).await;
    mine.lock().unwrap().insert(a.clone());
    m.wait_job(&a, "a running", |j| j["state"] == "running").await;
    costmesh_testkit::eventually(WAIT, "a budget event before the kill", || async {
        !m.seen("budget.total.").is_empty()
    })
    .await;

    // 1. Both active deciders SIGKILLed at once.
    m.kill("scheduler").await;
    m.kill("cost-watcher").await;
    let killed = std::time::Instant::now();
    let b = submit_when_answered(&m, m.train_job("b", json!({}))).await;
    mine.lock().unwrap().insert(b.clone());
    let sched_took = killed.elapsed();
    m.active_of(&["scheduler-2"], WAIT).await;
    m.wait_job(&b, "b running", |j| j["state"] == "running").await;
    let b_running = killed.elapsed();
    m.active_of(&["cost-watcher-2"], WAIT).await;
    let cw_took = killed.elapsed();
    costmesh_testkit::eventually(WAIT * 4, "the budget exceeded, under the new cost-watcher", || async {
        !m.seen("budget.total.exceeded").is_empty()
    })
    .await;

    // 2. The killed scheduler comes back as a standby; the active one
    // (scheduler-2) is cut off from NATS.
    m.restart("scheduler").await;
    assert!(m.readyz("scheduler").await.1.contains("lease: ok, standby"));
    m.proxies["scheduler-2"].cut();
    let cut = std::time::Instant::now();
    costmesh_testkit::eventually(WAIT, "the cut-off scheduler standing down", || async {
        m.readyz("scheduler-2").await.1.contains("standby")
    })
    .await;
    let stood_down = cut.elapsed();
    m.active_of(&["scheduler"], WAIT).await;
    let taken_back = cut.elapsed();
    let c = submit_when_answered(&m, m.train_job("c", json!({}))).await;
    mine.lock().unwrap().insert(c.clone());
    // One GPU each for a and b: c waits for one of them or runs; either
    // way it is placed once when it is.
    m.proxies["scheduler-2"].heal();
    costmesh_testkit::eventually(WAIT, "the healed scheduler a standby of the new term", || async {
        let (status, body) = m.readyz("scheduler-2").await;
        status == 200 && body.contains("lease: ok, standby (active: ")
    })
    .await;
    m.api("cancel", json!({ "id": a })).await;
    m.wait_job(&c, "c running", |j| j["state"] == "running").await;

    // The audit.
    let doubles = watch.finish().await;
    let prefix = m.subjects.prefix().to_string();
    let jobs = stored_with_terms(&m, &format!("{prefix}.jobs.>")).await;
    let assigned = assignments(jobs.iter().map(|(_, _, _, e)| e));
    let placed_twice: usize = assigned.values().map(|n| n - 1).sum();
    let a_attempts = assigned.keys().filter(|(j, _)| *j == a).count();
    // Terms of the scheduler's events, in stream order: once a higher term
    // appears, no lower one may follow (a deposed scheduler's late write).
    let sched_terms: Vec<u64> =
        jobs.iter().filter(|(_, source, _, _)| source.starts_with("scheduler")).filter_map(|(_, _, t, _)| *t).collect();
    let late_writes = sched_terms.windows(2).filter(|w| w[1] < w[0]).count();
    let (by, budget_terms) = budget_events(&m).await;
    let repeated: usize = by.values().map(|n| n - 1).sum();
    let thresholds = by.keys().filter(|(scope, _, _)| scope == "total").count();

    // Energy: agents stop, and the ledger must hold exactly what was sampled.
    m.kill("local-1").await;
    let (booked, recorded) = ledger_agrees_with_telemetry(&m).await;
    println!(
        "standby takeover (lease ttl {ttl:?}): scheduler answering {sched_took:?} after the kill, job placed and running \
         {b_running:?}, cost-watcher active {cw_took:?}; cut-off scheduler stood down after {stood_down:?}, the other \
         took over after {taken_back:?}; jobs placed twice {placed_twice}, running twice at once {}, scheduler events \
         after a higher term {late_writes} (terms {:?}), budget events repeated {repeated} ({thresholds} total \
         thresholds, terms {budget_terms:?}), energy booked {booked:.9} vs recorded {recorded:.9} kWh",
        doubles.len(),
        sched_terms.iter().collect::<BTreeSet<_>>(),
    );
    assert_eq!(placed_twice, 0, "{assigned:?}");
    assert_eq!(a_attempts, 1, "a ran on through the takeovers: {assigned:?}");
    assert!(doubles.is_empty(), "{doubles:?}");
    assert_eq!(late_writes, 0, "{sched_terms:?}");
    assert!(sched_terms.iter().collect::<BTreeSet<_>>().len() >= 3, "three scheduler terms: {sched_terms:?}");
    assert_eq!(repeated, 0, "{by:?}");
    assert!(budget_terms.len() >= 2, "budget events from both cost-watchers: {budget_terms:?}");
    assert_eq!(thresholds, 9, "every threshold once: {by:?}");
}

/// The server (`n0`, `n1`, ...) leading the mesh's events stream.
async fn events_leader(m: &Mesh) -> usize {
    let costmesh_bus::Bus::Nats(nats) = &m.bus else { panic!("a NATS mesh") };
    let js = async_nats::jetstream::new(nats.client().clone());
    let name = m.subjects.stream_name();
    let leader = costmesh_testkit::wait_for(WAIT, "a leader for the events stream", || async {
        let mut s = js.get_stream(&name).await.map_err(|e| e.to_string())?;
        let info = s.info().await.map_err(|e| e.to_string())?;
        info.cluster.as_ref().and_then(|c| c.leader.clone()).ok_or_else(|| "no leader yet".to_string())
    })
    .await;
    leader.strip_prefix('n').and_then(|i| i.parse().ok()).unwrap_or_else(|| panic!("leader {leader}"))
}

fn server(m: &mut Mesh, i: usize) -> &mut costmesh_testkit::NatsServer {
    if i == 0 {
        &mut m.nats
    } else {
        &mut m.peers[i - 1]
    }
}

/// The whole mesh on a 3-node nats-server cluster (R3 streams and buckets).
/// While a job runs, telemetry is booked and budget events flow, the events
/// stream's leader is SIGKILLed, a job is submitted and placed, and the
/// server comes back; then another server is SIGKILLed and restarted.
/// Printed and asserted: no service process exited, no job placed twice or
/// running twice, every budget threshold published once, energy booked
/// exactly as sampled.
#[tokio::test]
async fn on_a_three_node_cluster_killing_any_server_and_the_stream_leader_loses_nothing_and_stops_no_service() {
    let env = [
        BURN[0],
        BURN[1],
        BURN[2],
        BURN[3],
        // The default ttl: an election of the lease bucket's leader after
        // a server's death must not look like a dead holder (with 3 s the
        // scheduler stood down at 2.4 s and reloaded while the job waited).
        ("COSTMESH__MESH__LEASE__TTL", "10s"),
    ];
    let mut m = Mesh::start_on_cluster("e2ecluster", &[host("local-1", false, false)], &env).await;
    let mine: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let watch = DoubleRunWatch::start(mine.clone());
    let a = m.submit(m.train_job("a", json!({}))).await;
    mine.lock().unwrap().insert(a.clone());
    m.wait_job(&a, "a running", |j| j["state"] == "running").await;
    costmesh_testkit::eventually(WAIT, "a budget event before the kill", || async {
        !m.seen("budget.total.").is_empty()
    })
    .await;

    // 1. The events stream's leader.
    let leader = events_leader(&m).await;
    server(&mut m, leader).stop();
    let b = submit_when_answered(&m, m.train_job("b", json!({}))).await;
    mine.lock().unwrap().insert(b.clone());
    m.wait_job_for(WAIT * 2, &b, "b running with the leader down", |j| j["state"] == "running").await;
    server(&mut m, leader).start();

    // 2. Another server than the (new) leader.
    let now_leader = events_leader(&m).await;
    let other = (0..3).find(|i| *i != now_leader && *i != leader).or((0..3).find(|i| *i != now_leader)).unwrap();
    server(&mut m, other).stop();
    costmesh_testkit::eventually(WAIT * 4, "the budget exceeded", || async {
        !m.seen("budget.total.exceeded").is_empty()
    })
    .await;
    server(&mut m, other).start();
    m.all_alive();

    let doubles = watch.finish().await;
    let jobs = stored(&m, &format!("{}.jobs.>", m.subjects.prefix())).await;
    let assigned = assignments(jobs.iter().map(|(_, _, e)| e));
    let placed_twice: usize = assigned.values().map(|n| n - 1).sum();
    let (by, _) = budget_events(&m).await;
    let repeated: usize = by.values().map(|n| n - 1).sum();
    let thresholds = by.keys().filter(|(scope, _, _)| scope == "total").count();
    // Submits sent again while no answer came are one job.
    let list = m.api("list", json!({})).await;
    let named_b = list["jobs"].as_array().into_iter().flatten().filter(|j| j["spec"]["name"] == "b").count();
    assert_eq!(named_b, 1, "{list}");
    m.kill("local-1").await;
    let (booked, recorded) = ledger_agrees_with_telemetry(&m).await;
    println!(
        "3-node cluster: killed n{leader} (events leader) then n{other}; services exited 0, jobs placed twice \
         {placed_twice} ({} assignments), running twice at once {}, budget events repeated {repeated} ({thresholds} \
         total thresholds), energy booked {booked:.9} vs recorded {recorded:.9} kWh",
        assigned.len(),
        doubles.len()
    );
    assert_eq!(placed_twice, 0, "{assigned:?}");
    assert!(assigned.keys().any(|(j, _)| *j == b), "b was placed: {assigned:?}");
    assert!(doubles.is_empty(), "{doubles:?}");
    assert_eq!(repeated, 0, "{by:?}");
    assert_eq!(thresholds, 9, "every threshold once: {by:?}");
}
