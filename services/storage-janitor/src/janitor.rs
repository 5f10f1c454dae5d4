//! One janitor pass (scan, plan, apply when allowed, report), and the
//! service loop that runs passes on schedule, on a budget warning, and under
//! disk pressure.
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::{self, BudgetState, StorageActionTaken, StorageReport, StorageTier, StorageUsage};
use costmesh_contracts::AnyEvent;
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::apply::{self, Outcome};
use crate::archive::{self, Archive};
use crate::config::{Config, Rule};
use crate::plan::{self, Plan};
use crate::scan;

/// The result of one pass.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Pass {
    pub plan: Plan,
    /// None when the pass only planned.
    pub outcome: Option<Outcome>,
    pub report: serde_json::Value,
    #[serde(skip)]
    pub report_event: StorageReport,
}

/// Everything a pass needs.
pub struct Janitor {
    pub cfg: Config,
    pub rules: Vec<Rule>,
    pub archive: Archive,
    /// Paths running jobs use (from job events).
    pub in_use: Arc<Mutex<HashSet<PathBuf>>>,
}

fn money(amount: f64, currency: &str) -> v1::Money {
    v1::Money { currency_code: currency.to_string(), micros: (amount * 1e6).round() as i64 }
}

/// (used, total) bytes of the filesystem holding `path`.
pub fn filesystem_usage(path: &std::path::Path) -> Option<(u64, u64)> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let s = rustix::fs::statvfs(&p).ok()?;
    let total = s.f_blocks * s.f_frsize;
    let free = s.f_bfree * s.f_frsize;
    Some((total.saturating_sub(free), total))
}

impl Janitor {
    pub fn new(cfg: Config) -> Result<Self, String> {
        let rules = cfg.compiled_rules().map_err(|e| e.to_string())?;
        let location = archive::parse_store_url(&cfg.archive_url, &cfg.base_dir)?;
        let archive = Archive::open(location)?;
        Ok(Self { cfg, rules, archive, in_use: Default::default() })
    }

    /// Scans every root (in parallel) and builds the plan.
    pub async fn plan(&self, now: DateTime<Utc>) -> (Plan, HashSet<(u64, u64)>) {
        let roots: Vec<PathBuf> = self.rules.iter().map(|r| r.root.clone()).collect();
        // One root after another: each walk is parallel by itself (jwalk on
        // rayon's pool), and nesting rayon inside rayon would only contend.
        let (entries, open) = tokio::task::spawn_blocking(move || {
            let entries: Vec<Vec<scan::Entry>> = roots.iter().map(|r| scan::scan(r)).collect();
            (entries, scan::open_files())
        })
        .await
        .expect("scanning the roots panicked");
        let in_use = self.in_use.lock().expect("in-use lock").clone();
        let cx = plan::Context {
            now,
            write_guard: self.cfg.write_guard,
            open: &open,
            in_use: &in_use,
            prices: &self.cfg.prices,
        };
        (plan::build(&self.rules, &entries, &cx), open)
    }

    /// One pass. `apply` overrides the config's `apply` (the CLI's `apply`).
    pub async fn pass(
        &self,
        now: DateTime<Utc>,
        apply: bool,
        currency: &str,
        progress: Option<indicatif::ProgressBar>,
    ) -> Pass {
        let (plan, open) = self.plan(now).await;
        let outcome = if apply {
            if let Some(p) = &progress {
                p.set_length(plan.actions.iter().filter(|a| a.step.changes_data()).count() as u64);
            }
            Some(apply::apply(&plan, &self.archive, open, self.cfg.write_guard, progress).await)
        } else {
            None
        };
        let report_event = self.report(now, &plan, outcome.as_ref(), currency).await;
        let report = serde_json::to_value(&report_event).unwrap_or_default();
        Pass { plan, outcome, report, report_event }
    }

    /// The storage report after a pass.
    pub async fn report(
        &self,
        now: DateTime<Utc>,
        plan: &Plan,
        outcome: Option<&Outcome>,
        currency: &str,
    ) -> StorageReport {
        let prices = &self.cfg.prices;
        let mut usage: Vec<StorageUsage> = plan
            .roots
            .iter()
            .map(|r| StorageUsage {
                root: r.root.display().to_string(),
                tier: r.tier.storage_tier() as i32,
                bytes: r.bytes,
                objects: r.objects,
                monthly_cost: Some(money(r.bytes as f64 / 1e9 * r.tier.price(prices), currency)),
            })
            .collect();
        if let Ok(tiers) = self.archive.usage(now, &self.cfg.tiers).await {
            for (i, (tier, price)) in [
                (StorageTier::Standard, prices.standard),
                (StorageTier::Nearline, prices.nearline),
                (StorageTier::Coldline, prices.coldline),
            ]
            .into_iter()
            .enumerate()
            {
                usage.push(StorageUsage {
                    root: self.cfg.archive_url.clone(),
                    tier: tier as i32,
                    bytes: tiers[i].bytes,
                    objects: tiers[i].objects,
                    monthly_cost: Some(money(tiers[i].bytes as f64 / 1e9 * price, currency)),
                });
            }
        }
        let (used, total) = filesystem_usage(&self.cfg.base_dir).unwrap_or((0, 0));
        let actions: Vec<StorageActionTaken> = match outcome {
            Some(o) => o
                .done
                .iter()
                .map(|d| StorageActionTaken {
                    rule: d.rule.clone(),
                    action: d.step.as_str().into(),
                    path: d.path.display().to_string(),
                    bytes_freed: d.freed_bytes,
                    dry_run: false,
                })
                .collect(),
            None => plan
                .actions
                .iter()
                .map(|a| StorageActionTaken {
                    rule: a.rule.clone(),
                    action: a.step.as_str().into(),
                    path: a.path.display().to_string(),
                    bytes_freed: a.freed_bytes,
                    dry_run: true,
                })
                .collect(),
        };
        StorageReport {
            time: Some(costmesh_contracts::timestamp(now)),
            usage,
            provisioned_bytes: total,
            used_bytes: used,
            bytes_freed: outcome.map(|o| o.freed_bytes()).unwrap_or(0),
            actions,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootLabels {
    root: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: String,
}

#[derive(Clone, Default)]
struct Metrics {
    bytes: Family<RootLabels, Gauge>,
    objects: Family<RootLabels, Gauge>,
    freed: Counter,
    passes: Family<TriggerLabels, Counter>,
    utilisation: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Paths a job uses: its checkpoint directory and any absolute paths in its
/// arguments and environment.
fn job_paths(a: &v1::JobAssignment) -> Vec<PathBuf> {
    let Some(spec) = &a.spec else { return Vec::new() };
    let mut out: Vec<PathBuf> = Vec::new();
    let mut add = |s: &str| {
        if s.starts_with('/') {
            out.push(PathBuf::from(s));
        }
    };
    add(&spec.checkpoint_dir);
    add(&a.resume_from);
    spec.args.iter().for_each(|s| add(s));
    spec.env.values().for_each(|s| add(s));
    out
}

const IN_USE_KEY: &str = "in_use";
const LAST_PASS_KEY: &str = "last_pass";
const PENDING_PASS_KEY: &str = "pending_pass";

/// Runs the janitor until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let janitor = Arc::new(Janitor::new(cfg.clone()).map_err(anyhow::Error::msg)?);
    let m = Metrics::default();
    ctx.register("costmesh_storage_bytes", "Bytes per root and tier", m.bytes.clone());
    ctx.register("costmesh_storage_objects", "Objects per root and tier", m.objects.clone());
    ctx.register("costmesh_storage_freed_bytes", "Bytes freed by applied passes", m.freed.clone());
    ctx.register("costmesh_storage_passes", "Janitor passes by trigger", m.passes.clone());
    ctx.register(
        "costmesh_storage_utilisation_ratio",
        "Used over provisioned bytes of the data filesystem",
        m.utilisation.clone(),
    );

    // The janitor's own state, in KV so a restart (even SIGKILL) keeps it:
    // which paths running jobs use, and when the last pass ran.
    let kv = ctx.kv("storage_janitor").await?;
    let jobs: Arc<Mutex<std::collections::BTreeMap<String, Vec<PathBuf>>>> =
        Arc::new(Mutex::new(match kv.get(IN_USE_KEY).await? {
            Some(e) => serde_json::from_slice(&e.value).unwrap_or_else(|e| {
                tracing::error!(error = %e, "in-use record unreadable: starting from the job events still to come");
                Default::default()
            }),
            None => Default::default(),
        }));
    *janitor.in_use.lock().expect("in-use lock") =
        jobs.lock().expect("jobs lock").values().flatten().cloned().collect();
    let mut last_pass: Option<DateTime<Utc>> = match kv.get(LAST_PASS_KEY).await? {
        Some(e) => std::str::from_utf8(&e.value).ok().and_then(|v| v.parse().ok()),
        None => None,
    };
    tracing::info!(jobs_in_use = jobs.lock().expect("jobs lock").len(), ?last_pass, "janitor state loaded");
    let pending_pass = kv.get(PENDING_PASS_KEY).await?.is_some();

    // Budget warnings ask for an extra pass; job events protect model paths.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    if pending_pass {
        tracing::info!("a pass asked for before the restart has not run yet: running it");
        let _ = tx.send("budget_warning");
    }
    let (in_use, jobs2, tx2, kv2) = (janitor.in_use.clone(), jobs.clone(), tx.clone(), kv.clone());
    let filters = vec![ctx.subjects().budget_all(), ctx.subjects().jobs_all(), ctx.subjects().node_assign_all()];
    ctx.spawn_durable::<AnyEvent, _, _>("events", filters, move |msg, _, event| {
        let (in_use, jobs, tx, kv) = (in_use.clone(), jobs2.clone(), tx2.clone(), kv2.clone());
        async move {
            let changed = match event {
                AnyEvent::BudgetEvent(b) if b.state() == BudgetState::Warning => {
                    tracing::info!(scope = %b.scope, "budget warning: extra storage pass");
                    // Recorded before the ack, so a janitor killed before the
                    // pass runs it after its restart.
                    kv.put(PENDING_PASS_KEY, b"budget_warning".to_vec().into()).await?;
                    let _ = tx.send("budget_warning");
                    false
                }
                AnyEvent::BudgetEvent(_) => false,
                AnyEvent::JobAssignment(a) => {
                    jobs.lock().expect("jobs lock").insert(a.job_id.clone(), job_paths(&a));
                    true
                }
                AnyEvent::JobEvent(e) if e.kind().ends_attempt() => {
                    jobs.lock().expect("jobs lock").remove(&e.job_id).is_some()
                }
                AnyEvent::JobEvent(_) => false,
                other => {
                    return Err(HandlerError::Reject(format!(
                        "{} does not belong on {}",
                        other.type_name(),
                        msg.subject
                    )))
                }
            };
            if changed {
                // Saved before the ack: a janitor killed now still knows, after
                // its restart, what running jobs use.
                let bytes = {
                    let j = jobs.lock().expect("jobs lock");
                    *in_use.lock().expect("in-use lock") = j.values().flatten().cloned().collect();
                    serde_json::to_vec(&*j).unwrap_or_default()
                };
                kv.put(IN_USE_KEY, bytes.into()).await?;
            }
            Ok(())
        }
    })
    .await?;
    ctx.bus_ready().await?;

    // The schedule continues from the last pass, wherever it ran: a janitor
    // restarted more often than `interval` still runs its passes.
    let every = chrono::Duration::from_std(cfg.interval).unwrap_or(chrono::Duration::MAX);
    let mut pressure = ctx.clock.ticker(cfg.pressure_check);
    let mut last_pressure_pass: Option<DateTime<Utc>> = None;
    loop {
        let due = last_pass.map_or(ctx.clock.now(), |t| t + every);
        let clock = ctx.clock.clone();
        let trigger = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = clock.sleep_until(due) => "schedule",
            Some(t) = rx.recv() => t,
            _ = pressure.tick() => {
                let full = filesystem_usage(&cfg.base_dir).map(|(u, t)| t > 0 && u * 100 >= t * cfg.disk_pressure_pct as u64).unwrap_or(false);
                let now = ctx.clock.now();
                let recent = last_pressure_pass.is_some_and(|t| (now - t).to_std().unwrap_or_default() < cfg.interval);
                if !full || recent { continue; }
                last_pressure_pass = Some(now);
                "disk_pressure"
            }
        };
        // Job events not yet handled may protect paths: catch up first.
        if !ctx.events.caught_up("events", std::time::Duration::from_secs(30)).await {
            tracing::warn!(trigger, "job events still pending after 30 s; pass postponed");
            continue;
        }
        m.passes.get_or_create(&TriggerLabels { trigger: trigger.into() }).inc();
        let now = ctx.clock.now();
        let pass = janitor.pass(now, cfg.apply, &ctx.mesh.currency, None).await;
        let r = &pass.report_event;
        for u in &r.usage {
            let l = RootLabels {
                root: u.root.clone(),
                tier: u.tier().as_str_name().trim_start_matches("STORAGE_TIER_").to_lowercase(),
            };
            m.bytes.get_or_create(&l).set(u.bytes as i64);
            m.objects.get_or_create(&l).set(u.objects as i64);
        }
        m.freed.inc_by(r.bytes_freed);
        if r.provisioned_bytes > 0 {
            m.utilisation.set(r.used_bytes as f64 / r.provisioned_bytes as f64);
        }
        tracing::info!(
            trigger,
            apply = cfg.apply,
            planned = pass.plan.actions.len(),
            freed_bytes = r.bytes_freed,
            saving_per_month = pass.plan.saving_per_month(),
            "storage pass done"
        );
        if let Err(e) = ctx.events.publish_durable(&ctx.subjects().storage_report(), r).await {
            tracing::warn!(error = %e, "storage report publish failed");
        }
        last_pass = Some(now);
        if trigger == "budget_warning" {
            if let Err(e) = kv.delete(PENDING_PASS_KEY).await {
                tracing::warn!(error = %e, "pending-pass marker not cleared; a restart may run one pass more");
            }
        }
        if let Err(e) = kv.put(LAST_PASS_KEY, now.to_rfc3339().into_bytes().into()).await {
            tracing::warn!(error = %e, "last pass time not saved; a restart may run the next pass early");
        }
        if let Some(o) = &pass.outcome {
            for (path, e) in &o.failed {
                tracing::warn!(path = %path.display(), error = %e, "storage action failed; data left as it was");
            }
        }
    }
    Ok(())
}
