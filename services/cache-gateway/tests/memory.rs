//! The in-process tier is bounded in bytes: after 100,000 distinct keys
//! through the gateway (80-byte answers, each stored), the process's RSS
//! has grown by at most the byte budget plus a stated overhead. Its own
//! test binary, so the RSS is the gateway's and this test's alone.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::Router;
use costmesh_cache_gateway::{proxy, Config, RouteConfig};

/// Budget for the in-process tier in this test.
const BUDGET: u64 = 16 << 20;
/// What the process may add beyond the budget: allocator slack, the
/// runtime's and the HTTP clients' buffers (stated in docs/config.md).
const OVERHEAD: u64 = 32 << 20;
const KEYS: usize = 100_000;

// The allocator the cache-gateway binary runs with (src/main.rs), so the
// figure is the deployed one's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 =
        status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_keys_stay_within_the_byte_budget() {
    let app = Router::new().fallback(|| async {
        ([("content-type", "application/json")], format!("{{\"answer\":\"{}\"}}", "x".repeat(64)))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cfg = Config {
        routes: vec![RouteConfig { name: "llm".into(), backends: vec![backend.into()], ..Default::default() }],
        l1_max_bytes: BUDGET,
        ..Default::default()
    };
    let gw = costmesh_cache_gateway::gateway(&cfg, None, Default::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, proxy::router(gw, 4096)).await.unwrap() });
    let client = reqwest::Client::new();
    // Warm up: connections, buffers and the runtime before the baseline.
    for i in 0..200 {
        client.get(format!("{addr}/llm/warm/{i}")).send().await.unwrap().bytes().await.unwrap();
    }
    let before = rss_bytes();
    let next = Arc::new(AtomicUsize::new(0));
    let stored = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (client, addr, next, stored) = (client.clone(), addr.clone(), next.clone(), stored.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= KEYS {
                        return;
                    }
                    let r = client.get(format!("{addr}/llm/k/{i}")).send().await.unwrap();
                    if r.headers().get("cache-status").is_some_and(|v| v.to_str().unwrap().contains("stored")) {
                        stored.fetch_add(1, Ordering::Relaxed);
                    }
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let after = rss_bytes();
    let grown = after.saturating_sub(before);
    println!(
        "memory: {KEYS} distinct keys ({} stored), RSS {} MiB -> {} MiB (+{:.1} MiB); budget {} MiB + overhead {} MiB",
        stored.load(Ordering::Relaxed),
        before >> 20,
        after >> 20,
        grown as f64 / (1 << 20) as f64,
        BUDGET >> 20,
        OVERHEAD >> 20
    );
    assert_eq!(stored.load(Ordering::Relaxed), KEYS, "every answer was stored");
    assert!(grown <= BUDGET + OVERHEAD, "RSS grew {grown} bytes, over the budget {BUDGET} plus {OVERHEAD}");
}
