//! `costmesh rightsize` with Google's Cloud Run v2 and Cloud Monitoring v3
//! clients against a local server speaking both REST APIs
//! (`costmesh_testkit::cloudrun`): the proposal for a service with a known
//! utilisation series equals the figure worked out here by hand; a dry run
//! changes nothing; `--apply` sends exactly the expected update mask and
//! limits; the proposal is an `Action` event.
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{Action, ActionState};
use costmesh_testkit::cloudrun::FakeCloudRun;
use costmesh_testkit::NatsServer;
use serde_json::Value;

const SERVICE: &str = "projects/costmesh-test/locations/asia-east1/services/inference";

async fn fake() -> FakeCloudRun {
    let f = FakeCloudRun::start().await;
    // Over-provisioned: 2 vCPU, 4 GiB, one instance kept warm, max 10.
    f.add_service(SERVICE, "2", "4Gi", 1, 10);
    f.set_series("container/cpu/utilizations", "ALIGN_PERCENTILE_95", &[0.20, 0.25, 0.15]);
    f.set_series("container/memory/utilizations", "ALIGN_PERCENTILE_95", &[0.30, 0.40, 0.35]);
    f.set_series("container/instance_count", "ALIGN_MAX", &[2.0, 4.0, 3.0]);
    f.set_series("container/instance_count", "ALIGN_MEAN", &[1.0, 2.0, 1.5]);
    f.set_series("request_count", "ALIGN_RATE", &[3.0, 12.5, 7.0]);
    f
}

async fn cli(f: &FakeCloudRun, extra: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"))
        .args(["rightsize", "--service", SERVICE, "--credentials", "anonymous", "--run-endpoint", f.url()])
        .args(["--monitoring-endpoint", f.url()])
        .args(extra)
        .output()
        .await
        .unwrap()
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn the_proposal_is_the_figure_worked_out_by_hand_and_a_dry_run_changes_nothing() {
    let f = fake().await;
    let v = json_of(&cli(&f, &["--json"]).await);
    let p = &v["proposal"];
    // By hand, from the seed's policy (at least 1 vCPU, 2 GiB; min 0, max 5;
    // targets 60 % CPU, 80 % memory):
    // CPU used at the peak p95: 2 x 0.25 = 0.5 vCPU; needed 0.5 / 0.6 = 0.83 -> 1 vCPU.
    // Memory: 4 x 0.40 = 1.6 GiB; needed 1.6 / 0.8 = 2.0 -> 2 GiB.
    // Instances: peak 4 x 0.5 / (1 x 0.6) = 3.33 -> 4 needed; max(4, 5) = 5. Min 0.
    assert_eq!(
        p["current"],
        serde_json::json!({"cpu": 2.0, "memory_gib": 4.0, "min_instances": 1, "max_instances": 10})
    );
    assert_eq!(
        p["proposed"],
        serde_json::json!({"cpu": 1.0, "memory_gib": 2.0, "min_instances": 0, "max_instances": 5})
    );
    assert_eq!(p["observed"]["peak_rps"], 12.5);
    // Saving: an instance-second costs 2 x 0.000024 + 4 x 0.0000025 now and
    // 1 x 0.000024 + 2 x 0.0000025 proposed; times the mean 1.5 instances
    // over 30 days; plus the warm instance no longer kept, at today's price.
    let month = 30.0 * 86_400.0;
    let (now, then) = (2.0 * 0.000024 + 4.0 * 0.0000025, 1.0 * 0.000024 + 2.0 * 0.0000025);
    let want = (now - then) * 1.5 * month + 1.0 * month * now;
    let got = p["monthly_saving"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-6, "saving {got}, by hand {want}");
    assert!((want - 263.088).abs() < 1e-6);
    assert!(p["reasons"][0].as_str().unwrap().contains("p95 25% of 2 vCPU"), "{p}");
    assert!(f.patches().is_empty(), "a dry run sends no update: {:?}", f.calls());
    assert!(f.calls().iter().all(|c| c.starts_with("GET ")), "{:?}", f.calls());

    // The table says the same, and that nothing changed.
    let out = cli(&f, &[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu            2 -> 1 vCPU") && text.contains("monthly saving 263.09 USD"), "{text}");
    assert!(text.contains("dry run: nothing changed"), "{text}");
}

#[tokio::test]
async fn apply_sends_exactly_the_update_mask_and_the_proposal_is_an_action_event() {
    let f = fake().await;
    let nats = NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("rightsize");
    let bus = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    let subject = costmesh_contracts::Subjects::new(&prefix).unwrap().action("rightsize");
    // The mesh's event stream, as its services create it.
    let mesh = costmesh_runtime::config::MeshConfig { subject_prefix: prefix.clone(), ..Default::default() };
    let ctx = costmesh_runtime::ServiceContext::new(
        "test",
        None,
        bus.clone(),
        &mesh,
        costmesh_runtime::clock::Clock::system(),
        Default::default(),
    );
    ctx.events.ensure_stream().await.unwrap();
    let mut sub = bus.subscribe(&subject).await.unwrap();
    bus.flush().await.unwrap();
    let v = json_of(&cli(&f, &["--apply", "--json", "--nats", &nats.url(), "--prefix", &prefix]).await);
    assert!(v["applied"].as_str().unwrap().contains("generation 2"), "{v}");
    let patches = f.patches();
    assert_eq!(patches.len(), 1, "{:?}", f.calls());
    let (mask, body) = &patches[0];
    assert_eq!(mask, "template.containers,template.scaling");
    assert_eq!(
        body["template"]["containers"][0]["resources"]["limits"],
        serde_json::json!({"cpu": "1", "memory": "2Gi"})
    );
    assert_eq!(body["template"]["scaling"]["minInstanceCount"].as_i64().unwrap_or(0), 0);
    assert_eq!(body["template"]["scaling"]["maxInstanceCount"], 5);
    assert_eq!(
        body["template"]["containers"][0]["image"], "asia-docker.pkg.dev/costmesh-test/models/inference:1",
        "the rest of the container is sent as it was"
    );
    let svc = f.service(SERVICE);
    assert_eq!(svc["template"]["containers"][0]["resources"]["limits"]["cpu"], "1");
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    let (_, a) = costmesh_contracts::decode::<Action>(&msg.headers, &msg.payload).unwrap();
    assert_eq!((a.kind.as_str(), a.state(), a.dry_run), ("rightsize", ActionState::Taken, false), "{a:?}");
    assert!(a.outcome.contains("cpu 2 -> 1") && a.outcome.contains("saving 263.09 USD/month"), "{a:?}");

    // Again: already right-sized, nothing sent.
    let v = json_of(&cli(&f, &["--apply", "--json"]).await);
    assert_eq!(v["proposal"]["changes"], false, "{v}");
    assert_eq!(f.patches().len(), 1);
}

#[tokio::test]
async fn bad_arguments_and_google_errors_are_named() {
    let f = fake().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"))
        .args(["rightsize", "--service", "projects/x/../../etc", "--credentials", "anonymous"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--service"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&f, &["--target-cpu", "1.5"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--target-cpu 1.5"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"))
        .args(["rightsize", "--service", "projects/costmesh-test/locations/asia-east1/services/nope"])
        .args(["--credentials", "anonymous", "--run-endpoint", f.url(), "--monitoring-endpoint", f.url()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("services.get: HTTP 404") && err.contains("does not exist"), "Google's message: {err}");
}
