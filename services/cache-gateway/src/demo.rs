//! A small demo inference backend with deterministic answers and a
//! configurable latency, so a newcomer can watch a miss turn into a hit
//! (`costmesh up` starts one behind the route `demo`).
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use sha2::{Digest, Sha256};

/// Serves `POST /v1/generate` on a free loopback port; returns its base URL.
pub async fn start(latency: Duration) -> std::io::Result<String> {
    let app = Router::new().route(
        "/v1/generate",
        post(move |body: axum::body::Bytes| async move {
            // Simulated model time; the point of the demo is the cache.
            tokio::time::sleep(latency).await;
            let digest = Sha256::digest(&body);
            let words =
                ["cheap", "GPU", "hours", "at", "night", "save", "money", "and", "cache", "hits", "save", "more"];
            let answer: Vec<&str> = digest.iter().take(8).map(|b| words[*b as usize % words.len()]).collect();
            (
                [("content-type", "application/json")],
                format!(r#"{{"model":"demo","answer":"{}","tokens":8}}"#, answer.join(" ")),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}
