//! The Compute Engine actuator with Google's `google-cloud-compute-v1`
//! client against a local server speaking the Compute REST API
//! (`costmesh_testkit::compute`): what it lists, stops, resizes and starts,
//! how it follows operations, retries and reports Google's errors.
use std::time::Duration;

use costmesh_contracts::v1::{Action, ActionState};
use costmesh_scheduler::actuator::Actuator;
use costmesh_scheduler::gce::{Gce, GceConfig};
use costmesh_testkit::compute::{FakeCompute, FakeInstance};

const PROJECT: &str = "costmesh-test";
const ZONE: &str = "asia-east1-b";
const MANAGED: &[(&str, &str)] = &[("costmesh", "managed")];

fn cfg(fake: &FakeCompute, apply: bool) -> GceConfig {
    GceConfig {
        project: PROJECT.into(),
        zones: vec![ZONE.into(), "asia-east1-c".into()],
        apply,
        scale_down_machine_type: "n1-standard-4".into(),
        endpoint: fake.url().into(),
        credentials: "anonymous".into(),
        operation_timeout: Duration::from_secs(5),
        retry_backoff: Duration::from_millis(20),
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    }
}

fn action(kind: &str, node: &str) -> Action {
    Action { kind: kind.into(), target: node.into(), reason: "idle".into(), ..Default::default() }
}

async fn fleet() -> FakeCompute {
    FakeCompute::start(
        PROJECT,
        vec![
            FakeInstance::new(ZONE, "gpu-t4-1", "RUNNING", "n1-standard-8", MANAGED),
            FakeInstance::new(
                "asia-east1-c",
                "gpu-t4-2",
                "RUNNING",
                "n1-standard-8",
                &[("costmesh", "managed"), ("costmesh-node", "cloud-2")],
            ),
            FakeInstance::new(ZONE, "db-1", "RUNNING", "n1-standard-8", &[("team", "data")]),
            FakeInstance::new("us-central1-a", "gpu-far", "RUNNING", "n1-standard-8", MANAGED),
        ],
    )
    .await
}

#[tokio::test]
async fn dry_run_says_what_it_would_do_and_changes_nothing() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, false)).await.unwrap();
    assert!(gce.dry_run());
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Proposed);
    assert!(a.dry_run);
    assert_eq!(a.resource, format!("projects/{PROJECT}/zones/{ZONE}/instances/gpu-t4-1"));
    assert!(a.outcome.contains("would stop") && a.outcome.contains("gce.apply"), "{}", a.outcome);
    let a = gce.act(&action("scale_down", "cloud-2")).await;
    assert!(a.outcome.contains("n1-standard-8 -> n1-standard-4"), "found by its costmesh-node label: {}", a.outcome);
    assert!(fake.mutations().is_empty(), "a dry run calls nothing that changes: {:?}", fake.mutations());
    assert_eq!(fake.instance("gpu-t4-1").status, "RUNNING");
}

#[tokio::test]
async fn stop_is_followed_through_its_zone_operation() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Taken, "{a:?}");
    assert!(!a.dry_run);
    assert_eq!(a.operations.len(), 1, "{a:?}");
    assert_eq!(fake.instance("gpu-t4-1").status, "TERMINATED", "the operation ran to DONE");
    let polls =
        fake.calls().iter().filter(|c| c.starts_with(&format!("operations {ZONE}/{}", a.operations[0]))).count();
    assert!(polls >= 3, "RUNNING twice, then DONE: {:?}", fake.calls());
    // Again: already stopped, nothing called.
    let before = fake.mutations().len();
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Taken);
    assert!(a.outcome.contains("already TERMINATED"), "{}", a.outcome);
    assert_eq!(fake.mutations().len(), before);
}

#[tokio::test]
async fn scale_down_stops_resizes_and_starts_again() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    let a = gce.act(&action("scale_down", "cloud-2")).await;
    assert_eq!(a.state, ActionState::Taken, "{a:?}");
    let verbs: Vec<String> =
        fake.mutations().iter().map(|c| c.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).collect();
    assert_eq!(
        verbs,
        ["stop asia-east1-c/gpu-t4-2", "setMachineType asia-east1-c/gpu-t4-2", "start asia-east1-c/gpu-t4-2"],
        "in order, each after the one before is DONE"
    );
    assert_eq!(a.operations.len(), 3);
    let i = fake.instance("gpu-t4-2");
    assert_eq!((i.status.as_str(), i.machine_type.as_str()), ("RUNNING", "n1-standard-4"));
    let a = gce.act(&action("scale_down", "cloud-2")).await;
    assert!(a.outcome.contains("already runs n1-standard-4"), "{}", a.outcome);
}

#[tokio::test]
async fn only_labelled_instances_in_configured_zones_are_touched() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    for node in ["db-1", "gpu-far", "local-4090", "../../x"] {
        let a = gce.act(&action("stop", node)).await;
        assert_eq!(a.state, ActionState::Proposed, "{node}: {a:?}");
        assert!(a.dry_run && a.outcome.contains("not a managed Compute Engine instance"), "{node}: {}", a.outcome);
    }
    assert!(fake.mutations().is_empty(), "{:?}", fake.mutations());
    // The list asked the API for the label, in both zones and no other.
    let lists: Vec<String> = fake.calls().into_iter().filter(|c| c.starts_with("list ")).collect();
    assert!(lists.iter().all(|c| c.contains(ZONE) || c.contains("asia-east1-c")), "{lists:?}");
}

#[tokio::test]
async fn listing_follows_pages() {
    let fake = FakeCompute::start(
        PROJECT,
        (1..=5).map(|n| FakeInstance::new(ZONE, &format!("vm-{n}"), "RUNNING", "n1-standard-8", MANAGED)).collect(),
    )
    .await;
    fake.set_page_size(2);
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    let a = gce.act(&action("stop", "vm-5")).await;
    assert_eq!(a.state, ActionState::Taken, "the last page is read: {a:?}");
}

#[tokio::test]
async fn google_errors_are_reported_and_retried_only_where_it_helps() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    let stops = |fake: &FakeCompute| fake.calls().iter().filter(|c| c.starts_with("stop ")).count();

    // 403: Google's message, no retry.
    let msg = "Required 'compute.instances.stop' permission for 'projects/costmesh-test/zones/asia-east1-b/instances/gpu-t4-1'";
    fake.fail_next("stop", 1, 403, msg);
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Failed);
    assert!(a.outcome.contains("HTTP 403") && a.outcome.contains(msg), "{}", a.outcome);
    assert_eq!(stops(&fake), 1, "a 403 is not retried");

    // 429 then success: retried, with the same request id.
    fake.fail_next("stop", 1, 429, "Rate Limit Exceeded");
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Taken, "{a:?}");
    let ids: Vec<String> = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("stop "))
        .skip(1)
        .map(|c| c.split_whitespace().nth(2).unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "one request id across attempts");
    assert_eq!(fake.instance("gpu-t4-1").status, "TERMINATED");

    // 503 every time: given up after max_attempts (3).
    fake.fail_next("start", 3, 503, "Backend Error");
    let before = fake.calls().iter().filter(|c| c.starts_with("start ")).count();
    let a = gce.act(&action("scale_down", "cloud-2")).await;
    assert_eq!(a.state, ActionState::Failed, "{a:?}");
    assert!(a.outcome.contains("start: HTTP 503: Backend Error (after 3 attempts)"), "{}", a.outcome);
    assert!(a.outcome.contains("after 2 operation(s) done"), "stop and resize went through: {}", a.outcome);
    assert_eq!(fake.calls().iter().filter(|c| c.starts_with("start ")).count() - before, 3);
}

#[tokio::test]
async fn a_lost_answer_is_retried_and_the_call_runs_once() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    fake.lose_answer("stop", 502);
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Taken, "{a:?}");
    let stops: Vec<String> = fake.calls().into_iter().filter(|c| c.starts_with("stop ")).collect();
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert_eq!(fake.instance("gpu-t4-1").status, "TERMINATED");
    let ops = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("operations "))
        .map(|c| c.split('/').nth(1).unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(ops.len(), 1, "the repeated request got the first operation, not a second stop: {ops:?}");
}

#[tokio::test]
async fn operations_that_fail_or_never_end_are_reported() {
    let fake = fleet().await;
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    fake.fail_operations("stop", 403, "The user does not have access to service account 'x'");
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Failed);
    assert!(a.outcome.contains("does not have access"), "{}", a.outcome);
    assert_eq!(fake.calls().iter().filter(|c| c.starts_with("stop ")).count(), 1, "not retried");
    assert_eq!(fake.instance("gpu-t4-1").status, "RUNNING");

    let fake = fleet().await;
    let mut c = cfg(&fake, true);
    c.operation_timeout = Duration::from_millis(500);
    let gce = Gce::new(c).await.unwrap();
    fake.hang_operations();
    let a = gce.act(&action("stop", "gpu-t4-1")).await;
    assert_eq!(a.state, ActionState::Failed);
    assert!(a.outcome.contains("did not finish within 500ms"), "{}", a.outcome);
}

#[tokio::test]
async fn an_exceeded_budget_stops_every_running_managed_instance() {
    let fake = fleet().await;
    let mut c = cfg(&fake, true);
    c.stop_on_budget_exceeded = true;
    let gce = Gce::new(c).await.unwrap();
    let template = Action { kind: "stop".into(), reason: "budget cloud exceeded".into(), ..Default::default() };
    let mut acts = gce.budget_exceeded(&template).await;
    acts.sort_by(|a, b| a.target.cmp(&b.target));
    let got: Vec<(&str, ActionState)> = acts.iter().map(|a| (a.target.as_str(), a.state())).collect();
    assert_eq!(got, [("gpu-t4-1", ActionState::Taken), ("gpu-t4-2", ActionState::Taken)]);
    assert!(acts.iter().all(|a| a.reason == "budget cloud exceeded" && !a.dry_run));
    assert_eq!(fake.instance("db-1").status, "RUNNING", "not labelled");
    assert_eq!(fake.instance("gpu-far").status, "RUNNING", "not in a configured zone");
    // Again (a repeated budget event): nothing runs, nothing to do.
    assert!(gce.budget_exceeded(&template).await.is_empty());
    // Off by default.
    let gce = Gce::new(cfg(&fake, true)).await.unwrap();
    assert!(gce.budget_exceeded(&template).await.is_empty());
}
