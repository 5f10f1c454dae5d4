//! NATS least privilege: what each user of a mesh may publish and subscribe.
//!
//! Derived from the subject table ([`SUBJECTS`], [`REQUESTS`]) and from the
//! consumers and KV buckets each service binds ([`CONSUMERS`], [`BUCKETS`]),
//! so `costmesh nats-config` cannot drift from the code: a service that
//! starts using a subject without a row here is refused by the server, and
//! the mesh test that runs every service under the generated authorization
//! fails.
//!
//! - Data subjects: a service publishes only the families whose
//!   `publisher` names it; a gpu-agent only under its own node's tokens
//!   (`telemetry.gpu.<its node>.*`, `preemption.<its node>`).
//! - Requests: a client user may ask the scheduler's and cost-watcher's
//!   APIs and the nodes' logs; it may publish nothing else.
//! - JetStream: each service may bind only its own durable consumers (a
//!   gpu-agent's is filtered to `node.<its node>.*`, and the filter is part
//!   of the permitted subject), use only its own KV bucket, and only the
//!   control-plane services may create or update the events stream.
//! - Replies: every user has its own inbox prefix (`_INBOX_<public key>`),
//!   so no one can read another user's replies or consumer deliveries.
use costmesh_contracts::subjects::{Durability, REQUESTS, SUBJECTS};
use costmesh_contracts::Subjects;

/// A user of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The gpu-agent of one node.
    GpuAgent {
        node: String,
    },
    Scheduler,
    CostWatcher,
    StorageJanitor,
    CacheGateway,
    /// A person or tool using the job and cost APIs (`costmesh jobs`, `costmesh cost`).
    Client {
        name: String,
    },
    /// An operator with every permission (`costmesh view`, the `nats` CLI).
    Admin {
        name: String,
    },
}

/// The control-plane services, in the order `nats-config` prints them.
pub const SERVICES: [Role; 4] = [Role::Scheduler, Role::CostWatcher, Role::StorageJanitor, Role::CacheGateway];

/// Durable consumers each service binds: (service, purpose, filters).
/// The consumer is named `<service>-<purpose>` ([`crate::events::durable_name`]).
pub const CONSUMERS: &[(&str, &str, &[&str])] = &[
    ("scheduler", "inputs", &["jobs.>", "preemption.*", "budget.>"]),
    ("cost-watcher", "reports", &["storage.report"]),
    ("cost-watcher", "jobs", &["jobs.>"]),
    ("storage-janitor", "events", &["budget.>", "jobs.>", "node.*.assign"]),
    ("cache-gateway", "world", &["preemption.*", "budget.>"]),
    ("gpu-agent", "node-<node>", &["node.<node>.*"]),
];

/// KV buckets each service owns: (service, bucket name after the prefix).
pub const BUCKETS: &[(&str, &str)] = &[
    ("scheduler", "jobs"),
    ("scheduler", "scheduler_lease"),
    ("cost-watcher", "cost_watcher"),
    ("cost-watcher", "cost_watcher_lease"),
    ("storage-janitor", "storage_janitor"),
];

/// Services that rebuild state from the newest event per subject at start
/// (an ephemeral consumer each time).
const READS_LATEST: &[&str] = &["scheduler", "cache-gateway"];

impl Role {
    /// The service name it acts as (`client`/`admin` for people).
    pub fn service(&self) -> &str {
        match self {
            Role::GpuAgent { .. } => "gpu-agent",
            Role::Scheduler => "scheduler",
            Role::CostWatcher => "cost-watcher",
            Role::StorageJanitor => "storage-janitor",
            Role::CacheGateway => "cache-gateway",
            Role::Client { .. } => "client",
            Role::Admin { .. } => "admin",
        }
    }

    /// The user's name, which is also its key file's name.
    pub fn user(&self) -> String {
        match self {
            Role::GpuAgent { node } => format!("gpu-agent-{node}"),
            Role::Client { name } => format!("client-{name}"),
            Role::Admin { name } => format!("admin-{name}"),
            other => other.service().to_string(),
        }
    }

    fn node(&self) -> Option<&str> {
        match self {
            Role::GpuAgent { node } => Some(node),
            _ => None,
        }
    }
}

/// What one user may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests (a reply goes to the asker's inbox).
    pub allow_responses: bool,
}

fn names(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `pattern` (`telemetry.gpu.<node>.<gpu>`) under the prefix, `<node>` as
/// this role's node (or `*`), `<service>` as its service, other
/// placeholders as `*`.
fn subject(subjects: &Subjects, pattern: &str, role: &Role) -> String {
    let tokens: Vec<String> = pattern
        .split('.')
        .map(|t| match t {
            "<node>" => role.node().unwrap_or("*").to_string(),
            "<service>" => role.service().to_string(),
            t if t.starts_with('<') => "*".to_string(),
            t => t.to_string(),
        })
        .collect();
    format!("{}.{}", subjects.prefix(), tokens.join("."))
}

/// The inbox prefix of the user with this public nkey.
pub fn inbox_prefix(public_key: &str) -> String {
    costmesh_bus::nkey_inbox_prefix(public_key)
}

/// The permissions of `role` under `subjects`' prefix, replies on `inbox`.
pub fn permissions(role: &Role, subjects: &Subjects, inbox: &str) -> Permissions {
    if let Role::Admin { .. } = role {
        return Permissions { publish: vec![">".into()], subscribe: vec![">".into()], allow_responses: true };
    }
    let service = role.service();
    // Its own inbox: replies, deliveries, and the echo `Bus::flush` sends itself.
    let mut p = Permissions {
        publish: vec![format!("{inbox}.>")],
        subscribe: vec![format!("{inbox}.>")],
        ..Default::default()
    };
    for s in SUBJECTS {
        let publishes = s.publisher == "every service" && !matches!(role, Role::Client { .. })
            || names(s.publisher).any(|n| n == service);
        if publishes {
            p.publish.push(subject(subjects, s.pattern, role));
        }
        if s.durability == Durability::Core && names(s.subscribers).any(|n| n == service) {
            p.subscribe.push(subject(subjects, s.pattern, &Role::Scheduler));
        }
    }
    for r in REQUESTS {
        if r.served_by == service {
            p.subscribe.push(subject(subjects, r.pattern, role));
            p.allow_responses = true;
        }
        if names(r.asked_by).any(|n| n == service) {
            p.publish.push(subject(subjects, r.pattern, &Role::Scheduler));
        }
    }
    if let Role::Client { .. } = role {
        return p;
    }
    // JetStream: the events stream, this service's consumers and bucket.
    let stream = subjects.stream_name();
    let api = |rest: String| format!("$JS.API.{rest}");
    p.publish.push(api("INFO".into()));
    p.publish.push(api(format!("STREAM.INFO.{stream}")));
    if role.node().is_none() {
        p.publish.push(api(format!("STREAM.CREATE.{stream}")));
        p.publish.push(api(format!("STREAM.UPDATE.{stream}")));
    }
    for (svc, purpose, filters) in CONSUMERS.iter().filter(|(s, _, _)| *s == service) {
        let purpose = purpose.replace("<node>", role.node().unwrap_or("*"));
        let durable = crate::events::durable_name(svc, &purpose);
        match filters {
            // One filter is part of the create subject: the server checks it.
            [one] => {
                p.publish.push(api(format!("CONSUMER.CREATE.{stream}.{durable}.{}", subject(subjects, one, role))))
            }
            _ => p.publish.push(api(format!("CONSUMER.CREATE.{stream}.{durable}"))),
        }
        p.publish.push(api(format!("CONSUMER.INFO.{stream}.{durable}")));
        p.publish.push(api(format!("CONSUMER.MSG.NEXT.{stream}.{durable}")));
        p.publish.push(format!("$JS.ACK.{stream}.{durable}.>"));
    }
    if READS_LATEST.contains(&service) {
        p.publish.push(api(format!("CONSUMER.CREATE.{stream}")));
        p.publish.push(api(format!("CONSUMER.INFO.{stream}.*")));
        p.publish.push(api(format!("CONSUMER.MSG.NEXT.{stream}.*")));
    }
    for (_, name) in BUCKETS.iter().filter(|(s, _)| *s == service) {
        let bucket = crate::service::kv_bucket(subjects, name);
        let kv = format!("KV_{bucket}");
        for rest in [
            format!("STREAM.INFO.{kv}"),
            format!("STREAM.CREATE.{kv}"),
            format!("STREAM.UPDATE.{kv}"),
            format!("STREAM.MSG.GET.{kv}"),
            format!("DIRECT.GET.{kv}"),
            format!("DIRECT.GET.{kv}.>"),
            format!("CONSUMER.CREATE.{kv}"),
            format!("CONSUMER.CREATE.{kv}.>"),
            format!("CONSUMER.INFO.{kv}.*"),
            format!("CONSUMER.DELETE.{kv}.*"),
            format!("CONSUMER.MSG.NEXT.{kv}.*"),
        ] {
            p.publish.push(api(rest));
        }
        p.publish.push(format!("$KV.{bucket}.>"));
        p.publish.push(format!("$JS.FC.{kv}.>"));
        p.publish.push(format!("$JS.ACK.{kv}.>"));
    }
    p.publish.dedup();
    p.subscribe.dedup();
    p
}

fn quoted(list: &[String]) -> String {
    list.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// The nats-server `authorization` block for these users (role and public
/// nkey each). No user, no access: anonymous clients are refused.
pub fn render(subjects: &Subjects, users: &[(Role, String)]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# costmesh NATS authorization for subject prefix {:?}, generated by `costmesh nats-config`.\n",
        subjects.prefix()
    ));
    out.push_str("# Regenerate it when nodes or clients change; each user's seed is in its key file.\n");
    out.push_str("authorization {\n  users = [\n");
    for (role, public) in users {
        let p = permissions(role, subjects, &inbox_prefix(public));
        out.push_str(&format!("    # {} (inbox {})\n", role.user(), inbox_prefix(public)));
        out.push_str(&format!("    {{ nkey: \"{public}\", permissions: {{\n"));
        out.push_str(&format!("        publish: {{ allow: [{}] }}\n", quoted(&p.publish)));
        out.push_str(&format!("        subscribe: {{ allow: [{}] }}\n", quoted(&p.subscribe)));
        if p.allow_responses {
            out.push_str("        allow_responses: true\n");
        }
        out.push_str("    } }\n");
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(list: &[String], subject: &str) -> bool {
        list.iter().any(|pat| {
            let (p, s): (Vec<&str>, Vec<&str>) = (pat.split('.').collect(), subject.split('.').collect());
            let mut i = 0;
            while i < p.len() {
                if p[i] == ">" {
                    return s.len() > i;
                }
                if i >= s.len() || (p[i] != "*" && p[i] != s[i]) {
                    return false;
                }
                i += 1;
            }
            i == s.len()
        })
    }

    #[test]
    fn an_agent_publishes_only_its_own_nodes_telemetry() {
        let s = Subjects::new("acme.cm").unwrap();
        let p = permissions(&Role::GpuAgent { node: "n1".into() }, &s, "_INBOX_U1");
        assert!(allows(&p.publish, &s.gpu_telemetry("n1", 0)));
        assert!(!allows(&p.publish, &s.gpu_telemetry("n2", 0)));
        assert!(allows(&p.publish, &s.preemption("n1")) && !allows(&p.publish, &s.preemption("n2")));
        assert!(!allows(&p.publish, &s.budget("cloud", costmesh_contracts::v1::BudgetState::Exceeded)));
        assert!(!allows(&p.publish, &s.node_assign("n1")), "an agent cannot assign itself work");
        assert!(allows(&p.subscribe, &s.node_logs("n1")) && !allows(&p.subscribe, &s.node_logs("n2")));
        assert!(!allows(&p.subscribe, "_INBOX.x"), "only its own inbox");
        assert!(allows(&p.publish, "$JS.API.CONSUMER.CREATE.ACME_CM_EVENTS.gpu-agent-node-n1.acme.cm.node.n1.*"));
        assert!(!allows(&p.publish, "$JS.API.CONSUMER.CREATE.ACME_CM_EVENTS.gpu-agent-node-n1.acme.cm.jobs.>"));
        assert!(!allows(&p.publish, "$JS.API.STREAM.DELETE.ACME_CM_EVENTS"));
        assert!(!allows(&p.publish, "$JS.API.STREAM.UPDATE.ACME_CM_EVENTS"));
    }

    #[test]
    fn a_client_asks_but_cannot_assign_or_book() {
        let s = Subjects::default();
        let p = permissions(&Role::Client { name: "alice".into() }, &s, "_INBOX_U2");
        assert!(allows(&p.publish, &s.api("scheduler", "submit")));
        assert!(allows(&p.publish, &s.node_logs("n7")));
        assert!(!allows(&p.publish, &s.node_assign("n1")));
        assert!(!allows(&p.publish, &s.gpu_telemetry("n1", 0)));
        assert!(!allows(&p.publish, &s.dlq("client")));
        assert!(!p.publish.iter().any(|x| x.starts_with("$JS")), "{:?}", p.publish);
        assert!(!p.allow_responses);
    }

    #[test]
    fn the_scheduler_owns_assignments_and_the_watcher_budgets() {
        let s = Subjects::default();
        let sched = permissions(&Role::Scheduler, &s, "_INBOX_U3");
        assert!(allows(&sched.publish, &s.node_assign("any-node")));
        assert!(allows(&sched.subscribe, &s.gpu_telemetry_all()));
        assert!(allows(&sched.subscribe, &s.api("scheduler", "list")) && sched.allow_responses);
        assert!(!allows(&sched.publish, &s.budget("cloud", costmesh_contracts::v1::BudgetState::Ok)));
        let cw = permissions(&Role::CostWatcher, &s, "_INBOX_U4");
        assert!(allows(&cw.publish, &s.budget("cloud", costmesh_contracts::v1::BudgetState::Ok)));
        assert!(allows(&cw.publish, "$KV.costmesh_cost_watcher.ledger"));
        assert!(!allows(&cw.publish, "$KV.costmesh_jobs.j1"), "another service's bucket");
        assert!(allows(&cw.publish, "$KV.costmesh_cost_watcher_lease.cost-watcher"));
        assert!(!allows(&cw.publish, "$KV.costmesh_scheduler_lease.scheduler"), "another service's lease");
        let text = render(&s, &[(Role::Scheduler, "UABC".into())]);
        assert!(text.contains("nkey: \"UABC\"") && text.contains("allow_responses: true"), "{text}");
    }
}
