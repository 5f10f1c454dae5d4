//! Budget events over a real nats-server change what the gateway does:
//! a warning lengthens TTLs, exceeded sheds low-priority routes with 503 and
//! `Retry-After`, and OK restores service.
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use costmesh_cache_gateway::{Config, OnExceeded, Priority, RouteConfig};
use costmesh_contracts::v1::{BudgetEvent, BudgetState};
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_testkit::{free_port, http_post_json, NatsServer};

mod common;

async fn model() -> String {
    let app =
        Router::new().route(
            "/v1/generate",
            post(|body: String| async move {
                ([("content-type", "application/json")], format!(r#"{{"len":{}}}"#, body.len()))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn budget_states_switch_the_degradation() {
    let nats = NatsServer::start_new();
    let backend = model().await;
    let port = free_port();
    let cfg = Config {
        listen: format!("127.0.0.1:{port}"),
        routes: vec![
            RouteConfig {
                name: "chat".into(),
                backends: vec![backend.clone().into()],
                ttl: None,
                priority: Priority::Normal,
                ..Default::default()
            },
            RouteConfig {
                name: "batch".into(),
                backends: vec![backend.into()],
                ttl: None,
                priority: Priority::Low,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let common::Running { bus, subjects, shutdown } = common::start(&nats, "gwbudget", cfg).await;
    let addr = format!("127.0.0.1:{port}");
    let post = |route: &str, body: &str| {
        let (addr, path, body) = (addr.clone(), format!("/{route}/v1/generate"), body.to_string());
        async move { http_post_json(&addr, &path, &body).await }
    };
    let header =
        |h: &Vec<(String, String)>, n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
    let send = |state: BudgetState| {
        let (bus, subjects) = (bus.clone(), subjects.clone());
        async move { publish_budget(&bus, &subjects, state).await }
    };

    assert_eq!(post("batch", "{}").await.unwrap().0, 200);

    // Warning: new entries live twice as long.
    send(BudgetState::Warning).await;
    costmesh_testkit::eventually(Duration::from_secs(10), "a TTL above the normal hour", || async {
        let body = format!(r#"{{"n":{}}}"#, uuid_like());
        post("chat", &body).await.unwrap();
        let (_, h, _) = post("chat", &body).await.unwrap();
        let cs = header(&h, "cache-status");
        cs.split("ttl=").nth(1).and_then(|t| t.parse::<u64>().ok()).is_some_and(|t| t > 3600)
    })
    .await;

    // Exceeded: the low-priority route is shed, the normal one still served.
    send(BudgetState::Exceeded).await;
    costmesh_testkit::eventually(Duration::from_secs(10), "batch shed", || async {
        post("batch", r#"{"x":1}"#).await.unwrap().0 == 503
    })
    .await;
    let (status, h, body) = post("batch", r#"{"x":2}"#).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(header(&h, "retry-after"), "3600");
    assert!(body.contains("budget exceeded"), "{body}");
    assert_eq!(post("chat", r#"{"x":3}"#).await.unwrap().0, 200);

    // A new month: OK again.
    send(BudgetState::Ok).await;
    costmesh_testkit::eventually(Duration::from_secs(10), "batch back", || async {
        post("batch", r#"{"x":4}"#).await.unwrap().0 == 200
    })
    .await;
    shutdown.cancel();
}

/// `on_exceeded = "serve_stale"`: expired entries answer without a backend
/// call while the budget is exceeded; back to normal on OK.
#[tokio::test]
async fn serve_stale_degradation_answers_expired_entries_without_backends() {
    let nats = NatsServer::start_new();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/v1/generate",
        post(move || {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move { ([("content-type", "application/json")], format!(r#"{{"call":{n}}}"#)) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let port = free_port();
    let mut cfg = Config {
        listen: format!("127.0.0.1:{port}"),
        routes: vec![RouteConfig {
            name: "chat".into(),
            backends: vec![backend.into()],
            ttl: None,
            priority: Priority::Normal,
            ..Default::default()
        }],
        stats_interval: Duration::from_secs(24 * 3600),
        ..Default::default()
    };
    cfg.budget.on_exceeded = OnExceeded::ServeStale;
    let (clock, handle) = costmesh_runtime::Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let common::Running { bus, subjects, shutdown } = common::start_on(&nats, "gwstale", cfg, clock).await;
    let addr = format!("127.0.0.1:{port}");
    let post = |body: String| {
        let addr = addr.clone();
        async move { http_post_json(&addr, "/chat/v1/generate", &body).await.unwrap() }
    };
    let status_of = |h: &Vec<(String, String)>| {
        h.iter().find(|(k, _)| k == "cache-status").map(|(_, v)| v.clone()).unwrap_or_default()
    };
    // Many entries, so that polls made before the budget event arrives
    // (each of which refreshes the expired entry it asks for) never use up
    // the one asked for after it.
    let keys = 200;
    for i in 0..keys {
        post(format!(r#"{{"q":{i}}}"#)).await;
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), keys);
    handle.advance(Duration::from_secs(5 * 3600)).await;

    publish_budget(&bus, &subjects, BudgetState::Exceeded).await;
    let next = std::sync::atomic::AtomicUsize::new(0);
    costmesh_testkit::eventually(Duration::from_secs(10), "a budget-stale answer", || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(i < keys - 1, "no budget-stale answer after {i} tries");
        let reply = post(format!(r#"{{"q":{i}}}"#));
        async move { status_of(&reply.await.1) == "costmesh; hit; ttl=-14400; detail=budget-exceeded" }
    })
    .await;
    // From now on expired entries answer without a backend call.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let (_, h, body) = post(format!(r#"{{"q":{}}}"#, keys - 1)).await;
    assert_eq!(status_of(&h), "costmesh; hit; ttl=-14400; detail=budget-exceeded");
    assert_eq!(body, format!(r#"{{"call":{keys}}}"#), "the expired answer");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before, "no backend call for an expired entry");
    // A true miss still reaches the backend.
    assert_eq!(post(r#"{"new":1}"#.into()).await.2, format!(r#"{{"call":{}}}"#, before + 1));

    publish_budget(&bus, &subjects, BudgetState::Ok).await;
    costmesh_testkit::eventually(Duration::from_secs(10), "refreshed once the budget is OK", || async {
        status_of(&post(format!(r#"{{"q":{}}}"#, keys - 1)).await.1).contains("fwd=stale; fwd-status=200; stored")
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_restarted_gateway_still_sheds_for_an_exceeded_budget() {
    let nats = NatsServer::start_new();
    let backend = model().await;
    let cfg = |port: u16| Config {
        listen: format!("127.0.0.1:{port}"),
        routes: vec![RouteConfig {
            name: "batch".into(),
            backends: vec![backend.clone().into()],
            ttl: None,
            priority: Priority::Low,
            ..Default::default()
        }],
        ..Default::default()
    };
    let prefix = costmesh_testkit::unique_prefix("gwrestart");
    let port = free_port();
    let first = common::start_prefixed(&nats, &prefix, cfg(port), costmesh_runtime::Clock::system()).await;
    publish_budget(&first.bus, &first.subjects, BudgetState::Exceeded).await;
    let addr = format!("127.0.0.1:{port}");
    costmesh_testkit::eventually(Duration::from_secs(10), "batch shed", || async {
        http_post_json(&addr, "/batch/v1/generate", "{}").await.unwrap().0 == 503
    })
    .await;
    first.shutdown.cancel();
    // The next gateway hears no new budget event: it must know from the stream.
    let port = free_port();
    let _second = common::start_prefixed(&nats, &prefix, cfg(port), costmesh_runtime::Clock::system()).await;
    let (status, _, body) = http_post_json(&format!("127.0.0.1:{port}"), "/batch/v1/generate", "{}").await.unwrap();
    assert_eq!(status, 503, "a restarted gateway forgot the exceeded budget: {body}");
    _second.shutdown.cancel();
}

async fn publish_budget(bus: &costmesh_bus::Bus, subjects: &costmesh_contracts::Subjects, state: BudgetState) {
    let e = BudgetEvent { scope: "cloud".into(), state: state as i32, period: "2026-07".into(), ..Default::default() };
    let (h, p) = costmesh_contracts::encode(
        &e,
        &EventMeta::new::<BudgetEvent>("cost-watcher", chrono::Utc::now(), ContentType::Protobuf),
    );
    bus.publish_durable(&subjects.budget("cloud", state), h, p).await.unwrap();
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}
