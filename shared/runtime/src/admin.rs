//! The admin endpoint every service serves: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive) and `/readyz` (every readiness check
//! has passed: connected, subscribed, loaded).
//!
//! The caller binds the listener (port 0 in tests) and owns the shutdown.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::SharedRegistry;

/// Named readiness checks. A service registers each check as not ready at
/// start and marks it ready once it holds.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, check: &str, ready: bool) {
        self.checks.lock().expect("health lock").insert(check.to_string(), ready);
    }

    /// Ready when at least one check exists and all pass.
    pub fn is_ready(&self) -> bool {
        let c = self.checks.lock().expect("health lock");
        !c.is_empty() && c.values().all(|v| *v)
    }

    pub fn report(&self) -> String {
        let c = self.checks.lock().expect("health lock");
        if c.is_empty() {
            return "starting\n".into();
        }
        c.iter().map(|(k, v)| format!("{k}: {}\n", if *v { "ok" } else { "not ready" })).collect()
    }
}

#[derive(Clone)]
struct AdminState {
    registry: SharedRegistry,
    health: Health,
}

/// The admin router, for embedding or testing without a socket.
pub fn router(registry: SharedRegistry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, health })
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        crate::metrics::render(&s.registry),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let status = if s.health.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, s.health.report())
}

/// Serves the admin endpoint on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: SharedRegistry,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry, health)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
