//! The `[cost_watcher]` config section. Defaults are the seed's numbers.
use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::host::ServiceConfig;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Flat electricity price (seed: 2.6 TWD/kWh).
    pub electricity_price_per_kwh: f64,
    /// Time-of-use periods; empty (the default) means the flat price above.
    pub tariff: costmesh_runtime::tariff::Tariff,
    /// Monthly budget (seed: 3,000 TWD).
    pub monthly_budget: f64,
    /// Warn at this fraction of the budget (seed: 0.8).
    pub warn_ratio: f64,
    /// More warning thresholds (fractions below 1), each raising its own
    /// budget event; 100 % is always the exceeded threshold.
    pub extra_thresholds: Vec<f64>,
    /// How often budgets and forecasts are evaluated (and state saved).
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: std::time::Duration,
    /// GCP billing budget notifications over Pub/Sub.
    pub billing: crate::billing::BillingConfig,
    /// Inputs of `costmesh roi`.
    pub roi: crate::roi::RoiInputs,
    /// Hourly prices of cloud nodes, keyed by node name or machine type
    /// (a node's own entry wins): `"gpu-t4-spot" = { on_demand_per_hour =
    /// 43.0, spot_per_hour = 13.0 }` (the seed's T4: 1.35 USD = 43 TWD an
    /// hour on demand).
    pub cloud_prices: std::collections::BTreeMap<String, CloudPrice>,
    /// Backend prices of inference routes: `demo = { per_call = 0.002 }`.
    pub routes: std::collections::BTreeMap<String, RoutePriceConfig>,
    /// Grid carbon intensity.
    pub carbon: crate::carbon::CarbonConfig,
    /// How long after a job's end its `JobCost` waits for the last samples
    /// of its GPUs (a few sample intervals).
    #[serde(with = "humantime_serde")]
    pub job_cost_settle: std::time::Duration,
    /// Months of attribution kept for reports (the current one included).
    pub attribution_months: usize,
    pub admin: AdminConfig,
}

/// A cloud node's price per hour, ledger currency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudPrice {
    pub on_demand_per_hour: f64,
    /// For spot/preemptible nodes; absent: the on-demand price.
    #[serde(default)]
    pub spot_per_hour: Option<f64>,
}

/// An inference route's backend price, ledger currency.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutePriceConfig {
    pub per_call: f64,
    pub per_backend_second: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            electricity_price_per_kwh: 2.6,
            tariff: Default::default(),
            monthly_budget: 3000.0,
            warn_ratio: 0.8,
            extra_thresholds: Vec::new(),
            evaluate_interval: std::time::Duration::from_secs(60),
            billing: Default::default(),
            roi: Default::default(),
            cloud_prices: Default::default(),
            routes: Default::default(),
            carbon: Default::default(),
            job_cost_settle: std::time::Duration::from_secs(30),
            attribution_months: 13,
            admin: AdminConfig::on_port(9104),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if !(self.electricity_price_per_kwh.is_finite() && self.electricity_price_per_kwh >= 0.0) {
            return Err(ConfigError::new(
                key(p, "electricity_price_per_kwh"),
                self.electricity_price_per_kwh,
                "must be a price of zero or more",
            ));
        }
        if !(self.monthly_budget.is_finite() && self.monthly_budget > 0.0) {
            return Err(ConfigError::new(key(p, "monthly_budget"), self.monthly_budget, "must be greater than zero"));
        }
        costmesh_runtime::config::check_duration(
            key(p, "evaluate_interval"),
            self.evaluate_interval,
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(24 * 3600),
        )?;
        self.tariff.validate(&key(p, "tariff"))?;
        for (i, t) in self.extra_thresholds.iter().enumerate() {
            if !(*t > 0.0 && *t < 1.0) {
                return Err(ConfigError::new(
                    key(p, &format!("extra_thresholds[{i}]")),
                    t,
                    "must be between 0 and 1 (exclusive)",
                ));
            }
        }
        if !(self.warn_ratio > 0.0 && self.warn_ratio < 1.0) {
            return Err(ConfigError::new(key(p, "warn_ratio"), self.warn_ratio, "must be between 0 and 1 (exclusive)"));
        }
        let b = &self.billing;
        if !b.subscription.is_empty() {
            let parts: Vec<&str> = b.subscription.split('/').collect();
            if parts.len() != 4
                || parts[0] != "projects"
                || parts[2] != "subscriptions"
                || parts[1].is_empty()
                || parts[3].is_empty()
            {
                return Err(ConfigError::new(
                    key(p, "billing.subscription"),
                    &b.subscription,
                    "must be projects/<project>/subscriptions/<name>",
                ));
            }
        }
        if !matches!(b.credentials.as_str(), "default" | "anonymous") {
            return Err(ConfigError::new(
                key(p, "billing.credentials"),
                &b.credentials,
                "must be `default` or `anonymous`",
            ));
        }
        for (cur, rate) in &b.exchange_rates {
            if !(rate.is_finite() && *rate > 0.0) {
                return Err(ConfigError::new(
                    key(p, &format!("billing.exchange_rates.{cur}")),
                    rate,
                    "must be a positive rate",
                ));
            }
        }
        let amount = |k: String, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(ConfigError::new(k, v, "must be an amount of zero or more"))
            }
        };
        for (name, c) in &self.cloud_prices {
            costmesh_contracts::subjects::validate_name(name)
                .map_err(|why| ConfigError::new(key(p, &format!("cloud_prices.{name}")), name, why))?;
            amount(key(p, &format!("cloud_prices.{name}.on_demand_per_hour")), c.on_demand_per_hour)?;
            if let Some(s) = c.spot_per_hour {
                amount(key(p, &format!("cloud_prices.{name}.spot_per_hour")), s)?;
            }
        }
        for (name, r) in &self.routes {
            costmesh_contracts::subjects::validate_name(name)
                .map_err(|why| ConfigError::new(key(p, &format!("routes.{name}")), name, why))?;
            amount(key(p, &format!("routes.{name}.per_call")), r.per_call)?;
            amount(key(p, &format!("routes.{name}.per_backend_second")), r.per_backend_second)?;
        }
        let c = &self.carbon;
        if !(c.intensity_g_per_kwh.is_finite() && c.intensity_g_per_kwh >= 0.0) {
            return Err(ConfigError::new(
                key(p, "carbon.intensity_g_per_kwh"),
                c.intensity_g_per_kwh,
                "must be gCO2e per kWh, zero or more",
            ));
        }
        if c.source.starts_with("http") && !(c.source.starts_with("http://") || c.source.starts_with("https://")) {
            return Err(ConfigError::new(
                key(p, "carbon.source"),
                &c.source,
                "must be a file path or an http(s):// URL",
            ));
        }
        costmesh_runtime::config::check_duration(
            key(p, "carbon.refresh"),
            c.refresh,
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(7 * 24 * 3600),
        )?;
        costmesh_runtime::config::check_duration(
            key(p, "job_cost_settle"),
            self.job_cost_settle,
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(3600),
        )?;
        if !(1..=120).contains(&self.attribution_months) {
            return Err(ConfigError::new(key(p, "attribution_months"), self.attribution_months, "must be 1 to 120"));
        }
        self.admin.validate(&key(p, "admin"))
    }
}

/// Ledger micros of an amount in the ledger currency.
fn micros(v: f64) -> u64 {
    (v * 1e6).round().max(0.0) as u64
}

impl Config {
    /// The hourly price of a cloud node (micros): its own entry, else its
    /// machine type's; the spot price for a preemptible node.
    pub fn cloud_price_micros(&self, node: &str, machine_type: &str, preemptible: bool) -> Option<u64> {
        let c = self.cloud_prices.get(node).or_else(|| self.cloud_prices.get(machine_type))?;
        let per_hour = if preemptible { c.spot_per_hour.unwrap_or(c.on_demand_per_hour) } else { c.on_demand_per_hour };
        Some(micros(per_hour))
    }

    /// Route prices in micros.
    pub fn route_prices(&self) -> std::collections::BTreeMap<String, crate::inference::RoutePrice> {
        self.routes
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    crate::inference::RoutePrice {
                        per_call_micros: micros(r.per_call),
                        per_backend_second_micros: micros(r.per_backend_second),
                    },
                )
            })
            .collect()
    }

    /// Every warning threshold.
    pub fn warn_thresholds(&self) -> Vec<f64> {
        let mut v = self.extra_thresholds.clone();
        v.push(self.warn_ratio);
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}
