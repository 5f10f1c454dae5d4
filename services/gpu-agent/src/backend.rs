//! The GPU backends behind one trait: NVML on real hardware, the simulator
//! everywhere else.
use chrono::{DateTime, Utc};

use crate::config::{BackendKind, Config};

/// What does not change while the agent runs.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub index: u32,
    pub uuid: String,
    /// Product name as NVML reports it.
    pub product: String,
    pub min_limit_mw: u32,
    pub max_limit_mw: u32,
    pub default_limit_mw: u32,
    pub memory_total_bytes: u64,
}

/// One reading of one GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    pub power_mw: u32,
    pub limit_mw: u32,
    /// Millijoules since the backend's boot id began; None where the device
    /// has no counter (pre-Volta), and the agent integrates power instead.
    pub energy_mj: Option<u64>,
    pub temperature_c: f64,
    pub util_gpu_pct: u32,
    pub util_memory_pct: u32,
    pub memory_used_bytes: u64,
    pub fan_pct: Option<u32>,
    pub sm_clock_mhz: u32,
    pub memory_clock_mhz: u32,
    pub throttle_reasons: Vec<String>,
    /// (pid, GPU memory in bytes)
    pub processes: Vec<(u32, u64)>,
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Setting a limit needs root (CAP_SYS_ADMIN in a container).
    #[error("permission denied: {0} (setting power limits needs root, or CAP_SYS_ADMIN in a container)")]
    NoPermission(String),
    #[error("not supported by this device: {0}")]
    NotSupported(String),
    #[error("{0}")]
    Other(String),
}

/// A source of GPU readings and the one setting the agent may change.
pub trait GpuBackend: Send {
    /// `nvml` or `sim`.
    fn kind(&self) -> &'static str;
    /// Identifies the energy counters' epoch: it changes when they restart.
    fn boot_id(&self) -> String;
    fn devices(&self) -> &[DeviceInfo];
    /// Reads GPU `index` as of `now` (the simulator advances to `now`).
    fn read(&mut self, index: u32, now: DateTime<Utc>) -> Result<Reading, BackendError>;
    /// Sets the power limit. Callers clamp to the device's range first.
    fn set_power_limit_mw(&mut self, index: u32, mw: u32) -> Result<(), BackendError>;
    /// Sets the load a simulated GPU runs at; real GPUs ignore it (their load
    /// comes from real processes).
    fn set_load(&mut self, _index: u32, _util_pct: u32) {}
}

/// Opens the configured backend. `auto` uses NVML where it initialises and
/// logs in one line why it did not; `nvml` fails with that reason.
pub fn open(cfg: &Config, now: DateTime<Utc>) -> Result<Box<dyn GpuBackend>, String> {
    match cfg.backend {
        BackendKind::Sim => Ok(Box::new(crate::sim::SimBackend::new(&cfg.node, &cfg.sim, now))),
        BackendKind::Nvml => crate::nvml::NvmlBackend::open().map(|b| Box::new(b) as Box<dyn GpuBackend>),
        BackendKind::Auto => match crate::nvml::NvmlBackend::open() {
            Ok(b) => Ok(Box::new(b)),
            Err(why) => {
                tracing::info!(reason = %why, "NVML unavailable; using simulated GPUs");
                Ok(Box::new(crate::sim::SimBackend::new(&cfg.node, &cfg.sim, now)))
            }
        },
    }
}
