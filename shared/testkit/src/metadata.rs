//! A local HTTP server speaking the part of the GCE metadata API the
//! gpu-agent watches: `/computeMetadata/v1/instance/preempted` with the
//! `Metadata-Flavor: Google` header, `wait_for_change` and ETags.
use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

/// The server; `set_preempted(true)` flips the VM's preemption flag.
pub struct MetadataServer {
    url: String,
    preempted: watch::Sender<bool>,
}

async fn preempted(
    State(tx): State<watch::Sender<bool>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            [("metadata-flavor", "Google"), ("etag", "x")],
            "Missing Metadata-Flavor:Google header.".to_string(),
        );
    }
    let etag_of = |v: bool| if v { "etag-true" } else { "etag-false" };
    let mut rx = tx.subscribe();
    if q.get("wait_for_change").map(String::as_str) == Some("true") {
        let last = q.get("last_etag").cloned().unwrap_or_default();
        while etag_of(*rx.borrow_and_update()) == last {
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    let v = *rx.borrow();
    (
        StatusCode::OK,
        [("metadata-flavor", "Google"), ("etag", etag_of(v))],
        if v { "TRUE" } else { "FALSE" }.to_string(),
    )
}

impl MetadataServer {
    pub async fn start() -> Self {
        let (tx, _) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metadata server");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let app = Router::new().route("/computeMetadata/v1/instance/preempted", get(preempted)).with_state(tx.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, preempted: tx }
    }

    /// Base URL for `gpu_agent.preemption.metadata_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn set_preempted(&self, v: bool) {
        self.preempted.send_replace(v);
    }
}
