//! Processes killed the way hosts and OOM killers kill them (SIGKILL) and
//! started again: nothing promised is lost or done twice.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use costmesh_contracts::v1::{BudgetState, JobEventKind};
use costmesh_contracts::AnyEvent;
use serde_json::json;

use super::{Host, Mesh, WAIT};

const fn host(name: &'static str, cloud: bool, preemptible: bool) -> Host {
    Host { name, cloud, preemptible }
}

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

/// Watches `/proc` until stopped; records every moment a job had two attempts alive.
pub struct DoubleRunWatch {
    stop: Arc<AtomicBool>,
    doubles: Arc<Mutex<Vec<(String, BTreeSet<u32>)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DoubleRunWatch {
    pub fn start(jobs_of_this_test: Arc<Mutex<BTreeSet<String>>>) -> Self {
        let (stop, doubles) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (s, d) = (stop.clone(), doubles.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let mine = jobs_of_this_test.lock().unwrap().clone();
                let seen = tokio::task::spawn_blocking(job_processes).await.unwrap_or_default();
                for (job, attempts) in seen {
                    if attempts.len() > 1 && mine.contains(&job) {
                        d.lock().unwrap().push((job, attempts));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { stop, doubles, task }
    }

    pub async fn finish(self) -> Vec<(String, BTreeSet<u32>)> {
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
    costmesh_testkit::eventually(WAIT, "the killed agent's jobs gone", || async {
        pids.iter().all(|p| !alive(*p))
    })
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
    tokio::time::sleep(Duration::from_secs(3)).await;
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
