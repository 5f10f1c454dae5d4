//! The node side of jobs: gpu-agent runs assignments as child processes on
//! a real nats-server (sim GPUs, virtual clock for the agent).
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{JobAssignment, JobClass, JobEvent, JobEventKind, JobSignal, JobSignalKind, JobSpec};
use costmesh_contracts::{ContentType, EventMeta, Subjects};
use costmesh_gpu_agent::config::BackendKind;
use costmesh_gpu_agent::Config;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

struct Node {
    nats: NatsServer,
    bus: Bus,
    subjects: Subjects,
    events: std::sync::Arc<std::sync::Mutex<Vec<JobEvent>>>,
    logs: tempfile::TempDir,
    shutdown: CancellationToken,
}

async fn node(test: &str) -> Node {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
    let subjects = Subjects::new(&mesh.subject_prefix).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut cfg = Config { node: "n1".into(), ..Default::default() };
    cfg.backend = BackendKind::Sim;
    cfg.sim.gpus = vec!["RTX 4090".into(); 2];
    cfg.jobs.logs_root = logs.path().to_path_buf();
    cfg.jobs.stop_grace = Duration::from_millis(300);
    let (clock, _time) = Clock::manual("2026-07-01T06:00:00Z".parse().unwrap());
    let shutdown = CancellationToken::new();
    let connect = || async { Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap()) };
    let ctx = ServiceContext::new("gpu-agent", Some("n1"), connect().await, &mesh, clock, shutdown.clone());
    ctx.events.ensure_stream().await.unwrap();
    let bus = connect().await;
    let events: std::sync::Arc<std::sync::Mutex<Vec<JobEvent>>> = Default::default();
    // Job events are durable: read them from the stream, so none is missed
    // across a NATS restart.
    let ev = events.clone();
    let consumer =
        ctx.events.durable("test-observer", vec![subjects.jobs_all()], Duration::from_secs(30)).await.unwrap();
    // Its own token: the observer outlives the agent's shutdown.
    let (events_bus, token) = (ctx.events.clone(), CancellationToken::new());
    tokio::spawn(async move {
        events_bus
            .consume_durable::<JobEvent, _, _>(consumer, token, move |_, _, e| {
                let ev = ev.clone();
                async move {
                    ev.lock().unwrap().push(e);
                    Ok(())
                }
            })
            .await
    });
    let health = ctx.health.clone();
    tokio::spawn(costmesh_gpu_agent::run(cfg, ctx));
    costmesh_testkit::eventually(WAIT, "agent ready", || {
        let h = health.clone();
        async move { h.is_ready() }
    })
    .await;
    Node { nats, bus, subjects, events, logs, shutdown }
}

impl Node {
    async fn send<E: costmesh_contracts::Event>(&self, subject: &str, e: &E) {
        let (h, p) =
            costmesh_contracts::encode(e, &EventMeta::new::<E>("test", chrono::Utc::now(), ContentType::Protobuf));
        self.bus.publish_durable(subject, h, p).await.unwrap();
    }

    async fn assign(&self, job: &str, attempt: u32, command: &str, args: &[&str]) {
        let spec = JobSpec {
            name: job.into(),
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            gpus: 1,
            estimated_duration_s: 60,
            class: JobClass::Training as i32,
            checkpoint_dir: self.logs.path().join("ckpt").display().to_string(),
            ..Default::default()
        };
        let a = JobAssignment {
            job_id: job.into(),
            attempt,
            node: "n1".into(),
            gpu_indices: vec![1],
            spec: Some(spec),
            fencing_token: attempt as u64,
            resume_from: String::new(),
        };
        self.send(&self.subjects.node_assign("n1"), &a).await;
    }

    async fn signal(&self, job: &str, attempt: u32, kind: JobSignalKind) {
        let s = JobSignal { job_id: job.into(), attempt, kind: kind as i32, reason: "test".into() };
        self.send(&self.subjects.node_signal("n1"), &s).await;
    }

    async fn wait(&self, what: &str, pred: impl Fn(&JobEvent) -> bool) -> JobEvent {
        costmesh_testkit::wait_for(WAIT, what, || {
            let events = self.events.lock().unwrap();
            let found = events.iter().find(|e| pred(e)).cloned().ok_or_else(|| format!("{events:#?}"));
            std::future::ready(found)
        })
        .await
    }

    fn log(&self, job: &str, attempt: u32) -> String {
        std::fs::read_to_string(self.logs.path().join(job).join(format!("{attempt}.log"))).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

const SCRIPT: &str = r#"
trap 'echo "COSTMESH_CHECKPOINT /ckpt/$n"' USR1
echo "gpus=$CUDA_VISIBLE_DEVICES job=$COSTMESH_JOB_ID attempt=$COSTMESH_ATTEMPT dir=$COSTMESH_CHECKPOINT_DIR ready"
echo "to stderr" >&2
n=0
while [ $n -lt 60 ]; do n=$((n+1)); sleep 0.05 & wait $!; done
exit 3
"#;

#[tokio::test]
async fn a_job_runs_with_its_env_logs_checkpoints_and_exit_code_and_is_fenced() {
    let n = node("jobrun").await;
    n.assign("j1", 1, "bash", &["-c", SCRIPT]).await;
    n.wait("started", |e| e.job_id == "j1" && e.kind() == JobEventKind::Started).await;
    costmesh_testkit::eventually(WAIT, "job ready", || async { n.log("j1", 1).contains("ready") }).await;
    let log = n.log("j1", 1);
    assert!(log.contains("gpus=1 job=j1 attempt=1 dir="), "{log}");
    // The same assignment again, and an older attempt: fenced, nothing new starts.
    n.assign("j1", 1, "bash", &["-c", SCRIPT]).await;
    n.signal("j1", 1, JobSignalKind::Checkpoint).await;
    let c = n.wait("checkpointed", |e| e.job_id == "j1" && e.kind() == JobEventKind::Checkpointed).await;
    assert!(c.checkpoint_path.starts_with("/ckpt/"), "{c:?}");
    let exited = n.wait("exited", |e| e.job_id == "j1" && e.kind() == JobEventKind::Exited).await;
    assert_eq!(exited.exit_code, 3);
    let starts = n.events.lock().unwrap().iter().filter(|e| e.kind() == JobEventKind::Started).count();
    assert_eq!(starts, 1, "a repeated assignment started the job again");
    let log = n.log("j1", 1);
    assert!(log.contains("to stderr") && log.contains("COSTMESH_CHECKPOINT /ckpt/"), "{log}");
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_grace() {
    let n = node("jobstop").await;
    // Ignores SIGTERM: only SIGKILL ends it.
    n.assign("stubborn", 1, "bash", &["-c", "trap '' TERM; echo ready; while true; do sleep 0.05; done"]).await;
    n.wait("started", |e| e.job_id == "stubborn" && e.kind() == JobEventKind::Started).await;
    costmesh_testkit::eventually(WAIT, "job ready", || async { n.log("stubborn", 1).contains("ready") }).await;
    n.signal("stubborn", 1, JobSignalKind::Stop).await;
    let e = n.wait("exited", |e| e.job_id == "stubborn" && e.kind() == JobEventKind::Exited).await;
    assert_eq!(e.exit_code, 128 + 9, "{e:?}");
    assert!(e.reason.contains("signal 9"), "{e:?}");
}

#[tokio::test]
async fn a_job_keeps_running_while_nats_is_down_and_its_events_arrive_after() {
    let mut n = node("jobnats").await;
    n.assign("long", 1, "bash", &["-c", "echo ready; sleep 1.5; echo done; exit 0"]).await;
    n.wait("started", |e| e.job_id == "long" && e.kind() == JobEventKind::Started).await;
    n.nats.stop();
    // The job finishes while the node has no NATS.
    costmesh_testkit::eventually(WAIT, "job done", || async { n.log("long", 1).contains("done") }).await;
    n.nats.start();
    let e = n
        .wait("exited, reported after the reconnect", |e| e.job_id == "long" && e.kind() == JobEventKind::Exited)
        .await;
    assert_eq!(e.exit_code, 0);
}

#[tokio::test]
async fn an_agent_shutting_down_stops_its_jobs_and_reports_them_interrupted() {
    let n = node("jobshutdown").await;
    n.assign(
        "j9",
        1,
        "bash",
        &["-c", "trap 'echo stopping; exit 0' TERM; echo ready; while true; do sleep 0.05 & wait $!; done"],
    )
    .await;
    n.wait("started", |e| e.job_id == "j9" && e.kind() == JobEventKind::Started).await;
    costmesh_testkit::eventually(WAIT, "job ready", || async { n.log("j9", 1).contains("ready") }).await;
    n.shutdown.cancel();
    let e = n.wait("interrupted", |e| e.job_id == "j9" && e.kind() == JobEventKind::Interrupted).await;
    assert!(e.reason.contains("gpu-agent is shutting down"), "{e:?}");
    assert!(n.log("j9", 1).contains("stopping"), "the job got SIGTERM first");
}

/// `costmesh jobs logs` asks the node: ids with `/` or `..` are refused,
/// and a link inside the logs root that points out of it is not followed.
#[tokio::test]
async fn the_logs_api_reads_nothing_outside_the_logs_root() {
    let n = node("logsapi").await;
    let ask = |job: &str, attempt: u32| {
        let (bus, subject, body) = (
            n.bus.clone(),
            n.subjects.node_logs("n1"),
            serde_json::json!({"job_id": job, "attempt": attempt}).to_string(),
        );
        async move {
            let r = bus.request(&subject, Default::default(), bytes::Bytes::from(body), WAIT).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()
        }
    };
    // A secret outside the root, and a log directory that links to it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("1.log"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), n.logs.path().join("j-evil")).unwrap();
    for (job, why) in [
        (outside.path().display().to_string(), "job_id refused"),
        ("../../etc".to_string(), "job_id refused"),
        ("..".to_string(), "job_id refused"),
        ("j-evil".to_string(), "resolves outside the logs root"),
    ] {
        let v = ask(&job, 1).await;
        let err = v["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains(why), "{job}: {v}");
        assert!(v["log"].is_null() && !v.to_string().contains("secret"), "{job}: {v}");
    }
    // A real job's log is still served.
    n.assign("j-real", 1, "/bin/sh", &["-c", "echo hello-log"]).await;
    n.wait("exited", |e| e.job_id == "j-real" && e.kind() == JobEventKind::Exited).await;
    let v = ask("j-real", 1).await;
    assert!(v["log"].as_str().is_some_and(|l| l.contains("hello-log")), "{v}");
    // An assignment whose id is a path is dead-lettered, and runs nothing.
    let mut dlq = n.bus.subscribe(&n.subjects.dlq("gpu-agent")).await.unwrap();
    n.bus.flush().await.unwrap();
    n.assign("../escape", 1, "/bin/sh", &["-c", "touch /tmp/costmesh-should-not-exist"]).await;
    let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.contains("job id refused"), "{reason}");
    assert!(!std::path::Path::new("/tmp/costmesh-should-not-exist").exists());
}
