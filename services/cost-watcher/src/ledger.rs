//! The ledger: money per month and per scope, month boundaries in the
//! ledger's time zone, and the state that survives restarts.
use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::budget::BudgetTrack;
use crate::energy::EnergyLedger;

/// Scopes money is booked under.
pub const SCOPES: &[&str] = &["local", "cloud", "storage", "network"];

/// "YYYY-MM" of `t` in `tz`.
pub fn period_of(t: DateTime<Utc>, tz: Tz) -> String {
    let l = t.with_timezone(&tz);
    format!("{:04}-{:02}", l.year(), l.month())
}

/// Start and end (exclusive) of a "YYYY-MM" period in `tz`, as UTC.
pub fn period_bounds(period: &str, tz: Tz) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (y, m) = period.split_once('-')?;
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    let start = tz.with_ymd_and_hms(y, m, 1, 0, 0, 0).earliest()?;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let end = tz.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).earliest()?;
    Some((start.with_timezone(&Utc), end.with_timezone(&Utc)))
}

/// Everything the cost-watcher must not forget, stored as one JSON value in
/// JetStream KV and written with compare-and-set. Energy counters and the
/// money they produced are saved together: after a restart the next sample
/// is measured from the saved counter, so energy between the last save and
/// the crash is counted exactly once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub energy: EnergyLedger,
    /// period -> GPU energy booked to it (mJ); priced when read, so the
    /// local electricity cost is exact to the micro.
    pub energy_mj: BTreeMap<String, u64>,
    /// period -> electricity cost under a time-of-use tariff (micros, as
    /// priced at the time of each delta); empty with a flat tariff.
    #[serde(default)]
    pub tou_cost_micros: BTreeMap<String, f64>,
    /// period -> scope -> micros.
    pub ledger: BTreeMap<String, BTreeMap<String, i64>>,
    /// Cloud spend is reported as a running total per billing interval;
    /// period -> latest total (micros in the ledger currency).
    pub cloud_reported: BTreeMap<String, i64>,
    pub budgets: BTreeMap<String, BudgetTrack>,
    /// period -> forecast of month-end spend made at mid-month (micros).
    pub mid_month_forecast: BTreeMap<String, i64>,
    /// period -> forecast error at month end (|forecast - actual| / actual).
    pub forecast_error: BTreeMap<String, f64>,
    /// GCP budgets seen in notifications: budget id -> latest figures.
    pub gcp_budgets: BTreeMap<String, GcpBudget>,
    /// period -> KPI inputs gathered from telemetry and reports.
    pub usage: BTreeMap<String, Usage>,
    /// When each GPU ("node/gpu") was last sampled, to weigh samples by time.
    pub last_sample: BTreeMap<String, DateTime<Utc>>,
    /// Cache-gateway counters last seen: instance -> (started_at seconds, requests).
    pub cache_seen: BTreeMap<String, (i64, u64)>,
    /// The same for cache answers (hits + stale serves): instance -> (started_at, answers).
    #[serde(default)]
    pub cache_hits_seen: BTreeMap<String, (i64, u64)>,
    /// The latest storage report: (used, provisioned) bytes, and when it came.
    pub storage: Option<(u64, u64, DateTime<Utc>)>,
    /// The period the watcher last evaluated (for rollover).
    pub current_period: Option<String>,
    /// Cost per job, team and node (with idle rows), saved with the energy
    /// counters it was booked from.
    #[serde(default)]
    pub attribution: crate::attribution::Attribution,
    /// Inference backend cost and cache savings per route and tenant.
    #[serde(default)]
    pub inference: crate::inference::Inference,
    /// The process that saved this copy (see the watcher's save).
    #[serde(default)]
    pub writer: Option<String>,
}

impl State {
    pub fn add(&mut self, period: &str, scope: &str, micros: i64) {
        *self.ledger.entry(period.to_string()).or_default().entry(scope.to_string()).or_default() += micros;
    }

    pub fn scope_total(&self, period: &str, scope: &str) -> i64 {
        self.ledger.get(period).and_then(|p| p.get(scope)).copied().unwrap_or(0)
    }

    /// Electricity cost of `period` in micros: energy booked at the flat
    /// price, plus what a time-of-use tariff priced as it came.
    pub fn electricity(&self, period: &str, price_per_kwh: f64) -> i64 {
        let mj = self.energy_mj.get(period).copied().unwrap_or(0);
        let tou = self.tou_cost_micros.get(period).copied().unwrap_or(0.0);
        // micros = mJ / 3.6e9 kWh/mJ * price * 1e6
        (mj as f64 * price_per_kwh / 3_600.0 + tou).round() as i64
    }

    /// Everything booked to `period`, electricity included.
    pub fn period_total(&self, period: &str, price_per_kwh: f64) -> i64 {
        self.ledger.get(period).map(|p| p.values().sum()).unwrap_or(0) + self.electricity(period, price_per_kwh)
    }

    /// Records a running cloud total for `period`; books the growth.
    pub fn cloud_total(&mut self, period: &str, total_micros: i64) {
        let seen = self.cloud_reported.entry(period.to_string()).or_default();
        if total_micros > *seen {
            let growth = total_micros - *seen;
            *seen = total_micros;
            self.add(period, "cloud", growth);
        }
    }
}

/// What a month's KPIs are computed from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// GPU-seconds sampled, and of those, seconds at or above 10 % utilisation.
    pub gpu_seconds: f64,
    pub busy_gpu_seconds: f64,
    /// Utilisation x seconds, for the time-weighted mean.
    pub util_pct_seconds: f64,
    /// Inference requests served (cache-gateway statistics).
    pub inference_requests: u64,
    /// Of those, answered from the cache (fresh or stale).
    #[serde(default)]
    pub cache_answers: u64,
}

/// A GCP budget as its latest notification described it (ledger micros).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GcpBudget {
    pub name: String,
    pub period: String,
    pub spent_micros: i64,
    pub budget_micros: i64,
    /// `traceparent` of the handling of that notification: the budget event
    /// it leads to joins its trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// Linear month-end forecast: spend so far over the elapsed share of the month.
pub fn forecast(spent_micros: i64, now: DateTime<Utc>, start: DateTime<Utc>, end: DateTime<Utc>) -> i64 {
    let total = (end - start).num_seconds().max(1) as f64;
    let elapsed = (now - start).num_seconds().clamp(1, total as i64) as f64;
    (spent_micros as f64 * total / elapsed).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_follow_the_ledger_time_zone() {
        let tz: Tz = "Asia/Taipei".parse().unwrap();
        // 2026-06-30 17:00 UTC is already July in Taipei (UTC+8).
        let t: DateTime<Utc> = "2026-06-30T17:00:00Z".parse().unwrap();
        assert_eq!(period_of(t, tz), "2026-07");
        let (s, e) = period_bounds("2026-07", tz).unwrap();
        assert_eq!(s, "2026-06-30T16:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(e, "2026-07-31T16:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert!(period_bounds("2026-12", tz).is_some());
    }

    #[test]
    fn cloud_totals_book_only_growth() {
        let mut s = State::default();
        s.cloud_total("2026-07", 100);
        s.cloud_total("2026-07", 100); // the same notification again
        s.cloud_total("2026-07", 250);
        s.cloud_total("2026-07", 200); // an older one, late
        assert_eq!(s.scope_total("2026-07", "cloud"), 250);
    }

    #[test]
    fn forecast_is_linear_in_elapsed_time() {
        let (s, e) = ("2026-07-01T00:00:00Z".parse().unwrap(), "2026-07-31T00:00:00Z".parse().unwrap());
        let mid: DateTime<Utc> = "2026-07-16T00:00:00Z".parse().unwrap();
        assert_eq!(forecast(1_000, mid, s, e), 2_000);
    }
}
