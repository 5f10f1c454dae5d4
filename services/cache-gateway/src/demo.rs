//! A small demo inference backend with deterministic answers and a
//! configurable latency, so a newcomer can watch a miss turn into a hit
//! (`costmesh up` starts one behind the route `demo`).
use std::time::Duration;

use axum::http::{Method, Uri};
use axum::routing::any;
use axum::Router;
use sha2::{Digest, Sha256};

/// Serves `/v1/generate` (any method; the answer depends on the method,
/// query and body) on a free loopback port; returns its base URL. The
/// answer has 8 words unless the query's `tokens=N` or the JSON body's
/// `max_tokens` asks for another count (at most [`MAX_TOKENS`]), so a
/// benchmark can ask for answers of realistic sizes.
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
            let n = tokens(uri.query().unwrap_or(""), &body);
            let words =
                ["cheap", "GPU", "hours", "at", "night", "save", "money", "and", "cache", "hits", "save", "more"];
            let answer: Vec<&str> = (0..n).map(|i| words[(digest[i % 32] as usize + i / 32) % words.len()]).collect();
            (
                [("content-type", "application/json")],
                format!(r#"{{"model":"demo","answer":"{}","tokens":{n}}}"#, answer.join(" ")),
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

/// The most words an answer has.
pub const MAX_TOKENS: usize = 100_000;

/// Words asked for: `tokens=N` in the query, else `max_tokens` in a JSON
/// body, else 8.
fn tokens(query: &str, body: &[u8]) -> usize {
    let from_query = query.split('&').find_map(|kv| kv.strip_prefix("tokens=")).and_then(|v| v.parse().ok());
    let from_body =
        || serde_json::from_slice::<serde_json::Value>(body).ok()?.get("max_tokens")?.as_u64().map(|n| n as usize);
    from_query.or_else(from_body).unwrap_or(8).clamp(1, MAX_TOKENS)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn answers_have_the_words_asked_for() {
        let url = super::start(std::time::Duration::ZERO).await.unwrap();
        let c = reqwest::Client::new();
        let words = |v: serde_json::Value| v["answer"].as_str().unwrap().split(' ').count();
        let get = |q: &'static str| c.get(format!("{url}/v1/generate?{q}")).send();
        let v: serde_json::Value = get("prompt=a").await.unwrap().json().await.unwrap();
        assert_eq!((words(v.clone()), v["tokens"].as_u64()), (8, Some(8)));
        let v: serde_json::Value = get("prompt=a&tokens=300").await.unwrap().json().await.unwrap();
        assert_eq!(words(v), 300);
        let post = c.post(format!("{url}/v1/generate")).json(&serde_json::json!({"prompt": "a", "max_tokens": 40}));
        let v: serde_json::Value = post.send().await.unwrap().json().await.unwrap();
        assert_eq!(words(v), 40);
    }
}
