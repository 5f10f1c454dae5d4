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

/// Which GPUs the agent reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// NVML where it initialises, else simulated GPUs (one log line says why).
    #[default]
    Auto,
    /// NVML or fail at start with the reason.
    Nvml,
    /// Simulated GPUs.
    Sim,
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
    /// How fast dust degrades the coolers (thermal resistance grows by this
    /// fraction per day); 0 keeps them clean.
    pub cooler_fouling_per_day: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { gpus: vec!["RTX 4070".into()], demo_load: false, ambient_c: 25.0, cooler_fouling_per_day: 0.0 }
    }
}

/// The thermal guard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThermalConfig {
    /// Keep each GPU below this temperature (seed: 75 °C).
    pub target_c: f64,
    /// Raise the limit again only this far below the target.
    pub hysteresis_c: f64,
    /// One step of the power ceiling.
    pub step_w: u32,
    /// How far ahead a rising temperature is extrapolated.
    #[serde(with = "humantime_serde")]
    pub lookahead: Duration,
}

impl Default for ThermalConfig {
    fn default() -> Self {
        Self { target_c: 75.0, hysteresis_c: 3.0, step_w: 10, lookahead: Duration::from_secs(30) }
    }
}

/// Profile changes by rule from the running workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// A GPU below `idle_below_pct` utilisation this long, with no job,
    /// gets the idle profile; it leaves it when work arrives.
    #[serde(with = "humantime_serde")]
    pub idle_after: Duration,
    pub idle_below_pct: u32,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self { idle_after: Duration::from_secs(10 * 60), idle_below_pct: 5 }
    }
}

/// The GCE preemption watcher.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreemptionConfig {
    /// Watch the metadata server (on a GCE Spot or preemptible VM).
    pub enabled: bool,
    /// Metadata server base URL.
    pub metadata_url: String,
}

impl Default for PreemptionConfig {
    fn default() -> Self {
        Self { enabled: false, metadata_url: "http://metadata.google.internal".into() }
    }
}

/// The cooler-drift check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Days of readings that form each GPU's baseline.
    pub baseline_days: u32,
    /// Raise "clean the cooler" when a day runs this much hotter at the same power.
    pub drift_threshold_c: f64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self { baseline_days: 7, drift_threshold_c: 5.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This host's name in subjects; defaults to the host name.
    pub node: String,
    pub backend: BackendKind,
    pub mode: Mode,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    pub profiles: Profiles,
    pub thermal: ThermalConfig,
    pub rules: RulesConfig,
    pub preemption: PreemptionConfig,
    pub maintenance: MaintenanceConfig,
    pub sim: SimConfig,
    /// This node is a cloud VM (the scheduler gates cloud work by budget).
    pub cloud: bool,
    /// This node may be preempted (spot / preemptible VM).
    pub preemptible: bool,
    /// The node's machine type, e.g. `n1-standard-4-t4` (a cloud node's
    /// hourly price may be keyed by it in `[cost_watcher.cloud_prices]`).
    pub machine_type: String,
    pub jobs: JobsConfig,
    /// Public nkeys (`U...`) of the schedulers whose assignments, signals and
    /// power commands this node obeys; anything unsigned or signed by
    /// another key is refused and dead-lettered. Empty: nothing is checked
    /// (a warning at start says so), and NATS permissions are all that
    /// keeps others off this node's subjects.
    pub trusted_scheduler_keys: Vec<String>,
    /// A file of more such keys, one per line (`costmesh nats-config`
    /// writes `scheduler.pub`; a compose secret).
    pub trusted_scheduler_keys_file: Option<std::path::PathBuf>,
    pub admin: AdminConfig,
}

/// Running the jobs the scheduler places on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Run assigned jobs (off: assignments are refused with a reason).
    pub enabled: bool,
    /// Each attempt writes stdout and stderr to `<logs_root>/<job>/<attempt>.log`.
    pub logs_root: std::path::PathBuf,
    /// After "stop" (SIGTERM), how long until SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// The signal that asks a job to checkpoint now.
    pub checkpoint_signal: String,
    /// What may run: executables, or directories whose executables (at any
    /// depth) may run. A command is resolved (`PATH`, then links) before it
    /// is matched, so `/opt/jobs/../../bin/sh` is `/usr/bin/sh`. Empty: no
    /// job runs; each assignment fails naming this key. Allowing a shell or
    /// an interpreter allows whatever it is given.
    pub allowed_commands: Vec<std::path::PathBuf>,
    /// The user jobs run as. Required when the agent runs as root (name
    /// `root` to run them as root on purpose); empty otherwise runs them as
    /// the agent's own user.
    pub run_as_user: String,
    /// Their group; empty: the user's primary group.
    pub run_as_group: String,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            logs_root: "/var/log/costmesh/jobs".into(),
            stop_grace: Duration::from_secs(30),
            checkpoint_signal: "SIGUSR1".into(),
            allowed_commands: Vec::new(),
            run_as_user: String::new(),
            run_as_group: String::new(),
        }
    }
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
            backend: BackendKind::Auto,
            mode: Mode::Observe,
            sample_interval: Duration::from_secs(5),
            profiles: Profiles::default(),
            thermal: ThermalConfig::default(),
            rules: RulesConfig::default(),
            preemption: PreemptionConfig::default(),
            maintenance: MaintenanceConfig::default(),
            sim: SimConfig::default(),
            cloud: false,
            preemptible: false,
            machine_type: String::new(),
            jobs: JobsConfig::default(),
            trusted_scheduler_keys: Vec::new(),
            trusted_scheduler_keys_file: None,
            admin: AdminConfig::on_port(9101),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        costmesh_contracts::subjects::validate_name(&self.node)
            .map_err(|e| ConfigError::new(key(p, "node"), &self.node, e))?;
        if !self.machine_type.is_empty() {
            costmesh_contracts::subjects::validate_name(&self.machine_type)
                .map_err(|why| ConfigError::new(key(p, "machine_type"), &self.machine_type, why))?;
        }
        if self.preemptible && !self.cloud {
            return Err(ConfigError::new(
                key(p, "preemptible"),
                true,
                "only a cloud node (cloud = true) can be preemptible",
            ));
        }
        use costmesh_runtime::config::check_duration;
        let s = Duration::from_secs;
        check_duration(key(p, "jobs.stop_grace"), self.jobs.stop_grace, Duration::from_millis(100), s(3600))?;
        check_duration(key(p, "rules.idle_after"), self.rules.idle_after, s(1), s(7 * 24 * 3600))?;
        check_duration(key(p, "thermal.lookahead"), self.thermal.lookahead, Duration::ZERO, s(3600))?;
        if crate::jobs::parse_signal(&self.jobs.checkpoint_signal).is_none() {
            return Err(ConfigError::new(
                key(p, "jobs.checkpoint_signal"),
                &self.jobs.checkpoint_signal,
                "not a signal name (e.g. SIGUSR1, SIGUSR2, SIGHUP)",
            ));
        }
        let keys = self.scheduler_keys().map_err(|why| {
            let f = self.trusted_scheduler_keys_file.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
            ConfigError::new(key(p, "trusted_scheduler_keys_file"), f, why)
        })?;
        costmesh_runtime::signing::Verifier::new(&keys)
            .map_err(|why| ConfigError::new(key(p, "trusted_scheduler_keys"), "[..]", why))?;
        crate::policy::Policy::from_config(&self.jobs)
            .map_err(|(name, value, why)| ConfigError::new(key(p, &format!("jobs.{name}")), value, why))?;
        if !self.jobs.logs_root.is_absolute() {
            return Err(ConfigError::new(
                key(p, "jobs.logs_root"),
                self.jobs.logs_root.display(),
                "must be an absolute path",
            ));
        }
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
        if !(30.0..=100.0).contains(&self.thermal.target_c) {
            return Err(ConfigError::new(
                key(p, "thermal.target_c"),
                self.thermal.target_c,
                "must be between 30 and 100 °C",
            ));
        }
        if !(0.5..=20.0).contains(&self.thermal.hysteresis_c) {
            return Err(ConfigError::new(
                key(p, "thermal.hysteresis_c"),
                self.thermal.hysteresis_c,
                "must be between 0.5 and 20 °C",
            ));
        }
        if self.thermal.step_w == 0 || self.thermal.step_w > 100 {
            return Err(ConfigError::new(
                key(p, "thermal.step_w"),
                self.thermal.step_w,
                "must be between 1 and 100 watts",
            ));
        }
        if self.rules.idle_below_pct > 100 {
            return Err(ConfigError::new(
                key(p, "rules.idle_below_pct"),
                self.rules.idle_below_pct,
                "must be a percentage (0-100)",
            ));
        }
        let url = &self.preemption.metadata_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::new(key(p, "preemption.metadata_url"), url, "must be an http:// or https:// URL"));
        }
        if self.maintenance.baseline_days == 0 {
            return Err(ConfigError::new(key(p, "maintenance.baseline_days"), 0, "must be at least 1"));
        }
        if !(self.sim.cooler_fouling_per_day >= 0.0 && self.sim.cooler_fouling_per_day < 1.0) {
            return Err(ConfigError::new(
                key(p, "sim.cooler_fouling_per_day"),
                self.sim.cooler_fouling_per_day,
                "must be between 0 and 1",
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

impl Config {
    /// `trusted_scheduler_keys` and the keys in `trusted_scheduler_keys_file`.
    pub fn scheduler_keys(&self) -> Result<Vec<String>, String> {
        let mut keys = self.trusted_scheduler_keys.clone();
        if let Some(f) = &self.trusted_scheduler_keys_file {
            let text = std::fs::read_to_string(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        Ok(keys)
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
