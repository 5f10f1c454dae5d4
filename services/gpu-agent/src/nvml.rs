//! The NVML backend (`nvml-wrapper`). The library is loaded at run time, so
//! the agent builds and starts on machines with no NVIDIA driver.
use chrono::{DateTime, Utc};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use crate::backend::{BackendError, DeviceInfo, GpuBackend, Reading};

pub struct NvmlBackend {
    nvml: Nvml,
    devices: Vec<DeviceInfo>,
    boot_id: String,
}

/// A plain-words reason for an NVML failure.
pub fn explain(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(l) => {
            format!("libnvidia-ml.so.1 could not be loaded (is the NVIDIA driver installed?): {l}")
        }
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".into(),
        NvmlError::LibraryNotFound => "libnvidia-ml.so.1 was not found".into(),
        NvmlError::NoPermission => "no permission to use NVML".into(),
        other => format!("NVML error: {other}"),
    }
}

fn map(e: NvmlError) -> BackendError {
    match e {
        NvmlError::NoPermission => BackendError::NoPermission(explain(&e)),
        NvmlError::NotSupported => BackendError::NotSupported(explain(&e)),
        other => BackendError::Other(explain(&other)),
    }
}

impl NvmlBackend {
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init().map_err(|e| explain(&e))?;
        let count = nvml.device_count().map_err(|e| explain(&e))?;
        if count == 0 {
            return Err("NVML initialised but found no GPU".into());
        }
        let mut devices = Vec::new();
        for i in 0..count {
            let d = nvml.device_by_index(i).map_err(|e| explain(&e))?;
            let c = d.power_management_limit_constraints().map_err(|e| explain(&e))?;
            devices.push(DeviceInfo {
                index: i,
                uuid: d.uuid().map_err(|e| explain(&e))?,
                product: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                min_limit_mw: c.min_limit,
                max_limit_mw: c.max_limit,
                default_limit_mw: d.power_management_limit_default().unwrap_or(c.max_limit),
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            });
        }
        // NVML's energy counter runs since the driver loaded: tie the epoch to
        // the kernel boot and the driver version, not to this process, so an
        // agent restart does not look like a new counter.
        let kernel_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let driver = nvml.sys_driver_version().unwrap_or_default();
        let boot_id = format!("nvml-{}-{driver}", kernel_boot.trim());
        tracing::info!(gpus = count, %driver, "NVML initialised");
        Ok(Self { nvml, devices, boot_id })
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn boot_id(&self) -> String {
        self.boot_id.clone()
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn read(&mut self, index: u32, _now: DateTime<Utc>) -> Result<Reading, BackendError> {
        let d = self.nvml.device_by_index(index).map_err(map)?;
        let util = d.utilization_rates().ok();
        let fan = match d.num_fans() {
            Ok(n) if n > 0 => d.fan_speed(0).ok(),
            _ => None,
        };
        let throttle = d
            .current_throttle_reasons()
            .map(|r| r.iter_names().map(|(n, _)| n.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        let processes = d
            .running_compute_processes()
            .map(|ps| {
                ps.into_iter()
                    .map(|p| {
                        let mem = match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => b,
                            UsedGpuMemory::Unavailable => 0,
                        };
                        (p.pid, mem)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Reading {
            power_mw: d.power_usage().map_err(map)?,
            limit_mw: d.enforced_power_limit().or_else(|_| d.power_management_limit()).map_err(map)?,
            energy_mj: d.total_energy_consumption().ok(),
            temperature_c: d.temperature(TemperatureSensor::Gpu).map_err(map)? as f64,
            util_gpu_pct: util.as_ref().map(|u| u.gpu).unwrap_or(0),
            util_memory_pct: util.as_ref().map(|u| u.memory).unwrap_or(0),
            memory_used_bytes: d.memory_info().map(|m| m.used).unwrap_or(0),
            fan_pct: fan,
            sm_clock_mhz: d.clock_info(Clock::SM).unwrap_or(0),
            memory_clock_mhz: d.clock_info(Clock::Memory).unwrap_or(0),
            throttle_reasons: throttle,
            processes,
        })
    }

    fn set_power_limit_mw(&mut self, index: u32, mw: u32) -> Result<(), BackendError> {
        let mut d = self.nvml.device_by_index(index).map_err(map)?;
        d.set_power_management_limit(mw).map_err(map)
    }
}
