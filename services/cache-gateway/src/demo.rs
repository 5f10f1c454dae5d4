//! A small demo inference backend with deterministic answers and a
//! configurable latency, so a newcomer can watch a miss turn into a hit
//! (`costmesh up` starts one behind the route `demo`).
use std::time::Duration;

use axum::http::{Method, Uri};
use axum::routing::any;
use axum::Router;
use sha2::{Digest, Sha256};

/// Serves `/v1/generate` (any method; the answer depends on the method,
/// query and body) on a free loopback port; returns its base URL.
pub async fn start(latency: Duration) -> std::io::Result<String> {
    start_on("127.0.0.1:0", latency).await
}

/// The same on a chosen address.
pub async fn start_on(listen: &str, latency: Duration) -> std::io::Result<String> {
    let app = Router::new().route(
        "/v1/generate",
        any(move |method: Method, uri: Uri, body: axum::body::Bytes| async move {
            // Simulated model time; the point of the demo is the cache.
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut h = Sha256::new();
            h.update(method.as_str());
            h.update(uri.query().unwrap_or(""));
            h.update(&body);
            let digest = h.finalize();
            let words =
                ["cheap", "GPU", "hours", "at", "night", "save", "money", "and", "cache", "hits", "save", "more"];
            let answer: Vec<&str> = digest.iter().take(8).map(|b| words[*b as usize % words.len()]).collect();
            (
                [("content-type", "application/json")],
                format!(r#"{{"model":"demo","answer":"{}","tokens":8}}"#, answer.join(" ")),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}
