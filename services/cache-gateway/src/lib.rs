//! cache-gateway: the inference front door.
//!
//! This crate currently holds the service's frame: its config (cache TTL
//! from the seed) and a loop that follows preemption notices and budget
//! events, which will drain backends and switch degradation modes. The proxy,
//! Redis cache and backend pools are issue #7.
#![forbid(unsafe_code)]

use std::time::Duration;

use costmesh_contracts::AnyEvent;
use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::ServiceContext;
use serde::{Deserialize, Serialize};

/// The `[cache_gateway]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Cached responses live this long (seed: 1 h).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Hit-rate target (seed: 85 %).
    pub hit_rate_target: f64,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(3600), hit_rate_target: 0.85, admin: AdminConfig::on_port(9105) }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new(key(p, "ttl"), "0s", "must be greater than zero"));
        }
        if !(0.0..=1.0).contains(&self.hit_rate_target) {
            return Err(ConfigError::new(key(p, "hit_rate_target"), self.hit_rate_target, "must be between 0 and 1"));
        }
        self.admin.validate(&key(p, "admin"))
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}

/// Runs the gateway until shutdown.
pub async fn run(_cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let filters = vec![ctx.subjects().preemption_all(), ctx.subjects().budget_all()];
    let task = ctx
        .spawn_durable::<AnyEvent, _, _>("world", filters, |_, _, event| async move {
            match event {
                AnyEvent::PreemptionNotice(n) => {
                    tracing::info!(node = %n.node, "preemption notice: backends on this node are to drain")
                }
                AnyEvent::BudgetEvent(b) => tracing::info!(scope = %b.scope, state = b.state, "budget state noted"),
                other => {
                    return Err(HandlerError::Reject(format!("{} does not belong on this subject", other.type_name())))
                }
            }
            Ok(())
        })
        .await?;
    ctx.health.set("bus", true);
    ctx.shutdown.cancelled().await;
    let _ = task.await;
    Ok(())
}
