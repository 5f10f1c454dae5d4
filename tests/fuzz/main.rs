//! Property tests at the service edges: every service's config loading fed
//! garbage through its real keys (files and environment), the GCP budget
//! notification parser fed arbitrary bytes and lookalike JSON, and the
//! gpu-agent's job policy fed arbitrary commands. No panic; every refusal
//! names what is wrong. A few thousand cases each.
use std::collections::{BTreeMap, HashMap};

use costmesh_runtime::config::{load_service, ConfigError, Validate};
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Every leaf key of a config, dotted (`thermal.target_c`).
fn leaf_keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaf_keys(&key, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn keys_of<S: Serialize + Default>(section: &str) -> Vec<String> {
    let mut out = Vec::new();
    leaf_keys(section, &toml::Value::try_from(S::default()).expect("config serialises"), &mut out);
    for common in [
        "nats.url",
        "nats.inbox_prefix",
        "redis.url",
        "mesh.subject_prefix",
        "mesh.limits.events_max_bytes",
        "log.level",
    ] {
        out.push(common.to_string());
    }
    out
}

/// Values an operator might mistype, and plain garbage.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e309".to_string()),
        Just("18446744073709551616".to_string()),
        Just("true".to_string()),
        Just("[1, \"x\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("-5s".to_string()),
        Just("999999999999h".to_string()),
        Just("0ms".to_string()),
        Just("nats://u:p@".to_string()),
        Just("../../etc".to_string()),
        Just("a.b.*".to_string()),
        "[0-9]{1,12}",
        "[0-9]{1,4}(ms|s|m|h|d)",
        ".{0,24}",
    ]
}

fn check<S: DeserializeOwned + Serialize + Default + Validate>(section: &'static str, env: BTreeMap<String, String>) {
    if let Err(ConfigError { key, reason, .. }) = load_service::<S>(None, &env, section) {
        assert!(!reason.trim().is_empty(), "{key}: a refusal without a reason");
        assert!(!key.trim().is_empty(), "a refusal without a key: {reason}");
    }
}

fn env_for(keys: &[String], picks: Vec<(usize, String)>) -> BTreeMap<String, String> {
    picks
        .into_iter()
        .map(|(i, v)| (format!("COSTMESH__{}", keys[i % keys.len()].replace('.', "__").to_ascii_uppercase()), v))
        .collect()
}

macro_rules! config_fuzz {
    ($name:ident, $ty:ty, $section:literal) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn $name(picks in proptest::collection::vec((any::<usize>(), value()), 1..4)) {
                let keys = keys_of::<$ty>($section);
                check::<$ty>($section, env_for(&keys, picks));
            }
        }
    };
}

config_fuzz!(gpu_agent_config, costmesh_gpu_agent::Config, "gpu_agent");
config_fuzz!(scheduler_config, costmesh_scheduler::Config, "scheduler");
config_fuzz!(storage_janitor_config, costmesh_storage_janitor::Config, "storage_janitor");
config_fuzz!(cost_watcher_config, costmesh_cost_watcher::Config, "cost_watcher");
config_fuzz!(cache_gateway_config, costmesh_cache_gateway::Config, "cache_gateway");

fn attributes() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(
        prop_oneof![
            Just("schemaVersion".to_string()),
            Just("budgetId".to_string()),
            Just("billingAccountId".to_string()),
            ".{0,8}"
        ],
        prop_oneof![Just("1.0".to_string()), ".{0,12}"],
        0..4,
    )
}

fn notification_json() -> impl Strategy<Value = serde_json::Value> {
    let field = prop_oneof![
        Just("budgetDisplayName"),
        Just("costAmount"),
        Just("costIntervalStart"),
        Just("budgetAmount"),
        Just("budgetAmountType"),
        Just("currencyCode"),
        Just("alertThresholdExceeded"),
        Just("forecastThresholdExceeded"),
    ];
    let v = prop_oneof![
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(serde_json::Value::Number).unwrap_or_default()),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("2026-12-01T00:00:00Z")),
        ".{0,16}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!([1, 2])),
    ];
    proptest::collection::btree_map(field, v, 0..8)
        .prop_map(|m| serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn config_files_of_any_text_are_refused_with_a_reason(text in ".{0,200}") {
        if let Err(e) = load_service::<costmesh_scheduler::Config>(Some(&text), &BTreeMap::new(), "scheduler") {
            prop_assert!(!e.reason.trim().is_empty());
        }
    }

    #[test]
    fn gcp_notifications_of_any_bytes_are_explained(data in proptest::collection::vec(any::<u8>(), 0..300), attrs in attributes()) {
        if let Err(e) = costmesh_cost_watcher::billing::parse(&data, &attrs, "m-1") {
            prop_assert!(!e.trim().is_empty());
        }
    }

    #[test]
    fn gcp_lookalike_notifications_are_checked(body in notification_json(), attrs in attributes()) {
        let data = serde_json::to_vec(&body).unwrap();
        match costmesh_cost_watcher::billing::parse(&data, &attrs, "m-1") {
            Ok(n) => {
                prop_assert!(n.cost_amount.is_finite() && n.cost_amount >= 0.0);
                prop_assert!(n.budget_amount.is_finite() && n.budget_amount > 0.0);
                prop_assert!(!n.budget_id.is_empty());
            }
            Err(e) => prop_assert!(!e.trim().is_empty()),
        }
    }

    #[test]
    fn job_commands_outside_the_allow_list_never_resolve_inside_it(cmd in prop_oneof![
        ".{0,40}",
        "(/usr/bin/|/bin/|\\./|\\.\\./|/tmp/)?(sh|bash|\\.\\./sh|touch|env)",
        "/opt/allowed/(\\.\\./)*[a-z./]{0,20}",
    ]) {
        let root = std::env::temp_dir().join(format!("costmesh-fuzz-policy-{}", std::process::id()));
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        let script = allowed.join("train.sh");
        if !script.exists() {
            std::fs::write(&script, "#!/bin/sh\n").unwrap();
        }
        let cfg = costmesh_gpu_agent::config::JobsConfig {
            allowed_commands: vec![allowed.clone()],
            run_as_user: costmesh_testkit::current_user(),
            ..Default::default()
        };
        let policy = costmesh_gpu_agent::policy::Policy::from_config(&cfg).unwrap();
        let cmd = cmd.replace("/opt/allowed", &allowed.display().to_string());
        match policy.check(&cmd, &HashMap::new()) {
            Ok(path) => prop_assert!(path.starts_with(std::fs::canonicalize(&allowed).unwrap()), "{} ran from {}", cmd, path.display()),
            Err(why) => prop_assert!(!why.trim().is_empty()),
        }
    }
}
