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
    pub admin: AdminConfig,
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
        self.admin.validate(&key(p, "admin"))
    }
}

impl Config {
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
