//! The Grafana dashboard and the alert rules only query metrics that the
//! services export, so a renamed metric cannot leave a panel empty.
const EXPORTED: &[&str] = &[
    "costmesh_month_cost",
    "costmesh_budget_spent_ratio",
    "costmesh_budget_period_elapsed_ratio",
    "costmesh_budget_state",
    "costmesh_forecast_over_budget_ratio",
    "costmesh_forecast_month_end",
    "costmesh_forecast_error_ratio",
    "costmesh_kpi",
    "costmesh_energy_kwh",
    "costmesh_electricity_cost",
    "costmesh_storage_bytes",
    "costmesh_team_cost",
    "costmesh_idle_cost",
    "costmesh_carbon_kg",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_GPU_UTIL",
    // Counters are exposed with `_total` (OpenMetrics).
    "costmesh_cache_requests_total",
    "costmesh_cache_hits_total",
    "costmesh_cache_stale_total",
    "costmesh_cache_hit_rate",
    "costmesh_cache_hit_rate_target",
];

#[test]
fn dashboard_and_alerts_query_exported_metrics() {
    let shipped = costmesh_testkit::shipped_promql();
    assert!(shipped.iter().filter(|(from, _)| from.starts_with("panel")).count() >= 10);
    for (from, e) in shipped {
        for m in costmesh_testkit::promql_metric_names(&e) {
            assert!(EXPORTED.contains(&m.as_str()), "{m} (in {from}: {e:?}) is not exported by any service");
        }
    }
}

#[test]
fn every_listed_metric_is_registered_by_a_service() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut source = String::new();
    for svc in std::fs::read_dir(root).unwrap().flatten() {
        if let Ok(files) = std::fs::read_dir(svc.path().join("src")) {
            for f in files.flatten() {
                source += &std::fs::read_to_string(f.path()).unwrap_or_default();
            }
        }
    }
    for m in EXPORTED {
        let registered = m.strip_suffix("_total").unwrap_or(m);
        assert!(source.contains(&format!("\"{registered}\"")), "{m} is not registered in any service's source");
    }
}
