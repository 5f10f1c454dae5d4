//! GCP budget notifications through the real `google-cloud-pubsub` client,
//! from a local server that speaks Pub/Sub's gRPC API (Google Cloud is out
//! of reach here): warning, then exceeded, each budget event exactly once,
//! also after a restart that receives the notifications again.
use std::collections::HashMap;
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus, Subscription};
use costmesh_contracts::v1::{self, BudgetState};
use costmesh_cost_watcher::Config;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::pubsub::FakePubSub;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const SUB: &str = "projects/costmesh-test/subscriptions/billing";
const WAIT: Duration = Duration::from_secs(15);

fn notification(cost_usd: f64) -> (Vec<u8>, HashMap<String, String>) {
    let body = format!(
        r#"{{"budgetDisplayName":"cloud-inference","costAmount":{cost_usd},"costIntervalStart":"2026-07-01T00:00:00Z","budgetAmount":100.0,"budgetAmountType":"SPECIFIED_AMOUNT","currencyCode":"USD"}}"#
    );
    let attrs = HashMap::from([
        ("schemaVersion".to_string(), "1.0".to_string()),
        ("budgetId".to_string(), "budget-7".to_string()),
        ("billingAccountId".to_string(), "01D4EE-079462-DFD6EC".to_string()),
    ]);
    (body.into_bytes(), attrs)
}

async fn next(sub: &mut Subscription) -> costmesh_bus::Message {
    tokio::time::timeout(WAIT, sub.next()).await.expect("message in time").unwrap()
}

async fn quiet(sub: &mut Subscription) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(400), sub.next()).await {
        panic!("unexpected message on {}", m.subject);
    }
}

#[tokio::test]
async fn budget_notifications_move_the_cloud_budget_once_each_across_restarts() {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let fake = FakePubSub::start().await;
    let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix("pubsub"), ..Default::default() };
    let subjects = costmesh_contracts::Subjects::new(&mesh.subject_prefix).unwrap();
    let (clock, handle) = Clock::manual("2026-07-20T00:00:00Z".parse().unwrap());
    let observer = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    let mut budgets = observer.subscribe(&subjects.budget_all()).await.unwrap();
    let mut relayed = observer.subscribe(&format!("{}.billing.gcp.>", subjects.prefix())).await.unwrap();
    let mut dlq = observer.subscribe(&subjects.dlq("cost-watcher")).await.unwrap();
    observer.flush().await.unwrap();

    // A large overall budget, so only the GCP budget moves.
    let mut cfg = Config { evaluate_interval: Duration::from_secs(3600), monthly_budget: 1e6, ..Default::default() };
    cfg.billing.subscription = SUB.into();
    cfg.billing.endpoint = fake.endpoint();
    cfg.billing.credentials = "anonymous".into();
    let start = |cfg: Config| {
        let (mesh, url, clock) = (mesh.clone(), nats.url(), clock.clone());
        async move {
            let bus = Bus::Nats(NatsBus::connect(&url, &Default::default()).await.unwrap());
            let shutdown = CancellationToken::new();
            let ctx = ServiceContext::new("cost-watcher", None, bus, &mesh, clock, shutdown.clone());
            let task = tokio::spawn(costmesh_cost_watcher::run(cfg, ctx));
            (shutdown, task)
        }
    };
    let (stop, task) = start(cfg.clone()).await;
    let hour = Duration::from_secs(3600);

    async fn budget(sub: &mut Subscription) -> v1::BudgetEvent {
        let m = next(sub).await;
        costmesh_contracts::decode::<v1::BudgetEvent>(&m.headers, &m.payload).unwrap().1
    }

    // 50 then 85 of a 100 USD budget: warning, once.
    for usd in [50.0, 85.0] {
        let (d, a) = notification(usd);
        fake.publish(d, a);
        let m = next(&mut relayed).await;
        let (_, n) = costmesh_contracts::decode::<v1::CloudBudgetNotification>(&m.headers, &m.payload).unwrap();
        assert_eq!(n.cost_amount, usd);
        assert_eq!(n.budget_id, "budget-7");
    }
    handle.advance(hour).await;
    let e = budget(&mut budgets).await;
    assert_eq!(
        (e.scope.as_str(), e.budget_name.as_str(), e.state()),
        ("cloud", "cloud-inference", BudgetState::Warning)
    );
    assert_eq!(e.period, "2026-07");
    // 85 USD at 43/1.35 TWD per USD.
    assert_eq!(e.spent.as_ref().unwrap().micros, (85.0f64 * 43.0 / 1.35 * 1e6).round() as i64);
    // Google repeats the notification several times a day: nothing new.
    let (d, a) = notification(85.0);
    fake.publish(d, a);
    next(&mut relayed).await;
    handle.advance(hour).await;
    quiet(&mut budgets).await;

    // A malformed notification goes to the DLQ with the reason; the next good one is read.
    let (_, mut attrs) = notification(0.0);
    attrs.insert("schemaVersion".into(), "9.9".into());
    fake.publish(b"{}".to_vec(), attrs);
    let m = next(&mut dlq).await;
    assert!(m.headers.get("costmesh-dlq-reason").unwrap().contains("schemaVersion"), "{:?}", m.headers);

    // 100.5 USD: exceeded, once.
    let (d, a) = notification(100.5);
    fake.publish(d, a);
    next(&mut relayed).await;
    handle.advance(hour).await;
    let e = budget(&mut budgets).await;
    assert_eq!(e.state(), BudgetState::Exceeded);
    assert_eq!(e.previous_state(), BudgetState::Warning);
    handle.advance(hour).await;
    quiet(&mut budgets).await;
    costmesh_testkit::eventually(WAIT, "every message acknowledged", || {
        let n = fake.outstanding();
        async move { n == 0 }
    })
    .await;

    // Restart; every notification is delivered again.
    stop.cancel();
    task.await.unwrap().unwrap();
    let (stop, task) = start(cfg.clone()).await;
    for usd in [50.0, 85.0, 85.0, 100.5] {
        let (d, a) = notification(usd);
        fake.publish(d, a);
        next(&mut relayed).await;
    }
    for _ in 0..3 {
        handle.advance(hour).await;
    }
    quiet(&mut budgets).await;
    assert_eq!(fake.subscriptions_seen().first().map(String::as_str), Some(SUB));
    stop.cancel();
    task.await.unwrap().unwrap();
}
