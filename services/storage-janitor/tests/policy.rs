//! The default policy on a generated tree of tens of thousands of files:
//! the plan is exactly what the policy says, apply does it, a second apply
//! does nothing; links out of the root, open files, fresh files and models
//! in use are left alone.
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use costmesh_storage_janitor::config::Config;
use costmesh_storage_janitor::janitor::Janitor;
use costmesh_storage_janitor::plan::Step;

const DAY: u64 = 86_400;

fn write(path: &Path, content: &[u8], age_days: f64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = File::create(path).unwrap();
    f.write_all(content).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs_f64(age_days * DAY as f64)).unwrap();
}

fn log_content(i: usize) -> Vec<u8> {
    format!("step {i} loss {:.4}\n", 1.0 / (i + 1) as f64).repeat(20 + i % 50).into_bytes()
}

/// What the generated tree must produce.
struct Expect {
    compress: BTreeSet<PathBuf>,
    delete_tmp: BTreeSet<PathBuf>,
    delete_snap: BTreeSet<PathBuf>,
    retire: BTreeSet<PathBuf>,
}

fn generate(base: &Path, files: usize) -> Expect {
    let mut e = Expect {
        compress: BTreeSet::new(),
        delete_tmp: BTreeSet::new(),
        delete_snap: BTreeSet::new(),
        retire: BTreeSet::new(),
    };
    for i in 0..files {
        let age = (i % 20) as f64; // 0..19 days
        match i % 4 {
            0 => {
                let p = base.join(format!("logs/run{}/part{i}.log", i % 37));
                write(&p, &log_content(i), age);
                if age > 7.0 {
                    e.compress.insert(p);
                }
            }
            1 => {
                let p = base.join(format!("temp/job{}/t{i}.tmp", i % 11));
                write(&p, b"scratch", age / 4.0); // 0..4.75 days
                if age / 4.0 > 1.0 {
                    e.delete_tmp.insert(p);
                }
            }
            2 => {
                let p = base.join(format!("snapshots/s{i}.snap"));
                write(&p, b"snapshot", age * 2.5); // 0..47.5 days
                if age * 2.5 > 30.0 {
                    e.delete_snap.insert(p);
                }
            }
            _ => {
                // Files the policy does not cover.
                write(&base.join(format!("logs/run{}/notes{i}.txt", i % 37)), b"keep me", 30.0);
            }
        }
    }
    // Nested model versions: 5 models x 6 versions, newest 3 kept.
    for m in 0..5 {
        for v in 0..6 {
            let dir = base.join(format!("models/model{m}/v{v}"));
            write(&dir.join("weights.bin"), &vec![v as u8; 1000], (10 - v) as f64);
            write(&dir.join("config.json"), b"{}", (10 - v) as f64);
            if v < 3 {
                e.retire.insert(dir);
            }
        }
    }
    e
}

fn config(base: &Path) -> Config {
    Config { base_dir: base.to_path_buf(), archive_url: "archive".into(), ..Default::default() }
}

#[tokio::test]
async fn the_plan_is_the_policy_apply_does_it_and_a_second_apply_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut expect = generate(base, 24_000);
    // Links that point out of the roots, matching the rules' patterns.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.log");
    write(&secret, b"not yours", 30.0);
    std::os::unix::fs::symlink(&secret, base.join("logs/run1/link.log")).unwrap();
    std::os::unix::fs::symlink(outside.path(), base.join("temp/escape")).unwrap();
    write(&outside.path().join("deep.tmp"), b"not yours either", 30.0);
    // A file held open by this process, old enough to be compressed.
    let held_path = base.join("logs/run2/held.log");
    write(&held_path, b"being written", 30.0);
    let held = File::open(&held_path).unwrap();
    // A file written a moment ago but back-dated is still old; one modified now is fresh.
    write(&base.join("logs/run3/fresh.log"), b"new", 0.0);
    // A model version a running job uses.
    let used = base.join("models/model0/v0");
    expect.retire.remove(&used);

    let janitor = Janitor::new(config(base)).unwrap();
    janitor.in_use.lock().unwrap().insert(used.join("weights.bin"));
    let now = chrono::Utc::now();
    let (plan, _) = janitor.plan(now).await;

    let of = |step: Step, rule: &str| -> BTreeSet<PathBuf> {
        plan.actions.iter().filter(|a| a.step == step && a.rule == rule).map(|a| a.path.clone()).collect()
    };
    assert_eq!(of(Step::CompressArchive, "logs"), expect.compress);
    assert_eq!(of(Step::Delete, "temp"), expect.delete_tmp);
    assert_eq!(of(Step::Delete, "snapshots"), expect.delete_snap);
    assert_eq!(of(Step::RetireArchive, "models"), expect.retire);
    let total = expect.compress.len() + expect.delete_tmp.len() + expect.delete_snap.len() + expect.retire.len();
    assert_eq!(plan.actions.len(), total, "nothing beyond the policy");
    assert!(total > 10_000, "{total}");
    let skipped: Vec<String> = plan.skipped.iter().map(|s| format!("{} {}", s.path.display(), s.reason)).collect();
    assert!(skipped.iter().any(|s| s.contains("link.log") && s.contains("symbolic link")), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("held.log") && s.contains("open")), "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("model0/v0") && s.contains("running job")), "{skipped:?}");
    assert!(plan.freed_bytes() > 0 && plan.saving_per_month() > 0.0);

    // Planning changed nothing.
    assert!(expect.compress.iter().all(|p| p.exists()));

    let pass = janitor.pass(now, true, "TWD", None).await;
    let outcome = pass.outcome.unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", &outcome.failed[..outcome.failed.len().min(5)]);
    assert_eq!(outcome.done.len(), total);
    for p in expect.compress.iter().chain(&expect.delete_tmp).chain(&expect.delete_snap).chain(&expect.retire) {
        assert!(!p.exists(), "{} still there", p.display());
    }
    // Archived logs decompress to the original bytes.
    let sample = expect.compress.iter().next().unwrap();
    let key = format!("logs/{}.gz", sample.strip_prefix(base.join("logs")).unwrap().display());
    let gz = janitor.archive.get(&key).await.unwrap();
    let mut original = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut original).unwrap();
    let i: usize = sample.file_stem().unwrap().to_str().unwrap().trim_start_matches("part").parse().unwrap();
    assert_eq!(original, log_content(i));
    // What was left alone is intact.
    assert!(held_path.exists() && secret.exists() && outside.path().join("deep.tmp").exists());
    assert!(used.join("weights.bin").exists());
    assert!(base.join("logs/run3/fresh.log").exists());
    assert_eq!(fs::read(&secret).unwrap(), b"not yours");
    // The report counts what was freed, and the archive per tier.
    assert_eq!(pass.report_event.bytes_freed, outcome.freed_bytes());
    assert!(pass
        .report_event
        .usage
        .iter()
        .any(|u| u.tier == costmesh_contracts::v1::StorageTier::Standard as i32 && u.objects > 0));

    let again = janitor.pass(chrono::Utc::now(), true, "TWD", None).await;
    assert!(again.plan.actions.is_empty(), "{:?}", &again.plan.actions[..again.plan.actions.len().min(3)]);
    assert!(again.outcome.unwrap().done.is_empty());
    drop(held);
}

#[test]
fn bad_rules_fail_at_start_naming_the_rule_and_the_field() {
    use costmesh_runtime::config::load_service;
    let env = Default::default();
    let cases = [
        (r#"root = "../etc""#, r#"action = "delete""#, r#"older_than = "1d""#, "rules[0] (bad).root", "`..`"),
        (r#"root = "/""#, r#"action = "delete""#, r#"older_than = "1d""#, "rules[0] (bad).root", "filesystem root"),
        (r#"root = "logs""#, r#"action = "shred""#, r#"older_than = "1d""#, "rules[0] (bad).action", "unknown action"),
        (r#"root = "logs""#, r#"action = "delete""#, r#"older_than = "-7d""#, "rules[0] (bad).older_than", "negative"),
        (r#"root = "logs""#, r#"action = "delete""#, r#"match = "../**""#, "rules[0] (bad).match", "relative"),
        (r#"root = "logs""#, r#"action = "delete""#, r#"match = "*""#, "rules[0] (bad).older_than", "need an age"),
        (
            r#"root = "logs""#,
            r#"action = "delete""#,
            "older_than = \"1d\"\ntier = \"glacier\"",
            "rules[0] (bad).tier",
            "unknown tier",
        ),
    ];
    for (root, action, extra, key, why) in cases {
        let file = format!("[storage_janitor]\nbase_dir = \"/srv\"\n[[storage_janitor.rules]]\nname = \"bad\"\n{root}\n{action}\n{extra}\n");
        let e = load_service::<Config>(Some(&file), &env, "storage_janitor").unwrap_err();
        assert_eq!(e.key, format!("storage_janitor.{key}"), "{e}");
        assert!(e.reason.contains(why), "{e}");
    }
}

#[test]
fn lifecycle_rules_follow_the_gcs_format() {
    let cfg = Config::default();
    let v = costmesh_storage_janitor::lifecycle::gcs_lifecycle(&cfg);
    let rules = v["rule"].as_array().unwrap();
    // The documented shape: {"rule": [{"action": {...}, "condition": {...}}]}.
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["rule"]);
    let actions = ["Delete", "SetStorageClass", "AbortIncompleteMultipartUpload"];
    let classes = ["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE"];
    let conditions = [
        "age",
        "createdBefore",
        "customTimeBefore",
        "daysSinceCustomTime",
        "daysSinceNoncurrentTime",
        "isLive",
        "matchesStorageClass",
        "matchesPrefix",
        "matchesSuffix",
        "noncurrentTimeBefore",
        "numNewerVersions",
    ];
    for r in rules {
        let obj = r.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{r}");
        let t = r["action"]["type"].as_str().unwrap();
        assert!(actions.contains(&t), "{t}");
        if t == "SetStorageClass" {
            assert!(classes.contains(&r["action"]["storageClass"].as_str().unwrap()));
        } else {
            assert!(r["action"].get("storageClass").is_none());
        }
        for (k, val) in r["condition"].as_object().unwrap() {
            assert!(conditions.contains(&k.as_str()), "unknown condition {k}");
            if k == "age" {
                assert!(val.as_u64().unwrap() >= 1);
            }
            if k.starts_with("matches") {
                assert!(val.as_array().unwrap().iter().all(|x| x.is_string()));
            }
        }
    }
    // The seed's tiers, respecting minimum storage durations (NEARLINE 30 d).
    assert_eq!(
        rules[0],
        serde_json::json!({"action": {"type": "SetStorageClass", "storageClass": "NEARLINE"}, "condition": {"age": 30, "matchesStorageClass": ["STANDARD"]}})
    );
    assert_eq!(rules[1]["action"]["storageClass"], "COLDLINE");
    assert_eq!(rules[1]["condition"]["age"], 90);
    let del = rules.iter().find(|r| r["condition"]["matchesPrefix"] == serde_json::json!(["snapshots/"])).unwrap();
    assert_eq!(del["action"]["type"], "Delete");
    assert_eq!(del["condition"]["age"], 30);
}

/// A run killed between writing `x.log.gz` and removing `x.log` leaves both:
/// the next run plans one step for the pair and finishes it.
#[tokio::test]
async fn leftovers_of_a_killed_run_are_finished_in_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let log = base.join("logs/run1/part4.log");
    write(&log, &log_content(4), 10.0);
    // What the killed run had got to: the verified .gz beside the original.
    let gz = costmesh_storage_janitor::apply::compress_file(&log).unwrap().0;
    write(&log, &log_content(4), 10.0);
    let f = File::options().write(true).open(&gz).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(10 * DAY)).unwrap();
    drop(f);
    assert!(log.exists() && gz.exists());
    let janitor = Janitor::new(config(base)).unwrap();
    let now = chrono::Utc::now();
    let (plan, _) = janitor.plan(now).await;
    let steps: Vec<String> = plan.actions.iter().map(|a| format!("{} {}", a.step.as_str(), a.rel)).collect();
    assert_eq!(steps, vec!["compress_archive run1/part4.log".to_string()], "one step for the pair");
    let pass = janitor.pass(now, true, "TWD", None).await;
    let outcome = pass.outcome.unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert!(!log.exists() && !gz.exists());
    let stored = janitor.archive.get("logs/run1/part4.log.gz").await.unwrap();
    let mut original = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&stored[..]), &mut original).unwrap();
    assert_eq!(original, log_content(4));
}
