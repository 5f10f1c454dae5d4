//! The typed subject builder.
//!
//! Every subject is `<prefix>.<family>...`; the prefix (default `costmesh`)
//! lets several meshes, or several tests, share one NATS server. Tokens taken
//! from data (node, job, scope) are made safe: characters that NATS treats
//! specially (`.`, `*`, `>`, whitespace) become `_`.
use crate::v1::{BudgetState, JobEventKind};

/// Whether a subject's events must survive a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Core NATS: at most once; the payload carries cumulative counters.
    Core,
    /// JetStream: stored, de-duplicated by `Nats-Msg-Id`, acked by consumers.
    JetStream,
}

/// One row of the subject reference (docs/subjects.md is checked against it).
#[derive(Clone, Copy, Debug)]
pub struct SubjectSpec {
    /// Pattern after the prefix, placeholders in angle brackets.
    pub pattern: &'static str,
    /// Full proto name of the payload, or `*` for any (dead letters).
    pub message: &'static str,
    pub durability: Durability,
    /// Who may publish it (comma-separated service names, or `every
    /// service`). NATS permissions are generated from this column.
    pub publisher: &'static str,
    /// Who subscribes to it on core NATS (JetStream subjects are read
    /// through consumers, which the permissions name separately).
    pub subscribers: &'static str,
}

/// One request-reply subject family (core NATS, JSON bodies).
#[derive(Clone, Copy, Debug)]
pub struct RequestSpec {
    /// Pattern after the prefix, placeholders in angle brackets.
    pub pattern: &'static str,
    /// The service that answers.
    pub served_by: &'static str,
    /// Who may ask: `client` (configured client users) and services.
    pub asked_by: &'static str,
}

/// Every request-reply family.
pub const REQUESTS: &[RequestSpec] = &[
    RequestSpec { pattern: "api.scheduler.<verb>", served_by: "scheduler", asked_by: "client" },
    RequestSpec { pattern: "api.cost-watcher.<verb>", served_by: "cost-watcher", asked_by: "client" },
    RequestSpec { pattern: "node.<node>.logs", served_by: "gpu-agent", asked_by: "client" },
];

/// Every subject family costmesh uses.
pub const SUBJECTS: &[SubjectSpec] = &[
    SubjectSpec {
        pattern: "telemetry.gpu.<node>.<gpu>",
        message: "costmesh.v1.GpuSample",
        durability: Durability::Core,
        publisher: "gpu-agent",
        subscribers: "scheduler, cost-watcher",
    },
    SubjectSpec {
        pattern: "preemption.<node>",
        message: "costmesh.v1.PreemptionNotice",
        durability: Durability::JetStream,
        publisher: "gpu-agent",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "budget.<scope>.<state>",
        message: "costmesh.v1.BudgetEvent",
        durability: Durability::JetStream,
        publisher: "cost-watcher",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "jobs.<job>.<event>",
        message: "costmesh.v1.JobEvent",
        durability: Durability::JetStream,
        publisher: "scheduler, gpu-agent",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "node.<node>.assign",
        message: "costmesh.v1.JobAssignment",
        durability: Durability::JetStream,
        publisher: "scheduler",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "node.<node>.signal",
        message: "costmesh.v1.JobSignal",
        durability: Durability::JetStream,
        publisher: "scheduler",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "node.<node>.power",
        message: "costmesh.v1.PowerCommand",
        durability: Durability::JetStream,
        publisher: "scheduler",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "storage.report",
        message: "costmesh.v1.StorageReport",
        durability: Durability::JetStream,
        publisher: "storage-janitor",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "cache.stats",
        message: "costmesh.v1.CacheStats",
        durability: Durability::Core,
        publisher: "cache-gateway",
        subscribers: "cost-watcher",
    },
    SubjectSpec {
        pattern: "actions.<kind>",
        message: "costmesh.v1.Action",
        durability: Durability::JetStream,
        publisher: "scheduler, storage-janitor, gpu-agent",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "billing.gcp.<budget>",
        message: "costmesh.v1.CloudBudgetNotification",
        durability: Durability::JetStream,
        publisher: "cost-watcher",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "cost.job.<job>",
        message: "costmesh.v1.JobCost",
        durability: Durability::JetStream,
        publisher: "cost-watcher",
        subscribers: "",
    },
    SubjectSpec {
        pattern: "dlq.<service>",
        message: "*",
        durability: Durability::JetStream,
        publisher: "every service",
        subscribers: "",
    },
];

/// Whether `subject` (without the prefix) is of `pattern`'s family:
/// `<placeholders>` stand for one token each.
fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let (p, s): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), subject.split('.').collect());
    p.len() == s.len() && p.iter().zip(&s).all(|(p, t)| p.starts_with('<') || p == t)
}

/// Makes a data value safe to use as one subject token.
pub fn token(value: &str) -> String {
    if value.is_empty() {
        return "_".to_string();
    }
    value
        .chars()
        .map(|c| if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() { '_' } else { c })
        .collect()
}

/// Checks that `value` can be used as a token unchanged (for config values
/// such as node names, which must round-trip).
pub fn validate_token(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if token(value) != value {
        return Err(format!("{value:?} may not contain '.', '*', '>' or whitespace"));
    }
    Ok(())
}

/// Checks a name that becomes a subject token *and* a file name (a job id,
/// a node name, a route): 1 to 128 of `A-Z a-z 0-9 _ -`, not starting with
/// `-`. So no `/`, no `..`, no wildcard and nothing a shell or a path
/// would read differently.
pub fn validate_name(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 128 {
        return Err(format!("{value:?} must be 1 to 128 characters"));
    }
    if value.starts_with('-') {
        return Err(format!("{value:?} may not start with '-'"));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("{value:?} may hold only letters, digits, '_' and '-' (found {c:?})"));
    }
    Ok(())
}

/// Lower-case name of an enum value without its type prefix
/// (`BUDGET_STATE_EXCEEDED` -> `exceeded`).
fn enum_token(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

/// Builds subjects under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self { prefix: "costmesh".into() }
    }
}

impl Subjects {
    /// `prefix` may hold dots (`acme.costmesh`) but no wildcards or spaces.
    pub fn new(prefix: &str) -> Result<Self, String> {
        if prefix.is_empty() || prefix.split('.').any(|t| validate_token(t).is_err()) {
            return Err(format!(
                "subject prefix {prefix:?} must be dot-separated tokens without '*', '>' or whitespace"
            ));
        }
        Ok(Self { prefix: prefix.to_string() })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn join(&self, rest: &[&str]) -> String {
        let mut s = self.prefix.clone();
        for t in rest {
            s.push('.');
            s.push_str(t);
        }
        s
    }

    pub fn gpu_telemetry(&self, node: &str, gpu: u32) -> String {
        self.join(&["telemetry", "gpu", &token(node), &gpu.to_string()])
    }
    /// Every GPU sample from every node (`*.*`, not `>`: a subscription
    /// must fit inside the permission generated from the subject table).
    pub fn gpu_telemetry_all(&self) -> String {
        self.join(&["telemetry", "gpu", "*", "*"])
    }
    pub fn preemption(&self, node: &str) -> String {
        self.join(&["preemption", &token(node)])
    }
    pub fn preemption_all(&self) -> String {
        self.join(&["preemption", "*"])
    }
    pub fn budget(&self, scope: &str, state: BudgetState) -> String {
        self.join(&["budget", &token(scope), &enum_token(state.as_str_name(), "BUDGET_STATE_")])
    }
    pub fn budget_all(&self) -> String {
        self.join(&["budget", ">"])
    }
    pub fn job(&self, job: &str, kind: JobEventKind) -> String {
        self.join(&["jobs", &token(job), &enum_token(kind.as_str_name(), "JOB_EVENT_KIND_")])
    }
    /// What a job cost, published once when it ends.
    pub fn job_cost(&self, job: &str) -> String {
        self.join(&["cost", "job", &token(job)])
    }
    pub fn jobs_all(&self) -> String {
        self.join(&["jobs", ">"])
    }
    pub fn node_assign(&self, node: &str) -> String {
        self.join(&["node", &token(node), "assign"])
    }
    pub fn node_signal(&self, node: &str) -> String {
        self.join(&["node", &token(node), "signal"])
    }
    pub fn node_power(&self, node: &str) -> String {
        self.join(&["node", &token(node), "power"])
    }
    /// Request-reply: a job's log from the node that ran it.
    pub fn node_logs(&self, node: &str) -> String {
        self.join(&["node", &token(node), "logs"])
    }
    /// A GCP budget notification, relayed.
    pub fn billing_gcp(&self, budget: &str) -> String {
        self.join(&["billing", "gcp", &token(budget)])
    }
    /// Every node's job assignments.
    pub fn node_assign_all(&self) -> String {
        self.join(&["node", "*", "assign"])
    }
    /// Every command to one node.
    pub fn node_all(&self, node: &str) -> String {
        self.join(&["node", &token(node), "*"])
    }
    pub fn storage_report(&self) -> String {
        self.join(&["storage", "report"])
    }
    pub fn cache_stats(&self) -> String {
        self.join(&["cache", "stats"])
    }
    pub fn action(&self, kind: &str) -> String {
        self.join(&["actions", &token(kind)])
    }
    pub fn actions_all(&self) -> String {
        self.join(&["actions", "*"])
    }
    pub fn dlq(&self, service: &str) -> String {
        self.join(&["dlq", &token(service)])
    }
    pub fn dlq_all(&self) -> String {
        self.join(&["dlq", "*"])
    }
    /// Request-reply API of one service (`<prefix>.api.<service>.<verb>`).
    pub fn api(&self, service: &str, verb: &str) -> String {
        self.join(&["api", &token(service), &token(verb)])
    }
    /// Everything under the prefix.
    pub fn all(&self) -> String {
        self.join(&[">"])
    }

    /// The subjects the events stream captures (every JetStream family).
    pub fn durable_subjects(&self) -> Vec<String> {
        vec![
            self.join(&["preemption", ">"]),
            self.budget_all(),
            self.jobs_all(),
            self.join(&["node", "*", "assign"]),
            self.join(&["node", "*", "signal"]),
            self.join(&["node", "*", "power"]),
            self.join(&["storage", ">"]),
            self.join(&["actions", ">"]),
            self.join(&["billing", ">"]),
            self.join(&["cost", ">"]),
            self.join(&["dlq", ">"]),
        ]
    }

    /// Name of the JetStream stream that holds this prefix's durable events
    /// (stream names may not contain dots).
    /// The subject table's row for `subject` (`None` for a subject of
    /// another prefix or one not in the table).
    pub fn spec_of(&self, subject: &str) -> Option<&'static SubjectSpec> {
        let rest = subject.strip_prefix(self.prefix())?.strip_prefix('.')?;
        SUBJECTS.iter().find(|s| pattern_matches(s.pattern, rest))
    }

    /// The payload type the subject table gives `subject` (a full proto
    /// name); `None` for a subject of another prefix, one not in the table,
    /// or one that carries anything (dead letters).
    pub fn expected_message(&self, subject: &str) -> Option<&'static str> {
        self.spec_of(subject).map(|s| s.message).filter(|m| *m != "*")
    }

    /// The low-cardinality name of `subject`'s family, for span names and
    /// `messaging.destination.template`: `costmesh.jobs.{job}.{event}`.
    /// Request subjects too (`costmesh.api.scheduler.{verb}`).
    pub fn template(&self, subject: &str) -> Option<String> {
        let rest = subject.strip_prefix(self.prefix())?.strip_prefix('.')?;
        let pattern = SUBJECTS
            .iter()
            .map(|s| s.pattern)
            .chain(REQUESTS.iter().map(|r| r.pattern))
            .find(|p| pattern_matches(p, rest))?;
        Some(format!("{}.{}", self.prefix(), pattern.replace('<', "{").replace('>', "}")))
    }

    pub fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.prefix.replace(['.', '-'], "_").to_ascii_uppercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NATS wildcard matching of one subject against one filter.
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let (f, s): (Vec<&str>, Vec<&str>) = (filter.split('.').collect(), subject.split('.').collect());
        for (i, t) in f.iter().enumerate() {
            match *t {
                ">" => return s.len() > i,
                "*" if i < s.len() => {}
                t if s.get(i) == Some(&t) => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    #[test]
    fn the_events_stream_captures_every_jetstream_family_and_no_core_one() {
        let s = Subjects::default();
        for spec in SUBJECTS {
            let subject = format!(
                "costmesh.{}",
                spec.pattern.split('.').map(|t| if t.starts_with('<') { "x" } else { t }).collect::<Vec<_>>().join(".")
            );
            let captured = s.durable_subjects().iter().any(|f| nats_matches(f, &subject));
            assert_eq!(
                captured,
                spec.durability == Durability::JetStream,
                "{subject}: captured by the stream = {captured}"
            );
        }
    }

    #[test]
    fn each_subject_expects_its_payload_type() {
        let s = Subjects::new("cm").unwrap();
        assert_eq!(s.expected_message(&s.budget("cloud", BudgetState::Warning)), Some("costmesh.v1.BudgetEvent"));
        assert_eq!(s.expected_message(&s.node_assign("n1")), Some("costmesh.v1.JobAssignment"));
        assert_eq!(s.expected_message(&s.gpu_telemetry("n1", 3)), Some("costmesh.v1.GpuSample"));
        assert_eq!(s.expected_message(&s.job("j", JobEventKind::Started)), Some("costmesh.v1.JobEvent"));
        assert_eq!(s.expected_message(&s.dlq("scheduler")), None, "dead letters carry anything");
        assert_eq!(s.expected_message("other.budget.cloud.warning"), None, "another prefix");
        assert_eq!(s.expected_message("cm.budget.cloud"), None, "not a subject of the table");
        assert_eq!(s.template(&s.job("j-123", JobEventKind::Started)).as_deref(), Some("cm.jobs.{job}.{event}"));
        assert_eq!(s.template(&s.api("scheduler", "submit")).as_deref(), Some("cm.api.scheduler.{verb}"));
        assert_eq!(s.template("cm.nothing.here"), None);
    }

    #[test]
    fn names_that_become_paths_are_strict() {
        for ok in ["j-0c14921396ec", "gpu-1", "local_1", "A9"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/some/dir", "..", "a/b", "a.b", "-rf", "a b", "x*", "é", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn builds_the_documented_subjects() {
        let s = Subjects::default();
        assert_eq!(s.gpu_telemetry("node-1", 3), "costmesh.telemetry.gpu.node-1.3");
        assert_eq!(s.budget("cloud", BudgetState::Exceeded), "costmesh.budget.cloud.exceeded");
        assert_eq!(s.job("j1", JobEventKind::Checkpointed), "costmesh.jobs.j1.checkpointed");
        assert_eq!(s.node_power("n"), "costmesh.node.n.power");
        assert_eq!(s.stream_name(), "COSTMESH_EVENTS");
    }

    #[test]
    fn data_tokens_cannot_inject_wildcards() {
        let s = Subjects::new("t.x").unwrap();
        assert_eq!(s.preemption("a.b *>"), "t.x.preemption.a_b___");
        assert_eq!(s.preemption(""), "t.x.preemption._");
        assert!(Subjects::new("a.>").is_err());
        assert!(Subjects::new("").is_err());
        assert!(validate_token("gpu host").is_err());
    }
}
