//! The `[storage_janitor]` config section. The default policy is the seed's:
//! gzip `*.log` older than 7 days and archive them, delete `*.tmp` older than
//! a day, keep the newest 3 versions of each model, delete snapshots older
//! than 30 days, report data nothing has touched for 30 days.
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::host::ServiceConfig;
use serde::{Deserialize, Serialize};

/// What a rule does with what it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Gzip in place (`x.log` -> `x.log.gz`).
    Compress,
    /// Gzip, then move the `.gz` to the archive store.
    CompressArchive,
    Delete,
    /// Keep the newest `keep_newest` versions per model; delete the rest.
    Retire,
    /// Keep the newest `keep_newest` versions per model; archive the rest.
    RetireArchive,
    /// Report the root as a candidate to release when nothing in it was
    /// touched for `older_than`.
    ReportStale,
}

impl ActionKind {
    pub const ALL: &'static [&'static str] =
        &["compress", "compress_archive", "delete", "retire", "retire_archive", "report_stale"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "compress" => Self::Compress,
            "compress_archive" => Self::CompressArchive,
            "delete" => Self::Delete,
            "retire" => Self::Retire,
            "retire_archive" => Self::RetireArchive,
            "report_stale" => Self::ReportStale,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL[self as usize]
    }
}

/// One lifecycle rule, as written in the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Directory the rule works in, relative to `base_dir` or absolute.
    pub root: String,
    /// Glob on paths relative to the root (`**/*.log`). For retire rules it
    /// picks the version entries (`*/*`: model/version).
    #[serde(rename = "match", default = "default_match")]
    pub pattern: String,
    /// Only entries last modified longer ago than this (`7d`, `24h`).
    #[serde(default)]
    pub older_than: Option<String>,
    /// Only files at least this large, in bytes.
    #[serde(default)]
    pub min_size: Option<u64>,
    /// Retire rules: versions to keep per model.
    #[serde(default)]
    pub keep_newest: Option<u32>,
    pub action: String,
    /// The storage class the root's data is in, for reports and savings:
    /// `local` (default), `standard`, `nearline`, `coldline`, `archive`.
    #[serde(default)]
    pub tier: Option<String>,
}

fn default_match() -> String {
    "**/*".into()
}

/// A validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub root: PathBuf,
    pub pattern: String,
    pub older_than: Option<Duration>,
    pub min_size: Option<u64>,
    pub keep_newest: u32,
    pub action: ActionKind,
    pub tier: Tier,
}

/// Where a rule's data is stored, for pricing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Local,
    Standard,
    Nearline,
    Coldline,
    Archive,
}

impl Tier {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => Tier::Local,
            "standard" => Tier::Standard,
            "nearline" => Tier::Nearline,
            "coldline" => Tier::Coldline,
            "archive" => Tier::Archive,
            _ => return None,
        })
    }

    /// Price per GB-month.
    pub fn price(self, p: &Prices) -> f64 {
        match self {
            Tier::Local => p.local,
            Tier::Standard => p.standard,
            Tier::Nearline => p.nearline,
            Tier::Coldline => p.coldline,
            Tier::Archive => p.archive,
        }
    }

    /// The storage class on the wire (local disk has none).
    pub fn storage_tier(self) -> costmesh_contracts::v1::StorageTier {
        use costmesh_contracts::v1::StorageTier as T;
        match self {
            Tier::Local => T::Unspecified,
            Tier::Standard => T::Standard,
            Tier::Nearline => T::Nearline,
            Tier::Coldline => T::Coldline,
            Tier::Archive => T::Archive,
        }
    }
}

/// Prices per GB-month in the ledger currency (seed: 0.68 / 0.34 / 0.17).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prices {
    pub standard: f64,
    pub nearline: f64,
    pub coldline: f64,
    pub archive: f64,
    /// Local disk, for the savings of freeing it (priced like hot storage).
    pub local: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self { standard: 0.68, nearline: 0.34, coldline: 0.17, archive: 0.17, local: 0.68 }
    }
}

/// Bucket tiers by age (seed: STANDARD 30 days, NEARLINE to 90, then COLDLINE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tiers {
    pub nearline_after_days: u32,
    pub coldline_after_days: u32,
}

impl Default for Tiers {
    fn default() -> Self {
        Self { nearline_after_days: 30, coldline_after_days: 90 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Carry out plans; false (the default) only plans and reports.
    pub apply: bool,
    /// How often a scheduled pass runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Roots of relative rule paths.
    pub base_dir: PathBuf,
    /// Where archived data goes: a directory path or `file://`, `gs://`,
    /// `s3://` URL (cloud stores need the `cloud` build feature).
    pub archive_url: String,
    /// Files modified more recently than this are being written: left alone.
    #[serde(with = "humantime_serde")]
    pub write_guard: Duration,
    /// Run an extra pass when a root's filesystem is fuller than this.
    pub disk_pressure_pct: u32,
    #[serde(with = "humantime_serde")]
    pub pressure_check: Duration,
    pub prices: Prices,
    pub tiers: Tiers,
    pub rules: Vec<RuleConfig>,
    pub admin: AdminConfig,
}

fn rule(
    name: &str,
    root: &str,
    pattern: &str,
    older_than: Option<&str>,
    keep: Option<u32>,
    action: &str,
) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        root: root.into(),
        pattern: pattern.into(),
        older_than: older_than.map(str::to_string),
        min_size: None,
        keep_newest: keep,
        action: action.into(),
        tier: None,
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            apply: false,
            interval: Duration::from_secs(3600),
            base_dir: PathBuf::from("/var/lib/costmesh"),
            archive_url: "archive".into(),
            write_guard: Duration::from_secs(60),
            disk_pressure_pct: 90,
            pressure_check: Duration::from_secs(60),
            prices: Prices::default(),
            tiers: Tiers::default(),
            rules: vec![
                rule("logs", "logs", "**/*.log", Some("7d"), None, "compress_archive"),
                rule("temp", "temp", "**/*.tmp", Some("1d"), None, "delete"),
                rule("models", "models", "*/*", None, Some(3), "retire_archive"),
                rule("snapshots", "snapshots", "**/*", Some("30d"), None, "delete"),
                rule("stale-data", "data", "**/*", Some("30d"), None, "report_stale"),
            ],
            admin: AdminConfig::on_port(9103),
        }
    }
}

/// Resolves `p` against `base` without touching the filesystem, refusing
/// `..` components (a rule must not climb out of its base).
fn resolve(base: &Path, p: &str) -> Result<PathBuf, String> {
    let path = Path::new(p);
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err("may not contain `..`".into());
    }
    let full = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    if full.parent().is_none() {
        return Err("may not be the filesystem root `/`".into());
    }
    Ok(full)
}

impl Config {
    /// The rules, validated (see [`Validate`]).
    pub fn compiled_rules(&self) -> Result<Vec<Rule>, ConfigError> {
        let p = "storage_janitor";
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let k = |field: &str| key(p, &format!("rules[{i}] ({}).{field}", r.name));
            if r.name.is_empty() {
                return Err(ConfigError::new(key(p, &format!("rules[{i}].name")), "\"\"", "every rule needs a name"));
            }
            let action = ActionKind::parse(&r.action).ok_or_else(|| {
                ConfigError::new(
                    k("action"),
                    &r.action,
                    format!("unknown action; known: {}", ActionKind::ALL.join(", ")),
                )
            })?;
            let root = resolve(&self.base_dir, &r.root).map_err(|e| ConfigError::new(k("root"), &r.root, e))?;
            if r.pattern.starts_with('/') || r.pattern.split('/').any(|s| s == "..") {
                return Err(ConfigError::new(k("match"), &r.pattern, "must be relative to the root, without `..`"));
            }
            globset::Glob::new(&r.pattern).map_err(|e| ConfigError::new(k("match"), &r.pattern, e.to_string()))?;
            let older_than = match &r.older_than {
                None => None,
                Some(s) if s.trim_start().starts_with('-') => {
                    return Err(ConfigError::new(k("older_than"), s, "an age cannot be negative"))
                }
                Some(s) => Some(humantime_serde::re::humantime::parse_duration(s).map_err(|e| {
                    ConfigError::new(k("older_than"), s, format!("not a duration like 7d or 24h: {e}"))
                })?),
            };
            let keep_newest = match (action, r.keep_newest) {
                (ActionKind::Retire | ActionKind::RetireArchive, Some(n)) if n >= 1 => n,
                (ActionKind::Retire | ActionKind::RetireArchive, Some(n)) => {
                    return Err(ConfigError::new(k("keep_newest"), n, "must keep at least 1 version"))
                }
                (ActionKind::Retire | ActionKind::RetireArchive, None) => {
                    return Err(ConfigError {
                        key: k("keep_newest"),
                        value: None,
                        reason: "retire rules need keep_newest".into(),
                    })
                }
                (_, Some(n)) => return Err(ConfigError::new(k("keep_newest"), n, "only retire rules keep versions")),
                (_, None) => 0,
            };
            if matches!(action, ActionKind::Delete | ActionKind::ReportStale) && older_than.is_none() {
                return Err(ConfigError {
                    key: k("older_than"),
                    value: None,
                    reason: format!("{} rules need an age, so fresh data is never touched", action.as_str()),
                });
            }
            let tier = match &r.tier {
                None => Tier::Local,
                Some(t) => Tier::parse(t).ok_or_else(|| {
                    ConfigError::new(k("tier"), t, "unknown tier; known: local, standard, nearline, coldline, archive")
                })?,
            };
            out.push(Rule {
                name: r.name.clone(),
                root,
                pattern: r.pattern.clone(),
                older_than,
                min_size: r.min_size,
                keep_newest,
                action,
                tier,
            });
        }
        let mut names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::new(key(p, "rules"), w[0], "rule names must be unique"));
        }
        Ok(out)
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.interval < Duration::from_secs(60) {
            return Err(ConfigError::new(
                key(p, "interval"),
                humantime_serde::re::humantime::format_duration(self.interval),
                "must be at least 1m",
            ));
        }
        use costmesh_runtime::config::check_duration;
        check_duration(
            key(p, "interval"),
            self.interval,
            Duration::from_secs(60),
            Duration::from_secs(30 * 24 * 3600),
        )?;
        check_duration(
            key(p, "pressure_check"),
            self.pressure_check,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        check_duration(key(p, "write_guard"), self.write_guard, Duration::ZERO, Duration::from_secs(7 * 24 * 3600))?;
        if self.base_dir.parent().is_none() {
            return Err(ConfigError::new(
                key(p, "base_dir"),
                self.base_dir.display(),
                "may not be the filesystem root `/`",
            ));
        }
        if self.disk_pressure_pct == 0 || self.disk_pressure_pct > 100 {
            return Err(ConfigError::new(
                key(p, "disk_pressure_pct"),
                self.disk_pressure_pct,
                "must be between 1 and 100",
            ));
        }
        let t = &self.tiers;
        if t.nearline_after_days == 0 || t.coldline_after_days <= t.nearline_after_days {
            return Err(ConfigError::new(
                key(p, "tiers.coldline_after_days"),
                t.coldline_after_days,
                "must be after nearline_after_days, which must be at least 1",
            ));
        }
        for (name, v) in [
            ("standard", self.prices.standard),
            ("nearline", self.prices.nearline),
            ("coldline", self.prices.coldline),
            ("archive", self.prices.archive),
            ("local", self.prices.local),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::new(key(p, &format!("prices.{name}")), v, "must be a price of zero or more"));
            }
        }
        crate::archive::parse_store_url(&self.archive_url, &self.base_dir)
            .map_err(|e| ConfigError::new(key(p, "archive_url"), &self.archive_url, e))?;
        self.compiled_rules()?;
        self.admin.validate(&key(p, "admin"))
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}
