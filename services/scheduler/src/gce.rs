//! The Compute Engine actuator: the scheduler's idle actions (stop outside
//! business hours, scale down inside them) and, when configured, an
//! exceeded budget, carried out on the GCE instances costmesh may manage,
//! with Google's `google-cloud-compute-v1` client.
//!
//! - Only instances that carry the configured label (`costmesh=managed`) in
//!   the configured zones are touched; a node is the instance of that name
//!   (or the one labelled `costmesh-node=<node>`). Names sent to the API come
//!   from the API's own listing, never from the bus.
//! - Dry run by default: the action says what would be done. `apply = true`
//!   acts.
//! - Every call is followed through its zone operation to `DONE`, within
//!   `operation_timeout`. 429, 5xx, timeouts and dropped connections are
//!   retried (`max_attempts` in all, backoff doubling, the same request id
//!   so Compute Engine runs a repeated call once); 400, 401, 403, 404 and
//!   operation errors are not. Failures carry Google's own message.
//! - Credentials are Application Default Credentials
//!   (`GOOGLE_APPLICATION_CREDENTIALS`, the metadata server, `gcloud auth
//!   application-default login`), or none (`credentials = "anonymous"`, for
//!   a local endpoint); `endpoint` overrides `https://compute.googleapis.com`.
use std::collections::HashMap;
use std::time::Duration;

use costmesh_contracts::v1::{Action, ActionState};
use costmesh_runtime::config::{key, ConfigError};
use google_cloud_compute_v1::client::Instances;
use google_cloud_compute_v1::model::{Instance, InstancesSetMachineTypeRequest, Operation};
use google_cloud_gax::paginator::ItemPaginator;
use google_cloud_lro::Poller;
use serde::{Deserialize, Serialize};

use crate::actuator::{Acted, Actuator, BoxFuture};

/// `scheduler.gce`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GceConfig {
    /// Project of the managed instances; empty: no GCE actuator (actions
    /// are only recorded).
    pub project: String,
    /// Zones to look in, e.g. `["asia-east1-b"]`.
    pub zones: Vec<String>,
    /// `key=value`: only instances with this label are managed.
    pub label: String,
    /// Change instances. Off (the default): each action says what would be
    /// done and nothing changes.
    pub apply: bool,
    /// Machine type a business-hours scale-down sets (stop, set, start),
    /// e.g. `n1-standard-4`; empty: a scale-down is only proposed.
    pub scale_down_machine_type: String,
    /// When a budget that gates cloud work is exceeded, stop every managed
    /// instance that runs (after the scheduler has checkpointed and stopped
    /// its jobs there).
    pub stop_on_budget_exceeded: bool,
    /// How long after the jobs were told to checkpoint and stop the
    /// machines are stopped.
    #[serde(with = "humantime_serde")]
    pub budget_stop_grace: Duration,
    /// API endpoint; empty: Google's.
    pub endpoint: String,
    /// `"default"`: Application Default Credentials (as
    /// `billing.credentials`); `"anonymous"`: none.
    pub credentials: String,
    /// How long one call may take to reach `DONE`.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Attempts per call, the first included, for retryable errors.
    pub max_attempts: u32,
    /// First wait between attempts (doubles each time).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// First wait between polls of an operation (grows to ten times this).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for GceConfig {
    fn default() -> Self {
        Self {
            project: String::new(),
            zones: Vec::new(),
            label: "costmesh=managed".into(),
            apply: false,
            scale_down_machine_type: String::new(),
            stop_on_budget_exceeded: false,
            budget_stop_grace: Duration::from_secs(120),
            endpoint: String::new(),
            credentials: "default".into(),
            operation_timeout: Duration::from_secs(300),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(2),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// A project id: 6 to 30 lowercase letters, digits and hyphens, starting
/// with a letter.
fn project_ok(v: &str) -> bool {
    (6..=30).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && !v.ends_with('-')
        && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A Compute Engine resource name (zones, machine types): RFC 1035, at most 63.
fn name_ok(v: &str) -> bool {
    (1..=63).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && !v.ends_with('-')
        && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A label key (a lowercase letter first) or value: at most 63 of
/// lowercase letters, digits, `_` and `-`.
fn label_part_ok(v: &str, is_key: bool) -> bool {
    v.len() <= 63
        && (!is_key || v.starts_with(|c: char| c.is_ascii_lowercase()))
        && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl GceConfig {
    /// The label as (key, value).
    pub fn label_pair(&self) -> Option<(&str, &str)> {
        self.label.split_once('=')
    }

    pub fn validate(&self, p: &str) -> Result<(), ConfigError> {
        if self.project.is_empty() {
            if self.apply {
                return Err(ConfigError::new(key(p, "gce.apply"), "true", "needs gce.project"));
            }
            return Ok(());
        }
        if !project_ok(&self.project) {
            return Err(ConfigError::new(
                key(p, "gce.project"),
                &self.project,
                "must be a project id: 6-30 lowercase letters, digits and hyphens, starting with a letter",
            ));
        }
        if self.zones.is_empty() {
            return Err(ConfigError::new(key(p, "gce.zones"), "[]", "must name at least one zone"));
        }
        if let Some(z) = self.zones.iter().find(|z| !name_ok(z)) {
            return Err(ConfigError::new(key(p, "gce.zones"), z, "must be zone names such as asia-east1-b"));
        }
        match self.label_pair() {
            Some((k, v)) if !k.is_empty() && label_part_ok(k, true) && label_part_ok(v, false) => {}
            _ => {
                return Err(ConfigError::new(
                    key(p, "gce.label"),
                    &self.label,
                    "must be key=value (lowercase letters, digits, _ and -; the key starts with a letter): \
                     only instances with this label are managed",
                ))
            }
        }
        if !self.scale_down_machine_type.is_empty() && !name_ok(&self.scale_down_machine_type) {
            return Err(ConfigError::new(
                key(p, "gce.scale_down_machine_type"),
                &self.scale_down_machine_type,
                "must be a machine type name such as n1-standard-4",
            ));
        }
        if !matches!(self.credentials.as_str(), "default" | "" | "anonymous") {
            return Err(ConfigError::new(
                key(p, "gce.credentials"),
                "(set)",
                "must be \"default\" (Application Default Credentials) or \"anonymous\"",
            ));
        }
        let e = &self.endpoint;
        if !(e.is_empty() || e.starts_with("https://") || e.starts_with("http://")) {
            return Err(ConfigError::new(key(p, "gce.endpoint"), &self.endpoint, "must be an http(s) URL"));
        }
        use costmesh_runtime::config::{check_duration, check_size};
        let s = Duration::from_secs;
        check_duration(key(p, "gce.budget_stop_grace"), self.budget_stop_grace, s(0), s(3600))?;
        check_duration(key(p, "gce.operation_timeout"), self.operation_timeout, s(1), s(3600))?;
        check_duration(key(p, "gce.retry_backoff"), self.retry_backoff, Duration::from_millis(10), s(300))?;
        check_duration(key(p, "gce.poll_interval"), self.poll_interval, Duration::from_millis(10), s(60))?;
        check_size(key(p, "gce.max_attempts"), self.max_attempts as u64, 1, 10)?;
        Ok(())
    }
}

/// One managed instance as listed.
#[derive(Clone, Debug)]
struct Managed {
    zone: String,
    name: String,
    status: String,
    machine_type: String,
    labels: HashMap<String, String>,
}

impl Managed {
    fn resource(&self, project: &str) -> String {
        format!("projects/{project}/zones/{}/instances/{}", self.zone, self.name)
    }

    fn stopped(&self) -> bool {
        matches!(self.status.as_str(), "TERMINATED" | "STOPPED" | "STOPPING" | "SUSPENDED")
    }
}

fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// `$call` on the instance `$m` with a request id, followed to `DONE`
/// under [`Gce::with_retries`]; evaluates to the operation's name.
macro_rules! instance_call {
    ($self:ident, $m:ident, $what:literal, $call:ident $(, $setter:ident($arg:expr))*) => {{
        let op = $self
            .with_retries($what, |rid| {
                let poller = $self
                    .client
                    .$call()
                    .set_project($self.cfg.project.clone())
                    .set_zone($m.zone.clone())
                    .set_instance($m.name.clone())
                    .set_request_id(rid)
                    $(.$setter($arg))*
                    .poller();
                async move { finished(poller.until_done().await) }
            })
            .await?;
        Ok(op.name.unwrap_or_default())
    }};
}

/// An operation followed to its end: Google's error, or the one it ended with.
fn finished(r: google_cloud_gax::Result<Operation>) -> Result<Operation, CallError> {
    let op = r.map_err(|e| call_error(&e))?;
    match op_error(&op) {
        Some(e) => Err(e),
        None => Ok(op),
    }
}

/// Carries out actions on Compute Engine.
pub struct Gce {
    cfg: GceConfig,
    client: Instances,
}

/// Why a call failed, and whether trying again makes sense.
struct CallError {
    message: String,
    retry: bool,
}

fn call_error(e: &google_cloud_gax::error::Error) -> CallError {
    use google_cloud_gax::error::rpc::Code;
    let http = e.http_status_code();
    let code = e.status().map(|s| s.code);
    let retry = e.is_timeout()
        || e.is_io()
        || e.is_connect()
        || matches!(http, Some(429) | Some(500..=599))
        || matches!(code, Some(Code::Unavailable | Code::ResourceExhausted | Code::Internal | Code::DeadlineExceeded));
    let message = match (http, e.status()) {
        (Some(h), Some(s)) if s.code == Code::Unknown => format!("HTTP {h}: {}", s.message),
        (Some(h), Some(s)) => format!("HTTP {h} {}: {}", s.code.name(), s.message),
        (None, Some(s)) => format!("{}: {}", s.code.name(), s.message),
        _ => e.to_string(),
    };
    CallError { message, retry }
}

/// The error a `DONE` operation ended with, if any (the poller hands such
/// operations back as they are).
fn op_error(op: &Operation) -> Option<CallError> {
    let first = op.error.as_ref().and_then(|e| e.errors.first());
    let http = op.http_error_status_code;
    if first.is_none() && http.is_none_or(|h| h == 200) {
        return None;
    }
    let what = first
        .and_then(|e| e.message.clone())
        .or_else(|| op.http_error_message.clone())
        .unwrap_or_else(|| "the operation failed".into());
    let code = first.and_then(|e| e.code.clone()).map(|c| format!(" {c}")).unwrap_or_default();
    let message = match http {
        Some(h) => format!("operation {} ended with HTTP {h}{code}: {what}", op.name.as_deref().unwrap_or("?")),
        None => format!("operation {} ended with{code}: {what}", op.name.as_deref().unwrap_or("?")),
    };
    Some(CallError { message, retry: matches!(http, Some(429) | Some(500..=599)) })
}

impl Gce {
    pub async fn new(cfg: GceConfig) -> anyhow::Result<Self> {
        // TLS to Google needs a crypto provider; ring is already in the build.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = Instances::builder();
        if !cfg.endpoint.is_empty() {
            b = b.with_endpoint(cfg.endpoint.clone());
        }
        if cfg.credentials == "anonymous" {
            b = b.with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
        }
        let polling = google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder::new()
            .with_initial_delay(cfg.poll_interval)
            .with_maximum_delay(cfg.poll_interval * 10)
            .build()?;
        b = b.with_polling_backoff_policy(polling);
        let client = b
            .build()
            .await
            .map_err(|e| anyhow::anyhow!("scheduler.gce: the Compute Engine client could not be built: {e}"))?;
        Ok(Self { cfg, client })
    }

    /// Runs `call` (given one request id for every attempt) with bounded
    /// retries, each attempt within the operation timeout.
    async fn with_retries<T, F, Fut>(&self, what: &str, call: F) -> Result<T, String>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut wait = self.cfg.retry_backoff;
        let mut attempt = 1;
        loop {
            let err = match tokio::time::timeout(self.cfg.operation_timeout, call(request_id.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => CallError {
                    message: format!(
                        "did not finish within {}",
                        humantime_serde::re::humantime::format_duration(self.cfg.operation_timeout)
                    ),
                    retry: false,
                },
            };
            if !err.retry || attempt >= self.cfg.max_attempts {
                let tries = if attempt > 1 { format!(" (after {attempt} attempts)") } else { String::new() };
                return Err(format!("{what}: {}{tries}", err.message));
            }
            tracing::warn!(call = what, attempt, error = %err.message, retry_in = ?wait, "Compute Engine call failed; retrying");
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        }
    }

    /// The managed instances of every configured zone.
    async fn managed(&self) -> Result<Vec<Managed>, String> {
        let (k, v) = self.cfg.label_pair().unwrap_or(("costmesh", "managed"));
        let mut out = Vec::new();
        for zone in &self.cfg.zones {
            let found = self
                .with_retries(&format!("listing instances in {zone}"), |_| async move {
                    let mut items = self
                        .client
                        .list()
                        .set_project(self.cfg.project.clone())
                        .set_zone(zone.clone())
                        .set_filter(format!("labels.{k}={v}"))
                        .by_item();
                    let mut found = Vec::new();
                    while let Some(item) = items.next().await {
                        found.push(item.map_err(|e| call_error(&e))?);
                    }
                    Ok(found)
                })
                .await?;
            // The filter is the API's; the label is checked here too.
            out.extend(found.into_iter().filter(|i| i.labels.get(k).map(String::as_str) == Some(v)).map(
                |i: Instance| Managed {
                    zone: zone.clone(),
                    name: i.name.unwrap_or_default(),
                    status: i.status.as_ref().and_then(|s| s.name()).unwrap_or("UNKNOWN").to_string(),
                    machine_type: last_segment(i.machine_type.as_deref().unwrap_or_default()).to_string(),
                    labels: i.labels,
                },
            ));
        }
        Ok(out)
    }

    fn find<'m>(&self, all: &'m [Managed], node: &str) -> Option<&'m Managed> {
        all.iter()
            .find(|m| m.name == node)
            .or_else(|| all.iter().find(|m| m.labels.get("costmesh-node").map(String::as_str) == Some(node)))
    }

    async fn stop(&self, m: &Managed) -> Result<String, String> {
        instance_call!(self, m, "stop", stop)
    }

    async fn start(&self, m: &Managed) -> Result<String, String> {
        instance_call!(self, m, "start", start)
    }

    async fn set_machine_type(&self, m: &Managed, machine_type: &str) -> Result<String, String> {
        let url = format!("zones/{}/machineTypes/{machine_type}", m.zone);
        instance_call!(
            self,
            m,
            "setMachineType",
            set_machine_type,
            set_body(InstancesSetMachineTypeRequest::new().set_machine_type(url.clone()))
        )
    }

    /// Stops `m`, or says it would.
    async fn do_stop(&self, m: &Managed) -> Acted {
        let resource = m.resource(&self.cfg.project);
        let mut acted = Acted::proposed(String::new());
        acted.resource = resource.clone();
        if m.stopped() {
            acted.outcome = format!("{resource} is already {}: nothing to do", m.status);
            acted.dry_run = !self.cfg.apply;
            acted.state = if self.cfg.apply { ActionState::Taken } else { ActionState::Proposed };
            return acted;
        }
        if !self.cfg.apply {
            acted.outcome =
                format!("dry run: would stop {resource} ({}, {}); set gce.apply to act", m.status, m.machine_type);
            return acted;
        }
        acted.dry_run = false;
        match self.stop(m).await {
            Ok(op) => {
                acted.state = ActionState::Taken;
                acted.outcome = format!("stopped {resource} (was {}, {})", m.status, m.machine_type);
                acted.operations.push(op);
            }
            Err(e) => {
                acted.state = ActionState::Failed;
                acted.outcome = format!("{resource}: {e}");
            }
        }
        acted
    }

    /// Stop, set the smaller machine type, start again.
    async fn do_scale_down(&self, m: &Managed) -> Acted {
        let resource = m.resource(&self.cfg.project);
        let to = self.cfg.scale_down_machine_type.as_str();
        let mut acted = Acted::proposed(String::new());
        acted.resource = resource.clone();
        if to.is_empty() {
            acted.outcome = format!(
                "nothing done to {resource}: gce.scale_down_machine_type is not set (it runs {})",
                m.machine_type
            );
            return acted;
        }
        if m.machine_type == to {
            acted.outcome = format!("{resource} already runs {to}: nothing to do");
            acted.dry_run = !self.cfg.apply;
            acted.state = if self.cfg.apply { ActionState::Taken } else { ActionState::Proposed };
            return acted;
        }
        if !self.cfg.apply {
            acted.outcome = format!(
                "dry run: would stop {resource}, set its machine type {} -> {to} and start it again; set gce.apply to act",
                m.machine_type
            );
            return acted;
        }
        acted.dry_run = false;
        let was_running = !m.stopped();
        let steps = async {
            if was_running {
                acted.operations.push(self.stop(m).await?);
            }
            acted.operations.push(self.set_machine_type(m, to).await?);
            if was_running {
                acted.operations.push(self.start(m).await?);
            }
            Ok::<_, String>(())
        };
        match steps.await {
            Ok(()) => {
                acted.state = ActionState::Taken;
                acted.outcome = format!(
                    "scaled {resource} down: {} -> {to}{}",
                    m.machine_type,
                    if was_running { ", started again" } else { " (it was stopped and stays so)" }
                );
            }
            Err(e) => {
                acted.state = ActionState::Failed;
                acted.outcome = format!("{resource}: {e} (after {} operation(s) done)", acted.operations.len());
            }
        }
        acted
    }
}

impl Actuator for Gce {
    fn act<'a>(&'a self, action: &'a Action) -> BoxFuture<'a, Acted> {
        Box::pin(async move {
            let all = match self.managed().await {
                Ok(a) => a,
                Err(e) => {
                    let mut acted = Acted::proposed(e);
                    acted.state = ActionState::Failed;
                    acted.dry_run = true;
                    return acted;
                }
            };
            let Some(m) = self.find(&all, &action.target) else {
                let (k, v) = self.cfg.label_pair().unwrap_or_default();
                return Acted::proposed(format!(
                    "{} is not a managed Compute Engine instance (label {k}={v} in {} of project {}): nothing done",
                    action.target,
                    self.cfg.zones.join(", "),
                    self.cfg.project
                ));
            };
            let acted = match action.kind.as_str() {
                "stop" => self.do_stop(m).await,
                "scale_down" => self.do_scale_down(m).await,
                other => Acted::proposed(format!("{other}: not an action the GCE actuator takes")),
            };
            tracing::warn!(kind = %action.kind, resource = %acted.resource, state = acted.state.as_str_name(), outcome = %acted.outcome, "GCE action");
            acted
        })
    }

    fn dry_run(&self) -> bool {
        !self.cfg.apply
    }

    fn budget_exceeded<'a>(&'a self, template: &'a Action) -> BoxFuture<'a, Vec<Action>> {
        Box::pin(async move {
            if !self.cfg.stop_on_budget_exceeded {
                return Vec::new();
            }
            let all = match self.managed().await {
                Ok(a) => a,
                Err(e) => {
                    let mut a = template.clone();
                    a.target = self.cfg.project.clone();
                    Acted { state: ActionState::Failed, ..Acted::proposed(e) }.apply_to(&mut a);
                    return vec![a];
                }
            };
            let mut out = Vec::new();
            for m in all.iter().filter(|m| !m.stopped()) {
                let mut a = template.clone();
                a.target = m.name.clone();
                self.do_stop(m).await.apply_to(&mut a);
                out.push(a);
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GceConfig {
        GceConfig { project: "my-project-1".into(), zones: vec!["asia-east1-b".into()], ..Default::default() }
    }

    #[test]
    fn config_names_the_bad_key() {
        assert!(cfg().validate("scheduler").is_ok());
        assert!(GceConfig::default().validate("scheduler").is_ok(), "no project: no actuator");
        let bad = |c: GceConfig| c.validate("scheduler").unwrap_err().to_string();
        assert!(bad(GceConfig { apply: true, ..Default::default() }).contains("scheduler.gce.apply"));
        assert!(bad(GceConfig { project: "Proj/../x".into(), ..cfg() }).contains("scheduler.gce.project"));
        assert!(bad(GceConfig { zones: vec![], ..cfg() }).contains("scheduler.gce.zones"));
        assert!(bad(GceConfig { zones: vec!["asia-east1-b/../x".into()], ..cfg() }).contains("scheduler.gce.zones"));
        assert!(bad(GceConfig { label: "managed".into(), ..cfg() }).contains("scheduler.gce.label"));
        assert!(bad(GceConfig { label: "=x".into(), ..cfg() }).contains("scheduler.gce.label"));
        assert!(bad(GceConfig { label: "Cost=X".into(), ..cfg() }).contains("scheduler.gce.label"));
        let e = bad(GceConfig { scale_down_machine_type: "n1 standard".into(), ..cfg() });
        assert!(e.contains("scale_down_machine_type"), "{e}");
        let e = bad(GceConfig { credentials: "/secret/key.json".into(), ..cfg() });
        assert!(e.contains("gce.credentials") && !e.contains("/secret"), "secrets are never printed: {e}");
        assert!(bad(GceConfig { max_attempts: 0, ..cfg() }).contains("gce.max_attempts"));
        assert!(bad(GceConfig { endpoint: "ftp://x".into(), ..cfg() }).contains("gce.endpoint"));
    }
}
