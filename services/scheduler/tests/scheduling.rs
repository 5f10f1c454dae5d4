//! The scheduler with simulated gpu-agents over a real nats-server, in
//! virtual time (Asia/Taipei; 2026-07-01 is a Wednesday).
use std::time::Duration;

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::{BudgetEvent, BudgetState, JobEventKind, PreemptionNotice};
use costmesh_runtime::tariff::{Days, Tariff, TouPeriod};
use serde_json::json;

mod common;
use common::{job, node, Mesh};

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn at(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str().unwrap_or_else(|| panic!("not a time: {v}")).parse().unwrap()
}

#[tokio::test]
async fn a_large_job_waits_for_off_peak_and_a_deadline_job_starts_at_once() {
    // 14:00 in Taipei.
    let m = Mesh::start("offpeak", "2026-07-01T06:00:00Z", Default::default(), &[node("local-1", 2, false, false)]).await;
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
    let b = m.show(&big).await;
    assert_eq!(at(&b["assigned_at"]), t("2026-07-01T15:00:00Z"));
    assert_eq!(b["state"], "running");
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
            async move { ev.lock().unwrap().iter().filter(|e| e.job_id == id && e.kind() == JobEventKind::Checkpointed).count() >= n }
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
        async move { ev.lock().unwrap().iter().filter(|e| e.job_id == idc && e.kind() == JobEventKind::Checkpointed).count() > before }
    })
    .await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "checkpoint {took:?} after the notice");
    m.wait_event("interrupted", |e| e.job_id == id && e.kind() == JobEventKind::Interrupted).await;
    // The stop that follows makes the example job checkpoint once more and exit.
    m.wait_event("old attempt exited", |e| e.job_id == id && e.kind() == JobEventKind::Exited && e.attempt == 1).await;

    // After the retry backoff it runs on the other node, from the newest checkpoint.
    m.time.advance(Duration::from_secs(30)).await;
    let again = m.wait_event("restarted", |e| e.job_id == id && e.kind() == JobEventKind::Started && e.attempt == 2).await;
    assert_ne!(again.node, first);
    let assigned = m.wait_event("assigned", |e| e.job_id == id && e.kind() == JobEventKind::Assigned && e.attempt == 2).await;
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
    assert!(assigned.reason.ends_with(&format!("resumes from {last}")), "{} should resume from {last}", assigned.reason);
    let log = m.work.join("logs").join(&again.node).join(&id).join("2.log");
    costmesh_testkit::eventually(common::WAIT, "the resumed job's log", || {
        let (log, last) = (log.clone(), last.clone());
        async move { std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&format!("resumed from {last}"))) }
    })
    .await;
    assert_eq!(m.count(&id, JobEventKind::Started), 2);
}
