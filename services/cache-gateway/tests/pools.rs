//! Regular and preemptible pools: traffic splits by the configured share, a
//! preemption notice over NATS drains the preemptible node's backend within
//! a second, and no client request fails while it goes away.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use costmesh_cache_gateway::{BackendSpec, Config, Pool, RouteConfig};
use costmesh_contracts::v1::PreemptionNotice;
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_testkit::{free_port, NatsServer};
use tokio_util::sync::CancellationToken;

mod common;

async fn model(calls: Arc<AtomicUsize>, stop: CancellationToken) -> String {
    let app = Router::new().route(
        "/v1/generate",
        post(move || {
            let c = calls.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        async move { axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await.unwrap() },
    );
    url
}

#[tokio::test]
async fn preemption_drains_the_spot_backend_without_failing_a_request() {
    let nats = NatsServer::start_new();
    let (regular, spot) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let spot_stop = CancellationToken::new();
    let r_url = model(regular.clone(), CancellationToken::new()).await;
    let s_url = model(spot.clone(), spot_stop.clone()).await;
    let port = free_port();
    let cfg = Config {
        listen: format!("127.0.0.1:{port}"),
        routes: vec![RouteConfig {
            name: "llm".into(),
            backends: vec![
                BackendSpec::Full { url: r_url, pool: Pool::Regular, node: Some("gpu-1".into()) },
                BackendSpec::Full { url: s_url, pool: Pool::Preemptible, node: Some("spot-1".into()) },
            ],
            ttl: None,
            priority: Default::default(),
            ..Default::default()
        }],
        health_interval: Duration::from_millis(100),
        stats_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let common::Running { bus, subjects, shutdown } = common::start(&nats, "pools", cfg).await;
    let mut stats = bus.subscribe(&subjects.cache_stats()).await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/llm/v1/generate");
    let send = || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            // no-store: every request goes to a backend.
            let r = client
                .post(&url)
                .header("cache-control", "no-store")
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };

    for _ in 0..100 {
        assert_eq!(send().await, 200);
    }
    let (r0, s0) = (regular.load(Ordering::SeqCst), spot.load(Ordering::SeqCst));
    assert_eq!(r0 + s0, 100);
    assert_eq!(s0, 80, "80 % to the preemptible pool (seed mix 20/80), got {s0}");

    // The spot VM is told it will be preempted.
    let notice = PreemptionNotice {
        node: "spot-1".into(),
        deadline: Some(costmesh_contracts::timestamp(chrono::Utc::now() + chrono::Duration::seconds(30))),
        source: "gce-metadata".into(),
        ..Default::default()
    };
    let (h, p) = costmesh_contracts::encode(
        &notice,
        &EventMeta::new::<PreemptionNotice>("gpu-agent/spot-1", chrono::Utc::now(), ContentType::Protobuf),
    );
    let t0 = Instant::now();
    bus.publish_durable(&subjects.preemption("spot-1"), h, p).await.unwrap();
    // Requests keep succeeding; once 20 in a row skip the spot backend, it is drained.
    let mut streak = 0;
    let mut drained_after = None;
    while drained_after.is_none() {
        let before = spot.load(Ordering::SeqCst);
        assert_eq!(send().await, 200, "a request failed during the drain");
        if spot.load(Ordering::SeqCst) == before {
            streak += 1;
            if streak == 20 {
                drained_after = Some(t0.elapsed());
            }
        } else {
            streak = 0;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never drained");
    }
    let drained_after = drained_after.unwrap();
    eprintln!("spot backend drained {drained_after:?} after the notice");
    assert!(drained_after < Duration::from_secs(1), "drained after {drained_after:?}");
    // The gateway's statistics say so, backend by backend (what the dashboard shows).
    let states = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stats.next().await.expect("stats");
            let (_, s) =
                costmesh_contracts::decode::<costmesh_contracts::v1::CacheStats>(&m.headers, &m.payload).unwrap();
            let mut states: Vec<(String, String, String)> =
                s.backends.iter().map(|b| (b.node.clone(), b.pool.clone(), b.state.clone())).collect();
            states.sort();
            if states.iter().any(|(_, _, st)| st == "drained") {
                assert!(s.backends.iter().any(|b| b.state == "drained" && b.drained_until.is_some()));
                return states;
            }
        }
    })
    .await
    .expect("a report with the drained backend");
    assert_eq!(
        states,
        [("gpu-1".into(), "regular".into(), "ok".into()), ("spot-1".into(), "preemptible".into(), "drained".into())]
            .to_vec()
    );

    // The VM goes away: still no failed request.
    spot_stop.cancel();
    for _ in 0..30 {
        assert_eq!(send().await, 200);
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_backend_that_dies_without_notice_leaves_rotation_and_comes_back() {
    let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a_stop = CancellationToken::new();
    let a_url = model(a.clone(), a_stop.clone()).await;
    let b_url = model(b.clone(), CancellationToken::new()).await;
    let cfg = Config {
        routes: vec![RouteConfig {
            name: "llm".into(),
            backends: vec![a_url.clone().into(), b_url.into()],
            ttl: None,
            priority: Default::default(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let gw = costmesh_cache_gateway::gateway(&cfg, None, Default::default()).await.unwrap();
    let routes = costmesh_cache_gateway::proxy::Routes(gw.routes.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/llm/v1/generate", listener.local_addr().unwrap());
    tokio::spawn(
        async move { axum::serve(listener, costmesh_cache_gateway::proxy::router(gw, 1 << 20)).await.unwrap() },
    );
    let client = reqwest::Client::new();
    let send = || async {
        client.post(&url).header("cache-control", "no-store").body("{}").send().await.unwrap().status().as_u16()
    };
    for _ in 0..10 {
        assert_eq!(send().await, 200);
    }
    assert!(a.load(Ordering::SeqCst) > 0 && b.load(Ordering::SeqCst) > 0, "both served");
    // A dies: no request fails, B takes them all.
    a_stop.cancel();
    let b_before = b.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert_eq!(send().await, 200, "a request failed when a backend died");
    }
    assert_eq!(b.load(Ordering::SeqCst) - b_before, 20);
    // A comes back on its old address: the return check puts it back.
    let addr = a_url.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let a2 = a.clone();
    let app = Router::new().route(
        "/v1/generate",
        post(move || {
            let c = a2.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                "{}"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    routes.check_returns(chrono::Utc::now()).await;
    let a_before = a.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(send().await, 200);
    }
    assert!(a.load(Ordering::SeqCst) > a_before, "the backend is back in rotation");
}
