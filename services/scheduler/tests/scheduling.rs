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
