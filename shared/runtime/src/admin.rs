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
type Probe = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Checks asked at every `/readyz` (the bus connection), with why they fail.
    probes: Arc<Mutex<BTreeMap<String, Probe>>>,
    /// Words shown after a passing check (the lease: `active (term 3)`).
    notes: Arc<Mutex<BTreeMap<String, Note>>>,
}

type Note = Arc<dyn Fn() -> String + Send + Sync>;

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, check: &str, ready: bool) {
        self.checks.lock().expect("health lock").insert(check.to_string(), ready);
    }

    /// Adds a check that is asked each time readiness is; `probe` says why
    /// it fails. A probe and a set check of the same name must both pass.
    pub fn probe(&self, check: &str, probe: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.probes.lock().expect("health lock").insert(check.to_string(), Arc::new(probe));
    }

    /// Shows `note()` after `check` in `/readyz` when it passes.
    pub fn describe(&self, check: &str, note: impl Fn() -> String + Send + Sync + 'static) {
        self.notes.lock().expect("health lock").insert(check.to_string(), Arc::new(note));
    }

    /// Every check with its failure, if any; empty while starting.
    fn results(&self) -> BTreeMap<String, Result<(), String>> {
        let c = self.checks.lock().expect("health lock");
        if c.is_empty() {
            return BTreeMap::new();
        }
        let mut out: BTreeMap<String, Result<(), String>> =
            c.iter().map(|(k, v)| (k.clone(), if *v { Ok(()) } else { Err("not ready".into()) })).collect();
        drop(c);
        for (k, p) in self.probes.lock().expect("health lock").iter() {
            if let Err(why) = p() {
                out.insert(k.clone(), Err(why));
            }
        }
        out
    }

    /// Ready when at least one check exists and all pass.
    pub fn is_ready(&self) -> bool {
        let r = self.results();
        !r.is_empty() && r.values().all(Result::is_ok)
    }

    pub fn report(&self) -> String {
        let r = self.results();
        if r.is_empty() {
            return "starting\n".into();
        }
        let notes = self.notes.lock().expect("health lock");
        r.iter()
            .map(|(k, v)| match v {
                Ok(()) => match notes.get(k) {
                    Some(note) => format!("{k}: ok, {}\n", note()),
                    None => format!("{k}: ok\n"),
                },
                Err(why) => format!("{k}: not ready ({why})\n"),
            })
            .collect()
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
