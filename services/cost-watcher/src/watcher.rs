//! The cost-watcher loop: telemetry in, money booked per month; budgets,
//! forecasts and month rollover evaluated on the injectable clock; state
//! saved to JetStream KV with compare-and-set.
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use costmesh_bus::{BusErrorKind, Kv};
use costmesh_contracts::v1::{BudgetEvent, GpuSample, JobCost, JobEvent, JobEventKind, Money};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::budget;
use crate::config::Config;
use crate::ledger::{self, State};

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: String,
}

#[derive(Clone, Default)]
struct Metrics {
    energy_kwh: FloatGauge,
    electricity_cost: FloatGauge,
    month_cost: Family<ScopeLabels, FloatGauge>,
    budget_state: Family<BudgetLabels, Gauge>,
    budget_ratio: Family<BudgetLabels, FloatGauge>,
    period_elapsed: Family<BudgetLabels, FloatGauge>,
    forecast: FloatGauge,
    forecast_over_budget: FloatGauge,
    forecast_error: FloatGauge,
    kpi: Family<KpiLabels, FloatGauge>,
    team_cost: Family<TeamLabels, FloatGauge>,
    team_energy: Family<TeamLabels, FloatGauge>,
    team_gpu_hours: Family<TeamLabels, FloatGauge>,
    team_carbon: Family<TeamLabels, FloatGauge>,
    idle_cost: Family<NodeLabels, FloatGauge>,
    route_cost: Family<RouteLabels, FloatGauge>,
    cache_saved: Family<RouteLabels, FloatGauge>,
    carbon_kg: FloatGauge,
    cloud_booked: FloatGauge,
}

/// Per-team figures: teams are few; jobs are never a label (their number
/// grows without bound).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamLabels {
    team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KpiLabels {
    kpi: String,
}

/// The budget the config defines (scope: all spend).
pub const MONTHLY: &str = "monthly";

struct Shared {
    state: State,
    /// KV revision the state was loaded or saved at.
    revision: Option<u64>,
    dirty: bool,
    /// Bumped by every change, so a save that raced a change leaves it dirty.
    generation: u64,
}

impl Shared {
    /// Marks the state changed since the last save.
    fn touch(&mut self) {
        self.dirty = true;
        self.generation += 1;
    }
}

const STATE_KEY: &str = "state";

/// The longest one ledger write may take.
const SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

async fn load(kv: &Kv) -> anyhow::Result<(State, Option<u64>)> {
    match kv.get(STATE_KEY).await? {
        Some(e) => Ok((serde_json::from_slice(&e.value)?, Some(e.revision))),
        None => Ok((State::default(), None)),
    }
}

/// The ledger's durable copy in JetStream KV. Saves are compare-and-set
/// and stamped with this process's writer id, so a conflict can tell this
/// process's own earlier write (one whose reply was lost in a NATS outage)
/// from a second cost-watcher's.
struct Store {
    kv: Kv,
    shared: Arc<Mutex<Shared>>,
    /// Unique per process start.
    writer: String,
    /// One save at a time: the ticker, the report handler and shutdown all save.
    saving: tokio::sync::Mutex<()>,
    conflicts: prometheus_client::metrics::counter::Counter,
    /// Saves that failed for any reason (NATS unreachable, a second writer).
    save_failures: prometheus_client::metrics::counter::Counter,
    /// The lease this instance books under: no save once it has ended.
    fence: Option<costmesh_runtime::lease::Fence>,
}

impl Store {
    /// Saves the state if it changed. On a revision conflict it reads the
    /// stored copy: if this process wrote it (the reply was lost), it takes
    /// that revision and saves again, since the in-memory state holds every
    /// change since; if another writer did, that is an error.
    async fn save(&self) -> anyhow::Result<()> {
        if let Some(f) = &self.fence {
            f.check().map_err(|e| anyhow::anyhow!("ledger not saved: {e}"))?;
        }
        let r = self.try_save().await;
        if r.is_err() {
            self.save_failures.inc();
        }
        r
    }

    async fn try_save(&self) -> anyhow::Result<()> {
        let _one = self.saving.lock().await;
        for _ in 0..3 {
            let (bytes, rev, generation) = {
                let mut s = self.shared.lock().expect("state lock");
                if !s.dirty {
                    return Ok(());
                }
                s.state.writer = Some(self.writer.clone());
                (Bytes::from(serde_json::to_vec(&s.state)?), s.revision, s.generation)
            };
            // A write sent during a NATS outage waits for the client's request
            // timeout; a short bound lets the next evaluation save again soon
            // after the reconnect instead.
            let write = async {
                match rev {
                    Some(r) => self.kv.update(STATE_KEY, bytes, r).await,
                    None => self.kv.create(STATE_KEY, bytes).await,
                }
            };
            let r = match tokio::time::timeout(SAVE_TIMEOUT, write).await {
                Ok(r) => r,
                Err(_) => anyhow::bail!("ledger save timed out after {SAVE_TIMEOUT:?} (NATS unreachable?)"),
            };
            match r {
                Ok(new) => {
                    let mut s = self.shared.lock().expect("state lock");
                    s.revision = Some(new);
                    if s.generation == generation {
                        s.dirty = false;
                    }
                    return Ok(());
                }
                Err(e) if matches!(e.kind, BusErrorKind::WrongRevision | BusErrorKind::AlreadyExists) => {
                    let stored = self.kv.get(STATE_KEY).await?;
                    let (writer, stored_rev) = match &stored {
                        Some(entry) => (
                            serde_json::from_slice::<State>(&entry.value).ok().and_then(|s| s.writer),
                            Some(entry.revision),
                        ),
                        None => (None, None),
                    };
                    if writer.as_deref() == Some(self.writer.as_str()) || stored.is_none() {
                        tracing::info!(revision = ?stored_rev, "ledger save conflicted with this process's own earlier write (its reply was lost); saving again on top of it");
                        self.shared.lock().expect("state lock").revision = stored_rev;
                        continue;
                    }
                    self.conflicts.inc();
                    anyhow::bail!(
                        "another cost-watcher ({}) wrote the ledger state ({e}); run one active cost-watcher per prefix",
                        writer.unwrap_or_else(|| "unknown writer".into())
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("ledger save kept conflicting with this process's own writes")
    }
}

fn money(micros: i64, currency: &str) -> Option<Money> {
    Some(Money { currency_code: currency.to_string(), micros })
}

/// Budget changes published in one tick at most (each warning threshold and
/// the exceeded one, for every budget, fit well within it).
const MAX_STEPS_PER_TICK: usize = 32;

/// One evaluation: rollover, forecast, budgets. Returns the budget events
/// to publish (with their ids).
fn evaluate(
    cfg: &Config,
    s: &mut State,
    now: DateTime<Utc>,
    tz: chrono_tz::Tz,
    currency: &str,
    m: &Metrics,
) -> Vec<(String, BudgetEvent, Option<String>)> {
    let period = ledger::period_of(now, tz);
    let price = cfg.electricity_price_per_kwh;
    // Month rollover: score the mid-month forecast against what was spent.
    if let Some(prev) = s.current_period.clone().filter(|p| *p != period) {
        let actual = s.period_total(&prev, price);
        if let Some(f) = s.mid_month_forecast.get(&prev).copied() {
            if actual > 0 {
                let err = (f - actual).abs() as f64 / actual as f64;
                s.forecast_error.insert(prev.clone(), err);
                m.forecast_error.set(err);
                tracing::info!(period = %prev, forecast = f as f64 / 1e6, actual = actual as f64 / 1e6, error = err, "month closed: forecast scored");
            }
        }
    }
    if let Some(prev) = s.current_period.clone().filter(|p| *p != period) {
        s.attribution.close(&prev, cfg.attribution_months);
        s.inference.keep_months(cfg.attribution_months);
        s.inference.forget_seen_before(now - chrono::Duration::days(1));
        tracing::info!(period = %prev, "month closed: its attribution is final");
        // Last month's teams, nodes and routes are not this month's.
        for f in [&m.team_cost, &m.team_energy, &m.team_gpu_hours, &m.team_carbon] {
            f.clear();
        }
        m.idle_cost.clear();
        m.route_cost.clear();
        m.cache_saved.clear();
    }
    s.current_period = Some(period.clone());
    set_attribution_gauges(s, &period, m);
    let spent = s.period_total(&period, price);
    if let Some((start, end)) = ledger::period_bounds(&period, tz) {
        let f = ledger::forecast(spent, now, start, end);
        m.forecast.set(f as f64 / 1e6);
        m.forecast_over_budget.set(f as f64 / (cfg.monthly_budget * 1e6).max(1.0));
        if now >= start + (end - start) / 2 && !s.mid_month_forecast.contains_key(&period) {
            s.mid_month_forecast.insert(period.clone(), f);
        }
    }
    for scope in ledger::SCOPES {
        let v = if *scope == "local" { s.electricity(&period, price) } else { s.scope_total(&period, scope) };
        m.month_cost.get_or_create(&ScopeLabels { scope: scope.to_string() }).set(v as f64 / 1e6);
    }
    let budget_micros = (cfg.monthly_budget * 1e6).round() as i64;
    let k = crate::kpi::compute(s, &period, price, budget_micros);
    for (name, v) in [
        ("cost_per_training_hour", k.cost_per_training_hour),
        ("cost_per_inference_request", k.cost_per_inference_request),
        ("cache_hit_rate", k.cache_hit_rate),
        ("gpu_utilisation", k.gpu_utilisation),
        ("gpu_mean_utilisation", k.gpu_mean_utilisation),
        ("storage_utilisation", k.storage_utilisation),
        ("network_share", k.network_share),
        ("budget_execution", k.budget_execution),
        ("forecast_accuracy", k.forecast_accuracy),
    ] {
        if let Some(v) = v {
            m.kpi.get_or_create(&KpiLabels { kpi: name.into() }).set(v);
        }
    }
    let mut track = s.budgets.remove(MONTHLY);
    budget::evaluate(&mut track, &period, spent, budget_micros, &cfg.warn_thresholds());
    let t = track.expect("evaluate always leaves a track");
    let labels = BudgetLabels { budget: MONTHLY.into() };
    m.budget_state.get_or_create(&labels).set(t.state as i64 - 1);
    m.budget_ratio.get_or_create(&labels).set(spent as f64 / budget_micros.max(1) as f64);
    set_elapsed(m, &labels, &period, now, tz);
    let mut out = Vec::new();
    if t.pending {
        out.push((t.event_id(MONTHLY), budget_event("total", MONTHLY, &t, now, currency), None));
    }
    s.budgets.insert(MONTHLY.into(), t);
    // GCP budgets: their own amounts, their own running totals.
    let gcp: Vec<(String, crate::ledger::GcpBudget)> =
        s.gcp_budgets.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (id, b) in gcp {
        let key = format!("gcp:{id}");
        let mut track = s.budgets.remove(&key);
        budget::evaluate(&mut track, &b.period, b.spent_micros, b.budget_micros, &cfg.warn_thresholds());
        let t = track.expect("evaluate always leaves a track");
        let labels = BudgetLabels { budget: b.name.clone() };
        m.budget_state.get_or_create(&labels).set(t.state as i64 - 1);
        m.budget_ratio.get_or_create(&labels).set(b.spent_micros as f64 / b.budget_micros.max(1) as f64);
        set_elapsed(m, &labels, &b.period, now, tz);
        if t.pending {
            let ev = budget_event("cloud", &b.name, &t, now, currency);
            out.push((t.event_id(&key.replace(':', "-")), ev, b.trace.clone()));
        }
        s.budgets.insert(key, t);
    }
    out
}

/// The attributed figures of `period`: per team (idle as its own team),
/// idle cost per node, inference cost and cache savings per route.
fn set_attribution_gauges(s: &State, period: &str, m: &Metrics) {
    let mut carbon = 0u64;
    for (team, a) in s.attribution.by_team(period) {
        let l = TeamLabels { team };
        m.team_cost.get_or_create(&l).set(a.cost_micros() as f64 / 1e6);
        m.team_energy.get_or_create(&l).set(a.energy_mj as f64 / 3.6e9);
        m.team_gpu_hours.get_or_create(&l).set(a.gpu_ms as f64 / 3.6e6);
        m.team_carbon.get_or_create(&l).set(a.carbon_mg as f64 / 1e6);
        carbon += a.carbon_mg;
    }
    m.carbon_kg.set(carbon as f64 / 1e6);
    for (node, b) in s.attribution.nodes(period) {
        let idle = b.rows.get(crate::attribution::IDLE).map_or(0, |a| a.cost_micros());
        m.idle_cost.get_or_create(&NodeLabels { node: node.clone() }).set(idle as f64 / 1e6);
    }
    m.cloud_booked.set(s.attribution.cloud_booked(period) as f64 / 1e6);
    let mut routes: std::collections::BTreeMap<&String, (i64, i64)> = Default::default();
    for (route, _, b) in s.inference.period(period) {
        let e = routes.entry(route).or_default();
        e.0 += b.cost_micros;
        e.1 += b.saved_micros;
    }
    for (route, (cost, saved)) in routes {
        let l = RouteLabels { route: route.clone() };
        m.route_cost.get_or_create(&l).set(cost as f64 / 1e6);
        m.cache_saved.get_or_create(&l).set(saved as f64 / 1e6);
    }
}

/// Books one GPU sample: its energy growth into the month's ledger, and
/// its energy, GPU time and (on a cloud node) node time to the job attempt
/// it names or to the node's idle row. Returns whether anything changed
/// and whether the sample started a new energy counter.
#[allow(clippy::too_many_arguments)]
pub fn on_sample(
    st: &mut State,
    cfg: &Config,
    s: &GpuSample,
    at: DateTime<Utc>,
    tz: chrono_tz::Tz,
    intensity: &crate::carbon::Intensity,
) -> (bool, crate::energy::Observed) {
    let price = cfg.electricity_price_per_kwh;
    let period = ledger::period_of(at, tz);
    let key = format!("{}/{}", s.node, s.gpu_index);
    let prev = st.last_sample.insert(key.clone(), at);
    let mut gpu_ms = 0u64;
    if let Some(prev) = prev.filter(|p| *p < at) {
        // Weigh by time since the GPU's last sample, capped so an agent
        // outage does not count as busy (or held) time.
        let ms = (at - prev).num_milliseconds().min(MAX_SAMPLE_GAP_MS);
        gpu_ms = ms as u64;
        let dt = ms as f64 / 1000.0;
        let u = st.usage.entry(period.clone()).or_default();
        u.gpu_seconds += dt;
        u.util_pct_seconds += s.utilization_gpu_pct as f64 * dt;
        if s.utilization_gpu_pct >= 10 {
            u.busy_gpu_seconds += dt;
        }
    } else if prev.is_some_and(|p| p > at) {
        st.last_sample.insert(key, prev.unwrap_or(at));
    }
    let observed = st.energy.record(&s.node, s.gpu_index, &s.boot_id, s.energy_mj);
    let added = observed.added();
    let mut changed = false;
    let price_now = if cfg.tariff.is_flat() { price } else { cfg.tariff.price_at(at, tz, price) };
    if added > 0 {
        if cfg.tariff.is_flat() {
            *st.energy_mj.entry(period.clone()).or_default() += added;
        } else {
            // Priced at the time the energy was reported.
            *st.tou_cost_micros.entry(period.clone()).or_default() += added as f64 * price_now / 3_600.0;
        }
        changed = true;
    }
    let cloud = if s.cloud {
        cfg.cloud_price_micros(&s.node, &s.machine_type, s.preemptible)
            .map(|p| crate::attribution::CloudRate { micros_per_hour: p, gpus: s.node_gpu_count.max(1) })
    } else {
        None
    };
    let holder = (!s.job_id.is_empty()).then(|| crate::attribution::Holder {
        job_id: &s.job_id,
        attempt: s.job_attempt,
        team: &s.job_team,
    });
    let booked = st.attribution.book(&crate::attribution::Delta {
        period: &period,
        node: &s.node,
        holder,
        energy_mj: added,
        gpu_ms,
        price_micros_per_kwh: (price_now * 1e6).round().max(0.0) as u64,
        carbon_mg_per_kwh: intensity.mg_per_kwh_at(at),
        cloud,
        preemptible: s.preemptible,
        machine_type: &s.machine_type,
    });
    (changed || !booked.is_zero() || holder.is_some(), observed)
}

/// The longest gap between two samples of a GPU that counts as time.
const MAX_SAMPLE_GAP_MS: i64 = 300_000;

/// The `JobCost` of a job as its record stands.
fn job_cost(id: &str, j: &crate::attribution::JobRecord, now: DateTime<Utc>, currency: &str) -> JobCost {
    JobCost {
        job_id: id.to_string(),
        team: j.team.clone(),
        labels: j.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        cost: money(j.total.cost_micros(), currency),
        electricity: money(j.total.electricity_micros, currency),
        cloud: money(j.total.cloud_micros, currency),
        energy_mj: j.total.energy_mj,
        gpu_ms: j.total.gpu_ms,
        carbon_mg: j.total.carbon_mg,
        attempts: j.attempts.iter().copied().collect(),
        nodes: j.nodes.iter().cloned().collect(),
        outcome: j
            .ended
            .as_ref()
            .and_then(|e| JobEventKind::from_str_name(&e.kind))
            .unwrap_or(JobEventKind::Unspecified) as i32,
        ended_at: j.ended.as_ref().map(|e| costmesh_contracts::timestamp(e.at)),
        time: Some(costmesh_contracts::timestamp(now)),
    }
}

/// The share of `period` elapsed at `now` (0 to 1, to the second).
fn set_elapsed(m: &Metrics, labels: &BudgetLabels, period: &str, now: DateTime<Utc>, tz: chrono_tz::Tz) {
    if let Some((start, end)) = ledger::period_bounds(period, tz) {
        let share = (now - start).num_seconds() as f64 / (end - start).num_seconds().max(1) as f64;
        m.period_elapsed.get_or_create(labels).set(share.clamp(0.0, 1.0));
    }
}

fn budget_event(scope: &str, name: &str, t: &budget::BudgetTrack, now: DateTime<Utc>, currency: &str) -> BudgetEvent {
    BudgetEvent {
        scope: scope.into(),
        budget_name: name.into(),
        state: t.state,
        previous_state: t.previous,
        spent: money(t.spent_micros, currency),
        budget: money(t.budget_micros, currency),
        threshold: t.threshold,
        period: t.period.clone(),
        reason: format!(
            "spent {:.2} of {:.2} {currency} ({:.1} %) in {}",
            t.spent_micros as f64 / 1e6,
            t.budget_micros as f64 / 1e6,
            t.spent_micros as f64 / t.budget_micros.max(1) as f64 * 100.0,
            t.period
        ),
        time: Some(costmesh_contracts::timestamp(now)),
    }
}

/// The month so far, as `costmesh cost` prints it.
pub fn summary(s: &State, cfg: &Config, now: DateTime<Utc>, tz: chrono_tz::Tz, currency: &str) -> serde_json::Value {
    let period = ledger::period_of(now, tz);
    let price = cfg.electricity_price_per_kwh;
    let budget_micros = (cfg.monthly_budget * 1e6).round() as i64;
    let scopes: serde_json::Map<String, serde_json::Value> = ledger::SCOPES
        .iter()
        .map(|sc| {
            let v = if *sc == "local" { s.electricity(&period, price) } else { s.scope_total(&period, sc) };
            (sc.to_string(), serde_json::json!(v as f64 / 1e6))
        })
        .collect();
    let spent = s.period_total(&period, price);
    let forecast = ledger::period_bounds(&period, tz).map(|(a, b)| ledger::forecast(spent, now, a, b) as f64 / 1e6);
    let budgets: Vec<serde_json::Value> = s
        .budgets
        .iter()
        .map(|(k, t)| {
            serde_json::json!({"budget": k, "period": t.period, "state": t.state().as_str_name(), "spent": t.spent_micros as f64 / 1e6, "amount": t.budget_micros as f64 / 1e6})
        })
        .collect();
    serde_json::json!({
        "period": period,
        "currency": currency,
        "cost": scopes,
        "total": spent as f64 / 1e6,
        "budget": cfg.monthly_budget,
        "forecast_month_end": forecast,
        "budgets": budgets,
        "kpis": crate::kpi::compute(s, &period, price, budget_micros),
        "energy_kwh": s.energy.total_kwh(),
        "attribution": {
            "cloud_node_cost": s.attribution.cloud_booked(&period) as f64 / 1e6,
            "idle_cost": s.attribution.by_team(&period).get(crate::attribution::IDLE).map_or(0, |a| a.cost_micros()) as f64 / 1e6,
            "carbon_kg": s.attribution.by_team(&period).values().map(|a| a.carbon_mg).sum::<u64>() as f64 / 1e6,
            "saved_by_cache": s.inference.period(&period).map(|(_, _, b)| b.saved_micros).sum::<i64>() as f64 / 1e6,
        },
    })
}

/// How much a gateway's cumulative counter grew since it was last seen
/// (`seen`: instance -> (started_at, value)); a restarted gateway, or one
/// seen for the first time, counts from zero since its start.
fn growth(seen: &mut std::collections::BTreeMap<String, (i64, u64)>, instance: &str, started: i64, value: u64) -> u64 {
    let prev = seen.get(instance).copied();
    let added = match prev {
        Some((s0, v0)) if s0 == started => value.saturating_sub(v0),
        Some(_) | None => value,
    };
    if prev.is_none_or(|(s0, v0)| s0 != started || value > v0) {
        seen.insert(instance.to_string(), (started, value));
    }
    added
}

/// Runs the cost-watcher until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let m = Metrics::default();
    ctx.register("costmesh_energy_kwh", "GPU energy accounted since the ledger began (kWh)", m.energy_kwh.clone());
    ctx.register(
        "costmesh_electricity_cost",
        "Electricity cost this month, ledger currency",
        m.electricity_cost.clone(),
    );
    ctx.register("costmesh_month_cost", "Cost this month by scope, ledger currency", m.month_cost.clone());
    ctx.register("costmesh_budget_state", "Budget state: 0 ok, 1 warning, 2 exceeded", m.budget_state.clone());
    ctx.register("costmesh_budget_spent_ratio", "Spend over budget this month", m.budget_ratio.clone());
    ctx.register(
        "costmesh_budget_period_elapsed_ratio",
        "Share of the budget's period elapsed, in the ledger's time zone, to the second (the burn-rate alert divides by it)",
        m.period_elapsed.clone(),
    );
    ctx.register("costmesh_forecast_month_end", "Forecast of this month's total spend", m.forecast.clone());
    ctx.register(
        "costmesh_forecast_over_budget_ratio",
        "Month-end forecast over the monthly budget",
        m.forecast_over_budget.clone(),
    );
    ctx.register("costmesh_kpi", "The seed's KPIs this month (see docs/kpis.md); absent when undefined", m.kpi.clone());
    ctx.register(
        "costmesh_team_cost",
        "Attributed cost this month by team (electricity + cloud node time; idle as team __idle__)",
        m.team_cost.clone(),
    );
    ctx.register("costmesh_team_energy_kwh", "Attributed GPU energy this month by team (kWh)", m.team_energy.clone());
    ctx.register("costmesh_team_gpu_hours", "GPU-hours held this month by team", m.team_gpu_hours.clone());
    ctx.register("costmesh_team_carbon_kg", "Attributed emissions this month by team (kg CO2e)", m.team_carbon.clone());
    ctx.register("costmesh_idle_cost", "Cost of GPU time no job held this month, by node", m.idle_cost.clone());
    ctx.register("costmesh_route_cost", "Inference backend cost this month by route", m.route_cost.clone());
    ctx.register("costmesh_cache_saved", "Backend cost the cache avoided this month by route", m.cache_saved.clone());
    ctx.register("costmesh_carbon_kg", "Emissions of GPU energy this month (kg CO2e)", m.carbon_kg.clone());
    ctx.register(
        "costmesh_cloud_node_cost",
        "Cloud node time this month at the configured hourly prices (the GCP bill stays the cloud figure)",
        m.cloud_booked.clone(),
    );
    ctx.register(
        "costmesh_forecast_error_ratio",
        "Error of last month's mid-month forecast: |forecast - actual| / actual",
        m.forecast_error.clone(),
    );

    let conflicts = prometheus_client::metrics::counter::Counter::default();
    ctx.register(
        "costmesh_cost_watcher_ledger_conflicts",
        "Ledger saves refused because another cost-watcher wrote the state",
        conflicts.clone(),
    );
    let save_failures = prometheus_client::metrics::counter::Counter::default();
    ctx.register(
        "costmesh_cost_watcher_ledger_save_failures",
        "Ledger saves that failed (retried at the next evaluation)",
        save_failures.clone(),
    );
    // Of several cost-watchers on one prefix, the one holding the lease
    // books and decides; the others stand by.
    costmesh_runtime::lease::run_when_active(ctx, "cost-watcher", |ctx| {
        act(cfg.clone(), ctx, m.clone(), conflicts.clone(), save_failures.clone())
    })
    .await
}

/// The cost-watcher while it holds the lease: the ledger loaded, telemetry
/// and bills booked, budgets evaluated, until shutdown or the lease is lost.
async fn act(
    cfg: Config,
    ctx: ServiceContext,
    m: Metrics,
    conflicts: prometheus_client::metrics::counter::Counter,
    save_failures: prometheus_client::metrics::counter::Counter,
) -> anyhow::Result<()> {
    let tz = ctx.mesh.tz();
    let currency = ctx.mesh.currency.clone();
    ctx.events.ensure_stream().await?;
    let bucket = costmesh_runtime::service::kv_bucket(ctx.subjects(), "cost_watcher");
    let kv = ctx.bus().kv(&bucket).await?;
    let (state, revision) = load(&kv).await?;
    tracing::info!(
        bucket,
        restored = revision.is_some(),
        ?revision,
        energy_mj = state.energy.total_mj(),
        "ledger state loaded"
    );
    let shared = Arc::new(Mutex::new(Shared { state, revision, dirty: false, generation: 0 }));
    let store = Arc::new(Store {
        kv,
        shared: shared.clone(),
        writer: format!("cost-watcher-{}", uuid::Uuid::now_v7()),
        saving: tokio::sync::Mutex::new(()),
        conflicts,
        save_failures,
        fence: ctx.events.fence.clone(),
    });

    // Asks the main loop for a save before the next evaluation.
    let save_soon = Arc::new(tokio::sync::Notify::new());
    // One cost-watcher of a group accounts each sample.
    let sub = ctx.bus().queue_subscribe(&ctx.subjects().gpu_telemetry_all(), "cost-watcher").await?;
    ctx.bus().flush().await?;
    let intensity = crate::carbon::Intensity::fixed(cfg.carbon.intensity_g_per_kwh);
    tokio::spawn(crate::carbon::follow(cfg.carbon.clone(), intensity.clone(), ctx.shutdown.clone()));
    {
        let (events, shutdown, shared, m, price) =
            (ctx.events.clone(), ctx.shutdown.clone(), shared.clone(), m.clone(), cfg.electricity_price_per_kwh);
        let clock = ctx.clock.clone();
        let (cfg, intensity) = (Arc::new(cfg.clone()), intensity.clone());
        let save_soon = save_soon.clone();
        tokio::spawn(async move {
            events
                .consume_core::<GpuSample, _, _>(sub, shutdown, move |_, meta, s| {
                    let (shared, m, clock, cfg, intensity, save_soon) =
                        (shared.clone(), m.clone(), clock.clone(), cfg.clone(), intensity.clone(), save_soon.clone());
                    async move {
                        if s.boot_id.is_empty() {
                            return Err(HandlerError::Reject(
                                "GpuSample without boot_id: energy cannot be accounted".into(),
                            ));
                        }
                        let at = s
                            .time
                            .as_ref()
                            .and_then(costmesh_contracts::from_timestamp)
                            .or(meta.time)
                            .unwrap_or_else(|| clock.now());
                        let mut sh = shared.lock().expect("state lock");
                        let (changed, observed) = on_sample(&mut sh.state, &cfg, &s, at, tz, &intensity);
                        if observed == crate::energy::Observed::Late {
                            tracing::info!(node = %s.node, gpu = s.gpu_index, boot_id = %s.boot_id, energy_mj = s.energy_mj, "sample of a finished counter (the GPU's agent restarted since) arrived late; not booked");
                        }
                        if matches!(observed, crate::energy::Observed::NewCounter(_)) {
                            tracing::info!(node = %s.node, gpu = s.gpu_index, boot_id = %s.boot_id, energy_mj = s.energy_mj, "new energy counter");
                            // A new counter's baseline: saved at once, or a
                            // restart would take a later sample as the
                            // baseline and never book the energy between.
                            sh.touch();
                            save_soon.notify_one();
                        }
                        if changed {
                            sh.touch();
                        }
                        let period = ledger::period_of(at, tz);
                        m.energy_kwh.set(sh.state.energy.total_kwh());
                        m.electricity_cost.set(sh.state.electricity(&period, price) as f64 / 1e6);
                        Ok(())
                    }
                })
                .await
        });
    }
    // The scheduler's job events: each job's team and labels, and its end
    // (which makes its `JobCost` due). Saved before the ack.
    {
        let (shared, store, clock) = (shared.clone(), store.clone(), ctx.clock.clone());
        ctx.spawn_durable::<JobEvent, _, _>("jobs", vec![ctx.subjects().jobs_all()], move |_, meta, e| {
            let (shared, store, clock) = (shared.clone(), store.clone(), clock.clone());
            async move {
                // Agents publish their own view of an attempt; only the
                // scheduler decides that a job has ended.
                if !meta.source.starts_with("scheduler") {
                    return Ok(());
                }
                let kind = e.kind();
                let at = e
                    .time
                    .as_ref()
                    .and_then(costmesh_contracts::from_timestamp)
                    .or(meta.time)
                    .unwrap_or_else(|| clock.now());
                let ended =
                    matches!(kind, JobEventKind::Exited | JobEventKind::Failed | JobEventKind::Cancelled).then(|| {
                        crate::attribution::Ended {
                            kind: kind.as_str_name().to_string(),
                            at,
                            trace: costmesh_runtime::telemetry::current_traceparent(),
                        }
                    });
                let attempt = if kind == JobEventKind::Assigned { e.attempt } else { 0 };
                let labels = e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                shared
                    .lock()
                    .expect("state lock")
                    .state
                    .attribution
                    .job_event(&e.job_id, &e.team, &labels, attempt, ended);
                shared.lock().expect("state lock").touch();
                store.save().await.map_err(|e| HandlerError::Retry(format!("ledger not saved: {e:#}")))
            }
        })
        .await?;
    }
    // Storage reports book storage cost (the monthly rate, prorated to the
    // time since the previous report); cache statistics count requests.
    {
        let (shared, tz2, store, clock) = (shared.clone(), tz, store.clone(), ctx.clock.clone());
        ctx.spawn_durable::<costmesh_contracts::AnyEvent, _, _>(
            "reports",
            vec![ctx.subjects().storage_report()],
            move |_, meta, event| {
                let (shared, store, clock) = (shared.clone(), store.clone(), clock.clone());
                async move {
                    let costmesh_contracts::AnyEvent::StorageReport(r) = event else {
                        return Err(HandlerError::Reject("not a StorageReport".into()));
                    };
                    let at = r
                        .time
                        .as_ref()
                        .and_then(costmesh_contracts::from_timestamp)
                        .or(meta.time)
                        .unwrap_or_else(|| clock.now());
                    let monthly: i64 = r.usage.iter().filter_map(|u| u.monthly_cost.as_ref()).map(|c| c.micros).sum();
                    {
                        let mut sh = shared.lock().expect("state lock");
                        if let Some((_, _, prev)) = sh.state.storage {
                            if at > prev {
                                let period = ledger::period_of(at, tz2);
                                if let Some((start, end)) = ledger::period_bounds(&period, tz2) {
                                    let share = (at - prev).num_seconds() as f64 / (end - start).num_seconds() as f64;
                                    sh.state.add(&period, "storage", (monthly as f64 * share).round() as i64);
                                }
                            }
                        }
                        if sh.state.storage.is_none_or(|(_, _, prev)| at >= prev) {
                            sh.state.storage = Some((r.used_bytes, r.provisioned_bytes, at));
                        }
                        sh.touch();
                    }
                    // Saved before the ack: a kill after the ack loses nothing,
                    // and a redelivery (same report time) books nothing twice.
                    store.save().await.map_err(|e| HandlerError::Retry(format!("ledger not saved: {e:#}")))
                }
            },
        )
        .await?;
    }
    {
        let sub = ctx.bus().queue_subscribe(&ctx.subjects().cache_stats(), "cost-watcher").await?;
        let (events, shutdown, shared, clock) =
            (ctx.events.clone(), ctx.shutdown.clone(), shared.clone(), ctx.clock.clone());
        let prices = Arc::new(cfg.route_prices());
        tokio::spawn(async move {
            events
                .consume_core::<costmesh_contracts::v1::CacheStats, _, _>(sub, shutdown, move |_, _, c| {
                    let (shared, clock, prices) = (shared.clone(), clock.clone(), prices.clone());
                    async move {
                        let started = c.started_at.as_ref().map(|t| t.seconds).unwrap_or(0);
                        let requests: u64 = c.routes.iter().map(|r| r.requests).sum();
                        let answers: u64 = c.routes.iter().map(|r| r.hits + r.stale).sum();
                        let now = clock.now();
                        let period = ledger::period_of(now, tz);
                        let mut sh = shared.lock().expect("state lock");
                        sh.state.inference.book(&period, &c.instance, started, &c.routes, &prices, now);
                        let added = growth(&mut sh.state.cache_seen, &c.instance, started, requests);
                        let answered = growth(&mut sh.state.cache_hits_seen, &c.instance, started, answers);
                        let u = sh.state.usage.entry(period).or_default();
                        u.inference_requests += added;
                        u.cache_answers += answered;
                        sh.touch();
                        Ok(())
                    }
                })
                .await
        });
    }
    // `costmesh cost` asks here.
    {
        let (shared, clock, cfg2, currency2) = (shared.clone(), ctx.clock.clone(), cfg.clone(), currency.clone());
        answer_requests(&ctx, "summary", move |_| {
            let sh = shared.lock().expect("state lock");
            summary(&sh.state, &cfg2, clock.now(), tz, &currency2)
        })
        .await?;
    }
    // `costmesh cost --by ...` asks here.
    {
        let (shared, clock, currency2) = (shared.clone(), ctx.clock.clone(), currency.clone());
        answer_requests(&ctx, "attribution", move |body| {
            let sh = shared.lock().expect("state lock");
            attribution_answer(&sh.state, body, ledger::period_of(clock.now(), tz), &currency2)
        })
        .await?;
    }
    let billing = (!cfg.billing.subscription.is_empty())
        .then(|| tokio::spawn(consume_billing(cfg.billing.clone(), ctx.clone(), store.clone(), currency.clone(), tz)));
    ctx.bus_ready().await?;

    let mut ticker = ctx.clock.ticker(cfg.evaluate_interval);
    loop {
        let now = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            t = ticker.tick() => t,
            _ = save_soon.notified() => {
                if let Err(e) = store.save().await {
                    tracing::error!(error = format!("{e:#}"), "saving the ledger state failed");
                }
                continue;
            }
        };
        // A budget moves one threshold per change: after publishing, the
        // next evaluation finds the next one (a jump past 100 % is the
        // warning, then the exceeded event).
        for _ in 0..MAX_STEPS_PER_TICK {
            let pending = {
                let mut sh = shared.lock().expect("state lock");
                let before = serde_json::to_vec(&sh.state.budgets).unwrap_or_default();
                let (mid_before, err_before, period_before) =
                    (sh.state.mid_month_forecast.len(), sh.state.forecast_error.len(), sh.state.current_period.clone());
                let pending = evaluate(&cfg, &mut sh.state, now, tz, &currency, &m);
                let changed = serde_json::to_vec(&sh.state.budgets).unwrap_or_default() != before
                    || sh.state.mid_month_forecast.len() != mid_before
                    || sh.state.forecast_error.len() != err_before
                    || sh.state.current_period != period_before;
                if changed {
                    sh.touch();
                }
                pending
            };
            // Save the change as pending before publishing it: a crash between
            // the two re-publishes the same id, which JetStream drops.
            if let Err(e) = store.save().await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "saving the ledger state failed; budget events wait for a save"
                );
                break;
            }
            if pending.is_empty() {
                break;
            }
            let mut published = 0;
            for (id, ev, trace) in pending {
                let subject = ctx.subjects().budget(&ev.scope, ev.state());
                // A GCP budget's event joins the trace of the notification behind it.
                let publish = ctx.events.publish_durable_with_id(&subject, &ev, &id);
                match costmesh_runtime::telemetry::resume(trace, publish).await {
                    Ok(ack) => {
                        tracing::warn!(budget = %ev.budget_name, state = ev.state().as_str_name(), duplicate = ack.duplicate, reason = %ev.reason, "budget state changed");
                        let mut sh = shared.lock().expect("state lock");
                        for t in sh.state.budgets.values_mut() {
                            if t.pending
                                && t.period == ev.period
                                && t.state == ev.state
                                && t.spent_micros == ev.spent.as_ref().map_or(0, |m| m.micros)
                            {
                                t.pending = false;
                            }
                        }
                        sh.touch();
                        published += 1;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "budget event publish failed; retried at the next evaluation")
                    }
                }
            }
            if published == 0 {
                break;
            }
        }
        publish_job_costs(&ctx, &store, &cfg, now, &currency).await;
        if let Err(e) = store.save().await {
            tracing::error!(error = format!("{e:#}"), "saving the ledger state failed");
        }
    }
    // The Pub/Sub subscriber hands back what it holds before the last save.
    if let Some(b) = billing {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(6), b).await;
    }
    // A last save, so what was booked since the last tick survives a restart.
    match tokio::time::timeout(std::time::Duration::from_secs(5), store.save()).await {
        Ok(Ok(())) => tracing::info!("ledger state saved at shutdown"),
        Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "saving the ledger state at shutdown failed"),
        Err(_) => tracing::error!("saving the ledger state at shutdown timed out"),
    }
    Ok(())
}

/// Answers an attribution request: `{"by": "team", "month": "2026-12"}`
/// (month: the current one when absent) with a [`crate::report::Report`],
/// or `{"error": ...}` naming what was wrong.
/// Answers `<prefix>.api.cost-watcher.<verb>` with the JSON `answer` gives
/// for each request's body, until shutdown.
async fn answer_requests<F>(ctx: &ServiceContext, verb: &str, answer: F) -> anyhow::Result<()>
where
    F: Fn(&[u8]) -> serde_json::Value + Send + 'static,
{
    let mut sub = ctx.bus().subscribe(&ctx.subjects().api("cost-watcher", verb)).await?;
    let (bus, shutdown) = (ctx.bus().clone(), ctx.shutdown.clone());
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let body = answer(&msg.payload);
            let mut h = costmesh_bus::Headers::new();
            h.insert("content-type", "application/json");
            let _ = bus.respond(&msg, h, Bytes::from(body.to_string())).await;
        }
    });
    Ok(())
}

fn attribution_answer(s: &State, payload: &[u8], current: String, currency: &str) -> serde_json::Value {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        by: String,
        #[serde(default)]
        month: Option<String>,
    }
    let ask: Ask = match serde_json::from_slice(payload) {
        Ok(a) => a,
        Err(e) => {
            return serde_json::json!({"error": format!("request body: {e} (expected {{\"by\": ..., \"month\": \"YYYY-MM\"}})")})
        }
    };
    let by = match ask.by.parse::<crate::report::By>() {
        Ok(b) => b,
        Err(e) => return serde_json::json!({ "error": e }),
    };
    let period = match ask.month.as_deref().map(crate::report::parse_month) {
        None => current,
        Some(Ok(p)) => p,
        Some(Err(e)) => return serde_json::json!({ "error": e }),
    };
    serde_json::to_value(crate::report::build(s, by, &period, currency)).unwrap_or_default()
}

/// Publishes the `JobCost` of every job that ended at least
/// `job_cost_settle` ago: saved as pending first, under the id
/// `jobcost-<job>`, so a crash between the save and the publish sends the
/// same id again and JetStream drops the repeat; then marked sent.
async fn publish_job_costs(ctx: &ServiceContext, store: &Store, cfg: &Config, now: DateTime<Utc>, currency: &str) {
    let settle = chrono::Duration::from_std(cfg.job_cost_settle).unwrap_or_default();
    let due: Vec<(String, JobCost, Option<String>)> = {
        let mut sh = store.shared.lock().expect("state lock");
        let ids = sh.state.attribution.due_job_costs(now, settle);
        if ids.is_empty() {
            return;
        }
        sh.touch();
        ids.into_iter()
            .filter_map(|id| {
                let j = sh.state.attribution.jobs.get(&id)?;
                Some((id.clone(), job_cost(&id, j, now, currency), j.ended.as_ref().and_then(|e| e.trace.clone())))
            })
            .collect()
    };
    if let Err(e) = store.save().await {
        tracing::error!(error = format!("{e:#}"), "saving the ledger state failed; job costs wait for a save");
        return;
    }
    for (id, ev, trace) in due {
        let subject = ctx.subjects().job_cost(&id);
        let event_id = format!("jobcost-{id}");
        let publish = ctx.events.publish_durable_with_id(&subject, &ev, &event_id);
        match costmesh_runtime::telemetry::resume(trace, publish).await {
            Ok(ack) => {
                tracing::info!(job = %id, team = %ev.team, cost = ev.cost.as_ref().map_or(0, |m| m.micros) as f64 / 1e6, energy_kwh = ev.energy_mj as f64 / 3.6e9, attempts = ?ev.attempts, duplicate = ack.duplicate, "job cost published");
                let mut sh = store.shared.lock().expect("state lock");
                if let Some(j) = sh.state.attribution.jobs.get_mut(&id) {
                    j.cost_event = crate::attribution::CostEvent::Sent;
                }
                sh.touch();
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "job cost publish failed; retried at the next evaluation"),
        }
    }
}

/// Reads GCP budget notifications from Pub/Sub until shutdown: books cloud
/// spend, tracks each GCP budget, relays the notification onto NATS, and
/// dead-letters what it cannot read (then acks it: it is kept in the DLQ).
async fn consume_billing(
    cfg: crate::billing::BillingConfig,
    ctx: ServiceContext,
    store: Arc<Store>,
    currency: String,
    tz: chrono_tz::Tz,
) {
    let shared = store.shared.clone();
    // TLS to Google needs a crypto provider; ring is already in the build.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        let mut builder = google_cloud_pubsub::client::Subscriber::builder();
        if !cfg.endpoint.is_empty() {
            builder = builder.with_endpoint(cfg.endpoint.clone());
        }
        if cfg.credentials == "anonymous" {
            builder = builder.with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
        }
        let client = match builder.build().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Pub/Sub client could not be built");
                tokio::select! { _ = ctx.shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
                continue;
            }
        };
        tracing::info!(subscription = %cfg.subscription, "reading GCP budget notifications");
        // On shutdown, what this process holds goes back at once (nacked),
        // so the next cost-watcher gets it without waiting out a lease; a
        // killed one's leases (and anything the server sent to a stream
        // that was closing) lapse within the 10 s extension.
        let mut stream = client
            .subscribe(cfg.subscription.clone())
            .set_shutdown_behavior(google_cloud_pubsub::subscriber::ShutdownBehavior::NackImmediately)
            .set_max_lease_extension(std::time::Duration::from_secs(10))
            .build();
        let leases = stream.shutdown_token();
        loop {
            let item = tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    if tokio::time::timeout(std::time::Duration::from_secs(5), leases.shutdown()).await.is_err() {
                        tracing::warn!("Pub/Sub subscriber did not shut down within 5 s; its leases lapse on their own");
                    }
                    return;
                }
                i = stream.next() => i,
            };
            let (msg, handler) = match item {
                Some(Ok(x)) => x,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "Pub/Sub stream error");
                    break;
                }
                None => break,
            };
            backoff = std::time::Duration::from_secs(1);
            // The notification's handling starts a trace (or continues the
            // sender's, when its attributes carry a `traceparent`).
            let span = costmesh_runtime::telemetry::pubsub_span(
                "cost-watcher",
                &cfg.subscription,
                &msg.message_id,
                msg.data.len(),
                &msg.attributes,
            );
            let trace = costmesh_runtime::telemetry::traceparent_of(&span);
            match crate::billing::parse(&msg.data, &msg.attributes, &msg.message_id) {
                Err(why) => {
                    let headers = msg.attributes.iter().map(|(k, v)| (format!("pubsub-{k}"), v.clone())).collect();
                    let m = costmesh_bus::Message {
                        subject: format!("pubsub:{}", cfg.subscription),
                        reply: None,
                        headers,
                        payload: msg.data.clone(),
                    };
                    ctx.events.dead_letter(&m, "malformed_notification", &why).await;
                    handler.ack();
                }
                Ok(n) => {
                    let spent =
                        crate::billing::to_micros(n.cost_amount, &n.currency_code, &currency, &cfg.exchange_rates);
                    let budget =
                        crate::billing::to_micros(n.budget_amount, &n.currency_code, &currency, &cfg.exchange_rates);
                    let (spent, budget) = match (spent, budget) {
                        (Ok(s), Ok(b)) => (s, b),
                        (Err(why), _) | (_, Err(why)) => {
                            let m = costmesh_bus::Message {
                                subject: format!("pubsub:{}", cfg.subscription),
                                reply: None,
                                headers: Default::default(),
                                payload: msg.data.clone(),
                            };
                            ctx.events.dead_letter(&m, "unconvertible_currency", &why).await;
                            handler.ack();
                            continue;
                        }
                    };
                    let start = n
                        .cost_interval_start
                        .as_ref()
                        .and_then(costmesh_contracts::from_timestamp)
                        .unwrap_or_else(|| ctx.clock.now());
                    let period = ledger::period_of(start, tz);
                    {
                        let mut sh = shared.lock().expect("state lock");
                        sh.state.cloud_total(&period, spent);
                        let b = sh.state.gcp_budgets.entry(n.budget_id.clone()).or_default();
                        if b.period != period || spent > b.spent_micros {
                            *b = crate::ledger::GcpBudget {
                                name: n.budget_display_name.clone(),
                                period: period.clone(),
                                spent_micros: spent,
                                budget_micros: budget,
                                trace: trace.clone(),
                            };
                        }
                        sh.touch();
                    }
                    // Saved before the ack: an unsaved notification is not
                    // acked, so Pub/Sub sends it again.
                    if let Err(e) = store.save().await {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "ledger not saved; notification nacked for redelivery"
                        );
                        handler.nack();
                        continue;
                    }
                    let subject = ctx.subjects().billing_gcp(&n.budget_id);
                    let id = format!("gcp-{}", n.message_id);
                    let relay = ctx.events.publish_durable_with_id(&subject, &n, &id);
                    if let Err(e) = costmesh_runtime::telemetry::resume(trace.clone(), relay).await {
                        tracing::warn!(error = %e, "relaying the budget notification failed");
                    }
                    handler.ack();
                }
            }
        }
        tokio::select! { _ = ctx.shutdown.cancelled() => return, _ = tokio::time::sleep(backoff) => {} }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
    }
}
