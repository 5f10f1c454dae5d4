//! scheduler: decides when and where training jobs run.
//!
//! # Layout
//! - [`model`]: jobs as kept in the KV bucket, job-spec validation.
//! - [`plan`]: pure decisions: start time (off-peak, tariff, deadline) and
//!   placement (free GPUs, node kind, budget).
//! - [`service`]: the service: job API over request-reply, durable job
//!   state with compare-and-set, assignments, checkpoints, preemption
//!   recovery, budget gating, idle actions.
//! - [`actuator`]: where idle and budget actions go (dry run by default).
//! - [`gce`]: the Compute Engine actuator (stop, resize, start managed VMs).
#![forbid(unsafe_code)]

pub mod actuator;
pub mod gce;
pub mod model;
pub mod plan;
pub mod service;

use std::time::Duration;

use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::tariff::{Days, Tariff};
use serde::{Deserialize, Serialize};

pub use service::{run, run_with_actuator};

/// Idle resources: a node whose GPUs all stay below `below_pct` for
/// `after` gets an action: scale down in business hours, stop outside them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleConfig {
    pub below_pct: u32,
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    pub business_start: String,
    pub business_end: String,
    pub business_days: Days,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            below_pct: 10,
            after: Duration::from_secs(30 * 60),
            business_start: "09:00".into(),
            business_end: "18:00".into(),
            business_days: Days::Weekdays,
        }
    }
}

/// Budget gating.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetGating {
    /// Budget scopes that gate cloud work; empty: every scope.
    pub scopes: Vec<String>,
    /// On exceeded, checkpoint and stop running cloud jobs (they wait in
    /// the queue); off: they run to the end.
    pub stop_cloud_on_exceeded: bool,
}

impl Default for BudgetGating {
    fn default() -> Self {
        Self { scopes: Vec::new(), stop_cloud_on_exceeded: true }
    }
}

/// The `[scheduler]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Off-peak window for large training runs (seed: 23:00-07:00, local time).
    pub off_peak_start: String,
    pub off_peak_end: String,
    /// Training jobs at least this long are "large" and wait for off-peak.
    #[serde(with = "humantime_serde")]
    pub large_job_min_duration: Duration,
    /// Time-of-use tariff; with periods, jobs start at the cheapest time
    /// that still meets their deadline (instead of the off-peak rule).
    pub tariff: Tariff,
    /// How far ahead a cheaper start is looked for.
    #[serde(with = "humantime_serde")]
    pub planning_horizon: Duration,
    /// A job whose latest start is this close is not deferred for the budget.
    #[serde(with = "humantime_serde")]
    pub cannot_wait: Duration,
    /// How often running jobs are asked to checkpoint (seed: 15 min).
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How often the queue is looked at (also after every event).
    #[serde(with = "humantime_serde")]
    pub decide_interval: Duration,
    /// A node with no telemetry for this long gets no new work.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// A node with no telemetry for this long is lost: its assigned and
    /// running jobs are requeued (retry limit and backoff apply), and the
    /// stale attempts are stopped if the node comes back.
    #[serde(with = "humantime_serde")]
    pub node_lost_after: Duration,
    /// Finished jobs (succeeded, failed, cancelled) are kept this long, then
    /// deleted from the job bucket.
    #[serde(with = "humantime_serde")]
    pub finished_retention: Duration,
    /// Most jobs one `list` reply carries (the CLI pages through them).
    pub list_page_size: usize,
    /// First retry delay after a failure or interruption (doubles each time).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A preempted node gets no work until this long after its notice's deadline.
    #[serde(with = "humantime_serde")]
    pub preempted_hold: Duration,
    pub budget: BudgetGating,
    pub idle: IdleConfig,
    /// Acting on Compute Engine (off unless `gce.project` is set; dry run
    /// unless `gce.apply`).
    pub gce: gce::GceConfig,
    /// An nkey seed file (`costmesh nats-config` writes one per user): the
    /// scheduler signs its assignments, signals and power commands with it,
    /// and gpu-agents that list its public key in `trusted_scheduler_keys`
    /// refuse anything not signed by it.
    pub signing_key_file: Option<std::path::PathBuf>,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            off_peak_start: "23:00".into(),
            off_peak_end: "07:00".into(),
            large_job_min_duration: Duration::from_secs(2 * 3600),
            tariff: Tariff::default(),
            planning_horizon: Duration::from_secs(24 * 3600),
            cannot_wait: Duration::from_secs(3600),
            checkpoint_interval: Duration::from_secs(15 * 60),
            decide_interval: Duration::from_secs(60),
            node_timeout: Duration::from_secs(120),
            node_lost_after: Duration::from_secs(120),
            finished_retention: Duration::from_secs(7 * 24 * 3600),
            list_page_size: 200,
            retry_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(3600),
            preempted_hold: Duration::from_secs(600),
            budget: BudgetGating::default(),
            idle: IdleConfig::default(),
            gce: Default::default(),
            signing_key_file: None,
            admin: AdminConfig::on_port(9102),
        }
    }
}

/// A time of day, `HH:MM` (or `HH:MM:SS`, which an environment value such
/// as `23:00` becomes once read as TOML).
pub fn time_of_day(v: &str) -> Option<chrono::NaiveTime> {
    chrono::NaiveTime::parse_from_str(v, "%H:%M").or_else(|_| chrono::NaiveTime::parse_from_str(v, "%H:%M:%S")).ok()
}

fn hhmm(p: &str, name: &str, v: &str) -> Result<chrono::NaiveTime, ConfigError> {
    time_of_day(v).ok_or_else(|| ConfigError::new(key(p, name), v, "must be a time of day as HH:MM"))
}

fn at_least(p: &str, name: &str, v: Duration, min: Duration) -> Result<(), ConfigError> {
    if v < min {
        let fmt = humantime_serde::re::humantime::format_duration;
        return Err(ConfigError::new(key(p, name), fmt(v), format!("must be at least {}", fmt(min))));
    }
    Ok(())
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if let Some(f) = &self.signing_key_file {
            costmesh_runtime::signing::Signer::from_file(f)
                .map_err(|why| ConfigError::new(key(p, "signing_key_file"), f.display(), why))?;
        }
        self.gce.validate(p)?;
        if self.gce.stop_on_budget_exceeded && !self.budget.stop_cloud_on_exceeded {
            return Err(ConfigError::new(
                key(p, "gce.stop_on_budget_exceeded"),
                "true",
                "needs budget.stop_cloud_on_exceeded (the jobs there checkpoint and stop first)",
            ));
        }
        hhmm(p, "off_peak_start", &self.off_peak_start)?;
        hhmm(p, "off_peak_end", &self.off_peak_end)?;
        hhmm(p, "idle.business_start", &self.idle.business_start)?;
        hhmm(p, "idle.business_end", &self.idle.business_end)?;
        at_least(p, "checkpoint_interval", self.checkpoint_interval, Duration::from_secs(60))?;
        at_least(p, "decide_interval", self.decide_interval, Duration::from_secs(1))?;
        at_least(p, "node_timeout", self.node_timeout, Duration::from_secs(1))?;
        at_least(p, "planning_horizon", self.planning_horizon, Duration::from_secs(15 * 60))?;
        at_least(p, "idle.after", self.idle.after, Duration::from_secs(60))?;
        use costmesh_runtime::config::{check_duration, check_size};
        const DAY: u64 = 24 * 3600;
        let s = Duration::from_secs;
        check_duration(key(p, "checkpoint_interval"), self.checkpoint_interval, s(60), s(DAY))?;
        check_duration(key(p, "decide_interval"), self.decide_interval, s(1), s(3600))?;
        check_duration(key(p, "node_timeout"), self.node_timeout, s(1), s(DAY))?;
        check_duration(key(p, "node_lost_after"), self.node_lost_after, s(1), s(7 * DAY))?;
        check_duration(key(p, "finished_retention"), self.finished_retention, s(60), s(3650 * DAY))?;
        check_duration(key(p, "retry_backoff"), self.retry_backoff, s(1), s(DAY))?;
        check_duration(key(p, "max_backoff"), self.max_backoff, self.retry_backoff, s(7 * DAY))?;
        check_duration(key(p, "preempted_hold"), self.preempted_hold, s(0), s(DAY))?;
        check_duration(key(p, "cannot_wait"), self.cannot_wait, s(0), s(7 * DAY))?;
        check_duration(key(p, "large_job_min_duration"), self.large_job_min_duration, s(60), s(365 * DAY))?;
        check_size(key(p, "list_page_size"), self.list_page_size as u64, 1, 1000)?;
        if self.planning_horizon > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError::new(key(p, "planning_horizon"), "more than 7 days", "must be at most 7d"));
        }
        if self.idle.below_pct == 0 || self.idle.below_pct > 100 {
            return Err(ConfigError::new(key(p, "idle.below_pct"), self.idle.below_pct, "must be between 1 and 100"));
        }
        self.tariff.validate(&key(p, "tariff"))?;
        self.admin.validate(&key(p, "admin"))
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}
