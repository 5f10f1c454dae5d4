//! The agent: samples every GPU on a fixed-rate ticker, publishes one
//! [`GpuSample`] per GPU, mirrors the figures as DCGM-style gauges, keeps
//! power profiles (by command and by rule), runs the thermal guard and the
//! cooler-drift check, and in enforce mode sets limits and restores the
//! original ones on shutdown.
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::{Action, ActionState, EnforcementMode, GpuProcess, GpuSample, PowerCommand, PowerProfile};
use costmesh_contracts::AnyEvent;
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::backend::{BackendError, DeviceInfo, GpuBackend};
use crate::config::{Config, Mode};
use crate::drift::{CoolerDrift, DriftSettings};
use crate::guard::{GuardSettings, ThermalGuard};

/// DCGM-exporter's label names, so existing dashboards work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
pub struct GpuLabels {
    pub gpu: String,
    pub UUID: String,
    pub modelName: String,
    pub Hostname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    kind: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Default)]
struct Gauges {
    power_w: Family<GpuLabels, FloatGauge>,
    limit_w: Family<GpuLabels, FloatGauge>,
    temp_c: Family<GpuLabels, FloatGauge>,
    util_pct: Family<GpuLabels, Gauge>,
    mem_util_pct: Family<GpuLabels, Gauge>,
    fb_used_mib: Family<GpuLabels, Gauge>,
    energy_mj: Family<GpuLabels, Gauge>,
    sm_clock_mhz: Family<GpuLabels, Gauge>,
    fan_pct: Family<GpuLabels, Gauge>,
    actions: Family<ActionLabels, Counter>,
}

impl Gauges {
    fn register(ctx: &ServiceContext) -> Self {
        let g = Self::default();
        ctx.register("DCGM_FI_DEV_POWER_USAGE", "Power draw (W)", g.power_w.clone());
        ctx.register("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (W)", g.limit_w.clone());
        ctx.register("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C)", g.temp_c.clone());
        ctx.register("DCGM_FI_DEV_GPU_UTIL", "GPU utilisation (%)", g.util_pct.clone());
        ctx.register("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilisation (%)", g.mem_util_pct.clone());
        ctx.register("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (MiB)", g.fb_used_mib.clone());
        ctx.register("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Energy since boot (mJ)", g.energy_mj.clone());
        ctx.register("DCGM_FI_DEV_SM_CLOCK", "SM clock (MHz)", g.sm_clock_mhz.clone());
        ctx.register("DCGM_FI_DEV_FAN_SPEED", "Fan speed (%)", g.fan_pct.clone());
        ctx.register("costmesh_gpu_agent_actions", "Actions taken or proposed, by kind", g.actions.clone());
        g
    }

    fn record(&self, s: &GpuSample) {
        let labels = GpuLabels {
            gpu: s.gpu_index.to_string(),
            UUID: s.uuid.clone(),
            modelName: s.model.clone(),
            Hostname: s.node.clone(),
        };
        self.power_w.get_or_create(&labels).set(s.power_draw_mw as f64 / 1000.0);
        self.limit_w.get_or_create(&labels).set(s.power_limit_mw as f64 / 1000.0);
        self.temp_c.get_or_create(&labels).set(s.temperature_c as f64);
        self.util_pct.get_or_create(&labels).set(s.utilization_gpu_pct as i64);
        self.mem_util_pct.get_or_create(&labels).set(s.utilization_memory_pct as i64);
        self.fb_used_mib.get_or_create(&labels).set((s.memory_used_bytes / (1024 * 1024)) as i64);
        self.energy_mj.get_or_create(&labels).set(s.energy_mj.min(i64::MAX as u64) as i64);
        self.sm_clock_mhz.get_or_create(&labels).set(s.sm_clock_mhz as i64);
        self.fan_pct.get_or_create(&labels).set(s.fan_speed_pct as i64);
    }
}

/// One GPU as the agent tracks it.
struct GpuState {
    info: DeviceInfo,
    profile: PowerProfile,
    /// The profile was set by the idle rule (and leaves with the idleness).
    profile_by_rule: bool,
    /// The profile to return to when the rule lets go.
    before_rule: PowerProfile,
    /// The limit found at start, restored on shutdown in enforce mode.
    original_limit_mw: Option<u32>,
    /// The limit NVML reported last.
    last_limit_mw: u32,
    guard: ThermalGuard,
    drift: CoolerDrift,
    idle_since: Option<DateTime<Utc>>,
    /// Energy integrated from power, for devices without a counter.
    integrated_mj: f64,
    last_power: Option<(DateTime<Utc>, u32)>,
    /// A permission error was already logged for this GPU.
    warned_permission: bool,
    /// The job attempt holding the GPU (the job runner says), named in
    /// every sample so its energy and time are booked to it.
    holder: Option<Holder>,
}

/// A job attempt holding a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub job_id: String,
    pub attempt: u32,
    pub team: String,
}

/// The agent's state, shared by the sampling loop and the command handler.
pub struct Agent {
    node: String,
    mode: Mode,
    cfg: Config,
    backend: Box<dyn GpuBackend>,
    boot_id: String,
    gpus: Vec<GpuState>,
}

/// What a tick or a command wants published.
#[derive(Default)]
struct Outbox {
    samples: Vec<GpuSample>,
    actions: Vec<Action>,
}

impl Agent {
    fn new(cfg: &Config, backend: Box<dyn GpuBackend>, now: DateTime<Utc>) -> Self {
        let gpus = backend
            .devices()
            .iter()
            .map(|d| GpuState {
                info: d.clone(),
                profile: PowerProfile::Unspecified,
                profile_by_rule: false,
                before_rule: PowerProfile::Unspecified,
                original_limit_mw: None,
                last_limit_mw: d.default_limit_mw,
                guard: ThermalGuard::default(),
                drift: CoolerDrift::new(now),
                idle_since: None,
                integrated_mj: 0.0,
                last_power: None,
                warned_permission: false,
                holder: None,
            })
            .collect();
        Self { node: cfg.node.clone(), mode: cfg.mode, cfg: cfg.clone(), boot_id: backend.boot_id(), backend, gpus }
    }

    fn profile_watts(&self, p: PowerProfile) -> Option<u32> {
        let p_cfg = &self.cfg.profiles;
        match p {
            PowerProfile::Training => Some(p_cfg.training_w),
            PowerProfile::Inference => Some(p_cfg.inference_w),
            PowerProfile::Idle => Some(p_cfg.idle_w),
            PowerProfile::Unspecified => None,
        }
    }

    /// (requested, clamped target) for GPU `i`'s profile; without a profile
    /// the device's default limit.
    fn profile_target(&self, i: usize) -> (u32, u32) {
        let g = &self.gpus[i];
        match self.profile_watts(g.profile) {
            Some(w) => (w * 1000, (w * 1000).clamp(g.info.min_limit_mw, g.info.max_limit_mw)),
            None => (g.info.default_limit_mw, g.info.default_limit_mw),
        }
    }

    /// The limit the agent wants: the profile's, under the guard's ceiling.
    fn desired_limit(&self, i: usize) -> u32 {
        let (_, target) = self.profile_target(i);
        self.gpus[i].guard.ceiling_mw().map_or(target, |c| c.min(target))
    }

    fn action(&self, kind: &str, i: usize, reason: String, now: DateTime<Utc>, human: bool) -> Action {
        let observe = self.mode == Mode::Observe;
        Action {
            kind: kind.to_string(),
            target: format!("{}/gpu{}", self.node, i),
            reason,
            state: if human || observe { ActionState::Proposed } else { ActionState::Taken } as i32,
            dry_run: observe && !human,
            service: "gpu-agent".into(),
            time: Some(costmesh_contracts::timestamp(now)),
            ..Default::default()
        }
    }

    /// Sets the limit the agent wants, in enforce mode; reports otherwise.
    fn apply_limit(&mut self, i: usize) {
        let desired = self.desired_limit(i);
        let g = &self.gpus[i];
        if desired == g.last_limit_mw {
            return;
        }
        match self.mode {
            Mode::Observe => {
                tracing::debug!(
                    gpu = i,
                    current_w = g.last_limit_mw / 1000,
                    would_set_w = desired / 1000,
                    "observe mode: limit not changed"
                );
            }
            Mode::Enforce => match self.backend.set_power_limit_mw(i as u32, desired) {
                Ok(()) => {
                    tracing::info!(gpu = i, from_w = g.last_limit_mw / 1000, to_w = desired / 1000, "power limit set");
                    let g = &mut self.gpus[i];
                    g.original_limit_mw.get_or_insert(g.last_limit_mw);
                    g.last_limit_mw = desired;
                }
                Err(e @ BackendError::NoPermission(_)) => {
                    let g = &mut self.gpus[i];
                    if !g.warned_permission {
                        g.warned_permission = true;
                        tracing::error!(gpu = i, error = %e, "cannot enforce the power limit: run the agent as root or give the container CAP_SYS_ADMIN");
                    }
                }
                Err(e) => tracing::warn!(gpu = i, error = %e, "setting the power limit failed"),
            },
        }
    }

    /// Sets a profile on GPU `i` and applies it.
    fn set_profile(
        &mut self,
        i: usize,
        profile: PowerProfile,
        by_rule: bool,
        reason: &str,
        now: DateTime<Utc>,
        out: &mut Outbox,
    ) {
        let g = &mut self.gpus[i];
        if by_rule && !g.profile_by_rule {
            g.before_rule = g.profile;
        }
        g.profile = profile;
        g.profile_by_rule = by_rule;
        let (requested, target) = self.profile_target(i);
        if requested != target {
            let g = &self.gpus[i];
            tracing::info!(
                gpu = i,
                model = %g.info.product,
                requested_w = requested / 1000,
                limit_w = target / 1000,
                min_w = g.info.min_limit_mw / 1000,
                max_w = g.info.max_limit_mw / 1000,
                "profile clamped to the device's range"
            );
        }
        let verb = if self.mode == Mode::Enforce { "set" } else { "would set" };
        let reason = format!(
            "{}: {verb} {} W{} ({reason})",
            profile.as_str_name(),
            target / 1000,
            if requested != target { format!(", clamped from {} W", requested / 1000) } else { String::new() }
        );
        out.actions.push(self.action("power_profile", i, reason, now, false));
        self.apply_limit(i);
    }

    /// One sampling pass over every GPU.
    fn tick(&mut self, now: DateTime<Utc>, out: &mut Outbox) {
        let guard = GuardSettings {
            target_c: self.cfg.thermal.target_c,
            hysteresis_c: self.cfg.thermal.hysteresis_c,
            step_mw: self.cfg.thermal.step_w * 1000,
            lookahead_s: self.cfg.thermal.lookahead.as_secs_f64(),
        };
        let drift = DriftSettings {
            baseline_days: self.cfg.maintenance.baseline_days as i64,
            threshold_c: self.cfg.maintenance.drift_threshold_c,
            min_samples: 10,
            band_w: 25,
        };
        for i in 0..self.gpus.len() {
            let r = match self.backend.read(i as u32, now) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(gpu = i, error = %e, "reading the GPU failed");
                    continue;
                }
            };
            self.gpus[i].last_limit_mw = r.limit_mw;

            // Idle rule: a GPU with no process and little load for long enough.
            let idle = r.util_gpu_pct < self.cfg.rules.idle_below_pct && r.processes.is_empty();
            let g = &mut self.gpus[i];
            if idle {
                let since = *g.idle_since.get_or_insert(now);
                let idle_for = (now - since).to_std().unwrap_or_default();
                if idle_for >= self.cfg.rules.idle_after && g.profile != PowerProfile::Idle {
                    let reason = format!(
                        "idle below {} % for {}",
                        self.cfg.rules.idle_below_pct,
                        humantime_serde::re::humantime::format_duration(idle_for)
                    );
                    self.set_profile(i, PowerProfile::Idle, true, &reason, now, out);
                }
            } else {
                g.idle_since = None;
                if g.profile_by_rule {
                    let back = g.before_rule;
                    self.set_profile(i, back, false, "work arrived", now, out);
                }
            }

            // Thermal guard.
            let (_, target) = self.profile_target(i);
            let g = &mut self.gpus[i];
            let t_s = now.timestamp_millis() as f64 / 1000.0;
            if let Some(step) = g.guard.observe(&guard, t_s, r.temperature_c, target, g.info.min_limit_mw) {
                let reason = match step.to_mw {
                    Some(to) => format!("{}: ceiling {} W -> {} W", step.reason, step.from_mw / 1000, to / 1000),
                    None => format!("{}: released at {} W", step.reason, step.from_mw / 1000),
                };
                tracing::info!(gpu = i, %reason, "thermal guard");
                out.actions.push(self.action("thermal_guard", i, reason, now, false));
            }

            // Cooler drift, under real load only.
            let g = &mut self.gpus[i];
            if r.power_mw as f64 >= 0.3 * g.info.default_limit_mw as f64 {
                if let Some(reason) = g.drift.observe(&drift, now, r.power_mw as f64 / 1000.0, r.temperature_c) {
                    tracing::warn!(gpu = i, %reason, "maintenance due");
                    out.actions.push(self.action("maintenance", i, reason, now, true));
                }
            }

            self.apply_limit(i);

            // Energy: the device's counter, or the integral of power.
            let g = &mut self.gpus[i];
            if let Some((t, p)) = g.last_power {
                let dt = (now - t).num_milliseconds().max(0) as f64 / 1000.0;
                g.integrated_mj += (p as f64 + r.power_mw as f64) / 2.0 * dt;
            }
            g.last_power = Some((now, r.power_mw));
            let energy_mj = r.energy_mj.unwrap_or(g.integrated_mj as u64);
            let (requested, target) = self.profile_target(i);
            let g = &self.gpus[i];
            out.samples.push(GpuSample {
                node: self.node.clone(),
                gpu_index: g.info.index,
                uuid: g.info.uuid.clone(),
                model: g.info.product.clone(),
                boot_id: self.boot_id.clone(),
                time: Some(costmesh_contracts::timestamp(now)),
                power_draw_mw: r.power_mw,
                power_limit_mw: r.limit_mw,
                power_limit_min_mw: g.info.min_limit_mw,
                power_limit_max_mw: g.info.max_limit_mw,
                power_limit_default_mw: g.info.default_limit_mw,
                energy_mj,
                temperature_c: r.temperature_c as f32,
                utilization_gpu_pct: r.util_gpu_pct,
                utilization_memory_pct: r.util_memory_pct,
                memory_used_bytes: r.memory_used_bytes,
                memory_total_bytes: g.info.memory_total_bytes,
                fan_speed_pct: r.fan_pct.unwrap_or(0),
                sm_clock_mhz: r.sm_clock_mhz,
                memory_clock_mhz: r.memory_clock_mhz,
                throttle_reasons: r.throttle_reasons.clone(),
                active_profile: g.profile as i32,
                requested_limit_mw: if g.profile == PowerProfile::Unspecified { 0 } else { requested },
                limit_clamped: requested != target,
                mode: match self.mode {
                    Mode::Observe => EnforcementMode::Observe,
                    Mode::Enforce => EnforcementMode::Enforce,
                } as i32,
                processes: r
                    .processes
                    .iter()
                    .map(|(pid, mem)| GpuProcess { pid: *pid, memory_used_bytes: *mem, job_id: String::new() })
                    .collect(),
                backend: self.backend.kind().to_string(),
                cloud: self.cfg.cloud,
                preemptible: self.cfg.preemptible,
                job_id: g.holder.as_ref().map(|h| h.job_id.clone()).unwrap_or_default(),
                job_attempt: g.holder.as_ref().map_or(0, |h| h.attempt),
                job_team: g.holder.as_ref().map(|h| h.team.clone()).unwrap_or_default(),
                machine_type: self.cfg.machine_type.clone(),
                node_gpu_count: self.gpus.len() as u32,
            });
        }
    }

    /// Puts back every limit the agent changed (enforce mode, on shutdown).
    fn restore(&mut self) {
        for i in 0..self.gpus.len() {
            if let Some(orig) = self.gpus[i].original_limit_mw.take() {
                match self.backend.set_power_limit_mw(i as u32, orig) {
                    Ok(()) => tracing::info!(gpu = i, limit_w = orig / 1000, "original power limit restored"),
                    Err(e) => {
                        tracing::error!(gpu = i, error = %e, limit_w = orig / 1000, "could not restore the original power limit")
                    }
                }
            }
        }
    }

    /// Sets the load of a simulated GPU (tests and the job runner).
    pub fn set_load(&mut self, index: u32, util_pct: u32) {
        self.backend.set_load(index, util_pct);
    }
}

/// A handle on a running agent.
#[derive(Clone)]
pub struct AgentHandle(Arc<Mutex<Agent>>);

impl AgentHandle {
    /// Sets the load a simulated GPU runs at.
    pub fn set_load(&self, index: u32, util_pct: u32) {
        self.0.lock().expect("agent lock").set_load(index, util_pct);
    }

    /// A job attempt now holds GPU `index`: samples name it from now on.
    pub fn hold(&self, index: u32, holder: Holder) {
        if let Some(g) = self.0.lock().expect("agent lock").gpus.get_mut(index as usize) {
            g.holder = Some(holder);
        }
    }

    /// The attempt let GPU `index` go (a newer holder is left alone).
    pub fn release(&self, index: u32, job_id: &str, attempt: u32) {
        if let Some(g) = self.0.lock().expect("agent lock").gpus.get_mut(index as usize) {
            if g.holder.as_ref().is_some_and(|h| h.job_id == job_id && h.attempt == attempt) {
                g.holder = None;
            }
        }
    }

    /// Who holds GPU `index` now.
    pub fn holder(&self, index: u32) -> Option<Holder> {
        self.0.lock().expect("agent lock").gpus.get(index as usize).and_then(|g| g.holder.clone())
    }

    /// The limit the device reports now (reads the backend).
    pub fn power_limit_mw(&self, index: u32) -> Option<u32> {
        let mut a = self.0.lock().expect("agent lock");
        let now = a.gpus.get(index as usize)?.last_power.map(|(t, _)| t).unwrap_or_else(chrono::Utc::now);
        a.backend.read(index, now).ok().map(|r| r.limit_mw)
    }
}

/// Runs the agent with the configured backend until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let backend = crate::backend::open(&cfg, ctx.clock.now()).map_err(|why| {
        anyhow::anyhow!("gpu_agent.backend = {:?}: {why}", format!("{:?}", cfg.backend).to_lowercase())
    })?;
    run_with_backend(cfg, ctx, backend, None).await
}

async fn publish(ctx: &ServiceContext, gauges: &Gauges, out: Outbox) {
    for s in out.samples {
        gauges.record(&s);
        let subject = ctx.subjects().gpu_telemetry(&s.node, s.gpu_index);
        if let Err(e) = ctx.events.publish(&subject, &s).await {
            // Samples carry cumulative counters: a lost one costs nothing.
            tracing::warn!(error = %e, %subject, "telemetry publish failed");
        }
    }
    if out.actions.is_empty() {
        return;
    }
    // Durable publishes wait for the server; the sampling loop must not
    // (a NATS outage would stop telemetry until they time out).
    let (ctx, gauges) = (ctx.clone(), gauges.clone());
    tokio::spawn(async move {
        for a in out.actions {
            gauges.actions.get_or_create(&ActionLabels { kind: a.kind.clone() }).inc();
            let subject = ctx.subjects().action(&a.kind);
            if let Err(e) = ctx.events.publish_durable(&subject, &a).await {
                tracing::warn!(error = %e, %subject, "action publish failed");
            }
        }
    });
}

/// Runs the agent on `backend` until shutdown. `handle` receives a handle
/// once the agent is set up (tests use it to drive simulated load).
pub async fn run_with_backend(
    cfg: Config,
    ctx: ServiceContext,
    backend: Box<dyn GpuBackend>,
    handle: Option<tokio::sync::oneshot::Sender<AgentHandle>>,
) -> anyhow::Result<()> {
    let kind = backend.kind();
    tracing::info!(node = %cfg.node, gpus = backend.devices().len(), mode = ?cfg.mode, backend = kind, "gpu-agent ready to sample");
    for d in backend.devices() {
        tracing::info!(gpu = d.index, model = %d.product, min_w = d.min_limit_mw / 1000, max_w = d.max_limit_mw / 1000, default_w = d.default_limit_mw / 1000, "GPU found");
    }
    let agent = Arc::new(Mutex::new(Agent::new(&cfg, backend, ctx.clock.now())));
    let gauges = Gauges::register(&ctx);

    ctx.events.ensure_stream().await?;
    if cfg.preemption.enabled {
        tokio::spawn(crate::preemption::watch(
            cfg.preemption.metadata_url.clone(),
            cfg.node.clone(),
            ctx.events.clone(),
            ctx.clock.clone(),
            ctx.shutdown.clone(),
        ));
    }
    let runner =
        crate::jobs::Runner::start(&cfg.node, cfg.jobs.clone(), ctx.clone(), Some(AgentHandle(agent.clone()))).await?;
    let verifier = cfg
        .scheduler_keys()
        .and_then(|k| costmesh_runtime::signing::Verifier::new(&k))
        .map_err(|e| anyhow::anyhow!("gpu_agent.trusted_scheduler_keys: {e}"))?;
    if !verifier.is_enabled() {
        tracing::warn!("gpu_agent.trusted_scheduler_keys is empty: commands on this node's subjects are obeyed unsigned (NATS permissions are the only guard)");
    }
    // One consumer for everything sent to this node (`node.<node>.*`), so a
    // node's NATS user may bind a consumer on its own subjects only.
    let (h_agent, h_ctx, h_gauges, h_runner) = (agent.clone(), ctx.clone(), gauges.clone(), runner.clone());
    ctx.spawn_durable::<AnyEvent, _, _>(
        &format!("node-{}", cfg.node),
        vec![ctx.subjects().node_all(&cfg.node)],
        move |msg, _, event| {
            let (agent, ctx, gauges, runner, verifier) =
                (h_agent.clone(), h_ctx.clone(), h_gauges.clone(), h_runner.clone(), verifier.clone());
            async move {
                if verifier.is_enabled() {
                    verifier
                        .verify(&msg.subject, &msg.headers, &msg.payload)
                        .map_err(|why| HandlerError::Reject(format!("{} refused: {why}", event.type_name())))?;
                }
                match event {
                    AnyEvent::JobAssignment(a) => runner.assign(a).await,
                    AnyEvent::JobSignal(s) => runner.signal(s),
                    AnyEvent::PowerCommand(cmd) => {
                        let out = handle_power(&agent, cmd, ctx.clock.now())?;
                        publish(&ctx, &gauges, out).await;
                        Ok(())
                    }
                    other => {
                        Err(HandlerError::Reject(format!("{} does not belong on {}", other.type_name(), msg.subject)))
                    }
                }
            }
        },
    )
    .await?;
    // Armed before anyone learns the agent is up, so no tick is missed.
    let mut ticker = ctx.clock.ticker(cfg.sample_interval);
    ctx.bus_ready().await?;
    if let Some(h) = handle {
        let _ = h.send(AgentHandle(agent.clone()));
    }

    loop {
        let due = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            due = ticker.tick() => due,
        };
        let mut out = Outbox::default();
        agent.lock().expect("agent lock").tick(due, &mut out);
        publish(&ctx, &gauges, out).await;
    }
    runner.shutdown(std::time::Duration::from_secs(5)).await;
    if cfg.mode == Mode::Enforce {
        agent.lock().expect("agent lock").restore();
    }
    Ok(())
}

fn handle_power(agent: &Mutex<Agent>, cmd: PowerCommand, now: DateTime<Utc>) -> Result<Outbox, HandlerError> {
    let mut a = agent.lock().expect("agent lock");
    if cmd.node != a.node {
        return Err(HandlerError::Reject(format!("command for node {:?} reached node {:?}", cmd.node, a.node)));
    }
    let profile = cmd.profile();
    if profile == PowerProfile::Unspecified {
        return Err(HandlerError::Reject("PowerCommand.profile is unspecified".into()));
    }
    let targets: Vec<usize> = match cmd.gpu_index {
        Some(i) if (i as usize) < a.gpus.len() => vec![i as usize],
        Some(i) => {
            return Err(HandlerError::Reject(format!(
                "gpu_index {i} does not exist on {} ({} GPUs)",
                a.node,
                a.gpus.len()
            )))
        }
        None => (0..a.gpus.len()).collect(),
    };
    let mut out = Outbox::default();
    let reason = if cmd.reason.is_empty() { "command".to_string() } else { format!("command: {}", cmd.reason) };
    for i in targets {
        a.set_profile(i, profile, false, &reason, now, &mut out);
    }
    Ok(out)
}
