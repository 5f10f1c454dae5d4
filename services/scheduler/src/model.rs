//! Jobs as the scheduler keeps them (one JSON value per job in the KV
//! bucket), and job-spec validation.
use chrono::{DateTime, Utc};
use costmesh_contracts::v1::{JobClass, JobSpec};
use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting: for its start time, for GPUs, for a backoff, or for the budget.
    Queued,
    /// Placed on a node; the node has not yet said it started.
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }

    /// Holds GPUs on its node.
    pub fn holds_gpus(self) -> bool {
        matches!(self, State::Assigned | State::Running)
    }
}

/// One job and everything decided about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub state: State,
    pub submitted_at: DateTime<Utc>,
    /// Submission order (ties at the same time go first come, first served).
    #[serde(default)]
    pub seq: u64,
    /// Attempts started so far; the current one when assigned or running.
    pub attempt: u32,
    /// The node of the current or last attempt (where its logs are).
    pub node: Option<String>,
    /// GPUs held while assigned or running.
    pub gpus: Vec<u32>,
    /// Placed on a cloud node (budget gating applies).
    #[serde(default)]
    pub cloud: bool,
    /// Not before this time (backoff after an interruption or a failure).
    pub not_before: Option<DateTime<Utc>>,
    /// When the scheduler means to start it (off-peak, cheapest tariff).
    pub planned_start: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    /// Newest checkpoint the job reported (handed back on resume).
    pub last_checkpoint: Option<String>,
    /// Attempts that ended without success (crash, preemption, budget stop).
    pub retries: u32,
    /// Why the last decision about it was made.
    pub reason: String,
    /// Attempts whose node was lost while they held GPUs: if that node comes
    /// back, it is told to stop them before it gets new work.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<LostAttempt>,
    /// W3C `traceparent` of the request that submitted it: what is done for
    /// the job later (placement, signals, events) joins that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// An attempt left behind on a node that went silent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostAttempt {
    pub node: String,
    pub attempt: u32,
}

impl Job {
    pub fn new(id: String, spec: JobSpec, now: DateTime<Utc>) -> Self {
        Self {
            id,
            spec,
            state: State::Queued,
            submitted_at: now,
            seq: 0,
            attempt: 0,
            node: None,
            gpus: Vec::new(),
            cloud: false,
            not_before: None,
            planned_start: None,
            assigned_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            last_checkpoint: None,
            retries: 0,
            lost: Vec::new(),
            reason: "submitted".into(),
            trace: None,
        }
    }

    pub fn duration(&self) -> chrono::Duration {
        chrono::Duration::seconds(self.spec.estimated_duration_s.min(i64::MAX as u64) as i64)
    }

    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.spec.deadline.as_ref().and_then(costmesh_contracts::from_timestamp)
    }

    /// The latest start that still meets the deadline.
    pub fn latest_start(&self) -> Option<DateTime<Utc>> {
        self.deadline().map(|d| d - self.duration())
    }
}

/// A refused job spec: which field and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError { field, reason: reason.into() }
}

/// Checks a job spec as submitted.
pub fn validate(spec: &JobSpec, now: DateTime<Utc>) -> Result<(), SpecError> {
    if spec.name.trim().is_empty() {
        return Err(bad("name", "must not be empty"));
    }
    if spec.name.len() > 128 {
        return Err(bad("name", "must be at most 128 characters"));
    }
    if spec.command.trim().is_empty() {
        return Err(bad("command", "must not be empty"));
    }
    if spec.gpus == 0 {
        return Err(bad("gpus", "must be at least 1"));
    }
    if spec.gpus > 64 {
        return Err(bad("gpus", "must be at most 64"));
    }
    if spec.estimated_duration_s == 0 {
        return Err(bad("estimated_duration_s", "must be greater than zero"));
    }
    if spec.estimated_duration_s > 90 * 24 * 3600 {
        return Err(bad("estimated_duration_s", "must be at most 90 days"));
    }
    if JobClass::try_from(spec.class).unwrap_or(JobClass::Unspecified) == JobClass::Unspecified {
        return Err(bad("class", "must be training, inference or batch"));
    }
    if let Some(d) = &spec.deadline {
        let Some(d) = costmesh_contracts::from_timestamp(d) else {
            return Err(bad("deadline", "is not a valid time"));
        };
        let finish = now + chrono::Duration::seconds(spec.estimated_duration_s as i64);
        if d < finish {
            return Err(bad(
                "deadline",
                format!("{d} is earlier than now plus the estimated duration ({finish}): it cannot be met"),
            ));
        }
    }
    if !spec.checkpoint_dir.is_empty() && !spec.checkpoint_dir.starts_with('/') {
        return Err(bad("checkpoint_dir", "must be an absolute path"));
    }
    if let Some(k) = spec.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(bad("env", format!("{k:?} is not a valid variable name")));
    }
    if spec.max_retries > 100 {
        return Err(bad("max_retries", "must be at most 100"));
    }
    if !spec.team.is_empty() {
        costmesh_contracts::subjects::validate_name(&spec.team).map_err(|why| bad("team", why))?;
        if spec.team.len() > MAX_TEAM_LEN {
            return Err(bad("team", format!("must be at most {MAX_TEAM_LEN} characters")));
        }
    }
    validate_labels(&spec.labels)
}

/// Team names become Prometheus label values and report rows.
pub const MAX_TEAM_LEN: usize = 63;
/// Labels a job may carry, and their sizes (they travel in every job event).
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 128;

/// Labels: at most [`MAX_LABELS`]; keys of letters, digits, `_ - . /`
/// (Kubernetes-style), values of printable characters; both bounded.
pub fn validate_labels(labels: &std::collections::HashMap<String, String>) -> Result<(), SpecError> {
    if labels.len() > MAX_LABELS {
        return Err(bad("labels", format!("at most {MAX_LABELS} labels (got {})", labels.len())));
    }
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for k in keys {
        let v = &labels[k];
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN {
            return Err(bad("labels", format!("key {k:?} must be 1 to {MAX_LABEL_KEY_LEN} characters")));
        }
        if let Some(c) = k.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))) {
            return Err(bad(
                "labels",
                format!("key {k:?} may hold only letters, digits, '_', '-', '.' and '/' (found {c:?})"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(bad(
                "labels",
                format!("value of {k:?} is {} bytes long; at most {MAX_LABEL_VALUE_LEN}", v.len()),
            ));
        }
        if v.chars().any(|c| c.is_control()) {
            return Err(bad("labels", format!("value of {k:?} may not hold control characters")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            name: "train".into(),
            command: "/bin/true".into(),
            gpus: 1,
            estimated_duration_s: 3600,
            class: JobClass::Training as i32,
            ..Default::default()
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let now = Utc::now();
        assert_eq!(validate(&spec(), now), Ok(()));
        type Break = fn(&mut JobSpec);
        let cases: Vec<(Break, &str)> = vec![
            (|s| s.name.clear(), "name"),
            (|s| s.command = " ".into(), "command"),
            (|s| s.gpus = 0, "gpus"),
            (|s| s.estimated_duration_s = 0, "estimated_duration_s"),
            (|s| s.class = 0, "class"),
            (|s| s.checkpoint_dir = "relative/dir".into(), "checkpoint_dir"),
            (
                |s| s.deadline = Some(costmesh_contracts::timestamp(Utc::now() + chrono::Duration::minutes(30))),
                "deadline",
            ),
            (|s| drop(s.env.insert("A=B".into(), "x".into())), "env"),
            (|s| s.team = "ml.research".into(), "team"),
            (|s| s.team = "t".repeat(64), "team"),
            (|s| drop(s.labels.insert("model".into(), "x".repeat(129))), "labels"),
            (|s| drop(s.labels.insert("bad key".into(), "x".into())), "labels"),
            (
                |s| {
                    for i in 0..17 {
                        s.labels.insert(format!("k{i}"), "v".into());
                    }
                },
                "labels",
            ),
        ];
        for (break_it, field) in cases {
            let mut s = spec();
            break_it(&mut s);
            assert_eq!(validate(&s, now).unwrap_err().field, field);
        }
    }
}
