//! The bucket's lifecycle rules in Google Cloud Storage's own JSON format
//! (the file `gcloud storage buckets update --lifecycle-file` and
//! `gsutil lifecycle set` take), from the tier policy and the rules.
use serde_json::{json, Value};

use crate::config::{ActionKind, Config};

/// GCS lifecycle configuration for the archive bucket.
pub fn gcs_lifecycle(cfg: &Config) -> Value {
    let t = &cfg.tiers;
    let mut rules = vec![
        json!({
            "action": {"type": "SetStorageClass", "storageClass": "NEARLINE"},
            "condition": {"age": t.nearline_after_days, "matchesStorageClass": ["STANDARD"]}
        }),
        json!({
            "action": {"type": "SetStorageClass", "storageClass": "COLDLINE"},
            "condition": {"age": t.coldline_after_days, "matchesStorageClass": ["NEARLINE"]}
        }),
    ];
    // Delete rules whose data also lives in the bucket under the rule name.
    for r in &cfg.rules {
        if r.action == ActionKind::Delete.as_str() {
            if let Some(days) = r
                .older_than
                .as_deref()
                .and_then(|s| humantime_serde::re::humantime::parse_duration(s).ok())
                .map(|d| d.as_secs().div_ceil(86_400))
            {
                rules.push(json!({
                    "action": {"type": "Delete"},
                    "condition": {"age": days.max(1), "matchesPrefix": [format!("{}/", r.name)]}
                }));
            }
        }
    }
    // Interrupted uploads cost money and are invisible.
    rules.push(json!({"action": {"type": "AbortIncompleteMultipartUpload"}, "condition": {"age": 1}}));
    json!({ "rule": rules })
}
