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

fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
        } else {
            if (cur.starts_with("costmesh_") || cur.starts_with("DCGM_")) && !out.contains(&cur) {
                out.push(cur.clone());
            }
            cur.clear();
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_query_exported_metrics() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../compose");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/grafana/dashboards/costmesh.json")).unwrap())
            .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    let rules = std::fs::read_to_string(format!("{root}/prometheus/alerts.yml")).unwrap();
    exprs.extend(
        rules.lines().filter(|l| l.trim_start().starts_with("expr:") || l.contains("costmesh_")).map(str::to_string),
    );
    for e in exprs {
        for m in metric_names(&e) {
            assert!(EXPORTED.contains(&m.as_str()), "{m} (in {e:?}) is not exported by any service");
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
