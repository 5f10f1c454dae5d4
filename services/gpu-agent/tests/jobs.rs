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
use costmesh_runtime::signing::Signer;
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
    clock: std::sync::Arc<costmesh_runtime::clock::VirtualClock>,
}

async fn node(test: &str) -> Node {
    node_with(test, |_| {}).await
}

async fn node_with(test: &str, tweak: impl FnOnce(&mut Config)) -> Node {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
    let subjects = Subjects::new(&mesh.subject_prefix).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut cfg = Config { node: "n1".into(), ..Default::default() };
    cfg.backend = BackendKind::Sim;
    cfg.sim.gpus = vec!["RTX 4090".into(); 2];
    cfg.jobs.logs_root = logs.path().to_path_buf();
    cfg.jobs.allowed_commands = vec!["/bin/bash".into(), "/bin/sh".into()];
    cfg.jobs.run_as_user = costmesh_testkit::current_user();
    tweak(&mut cfg);
    cfg.jobs.stop_grace = Duration::from_millis(300);
    let (clock, time) = Clock::manual("2026-07-01T06:00:00Z".parse().unwrap());
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
    Node { nats, bus, subjects, events, logs, shutdown, clock: time }
}

impl Node {
    async fn send<E: costmesh_contracts::Event>(&self, subject: &str, e: &E) {
        self.send_signed(subject, e, None).await
    }

    async fn send_signed<E: costmesh_contracts::Event>(&self, subject: &str, e: &E, signer: Option<&Signer>) {
        let (mut h, p) =
            costmesh_contracts::encode(e, &EventMeta::new::<E>("test", chrono::Utc::now(), ContentType::Protobuf));
        if let Some(s) = signer {
            s.sign(subject, &mut h, &p);
        }
        self.bus.publish_durable(subject, h, p).await.unwrap();
    }

    fn assignment(&self, job: &str, attempt: u32, command: &str, args: &[&str]) -> JobAssignment {
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
        JobAssignment {
            job_id: job.into(),
            attempt,
            node: "n1".into(),
            gpu_indices: vec![1],
            spec: Some(spec),
            fencing_token: attempt as u64,
            resume_from: String::new(),
        }
    }

    async fn assign(&self, job: &str, attempt: u32, command: &str, args: &[&str]) {
        let a = self.assignment(job, attempt, command, args);
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

/// Samples name the attempt that holds each GPU, from the agent's own job
/// table: the cost-watcher books energy to it without joining streams.
#[tokio::test]
async fn samples_name_the_job_attempt_and_team_holding_each_gpu() {
    use costmesh_contracts::v1::GpuSample;
    let n = node("jobsample").await;
    let mut sub = n.bus.subscribe(&n.subjects.gpu_telemetry_all()).await.unwrap();
    n.bus.flush().await.unwrap();
    let mut a = n.assignment("j7", 2, "bash", &["-c", "sleep 30"]);
    a.spec.as_mut().unwrap().team = "vision".into();
    n.send(&n.subjects.node_assign("n1"), &a).await;
    n.wait("started", |e| e.job_id == "j7" && e.kind() == JobEventKind::Started).await;
    // Next sampling pass: GPU 1 is held by j7's attempt 2, GPU 0 by nobody.
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 2 && tokio::time::Instant::now() < deadline {
        n.clock.advance(Duration::from_secs(5)).await;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            let (_, s) = costmesh_contracts::decode::<GpuSample>(&m.headers, &m.payload).unwrap();
            seen.insert(s.gpu_index, s);
        }
    }
    let held = &seen[&1];
    assert_eq!((held.job_id.as_str(), held.job_attempt, held.job_team.as_str()), ("j7", 2, "vision"), "{held:?}");
    assert_eq!(held.node_gpu_count, 2);
    assert_eq!(seen[&0].job_id, "", "GPU 0 runs nothing: {:?}", seen[&0]);
    // Once the attempt is stopped, the GPU is nobody's again.
    n.signal("j7", 2, JobSignalKind::Stop).await;
    n.wait("exited", |e| e.job_id == "j7" && e.kind() == JobEventKind::Exited).await;
    let mut released = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !released && tokio::time::Instant::now() < deadline {
        n.clock.advance(Duration::from_secs(5)).await;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            let (_, s) = costmesh_contracts::decode::<GpuSample>(&m.headers, &m.payload).unwrap();
            released |= s.gpu_index == 1 && s.job_id.is_empty();
        }
    }
    assert!(released, "GPU 1 still named j7 after the attempt ended");
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
    // `<kind>: <detail>`, as docs/subjects.md says.
    assert!(reason.starts_with("rejected: ") && reason.contains("job id refused"), "{reason}");
    assert!(!std::path::Path::new("/tmp/costmesh-should-not-exist").exists());
}

/// A command outside `allowed_commands` (or with an env that would change
/// what runs) fails naming the rule, and nothing runs: no process, no log.
#[tokio::test]
async fn a_command_that_is_not_allowed_fails_with_the_rule_and_runs_nothing() {
    let n = node("jobpolicy").await;
    let marker = n.logs.path().join("marker");
    let m = marker.display().to_string();
    n.assign("j-touch", 1, "touch", &[&m]).await;
    let e = n.wait("failed", |e| e.job_id == "j-touch" && e.kind() == JobEventKind::Failed).await;
    assert!(e.reason.contains("not allowed by gpu_agent.jobs.allowed_commands"), "{e:?}");
    assert!(e.reason.contains("/bin/bash"), "the reason lists what is allowed: {e:?}");
    // A path through an allowed directory's parent is resolved first.
    n.assign("j-dotdot", 1, "/usr/bin/../bin/touch", &[&m]).await;
    let e = n.wait("failed", |e| e.job_id == "j-dotdot" && e.kind() == JobEventKind::Failed).await;
    assert!(e.reason.contains("resolved to /usr/bin/touch"), "{e:?}");
    // An allowed shell with a preloaded library is refused too.
    let mut a = n.assignment("j-preload", 1, "/bin/sh", &["-c", &format!("touch {m}")]);
    a.spec.as_mut().unwrap().env.insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
    n.send(&n.subjects.node_assign("n1"), &a).await;
    let e = n.wait("failed", |e| e.job_id == "j-preload" && e.kind() == JobEventKind::Failed).await;
    assert!(e.reason.contains("may not set LD_PRELOAD"), "{e:?}");
    // Fenced and ordered: an allowed job after them runs, so they were all handled.
    n.assign("j-ok", 1, "/bin/sh", &["-c", "echo fine"]).await;
    n.wait("exited", |e| e.job_id == "j-ok" && e.kind() == JobEventKind::Exited).await;
    assert!(!marker.exists(), "a refused command ran");
    for job in ["j-touch", "j-dotdot", "j-preload"] {
        assert!(!n.logs.path().join(job).exists(), "{job}: a refused job got a log directory");
        let started = n.events.lock().unwrap().iter().any(|e| e.job_id == job && e.kind() == JobEventKind::Started);
        assert!(!started, "{job} reported started");
    }
}

/// With no allowed commands, nothing runs at all.
#[tokio::test]
async fn an_empty_allow_list_runs_nothing() {
    let n = node_with("jobnone", |c| c.jobs.allowed_commands.clear()).await;
    n.assign("j1", 1, "/bin/sh", &["-c", "echo hi"]).await;
    let e = n.wait("failed", |e| e.job_id == "j1" && e.kind() == JobEventKind::Failed).await;
    assert!(e.reason.contains("allowed_commands is empty"), "{e:?}");
}

/// An agent running as root runs jobs as the configured user and group.
#[tokio::test]
async fn jobs_run_as_the_configured_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only an agent running as root can switch users (CI runs as root)");
        return;
    }
    let n = node_with("jobuser", |c| {
        c.jobs.run_as_user = "nobody".into();
        c.jobs.run_as_group = "nogroup".into();
    })
    .await;
    n.assign("j-id", 1, "/bin/sh", &["-c", "echo uid=$(id -u) gid=$(id -g) groups=$(id -G)"]).await;
    n.wait("exited", |e| e.job_id == "j-id" && e.kind() == JobEventKind::Exited).await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    let log = n.log("j-id", 1);
    let want = format!("uid={} gid={} groups={}", nobody.uid, nogroup.gid, nogroup.gid);
    assert!(log.contains(&want), "want {want:?} (no supplementary groups of root kept), got {log:?}");
}

/// With trusted scheduler keys, an unsigned or foreign-signed assignment is
/// refused and dead-lettered, and runs nothing; one the scheduler signed runs.
#[tokio::test]
async fn a_forged_assignment_is_refused_and_dead_lettered() {
    let scheduler = nkeys::KeyPair::new_user();
    let trusted = scheduler.public_key();
    let n = node_with("jobsigned", move |c| c.trusted_scheduler_keys = vec![trusted]).await;
    let signer = Signer::from_seed(&scheduler.seed().unwrap()).unwrap();
    let forger = Signer::from_seed(&nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let mut dlq = n.bus.subscribe(&n.subjects.dlq("gpu-agent")).await.unwrap();
    n.bus.flush().await.unwrap();
    let marker = n.logs.path().join("forged");
    let touch = format!("touch {}", marker.display());
    let subject = n.subjects.node_assign("n1");
    for (job, by, why) in [("j-unsigned", None, "not signed"), ("j-foreign", Some(&forger), "not a trusted key")] {
        n.send_signed(&subject, &n.assignment(job, 1, "/bin/sh", &["-c", &touch]), by).await;
        let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter").unwrap();
        let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
        assert!(reason.contains("JobAssignment refused") && reason.contains(why), "{job}: {reason}");
    }
    // Signed for another node and replayed onto this one: the subject is signed too.
    let other = n.subjects.node_assign("n2");
    let a = n.assignment("j-replayed", 1, "/bin/sh", &["-c", &touch]);
    let (mut h, p) = costmesh_contracts::encode(
        &a,
        &EventMeta::new::<JobAssignment>("test", chrono::Utc::now(), ContentType::Protobuf),
    );
    signer.sign(&other, &mut h, &p);
    n.bus.publish_durable(&subject, h, p).await.unwrap();
    let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.contains("does not match"), "{reason}");
    // Signals are checked the same way.
    let stop =
        JobSignal { job_id: "j-x".into(), attempt: 1, kind: JobSignalKind::Stop as i32, reason: "forged".into() };
    n.send(&n.subjects.node_signal("n1"), &stop).await;
    let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("a dead letter").unwrap();
    assert!(d.subject.ends_with(".dlq.gpu-agent"), "{}", d.subject);

    n.send_signed(&subject, &n.assignment("j-signed", 1, "/bin/sh", &["-c", "echo signed-ok"]), Some(&signer)).await;
    n.wait("exited", |e| e.job_id == "j-signed" && e.kind() == JobEventKind::Exited).await;
    assert!(n.log("j-signed", 1).contains("signed-ok"));
    assert!(!marker.exists(), "a forged assignment ran");
    assert!(n.events.lock().unwrap().iter().all(|e| e.job_id == "j-signed"), "forged jobs reported events");
}
