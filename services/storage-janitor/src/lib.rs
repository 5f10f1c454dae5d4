//! storage-janitor: storage lifecycle (logs, temp files, model versions,
//! snapshots, bucket tiers).
//!
//! This crate currently holds the service's frame: its config (dry run by
//! default) and a loop that follows budget events, which will trigger the
//! extra pass. Policies, plan/apply, archive and reports are issue #5.
//!
//! **Invariant:** nothing is deleted or rewritten unless `apply = true`.
#![forbid(unsafe_code)]

use std::time::Duration;

use costmesh_contracts::v1::{BudgetEvent, BudgetState};
use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::ServiceContext;
use serde::{Deserialize, Serialize};

/// The `[storage_janitor]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Carry out plans; false (the default) only plans and reports.
    pub apply: bool,
    /// How often a scheduled pass runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self { apply: false, interval: Duration::from_secs(3600), admin: AdminConfig::on_port(9103) }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.interval < Duration::from_secs(60) {
            return Err(ConfigError::new(
                key(p, "interval"),
                humantime_serde::re::humantime::format_duration(self.interval),
                "must be at least 1m",
            ));
        }
        self.admin.validate(&key(p, "admin"))
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}

/// Runs the janitor until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let apply = cfg.apply;
    let task = ctx
        .spawn_durable::<BudgetEvent, _, _>("budget", vec![ctx.subjects().budget_all()], move |_, _, e| async move {
            if e.state() == BudgetState::Warning {
                tracing::info!(scope = %e.scope, apply, "budget warning: an extra storage pass is due");
            }
            Ok(())
        })
        .await?;
    ctx.health.set("bus", true);
    ctx.shutdown.cancelled().await;
    let _ = task.await;
    Ok(())
}
