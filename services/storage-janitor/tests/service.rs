//! The janitor as a service over a real nats-server: a budget warning runs
//! an extra pass whose report reaches the bus; a job's model is protected.
use std::time::{Duration, SystemTime};

use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{self, BudgetEvent, BudgetState, JobAssignment, JobSpec};
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_storage_janitor::Config;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

fn old_file(p: &std::path::Path, days: u64) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, b"weights").unwrap();
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400)).unwrap();
}

/// Five versions of a model under `base`, v0 the oldest.
fn five_versions(base: &std::path::Path) {
    for v in 0..5 {
        old_file(&base.join(format!("models/llm/v{v}/weights.bin")), 20 - v);
    }
}

/// Publishes the assignment of a job that uses v0 (the oldest version).
async fn assign_job_using_v0(
    bus: &Bus,
    subjects: &costmesh_contracts::Subjects,
    base: &std::path::Path,
    at: chrono::DateTime<chrono::Utc>,
) {
    let spec = JobSpec {
        name: "finetune".into(),
        args: vec![base.join("models/llm/v0/weights.bin").display().to_string()],
        ..Default::default()
    };
    let assign = JobAssignment { job_id: "j1".into(), node: "n1".into(), spec: Some(spec), ..Default::default() };
    let (h, p) =
        costmesh_contracts::encode(&assign, &EventMeta::new::<JobAssignment>("scheduler", at, ContentType::Protobuf));
    bus.publish_durable(&subjects.node_assign("n1"), h, p).await.unwrap();
}

#[tokio::test]
async fn a_budget_warning_runs_an_extra_pass_and_a_running_jobs_model_is_kept() {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    five_versions(base);
    let connect = || async { Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap()) };
    let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix("janitor"), ..Default::default() };
    // File times are real; the virtual clock starts at the real now.
    let (clock, _handle) = Clock::manual(chrono::Utc::now());
    let shutdown = CancellationToken::new();
    let ctx = ServiceContext::new("storage-janitor", None, connect().await, &mesh, clock.clone(), shutdown.clone());
    let subjects = ctx.subjects().clone();
    let health = ctx.health.clone();
    ctx.events.ensure_stream().await.unwrap();
    let cfg = Config { base_dir: base.to_path_buf(), apply: true, ..Default::default() };

    let observer = connect().await;
    let mut reports = observer.subscribe(&subjects.storage_report()).await.unwrap();
    observer.flush().await.unwrap();

    // A job is using v0 (the oldest version).
    assign_job_using_v0(&observer, &subjects, base, clock.now()).await;

    tokio::spawn(costmesh_storage_janitor::run(cfg, ctx));
    costmesh_testkit::eventually(Duration::from_secs(10), "janitor ready", || {
        let h = health.clone();
        async move { h.is_ready() }
    })
    .await;

    let warning = BudgetEvent { scope: "cloud".into(), state: BudgetState::Warning as i32, ..Default::default() };
    let (h, p) = costmesh_contracts::encode(
        &warning,
        &EventMeta::new::<BudgetEvent>("cost-watcher", clock.now(), ContentType::Json),
    );
    observer.publish_durable(&subjects.budget("cloud", BudgetState::Warning), h, p).await.unwrap();

    let m = tokio::time::timeout(Duration::from_secs(15), reports.next()).await.expect("a storage report").unwrap();
    let (_, report) = costmesh_contracts::decode::<v1::StorageReport>(&m.headers, &m.payload).unwrap();
    let retired: Vec<&str> =
        report.actions.iter().filter(|a| a.action == "retire_archive").map(|a| a.path.as_str()).collect();
    // Newest 3 kept (v2..v4); v1 retired; v0 kept because the job uses it.
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert!(retired[0].ends_with("models/llm/v1"), "{retired:?}");
    assert!(base.join("models/llm/v0/weights.bin").exists());
    assert!(!base.join("models/llm/v1").exists());
    assert!(report.provisioned_bytes > 0 && report.used_bytes > 0);
    assert!(report.actions.iter().all(|a| !a.dry_run));
    shutdown.cancel();
}

#[tokio::test]
#[allow(clippy::async_yields_async)] // `start` hands back the janitor's task, to abort it
async fn a_restarted_janitor_keeps_running_jobs_models_and_its_schedule_and_dead_letters_foreign_events() {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    five_versions(base);
    let connect = || async { Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap()) };
    let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix("janitorrestart"), ..Default::default() };
    let (clock, handle) = Clock::manual(chrono::Utc::now());
    // Plan only: each pass reports what it would retire.
    let cfg = Config { base_dir: base.to_path_buf(), apply: false, ..Default::default() };
    let start = |ctx: ServiceContext| {
        let health = ctx.health.clone();
        let task = tokio::spawn(costmesh_storage_janitor::run(cfg.clone(), ctx));
        async move {
            costmesh_testkit::eventually(Duration::from_secs(10), "janitor ready", || {
                let h = health.clone();
                async move { h.is_ready() }
            })
            .await;
            task
        }
    };
    let observer = connect().await;
    let subjects = costmesh_contracts::Subjects::new(&mesh.subject_prefix).unwrap();
    let mut reports = observer.subscribe(&subjects.storage_report()).await.unwrap();
    let mut dlq = observer.subscribe(&subjects.dlq("storage-janitor")).await.unwrap();
    observer.flush().await.unwrap();
    let retired = |m: costmesh_bus::Message| -> Vec<String> {
        let (_, r) = costmesh_contracts::decode::<v1::StorageReport>(&m.headers, &m.payload).unwrap();
        r.actions.iter().filter(|a| a.action == "retire_archive").map(|a| a.path.clone()).collect()
    };

    let shutdown = CancellationToken::new();
    let ctx = ServiceContext::new("storage-janitor", None, connect().await, &mesh, clock.clone(), shutdown.clone());
    ctx.events.ensure_stream().await.unwrap();
    assign_job_using_v0(&observer, &subjects, base, clock.now()).await;
    let first = start(ctx).await;
    // The first pass runs at start, once the job events are caught up.
    let m = tokio::time::timeout(Duration::from_secs(15), reports.next()).await.expect("a first pass").unwrap();
    let r = retired(m);
    assert!(r.iter().all(|p| !p.ends_with("/v0")), "{r:?}");
    // SIGKILL: no drain.
    first.abort();
    let _ = first.await;
    shutdown.cancel();

    // While it is down, its next pass falls due.
    handle.advance(Duration::from_secs(3600 + 60)).await;
    let shutdown = CancellationToken::new();
    let ctx = ServiceContext::new("storage-janitor", None, connect().await, &mesh, clock.clone(), shutdown.clone());
    let _second = start(ctx).await;
    let m = tokio::time::timeout(Duration::from_secs(15), reports.next())
        .await
        .expect("the overdue pass runs at once after the restart")
        .unwrap();
    let r = retired(m);
    assert!(r.iter().any(|p| p.ends_with("/v1")), "{r:?}");
    assert!(r.iter().all(|p| !p.ends_with("/v0")), "a restarted janitor planned to retire a model in use: {r:?}");

    // A GpuSample on the budget subject is not the janitor's to ack.
    let sample = v1::GpuSample { node: "n1".into(), boot_id: "b".into(), ..Default::default() };
    let (h, p) =
        costmesh_contracts::encode(&sample, &EventMeta::new::<v1::GpuSample>("x", clock.now(), ContentType::Protobuf));
    observer.publish_durable(&subjects.budget("cloud", BudgetState::Warning), h, p).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), dlq.next()).await.expect("a dead letter").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.starts_with("wrong_subject: ") && reason.contains("GpuSample"), "{reason}");
    // Nor is a job assignment (a type it does handle, on its own subject):
    // on a budget subject it is dead-lettered, not acked as an assignment.
    let a = v1::JobAssignment { job_id: "misplaced".into(), node: "n1".into(), ..Default::default() };
    let (h, p) =
        costmesh_contracts::encode(&a, &EventMeta::new::<v1::JobAssignment>("x", clock.now(), ContentType::Protobuf));
    observer.publish_durable(&subjects.budget("cloud", BudgetState::Warning), h, p).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), dlq.next()).await.expect("a dead letter").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.starts_with("wrong_subject: costmesh.v1.JobAssignment does not belong on"), "{reason}");
    shutdown.cancel();
}
