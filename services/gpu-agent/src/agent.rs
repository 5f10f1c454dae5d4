//! The agent: samples every GPU on a fixed-rate ticker, publishes one
//! [`GpuSample`] per GPU, mirrors the figures as DCGM-style gauges, and
//! applies power-profile commands (reporting only, unless enforcing).
use std::sync::{Arc, Mutex};

use costmesh_contracts::v1::{EnforcementMode, GpuSample, PowerCommand, PowerProfile};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{Config, Mode};
use crate::sim::{self, SimGpu};

/// DCGM-exporter's label names, so existing dashboards work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
pub struct GpuLabels {
    pub gpu: String,
    pub UUID: String,
    pub modelName: String,
    pub Hostname: String,
}

#[derive(Clone, Default)]
struct Gauges {
    power_w: Family<GpuLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    limit_w: Family<GpuLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    temp_c: Family<GpuLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    util_pct: Family<GpuLabels, Gauge>,
    fb_used_mib: Family<GpuLabels, Gauge>,
    energy_mj: Family<GpuLabels, Gauge>,
}

struct GpuState {
    gpu: SimGpu,
    profile: PowerProfile,
    requested_mw: u32,
    clamped: bool,
}

struct Agent {
    node: String,
    mode: Mode,
    profiles: crate::config::Profiles,
    boot_id: String,
    gpus: Vec<GpuState>,
}

impl Agent {
    fn profile_watts(&self, p: PowerProfile) -> Option<u32> {
        match p {
            PowerProfile::Training => Some(self.profiles.training_w),
            PowerProfile::Inference => Some(self.profiles.inference_w),
            PowerProfile::Idle => Some(self.profiles.idle_w),
            PowerProfile::Unspecified => None,
        }
    }

    /// Applies `profile` to GPU `i`: clamps to the device's range, and sets
    /// the limit only in enforce mode.
    fn apply(&mut self, i: usize, profile: PowerProfile, reason: &str) -> Result<(), String> {
        let watts = self.profile_watts(profile).ok_or("power profile is unspecified")?;
        let mode = self.mode;
        let g = &mut self.gpus[i];
        let (lo, hi) = g.gpu.constraints_mw();
        let requested = watts * 1000;
        let target = requested.clamp(lo, hi);
        g.profile = profile;
        g.requested_mw = requested;
        g.clamped = target != requested;
        if g.clamped {
            tracing::info!(
                gpu = i,
                model = g.gpu.model.product,
                requested_w = watts,
                limit_w = target / 1000,
                min_w = lo / 1000,
                max_w = hi / 1000,
                "profile clamped to the device's range"
            );
        }
        match mode {
            Mode::Enforce => {
                g.gpu.set_limit_mw(target)?;
                tracing::info!(gpu = i, profile = profile.as_str_name(), limit_w = target / 1000, %reason, "power limit set");
            }
            Mode::Observe => {
                tracing::info!(gpu = i, profile = profile.as_str_name(), would_set_w = target / 1000, %reason, "observe mode: power limit not changed");
            }
        }
        Ok(())
    }

    fn sample(&self, i: usize, now: chrono::DateTime<chrono::Utc>) -> GpuSample {
        let g = &self.gpus[i];
        let (lo, hi) = g.gpu.constraints_mw();
        let mem_total = g.gpu.model.memory_gib as u64 * 1024 * 1024 * 1024;
        GpuSample {
            node: self.node.clone(),
            gpu_index: g.gpu.index,
            uuid: g.gpu.uuid.clone(),
            model: g.gpu.model.product.to_string(),
            boot_id: self.boot_id.clone(),
            time: Some(costmesh_contracts::timestamp(now)),
            power_draw_mw: g.gpu.power_mw,
            power_limit_mw: g.gpu.limit_mw,
            power_limit_min_mw: lo,
            power_limit_max_mw: hi,
            power_limit_default_mw: g.gpu.model.default_limit_w * 1000,
            energy_mj: g.gpu.energy_mj,
            temperature_c: g.gpu.temperature_c as f32,
            utilization_gpu_pct: g.gpu.utilization_pct,
            utilization_memory_pct: g.gpu.utilization_pct * 6 / 10,
            memory_used_bytes: mem_total * g.gpu.utilization_pct as u64 / 125,
            memory_total_bytes: mem_total,
            fan_speed_pct: g.gpu.fan_pct,
            sm_clock_mhz: g.gpu.sm_clock_mhz(),
            memory_clock_mhz: g.gpu.model.memory_clock_mhz,
            throttle_reasons: if g.gpu.power_mw >= g.gpu.limit_mw && g.gpu.utilization_pct > 0 {
                vec!["sw_power_cap".into()]
            } else {
                vec![]
            },
            active_profile: g.profile as i32,
            requested_limit_mw: g.requested_mw,
            limit_clamped: g.clamped,
            mode: match self.mode {
                Mode::Observe => EnforcementMode::Observe as i32,
                Mode::Enforce => EnforcementMode::Enforce as i32,
            },
            processes: vec![],
            backend: "sim".into(),
        }
    }
}

/// Deterministic demo load: each GPU follows its own slow wave.
fn demo_utilization(index: u32, t: chrono::DateTime<chrono::Utc>) -> u32 {
    let phase = t.timestamp() as f64 / 600.0 + index as f64 * 1.7;
    (55.0 + 40.0 * phase.sin()).round().clamp(0.0, 100.0) as u32
}

/// Runs the agent until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let gpus = cfg
        .sim
        .gpus
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let model = sim::model(name).ok_or_else(|| anyhow::anyhow!("unknown GPU model {name}"))?;
            let gpu = SimGpu::new(model, i as u32, &cfg.node, cfg.sim.ambient_c);
            Ok(GpuState { requested_mw: gpu.limit_mw, gpu, profile: PowerProfile::Unspecified, clamped: false })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    tracing::info!(node = %cfg.node, gpus = gpus.len(), mode = ?cfg.mode, backend = "sim", "gpu-agent ready to sample");
    let agent = Arc::new(Mutex::new(Agent {
        node: cfg.node.clone(),
        mode: cfg.mode,
        profiles: cfg.profiles.clone(),
        boot_id: uuid::Uuid::new_v4().to_string(),
        gpus,
    }));

    let gauges = Gauges::default();
    ctx.register("DCGM_FI_DEV_POWER_USAGE", "Power draw (W)", gauges.power_w.clone());
    ctx.register("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Power management limit (W)", gauges.limit_w.clone());
    ctx.register("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C)", gauges.temp_c.clone());
    ctx.register("DCGM_FI_DEV_GPU_UTIL", "GPU utilisation (%)", gauges.util_pct.clone());
    ctx.register("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (MiB)", gauges.fb_used_mib.clone());
    ctx.register("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Energy since boot (mJ)", gauges.energy_mj.clone());

    // Power-profile commands for this node.
    ctx.events.ensure_stream().await?;
    let handler_agent = agent.clone();
    ctx.spawn_durable::<PowerCommand, _, _>(
        &format!("power-{}", cfg.node),
        vec![ctx.subjects().node_power(&cfg.node)],
        move |_, _, cmd| {
            let agent = handler_agent.clone();
            async move { handle_power(&agent, cmd) }
        },
    )
    .await?;
    ctx.health.set("bus", true);

    let mut ticker = ctx.clock.ticker(cfg.sample_interval);
    let mut last = ctx.clock.now();
    loop {
        let due = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            due = ticker.tick() => due,
        };
        let dt = (due - last).num_milliseconds().max(0) as f64 / 1000.0;
        last = due;
        let samples: Vec<(String, GpuSample)> = {
            let mut a = agent.lock().expect("agent lock");
            let n = a.gpus.len();
            for i in 0..n {
                let util = if cfg.sim.demo_load { demo_utilization(i as u32, due) } else { 0 };
                a.gpus[i].gpu.step(dt, util);
            }
            (0..n).map(|i| (ctx.subjects().gpu_telemetry(&a.node, i as u32), a.sample(i, due))).collect()
        };
        for (subject, s) in samples {
            let labels = GpuLabels {
                gpu: s.gpu_index.to_string(),
                UUID: s.uuid.clone(),
                modelName: s.model.clone(),
                Hostname: s.node.clone(),
            };
            gauges.power_w.get_or_create(&labels).set(s.power_draw_mw as f64 / 1000.0);
            gauges.limit_w.get_or_create(&labels).set(s.power_limit_mw as f64 / 1000.0);
            gauges.temp_c.get_or_create(&labels).set(s.temperature_c as f64);
            gauges.util_pct.get_or_create(&labels).set(s.utilization_gpu_pct as i64);
            gauges.fb_used_mib.get_or_create(&labels).set((s.memory_used_bytes / (1024 * 1024)) as i64);
            gauges.energy_mj.get_or_create(&labels).set(s.energy_mj as i64);
            if let Err(e) = ctx.events.publish(&subject, &s).await {
                // Samples carry cumulative counters: a lost one costs nothing.
                tracing::warn!(error = %e, %subject, "telemetry publish failed");
            }
        }
    }
    Ok(())
}

fn handle_power(agent: &Mutex<Agent>, cmd: PowerCommand) -> Result<(), HandlerError> {
    let mut a = agent.lock().expect("agent lock");
    if cmd.node != a.node {
        return Err(HandlerError::Reject(format!("command for node {:?} reached node {:?}", cmd.node, a.node)));
    }
    let profile = cmd.profile();
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
    for i in targets {
        a.apply(i, profile, &cmd.reason).map_err(HandlerError::Reject)?;
    }
    Ok(())
}
