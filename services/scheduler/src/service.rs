//! The scheduler service. One task owns the state (jobs, nodes, budget) and
//! takes, in turn, API requests, durable events (job events from the
//! agents, preemption notices, budget events), telemetry and clock ticks.
//! Every change to a job is written to the JetStream KV bucket
//! `<PREFIX>_jobs` with compare-and-set before anything is published about
//! it; the revision of the write that placed a job is its assignment's
//! fencing token. A restarted scheduler reads the bucket and carries on.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Datelike, Timelike, Utc, Weekday};
use costmesh_bus::{BusErrorKind, Kv};
use costmesh_contracts::v1::{
    Action, BudgetEvent, BudgetState, GpuSample, JobAssignment, JobClass, JobEvent, JobEventKind, JobSignal,
    JobSignalKind, JobSpec, PowerCommand, PowerProfile, PreemptionNotice,
};
use costmesh_contracts::AnyEvent;
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::tariff::Days;
use costmesh_runtime::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::actuator::{Actuator, DryRun};
use crate::model::{validate, Job, LostAttempt, State};
use crate::plan::{plan_pass, Decision, Node, Placement, Planner, PriceTable};
use crate::Config;

/// The request-reply verbs under `<prefix>.api.scheduler.<verb>`.
pub const VERBS: &[&str] = &["submit", "list", "show", "cancel", "nodes", "policy"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone)]
struct Metrics {
    decisions: Family<KindLabels, Counter>,
    jobs: Family<StateLabels, Gauge>,
    notice_to_signal: Histogram,
}

impl Metrics {
    fn register(ctx: &ServiceContext) -> Self {
        let m = Metrics {
            decisions: Family::default(),
            jobs: Family::default(),
            notice_to_signal: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        };
        ctx.register("costmesh_scheduler_decisions", "Scheduling decisions by kind", m.decisions.clone());
        ctx.register("costmesh_scheduler_jobs", "Jobs by state", m.jobs.clone());
        ctx.register(
            "costmesh_scheduler_preemption_signal_seconds",
            "From receiving a preemption notice to the checkpoint signal being published",
            m.notice_to_signal.clone(),
        );
        m
    }
}

enum Msg {
    /// Each with the span it arrived under, so the main loop's work is part
    /// of the request's or the event's trace.
    Api {
        verb: String,
        body: Bytes,
        /// The client's `costmesh-request-id` (checked; Err says why not).
        request_id: Result<Option<String>, String>,
        reply: oneshot::Sender<Value>,
        span: tracing::Span,
    },
    Event {
        event: Box<AnyEvent>,
        done: oneshot::Sender<()>,
        span: tracing::Span,
    },
    Sample(Box<GpuSample>),
}

struct Sched {
    cfg: Config,
    planner: Planner,
    ctx: ServiceContext,
    kv: Kv,
    actuator: Arc<dyn Actuator>,
    metrics: Metrics,
    /// Every job with the KV revision it was last written at.
    jobs: HashMap<String, (Job, u64)>,
    nodes: BTreeMap<String, Node>,
    budgets: HashMap<String, BudgetState>,
    /// When each running job was last asked to checkpoint.
    last_ask: HashMap<String, DateTime<Utc>>,
    /// Assigned jobs whose assignment is not yet known to be published.
    unsent: HashSet<String>,
    /// Nodes with lost attempts to stop when they are heard from again.
    fence_pending: HashSet<String>,
    /// The bus's connection count at the last liveness check: silence heard
    /// while the scheduler itself was cut off proves nothing about nodes.
    connects_seen: u64,
    /// The clock at the last decision pass: anything due after it wakes the
    /// loop, even when the clock has since passed it (a virtual clock can
    /// jump between a pass and the next wake-up's computation).
    decided_at: DateTime<Utc>,
}

/// Runs the scheduler until shutdown, with the Compute Engine actuator when
/// `gce.project` is set (dry run unless `gce.apply`), else the recording one.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let actuator: Arc<dyn Actuator> = if cfg.gce.project.is_empty() {
        Arc::new(DryRun::default())
    } else {
        tracing::info!(project = %cfg.gce.project, zones = ?cfg.gce.zones, label = %cfg.gce.label, apply = cfg.gce.apply, "Compute Engine actuator");
        Arc::new(crate::gce::Gce::new(cfg.gce.clone()).await?)
    };
    run_with_actuator(cfg, ctx, actuator).await
}

/// Runs the scheduler, sending idle actions to `actuator`.
pub async fn run_with_actuator(cfg: Config, ctx: ServiceContext, actuator: Arc<dyn Actuator>) -> anyhow::Result<()> {
    let signer = match &cfg.signing_key_file {
        Some(f) => Some(
            costmesh_runtime::signing::Signer::from_file(f)
                .map_err(|e| anyhow::anyhow!("scheduler.signing_key_file: {e}"))?,
        ),
        None => None,
    };
    if let Some(s) = &signer {
        tracing::info!(key = %s.public_key(), "commands to nodes are signed");
    }
    let ctx = ctx.with_signer(signer);
    // Of several schedulers on one prefix, the one holding the lease acts.
    let metrics = Metrics::register(&ctx);
    costmesh_runtime::lease::run_when_active(ctx, "scheduler", |ctx| {
        act(cfg.clone(), ctx, actuator.clone(), metrics.clone())
    })
    .await
}

/// The scheduler while it holds the lease: state loaded from the job
/// bucket, inputs consumed, decisions made, until shutdown or the lease is
/// lost.
async fn act(cfg: Config, ctx: ServiceContext, actuator: Arc<dyn Actuator>, metrics: Metrics) -> anyhow::Result<()> {
    ctx.events.ensure_stream().await?;
    let bucket = costmesh_runtime::service::kv_bucket(ctx.subjects(), "jobs");
    let kv = ctx.kv("jobs").await?;
    let planner = planner(&cfg, &ctx);
    let mut s = Sched {
        cfg: cfg.clone(),
        planner,
        ctx: ctx.clone(),
        kv,
        actuator,
        metrics,
        jobs: HashMap::new(),
        nodes: BTreeMap::new(),
        budgets: HashMap::new(),
        last_ask: HashMap::new(),
        unsent: HashSet::new(),
        fence_pending: HashSet::new(),
        connects_seen: ctx.bus().connects(),
        decided_at: ctx.clock.now(),
    };
    s.load().await?;
    // Budget states are whatever the newest event of each scope says; the
    // durable consumer below resumes after what was acked, so they are
    // rebuilt here (a restart must not forget an exceeded budget).
    for (_, _, b) in ctx.events.latest_per_subject::<BudgetEvent>(vec![ctx.subjects().budget_all()]).await? {
        s.budgets.insert(b.scope.clone(), b.state());
    }
    if s.budget_level() != BudgetState::Ok {
        tracing::warn!(level = s.budget_level().as_str_name(), "budget state restored at start: scheduling follows it");
    }

    let (tx, mut rx) = mpsc::channel::<Msg>(1024);
    // Durable inputs: job events, preemption notices, budget events.
    let filters = vec![ctx.subjects().jobs_all(), ctx.subjects().preemption_all(), ctx.subjects().budget_all()];
    let etx = tx.clone();
    // A short ack wait: a message handed to a consumer that is gone (a
    // scheduler that just stopped) comes back within seconds; handling is
    // idempotent and de-duplicated by event id.
    let sub = ctx.events.durable("inputs", filters, std::time::Duration::from_secs(5)).await?;
    let (events_bus, events_shutdown) = (ctx.events.clone(), ctx.shutdown.clone());
    let events = tokio::spawn(async move {
        events_bus
            .consume_durable::<AnyEvent, _, _>(sub, events_shutdown, move |_, _, event| {
                let etx = etx.clone();
                async move {
                    match &event {
                        AnyEvent::JobEvent(_) | AnyEvent::PreemptionNotice(_) | AnyEvent::BudgetEvent(_) => {}
                        other => {
                            return Err(HandlerError::Reject(format!(
                                "{} does not belong on this subject",
                                other.type_name()
                            )))
                        }
                    }
                    let (done, wait) = oneshot::channel();
                    etx.send(Msg::Event { event: Box::new(event), done, span: tracing::Span::current() })
                        .await
                        .map_err(|_| HandlerError::Retry("scheduler stopping".into()))?;
                    wait.await.map_err(|_| HandlerError::Retry("scheduler stopping".into()))
                }
            })
            .await
    });
    // Telemetry (core NATS: a lost sample costs nothing).
    {
        let mut sub = ctx.bus().subscribe(&ctx.subjects().gpu_telemetry_all()).await?;
        let (tx, shutdown, events) = (tx.clone(), ctx.shutdown.clone(), ctx.events.clone());
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                match costmesh_contracts::decode::<GpuSample>(&msg.headers, &msg.payload) {
                    Ok((_, s)) => {
                        let _ = tx.try_send(Msg::Sample(Box::new(s)));
                    }
                    Err(e) => events.dead_letter(&msg, e.kind.as_str(), &e.detail).await,
                }
            }
        });
    }
    // The job API.
    for verb in VERBS {
        let mut sub = ctx.bus().subscribe(&ctx.subjects().api("scheduler", verb)).await?;
        let (tx, bus, shutdown, verb) = (tx.clone(), ctx.bus().clone(), ctx.shutdown.clone(), verb.to_string());
        let subjects = ctx.subjects().clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                let (reply, answer) = oneshot::channel();
                let span = costmesh_runtime::telemetry::server_span(&subjects, "scheduler", &msg.subject, &msg.headers);
                let request_id = costmesh_runtime::events::request_id(&msg.headers).map(|r| r.map(str::to_string));
                let api = Msg::Api { verb: verb.clone(), body: msg.payload.clone(), request_id, reply, span };
                if tx.send(api).await.is_err() {
                    return;
                }
                let body = answer.await.unwrap_or_else(|_| json!({"error": "scheduler stopping"}));
                let mut h = costmesh_bus::Headers::new();
                h.insert("content-type", "application/json");
                if let Err(e) = bus.respond(&msg, h.clone(), Bytes::from(body.to_string())).await {
                    tracing::warn!(%verb, error = %e, "API reply not sent; answering with the error instead");
                    let err = json!({"error": format!("the {verb} reply could not be sent: {e}")});
                    let _ = bus.respond(&msg, h, Bytes::from(err.to_string())).await;
                }
            }
        });
    }
    // Subscriptions reach the server before anyone is told we are ready.
    ctx.bus_ready().await?;
    tracing::info!(bucket, jobs = s.jobs.len(), "scheduler ready");

    let mut ticker = ctx.clock.ticker(cfg.decide_interval);
    loop {
        let wake = s.next_wake();
        let clock = ctx.clock.clone();
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            _ = async move { match wake { Some(t) => clock.sleep_until(t).await, None => std::future::pending().await } } => {}
            m = rx.recv() => match m {
                None => break,
                Some(Msg::Sample(sample)) => {
                    let node = sample.node.clone();
                    s.on_sample(*sample);
                    if !s.fence_pending.contains(&node) {
                        continue;
                    }
                    s.fence_returned(&node).await;
                }
                Some(Msg::Api { verb, body, request_id, reply, span }) => {
                    let v = s.api(&verb, &body, request_id).instrument(span).await;
                    let _ = reply.send(v);
                    if READ_ONLY_VERBS.contains(&verb.as_str()) {
                        continue;
                    }
                }
                Some(Msg::Event { event, done, span }) => {
                    // Its own decisions coming back change nothing: no pass.
                    let own = matches!(&*event, AnyEvent::JobEvent(e) if !from_agents(e.kind()));
                    s.on_event(*event).instrument(span).await;
                    let _ = done.send(());
                    if own {
                        continue;
                    }
                }
            },
        }
        s.decide().await;
    }
    let _ = events.await;
    Ok(())
}

fn planner(cfg: &Config, ctx: &ServiceContext) -> Planner {
    let t = |v: &str| crate::time_of_day(v).unwrap_or_default();
    let d = |v: std::time::Duration| chrono::Duration::from_std(v).unwrap_or(chrono::Duration::MAX);
    Planner {
        tz: ctx.mesh.tz(),
        off_peak_start: t(&cfg.off_peak_start),
        off_peak_end: t(&cfg.off_peak_end),
        large_job: d(cfg.large_job_min_duration),
        tariff: cfg.tariff.clone(),
        horizon: d(cfg.planning_horizon),
        node_timeout: d(cfg.node_timeout),
        cannot_wait: d(cfg.cannot_wait),
    }
}

/// API verbs that only read: no decision pass after them.
const READ_ONLY_VERBS: &[&str] = &["list", "show", "nodes", "policy"];

/// Job events agents report (the rest are the scheduler's own decisions).
/// Interrupted comes from an agent that stopped the job as it shut down;
/// the scheduler's own interrupted events arrive when the job is already
/// queued, and are not current.
fn from_agents(kind: JobEventKind) -> bool {
    matches!(
        kind,
        JobEventKind::Started
            | JobEventKind::Checkpointed
            | JobEventKind::Exited
            | JobEventKind::Failed
            | JobEventKind::Interrupted
    )
}

fn profile_for(class: i32) -> PowerProfile {
    match JobClass::try_from(class) {
        Ok(JobClass::Inference) => PowerProfile::Inference,
        _ => PowerProfile::Training,
    }
}

impl Sched {
    fn now(&self) -> DateTime<Utc> {
        self.ctx.clock.now()
    }

    async fn load(&mut self) -> anyhow::Result<()> {
        let now = self.now();
        for key in self.kv.keys().await? {
            let Some(entry) = self.kv.get(&key).await? else { continue };
            match serde_json::from_slice::<Job>(&entry.value) {
                Ok(job) => {
                    if job.state == State::Assigned {
                        // The assignment may not have gone out before a crash:
                        // send it again (same message id; agents fence by attempt).
                        self.unsent.insert(job.id.clone());
                    }
                    if job.state == State::Running {
                        self.last_ask.insert(job.id.clone(), now);
                    }
                    if job.state.holds_gpus() {
                        // Its node gets the full liveness timeout from now
                        // to be heard from, as after any scheduler restart.
                        if let Some(n) = &job.node {
                            self.nodes.entry(n.clone()).or_insert_with(|| Node::new(n, now));
                        }
                    }
                    self.fence_pending.extend(job.lost.iter().map(|l| l.node.clone()));
                    self.jobs.insert(job.id.clone(), (job, entry.revision));
                }
                Err(e) => tracing::error!(%key, error = %e, "job record unreadable; left in the bucket untouched"),
            }
        }
        self.refresh_gauges();
        Ok(())
    }

    fn refresh_gauges(&self) {
        const STATES: [(State, &str); 6] = [
            (State::Queued, "queued"),
            (State::Assigned, "assigned"),
            (State::Running, "running"),
            (State::Succeeded, "succeeded"),
            (State::Failed, "failed"),
            (State::Cancelled, "cancelled"),
        ];
        let mut counts = [0i64; STATES.len()];
        for (j, _) in self.jobs.values() {
            if let Some(i) = STATES.iter().position(|(s, _)| *s == j.state) {
                counts[i] += 1;
            }
        }
        for ((_, name), n) in STATES.iter().zip(counts) {
            self.metrics.jobs.get_or_create(&StateLabels { state: name.to_string() }).set(n);
        }
    }

    /// Writes `job` with compare-and-set; on a conflict reloads it and
    /// returns false (the caller drops the decision).
    async fn save(&mut self, job: Job) -> bool {
        if let Err(e) = self.ctx.events.check_fence() {
            tracing::warn!(job = %job.id, error = %e, "job state not written");
            return false;
        }
        let value = match serde_json::to_vec(&job) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "job not serialisable");
                return false;
            }
        };
        let result = match self.jobs.get(&job.id) {
            Some((_, rev)) => self.kv.update(&job.id, value, *rev).await,
            None => self.kv.create(&job.id, value).await,
        };
        match result {
            Ok(rev) => {
                self.jobs.insert(job.id.clone(), (job, rev));
                self.refresh_gauges();
                true
            }
            Err(e) if matches!(e.kind, BusErrorKind::WrongRevision | BusErrorKind::AlreadyExists) => {
                tracing::warn!(job = %job.id, "job changed under us (another writer): reloading it, decision dropped");
                if let Ok(Some(entry)) = self.kv.get(&job.id).await {
                    if let Ok(j) = serde_json::from_slice::<Job>(&entry.value) {
                        self.jobs.insert(j.id.clone(), (j, entry.revision));
                    }
                }
                false
            }
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "job state not written; decision dropped, retried later");
                false
            }
        }
    }

    async fn job_event(&self, job: &Job, kind: JobEventKind, reason: &str) {
        self.metrics.decisions.get_or_create(&KindLabels { kind: kind.as_str_name().to_string() }).inc();
        let ev = JobEvent {
            job_id: job.id.clone(),
            kind: kind as i32,
            node: job.node.clone().unwrap_or_default(),
            gpu_indices: job.gpus.clone(),
            attempt: job.attempt,
            reason: reason.to_string(),
            checkpoint_path: job.last_checkpoint.clone().unwrap_or_default(),
            time: Some(costmesh_contracts::timestamp(self.now())),
            team: job.spec.team.clone(),
            labels: job.spec.labels.clone(),
            ..Default::default()
        };
        tracing::info!(job = %job.id, name = %job.spec.name, kind = kind.as_str_name(), %reason, "job decision");
        let subject = self.ctx.subjects().job(&job.id, kind);
        if let Err(e) = in_job_trace(job, self.ctx.events.publish_durable(&subject, &ev)).await {
            tracing::warn!(error = %e, %subject, "job event not published");
        }
    }

    async fn signal(&self, job: &Job, kind: JobSignalKind, reason: &str) {
        let Some(node) = &job.node else { return };
        let sig = JobSignal { job_id: job.id.clone(), attempt: job.attempt, kind: kind as i32, reason: reason.into() };
        let subject = self.ctx.subjects().node_signal(node);
        if let Err(e) = in_job_trace(job, self.ctx.events.publish_durable(&subject, &sig)).await {
            tracing::warn!(error = %e, %subject, "job signal not published");
        }
    }

    async fn power(&self, node: &str, gpus: &[u32], profile: PowerProfile, reason: &str) {
        for g in gpus {
            let cmd =
                PowerCommand { node: node.into(), gpu_index: Some(*g), profile: profile as i32, reason: reason.into() };
            let subject = self.ctx.subjects().node_power(node);
            if let Err(e) = self.ctx.events.publish_durable(&subject, &cmd).await {
                tracing::warn!(error = %e, %subject, "power command not published");
            }
        }
    }

    fn budget_level(&self) -> BudgetState {
        self.budgets
            .iter()
            .filter(|(scope, _)| self.cfg.budget.scopes.is_empty() || self.cfg.budget.scopes.contains(scope))
            .map(|(_, s)| *s)
            .max_by_key(|s| *s as i32)
            .unwrap_or(BudgetState::Ok)
    }

    fn backoff(&self, retries: u32) -> chrono::Duration {
        let base = self.cfg.retry_backoff.saturating_mul(1u32 << retries.saturating_sub(1).min(16));
        chrono::Duration::from_std(base.min(self.cfg.max_backoff)).unwrap_or_default()
    }

    /// The next time something is due: a deferred job's start, a running
    /// job's checkpoint, an idle node's action.
    fn next_wake(&self) -> Option<DateTime<Utc>> {
        let every = chrono::Duration::from_std(self.cfg.checkpoint_interval).unwrap_or(chrono::Duration::MAX);
        let idle = chrono::Duration::from_std(self.cfg.idle.after).unwrap_or(chrono::Duration::MAX);
        let starts = self.jobs.values().filter(|(j, _)| j.state == State::Queued).filter_map(|(j, _)| {
            match (j.planned_start, j.not_before) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        });
        let checkpoints = self
            .jobs
            .values()
            .filter(|(j, _)| j.state == State::Running)
            .filter_map(|(j, _)| self.last_ask.get(&j.id).map(|t| *t + every));
        let idles = self.nodes.values().filter(|n| !n.idle_acted).filter_map(|n| n.idle_since.map(|s| s + idle));
        let lost_after = chrono::Duration::from_std(self.cfg.node_lost_after).unwrap_or(chrono::Duration::MAX);
        let losses = self
            .jobs
            .values()
            .filter(|(j, _)| j.state.holds_gpus())
            .filter_map(|(j, _)| j.node.as_ref().and_then(|n| self.nodes.get(n)))
            .map(|n| n.last_seen + lost_after + chrono::Duration::milliseconds(1));
        starts.chain(checkpoints).chain(idles).chain(losses).filter(|t| *t > self.decided_at).min()
    }

    fn free_gpus(&self, now: DateTime<Utc>) -> BTreeMap<String, Vec<u32>> {
        let mut used: HashMap<&str, HashSet<u32>> = HashMap::new();
        for (j, _) in self.jobs.values().filter(|(j, _)| j.state.holds_gpus()) {
            if let Some(n) = &j.node {
                used.entry(n.as_str()).or_default().extend(j.gpus.iter().copied());
            }
        }
        let timeout = self.planner.node_timeout;
        self.nodes
            .values()
            .map(|n| {
                let free = n
                    .gpus
                    .iter()
                    .filter(|(i, g)| {
                        now - g.seen <= timeout && !used.get(n.name.as_str()).is_some_and(|u| u.contains(i))
                    })
                    .map(|(i, _)| *i)
                    .collect();
                (n.name.clone(), free)
            })
            .collect()
    }

    /// Jobs on nodes silent for `node_lost_after` are lost: requeued (retry
    /// limit and backoff apply), the attempt remembered so the node is told
    /// to stop it if it comes back.
    async fn check_liveness(&mut self, now: DateTime<Utc>) {
        let lost_after = chrono::Duration::from_std(self.cfg.node_lost_after).unwrap_or(chrono::Duration::MAX);
        let bus = self.ctx.bus();
        if !bus.is_connected() {
            return;
        }
        if bus.connects() != self.connects_seen {
            // Back from an outage of our own: every node gets the full
            // timeout from now to be heard from again.
            self.connects_seen = bus.connects();
            tracing::info!("scheduler reconnected: node liveness timers restart");
            for n in self.nodes.values_mut() {
                n.last_seen = n.last_seen.max(now);
            }
            return;
        }
        let lost: Vec<(Job, DateTime<Utc>)> = self
            .jobs
            .values()
            .filter(|(j, _)| j.state.holds_gpus())
            .filter_map(|(j, _)| {
                let n = self.nodes.get(j.node.as_deref()?)?;
                (now - n.last_seen > lost_after).then(|| (j.clone(), n.last_seen))
            })
            .collect();
        for (mut job, last_seen) in lost {
            let node = job.node.clone().unwrap_or_default();
            tracing::warn!(job = %job.id, attempt = job.attempt, %node, %last_seen, "node silent: job lost, requeued");
            job.lost.push(LostAttempt { node: node.clone(), attempt: job.attempt });
            self.fence_pending.insert(node.clone());
            let why = format!(
                "lost: node {node} silent since {last_seen} (more than {})",
                humantime_serde::re::humantime::format_duration(self.cfg.node_lost_after)
            );
            self.job_event(&job, JobEventKind::Lost, &why).await;
            self.retry_or_fail(job, &why, now).await;
        }
    }

    /// A node with lost attempts is heard from again: tell it to stop them
    /// (its consumer takes these before any newer assignment), then forget them.
    async fn fence_returned(&mut self, node: &str) {
        let holders: Vec<Job> =
            self.jobs.values().filter(|(j, _)| j.lost.iter().any(|l| l.node == node)).map(|(j, _)| j.clone()).collect();
        let mut all_sent = true;
        for mut job in holders {
            let (stale, keep): (Vec<LostAttempt>, Vec<LostAttempt>) = job.lost.drain(..).partition(|l| l.node == node);
            for l in &stale {
                let sig = JobSignal {
                    job_id: job.id.clone(),
                    attempt: l.attempt,
                    kind: JobSignalKind::Stop as i32,
                    reason: format!("attempt {} was declared lost; the job runs elsewhere now", l.attempt),
                };
                let subject = self.ctx.subjects().node_signal(node);
                let id = format!("fence-{}-{}", job.id, l.attempt);
                if let Err(e) = self.ctx.events.publish_durable_with_id(&subject, &sig, &id).await {
                    tracing::warn!(error = %e, %subject, "stop for a lost attempt not published; retried with the next sample");
                    all_sent = false;
                }
            }
            if !all_sent {
                return;
            }
            tracing::info!(job = %job.id, %node, attempts = ?stale.iter().map(|l| l.attempt).collect::<Vec<_>>(), "node is back: lost attempts told to stop");
            job.lost = keep;
            self.save(job).await;
        }
        self.fence_pending.remove(node);
    }

    /// Deletes finished jobs older than `finished_retention`.
    async fn prune(&mut self, now: DateTime<Utc>) {
        let keep = chrono::Duration::from_std(self.cfg.finished_retention).unwrap_or(chrono::Duration::MAX);
        let old: Vec<String> = self
            .jobs
            .values()
            .filter(|(j, _)| j.state.is_terminal() && j.lost.is_empty())
            .filter(|(j, _)| j.finished_at.is_some_and(|f| now - f > keep))
            .map(|(j, _)| j.id.clone())
            .collect();
        for id in old {
            if self.ctx.events.check_fence().is_err() {
                break;
            }
            match self.kv.delete(&id).await {
                Ok(()) => {
                    self.jobs.remove(&id);
                    self.last_ask.remove(&id);
                    tracing::info!(job = %id, "finished job pruned (past finished_retention)");
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "pruning a finished job failed; retried later");
                    break;
                }
            }
        }
        self.refresh_gauges();
    }

    async fn decide(&mut self) {
        if let Err(e) = self.ctx.events.check_fence() {
            // Deposed: the loop ends as soon as the lease watcher says so.
            tracing::debug!(error = %e, "no decisions without the lease");
            return;
        }
        let now = self.now();
        self.decided_at = now;
        self.check_liveness(now).await;
        self.prune(now).await;
        for id in std::mem::take(&mut self.unsent) {
            if let Some((job, rev)) = self.jobs.get(&id).cloned() {
                if job.state == State::Assigned {
                    self.send_assignment(&job, rev).await;
                }
            }
        }
        let budget = self.budget_level();
        let mut free = self.free_gpus(now);
        // Planned over borrowed records; only what changed is then cloned
        // and written.
        let queued: Vec<&Job> = self.jobs.values().filter(|(j, _)| j.state == State::Queued).map(|(j, _)| j).collect();
        let decisions = if queued.is_empty() {
            Vec::new()
        } else {
            let prices = (!self.planner.tariff.is_flat()).then(|| {
                let longest =
                    queued.iter().map(|j| j.duration()).max().unwrap_or_default().min(chrono::Duration::days(8));
                PriceTable::new(&self.planner.tariff, self.planner.tz, now, self.planner.horizon + longest)
            });
            plan_pass(&self.planner, &queued, &self.nodes, &mut free, budget, now, prices.as_ref())
        };
        for d in decisions {
            self.apply(d, now).await;
        }
        self.checkpoints(now).await;
        self.idle_actions(now).await;
    }

    async fn apply(&mut self, d: Decision, now: DateTime<Utc>) {
        match d {
            Decision::Defer { id, start, reason } => {
                let Some((known, _)) = self.jobs.get(&id) else { return };
                if known.planned_start == Some(start) && known.reason == reason {
                    return;
                }
                let mut job = known.clone();
                job.planned_start = Some(start);
                job.reason = reason.clone();
                if self.save(job.clone()).await {
                    self.job_event(&job, JobEventKind::Deferred, &format!("{reason}; planned start {start}")).await;
                }
            }
            Decision::Wait { id, reason } => {
                let Some((known, _)) = self.jobs.get(&id) else { return };
                if known.reason == reason {
                    return;
                }
                let mut job = known.clone();
                job.reason = reason.clone();
                if self.save(job.clone()).await {
                    self.job_event(&job, JobEventKind::Deferred, &reason).await;
                }
            }
            Decision::Place { id, placement } => self.assign(&id, placement, now).await,
        }
    }

    async fn assign(&mut self, id: &str, p: Placement, now: DateTime<Utc>) {
        let Some((mut job, _)) = self.jobs.get(id).cloned() else { return };
        job.attempt += 1;
        job.state = State::Assigned;
        job.node = Some(p.node.clone());
        job.gpus = p.gpus.clone();
        job.cloud = p.cloud;
        job.assigned_at = Some(now);
        job.planned_start = None;
        job.reason = p.reason.clone();
        if !self.save(job.clone()).await {
            return;
        }
        let rev = self.jobs.get(id).map(|(_, r)| *r).unwrap_or(0);
        self.send_assignment(&job, rev).await;
        let resume = job.last_checkpoint.as_ref().map(|c| format!("; resumes from {c}")).unwrap_or_default();
        self.job_event(&job, JobEventKind::Assigned, &format!("{}{resume}", p.reason)).await;
        let why = format!("job {} ({}) placed", job.id, job.spec.name);
        self.power(&p.node, &p.gpus, profile_for(job.spec.class), &why).await;
        self.last_ask.insert(job.id.clone(), now);
    }

    async fn send_assignment(&mut self, job: &Job, revision: u64) {
        let Some(node) = job.node.clone() else { return };
        let a = JobAssignment {
            job_id: job.id.clone(),
            attempt: job.attempt,
            node: node.clone(),
            gpu_indices: job.gpus.clone(),
            spec: Some(job.spec.clone()),
            fencing_token: revision,
            resume_from: job.last_checkpoint.clone().unwrap_or_default(),
        };
        let id = format!("assign-{}-{}", job.id, job.attempt);
        let subject = self.ctx.subjects().node_assign(&node);
        if let Err(e) = in_job_trace(job, self.ctx.events.publish_durable_with_id(&subject, &a, &id)).await {
            tracing::warn!(job = %job.id, error = %e, "assignment not published; retried on the next pass");
            self.unsent.insert(job.id.clone());
        }
    }

    async fn checkpoints(&mut self, now: DateTime<Utc>) {
        let every = chrono::Duration::from_std(self.cfg.checkpoint_interval).unwrap_or(chrono::Duration::MAX);
        let due: Vec<Job> = self
            .jobs
            .values()
            .filter(|(j, _)| j.state == State::Running)
            .filter(|(j, _)| self.last_ask.get(&j.id).is_none_or(|t| now - *t >= every))
            .map(|(j, _)| j.clone())
            .collect();
        for job in due {
            let reason = format!(
                "periodic checkpoint (every {})",
                humantime_serde::re::humantime::format_duration(self.cfg.checkpoint_interval)
            );
            self.signal(&job, JobSignalKind::Checkpoint, &reason).await;
            self.last_ask.insert(job.id.clone(), now);
        }
    }

    fn in_business_hours(&self, now: DateTime<Utc>) -> bool {
        let l = now.with_timezone(&self.planner.tz);
        let weekend = matches!(l.weekday(), Weekday::Sat | Weekday::Sun);
        let day_ok = match self.cfg.idle.business_days {
            Days::All => true,
            Days::Weekdays => !weekend,
            Days::Weekends => weekend,
        };
        let t = |v: &str| crate::time_of_day(v).map(|t| t.hour() * 60 + t.minute()).unwrap_or(0);
        let m = l.hour() * 60 + l.minute();
        day_ok && m >= t(&self.cfg.idle.business_start) && m < t(&self.cfg.idle.business_end)
    }

    async fn idle_actions(&mut self, now: DateTime<Utc>) {
        let after = chrono::Duration::from_std(self.cfg.idle.after).unwrap_or(chrono::Duration::MAX);
        let due: Vec<(String, DateTime<Utc>)> = self
            .nodes
            .values()
            .filter(|n| !n.idle_acted && now - n.last_seen <= self.planner.node_timeout)
            .filter_map(|n| n.idle_since.filter(|s| now - *s >= after).map(|s| (n.name.clone(), s)))
            .collect();
        for (node, since) in due {
            let business = self.in_business_hours(now);
            let kind = if business { "scale_down" } else { "stop" };
            let mut action = Action {
                kind: kind.into(),
                target: node.clone(),
                reason: format!(
                    "every GPU below {}% utilisation since {since} ({}); {}",
                    self.cfg.idle.below_pct,
                    humantime_serde::re::humantime::format_duration(self.cfg.idle.after),
                    if business { "business hours: scale down" } else { "outside business hours: stop" }
                ),
                dry_run: self.actuator.dry_run(),
                service: "scheduler".into(),
                time: Some(costmesh_contracts::timestamp(now)),
                ..Default::default()
            };
            if let Some(n) = self.nodes.get_mut(&node) {
                n.idle_acted = true;
            }
            self.metrics.decisions.get_or_create(&KindLabels { kind: format!("idle_{kind}") }).inc();
            // A cloud call takes a minute or more: it runs beside the
            // scheduling loop, and its event says how it ended.
            let (actuator, events, subject) =
                (self.actuator.clone(), self.ctx.events.clone(), self.ctx.subjects().action(kind));
            tokio::spawn(async move {
                if let Err(e) = events.check_fence() {
                    tracing::warn!(error = %e, node = %action.target, "idle action dropped");
                    return;
                }
                actuator.act(&action).await.apply_to(&mut action);
                if let Err(e) = events.publish_durable(&subject, &action).await {
                    tracing::warn!(error = %e, "idle action not published");
                }
            });
        }
    }

    /// A gating budget is exceeded: the actuator's own reaction (stopping
    /// managed cloud machines), one event per action.
    fn budget_actions(&self, scope: &str) {
        let template = Action {
            kind: "stop".into(),
            reason: format!("budget {scope} exceeded: managed cloud machines stop"),
            dry_run: self.actuator.dry_run(),
            service: "scheduler".into(),
            time: Some(costmesh_contracts::timestamp(self.now())),
            ..Default::default()
        };
        let (actuator, events, subject) =
            (self.actuator.clone(), self.ctx.events.clone(), self.ctx.subjects().action("stop"));
        let (clock, grace, shutdown) =
            (self.ctx.clock.clone(), self.cfg.gce.budget_stop_grace, self.ctx.shutdown.clone());
        tokio::spawn(async move {
            // The jobs there were just told to checkpoint and stop.
            tokio::select! { _ = clock.sleep(grace) => {}, _ = shutdown.cancelled() => return }
            if let Err(e) = events.check_fence() {
                tracing::warn!(error = %e, "budget stop of cloud machines dropped");
                return;
            }
            for a in actuator.budget_exceeded(&template).await {
                if let Err(e) = events.publish_durable(&subject, &a).await {
                    tracing::warn!(error = %e, "budget action not published");
                }
            }
        });
    }

    fn on_sample(&mut self, s: GpuSample) {
        let t = s.time.as_ref().and_then(costmesh_contracts::from_timestamp).unwrap_or_else(|| self.now());
        let busy_here: bool =
            self.jobs.values().any(|(j, _)| j.state.holds_gpus() && j.node.as_deref() == Some(s.node.as_str()));
        let below = self.cfg.idle.below_pct;
        let n = self.nodes.entry(s.node.clone()).or_insert_with(|| {
            tracing::info!(node = %s.node, cloud = s.cloud, preemptible = s.preemptible, "node learnt from telemetry");
            Node::new(&s.node, t)
        });
        n.cloud = s.cloud;
        n.preemptible = s.preemptible;
        n.last_seen = n.last_seen.max(t);
        // A late sample (sent before a reconnect, say) does not make a GPU
        // look unseen again.
        let g = n.gpus.entry(s.gpu_index).or_insert(crate::plan::Gpu { util_pct: s.utilization_gpu_pct, seen: t });
        if t >= g.seen {
            *g = crate::plan::Gpu { util_pct: s.utilization_gpu_pct, seen: t };
        }
        let idle = !busy_here && n.gpus.values().all(|g| g.util_pct < below);
        if idle {
            n.idle_since.get_or_insert(t);
        } else {
            n.idle_since = None;
            n.idle_acted = false;
        }
    }

    async fn on_event(&mut self, event: AnyEvent) {
        match event {
            AnyEvent::JobEvent(e) => self.on_job_event(e).await,
            AnyEvent::PreemptionNotice(n) => self.on_preemption(n).await,
            AnyEvent::BudgetEvent(b) => self.on_budget(b).await,
            _ => {}
        }
    }

    async fn on_job_event(&mut self, e: JobEvent) {
        let kind = e.kind();
        if !from_agents(kind) {
            return; // the scheduler's own decisions
        }
        let Some((mut job, _)) = self.jobs.get(&e.job_id).cloned() else {
            tracing::warn!(job = %e.job_id, kind = kind.as_str_name(), "event for an unknown job ignored");
            return;
        };
        // The agent user may publish any job's events (the subject has no
        // node token), so an event counts only from the node the attempt
        // was placed on.
        let from_its_node = job.node.as_deref() == Some(e.node.as_str());
        if !from_its_node && e.attempt == job.attempt {
            tracing::warn!(job = %e.job_id, attempt = e.attempt, node = %e.node, placed_on = ?job.node, kind = kind.as_str_name(), "job event from a node the attempt is not on; ignored");
        }
        let current = e.attempt == job.attempt && job.state.holds_gpus() && from_its_node;
        let now = self.now();
        match kind {
            JobEventKind::Started if current && job.state == State::Assigned => {
                job.state = State::Running;
                job.started_at = Some(now);
                job.reason = format!("running on {}", e.node);
                self.save(job).await;
            }
            JobEventKind::Checkpointed if !job.state.is_terminal() && !e.checkpoint_path.is_empty() => {
                job.last_checkpoint = Some(e.checkpoint_path.clone());
                self.save(job).await;
            }
            JobEventKind::Exited if current => {
                let (node, gpus) = (job.node.clone().unwrap_or_default(), job.gpus.clone());
                job.exit_code = Some(e.exit_code);
                if e.exit_code == 0 {
                    job.state = State::Succeeded;
                    job.finished_at = Some(now);
                    job.reason = "exited with code 0".into();
                    if self.save(job.clone()).await {
                        self.job_event(&job, JobEventKind::Exited, "succeeded").await;
                    }
                } else {
                    self.retry_or_fail(job, &format!("{} on {node}", e.reason), now).await;
                }
                self.power(&node, &gpus, PowerProfile::Idle, "job ended").await;
            }
            JobEventKind::Interrupted if current => {
                let (node, gpus) = (job.node.clone().unwrap_or_default(), job.gpus.clone());
                // Its agent is going away: no new work there until it samples again.
                let gone = now - self.planner.node_timeout - chrono::Duration::seconds(1);
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.last_seen = gone;
                    n.gpus.values_mut().for_each(|g| g.seen = gone);
                }
                self.retry_or_fail(job, &format!("{} on {node}", e.reason), now).await;
                self.power(&node, &gpus, PowerProfile::Idle, "job interrupted").await;
            }
            JobEventKind::Failed if current => {
                let (node, gpus) = (job.node.clone().unwrap_or_default(), job.gpus.clone());
                job.state = State::Failed;
                job.finished_at = Some(now);
                job.reason = format!("could not start on {node}: {}", e.reason);
                if self.save(job.clone()).await {
                    self.job_event(&job, JobEventKind::Failed, &job.reason.clone()).await;
                }
                self.power(&node, &gpus, PowerProfile::Idle, "job could not start").await;
            }
            _ => {
                tracing::debug!(job = %e.job_id, kind = kind.as_str_name(), attempt = e.attempt, "stale job event ignored")
            }
        }
    }

    /// Requeues with backoff while retries remain, else fails the job.
    async fn retry_or_fail(&mut self, mut job: Job, why: &str, now: DateTime<Utc>) {
        // The node stays recorded (its logs are there); the GPUs are let go.
        job.retries += 1;
        job.gpus.clear();
        if job.retries > job.spec.max_retries {
            job.state = State::Failed;
            job.finished_at = Some(now);
            job.reason = format!("{why}; no retries left ({} allowed)", job.spec.max_retries);
            if self.save(job.clone()).await {
                self.job_event(&job, JobEventKind::Failed, &job.reason.clone()).await;
            }
        } else {
            let wait = self.backoff(job.retries);
            job.state = State::Queued;
            job.not_before = Some(now + wait);
            job.reason =
                format!("{why}; retry {} of {} after {}s", job.retries, job.spec.max_retries, wait.num_seconds());
            if self.save(job.clone()).await {
                self.job_event(&job, JobEventKind::Interrupted, &job.reason.clone()).await;
            }
        }
    }

    async fn on_preemption(&mut self, n: PreemptionNotice) {
        let received = Instant::now();
        let now = self.now();
        let deadline = n.deadline.as_ref().and_then(costmesh_contracts::from_timestamp).unwrap_or(now);
        let hold = chrono::Duration::from_std(self.cfg.preempted_hold).unwrap_or_default();
        self.nodes.entry(n.node.clone()).or_insert_with(|| Node::new(&n.node, now)).held_until =
            Some(deadline.max(now) + hold);
        let victims: Vec<Job> = self
            .jobs
            .values()
            .filter(|(j, _)| j.state.holds_gpus() && j.node.as_deref() == Some(n.node.as_str()))
            .map(|(j, _)| j.clone())
            .collect();
        for job in &victims {
            self.signal(job, JobSignalKind::Checkpoint, "preemption notice: checkpoint now").await;
            self.metrics.notice_to_signal.observe(received.elapsed().as_secs_f64());
            self.signal(job, JobSignalKind::Stop, "preemption notice: node going away").await;
        }
        tracing::warn!(node = %n.node, jobs = victims.len(), signal_ms = received.elapsed().as_secs_f64() * 1e3, "preemption notice: jobs asked to checkpoint and requeued");
        for job in victims {
            self.retry_or_fail(
                job,
                &format!("interrupted: node {} preempted; resumes from its last checkpoint", n.node),
                now,
            )
            .await;
        }
    }

    async fn on_budget(&mut self, b: BudgetEvent) {
        let before = self.budget_level();
        self.budgets.insert(b.scope.clone(), b.state());
        let after = self.budget_level();
        if before == after {
            return;
        }
        tracing::warn!(scope = %b.scope, from = before.as_str_name(), to = after.as_str_name(), "budget state changed: scheduling follows");
        if after != BudgetState::Exceeded || !self.cfg.budget.stop_cloud_on_exceeded {
            return;
        }
        let cloud: Vec<Job> =
            self.jobs.values().filter(|(j, _)| j.state.holds_gpus() && j.cloud).map(|(j, _)| j.clone()).collect();
        for mut job in cloud {
            self.signal(&job, JobSignalKind::Checkpoint, "budget exceeded: checkpoint before stopping").await;
            self.signal(&job, JobSignalKind::Stop, "budget exceeded: cloud work stops").await;
            let (node, gpus) = (job.node.clone().unwrap_or_default(), std::mem::take(&mut job.gpus));
            job.state = State::Queued;
            job.reason = format!(
                "budget exceeded: checkpointed and stopped on cloud node {node}; waits for the budget or own GPUs"
            );
            if self.save(job.clone()).await {
                self.job_event(&job, JobEventKind::Interrupted, &job.reason.clone()).await;
            }
            self.power(&node, &gpus, PowerProfile::Idle, "cloud job stopped (budget)").await;
        }
        self.budget_actions(&b.scope);
    }

    async fn api(&mut self, verb: &str, body: &[u8], request_id: Result<Option<String>, String>) -> Value {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct IdReq {
            id: String,
        }
        let id_of = |body: &[u8]| -> Result<String, Value> {
            serde_json::from_slice::<IdReq>(body)
                .map(|r| r.id)
                .map_err(|e| json!({"error": format!("request body: {e} (expected {{\"id\": \"...\"}})")}))
        };
        match verb {
            "submit" => {
                let spec: JobSpec = match serde_json::from_slice(body) {
                    Ok(s) => s,
                    Err(e) => return json!({"error": format!("job spec: {e}"), "field": "body"}),
                };
                let now = self.now();
                if let Err(e) = validate(&spec, now) {
                    return json!({"error": format!("job spec refused: {e}"), "field": e.field});
                }
                let request_id = match request_id {
                    Ok(r) => r,
                    Err(e) => return json!({"error": e, "field": costmesh_runtime::events::REQUEST_ID}),
                };
                // A submit sent again under the same request id (its answer
                // lost, say) is the same job: its id comes from the request id.
                let id = match &request_id {
                    Some(r) => {
                        use sha2::Digest;
                        let digest = sha2::Sha256::digest(r.as_bytes());
                        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
                        format!("j-{hex}")
                    }
                    None => format!("j-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                };
                if let Some((known, _)) = self.jobs.get(&id) {
                    return if known.spec == spec {
                        json!({"job": known, "repeated": true})
                    } else {
                        json!({
                            "error": format!("request id {:?} was already used for job {id} with another spec", request_id.unwrap_or_default()),
                            "field": costmesh_runtime::events::REQUEST_ID,
                        })
                    };
                }
                let mut job = Job::new(id.clone(), spec, now);
                job.trace = costmesh_runtime::telemetry::current_traceparent();
                job.seq = self.jobs.values().map(|(j, _)| j.seq).max().unwrap_or(0) + 1;
                if !self.save(job.clone()).await {
                    return json!({"error": "job could not be stored; try again"});
                }
                self.job_event(&job, JobEventKind::Submitted, "submitted").await;
                json!({"job": job})
            }
            "list" => {
                #[derive(serde::Deserialize, Default)]
                #[serde(default, deny_unknown_fields)]
                struct ListReq {
                    /// Jobs submitted after this one (the `next` of the last page).
                    after: Option<u64>,
                    limit: Option<usize>,
                }
                let req: ListReq = if body.iter().all(u8::is_ascii_whitespace) {
                    ListReq::default()
                } else {
                    match serde_json::from_slice(body) {
                        Ok(r) => r,
                        Err(e) => {
                            return json!({"error": format!("list request: {e} (expected {{\"after\": <next>, \"limit\": n}})")})
                        }
                    }
                };
                let limit = req.limit.unwrap_or(self.cfg.list_page_size).clamp(1, self.cfg.list_page_size);
                let mut jobs: Vec<&Job> =
                    self.jobs.values().map(|(j, _)| j).filter(|j| req.after.is_none_or(|a| j.seq > a)).collect();
                jobs.sort_by_key(|j| j.seq);
                // A page also stops before it would outgrow the server's max
                // payload (a job's spec can be large).
                let budget = self.ctx.bus().max_payload() / 2;
                let (mut page, mut bytes) = (Vec::new(), 0usize);
                for j in jobs.iter().take(limit) {
                    let v = serde_json::to_value(j).unwrap_or(Value::Null);
                    bytes += v.to_string().len();
                    if bytes > budget && !page.is_empty() {
                        break;
                    }
                    page.push(v);
                }
                let more = jobs.len() > page.len();
                let next = if more { jobs.get(page.len().saturating_sub(1)).map(|j| j.seq) } else { None };
                json!({"jobs": page, "next": next, "total": self.jobs.len()})
            }
            "show" => match id_of(body) {
                Err(v) => v,
                Ok(id) => match self.jobs.get(&id) {
                    Some((j, _)) => json!({"job": j}),
                    None => json!({"error": format!("unknown job {id:?}")}),
                },
            },
            "cancel" => {
                let id = match id_of(body) {
                    Err(v) => return v,
                    Ok(id) => id,
                };
                let Some((mut job, _)) = self.jobs.get(&id).cloned() else {
                    return json!({"error": format!("unknown job {id:?}")});
                };
                if job.state.is_terminal() {
                    return json!({"error": format!("job {id} already ended ({:?})", job.state)});
                }
                let held = job.state.holds_gpus();
                if held {
                    self.signal(&job, JobSignalKind::Stop, "cancelled").await;
                }
                job.state = State::Cancelled;
                job.finished_at = Some(self.now());
                job.reason = "cancelled by request".into();
                if !self.save(job.clone()).await {
                    return json!({"error": "job changed meanwhile; try again"});
                }
                if held {
                    self.power(job.node.as_deref().unwrap_or_default(), &job.gpus, PowerProfile::Idle, "job cancelled")
                        .await;
                }
                self.job_event(&job, JobEventKind::Cancelled, "cancelled by request").await;
                json!({"job": job})
            }
            "nodes" => {
                let now = self.now();
                let free = self.free_gpus(now);
                let nodes: Vec<Value> = self
                    .nodes
                    .values()
                    .map(|n| {
                        json!({
                            "name": n.name,
                            "gpus": n.gpus.len(),
                            "free_gpus": free.get(&n.name).cloned().unwrap_or_default(),
                            "cloud": n.cloud,
                            "preemptible": n.preemptible,
                            "last_seen": n.last_seen,
                            // A node restored from job records before any sample
                            // is not known to be alive yet.
                            "alive": !n.gpus.is_empty() && now - n.last_seen <= self.planner.node_timeout,
                            "held_until": n.held_until,
                            "idle_since": n.idle_since,
                        })
                    })
                    .collect();
                json!({"nodes": nodes})
            }
            "policy" => {
                // What starts are planned against, for pictures of it: from
                // two days back to one ahead.
                let now = self.now();
                let (from, to) = (now - chrono::Duration::days(2), now + chrono::Duration::days(1));
                let p = &self.planner;
                let bands: Vec<Value> = p
                    .tariff_bands(from, to)
                    .into_iter()
                    .map(|(a, b, price)| json!({"from": a, "to": b, "price": price}))
                    .collect();
                let windows: Vec<Value> =
                    p.off_peak_windows(from, to).into_iter().map(|(a, b)| json!({"from": a, "to": b})).collect();
                json!({
                    "now": now,
                    "tz": p.tz.name(),
                    "off_peak_windows": windows,
                    "off_peak": {"start": p.off_peak_start.format("%H:%M").to_string(), "end": p.off_peak_end.format("%H:%M").to_string()},
                    "flat_tariff": p.tariff.is_flat(),
                    "bands": bands,
                })
            }
            other => json!({"error": format!("unknown verb {other:?}")}),
        }
    }
}

/// Publishes for `job` in the current span (a request, an event being
/// handled), else in the job's own trace (a planning pass places it long
/// after it was submitted).
async fn in_job_trace<F: std::future::Future>(job: &Job, fut: F) -> F::Output {
    costmesh_runtime::telemetry::resume(job.trace.clone(), fut).await
}
