//! GCP budget notifications through the real `google-cloud-pubsub` client,
//! from Google's own Pub/Sub emulator (topic and subscription made over its
//! REST API, notifications in Google's format): warning, then exceeded,
//! each budget event exactly once, also across a restart (notifications
//! published while the cost-watcher is down are read after it) and a NATS
//! outage (a notification that cannot be saved is not acknowledged, and the
//! emulator delivers it again).
use std::collections::HashMap;
use std::time::Duration;

use costmesh_bus::{Bus, NatsBus, Subscription};
use costmesh_contracts::v1::{self, BudgetState};
use costmesh_cost_watcher::Config;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::emulator::PubSubEmulator;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "budget-alerts";
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
    let emulator = PubSubEmulator::start("costmesh-test");
    let sub = emulator.create_subscription(TOPIC, "billing", 10);
    let publish = |usd: f64| {
        let (d, a) = notification(usd);
        emulator.publish(TOPIC, &d, &a)
    };
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
    cfg.billing.subscription = sub.clone();
    cfg.billing.endpoint = emulator.endpoint();
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
        let id = publish(usd);
        let m = next(&mut relayed).await;
        let (_, n) = costmesh_contracts::decode::<v1::CloudBudgetNotification>(&m.headers, &m.payload).unwrap();
        assert_eq!(n.cost_amount, usd);
        assert_eq!(n.budget_id, "budget-7");
        assert_eq!(n.message_id, id, "the emulator's message id is kept");
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
    publish(85.0);
    next(&mut relayed).await;
    handle.advance(hour).await;
    quiet(&mut budgets).await;

    // A malformed notification goes to the DLQ with the reason; the next good one is read.
    let (_, mut attrs) = notification(0.0);
    attrs.insert("schemaVersion".into(), "9.9".into());
    emulator.publish(TOPIC, b"{}", &attrs);
    let m = next(&mut dlq).await;
    assert!(m.headers.get("costmesh-dlq-reason").unwrap().contains("schemaVersion"), "{:?}", m.headers);

    // 100.5 USD: exceeded, once.
    publish(100.5);
    next(&mut relayed).await;
    handle.advance(hour).await;
    let e = budget(&mut budgets).await;
    assert_eq!(e.state(), BudgetState::Exceeded);
    assert_eq!(e.previous_state(), BudgetState::Warning);
    handle.advance(hour).await;
    quiet(&mut budgets).await;

    // Down: what is published meanwhile waits in the subscription and is
    // read after the restart; repeats of what was booked change nothing.
    stop.cancel();
    task.await.unwrap().unwrap();
    for usd in [85.0, 100.5] {
        publish(usd);
    }
    let (stop, task) = start(cfg.clone()).await;
    for _ in 0..2 {
        // The emulator keeps a stream its client reset (its gRPC layer
        // throws NoSuchMethodError closing it, see its log) and sends new
        // messages there first; they come back each time the 10 s ack
        // deadline lapses, to a stream it picks, sometimes the dead one
        // again (10 s usually, 70 s seen once in 40 runs). Google's service
        // drops a reset stream at once.
        tokio::time::timeout(Duration::from_secs(180), relayed.next()).await.expect("read after the restart").unwrap();
    }
    for _ in 0..3 {
        handle.advance(hour).await;
    }
    quiet(&mut budgets).await;
    costmesh_testkit::eventually(WAIT, "every notification acknowledged", || async {
        emulator.unacked("billing") == 0
    })
    .await;

    // NATS down: a notification that arrives cannot be saved, so it is not
    // acknowledged; the emulator delivers it again, and once NATS is back it
    // is booked and relayed.
    let mut nats = nats;
    nats.stop();
    publish(120.0);
    nats.start();
    let want = (120.0f64 * 43.0 / 1.35 * 1e6).round() / 1e6;
    // (As long as above: the redelivery may go to the dead stream too.)
    costmesh_testkit::wait_for(Duration::from_secs(180), "the notification booked once NATS is back", || async {
        let summary = observer
            .request(
                &subjects.api("cost-watcher", "summary"),
                Default::default(),
                Default::default(),
                Duration::from_secs(2),
            )
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&summary.payload).map_err(|e| e.to_string())?;
        let cloud = v["cost"]["cloud"].as_f64().unwrap_or_default();
        if (cloud - want).abs() < 1e-6 {
            Ok(())
        } else {
            Err(format!("cloud {cloud}, want {want}"))
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
}
