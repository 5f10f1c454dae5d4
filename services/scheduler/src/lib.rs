//! scheduler: decides when and where training jobs run.
//!
//! This crate currently holds the service's frame: its config with the
//! seed's scheduling numbers, and a loop that follows the events the
//! scheduler reacts to (preemption notices, budget state) and keeps the
//! current view of them. The job queue, placement, checkpoint cadence and
//! recovery are issue #4.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use costmesh_contracts::v1::{BudgetEvent, PreemptionNotice};
use costmesh_contracts::AnyEvent;
use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::ServiceContext;
use serde::{Deserialize, Serialize};

/// The `[scheduler]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Off-peak window for large training runs (seed: 23:00-07:00, local time).
    pub off_peak_start: String,
    pub off_peak_end: String,
    /// How often running jobs are asked to checkpoint (seed: 15 min).
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            off_peak_start: "23:00".into(),
            off_peak_end: "07:00".into(),
            checkpoint_interval: Duration::from_secs(15 * 60),
            admin: AdminConfig::on_port(9102),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        for (name, v) in [("off_peak_start", &self.off_peak_start), ("off_peak_end", &self.off_peak_end)] {
            chrono::NaiveTime::parse_from_str(v, "%H:%M")
                .map_err(|_| ConfigError::new(key(p, name), v, "must be a time of day as HH:MM"))?;
        }
        if self.checkpoint_interval < Duration::from_secs(60) {
            return Err(ConfigError::new(
                key(p, "checkpoint_interval"),
                humantime_serde::re::humantime::format_duration(self.checkpoint_interval),
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

/// What the scheduler currently knows of the world outside the queue.
#[derive(Debug, Default)]
pub struct View {
    pub preempted_nodes: BTreeSet<String>,
    pub cloud_budget: Option<costmesh_contracts::v1::BudgetState>,
}

/// Runs the scheduler until shutdown.
pub async fn run(_cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let view = Arc::new(Mutex::new(View::default()));
    let filters = vec![ctx.subjects().preemption_all(), ctx.subjects().budget_all()];
    let v = view.clone();
    let task = ctx
        .spawn_durable::<AnyEvent, _, _>("world", filters, move |_, _, event| {
            let view = v.clone();
            async move {
                let mut view = view.lock().expect("view lock");
                match event {
                    AnyEvent::PreemptionNotice(PreemptionNotice { node, .. }) => {
                        tracing::info!(%node, "preemption notice noted");
                        view.preempted_nodes.insert(node);
                    }
                    AnyEvent::BudgetEvent(BudgetEvent { scope, state, .. }) => {
                        tracing::info!(%scope, state, "budget state noted");
                        if scope == "cloud" {
                            view.cloud_budget = costmesh_contracts::v1::BudgetState::try_from(state).ok();
                        }
                    }
                    other => {
                        return Err(HandlerError::Reject(format!(
                            "{} does not belong on this subject",
                            other.type_name()
                        )))
                    }
                }
                Ok(())
            }
        })
        .await?;
    ctx.health.set("bus", true);
    ctx.shutdown.cancelled().await;
    let _ = task.await;
    Ok(())
}
