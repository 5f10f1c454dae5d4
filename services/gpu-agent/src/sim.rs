//! Simulated GPUs that behave like real ones at the API level.
//!
//! Each model carries its real power-limit range, memory size and idle draw
//! (board specifications; NVML reports the same ranges on real cards). Power
//! draw follows utilisation and never exceeds the limit; temperature follows
//! power through a first-order thermal model whose cooling improves with fan
//! speed; the energy counter is the integral of power and only grows.

use chrono::{DateTime, Utc};

use crate::backend::{BackendError, DeviceInfo, GpuBackend, Reading};
use crate::config::SimConfig;

/// A GPU model's fixed characteristics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuModel {
    pub name: &'static str,
    /// NVML product name.
    pub product: &'static str,
    pub min_limit_w: u32,
    pub default_limit_w: u32,
    pub max_limit_w: u32,
    pub idle_w: u32,
    pub memory_gib: u32,
    /// °C per watt at full fan.
    pub thermal_resistance: f64,
    /// Thermal time constant in seconds.
    pub tau_s: f64,
    /// Passively cooled (datacenter cards report no fan).
    pub has_fan: bool,
    pub max_sm_clock_mhz: u32,
    pub memory_clock_mhz: u32,
}

/// Models the simulator knows. Board power from the vendors' specifications.
pub const MODELS: &[GpuModel] = &[
    GpuModel {
        name: "RTX 4070",
        product: "NVIDIA GeForce RTX 4070",
        min_limit_w: 100,
        default_limit_w: 200,
        max_limit_w: 200,
        idle_w: 10,
        memory_gib: 12,
        thermal_resistance: 0.22,
        tau_s: 30.0,
        has_fan: true,
        max_sm_clock_mhz: 2475,
        memory_clock_mhz: 10501,
    },
    GpuModel {
        name: "RTX 4080",
        product: "NVIDIA GeForce RTX 4080",
        min_limit_w: 150,
        default_limit_w: 320,
        max_limit_w: 320,
        idle_w: 15,
        memory_gib: 16,
        thermal_resistance: 0.14,
        tau_s: 35.0,
        has_fan: true,
        max_sm_clock_mhz: 2505,
        memory_clock_mhz: 11201,
    },
    GpuModel {
        name: "RTX 4090",
        product: "NVIDIA GeForce RTX 4090",
        min_limit_w: 150,
        default_limit_w: 450,
        max_limit_w: 600,
        idle_w: 20,
        memory_gib: 24,
        thermal_resistance: 0.095,
        tau_s: 40.0,
        has_fan: true,
        max_sm_clock_mhz: 2520,
        memory_clock_mhz: 10501,
    },
    GpuModel {
        name: "T4",
        product: "Tesla T4",
        min_limit_w: 60,
        default_limit_w: 70,
        max_limit_w: 70,
        idle_w: 10,
        memory_gib: 16,
        thermal_resistance: 0.62,
        tau_s: 25.0,
        has_fan: false,
        max_sm_clock_mhz: 1590,
        memory_clock_mhz: 5001,
    },
    GpuModel {
        name: "H100 PCIe",
        product: "NVIDIA H100 PCIe",
        min_limit_w: 200,
        default_limit_w: 350,
        max_limit_w: 350,
        idle_w: 50,
        memory_gib: 80,
        thermal_resistance: 0.13,
        tau_s: 45.0,
        has_fan: false,
        max_sm_clock_mhz: 1755,
        memory_clock_mhz: 1593,
    },
    GpuModel {
        name: "H100 SXM",
        product: "NVIDIA H100 80GB HBM3",
        min_limit_w: 200,
        default_limit_w: 700,
        max_limit_w: 700,
        idle_w: 70,
        memory_gib: 80,
        thermal_resistance: 0.065,
        tau_s: 45.0,
        has_fan: false,
        max_sm_clock_mhz: 1980,
        memory_clock_mhz: 2619,
    },
];

/// Looks a model up by short or product name, ignoring case.
pub fn model(name: &str) -> Option<&'static GpuModel> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name) || m.product.eq_ignore_ascii_case(name))
}

/// One simulated GPU's state.
#[derive(Clone, Debug)]
pub struct SimGpu {
    pub model: &'static GpuModel,
    pub index: u32,
    pub uuid: String,
    pub limit_mw: u32,
    pub power_mw: u32,
    pub temperature_c: f64,
    pub fan_pct: u32,
    pub utilization_pct: u32,
    /// Millijoules since this simulated boot.
    pub energy_mj: u64,
    /// Sub-millijoule remainder, so the counter is exact over many steps.
    energy_frac_mj: f64,
    pub ambient_c: f64,
    /// Multiplies the thermal resistance: 1.0 for a clean cooler, more as
    /// dust builds up.
    pub fouling: f64,
}

impl SimGpu {
    pub fn new(model: &'static GpuModel, index: u32, node: &str, ambient_c: f64) -> Self {
        Self {
            model,
            index,
            uuid: format!("GPU-sim-{}-{index}", node),
            limit_mw: model.default_limit_w * 1000,
            power_mw: model.idle_w * 1000,
            temperature_c: ambient_c + model.thermal_resistance * model.idle_w as f64 * 2.0,
            fan_pct: if model.has_fan { 30 } else { 0 },
            utilization_pct: 0,
            energy_mj: 0,
            energy_frac_mj: 0.0,
            ambient_c,
            fouling: 1.0,
        }
    }

    /// The device's own range, in milliwatts.
    pub fn constraints_mw(&self) -> (u32, u32) {
        (self.model.min_limit_w * 1000, self.model.max_limit_w * 1000)
    }

    /// Sets the power limit; out-of-range values are refused like NVML does.
    pub fn set_limit_mw(&mut self, mw: u32) -> Result<(), String> {
        let (lo, hi) = self.constraints_mw();
        if mw < lo || mw > hi {
            return Err(format!("{mw} mW is outside {lo}..={hi} mW for {}", self.model.product));
        }
        self.limit_mw = mw;
        Ok(())
    }

    /// Advances the simulation by `dt_s` seconds at `utilization_pct`.
    pub fn step(&mut self, dt_s: f64, utilization_pct: u32) {
        let util = utilization_pct.min(100);
        self.utilization_pct = util;
        let idle = self.model.idle_w as f64 * 1000.0;
        let cap = self.limit_mw as f64;
        // Full load would draw the default limit; the limit caps it.
        let demand = idle + (self.model.default_limit_w as f64 * 1000.0 - idle) * util as f64 / 100.0;
        let power = demand.min(cap).max(idle.min(cap));
        // Trapezoidal integration of energy over the step.
        let avg = (self.power_mw as f64 + power) / 2.0;
        self.power_mw = power.round() as u32;
        let e = avg * dt_s + self.energy_frac_mj;
        self.energy_mj += e.floor() as u64;
        self.energy_frac_mj = e - e.floor();
        // Fan follows temperature; cooling improves with airflow.
        if self.model.has_fan {
            self.fan_pct = ((self.temperature_c - 40.0) * 3.0).clamp(30.0, 100.0).round() as u32;
        }
        let airflow = if self.model.has_fan { 0.3 + 0.7 * self.fan_pct as f64 / 100.0 } else { 1.0 };
        let steady = self.ambient_c + self.model.thermal_resistance * self.fouling * (power / 1000.0) / airflow;
        let alpha = 1.0 - (-dt_s / self.model.tau_s).exp();
        self.temperature_c += (steady - self.temperature_c) * alpha;
    }

    pub fn sm_clock_mhz(&self) -> u32 {
        let ratio = (self.limit_mw as f64 / (self.model.default_limit_w as f64 * 1000.0)).min(1.0);
        if self.utilization_pct == 0 {
            210
        } else {
            (self.model.max_sm_clock_mhz as f64 * (0.55 + 0.45 * ratio)).round() as u32
        }
    }
}

/// The simulated backend: one [`SimGpu`] per configured model, advanced to
/// the time of each read.
pub struct SimBackend {
    gpus: Vec<SimGpu>,
    devices: Vec<DeviceInfo>,
    last_step: Vec<DateTime<Utc>>,
    load: Vec<u32>,
    demo_load: bool,
    fouling_per_day: f64,
    started: DateTime<Utc>,
    boot_id: String,
}

impl SimBackend {
    /// Models are validated with the config; unknown names are skipped.
    pub fn new(node: &str, cfg: &SimConfig, now: DateTime<Utc>) -> Self {
        let gpus: Vec<SimGpu> = cfg
            .gpus
            .iter()
            .filter_map(|name| model(name))
            .enumerate()
            .map(|(i, m)| SimGpu::new(m, i as u32, node, cfg.ambient_c))
            .collect();
        let devices = gpus
            .iter()
            .map(|g| DeviceInfo {
                index: g.index,
                uuid: g.uuid.clone(),
                product: g.model.product.to_string(),
                min_limit_mw: g.model.min_limit_w * 1000,
                max_limit_mw: g.model.max_limit_w * 1000,
                default_limit_mw: g.model.default_limit_w * 1000,
                memory_total_bytes: g.model.memory_gib as u64 * (1 << 30),
            })
            .collect();
        let n = gpus.len();
        Self {
            gpus,
            devices,
            last_step: vec![now; n],
            load: vec![0; n],
            demo_load: cfg.demo_load,
            fouling_per_day: cfg.cooler_fouling_per_day,
            started: now,
            // Every simulated start is a new boot: counters begin at zero.
            boot_id: format!("sim-{}", uuid::Uuid::new_v4()),
        }
    }
}

/// Deterministic demo load: each GPU follows its own slow wave.
pub fn demo_utilization(index: u32, t: DateTime<Utc>) -> u32 {
    let phase = t.timestamp() as f64 / 600.0 + index as f64 * 1.7;
    (55.0 + 40.0 * phase.sin()).round().clamp(0.0, 100.0) as u32
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn boot_id(&self) -> String {
        self.boot_id.clone()
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn read(&mut self, index: u32, now: DateTime<Utc>) -> Result<Reading, BackendError> {
        let i = index as usize;
        let g = self.gpus.get_mut(i).ok_or_else(|| BackendError::Other(format!("no GPU {index}")))?;
        let dt = (now - self.last_step[i]).num_milliseconds().max(0) as f64 / 1000.0;
        self.last_step[i] = self.last_step[i].max(now);
        let days = (now - self.started).num_seconds().max(0) as f64 / 86_400.0;
        g.fouling = 1.0 + self.fouling_per_day * days;
        let util = if self.demo_load { demo_utilization(index, now) } else { self.load[i] };
        if dt > 0.0 {
            g.step(dt, util);
        }
        let mem_total = g.model.memory_gib as u64 * (1 << 30);
        let capped = g.power_mw >= g.limit_mw && g.utilization_pct > 0;
        Ok(Reading {
            power_mw: g.power_mw,
            limit_mw: g.limit_mw,
            energy_mj: Some(g.energy_mj),
            temperature_c: g.temperature_c,
            util_gpu_pct: g.utilization_pct,
            util_memory_pct: g.utilization_pct * 6 / 10,
            memory_used_bytes: mem_total * g.utilization_pct as u64 / 125,
            fan_pct: g.model.has_fan.then_some(g.fan_pct),
            sm_clock_mhz: g.sm_clock_mhz(),
            memory_clock_mhz: g.model.memory_clock_mhz,
            throttle_reasons: if capped { vec!["sw_power_cap".into()] } else { vec![] },
            processes: vec![],
        })
    }

    fn set_power_limit_mw(&mut self, index: u32, mw: u32) -> Result<(), BackendError> {
        let g = self.gpus.get_mut(index as usize).ok_or_else(|| BackendError::Other(format!("no GPU {index}")))?;
        g.set_limit_mw(mw).map_err(BackendError::Other)
    }

    fn set_load(&mut self, index: u32, util_pct: u32) {
        if let Some(l) = self.load.get_mut(index as usize) {
            *l = util_pct.min(100);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_never_exceeds_the_limit_and_energy_integrates_power() {
        let mut g = SimGpu::new(model("RTX 4090").unwrap(), 0, "n", 25.0);
        g.set_limit_mw(300_000).unwrap();
        let mut expected = 0.0;
        let mut prev = g.power_mw as f64;
        for i in 0..1000 {
            g.step(1.0, (i % 101) as u32);
            assert!(g.power_mw <= g.limit_mw);
            expected += (prev + g.power_mw as f64) / 2.0;
            prev = g.power_mw as f64;
        }
        assert!((g.energy_mj as f64 - expected).abs() < 1.0, "{} vs {expected}", g.energy_mj);
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        let mut g = SimGpu::new(model("RTX 4070").unwrap(), 0, "n", 25.0);
        assert!(g.set_limit_mw(320_000).is_err());
        assert!(g.set_limit_mw(50_000).is_err());
        assert!(g.set_limit_mw(150_000).is_ok());
    }

    #[test]
    fn temperature_rises_with_load() {
        let mut g = SimGpu::new(model("RTX 4080").unwrap(), 0, "n", 25.0);
        let cold = g.temperature_c;
        for _ in 0..600 {
            g.step(1.0, 100);
        }
        assert!(g.temperature_c > cold + 20.0, "{}", g.temperature_c);
    }
}
