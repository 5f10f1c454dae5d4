//! `costmesh cost --by job|team|node|route|tenant`: rows built from the
//! ledger state, answered on `<prefix>.api.cost-watcher.attribution`.
//!
//! Every row has the columns its report lists, in that order, with money in
//! the ledger currency (micros / 10^6, exact to the micro), energy in kWh,
//! GPU time in hours and carbon in kg CO2e; `exact` holds the same figures
//! as the integers the ledger books (mJ, ms, micros, mg).
use std::str::FromStr;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::attribution::{Amounts, IDLE, UNEXPLAINED_CLOUD};
use crate::ledger::State;

/// What a report is broken down by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Job,
    Team,
    Node,
    Route,
    Tenant,
}

impl FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "job" => By::Job,
            "team" => By::Team,
            "node" => By::Node,
            "route" => By::Route,
            "tenant" => By::Tenant,
            other => return Err(format!("by {other:?}: must be one of job, team, node, route, tenant")),
        })
    }
}

/// Checks a "YYYY-MM" month.
pub fn parse_month(s: &str) -> Result<String, String> {
    let bad = || format!("month {s:?}: must be YYYY-MM, e.g. 2026-12");
    let (y, m) = s.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(1..=12).contains(&m) || y < 1970 {
        return Err(bad());
    }
    Ok(format!("{y:04}-{m:02}"))
}

/// One report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub by: String,
    pub period: String,
    pub currency: String,
    /// The month was closed by a rollover: its rows are final.
    pub closed: bool,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Value>,
}

fn units(micros: i64) -> Value {
    json!(micros as f64 / 1e6)
}

/// The shared money, energy, time and carbon columns of a row.
fn amounts(row: &mut Map<String, Value>, a: &Amounts) {
    row.insert("energy_kwh".into(), json!(a.energy_mj as f64 / 3.6e9));
    row.insert("gpu_hours".into(), json!(a.gpu_ms as f64 / 3.6e6));
    row.insert("electricity".into(), units(a.electricity_micros));
    row.insert("cloud".into(), units(a.cloud_micros));
    row.insert("cost".into(), units(a.cost_micros()));
    row.insert("carbon_kg".into(), json!(a.carbon_mg as f64 / 1e6));
    row.insert(
        "exact".into(),
        json!({
            "energy_mj": a.energy_mj,
            "gpu_ms": a.gpu_ms,
            "electricity_micros": a.electricity_micros,
            "cloud_micros": a.cloud_micros,
            "cost_micros": a.cost_micros(),
            "carbon_mg": a.carbon_mg,
        }),
    );
}

const AMOUNT_COLUMNS: [&str; 6] = ["energy_kwh", "gpu_hours", "electricity", "cloud", "cost", "carbon_kg"];

fn columns(first: &[&'static str], last: &[&'static str]) -> Vec<&'static str> {
    first.iter().chain(AMOUNT_COLUMNS.iter()).chain(last.iter()).copied().collect()
}

fn list<'a>(items: impl IntoIterator<Item = &'a String>) -> Value {
    json!(items.into_iter().cloned().collect::<Vec<_>>().join(" "))
}

/// Builds the report of `period` broken down by `by`.
pub fn build(s: &State, by: By, period: &str, currency: &str) -> Report {
    let a = &s.attribution;
    let mut rows = Vec::new();
    let columns = match by {
        By::Job => {
            for (job, (amt, nodes)) in a.by_job(period) {
                let mut r = Map::new();
                let rec = a.jobs.get(&job);
                r.insert("job".into(), json!(job));
                let team = if job == IDLE { IDLE } else { rec.map_or("", |j| j.team_or_unassigned()) };
                r.insert("team".into(), json!(team));
                let attempts: Vec<String> =
                    rec.map(|j| j.attempts.iter().map(|n| n.to_string()).collect()).unwrap_or_default();
                r.insert("attempts".into(), list(&attempts));
                r.insert("nodes".into(), list(&nodes));
                let state = match rec.and_then(|j| j.ended.as_ref()) {
                    Some(e) => e.kind.trim_start_matches("JOB_EVENT_KIND_").to_ascii_lowercase(),
                    None if job == IDLE => String::new(),
                    None => "running".into(),
                };
                r.insert("state".into(), json!(state));
                amounts(&mut r, &amt);
                if let Some(j) = rec.filter(|j| !j.labels.is_empty()) {
                    r.insert("labels".into(), json!(j.labels));
                }
                rows.push(Value::Object(r));
            }
            columns(&["job", "team", "attempts", "nodes", "state"], &[])
        }
        By::Team => {
            let mut jobs: std::collections::BTreeMap<String, usize> = Default::default();
            for (job, _) in a.by_job(period) {
                if job != IDLE {
                    let team = a.jobs.get(&job).map_or(crate::attribution::UNASSIGNED_TEAM, |j| j.team_or_unassigned());
                    *jobs.entry(team.to_string()).or_default() += 1;
                }
            }
            for (team, amt) in a.by_team(period) {
                let mut r = Map::new();
                r.insert("team".into(), json!(team));
                r.insert("jobs".into(), json!(jobs.get(&team).copied().unwrap_or(0)));
                amounts(&mut r, &amt);
                rows.push(Value::Object(r));
            }
            columns(&["team", "jobs"], &[])
        }
        By::Node => {
            let mut booked = 0i64;
            for (node, book) in a.nodes(period) {
                let mut r = Map::new();
                r.insert("node".into(), json!(node));
                r.insert("kind".into(), json!(if book.cloud { "cloud" } else { "local" }));
                r.insert("preemptible".into(), json!(book.preemptible));
                r.insert("machine_type".into(), json!(book.machine_type));
                amounts(&mut r, &book.total);
                let idle = book.rows.get(IDLE).cloned().unwrap_or_default();
                r.insert("idle_gpu_hours".into(), json!(idle.gpu_ms as f64 / 3.6e6));
                r.insert("idle_cost".into(), units(idle.cost_micros()));
                booked += book.total.cloud_micros;
                rows.push(Value::Object(r));
            }
            // The GCP bill is the source of truth for the cloud: node time
            // booked here is an estimate, and the difference is its own row.
            if let Some(billed) = s.ledger.get(period).and_then(|p| p.get("cloud")).copied() {
                for (name, kind, cloud) in
                    [("__gcp_billing__", "billing", billed), (UNEXPLAINED_CLOUD, "difference", billed - booked)]
                {
                    let mut r = Map::new();
                    r.insert("node".into(), json!(name));
                    r.insert("kind".into(), json!(kind));
                    r.insert("preemptible".into(), json!(false));
                    r.insert("machine_type".into(), json!(""));
                    amounts(&mut r, &Amounts { cloud_micros: cloud, ..Default::default() });
                    r.insert("idle_gpu_hours".into(), json!(0.0));
                    r.insert("idle_cost".into(), json!(0.0));
                    rows.push(Value::Object(r));
                }
            }
            columns(&["node", "kind", "preemptible", "machine_type"], &["idle_gpu_hours", "idle_cost"])
        }
        By::Route | By::Tenant => {
            let mut acc: std::collections::BTreeMap<String, crate::inference::RouteBook> = Default::default();
            for (route, tenant, b) in s.inference.period(period) {
                let key = match by {
                    By::Route => route.clone(),
                    _ if tenant.is_empty() => "__anonymous__".to_string(),
                    _ => tenant.clone(),
                };
                acc.entry(key).or_default().add(b);
            }
            let name = if by == By::Route { "route" } else { "tenant" };
            for (key, b) in acc {
                let mut r = Map::new();
                r.insert(name.into(), json!(key));
                r.insert("requests".into(), json!(b.requests));
                r.insert("hits".into(), json!(b.hits));
                r.insert("stale".into(), json!(b.stale));
                r.insert("misses".into(), json!(b.misses));
                r.insert("backend_calls".into(), json!(b.backend_calls));
                r.insert("backend_seconds".into(), json!(b.backend_ms as f64 / 1000.0));
                r.insert("cost".into(), units(b.cost_micros));
                r.insert("saved".into(), units(b.saved_micros));
                let answered = (b.hits + b.stale) as f64;
                r.insert("hit_rate".into(), json!(if b.requests > 0 { answered / b.requests as f64 } else { 0.0 }));
                r.insert("exact".into(), json!({"cost_micros": b.cost_micros, "saved_micros": b.saved_micros}));
                rows.push(Value::Object(r));
            }
            let first: &'static str = if by == By::Route { "route" } else { "tenant" };
            vec![
                first,
                "requests",
                "hits",
                "stale",
                "misses",
                "backend_calls",
                "backend_seconds",
                "cost",
                "saved",
                "hit_rate",
            ]
        }
    };
    Report {
        by: format!("{by:?}").to_ascii_lowercase(),
        period: period.to_string(),
        currency: currency.to_string(),
        closed: a.closed.contains(period),
        columns,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_named() {
        assert!("teams".parse::<By>().unwrap_err().contains("\"teams\""));
        assert_eq!("tenant".parse::<By>(), Ok(By::Tenant));
        assert_eq!(parse_month("2026-12"), Ok("2026-12".into()));
        for bad in ["2026-13", "2026-1", "26-12", "2026/12", "december", "2026-00"] {
            assert!(parse_month(bad).unwrap_err().contains(bad), "{bad}");
        }
    }
}
