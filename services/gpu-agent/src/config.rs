//! The `[gpu_agent]` config section. Defaults are the seed's numbers.
use std::time::Duration;

use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::host::ServiceConfig;
use serde::{Deserialize, Serialize};

/// Whether the agent may change GPU settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Compute and report the limit it would set; change nothing.
    #[default]
    Observe,
    /// Set power limits (needs root / CAP_SYS_ADMIN on NVML).
    Enforce,
}

/// Power profile targets in watts (seed: training 320, inference 220, idle 50).
/// Always clamped to each device's own limit range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profiles {
    pub training_w: u32,
    pub inference_w: u32,
    pub idle_w: u32,
}

impl Default for Profiles {
    fn default() -> Self {
        Self { training_w: 320, inference_w: 220, idle_w: 50 }
    }
}

/// Simulated GPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// One entry per GPU: a model name from [`crate::sim::MODELS`].
    pub gpus: Vec<String>,
    /// Drive a varying demo load (for `costmesh up`); off means idle GPUs
    /// unless a job runs.
    pub demo_load: bool,
    /// Room temperature the coolers work against.
    pub ambient_c: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { gpus: vec!["RTX 4070".into()], demo_load: false, ambient_c: 25.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This host's name in subjects; defaults to the host name.
    pub node: String,
    pub mode: Mode,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    pub profiles: Profiles,
    /// Keep each GPU below this temperature (seed: 75 °C).
    pub thermal_target_c: f64,
    pub sim: SimConfig,
    pub admin: AdminConfig,
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| costmesh_contracts::subjects::validate_token(s).is_ok())
        .unwrap_or_else(|| "node-1".into())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: host_name(),
            mode: Mode::Observe,
            sample_interval: Duration::from_secs(5),
            profiles: Profiles::default(),
            thermal_target_c: 75.0,
            sim: SimConfig::default(),
            admin: AdminConfig::on_port(9101),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        costmesh_contracts::subjects::validate_token(&self.node)
            .map_err(|e| ConfigError::new(key(p, "node"), &self.node, e))?;
        if self.sample_interval < Duration::from_millis(100) || self.sample_interval > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                key(p, "sample_interval"),
                humantime_serde::re::humantime::format_duration(self.sample_interval),
                "must be between 100ms and 1h",
            ));
        }
        for (name, w) in [
            ("training_w", self.profiles.training_w),
            ("inference_w", self.profiles.inference_w),
            ("idle_w", self.profiles.idle_w),
        ] {
            if w == 0 || w > 2000 {
                return Err(ConfigError::new(
                    key(p, &format!("profiles.{name}")),
                    w,
                    "must be between 1 and 2000 watts",
                ));
            }
        }
        if !(30.0..=100.0).contains(&self.thermal_target_c) {
            return Err(ConfigError::new(
                key(p, "thermal_target_c"),
                self.thermal_target_c,
                "must be between 30 and 100 °C",
            ));
        }
        if self.sim.gpus.is_empty() {
            return Err(ConfigError::new(key(p, "sim.gpus"), "[]", "needs at least one GPU model"));
        }
        for (i, m) in self.sim.gpus.iter().enumerate() {
            if crate::sim::model(m).is_none() {
                let known: Vec<&str> = crate::sim::MODELS.iter().map(|m| m.name).collect();
                return Err(ConfigError::new(
                    key(p, &format!("sim.gpus[{i}]")),
                    m,
                    format!("unknown model; known: {}", known.join(", ")),
                ));
            }
        }
        self.admin.validate(&key(p, "admin"))
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
    fn instance(&self) -> Option<&str> {
        Some(&self.node)
    }
}
