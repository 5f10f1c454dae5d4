//! Building a plan: what each rule would do, why, and what it saves. A plan
//! changes nothing; `apply` carries it out.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{ActionKind, Prices, Rule};
use crate::scan::Entry;

/// Suffix of our own temporary files; a leftover one is a dead run's.
pub const TMP_SUFFIX: &str = ".costmesh-tmp";

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Gzip in place.
    Compress,
    /// Gzip, then move the `.gz` to the archive.
    CompressArchive,
    /// Move an existing `.gz` (from an interrupted run) to the archive.
    Archive,
    Delete,
    /// Delete a model version beyond the newest N.
    RetireDelete,
    /// Move a model version beyond the newest N to the archive.
    RetireArchive,
    /// Report a root nothing has touched for long as a candidate to release.
    ReleaseCandidate,
    /// Remove a temporary file a killed run left behind.
    CleanupTemp,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Compress => "compress",
            Step::CompressArchive => "compress_archive",
            Step::Archive => "archive",
            Step::Delete => "delete",
            Step::RetireDelete => "retire_delete",
            Step::RetireArchive => "retire_archive",
            Step::ReleaseCandidate => "release_candidate",
            Step::CleanupTemp => "cleanup_temp",
        }
    }

    /// Whether carrying it out changes anything on disk.
    pub fn changes_data(self) -> bool {
        !matches!(self, Step::ReleaseCandidate)
    }
}

/// Gzip typically saves this much on training logs (the seed's 70 %); the
/// plan's estimate before compressing.
pub const ESTIMATED_GZIP_SAVING: f64 = 0.7;

#[derive(Clone, Debug, Serialize)]
pub struct PlannedAction {
    pub rule: String,
    /// The rule's root; nothing outside it is ever touched.
    pub root: PathBuf,
    pub step: Step,
    pub path: PathBuf,
    /// Relative to the rule's root.
    pub rel: String,
    /// Bytes the entry holds.
    pub bytes: u64,
    /// Local bytes the step frees (an estimate for compression).
    pub freed_bytes: u64,
    /// Monthly saving at the price of the rule's tier.
    pub saving_per_month: f64,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub rule: String,
    pub path: PathBuf,
    pub reason: String,
}

/// Bytes and objects under one rule's root.
#[derive(Clone, Debug, Serialize)]
pub struct RootUsage {
    pub rule: String,
    pub tier: crate::config::Tier,
    pub root: PathBuf,
    pub bytes: u64,
    pub objects: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    pub actions: Vec<PlannedAction>,
    pub skipped: Vec<Skipped>,
    pub roots: Vec<RootUsage>,
}

impl Plan {
    pub fn freed_bytes(&self) -> u64 {
        self.actions.iter().map(|a| a.freed_bytes).sum()
    }
    pub fn saving_per_month(&self) -> f64 {
        self.actions.iter().fold(0.0, |acc, a| acc + a.saving_per_month)
    }
}

/// What the planner needs besides the rules and the entries.
pub struct Context<'a> {
    pub now: DateTime<Utc>,
    pub write_guard: std::time::Duration,
    pub open: &'a HashSet<(u64, u64)>,
    /// Paths a running job uses; nothing at or under them is retired.
    pub in_use: &'a HashSet<PathBuf>,
    pub prices: &'a Prices,
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> std::time::Duration {
    (now - t).to_std().unwrap_or_default()
}

fn human(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d", s / 86_400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

fn saving(bytes: u64, price_per_gb_month: f64) -> f64 {
    bytes as f64 / 1e9 * price_per_gb_month
}

/// Whether `path` is, or lies under or above, a path in use.
fn in_use(path: &Path, used: &HashSet<PathBuf>) -> bool {
    used.iter().any(|u| u.starts_with(path) || path.starts_with(u))
}

/// A model version: its entry, total bytes, and when its files were last written.
type Version<'a> = (&'a Entry, u64, DateTime<Utc>);

/// Plans one rule over the entries of its root.
pub fn plan_rule(rule: &Rule, entries: &[Entry], cx: &Context<'_>, plan: &mut Plan) {
    let glob = globset::GlobBuilder::new(&rule.pattern).literal_separator(true).build().map(|g| g.compile_matcher());
    let Ok(glob) = glob else { return };
    let price = rule.tier.price(cx.prices);
    let gz_glob = globset::GlobBuilder::new(&format!("{}.gz", rule.pattern))
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .ok();
    plan.roots.push(RootUsage {
        rule: rule.name.clone(),
        tier: rule.tier,
        root: rule.root.clone(),
        bytes: entries.iter().map(|e| e.size).sum(),
        objects: entries.iter().filter(|e| !e.is_dir).count() as u64,
    });
    let skip = |plan: &mut Plan, e: &Entry, why: String| {
        plan.skipped.push(Skipped { rule: rule.name.clone(), path: e.path.clone(), reason: why })
    };
    let busy = |e: &Entry| -> Option<String> {
        if cx.open.contains(&(e.dev, e.ino)) {
            Some("open by a process".into())
        } else if age(cx.now, e.modified) < cx.write_guard {
            Some(format!(
                "modified within the last {}",
                humantime_serde::re::humantime::format_duration(cx.write_guard)
            ))
        } else {
            None
        }
    };

    // A dead run's temporary files go first, whatever the rule.
    for e in entries.iter().filter(|e| !e.is_dir && !e.is_symlink && e.rel.ends_with(TMP_SUFFIX)) {
        if matches!(rule.action, ActionKind::Compress | ActionKind::CompressArchive) {
            plan.actions.push(PlannedAction {
                rule: rule.name.clone(),
                root: rule.root.clone(),
                step: Step::CleanupTemp,
                path: e.path.clone(),
                rel: e.rel.clone(),
                bytes: e.size,
                freed_bytes: e.size,
                saving_per_month: saving(e.size, price),
                reason: "partial file of an interrupted run".into(),
            });
        }
    }

    match rule.action {
        ActionKind::Compress | ActionKind::CompressArchive | ActionKind::Delete => {
            for e in entries {
                if e.is_dir || e.rel.ends_with(TMP_SUFFIX) {
                    continue;
                }
                let is_match = glob.is_match(&e.rel);
                let is_leftover_gz =
                    rule.action == ActionKind::CompressArchive && gz_glob.as_ref().is_some_and(|g| g.is_match(&e.rel));
                if !is_match && !is_leftover_gz {
                    continue;
                }
                if e.is_symlink {
                    skip(plan, e, "a symbolic link: never followed or changed".into());
                    continue;
                }
                let old = age(cx.now, e.modified);
                if rule.older_than.is_some_and(|min| old < min) {
                    continue;
                }
                if rule.min_size.is_some_and(|m| e.size < m) {
                    continue;
                }
                if let Some(why) = busy(e) {
                    skip(plan, e, why);
                    continue;
                }
                let (step, freed, reason) = if is_leftover_gz && !is_match {
                    (Step::Archive, e.size, "compressed by an earlier run, not yet archived".to_string())
                } else {
                    let older = rule.older_than.map(|d| format!(", older than {}", human(d))).unwrap_or_default();
                    match rule.action {
                        ActionKind::Compress => (
                            Step::Compress,
                            (e.size as f64 * ESTIMATED_GZIP_SAVING) as u64,
                            format!("{} old{older}", human(old)),
                        ),
                        ActionKind::CompressArchive => {
                            (Step::CompressArchive, e.size, format!("{} old{older}", human(old)))
                        }
                        _ => (Step::Delete, e.size, format!("{} old{older}", human(old))),
                    }
                };
                plan.actions.push(PlannedAction {
                    rule: rule.name.clone(),
                    root: rule.root.clone(),
                    step,
                    path: e.path.clone(),
                    rel: e.rel.clone(),
                    bytes: e.size,
                    freed_bytes: freed,
                    saving_per_month: saving(freed, price),
                    reason,
                });
            }
            // A killed run can leave both `x.log` and its verified `x.log.gz`:
            // compressing `x.log` finds the `.gz` and archives it, so a
            // separate archive step for the same `.gz` would race it.
            let compressing: HashSet<PathBuf> = plan
                .actions
                .iter()
                .filter(|a| a.rule == rule.name && a.step == Step::CompressArchive)
                .map(|a| crate::apply::with_suffix(&a.path, ".gz"))
                .collect();
            plan.actions.retain(|a| !(a.rule == rule.name && a.step == Step::Archive && compressing.contains(&a.path)));
        }
        ActionKind::Retire | ActionKind::RetireArchive => {
            // Versions: entries matching the pattern, grouped by model (the
            // first path component), newest first.
            let mut models: BTreeMap<String, Vec<Version<'_>>> = BTreeMap::new();
            for v in entries.iter().filter(|e| glob.is_match(&e.rel) && !e.is_symlink) {
                let prefix = format!("{}/", v.rel);
                let inner: Vec<&Entry> = entries.iter().filter(|x| x.rel.starts_with(&prefix)).collect();
                let bytes = v.size + inner.iter().map(|x| x.size).sum::<u64>();
                // A directory's own time moves whenever an entry is added or
                // removed; its files' times say when the version was written.
                let newest = inner.iter().filter(|x| !x.is_dir).map(|x| x.modified).max().unwrap_or(v.modified);
                let model = v.rel.split('/').next().unwrap_or_default().to_string();
                models.entry(model).or_default().push((v, bytes, newest));
            }
            for (model, mut versions) in models {
                versions.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| b.0.rel.cmp(&a.0.rel)));
                for (v, bytes, newest) in versions.into_iter().skip(rule.keep_newest as usize) {
                    if in_use(&v.path, cx.in_use) {
                        skip(plan, v, "used by a running job".into());
                        continue;
                    }
                    if age(cx.now, newest) < cx.write_guard {
                        skip(plan, v, "being written".into());
                        continue;
                    }
                    let step = if rule.action == ActionKind::Retire { Step::RetireDelete } else { Step::RetireArchive };
                    plan.actions.push(PlannedAction {
                        rule: rule.name.clone(),
                        root: rule.root.clone(),
                        step,
                        path: v.path.clone(),
                        rel: v.rel.clone(),
                        bytes,
                        freed_bytes: bytes,
                        saving_per_month: saving(bytes, price),
                        reason: format!("{model}: older than the newest {}", rule.keep_newest),
                    });
                }
            }
        }
        ActionKind::ReportStale => {
            let newest = entries.iter().map(|e| e.modified).max();
            if let (Some(newest), Some(min)) = (newest, rule.older_than) {
                let idle = age(cx.now, newest);
                if idle >= min {
                    let bytes: u64 = entries.iter().map(|e| e.size).sum();
                    plan.actions.push(PlannedAction {
                        rule: rule.name.clone(),
                        root: rule.root.clone(),
                        step: Step::ReleaseCandidate,
                        path: rule.root.clone(),
                        rel: ".".into(),
                        bytes,
                        freed_bytes: 0,
                        saving_per_month: saving(bytes, price),
                        reason: format!("nothing touched for {}: a candidate to release", human(idle)),
                    });
                }
            }
        }
    }
}

/// Plans every rule. `entries` holds each rule's root scan, in rule order.
pub fn build(rules: &[Rule], entries: &[Vec<Entry>], cx: &Context<'_>) -> Plan {
    let mut plan = Plan::default();
    for (rule, es) in rules.iter().zip(entries) {
        plan_rule(rule, es, cx, &mut plan);
    }
    plan.actions.sort_by(|a, b| a.rule.cmp(&b.rule).then_with(|| a.rel.cmp(&b.rel)));
    plan
}
