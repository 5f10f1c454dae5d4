//! The seed's KPIs, each with its formula (also in docs/kpis.md). A KPI
//! whose inputs are missing (no inference requests yet, say) is `None`, not 0.
use serde::Serialize;

use crate::ledger::State;

/// The KPIs of one month.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Kpis {
    pub period: String,
    /// (electricity + cloud node time, idle included) / GPU-hours held by
    /// jobs, from attribution. Target < 1.
    pub cost_per_training_hour: Option<f64>,
    /// Routes' backend cost / inference requests; with no route priced,
    /// the cloud bill / inference requests. Target < 0.01.
    pub cost_per_inference_request: Option<f64>,
    /// Inference requests answered from the gateway's cache (fresh or
    /// stale) / all inference requests. Target >= 0.85.
    pub cache_hit_rate: Option<f64>,
    /// GPU time held by jobs / GPU time sampled, from attribution, 0-1.
    /// Target > 0.8.
    pub gpu_utilisation: Option<f64>,
    /// Time-weighted mean utilisation the GPUs reported, 0-1.
    pub gpu_mean_utilisation: Option<f64>,
    /// used / provisioned bytes of the data filesystem, 0-1. Target > 0.7.
    pub storage_utilisation: Option<f64>,
    /// network / total cost, 0-1. Target < 0.05.
    pub network_share: Option<f64>,
    /// spent / budget, 0-1+. Target 0.95-1.05 at month end.
    pub budget_execution: Option<f64>,
    /// 1 - |forecast - actual| / actual of the last closed month. Target >= 0.9.
    pub forecast_accuracy: Option<f64>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// Computes the KPIs of `period` from the ledger state.
pub fn compute(s: &State, period: &str, price_per_kwh: f64, budget_micros: i64) -> Kpis {
    let scope = |name: &str| s.scope_total(period, name) as f64 / 1e6;
    let (cloud, network) = (scope("cloud"), scope("network"));
    let total = s.period_total(period, price_per_kwh) as f64 / 1e6;
    let u = s.usage.get(period).cloned().unwrap_or_default();
    let last_closed = s.forecast_error.iter().next_back().map(|(_, e)| *e);
    let (held_ms, all_ms) = s.attribution.gpu_ms(period);
    let gpu_cost: i64 = s.attribution.nodes(period).map(|(_, b)| b.total.cost_micros()).sum();
    let priced = s.inference.period(period).any(|(_, _, b)| b.cost_micros > 0);
    let route_cost: i64 = s.inference.period(period).map(|(_, _, b)| b.cost_micros).sum();
    let inference_cost = if priced { route_cost as f64 / 1e6 } else { cloud };
    Kpis {
        period: period.to_string(),
        cost_per_training_hour: ratio(gpu_cost as f64 / 1e6, held_ms as f64 / 3.6e6),
        cost_per_inference_request: ratio(inference_cost, u.inference_requests as f64),
        cache_hit_rate: ratio(u.cache_answers as f64, u.inference_requests as f64),
        gpu_utilisation: ratio(held_ms as f64, all_ms as f64),
        gpu_mean_utilisation: ratio(u.util_pct_seconds / 100.0, u.gpu_seconds),
        storage_utilisation: s.storage.and_then(|(used, prov, _)| ratio(used as f64, prov as f64)),
        network_share: ratio(network, total),
        budget_execution: ratio(total, budget_micros as f64 / 1e6),
        forecast_accuracy: last_closed.map(|e| 1.0 - e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas() {
        let mut s = State::default();
        let p = "2026-07";
        // 10 kWh at 2.6 = 26; 20 GPU-hours busy; 1.3 per hour.
        s.energy_mj.insert(p.into(), 36_000_000_000);
        s.usage.insert(
            p.into(),
            crate::ledger::Usage {
                gpu_seconds: 40.0 * 3600.0,
                busy_gpu_seconds: 20.0 * 3600.0,
                util_pct_seconds: 50.0 * 40.0 * 3600.0,
                inference_requests: 1000,
                cache_answers: 870,
            },
        );
        s.add(p, "cloud", 5_000_000);
        s.add(p, "network", 1_000_000);
        s.storage = Some((70, 100, chrono::Utc::now()));
        // Attribution: 10 kWh over 40 GPU-hours, 30 of them held by a job.
        for (job, hours) in [(Some("j1"), 30u64), (None, 10)] {
            s.attribution.book(&crate::attribution::Delta {
                period: p,
                node: "n1",
                holder: job.map(|j| crate::attribution::Holder { job_id: j, attempt: 1, team: "t" }),
                energy_mj: 36_000_000_000 * hours / 40,
                gpu_ms: hours * 3_600_000,
                price_micros_per_kwh: 2_600_000,
                carbon_mg_per_kwh: 0,
                cloud: None,
                preemptible: false,
                machine_type: "",
            });
        }
        let k = compute(&s, p, 2.6, 100_000_000);
        // 26 of electricity, idle included, over 30 held GPU-hours.
        assert!((k.cost_per_training_hour.unwrap() - 26.0 / 30.0).abs() < 1e-9);
        assert!((k.cost_per_inference_request.unwrap() - 0.005).abs() < 1e-12);
        assert!((k.cache_hit_rate.unwrap() - 0.87).abs() < 1e-12);
        assert!((k.gpu_utilisation.unwrap() - 0.75).abs() < 1e-12);
        assert!((k.gpu_mean_utilisation.unwrap() - 0.5).abs() < 1e-12);
        assert!((k.storage_utilisation.unwrap() - 0.7).abs() < 1e-12);
        assert!((k.network_share.unwrap() - 1.0 / 32.0).abs() < 1e-12);
        assert!((k.budget_execution.unwrap() - 0.32).abs() < 1e-12);
        assert_eq!(k.forecast_accuracy, None);
        let empty = compute(&State::default(), p, 2.6, 1);
        assert_eq!(empty.cost_per_inference_request, None);
        assert_eq!(empty.cache_hit_rate, None);
    }
}
