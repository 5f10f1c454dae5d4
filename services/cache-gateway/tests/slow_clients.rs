//! Slow and greedy clients: connections that never finish their request
//! head are closed after `header_read_timeout` while others are served; a
//! body that never arrives whole gets 408; past `max_connections` a new
//! connection gets 503. Real sockets against the gateway's own server.
use std::time::{Duration, Instant};

use axum::Router;
use costmesh_cache_gateway::{proxy, serve, Config, RouteConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

async fn gateway(tune: impl FnOnce(&mut Config)) -> (String, CancellationToken) {
    let app = Router::new().fallback(|| async { ([("content-type", "application/json")], "{\"ok\":true}") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut cfg = Config {
        routes: vec![RouteConfig { name: "llm".into(), backends: vec![backend.into()], ..Default::default() }],
        ..Default::default()
    };
    tune(&mut cfg);
    let gw = costmesh_cache_gateway::gateway(&cfg, None, Default::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let limits = serve::ServeLimits {
        header_read_timeout: cfg.header_read_timeout,
        max_connections: cfg.max_connections,
        workers: 2,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(serve::serve(listener, proxy::router(gw, cfg.max_body_bytes), limits, shutdown.clone()));
    (addr, shutdown)
}

/// Reads until the server closes; what it sent, or None if it kept the
/// connection open past `wait`.
async fn read_until_closed(s: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(wait, s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).to_string()),
        Err(_) => None,
    }
}

async fn get_ok(addr: &str) -> bool {
    reqwest::Client::new().get(format!("http://{addr}/llm/x")).send().await.is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn half_sent_heads_are_closed_after_the_header_read_timeout_while_others_are_served() {
    let (addr, _stop) = gateway(|c| c.header_read_timeout = Duration::from_millis(500)).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"GET /llm/x HTTP/1.1\r\nhost: x\r\nx-slow: ").await.unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    // Served meanwhile.
    assert!(get_ok(&addr).await);
    for s in &mut slow {
        assert!(read_until_closed(s, Duration::from_secs(5)).await.is_some(), "a half-sent request was kept open");
    }
    let took = started.elapsed();
    println!("50 half-sent requests closed after {took:?} (header_read_timeout 500ms)");
    assert!(get_ok(&addr).await);
    // An idle keep-alive connection is closed the same way.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /llm/x HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(5)).await.is_some(),
        "an idle keep-alive connection stayed"
    );
}

#[tokio::test]
async fn a_body_that_never_arrives_whole_gets_408() {
    let (addr, _stop) = gateway(|c| c.request_body_timeout = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        b"POST /llm/x HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("request_body_timeout"), "{text}");
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503() {
    let (addr, _stop) = gateway(|c| c.max_connections = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    let text = read_until_closed(&mut extra, Duration::from_secs(5)).await.expect("closed");
    assert!(text.starts_with("HTTP/1.1 503") && text.contains("max_connections"), "{text}");
    drop(held);
    // Slots come back once connections close.
    costmesh_testkit::eventually(Duration::from_secs(5), "a slot free again", || get_ok(&addr)).await;
}
