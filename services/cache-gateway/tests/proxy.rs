//! The gateway with a real redis-server and a real HTTP backend on loopback.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use costmesh_cache_gateway::proxy::{self, RouteLabels, Stats};
use costmesh_cache_gateway::{Config, RouteConfig};
use costmesh_testkit::RedisServer;
use tokio::sync::Semaphore;

/// A model backend that counts calls; `gate` holds answers until opened;
/// `fail` makes it answer 500.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    fail: Arc<AtomicBool>,
    url: String,
}

async fn backend(open: bool) -> Backend {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }));
    let fail = Arc::new(AtomicBool::new(false));
    let (c, g, f) = (calls.clone(), gate.clone(), fail.clone());
    let app = Router::new().route(
        "/v1/generate",
        post(move |body: String| {
            let (c, g, f) = (c.clone(), g.clone(), f.clone());
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                let _permit = g.acquire().await.unwrap();
                let status = if f.load(Ordering::SeqCst) { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
                let body = format!(r#"{{"answer":"for {}","call":{n}}}"#, body.len());
                (status, [("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Backend { calls, gate, fail, url }
}

/// A file holding the admin token `ADMIN_TOKEN`, written once (tests run
/// in parallel: rewriting it would let one read it half-written).
fn admin_token_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("costmesh-gw-admin-{}", std::process::id()));
        std::fs::write(&p, format!("{ADMIN_TOKEN}\n")).unwrap();
        p
    })
    .clone()
}

const ADMIN_TOKEN: &str = "admin-token-for-tests";

async fn gateway(b: &Backend, redis: Option<&RedisServer>, stats: Stats) -> String {
    gateway_on(b, redis, stats, costmesh_runtime::Clock::system()).await
}

async fn gateway_on(b: &Backend, redis: Option<&RedisServer>, stats: Stats, clock: costmesh_runtime::Clock) -> String {
    gateway_with(&[b], redis, stats, clock, |_| ()).await
}

/// The gateway on one route `llm` over `backends`, with `tune` applied to its config.
async fn gateway_with(
    backends: &[&Backend],
    redis: Option<&RedisServer>,
    stats: Stats,
    clock: costmesh_runtime::Clock,
    tune: impl FnOnce(&mut Config),
) -> String {
    let mut cfg = Config {
        routes: vec![RouteConfig {
            name: "llm".into(),
            backends: backends.iter().map(|b| b.url.clone().into()).collect(),
            ttl: None,
            priority: Default::default(),
            ..Default::default()
        }],
        max_body_bytes: 4096,
        // Tenants by API key (`key-<name>`); the admin token for purges.
        tenants: ["acme", "globex", "initech"]
            .iter()
            .map(|t| costmesh_cache_gateway::TenantConfig {
                name: t.to_string(),
                key_sha256: costmesh_cache_gateway::tenants::hash_key(&format!("key-{t}")),
            })
            .collect(),
        admin_token_file: Some(admin_token_file()),
        ..Default::default()
    };
    tune(&mut cfg);
    let url = redis.map(|r| r.url());
    let gw = costmesh_cache_gateway::gateway(&cfg, url.as_deref(), stats).await.unwrap().with_clock(clock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let app = proxy::router(gw, cfg.max_body_bytes);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Reply {
    status: u16,
    cache_status: String,
    age: Option<String>,
    body: String,
}

async fn ask(gw: &str, tenant: &str, body: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = reqwest::Client::new()
        .post(format!("{gw}/llm/v1/generate"))
        .header("content-type", "application/json")
        .header("x-api-key", format!("key-{tenant}"))
        .header("x-model", "llama")
        .body(body.to_string());
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    let (status, cache_status, age) = (r.status().as_u16(), h("cache-status").unwrap_or_default(), h("age"));
    Reply { status, cache_status, age, body: r.text().await.unwrap() }
}

#[tokio::test]
async fn repeats_hit_tenants_never_share_and_no_store_bypasses() {
    let redis = RedisServer::start_new();
    let b = backend(true).await;
    let stats = Stats::default();
    let gw = gateway(&b, Some(&redis), stats.clone()).await;

    let first = ask(&gw, "acme", r#"{"prompt":"hi","temperature":1}"#, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_status, "costmesh; fwd=miss; fwd-status=200; stored");
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);

    // The same request with keys reordered and 1 written as 1.0: a hit.
    let again = ask(&gw, "acme", r#"{ "temperature": 1.0, "prompt": "hi" }"#, &[]).await;
    assert!(again.cache_status.starts_with("costmesh; hit; ttl="), "{}", again.cache_status);
    assert!(again.age.is_some());
    assert_eq!(again.body, first.body);
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);

    // Another tenant never sees acme's entry.
    let other = ask(&gw, "globex", r#"{"prompt":"hi","temperature":1}"#, &[]).await;
    assert!(other.cache_status.contains("fwd=miss"), "{}", other.cache_status);
    assert_eq!(b.calls.load(Ordering::SeqCst), 2);

    // no-store goes to the backend and stores nothing.
    let ns = ask(&gw, "initech", r#"{"prompt":"x"}"#, &[("cache-control", "no-store")]).await;
    assert_eq!(ns.cache_status, "costmesh; fwd=bypass; fwd-status=200; detail=no-store");
    let ns2 = ask(&gw, "initech", r#"{"prompt":"x"}"#, &[]).await;
    assert!(ns2.cache_status.contains("fwd=miss"), "{}", ns2.cache_status);
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);

    // The report the cost-watcher gets: one entry per tenant, backend calls
    // booked to the tenant that caused them, summing to the route's totals.
    let by_tenant: std::collections::BTreeMap<String, costmesh_contracts::v1::RouteStats> =
        stats.tenant_stats("llm").into_iter().map(|r| (r.tenant.clone(), r)).collect();
    let calls = |t: &str| (by_tenant[t].requests, by_tenant[t].hits, by_tenant[t].misses, by_tenant[t].backend_calls);
    assert_eq!(calls("acme"), (2, 1, 1, 1), "{by_tenant:#?}");
    assert_eq!(calls("globex"), (1, 0, 1, 1), "{by_tenant:#?}");
    assert_eq!(calls("initech"), (2, 0, 2, 2), "{by_tenant:#?}");
    let total = stats.route_stats("llm");
    assert_eq!(by_tenant.values().map(|r| r.requests).sum::<u64>(), total.requests);
    assert_eq!(by_tenant.values().map(|r| r.backend_calls).sum::<u64>(), total.backend_calls);
    assert_eq!(total.backend_calls, 4);

    // A second gateway (empty in-process tier) shares the entry through Redis.
    let gw2 = gateway(&b, Some(&redis), Stats::default()).await;
    let shared = ask(&gw2, "acme", r#"{"prompt":"hi","temperature":1}"#, &[]).await;
    assert!(shared.cache_status.contains("hit"), "{}", shared.cache_status);
    assert_eq!(b.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_hundred_concurrent_identical_misses_make_one_backend_call() {
    let b = backend(false).await;
    let stats = Stats::default();
    let gw = gateway(&b, None, stats.clone()).await;
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { ask(&gw, "acme", r#"{"prompt":"same"}"#, &[]).await })
        })
        .collect();
    let labels = RouteLabels { route: "llm".into() };
    costmesh_testkit::eventually(Duration::from_secs(10), "99 requests waiting on the first", || {
        let n = stats.coalesced.get_or_create(&labels).get();
        async move { n == 99 }
    })
    .await;
    b.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let mut collapsed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        collapsed += r.cache_status.contains("collapsed") as usize;
    }
    assert_eq!(b.calls.load(Ordering::SeqCst), 1, "one backend call for 100 identical misses");
    assert_eq!(collapsed, 99);
}

#[tokio::test]
async fn redis_down_fails_open_and_caching_resumes_when_it_returns() {
    let mut redis = RedisServer::start_new();
    let b = backend(true).await;
    let gw = gateway(&b, Some(&redis), Stats::default()).await;
    ask(&gw, "acme", r#"{"q":1}"#, &[]).await;

    redis.stop();
    // Every request is still answered: the in-process tier, then the backend.
    let cached = ask(&gw, "acme", r#"{"q":1}"#, &[]).await;
    assert_eq!(cached.status, 200);
    assert!(cached.cache_status.contains("hit"), "{}", cached.cache_status);
    for i in 2..6 {
        let r = ask(&gw, "acme", &format!(r#"{{"q":{i}}}"#), &[]).await;
        assert_eq!(r.status, 200, "request {i} failed while Redis was down");
        assert!(r.body.contains("answer"));
    }

    redis.start();
    // The connection manager reconnects by itself; new entries reach Redis
    // again, which a gateway with an empty in-process tier can see.
    let gw2 = gateway(&b, Some(&redis), Stats::default()).await;
    let mut n = 100;
    costmesh_testkit::eventually(Duration::from_secs(20), "an entry stored after the restart is shared", || {
        n += 1;
        let (gw, gw2) = (gw.clone(), gw2.clone());
        let body = format!(r#"{{"q":{n}}}"#);
        async move {
            ask(&gw, "acme", &body, &[]).await;
            ask(&gw2, "acme", &body, &[]).await.cache_status.contains("hit")
        }
    })
    .await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_4xx_and_the_gateway_carries_on() {
    let b = backend(true).await;
    let gw = gateway(&b, None, Stats::default()).await;
    let bad = ask(&gw, "acme", r#"{"prompt": "unterminated"#, &[]).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("malformed JSON body"), "{}", bad.body);

    let big = ask(&gw, "acme", &format!(r#"{{"p":"{}"}}"#, "x".repeat(10_000)), &[]).await;
    assert_eq!(big.status, 413);

    let r = reqwest::Client::new().post(format!("{gw}/nope/v1")).body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unknown route \"nope\"");

    assert_eq!(b.calls.load(Ordering::SeqCst), 0, "nothing bad reached the backend");
    assert_eq!(ask(&gw, "acme", r#"{"ok":true}"#, &[]).await.status, 200);
}

#[tokio::test]
async fn purge_by_model_version_or_everything() {
    let redis = RedisServer::start_new();
    let b = backend(true).await;
    let gw = gateway(&b, Some(&redis), Stats::default()).await;
    let ask_v = |v: &'static str| {
        let gw = gw.clone();
        async move {
            let r = reqwest::Client::new()
                .post(format!("{gw}/llm/v1/generate"))
                .header("content-type", "application/json")
                .header("x-api-key", "key-acme")
                .header("x-model-version", v)
                .body(r#"{"p":1}"#)
                .send()
                .await
                .unwrap();
            r.headers().get("cache-status").unwrap().to_str().unwrap().to_string()
        }
    };
    ask_v("v1").await;
    ask_v("v2").await;
    assert!(ask_v("v1").await.contains("hit"));
    let purge = |body: &'static str| {
        let gw = gw.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{gw}/_costmesh/purge"))
                .bearer_auth(ADMIN_TOKEN)
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = purge(r#"{"model_version":"v1"}"#).await;
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["redis_keys_removed"], 1);
    assert!(ask_v("v1").await.contains("fwd=miss"), "v1 purged");
    assert!(ask_v("v2").await.contains("hit"), "v2 kept");
    assert_eq!(purge(r#"{"all":true}"#).await.status().as_u16(), 200);
    assert!(ask_v("v2").await.contains("fwd=miss"), "everything purged");
    assert_eq!(purge(r#"{}"#).await.status().as_u16(), 400);
    assert_eq!(purge("not json").await.status().as_u16(), 400);
}

#[tokio::test]
async fn entries_expire_after_their_ttl_on_the_injectable_clock() {
    let b = backend(true).await;
    let (clock, handle) = costmesh_runtime::Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let addr = gateway_on(&b, None, Stats::default(), clock).await;

    ask(&addr, "acme", r#"{"q":"ttl"}"#, &[]).await;
    handle.advance(Duration::from_secs(3599)).await;
    let hit = ask(&addr, "acme", r#"{"q":"ttl"}"#, &[]).await;
    assert_eq!(hit.cache_status, "costmesh; hit; ttl=1");
    assert_eq!(hit.age.as_deref(), Some("3599"));
    handle.advance(Duration::from_secs(1)).await;
    // Expired: served stale at once while one background call refreshes it.
    let stale = ask(&addr, "acme", r#"{"q":"ttl"}"#, &[]).await;
    assert_eq!(stale.cache_status, "costmesh; hit; ttl=-0; detail=stale-while-revalidate");
    assert!(stale.body.contains(r#""call":1"#), "{}", stale.body);
    costmesh_testkit::eventually(Duration::from_secs(5), "the background refresh", || async {
        ask(&addr, "acme", r#"{"q":"ttl"}"#, &[]).await.cache_status == "costmesh; hit; ttl=3600"
    })
    .await;
    assert_eq!(b.calls.load(Ordering::SeqCst), 2);
    // Past the 60 s revalidation grace: the client waits for the backend.
    handle.advance(Duration::from_secs(3660)).await;
    let late = ask(&addr, "acme", r#"{"q":"ttl"}"#, &[]).await;
    assert_eq!(late.cache_status, "costmesh; fwd=stale; fwd-status=200; stored");
    assert!(late.body.contains(r#""call":3"#), "{}", late.body);
}

#[tokio::test]
async fn stale_if_error_answers_from_an_expired_entry_within_its_grace() {
    let b = backend(true).await;
    let (clock, handle) = costmesh_runtime::Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let stats = Stats::default();
    let addr = gateway_with(&[&b], None, stats.clone(), clock, |c| c.outlier.consecutive_failures = 100).await;
    let first = ask(&addr, "acme", r#"{"q":"sie"}"#, &[]).await;
    assert!(first.cache_status.contains("stored"), "{}", first.cache_status);

    b.fail.store(true, Ordering::SeqCst);
    handle.advance(Duration::from_secs(3600 + 120)).await;
    let stale = ask(&addr, "acme", r#"{"q":"sie"}"#, &[]).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.cache_status, "costmesh; fwd=stale; fwd-status=500; ttl=-120; detail=stale-if-error");
    assert_eq!(stale.body, first.body);
    assert_eq!(stale.age.as_deref(), Some("3720"));
    assert_eq!(stats.route_stats("llm").stale, 1);

    // Past the 10 min grace the backend's error goes through.
    handle.advance(Duration::from_secs(480)).await;
    assert_eq!(ask(&addr, "acme", r#"{"q":"sie"}"#, &[]).await.status, 500);
    assert_eq!(b.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_backend_answering_5xx_is_ejected_then_returns_after_the_ejection_time() {
    let (bad, good) = (backend(true).await, backend(true).await);
    bad.fail.store(true, Ordering::SeqCst);
    let (clock, handle) = costmesh_runtime::Clock::manual("2026-07-01T00:00:00Z".parse().unwrap());
    let stats = Stats::default();
    let addr = gateway_with(&[&bad, &good], None, stats.clone(), clock, |c| {
        c.outlier.consecutive_failures = 3;
        c.outlier.ejection_time = Duration::from_secs(30);
    })
    .await;
    let mut failed = 0;
    for i in 0..20 {
        let r = ask(&addr, "acme", &format!(r#"{{"i":{i}}}"#), &[("cache-control", "no-store")]).await;
        failed += usize::from(r.status == 500);
    }
    assert_eq!(bad.calls.load(Ordering::SeqCst), 3, "ejected after three 5xx in a row");
    assert_eq!((failed, good.calls.load(Ordering::SeqCst)), (3, 17));
    let ejections =
        stats.ejections.get_or_create(&proxy::BackendLabels { route: "llm".into(), backend: bad.url.clone() });
    assert_eq!(ejections.get(), 1);

    // Healthy again; after the ejection time it is back in rotation.
    bad.fail.store(false, Ordering::SeqCst);
    handle.advance(Duration::from_secs(30)).await;
    for i in 0..4 {
        let r = ask(&addr, "acme", &format!(r#"{{"j":{i}}}"#), &[("cache-control", "no-store")]).await;
        assert_eq!(r.status, 200);
    }
    assert!(bad.calls.load(Ordering::SeqCst) > 3, "back in rotation");
}

#[tokio::test]
async fn http2_clients_are_served_and_hit_the_cache() {
    let b = backend(true).await;
    let addr = gateway(&b, None, Stats::default()).await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(format!("{addr}/llm/v1/generate"))
            .header("content-type", "application/json")
            .header("x-api-key", "key-acme")
            .body(r#"{"q":"h2"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        seen.push(r.headers()["cache-status"].to_str().unwrap().to_string());
    }
    assert!(seen[0].contains("fwd=miss") && seen[1].starts_with("costmesh; hit"), "{seen:?}");
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn get_requests_cache_per_query_string() {
    let demo = costmesh_cache_gateway::demo::start(Duration::ZERO).await.unwrap();
    let b =
        Backend { calls: Default::default(), gate: Arc::new(Semaphore::new(0)), fail: Default::default(), url: demo };
    let addr = gateway(&b, None, Stats::default()).await;
    let get = |q: &'static str| {
        let addr = addr.clone();
        async move {
            let r = reqwest::get(format!("{addr}/llm/v1/generate?{q}")).await.unwrap();
            let cs = r.headers()["cache-status"].to_str().unwrap().to_string();
            (cs, r.text().await.unwrap())
        }
    };
    let (a1, b1) = (get("prompt=a").await, get("prompt=b").await);
    assert!(a1.0.contains("fwd=miss") && b1.0.contains("fwd=miss"), "{a1:?} {b1:?}");
    assert_ne!(a1.1, b1.1, "the backend saw the query");
    let a2 = get("prompt=a").await;
    assert!(a2.0.starts_with("costmesh; hit"), "{a2:?}");
    assert_eq!(a2.1, a1.1);
}

#[tokio::test]
async fn answers_the_cache_does_not_keep_are_streamed_through() {
    // A backend that sends one chunk, then waits for the gate before the rest.
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let app = Router::new().route(
        "/v1/stream",
        post(move || {
            let g = g.clone();
            async move {
                let chunks = futures::stream::unfold(0, move |i| {
                    let g = g.clone();
                    async move {
                        match i {
                            0 => Some((Ok::<_, std::io::Error>(bytes::Bytes::from("first;")), 1)),
                            1 => {
                                let _p = g.acquire().await.unwrap();
                                Some((Ok(bytes::Bytes::from("second")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                axum::body::Body::from_stream(chunks)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let b = Backend { calls: Default::default(), gate: Arc::new(Semaphore::new(0)), fail: Default::default(), url };
    let addr = gateway(&b, None, Stats::default()).await;

    let mut r = reqwest::Client::new()
        .post(format!("{addr}/llm/v1/stream"))
        .header("cache-control", "no-store")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-status"], "costmesh; fwd=bypass; fwd-status=200; detail=no-store");
    // The first chunk arrives while the backend still holds the rest.
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk()).await.unwrap().unwrap().unwrap();
    assert_eq!(&first[..], b"first;");
    gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"second");
}
