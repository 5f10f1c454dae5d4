//! The scheduler with simulated gpu-agents over a real nats-server, in
//! virtual time (Asia/Taipei; 2026-07-01 is a Wednesday).
use std::time::Duration;

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::{BudgetEvent, BudgetState, JobEvent, JobEventKind, PreemptionNotice};
use costmesh_runtime::tariff::{Days, Tariff, TouPeriod};
use serde_json::{json, Value};

mod common;
use common::{job, node, Mesh, SAMPLE, WAIT};

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn at(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().unwrap_or_else(|| panic!("not a time: {v}")).parse().unwrap()
}

#[tokio::test]
async fn a_large_job_waits_for_off_peak_and_a_deadline_job_starts_at_once() {
    // 14:00 in Taipei.
    let m =
        Mesh::start("offpeak", "2026-07-01T06:00:00Z", Default::default(), &[node("local-1", 2, false, false)]).await;
    let big = m.submit(job("big", 4.0, json!({}))).await;
    let urgent = m.submit(job("urgent", 1.0, json!({"deadline": "2026-07-01T08:00:00Z"}))).await; // 16:00
    let deferred = m.wait_event("big deferred", |e| e.job_id == big && e.kind() == JobEventKind::Deferred).await;
    assert!(deferred.reason.contains("off-peak"), "{}", deferred.reason);
    m.wait_event("urgent started", |e| e.job_id == urgent && e.kind() == JobEventKind::Started).await;
    let u = m.show(&urgent).await;
    assert_eq!(at(&u["assigned_at"]), at(&u["submitted_at"]), "the deadline job did not wait");
    assert_eq!(at(&m.show(&big).await["planned_start"]), t("2026-07-01T15:00:00Z"));

    // Nine virtual hours later it is 23:00 in Taipei.
    m.time.advance_to(t("2026-07-01T15:00:00Z")).await;
    m.wait_event("big started", |e| e.job_id == big && e.kind() == JobEventKind::Started).await;
    // The agent's started event reaches this test and the scheduler separately.
    m.wait_state(&big, "running").await;
    let b = m.show(&big).await;
    assert_eq!(at(&b["assigned_at"]), t("2026-07-01T15:00:00Z"));
    assert_eq!(m.count(&urgent, JobEventKind::Lost), 0, "no node was lost while time jumped");
}

#[tokio::test]
async fn with_a_two_price_tariff_the_cheapest_feasible_start_is_chosen() {
    let all = |from: &str, to: &str, price| TouPeriod {
        months: (1..=12).collect(),
        days: Days::All,
        from: from.into(),
        to: to.into(),
        price_per_kwh: price,
    };
    let cfg = costmesh_scheduler::Config {
        tariff: Tariff { periods: vec![all("20:00", "24:00", 1.2), all("00:00", "24:00", 4.4)] },
        ..Default::default()
    };
    let m = Mesh::start("tou", "2026-07-01T06:00:00Z", cfg, &[node("local-1", 1, false, false)]).await;
    // 2 h, due by 23:00 Taipei: the cheap block from 20:00 fits it whole.
    let id = m.submit(job("tou", 2.0, json!({"deadline": "2026-07-01T15:00:00Z"}))).await;
    let d = m.wait_event("deferred", |e| e.job_id == id && e.kind() == JobEventKind::Deferred).await;
    assert!(d.reason.contains("time-of-use"), "{}", d.reason);
    assert_eq!(at(&m.show(&id).await["planned_start"]), t("2026-07-01T12:00:00Z"));
    m.time.advance_to(t("2026-07-01T12:00:00Z")).await;
    m.wait_event("started at 20:00", |e| e.job_id == id && e.kind() == JobEventKind::Started).await;
    assert_eq!(at(&m.show(&id).await["assigned_at"]), t("2026-07-01T12:00:00Z"));
}

#[tokio::test]
async fn checkpoints_every_15_minutes_and_a_preemption_resumes_elsewhere_from_the_checkpoint() {
    let nodes = [node("spot-1", 1, true, true), node("spot-2", 1, true, true)];
    let m = Mesh::start("preempt", "2026-07-01T06:00:00Z", Default::default(), &nodes).await;
    let ckpt = m.work.join("ckpt");
    let id = m
        .submit(job(
            "spotty",
            1.0,
            json!({"cloudOk": true, "preemptibleOk": true, "maxRetries": 3, "checkpointDir": ckpt.display().to_string()}),
        ))
        .await;
    let started = m.wait_event("started", |e| e.job_id == id && e.kind() == JobEventKind::Started).await;
    let first = started.node.clone();
    m.job_ready(&first, &id, 1).await;
    m.wait_state(&id, "running").await;

    // Two periodic checkpoints, one per 15 virtual minutes.
    for n in 1..=2 {
        m.time.advance(Duration::from_secs(15 * 60)).await;
        let ev = m.events.clone();
        costmesh_testkit::eventually(common::WAIT, "a periodic checkpoint", || {
            let ev = ev.clone();
            let id = id.clone();
            async move {
                ev.lock().unwrap().iter().filter(|e| e.job_id == id && e.kind() == JobEventKind::Checkpointed).count()
                    >= n
            }
        })
        .await;
    }

    // The node gets a preemption notice: the job checkpoints within a second.
    let before = m.count(&id, JobEventKind::Checkpointed);
    assert_eq!(before, 2, "one checkpoint per 15 min");
    let notice = PreemptionNotice {
        node: first.clone(),
        instance: "vm-1".into(),
        noticed_at: Some(costmesh_contracts::timestamp(m.clock.now())),
        deadline: Some(costmesh_contracts::timestamp(m.clock.now() + chrono::Duration::seconds(30))),
        source: "test".into(),
    };
    let sent = std::time::Instant::now();
    m.publish(&m.subjects.preemption(&first), &notice).await;
    let ev = m.events.clone();
    let idc = id.clone();
    costmesh_testkit::eventually(common::WAIT, "the preemption checkpoint", || {
        let (ev, idc) = (ev.clone(), idc.clone());
        async move {
            ev.lock().unwrap().iter().filter(|e| e.job_id == idc && e.kind() == JobEventKind::Checkpointed).count()
                > before
        }
    })
    .await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "checkpoint {took:?} after the notice");
    m.wait_event("interrupted", |e| e.job_id == id && e.kind() == JobEventKind::Interrupted).await;
    // The stop that follows makes the example job checkpoint once more and exit.
    m.wait_event("old attempt exited", |e| e.job_id == id && e.kind() == JobEventKind::Exited && e.attempt == 1).await;

    // After the retry backoff it runs on the other node, from the newest checkpoint.
    m.time.advance(Duration::from_secs(30)).await;
    let again =
        m.wait_event("restarted", |e| e.job_id == id && e.kind() == JobEventKind::Started && e.attempt == 2).await;
    assert_ne!(again.node, first);
    let assigned =
        m.wait_event("assigned", |e| e.job_id == id && e.kind() == JobEventKind::Assigned && e.attempt == 2).await;
    let after_notice: Vec<String> = m
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.job_id == id && e.kind() == JobEventKind::Checkpointed && e.attempt == 1)
        .skip(before)
        .map(|e| e.checkpoint_path.clone())
        .collect();
    let last = after_notice.last().cloned().expect("a checkpoint after the notice");
    assert!(
        assigned.reason.ends_with(&format!("resumes from {last}")),
        "{} should resume from {last}",
        assigned.reason
    );
    let log = m.work.join("logs").join(&again.node).join(&id).join("2.log");
    costmesh_testkit::eventually(common::WAIT, "the resumed job's log", || {
        let (log, last) = (log.clone(), last.clone());
        async move { std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&format!("resumed from {last}"))) }
    })
    .await;
    assert_eq!(m.count(&id, JobEventKind::Started), 2);
}

#[tokio::test]
async fn a_scheduler_restarted_mid_run_loses_no_job_and_starts_none_twice() {
    let mut m =
        Mesh::start("restart", "2026-07-01T06:00:00Z", Default::default(), &[node("local-1", 2, false, false)]).await;
    let a = m.submit(job("a", 1.0, json!({}))).await;
    let b = m.submit(job("b", 1.0, json!({}))).await;
    let night = m.submit(job("night", 4.0, json!({}))).await; // waits for 23:00
                                                              // No GPU left for it. Submitted under a request id, as the CLI does.
    let r = m.api_as("submit", job("queued", 1.0, json!({})), Some("req-queued")).await;
    let queued = r["job"]["id"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    for id in [&a, &b] {
        m.wait_state(id, "running").await;
    }
    m.wait_event("night deferred", |e| e.job_id == night && e.kind() == JobEventKind::Deferred).await;

    m.stop_scheduler().await;
    // While it is down, job b finishes on the node.
    m.report(&b, JobEventKind::Exited, "local-1", 1, 0).await;
    m.start_scheduler().await;
    m.learn_nodes(1).await;

    let list = m.api("list", json!({})).await;
    let ids: Vec<&str> = list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    for id in [&a, &b, &night, &queued] {
        assert!(ids.contains(&id.as_str()), "{id} lost after the restart: {list}");
    }
    // The client never saw its answer and sends the submit again: the
    // restarted scheduler knows it as the same job.
    let again = m.api_as("submit", job("queued", 1.0, json!({})), Some("req-queued")).await;
    assert_eq!(again["job"]["id"].as_str(), Some(queued.as_str()), "{again}");
    assert_eq!(again["repeated"], true, "{again}");
    assert_eq!(m.api("list", json!({})).await["jobs"].as_array().unwrap().len(), 4);
    // The event sent while it was down is applied; its GPU goes to the queued job.
    m.wait_state(&b, "succeeded").await;
    m.wait_state(&queued, "running").await;
    // Job a makes room for the night job.
    m.api("cancel", json!({"id": a})).await;
    m.time.advance_to(t("2026-07-01T15:00:00Z")).await;
    m.learn_nodes(1).await;
    m.wait_event("night started", |e| e.job_id == night && e.kind() == JobEventKind::Assigned).await;
    for id in [&a, &night, &queued] {
        assert_eq!(m.show(id).await["attempt"], 1, "{id}");
    }
    assert_eq!(m.count(&a, JobEventKind::Started), 1, "job a started twice");
    assert_eq!(m.count(&a, JobEventKind::Assigned), 1);
    assert_eq!(m.count(&queued, JobEventKind::Started), 1);
    assert_eq!(m.count(&queued, JobEventKind::Submitted), 1, "submitted twice");
}

/// The cost-watcher's word that the cloud budget of July is exceeded.
async fn cloud_budget_exceeded(m: &Mesh) {
    let exceeded = BudgetEvent {
        scope: "cloud".into(),
        state: BudgetState::Exceeded as i32,
        previous_state: BudgetState::Warning as i32,
        period: "2026-07".into(),
        ..Default::default()
    };
    m.publish(&m.subjects.budget("cloud", BudgetState::Exceeded), &exceeded).await;
}

#[tokio::test]
async fn budget_exceeded_stops_cloud_work_and_local_work_goes_on() {
    let nodes = [node("local-1", 1, false, false), node("cloud-1", 2, true, false)];
    let m = Mesh::start("budget", "2026-07-01T06:00:00Z", Default::default(), &nodes).await;
    let local = m.submit(job("local", 1.0, json!({}))).await;
    let on_cloud = m.submit(job("on-cloud", 1.0, json!({"cloudOk": true}))).await;
    m.wait_state(&local, "running").await;
    m.wait_state(&on_cloud, "running").await;
    assert_eq!(m.show(&on_cloud).await["node"], "cloud-1");

    cloud_budget_exceeded(&m).await;
    let stopped =
        m.wait_event("cloud job stopped", |e| e.job_id == on_cloud && e.kind() == JobEventKind::Interrupted).await;
    assert!(stopped.reason.starts_with("budget exceeded"), "{}", stopped.reason);
    m.wait_event("cloud job exited", |e| e.job_id == on_cloud && e.kind() == JobEventKind::Exited).await;

    // New work: cloud work is refused with the reason, local work still starts.
    let more_cloud = m.submit(job("more-cloud", 1.0, json!({"cloudOk": true}))).await;
    let w = m
        .wait_event("cloud deferred", |e| {
            e.job_id == more_cloud && e.kind() == JobEventKind::Deferred && e.reason.contains("budget")
        })
        .await;
    assert!(w.reason.contains("budget exceeded: no new cloud work"), "{}", w.reason);
    assert_eq!(m.show(&local).await["state"], "running", "local work goes on");
    // The local GPU frees up: the next local job starts there.
    // The local GPU frees up: the stopped cloud job (first in the queue)
    // resumes on own GPUs, which the cloud budget does not gate.
    m.api("cancel", json!({"id": local})).await;
    m.wait_event("resumed locally", |e| e.job_id == on_cloud && e.kind() == JobEventKind::Started && e.attempt == 2)
        .await;
    assert_eq!(m.show(&on_cloud).await["node"], "local-1");
    assert_eq!(m.show(&more_cloud).await["state"], "queued");
    m.time.advance(Duration::from_secs(120)).await;
    m.learn_nodes(2).await;
    let on_cloud_assignments =
        m.events.lock().unwrap().iter().filter(|e| e.kind() == JobEventKind::Assigned && e.node == "cloud-1").count();
    assert_eq!(on_cloud_assignments, 1, "only the job placed before the budget ran out went to the cloud");
}

#[tokio::test]
async fn idle_gpus_for_30_minutes_get_scale_down_in_business_hours_and_stop_outside() {
    // 08:00 in Taipei, a Wednesday: business hours start at 09:00.
    let m = Mesh::start(
        "idle",
        "2026-07-01T00:00:00Z",
        Default::default(),
        &[node("gpu-a", 1, false, false), node("gpu-b", 1, false, false)],
    )
    .await;
    // gpu-b is kept busy by a job until 08:40.
    let busy = m.submit(job("busy", 0.5, json!({}))).await;
    m.wait_state(&busy, "running").await;
    assert_eq!(m.show(&busy).await["node"], "gpu-a");
    m.time.advance_to(t("2026-07-01T00:40:00Z")).await;
    m.api("cancel", json!({"id": busy})).await;
    m.wait_event("busy exited", |e| e.job_id == busy && e.kind() == JobEventKind::Exited).await;
    // gpu-b idle since 08:00 -> 08:30 outside business hours: stop.
    // gpu-a idle from 08:40 -> 09:10, inside business hours: scale down.
    m.time.advance_to(t("2026-07-01T01:15:00Z")).await;
    let taken = m.actuator.taken.clone();
    costmesh_testkit::eventually(common::WAIT, "two idle actions", || {
        let taken = taken.clone();
        async move { taken.lock().unwrap().len() >= 2 }
    })
    .await;
    let actions = m.actuator.taken.lock().unwrap().clone();
    let by = |node: &str| {
        actions.iter().find(|a| a.target == node).unwrap_or_else(|| panic!("no action for {node}: {actions:?}")).clone()
    };
    let (a, b) = (by("gpu-a"), by("gpu-b"));
    assert_eq!(b.kind, "stop", "{b:?}");
    assert_eq!(a.kind, "scale_down", "{a:?}");
    assert!(a.dry_run && a.reason.contains("below 10%"), "{a:?}");
    assert_eq!(actions.len(), 2, "one action per idle stretch: {actions:?}");
}

#[tokio::test]
async fn compute_engine_acts_on_idle_and_budget_and_every_action_says_how_it_ended() {
    use costmesh_contracts::v1::{Action, ActionState};
    use costmesh_testkit::compute::{FakeCompute, FakeInstance};
    let managed = [("costmesh", "managed")];
    let fake = FakeCompute::start(
        "costmesh-test",
        vec![
            FakeInstance::new("asia-east1-b", "cloud-1", "RUNNING", "n1-standard-8", &managed),
            FakeInstance::new("asia-east1-b", "cloud-2", "RUNNING", "n1-standard-8", &managed),
        ],
    )
    .await;
    let gce = costmesh_scheduler::gce::GceConfig {
        project: "costmesh-test".into(),
        zones: vec!["asia-east1-b".into()],
        apply: true,
        stop_on_budget_exceeded: true,
        // Not a round minute: the test waits for a timer at exactly the
        // grace's end, and the scheduler's own wake-ups fall on minutes
        // (with 60 s, a wake-up one minute on was taken for the grace
        // timer in CI, the clock moved before the budget event arrived,
        // and the stop never came).
        budget_stop_grace: Duration::from_secs(67),
        endpoint: fake.url().into(),
        credentials: "anonymous".into(),
        retry_backoff: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let cfg = costmesh_scheduler::Config { gce, ..Default::default() };
    // 08:00 in Taipei, a Wednesday: outside business hours.
    let nodes = [node("local-1", 1, false, false), node("cloud-1", 1, true, false)];
    let m = Mesh::start("gce", "2026-07-01T00:00:00Z", cfg, &nodes).await;
    let mut actions = m.bus.subscribe(&format!("{}.actions.>", m.subjects.prefix())).await.unwrap();
    m.bus.flush().await.unwrap();
    // The scheduler's actions (the agents report theirs on the same subjects).
    async fn next(sub: &mut costmesh_bus::Subscription) -> Action {
        loop {
            let msg = tokio::time::timeout(common::WAIT, sub.next()).await.expect("an action").unwrap();
            let a = costmesh_contracts::decode::<Action>(&msg.headers, &msg.payload).unwrap().1;
            if a.service == "scheduler" {
                return a;
            }
        }
    }
    m.time.advance_to(t("2026-07-01T00:35:00Z")).await;
    let mut got = [next(&mut actions).await, next(&mut actions).await];
    got.sort_by(|a, b| a.target.cmp(&b.target));
    let (cloud, local) = (&got[0], &got[1]);
    assert_eq!((cloud.target.as_str(), cloud.kind.as_str(), cloud.state()), ("cloud-1", "stop", ActionState::Taken));
    assert!(!cloud.dry_run && cloud.operations.len() == 1, "{cloud:?}");
    assert_eq!(cloud.resource, "projects/costmesh-test/zones/asia-east1-b/instances/cloud-1");
    assert!(cloud.outcome.starts_with("stopped "), "{cloud:?}");
    assert_eq!(fake.instance("cloud-1").status, "TERMINATED");
    assert_eq!(local.state(), ActionState::Proposed, "own GPUs are no managed instance: {local:?}");
    assert!(local.dry_run && local.outcome.contains("not a managed Compute Engine instance"), "{local:?}");

    // The cloud budget is exceeded: after the grace the jobs get, the
    // managed instance still running stops too.
    let grace_ends = m.clock.now() + chrono::Duration::seconds(67);
    cloud_budget_exceeded(&m).await;
    let time = m.time.clone();
    costmesh_testkit::eventually(common::WAIT, "the grace timer armed", || {
        let time = time.clone();
        async move { time.has_timer_at(grace_ends) }
    })
    .await;
    assert_eq!(fake.instance("cloud-2").status, "RUNNING", "not before the grace");
    m.time.advance(Duration::from_secs(68)).await;
    let b = next(&mut actions).await;
    assert_eq!((b.target.as_str(), b.state()), ("cloud-2", ActionState::Taken), "{b:?}");
    assert!(b.reason.contains("budget cloud exceeded"), "{b:?}");
    assert_eq!(fake.instance("cloud-2").status, "TERMINATED");
}

#[tokio::test]
async fn bad_specs_unknown_ids_and_missing_commands_get_clear_errors() {
    let m = Mesh::start("bad", "2026-07-01T06:00:00Z", Default::default(), &[node("local-1", 1, false, false)]).await;
    let r = m.api("submit", json!("not a job")).await;
    assert!(r["error"].as_str().unwrap().starts_with("job spec:"), "{r}");
    let r = m.api("submit", job("zero", 1.0, json!({"gpus": 0}))).await;
    assert_eq!(r["field"], "gpus", "{r}");
    assert!(r["error"].as_str().unwrap().contains("gpus: must be at least 1"), "{r}");
    let r = m.api("submit", job("late", 2.0, json!({"deadline": "2026-07-01T07:00:00Z"}))).await;
    assert_eq!(r["field"], "deadline", "{r}");
    let r = m.api("show", json!({"id": "j-nope"})).await;
    assert_eq!(r["error"], "unknown job \"j-nope\"");
    let r = m.api("cancel", json!({"id": "j-nope"})).await;
    assert_eq!(r["error"], "unknown job \"j-nope\"");
    let r = m.api("show", json!({"job": "x"})).await;
    assert!(r["error"].as_str().unwrap().contains("unknown field"), "{r}");
    // Request ids: checked, and one id is one spec.
    for bad in ["", "a b", "x/../y", &"r".repeat(65)] {
        let r = m.api_as("submit", job("rid", 1.0, json!({})), Some(bad)).await;
        assert_eq!(r["field"], "costmesh-request-id", "{bad:?}: {r}");
    }
    let first = m.api_as("submit", job("rid", 1.0, json!({"gpus": 2})), Some("rid-1")).await;
    assert!(first["job"]["id"].is_string(), "{first}");
    let other = m.api_as("submit", job("rid-other", 1.0, json!({"gpus": 2})), Some("rid-1")).await;
    assert!(other["error"].as_str().unwrap().contains("already used for job"), "{other}");
    m.api("cancel", json!({"id": first["job"]["id"]})).await;

    let missing = m.submit(job("missing", 1.0, json!({"command": "/no/such/binary"}))).await;
    let failed = m.wait_event("failed", |e| e.job_id == missing && e.kind() == JobEventKind::Failed).await;
    assert!(failed.reason.contains("\"/no/such/binary\" not found"), "{}", failed.reason);
    m.wait_state(&missing, "failed").await;

    // Nothing else disturbed: the next job runs on the same GPU.
    let ok = m.submit(job("fine", 1.0, json!({}))).await;
    m.wait_state(&ok, "running").await;
    assert_eq!(m.api("list", json!({})).await["jobs"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_job_whose_agent_shuts_down_runs_again_elsewhere() {
    let nodes = [node("n-a", 1, false, false), node("n-b", 1, false, false)];
    let m = Mesh::start("agentstop", "2026-07-01T06:00:00Z", Default::default(), &nodes).await;
    let id = m.submit(job("survivor", 1.0, json!({"maxRetries": 2}))).await;
    m.wait_state(&id, "running").await;
    let first = m.show(&id).await["node"].as_str().unwrap().to_string();
    m.job_ready(&first, &id, 1).await;
    let i = if first == "n-a" { 0 } else { 1 };
    m.agents[i].cancel();
    let e = m.wait_event("interrupted by its agent", |e| e.job_id == id && e.kind() == JobEventKind::Interrupted).await;
    assert!(e.reason.contains("gpu-agent is shutting down"), "{}", e.reason);
    // The clock moves at once, maybe between the scheduler's pass and its
    // next wake-up (it failed once in CI that way: a start due exactly at
    // the new time woke nothing).
    m.time.advance(Duration::from_secs(30)).await;
    let again =
        m.wait_event("started again", |e| e.job_id == id && e.kind() == JobEventKind::Started && e.attempt == 2).await;
    assert_ne!(again.node, first);
}

/// A node the test speaks for: its samples are published by hand, so it
/// can go silent (as a killed agent does) and come back.
async fn ghost_sample(m: &Mesh, node: &str, gpus: u32) {
    for g in 0..gpus {
        let s = costmesh_contracts::v1::GpuSample {
            node: node.into(),
            gpu_index: g,
            boot_id: "ghost-boot".into(),
            time: Some(costmesh_contracts::timestamp(m.clock.now())),
            ..Default::default()
        };
        let (h, p) = costmesh_contracts::encode(
            &s,
            &costmesh_contracts::EventMeta::new::<costmesh_contracts::v1::GpuSample>(
                "gpu-agent/ghost",
                m.clock.now(),
                costmesh_contracts::ContentType::Protobuf,
            ),
        );
        m.bus.publish(&m.subjects.gpu_telemetry(node, g), h, p).await.unwrap();
    }
    m.bus.flush().await.unwrap();
}

#[tokio::test]
async fn a_silent_node_loses_its_jobs_they_run_elsewhere_and_it_is_told_to_stop_them_when_it_returns() {
    let cfg = costmesh_scheduler::Config { node_lost_after: Duration::from_secs(120), ..Default::default() };
    let mut m = Mesh::start("lost", "2026-07-01T06:00:00Z", cfg, &[]).await;
    let mut signals = m.bus.subscribe(&m.subjects.node_signal("ghost")).await.unwrap();
    m.bus.flush().await.unwrap();
    ghost_sample(&m, "ghost", 2).await;
    costmesh_testkit::wait_for(WAIT, "the ghost node known", || async {
        let n = m.api("nodes", json!({})).await;
        if n["nodes"].as_array().is_some_and(|a| a.len() == 1) {
            Ok(())
        } else {
            Err(n.to_string())
        }
    })
    .await;
    let id = m.submit(job("orphaned", 0.5, json!({"gpus": 2, "maxRetries": 3}))).await;
    m.wait_event("placed on the ghost", |e| e.job_id == id && e.kind() == JobEventKind::Assigned && e.node == "ghost")
        .await;
    // The ghost's agent says it started, then dies without a word.
    m.report(&id, JobEventKind::Started, "ghost", 1, 0).await;
    m.wait_state(&id, "running").await;
    m.start_agent(&node("gpu-1", 2, false, false)).await;
    // Time passes; only gpu-1 samples.
    let lost = costmesh_testkit::wait_for(WAIT, "the job lost", || async {
        m.time.advance(SAMPLE).await;
        let e = m.events.lock().unwrap().iter().find(|e| e.job_id == id && e.kind() == JobEventKind::Lost).cloned();
        e.ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert!(lost.reason.contains("ghost silent since"), "{}", lost.reason);
    // Requeued with backoff, then it runs on gpu-1 as attempt 2.
    costmesh_testkit::wait_for(WAIT, "attempt 2 on gpu-1", || async {
        m.time.advance(SAMPLE).await;
        let j = m.show(&id).await;
        if j["state"] == "running" && j["node"] == "gpu-1" && j["attempt"] == 2 {
            Ok(())
        } else {
            Err(j.to_string())
        }
    })
    .await;
    assert_eq!(m.count(&id, JobEventKind::Lost), 1);
    // The ghost comes back: before anything else it is told to stop attempt 1.
    ghost_sample(&m, "ghost", 2).await;
    let sig = tokio::time::timeout(WAIT, signals.next()).await.expect("a stop for the stale attempt").unwrap();
    let (_, sig) = costmesh_contracts::decode::<costmesh_contracts::v1::JobSignal>(&sig.headers, &sig.payload).unwrap();
    assert_eq!(
        (sig.job_id.as_str(), sig.attempt, sig.kind()),
        (id.as_str(), 1, costmesh_contracts::v1::JobSignalKind::Stop)
    );
    // Its stale report of attempt 1 changes nothing.
    m.report(&id, JobEventKind::Exited, "ghost", 1, 143).await;
    m.time.advance(SAMPLE).await;
    let j = m.show(&id).await;
    assert_eq!((j["state"].as_str(), j["attempt"].as_u64()), (Some("running"), Some(2)), "{j}");
    m.stop_scheduler().await;
}

#[tokio::test]
async fn a_restarted_scheduler_remembers_an_exceeded_budget() {
    let nodes = [node("cloud-1", 1, true, false)];
    let mut m = Mesh::start("budgetrestart", "2026-07-01T06:00:00Z", Default::default(), &nodes).await;
    cloud_budget_exceeded(&m).await;
    let before = m.submit(job("before", 1.0, json!({"cloudOk": true}))).await;
    m.wait_event("gated before the restart", |e| {
        e.job_id == before && e.kind() == JobEventKind::Deferred && e.reason.contains("budget exceeded")
    })
    .await;
    m.api("cancel", json!({"id": before})).await;
    m.stop_scheduler().await;
    m.start_scheduler().await;
    m.learn_nodes(1).await;
    let after = m.submit(job("after", 1.0, json!({"cloudOk": true}))).await;
    m.wait_event("gated after the restart", |e| {
        e.job_id == after && e.kind() == JobEventKind::Deferred && e.reason.contains("budget exceeded")
    })
    .await;
    m.time.advance(Duration::from_secs(120)).await;
    m.learn_nodes(1).await;
    assert_eq!(
        m.show(&after).await["state"],
        "queued",
        "a restarted scheduler placed cloud work past an exceeded budget"
    );
    m.stop_scheduler().await;
}

#[tokio::test]
async fn the_job_list_is_paged_and_finished_jobs_are_pruned() {
    let cfg = costmesh_scheduler::Config {
        list_page_size: 100,
        finished_retention: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut m = Mesh::start("paging", "2026-07-01T06:00:00Z", cfg, &[]).await;
    let mut ids = Vec::new();
    for i in 0..250 {
        ids.push(m.submit(job(&format!("j{i}"), 1.0, json!({}))).await);
    }
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = m.api("list", json!({ "after": after })).await;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 100, "a page holds at most list_page_size jobs");
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        if page["next"].is_null() {
            break;
        }
        after = page["next"].clone();
    }
    assert_eq!(seen, ids, "every job once, in submission order");
    for id in &ids[..10] {
        m.api("cancel", json!({ "id": id })).await;
    }
    // Past the retention, the cancelled jobs are gone; the rest stay.
    m.time.advance(Duration::from_secs(3600 + 120)).await;
    costmesh_testkit::wait_for(WAIT, "10 finished jobs pruned", || async {
        m.time.advance(Duration::from_secs(60)).await;
        let p = m.api("list", json!({})).await;
        if p["total"] == 240 {
            Ok(())
        } else {
            Err(p["total"].to_string())
        }
    })
    .await;
    assert!(m.show(&ids[0]).await.is_null());
    // A restarted scheduler does not bring them back.
    m.stop_scheduler().await;
    m.start_scheduler().await;
    assert_eq!(m.api("list", json!({})).await["total"], 240);
    let bad = m.api("list", json!({"page": 2})).await;
    assert!(bad["error"].as_str().unwrap().contains("unknown field"), "{bad}");
    m.stop_scheduler().await;
}

#[tokio::test]
async fn undecodable_telemetry_is_dead_lettered_with_its_reason() {
    let m = Mesh::start("schedtelemetrydlq", "2026-07-01T06:00:00Z", Default::default(), &[]).await;
    let mut dlq = m.bus.subscribe(&m.subjects.dlq("scheduler")).await.unwrap();
    m.bus.flush().await.unwrap();
    let mut h = costmesh_bus::Headers::new();
    h.insert("ce-type", "costmesh.v1.GpuSample");
    h.insert("content-type", "application/protobuf");
    m.bus.publish(&m.subjects.gpu_telemetry("n1", 0), h, bytes::Bytes::from_static(b"\xff\xff garbage")).await.unwrap();
    let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter from the scheduler").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.starts_with("malformed_payload"), "{reason}");
}

/// An agent's user may publish any job's events (the subject carries no
/// node), so an event counts only from the node its attempt runs on: a
/// forged "exited 0" from another node neither finishes nor fails the job.
#[tokio::test]
async fn a_job_event_from_another_node_changes_nothing() {
    let m = Mesh::start("forgedevent", "2026-07-01T06:00:00Z", Default::default(), &[node("local-1", 1, false, false)])
        .await;
    let id = m.submit(job("victim", 1.0, json!({}))).await;
    m.wait_state(&id, "running").await;
    m.report(&id, JobEventKind::Exited, "other-node", 1, 0).await;
    m.report(&id, JobEventKind::Failed, "other-node", 1, 1).await;
    // Then the real node's checkpoint: once it is in, the forged ones were handled before it.
    let ckpt = JobEvent {
        job_id: id.clone(),
        kind: JobEventKind::Checkpointed as i32,
        node: "local-1".into(),
        attempt: 1,
        checkpoint_path: "/ckpt/after-forgery".into(),
        ..Default::default()
    };
    m.publish(&m.subjects.job(&id, JobEventKind::Checkpointed), &ckpt).await;
    let j = costmesh_testkit::wait_for(WAIT, "the checkpoint recorded", || async {
        let j = m.show(&id).await;
        if j["lastCheckpoint"] == "/ckpt/after-forgery" || j["last_checkpoint"] == "/ckpt/after-forgery" {
            Ok(j)
        } else {
            Err(j.to_string())
        }
    })
    .await;
    assert_eq!(j["state"], "running", "a forged event moved the job: {j}");
    assert_eq!(j["attempt"], 1, "{j}");
}

#[tokio::test]
async fn on_a_three_node_cluster_killing_the_job_buckets_leader_loses_and_repeats_nothing() {
    let nodes = [node("n-a", 1, false, false), node("n-b", 1, false, false)];
    let mut m = Mesh::start_on_cluster("cluster", "2026-07-01T06:00:00Z", Default::default(), &nodes).await;
    let first = m.submit(job("first", 0.5, json!({}))).await;
    m.wait_state(&first, "running").await;
    // The server that leads the job bucket's stream goes down (SIGKILL).
    let costmesh_bus::Bus::Nats(nats) = &m.bus else { unreachable!() };
    let js = async_nats::jetstream::new(nats.client().clone());
    let bucket = format!("KV_{}_jobs", m.subjects.prefix());
    let mut stream = js.get_stream(&bucket).await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    let leader = info.cluster.and_then(|c| c.leader).unwrap();
    let common::Servers::Cluster(cluster) = &mut m.nats else { unreachable!() };
    let at = cluster.index_of(&leader).unwrap();
    cluster.nodes[at].stop();
    cluster.wait_healthy();
    // Clients of the killed server move to another one; until the
    // scheduler's API is heard there, a request meets no responders (a
    // caller asks again: here a read, which cannot do anything twice).
    let list = m.subjects.api("scheduler", "list");
    costmesh_testkit::wait_for(Duration::from_secs(60), "the scheduler's API after the failover", || async {
        m.bus
            .request(&list, Default::default(), bytes::Bytes::from("{}"), Duration::from_secs(2))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    // Work goes on: a new job is taken, placed and started; the first ends.
    let second = m.submit(job("second", 0.5, json!({}))).await;
    m.wait_state(&second, "running").await;
    m.api("cancel", json!({"id": first})).await;
    m.wait_event("first ended", |e| e.job_id == first && e.kind() == JobEventKind::Exited).await;
    let events = m.events.lock().unwrap().clone();
    for id in [&first, &second] {
        let assigned = events.iter().filter(|e| &e.job_id == id && e.kind() == JobEventKind::Assigned).count();
        let started = events.iter().filter(|e| &e.job_id == id && e.kind() == JobEventKind::Started).count();
        println!("cluster: {id} assigned {assigned}, started {started} (leader {leader} killed)");
        assert_eq!((assigned, started), (1, 1), "{id}: placed and started once");
    }
    let listed = m.api("list", json!({})).await;
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(2), "no job lost: {listed}");
}
