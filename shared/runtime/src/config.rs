//! Configuration: a TOML file, then environment overrides, then validation.
//!
//! One file configures the whole mesh: the common sections (`[mesh]`,
//! `[nats]`, `[redis]`, `[log]`) and one section per service
//! (`[gpu_agent]`, `[scheduler]`, ...). Every key has a default taken from
//! the seed's cost plan, so an empty file is a valid configuration.
//!
//! Environment overrides use `COSTMESH__` and `__` between keys:
//! `COSTMESH__NATS__URL=nats://...`, `COSTMESH__COST_WATCHER__BUDGET_TWD=5000`.
//! Values are read as TOML (numbers, booleans, arrays) and fall back to a
//! string. The environment is passed in as a map, so tests never touch the
//! process environment.
//!
//! A bad value fails at start with the key, the value and why
//! ([`ConfigError`]); binaries exit with code 64 (`EX_USAGE`).
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Exit code for a bad configuration (`EX_USAGE` in sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "COSTMESH__";

/// Names of the per-service sections (and `dashboard`, which `costmesh up`
/// and `costmesh dashboard` read): each service reads its own and skips the
/// others, so one file can hold them all.
pub const SERVICE_SECTIONS: &[&str] =
    &["gpu_agent", "scheduler", "storage_janitor", "cost_watcher", "cache_gateway", "dashboard"];

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`{}: {reason}", value.as_ref().map(|v| format!(" = {v}")).unwrap_or_default())]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `gpu_agent.power.training_w`.
    pub key: String,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self { key: key.into(), value: Some(value.to_string()), reason: reason.into() }
    }
}

/// Checks that go beyond types (ranges, cross-field rules). `prefix` is the
/// dotted path of the value, for error messages.
pub trait Validate {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError>;
}

/// Joins a path prefix and a key.
pub fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A secret: read from config like a string, never printed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is handed to a client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// Masks the password of a URL such as `redis://user:pass@host:6379/0`,
/// and a token standing alone in it (`nats://token@host`).
pub fn mask_url_password(url: &str) -> String {
    costmesh_bus::masked_url(url)
}

/// A URL that may carry a password; printed with the password masked.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(s: impl Into<String>) -> Self {
        SecretUrl(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", mask_url_password(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_url_password(&self.0))
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&mask_url_password(&self.0))
    }
}

/// `[mesh]`: what every service shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// First token(s) of every subject; lets meshes share a NATS server.
    pub subject_prefix: String,
    /// IANA time zone for windows and month boundaries.
    pub time_zone: String,
    /// Ledger currency (ISO 4217).
    pub currency: String,
    /// Encoding of published events: `protobuf` or `json`.
    pub content_type: costmesh_contracts::ContentType,
    /// Simulated time for demos and end-to-end tests (absent: the system clock).
    pub simulated_clock: Option<SimulatedClock>,
    /// How much the bus may hold.
    pub limits: Limits,
    /// The lease that lets one scheduler and one cost-watcher act among
    /// several instances.
    pub lease: LeaseConfig,
}

/// `[mesh.lease]`: how long an active instance that stopped renewing (killed,
/// cut off) keeps standbys waiting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// A standby takes over once the lease has not been renewed for this
    /// long; the holder renews every third of it and stops acting at four
    /// fifths of it without an answered renewal.
    #[serde(with = "humantime_serde")]
    pub ttl: std::time::Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self { ttl: std::time::Duration::from_secs(10) }
    }
}

/// `[mesh.limits]`: bounds on what the mesh keeps on the bus, so a busy
/// month cannot fill the server's disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The events stream drops its oldest messages past this size.
    pub events_max_bytes: u64,
    /// ... and past this age (the month's events plus a margin).
    #[serde(with = "humantime_serde")]
    pub events_max_age: std::time::Duration,
    /// Each service's KV bucket holds at most this many bytes.
    pub kv_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            events_max_bytes: 1 << 30,
            events_max_age: std::time::Duration::from_secs(35 * 24 * 3600),
            kv_max_bytes: 256 << 20,
        }
    }
}

/// Refuses a duration outside `[min, max]`: zero periods spin, and absurd
/// ones are typos (`"1000d"` for a ticker).
pub fn check_duration(
    k: String,
    d: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<(), ConfigError> {
    let show = |d: std::time::Duration| humantime_serde::re::humantime::format_duration(d).to_string();
    if d < min || d > max {
        return Err(ConfigError::new(k, show(d), format!("must be between {} and {}", show(min), show(max))));
    }
    Ok(())
}

/// Refuses a size outside `[min, max]` bytes.
pub fn check_size(k: String, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::new(k, v, format!("must be between {min} and {max}")));
    }
    Ok(())
}

/// `[mesh.simulated_clock]`: every service given the same values reads the
/// same time: `start` at the real instant `epoch`, running `speed` times
/// faster than real time. Times are RFC 3339 strings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedClock {
    pub start: String,
    /// The real time at which the clock reads `start` (default: when the process starts).
    #[serde(default)]
    pub epoch: Option<String>,
    pub speed: f64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "costmesh".into(),
            time_zone: "Asia/Taipei".into(),
            currency: "TWD".into(),
            content_type: costmesh_contracts::ContentType::Protobuf,
            simulated_clock: None,
            limits: Limits::default(),
            lease: LeaseConfig::default(),
        }
    }
}

fn rfc3339(v: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(v).ok().map(|t| t.with_timezone(&chrono::Utc))
}

impl MeshConfig {
    pub fn tz(&self) -> chrono_tz::Tz {
        self.time_zone.parse().unwrap_or(chrono_tz::Asia::Taipei)
    }

    /// The clock services run on: the system clock, or the simulated one.
    pub fn clock(&self) -> crate::Clock {
        match &self.simulated_clock {
            None => crate::Clock::system(),
            Some(c) => crate::Clock::scaled(
                rfc3339(&c.start).unwrap_or_else(chrono::Utc::now),
                c.epoch.as_deref().and_then(rfc3339).unwrap_or_else(chrono::Utc::now),
                c.speed,
            ),
        }
    }
}

impl Validate for MeshConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        costmesh_contracts::Subjects::new(&self.subject_prefix)
            .map_err(|e| ConfigError::new(key(p, "subject_prefix"), &self.subject_prefix, e))?;
        self.time_zone.parse::<chrono_tz::Tz>().map_err(|_| {
            ConfigError::new(key(p, "time_zone"), &self.time_zone, "not an IANA time zone name (e.g. Asia/Taipei)")
        })?;
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(ConfigError::new(key(p, "currency"), &self.currency, "must be an ISO 4217 code such as TWD"));
        }
        let l = |f: &str| key(p, &format!("limits.{f}"));
        check_size(l("events_max_bytes"), self.limits.events_max_bytes, 1 << 20, 1 << 44)?;
        check_size(l("kv_max_bytes"), self.limits.kv_max_bytes, 1 << 20, 1 << 40)?;
        const DAY: u64 = 24 * 3600;
        check_duration(
            l("events_max_age"),
            self.limits.events_max_age,
            std::time::Duration::from_secs(3600),
            std::time::Duration::from_secs(400 * DAY),
        )?;
        check_duration(
            key(p, "lease.ttl"),
            self.lease.ttl,
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(300),
        )?;
        if let Some(c) = &self.simulated_clock {
            let k = |f: &str| key(p, &format!("simulated_clock.{f}"));
            if rfc3339(&c.start).is_none() {
                return Err(ConfigError::new(k("start"), &c.start, "not an RFC 3339 time"));
            }
            if let Some(e) = c.epoch.as_deref().filter(|e| rfc3339(e).is_none()) {
                return Err(ConfigError::new(k("epoch"), e, "not an RFC 3339 time"));
            }
            if !(c.speed.is_finite() && c.speed > 0.0 && c.speed <= 100_000.0) {
                return Err(ConfigError::new(k("speed"), c.speed, "must be above 0 and at most 100000"));
            }
        }
        Ok(())
    }
}

/// `[nats]`: where the bus is. No URL means the in-process bus (only
/// meaningful when all services run in one process, as `costmesh up` does).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    pub url: Option<SecretUrl>,
    pub credentials_file: Option<PathBuf>,
    pub nkey_seed: Option<Secret>,
    /// A file holding the nkey seed (what `costmesh nats-config` writes; a
    /// compose secret).
    pub nkey_seed_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    /// Where replies to this service go; default `_INBOX`, or with an nkey
    /// `_INBOX_<its public key>` (what the generated permissions allow).
    pub inbox_prefix: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub require_tls: bool,
    /// Replicas of every stream and KV bucket the mesh creates: 1 on a
    /// single server, 3 on a 3-node cluster (at most the cluster's size).
    #[serde(default = "one")]
    pub replicas: usize,
}

fn one() -> usize {
    1
}

/// A TLS CA and client certificate/key pair: the pair together, every file there.
fn check_tls_files(
    p: &str,
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key_file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    if cert.is_some() != key_file.is_some() {
        return Err(ConfigError {
            key: key(p, "tls_key_file"),
            value: None,
            reason: "tls_cert_file and tls_key_file go together".into(),
        });
    }
    for (name, f) in [("tls_ca_file", ca), ("tls_cert_file", cert), ("tls_key_file", key_file)] {
        if let Some(f) = f {
            if !f.is_file() {
                return Err(ConfigError::new(key(p, name), f.display(), "file does not exist"));
            }
        }
    }
    Ok(())
}

/// The first line of a secret file, trimmed; the error names the file, never its content.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(line.to_string())
}

impl Validate for NatsConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let u = url.expose();
            let ok = ["nats://", "tls://", "ws://", "wss://"].iter().any(|s| u.starts_with(s)) || !u.contains("://");
            if !ok {
                return Err(ConfigError::new(key(p, "url"), url, "scheme must be nats://, tls://, ws:// or wss://"));
            }
        }
        let auths = [
            self.credentials_file.is_some(),
            self.nkey_seed.is_some() || self.nkey_seed_file.is_some(),
            self.user.is_some(),
            self.token.is_some() || self.token_file.is_some(),
        ];
        if auths.iter().filter(|a| **a).count() > 1 {
            return Err(ConfigError {
                key: p.to_string(),
                value: None,
                reason: "set only one of credentials_file, nkey_seed(_file), user/password(_file), token(_file)".into(),
            });
        }
        for (name, both) in [
            ("nkey_seed_file", self.nkey_seed.is_some() && self.nkey_seed_file.is_some()),
            ("password_file", self.password.is_some() && self.password_file.is_some()),
            ("token_file", self.token.is_some() && self.token_file.is_some()),
        ] {
            if both {
                return Err(ConfigError {
                    key: key(p, name),
                    value: None,
                    reason: format!("set the secret or {name}, not both"),
                });
            }
        }
        for (name, f) in [
            ("nkey_seed_file", &self.nkey_seed_file),
            ("password_file", &self.password_file),
            ("token_file", &self.token_file),
        ] {
            if let Some(f) = f {
                read_secret_file(f).map_err(|why| ConfigError::new(key(p, name), f.display(), why))?;
            }
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty() || prefix.split('.').any(|t| costmesh_contracts::subjects::validate_token(t).is_err())
            {
                return Err(ConfigError::new(key(p, "inbox_prefix"), prefix, "must be dot-separated subject tokens"));
            }
        }
        if self.user.is_some() != (self.password.is_some() || self.password_file.is_some()) {
            return Err(ConfigError {
                key: key(p, "password"),
                value: None,
                reason: "user and password go together".into(),
            });
        }
        check_tls_files(p, &self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file)?;
        if !(self.replicas == 0 || (1..=5).contains(&self.replicas)) {
            return Err(ConfigError::new(key(p, "replicas"), self.replicas, "must be 1 to 5 (JetStream's limit)"));
        }
        if let Some(f) = &self.credentials_file {
            if !f.is_file() {
                return Err(ConfigError::new(key(p, "credentials_file"), f.display(), "file does not exist"));
            }
        }
        Ok(())
    }
}

impl NatsConfig {
    /// The client options, with secret files read.
    pub fn connect_options(&self, name: &str) -> Result<costmesh_bus::NatsConnectOptions, String> {
        let secret = |inline: &Option<Secret>, file: &Option<PathBuf>| -> Result<Option<String>, String> {
            match (inline, file) {
                (Some(s), _) => Ok(Some(s.expose().to_string())),
                (None, Some(f)) => read_secret_file(f).map(Some),
                (None, None) => Ok(None),
            }
        };
        Ok(costmesh_bus::NatsConnectOptions {
            name: Some(name.to_string()),
            credentials_file: self.credentials_file.clone(),
            nkey_seed: secret(&self.nkey_seed, &self.nkey_seed_file)?,
            user: self.user.clone(),
            password: secret(&self.password, &self.password_file)?,
            token: secret(&self.token, &self.token_file)?,
            inbox_prefix: self.inbox_prefix.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            require_tls: self.require_tls,
            retry_on_initial_connect: true,
            replicas: self.replicas.max(1),
        })
    }
}

/// `[redis]`: the shared cache. No URL means the in-memory cache.
/// `rediss://` enables TLS; a password goes in the URL and is never printed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<SecretUrl>,
    /// A file holding the password (a compose secret), added to the URL.
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: the CA to verify the server with (else the web
    /// PKI roots), and a client certificate and key for mutual TLS.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

/// The TLS files of a Redis connection.
#[derive(Clone, Debug, Default)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl RedisConfig {
    pub fn tls(&self) -> RedisTls {
        RedisTls {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        }
    }

    /// The URL to connect with, the password file's password in it.
    pub fn effective_url(&self) -> Result<Option<SecretUrl>, String> {
        let (Some(url), Some(f)) = (&self.url, &self.password_file) else { return Ok(self.url.clone()) };
        let password = read_secret_file(f)?;
        let mut u = url::Url::parse(url.expose()).map_err(|e| format!("redis.url: {e}"))?;
        u.set_password(Some(&password)).map_err(|_| "redis.url cannot carry a password".to_string())?;
        Ok(Some(SecretUrl::new(u.to_string())))
    }
}

impl Validate for RedisConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let u = url.expose();
            if !(u.starts_with("redis://") || u.starts_with("rediss://") || u.starts_with("unix://")) {
                return Err(ConfigError::new(key(p, "url"), url, "scheme must be redis://, rediss:// or unix://"));
            }
        }
        check_tls_files(p, &self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file)?;
        let tls = [("tls_ca_file", &self.tls_ca_file), ("tls_cert_file", &self.tls_cert_file)];
        if let Some((name, Some(f))) = tls.iter().find(|(_, f)| f.is_some()) {
            if !self.url.as_ref().is_some_and(|u| u.expose().starts_with("rediss://")) {
                return Err(ConfigError::new(key(p, name), f.display(), "TLS files need a rediss:// url"));
            }
        }
        if let Some(f) = &self.password_file {
            if self.url.is_none() {
                return Err(ConfigError::new(key(p, "password_file"), f.display(), "needs redis.url"));
            }
            self.effective_url().map_err(|why| ConfigError::new(key(p, "password_file"), f.display(), why))?;
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter directive (`RUST_LOG` wins when set).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: "info".into() }
    }
}

impl Validate for LogConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        // tracing-subscriber's parser slices at byte offsets and panics
        // inside a multi-byte character; a filter is ASCII anyway.
        if !self.level.is_ascii() || self.level.chars().any(|c| c.is_ascii_control()) {
            return Err(ConfigError::new(
                key(p, "level"),
                self.level.escape_debug(),
                "not a log filter: must be printable ASCII, such as info or info,costmesh=debug",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| ConfigError::new(key(p, "level"), &self.level, format!("not a log filter: {e}")))
    }
}

/// The sections every service reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommonConfig {
    pub mesh: MeshConfig,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub log: LogConfig,
}

impl Validate for CommonConfig {
    fn validate(&self, _: &str) -> Result<(), ConfigError> {
        self.mesh.validate("mesh")?;
        self.nats.validate("nats")?;
        self.redis.validate("redis")?;
        self.log.validate("log")
    }
}

/// `admin` sub-section of each service: where `/metrics`, `/healthz` and
/// `/readyz` listen. Loopback unless configured otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: String,
}

impl AdminConfig {
    pub fn on_port(port: u16) -> Self {
        Self { listen: format!("127.0.0.1:{port}") }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self::on_port(0)
    }
}

impl Validate for AdminConfig {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .map(|_| ())
            .map_err(|e| ConfigError::new(key(p, "listen"), &self.listen, format!("not a socket address: {e}")))
    }
}

/// Parses an environment value as TOML, or takes it as a string.
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Parses the file and applies the environment overrides.
pub fn merged_table(file: Option<&str>, env: &BTreeMap<String, String>) -> Result<toml::Table, ConfigError> {
    let mut table: toml::Table = match file {
        Some(text) => toml::from_str(text).map_err(|e| {
            let span = e.span().map(|s| format!(" at byte {}", s.start)).unwrap_or_default();
            ConfigError { key: "<file>".into(), value: None, reason: format!("not valid TOML{span}: {}", e.message()) }
        })?,
        None => toml::Table::new(),
    };
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(ConfigError::new(name.clone(), raw, "empty key in environment override"));
        }
        let mut node = &mut table;
        for k in &keys[..keys.len() - 1] {
            let entry = node.entry(k.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::new(keys.join("."), raw, format!("`{k}` is a value, not a section")))?;
        }
        node.insert(keys[keys.len() - 1].clone(), env_value(raw));
    }
    Ok(table)
}

/// Deserialises `value` as `T`, naming the failing key.
pub fn from_value<T: DeserializeOwned>(prefix: &str, value: toml::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let k = if path == "." { prefix.to_string() } else { key(prefix, &path) };
        ConfigError { key: k, value: None, reason: e.into_inner().to_string() }
    })
}

/// A service's configuration: the common sections plus its own section.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded<S> {
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(skip)]
    pub section: &'static str,
    pub service: S,
}

/// Loads the common sections and one service's section, validates both.
pub fn load_service<S>(
    file: Option<&str>,
    env: &BTreeMap<String, String>,
    section: &'static str,
) -> Result<Loaded<S>, ConfigError>
where
    S: DeserializeOwned + Default + Validate,
{
    let mut table = merged_table(file, env)?;
    let own = table.remove(section);
    for s in SERVICE_SECTIONS {
        table.remove(*s);
    }
    let common: CommonConfig = from_value("", toml::Value::Table(table))?;
    common.validate("")?;
    let service: S = match own {
        Some(v) => from_value(section, v)?,
        None => S::default(),
    };
    service.validate(section)?;
    Ok(Loaded { common, section, service })
}

/// The environment as a map, for binaries (tests pass their own).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Reads the config file named by `path`, or by `$COSTMESH_CONFIG`.
pub fn read_file(
    path: Option<&std::path::Path>,
    env: &BTreeMap<String, String>,
) -> Result<Option<String>, ConfigError> {
    let path = path.map(PathBuf::from).or_else(|| env.get("COSTMESH_CONFIG").map(PathBuf::from));
    match path {
        None => Ok(None),
        Some(p) => std::fs::read_to_string(&p)
            .map(Some)
            .map_err(|e| ConfigError::new("<file>", p.display(), format!("cannot read: {e}"))),
    }
}

/// Renders a configuration as TOML for `--print-config` (secrets masked).
pub fn render<T: Serialize>(config: &T) -> String {
    toml::to_string_pretty(config).unwrap_or_else(|e| format!("# cannot render config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Svc {
        watts: u32,
        admin: AdminConfig,
    }

    impl Validate for Svc {
        fn validate(&self, p: &str) -> Result<(), ConfigError> {
            if self.watts > 1000 {
                return Err(ConfigError::new(key(p, "watts"), self.watts, "must be at most 1000"));
            }
            self.admin.validate(&key(p, "admin"))
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_log_level_with_non_ascii_is_refused_not_a_panic() {
        // Found by tests/fuzz: the filter parser panicked inside `¡`.
        for bad in ["\u{b}A\u{a1}=", "info,costmesh=d\u{e9}bug", "caf\u{e9}"] {
            let e = load_service::<Svc>(None, &env(&[("COSTMESH__LOG__LEVEL", bad)]), "gpu_agent").unwrap_err();
            assert_eq!(e.key, "log.level", "{e}");
        }
        let ok = load_service::<Svc>(None, &env(&[("COSTMESH__LOG__LEVEL", "info,costmesh=debug")]), "gpu_agent");
        assert!(ok.is_ok());
    }

    #[test]
    fn empty_config_is_the_seed_defaults() {
        let c: Loaded<Svc> = load_service(None, &env(&[]), "gpu_agent").unwrap();
        assert_eq!(c.common.mesh.subject_prefix, "costmesh");
        assert_eq!(c.common.mesh.time_zone, "Asia/Taipei");
        assert_eq!(c.service, Svc::default());
    }

    #[test]
    fn env_overrides_file() {
        let file = "[mesh]\nsubject_prefix = \"a\"\n[gpu_agent]\nwatts = 10\n";
        let c: Loaded<Svc> = load_service(
            Some(file),
            &env(&[("COSTMESH__GPU_AGENT__WATTS", "20"), ("COSTMESH__NATS__URL", "nats://x:4222"), ("OTHER", "1")]),
            "gpu_agent",
        )
        .unwrap();
        assert_eq!(c.service.watts, 20);
        assert_eq!(c.common.mesh.subject_prefix, "a");
        assert_eq!(c.common.nats.url.unwrap().expose(), "nats://x:4222");
    }

    #[test]
    fn bad_values_name_key_value_and_reason() {
        let e = load_service::<Svc>(Some("[gpu_agent]\nwatts = 5000\n"), &env(&[]), "gpu_agent").unwrap_err();
        assert_eq!(e.key, "gpu_agent.watts");
        assert_eq!(e.value.as_deref(), Some("5000"));
        assert!(e.to_string().contains("at most 1000"), "{e}");

        let e = load_service::<Svc>(Some("[gpu_agent]\nwatts = \"many\"\n"), &env(&[]), "gpu_agent").unwrap_err();
        assert_eq!(e.key, "gpu_agent.watts", "{e}");

        let e = load_service::<Svc>(Some("[gpu_agent]\nwats = 1\n"), &env(&[]), "gpu_agent").unwrap_err();
        assert!(e.reason.contains("unknown field `wats`"), "{e}");

        let e =
            load_service::<Svc>(None, &env(&[("COSTMESH__MESH__TIME_ZONE", "Mars/Olympus")]), "gpu_agent").unwrap_err();
        assert_eq!(e.key, "mesh.time_zone");

        let e = load_service::<Svc>(None, &env(&[("COSTMESH__GPU_AGENT__ADMIN__LISTEN", "nowhere")]), "gpu_agent")
            .unwrap_err();
        assert_eq!(e.key, "gpu_agent.admin.listen");

        let e = load_service::<Svc>(Some("[mesh\n"), &env(&[]), "gpu_agent").unwrap_err();
        assert!(e.reason.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        let file = "[nats]\nurl = \"nats://u:hunter2@h:4222\"\ntoken = \"hunter2\"\n[redis]\nurl = \"rediss://:hunter2@r:6380/0\"\n";
        let c: Loaded<Svc> = load_service(Some(file), &env(&[]), "gpu_agent").unwrap();
        let shown = format!("{}\n{:?}", render(&c), c);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("rediss://:***@r:6380/0"), "{shown}");
        assert_eq!(c.common.nats.token.unwrap().expose(), "hunter2");
        // A token alone in the URL is masked too.
        let token_url = "[nats]\nurl = \"nats://hunter2@h:4222\"\n";
        let c: Loaded<Svc> = load_service(Some(token_url), &env(&[]), "gpu_agent").unwrap();
        let shown = format!("{}\n{:?}", render(&c), c);
        assert!(!shown.contains("hunter2") && shown.contains("nats://***@h:4222"), "{shown}");
    }
}
