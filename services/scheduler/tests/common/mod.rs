//! A scheduler and simulated gpu-agents on a real nats-server, in virtual time.
#![allow(dead_code)] // each test binary uses part of it

use std::sync::{Arc, Mutex};
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{JobEvent, JobEventKind};
use costmesh_contracts::{ContentType, EventMeta, Subjects};
use costmesh_gpu_agent::config::BackendKind;
use costmesh_runtime::clock::{Clock, VirtualClock};
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::{NatsCluster, NatsServer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(15);
pub const SAMPLE: Duration = Duration::from_secs(10);

/// One simulated node.
pub struct NodeSpec {
    pub name: &'static str,
    pub gpus: usize,
    pub cloud: bool,
    pub preemptible: bool,
}

pub const fn node(name: &'static str, gpus: usize, cloud: bool, preemptible: bool) -> NodeSpec {
    NodeSpec { name, gpus, cloud, preemptible }
}

/// Where the mesh's NATS is: one server, or a cluster (R3).
pub enum Servers {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Servers {
    pub fn url(&self) -> String {
        match self {
            Servers::Single(s) => s.url(),
            Servers::Cluster(c) => c.urls(),
        }
    }

    pub fn options(&self) -> costmesh_bus::NatsConnectOptions {
        let replicas = if matches!(self, Servers::Cluster(_)) { 3 } else { 1 };
        costmesh_bus::NatsConnectOptions { replicas, ..Default::default() }
    }
}

pub struct Mesh {
    pub nats: Servers,
    pub bus: Bus,
    pub subjects: Subjects,
    pub mesh: MeshConfig,
    pub clock: Clock,
    pub time: Arc<VirtualClock>,
    pub sched_cfg: costmesh_scheduler::Config,
    pub sched: Option<(CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>, Bus)>,
    pub agents: Vec<CancellationToken>,
    /// Every job event seen, in order.
    pub events: Arc<Mutex<Vec<JobEvent>>>,
    pub actuator: costmesh_scheduler::actuator::DryRun,
    pub work: std::path::PathBuf,
}

impl Mesh {
    pub async fn start(test: &str, start: &str, sched_cfg: costmesh_scheduler::Config, nodes: &[NodeSpec]) -> Mesh {
        Self::start_on(Servers::Single(NatsServer::start_new()), test, start, sched_cfg, nodes).await
    }

    /// The same on a 3-node nats-server cluster, every stream and bucket R3.
    pub async fn start_on_cluster(
        test: &str,
        start: &str,
        sched_cfg: costmesh_scheduler::Config,
        nodes: &[NodeSpec],
    ) -> Mesh {
        Self::start_on(Servers::Cluster(NatsCluster::start(3)), test, start, sched_cfg, nodes).await
    }

    pub async fn start_on(
        nats: Servers,
        test: &str,
        start: &str,
        sched_cfg: costmesh_scheduler::Config,
        nodes: &[NodeSpec],
    ) -> Mesh {
        costmesh_runtime::telemetry::init_for_tests();
        let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
        let (clock, time) = Clock::manual(start.parse().unwrap());
        let bus = Bus::Nats(NatsBus::connect(&nats.url(), &nats.options()).await.unwrap());
        let subjects = Subjects::new(&mesh.subject_prefix).unwrap();
        let work = std::env::temp_dir().join(&mesh.subject_prefix);
        std::fs::create_dir_all(&work).unwrap();
        let mut m = Mesh {
            nats,
            bus,
            subjects,
            mesh,
            clock,
            time,
            sched_cfg,
            sched: None,
            agents: Vec::new(),
            events: Default::default(),
            actuator: Default::default(),
            work,
        };
        // Record every job event.
        let ctx = m.ctx("test-observer", None, CancellationToken::new()).await;
        ctx.events.ensure_stream().await.unwrap();
        let mut sub = m.bus.subscribe(&m.subjects.jobs_all()).await.unwrap();
        m.bus.flush().await.unwrap();
        let events = m.events.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok((_, e)) = costmesh_contracts::decode::<JobEvent>(&msg.headers, &msg.payload) {
                    events.lock().unwrap().push(e);
                }
            }
        });
        for n in nodes {
            m.start_agent(n).await;
        }
        m.start_scheduler().await;
        m.learn_nodes(nodes.len()).await;
        m
    }

    async fn ctx(&self, service: &str, instance: Option<&str>, shutdown: CancellationToken) -> ServiceContext {
        let bus = Bus::Nats(NatsBus::connect(&self.nats.url(), &self.nats.options()).await.unwrap());
        ServiceContext::new(service, instance, bus, &self.mesh, self.clock.clone(), shutdown)
    }

    pub async fn start_agent(&mut self, n: &NodeSpec) {
        let mut cfg = costmesh_gpu_agent::Config { node: n.name.into(), ..Default::default() };
        cfg.backend = BackendKind::Sim;
        cfg.sim.gpus = vec!["RTX 4090".into(); n.gpus];
        cfg.sample_interval = SAMPLE;
        cfg.cloud = n.cloud;
        cfg.preemptible = n.preemptible;
        cfg.jobs.logs_root = self.work.join("logs").join(n.name);
        cfg.jobs.allowed_commands = vec![std::path::Path::new(&train_script()).parent().unwrap().to_path_buf()];
        cfg.jobs.run_as_user = costmesh_testkit::current_user();
        cfg.jobs.stop_grace = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let ctx = self.ctx("gpu-agent", Some(n.name), shutdown.clone()).await;
        let health = ctx.health.clone();
        tokio::spawn(costmesh_gpu_agent::run(cfg, ctx));
        costmesh_testkit::eventually(WAIT, "agent ready", || {
            let h = health.clone();
            async move { h.is_ready() }
        })
        .await;
        self.agents.push(shutdown);
    }

    pub async fn start_scheduler(&mut self) {
        let shutdown = CancellationToken::new();
        let ctx = self.ctx("scheduler", None, shutdown.clone()).await;
        let (health, bus) = (ctx.health.clone(), ctx.bus().clone());
        // With `gce` configured, the actuator the service builds from it.
        let task = if self.sched_cfg.gce.project.is_empty() {
            tokio::spawn(costmesh_scheduler::run_with_actuator(
                self.sched_cfg.clone(),
                ctx,
                Arc::new(self.actuator.clone()),
            ))
        } else {
            tokio::spawn(costmesh_scheduler::run(self.sched_cfg.clone(), ctx))
        };
        costmesh_testkit::eventually(WAIT, "scheduler ready", || {
            let h = health.clone();
            async move { h.is_ready() }
        })
        .await;
        self.sched = Some((shutdown, task, bus));
    }

    /// Stops the scheduler and waits until it is gone, its NATS connection closed.
    pub async fn stop_scheduler(&mut self) {
        if let Some((token, task, bus)) = self.sched.take() {
            token.cancel();
            tokio::time::timeout(WAIT, task).await.expect("scheduler stops").unwrap().unwrap();
            if let Bus::Nats(n) = bus {
                let _ = n.client().drain().await;
            }
        }
    }

    /// Advances one sample interval at a time until the scheduler knows `n` nodes.
    pub async fn learn_nodes(&self, n: usize) {
        // Each probe moves time one sample on, so the agents publish.
        costmesh_testkit::wait_for(WAIT, &format!("the scheduler to learn {n} nodes from telemetry"), || async {
            self.time.advance(SAMPLE).await;
            let nodes = self.api("nodes", json!({})).await;
            let alive = nodes["nodes"].as_array().map_or(0, |a| a.iter().filter(|n| n["alive"] == true).count());
            if alive >= n {
                Ok(())
            } else {
                Err(nodes.to_string())
            }
        })
        .await
    }

    pub async fn api(&self, verb: &str, body: Value) -> Value {
        self.api_as(verb, body, None).await
    }

    /// A request under `costmesh-request-id: request_id`.
    pub async fn api_as(&self, verb: &str, body: Value, request_id: Option<&str>) -> Value {
        let mut headers = costmesh_bus::Headers::new();
        if let Some(r) = request_id {
            headers.insert(costmesh_runtime::events::REQUEST_ID, r);
        }
        let m = self
            .bus
            .request(&self.subjects.api("scheduler", verb), headers, bytes::Bytes::from(body.to_string()), WAIT)
            .await
            .unwrap();
        serde_json::from_slice(&m.payload).unwrap()
    }

    pub async fn submit(&self, spec: Value) -> String {
        let r = self.api("submit", spec).await;
        r["job"]["id"].as_str().unwrap_or_else(|| panic!("submit refused: {r}")).to_string()
    }

    pub async fn show(&self, id: &str) -> Value {
        self.api("show", json!({ "id": id })).await["job"].clone()
    }

    /// Waits (real time) for a job event matching `pred`.
    pub async fn wait_event(&self, what: &str, pred: impl Fn(&JobEvent) -> bool) -> JobEvent {
        costmesh_testkit::wait_for(WAIT, what, || {
            let events = self.events.lock().unwrap();
            let found = events.iter().find(|e| pred(e)).cloned().ok_or_else(|| format!("{events:#?}"));
            std::future::ready(found)
        })
        .await
    }

    /// Waits (real time) until the job's attempt has set up its signal handlers.
    pub async fn job_ready(&self, node: &str, job: &str, attempt: u32) {
        let log = self.work.join("logs").join(node).join(job).join(format!("{attempt}.log"));
        costmesh_testkit::eventually(WAIT, "the job ready", || {
            let log = log.clone();
            async move { std::fs::read_to_string(&log).is_ok_and(|l| l.contains(": ready")) }
        })
        .await;
    }

    /// Waits (real time) until the scheduler has the job in `state`.
    pub async fn wait_state(&self, job: &str, state: &str) {
        costmesh_testkit::wait_for(WAIT, &format!("job {job} {state}"), || async {
            let j = self.show(job).await;
            if j["state"] == state {
                Ok(())
            } else {
                Err(j.to_string())
            }
        })
        .await
    }

    pub fn count(&self, job: &str, kind: JobEventKind) -> usize {
        self.events.lock().unwrap().iter().filter(|e| e.job_id == job && e.kind() == kind).count()
    }

    /// Publishes a job event as `node`'s agent would.
    pub async fn report(&self, job: &str, kind: JobEventKind, node: &str, attempt: u32, exit_code: i32) {
        let e = JobEvent {
            job_id: job.into(),
            kind: kind as i32,
            node: node.into(),
            attempt,
            exit_code,
            ..Default::default()
        };
        self.publish(&self.subjects.job(job, kind), &e).await;
    }

    pub async fn publish<E: costmesh_contracts::Event>(&self, subject: &str, e: &E) {
        let (h, p) =
            costmesh_contracts::encode(e, &EventMeta::new::<E>("test", self.clock.now(), ContentType::Protobuf));
        self.bus.publish_durable(subject, h, p).await.unwrap();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((token, _, _)) = self.sched.take() {
            token.cancel();
        }
        for a in &self.agents {
            a.cancel();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// The example job from `examples/jobs/train.sh`.
pub fn train_script() -> String {
    let root = std::env::current_dir().unwrap();
    let root = root.ancestors().find(|d| d.join("Cargo.lock").is_file()).unwrap().to_path_buf();
    root.join("examples/jobs/train.sh").display().to_string()
}

/// A job spec in proto3 JSON.
pub fn job(name: &str, hours: f64, extra: Value) -> Value {
    let mut spec = json!({
        "name": name,
        "command": train_script(),
        "gpus": 1,
        "estimatedDurationS": ((hours * 3600.0) as u64).to_string(),
        "class": "JOB_CLASS_TRAINING",
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}
