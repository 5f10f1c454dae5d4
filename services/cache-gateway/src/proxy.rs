//! The proxy: routes requests to a route's backends, answers repeated
//! requests from the cache, makes one backend call for concurrent identical
//! misses, and says what happened in an RFC 9211 `Cache-Status` header.
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::broadcast;

use crate::key::{cache_key, KeyParts};
use crate::store::{Cached, Lookup, Store};

/// Name used in `Cache-Status`.
const CACHE_NAME: &str = "costmesh";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Per-route counters (cumulative).
#[derive(Clone, Default)]
pub struct Stats {
    pub requests: Family<RouteLabels, Counter>,
    pub hits: Family<RouteLabels, Counter>,
    pub misses: Family<RouteLabels, Counter>,
    /// Expired entries served (while revalidating, on backend errors, or by budget).
    pub stale: Family<RouteLabels, Counter>,
    pub coalesced: Family<RouteLabels, Counter>,
    pub backend_ms: Family<RouteLabels, Counter>,
    pub bytes: Family<RouteLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
    pub budget_changes: Family<StateLabels, Counter>,
}

/// One route's counters, looked up once (the hot path only increments).
#[derive(Clone, Default)]
pub struct RouteCounters {
    requests: Counter,
    hits: Counter,
    misses: Counter,
    stale: Counter,
    coalesced: Counter,
    backend_ms: Counter,
    bytes: Counter,
}

impl Stats {
    fn for_route(&self, route: &str) -> RouteCounters {
        let l = RouteLabels { route: route.to_string() };
        RouteCounters {
            requests: self.requests.get_or_create(&l).clone(),
            hits: self.hits.get_or_create(&l).clone(),
            misses: self.misses.get_or_create(&l).clone(),
            stale: self.stale.get_or_create(&l).clone(),
            coalesced: self.coalesced.get_or_create(&l).clone(),
            backend_ms: self.backend_ms.get_or_create(&l).clone(),
            bytes: self.bytes.get_or_create(&l).clone(),
        }
    }

    /// One route's cumulative counters, as reported on NATS.
    pub fn route_stats(&self, route: &str) -> costmesh_contracts::v1::RouteStats {
        let l = RouteLabels { route: route.to_string() };
        costmesh_contracts::v1::RouteStats {
            route: route.to_string(),
            requests: self.requests.get_or_create(&l).get(),
            hits: self.hits.get_or_create(&l).get(),
            misses: self.misses.get_or_create(&l).get(),
            stale: self.stale.get_or_create(&l).get(),
            coalesced: self.coalesced.get_or_create(&l).get(),
            backend_time_ms: self.backend_ms.get_or_create(&l).get(),
            bytes: self.bytes.get_or_create(&l).get(),
        }
    }
}

/// One backend of a route.
pub struct Backend {
    pub url: String,
    pub pool: crate::Pool,
    pub node: Option<String>,
    /// Drained by a preemption notice until at least this instant.
    drained_until: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Failed a connection; out until it accepts connections again.
    failed: std::sync::atomic::AtomicBool,
    /// 5xx answers or timeouts in a row.
    consecutive_failures: AtomicU32,
    /// Ejected as an outlier until this time (unix ms on the gateway clock; 0: not ejected).
    ejected_until_ms: AtomicI64,
}

impl Backend {
    pub fn new(url: String, pool: crate::Pool, node: Option<String>) -> Self {
        Self {
            url,
            pool,
            node,
            drained_until: Mutex::new(None),
            failed: Default::default(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicI64::new(0),
        }
    }

    fn available(&self, now_ms: i64) -> bool {
        self.drained_until.lock().expect("backend lock").is_none()
            && !self.failed.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// host:port, for the return check.
    fn authority(&self) -> Option<String> {
        let rest = self.url.split_once("://")?.1;
        Some(rest.split('/').next()?.to_string())
    }
}

/// A route and its backends.
pub struct Route {
    pub backends: Vec<Backend>,
    pub ttl: Duration,
    pub priority: crate::Priority,
    /// Share of requests for the preemptible pool.
    pub preemptible_share: f64,
    next: AtomicUsize,
    counters: RouteCounters,
}

impl Route {
    /// Regular backends only (tests and simple configs).
    pub fn new(backends: Vec<String>, ttl: Duration) -> Self {
        let backends = backends.into_iter().map(|u| Backend::new(u, crate::Pool::Regular, None)).collect();
        Self::with_backends(backends, ttl, 0.0)
    }

    pub fn with_backends(backends: Vec<Backend>, ttl: Duration, preemptible_share: f64) -> Self {
        Self {
            backends,
            ttl,
            priority: crate::Priority::Normal,
            preemptible_share,
            next: AtomicUsize::new(0),
            counters: RouteCounters::default(),
        }
    }

    pub fn with_priority(mut self, p: crate::Priority) -> Self {
        self.priority = p;
        self
    }

    /// Picks an available backend: the preemptible pool for its share of
    /// requests, the regular pool for the rest; a pool with nothing
    /// available hands its share to the other. `avoid` skips one backend
    /// (the one that just failed).
    fn pick(&self, avoid: Option<usize>, now_ms: i64) -> Option<usize> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let want = if ((n % 100) as f64) < self.preemptible_share * 100.0 {
            crate::Pool::Preemptible
        } else {
            crate::Pool::Regular
        };
        let avail = |pool: crate::Pool| -> Vec<usize> {
            (0..self.backends.len())
                .filter(|i| Some(*i) != avoid && self.backends[*i].pool == pool && self.backends[*i].available(now_ms))
                .collect()
        };
        let mut c = avail(want);
        if c.is_empty() {
            c = avail(if want == crate::Pool::Regular { crate::Pool::Preemptible } else { crate::Pool::Regular });
        }
        (!c.is_empty()).then(|| c[(n / 100 + n) % c.len()])
    }

    /// A backend answered well: its failure streak ends.
    fn record_success(&self, i: usize) {
        self.backends[i].consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// A backend answered 5xx or timed out; ejects it after a streak of
    /// failures unless that would take out more than the allowed share of
    /// the route. Returns whether it was ejected.
    fn record_failure(&self, i: usize, o: &crate::OutlierConfig, now_ms: i64) -> bool {
        let b = &self.backends[i];
        let streak = b.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < o.consecutive_failures {
            return false;
        }
        let ejected = self.backends.iter().filter(|b| b.ejected_until_ms.load(Ordering::Relaxed) > now_ms).count();
        let allowed = (o.max_ejected_share * self.backends.len() as f64).floor() as usize;
        if ejected + 1 > allowed {
            return false;
        }
        b.consecutive_failures.store(0, Ordering::Relaxed);
        b.ejected_until_ms.store(now_ms + o.ejection_time.as_millis() as i64, Ordering::Relaxed);
        true
    }
}

/// Every route, for preemption drains and return checks.
#[derive(Clone)]
pub struct Routes(pub Arc<HashMap<String, Route>>);

impl Routes {
    /// Drains every backend on `node` until at least `until` (on the
    /// gateway's clock); returns how many.
    pub fn drain_node(&self, node: &str, until: chrono::DateTime<chrono::Utc>) -> usize {
        let mut n = 0;
        for r in self.0.values() {
            for b in r.backends.iter().filter(|b| b.node.as_deref() == Some(node)) {
                *b.drained_until.lock().expect("backend lock") = Some(until);
                n += 1;
            }
        }
        n
    }

    /// Brings back drained backends whose drain time is over at `now`, and
    /// failed ones, once they accept a connection.
    pub async fn check_returns(&self, now: chrono::DateTime<chrono::Utc>) {
        for r in self.0.values() {
            for b in &r.backends {
                let drained = *b.drained_until.lock().expect("backend lock");
                let waiting =
                    drained.is_some_and(|u| now >= u) || (drained.is_none() && b.failed.load(Ordering::Relaxed));
                if !waiting {
                    continue;
                }
                let Some(addr) = b.authority() else { continue };
                let up = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(&addr))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if up {
                    *b.drained_until.lock().expect("backend lock") = None;
                    b.failed.store(false, Ordering::Relaxed);
                    tracing::info!(backend = %b.url, "backend back in rotation");
                }
            }
        }
    }
}

/// The worst budget state across scopes, as budget events report it.
#[derive(Clone, Default)]
pub struct BudgetState {
    scopes: Arc<Mutex<HashMap<String, costmesh_contracts::v1::BudgetState>>>,
    /// The worst state, kept for the hot path (read on every request).
    worst: Arc<std::sync::atomic::AtomicI32>,
}

impl BudgetState {
    /// Records a scope's state; returns its previous one.
    pub fn set(&self, scope: &str, s: costmesh_contracts::v1::BudgetState) -> costmesh_contracts::v1::BudgetState {
        let mut scopes = self.scopes.lock().expect("budget lock");
        let was = scopes.insert(scope.to_string(), s).unwrap_or(costmesh_contracts::v1::BudgetState::Ok);
        let worst = scopes.values().map(|s| *s as i32).max().unwrap_or(0);
        self.worst.store(worst, Ordering::Relaxed);
        was
    }

    pub fn worst(&self) -> costmesh_contracts::v1::BudgetState {
        costmesh_contracts::v1::BudgetState::try_from(self.worst.load(Ordering::Relaxed))
            .unwrap_or(costmesh_contracts::v1::BudgetState::Ok)
    }
}

type Flight = broadcast::Sender<Result<Arc<Cached>, (StatusCode, String)>>;

/// Everything the handler needs.
#[derive(Clone)]
pub struct Gateway {
    pub routes: Arc<HashMap<String, Route>>,
    pub store: Store,
    pub client: reqwest::Client,
    pub stats: Stats,
    pub budget: crate::BudgetConfig,
    pub budget_state: BudgetState,
    /// Ages and TTLs are read from the injectable clock.
    pub clock: costmesh_runtime::Clock,
    /// Graces past the TTL (seconds): while refreshing, and on backend errors.
    pub stale_while_revalidate: u64,
    pub stale_if_error: u64,
    pub outlier: crate::OutlierConfig,
    /// Whole-answer limit for buffered calls (streams get it between reads).
    pub backend_timeout: Duration,
    inflight: Arc<Mutex<HashMap<String, Flight>>>,
}

impl Gateway {
    pub fn new(mut routes: HashMap<String, Route>, store: Store, backend_timeout: Duration, stats: Stats) -> Self {
        for (name, r) in routes.iter_mut() {
            r.counters = stats.for_route(name);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(backend_timeout.min(Duration::from_secs(5)))
            .read_timeout(backend_timeout)
            .build()
            .unwrap_or_default();
        Self {
            routes: Arc::new(routes),
            store,
            client,
            stats,
            budget: Default::default(),
            budget_state: Default::default(),
            clock: costmesh_runtime::Clock::system(),
            stale_while_revalidate: 0,
            stale_if_error: 0,
            outlier: Default::default(),
            backend_timeout,
            inflight: Default::default(),
        }
    }

    pub fn with_grace(mut self, while_revalidate: Duration, if_error: Duration) -> Self {
        self.stale_while_revalidate = while_revalidate.as_secs();
        self.stale_if_error = if_error.as_secs();
        self
    }

    pub fn with_outlier(mut self, o: crate::OutlierConfig) -> Self {
        self.outlier = o;
        self
    }

    pub fn with_clock(mut self, clock: costmesh_runtime::Clock) -> Self {
        self.clock = clock;
        self
    }

    fn now_s(&self) -> i64 {
        self.clock.now().timestamp()
    }

    pub fn with_budget(mut self, b: crate::BudgetConfig) -> Self {
        self.budget = b;
        self
    }

    /// The two graces under a budget state (longer on a warning).
    fn graces(&self, budget: BudgetLevel) -> (u64, u64) {
        let f = if budget == BudgetLevel::Warning { self.budget.warning_grace_factor } else { 1.0 };
        ((self.stale_while_revalidate as f64 * f) as u64, (self.stale_if_error as f64 * f) as u64)
    }

    /// Stores a fresh response with the TTL and grace the budget state calls for.
    async fn store_entry(&self, key: &str, route: &Route, mut entry: Cached, budget: BudgetLevel) {
        let factor = if budget == BudgetLevel::Warning { self.budget.warning_ttl_factor } else { 1.0 };
        entry.ttl = (route.ttl.as_secs_f64() * factor) as u64;
        let (swr, sie) = self.graces(budget);
        let by_budget = if self.budget.on_exceeded == crate::OnExceeded::ServeStale {
            self.budget.exceeded_stale.as_secs()
        } else {
            0
        };
        entry.grace = swr.max(sie).max(by_budget);
        self.store.put(key, entry).await;
    }

    /// Takes the in-flight slot for `key`; false when a call is already out.
    fn lead(&self, key: &str) -> bool {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if inflight.contains_key(key) {
            return false;
        }
        inflight.insert(key.to_string(), broadcast::channel(1).0);
        true
    }

    /// Releases the in-flight slot, handing the outcome to whoever waits.
    fn finish(&self, key: &str, outcome: Result<Arc<Cached>, (StatusCode, String)>) {
        if let Some(tx) = self.inflight.lock().expect("inflight lock").remove(key) {
            let _ = tx.send(outcome);
        }
    }
}

type BudgetLevel = costmesh_contracts::v1::BudgetState;

/// What a backend call needs, owned (a background refresh outlives the request).
#[derive(Clone)]
struct Forward {
    route: String,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// Refreshes a stale entry in the background (one refresh per key).
fn revalidate(gw: &Gateway, key: &str, fwd: Forward, budget: BudgetLevel) {
    if !gw.lead(key) {
        return;
    }
    let (gw, key) = (gw.clone(), key.to_string());
    tokio::spawn(async move {
        let Some(route) = gw.routes.get(&fwd.route) else {
            return gw.finish(&key, Err((StatusCode::NOT_FOUND, "route gone".into())));
        };
        let outcome = call_backend(&gw, route, &fwd).await;
        gw.finish(&key, outcome.as_ref().map(|(c, _)| Arc::new(c.clone())).map_err(|e| e.clone()));
        match outcome {
            Ok((c, true)) => gw.store_entry(&key, route, c, budget).await,
            Ok((c, false)) => {
                tracing::warn!(route = %fwd.route, status = c.status, "background refresh not cacheable; stale entry kept")
            }
            Err((_, e)) => {
                tracing::warn!(route = %fwd.route, error = %e, "background refresh failed; stale entry kept")
            }
        }
    });
}

/// The gateway's HTTP router.
pub fn router(gw: Gateway, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/_costmesh/purge", axum::routing::post(purge))
        .route("/{route}", any(handle_root))
        .route("/{route}/{*rest}", any(handle))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gw)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    let mut r = (status, axum::Json(serde_json::json!({ "error": msg }))).into_response();
    if let Ok(v) = HeaderValue::from_str(&msg.replace(['\r', '\n'], " ")) {
        r.headers_mut().insert("costmesh-error", v);
    }
    r
}

/// `POST /_costmesh/purge` with `{"route": ..}`, `{"model_version": ..}`,
/// both, or `{"all": true}`.
async fn purge(State(gw): State<Gateway>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        route: Option<String>,
        model_version: Option<String>,
        #[serde(default)]
        all: bool,
    }
    let p: Purge = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("purge body: {e} (expected {{\"route\"|\"model_version\"|\"all\": ...}})"),
            )
        }
    };
    if !p.all && p.route.is_none() && p.model_version.is_none() {
        return error(StatusCode::BAD_REQUEST, "say what to purge: route, model_version, or all");
    }
    let pattern = crate::key::purge_pattern(p.route.as_deref(), p.model_version.as_deref());
    match gw.store.purge(&pattern).await {
        Ok(n) => axum::Json(serde_json::json!({"pattern": pattern, "redis_keys_removed": n})).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("purge failed: {e}")),
    }
}

/// RFC 9111 request directives the gateway honours.
#[derive(Default)]
struct Directives {
    no_store: bool,
    no_cache: bool,
    max_age: Option<u64>,
}

fn directives(h: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for v in h.get_all("cache-control") {
        for part in v.to_str().unwrap_or("").split(',') {
            let p = part.trim().to_ascii_lowercase();
            if p == "no-store" {
                d.no_store = true;
            } else if p == "no-cache" {
                d.no_cache = true;
            } else if let Some(n) = p.strip_prefix("max-age=") {
                d.max_age = n.parse().ok();
            }
        }
    }
    d
}

fn respond(c: &Cached, cache_status: String, age: Option<u64>) -> Response {
    let mut r = Response::builder().status(c.status);
    if !c.content_type.is_empty() {
        r = r.header("content-type", &c.content_type);
    }
    if let Some(a) = age {
        r = r.header("age", a.to_string());
    }
    r.header("cache-status", cache_status)
        .body(axum::body::Body::from(c.body.clone()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn handle_root(
    state: State<Gateway>,
    Path(route): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    proxy(state.0, route, with_query(String::new(), query), method, headers, body).await
}

async fn handle(
    state: State<Gateway>,
    Path((route, rest)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    proxy(state.0, route, with_query(rest, query), method, headers, body).await
}

/// The path after the route, with the query string (part of the key and forwarded).
fn with_query(rest: String, query: Option<String>) -> String {
    match query {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    }
}

async fn proxy(
    gw: Gateway,
    route_name: String,
    rest: String,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(route) = gw.routes.get(&route_name) else {
        return error(StatusCode::NOT_FOUND, format!("unknown route {route_name:?}"));
    };
    let m = &route.counters;
    m.requests.inc();
    let budget = gw.budget_state.worst();
    if budget == costmesh_contracts::v1::BudgetState::Exceeded
        && gw.budget.on_exceeded == crate::OnExceeded::ShedLowPriority
        && route.priority == crate::Priority::Low
    {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("budget exceeded: low-priority route {route_name:?} is shed"),
        );
        if let Ok(v) = HeaderValue::from_str(&gw.budget.retry_after.as_secs().to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        return r;
    }
    let path = format!("/{rest}");
    let is_json =
        headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/json"));
    let json = if is_json && !body.is_empty() {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => Some(v),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}")),
        }
    } else {
        None
    };
    let hv = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (tenant, model, version) = (hv("x-tenant"), hv("x-model"), hv("x-model-version"));
    let d = directives(&headers);
    let cacheable_method = method == Method::GET || method == Method::POST;
    let key = cache_key(&KeyParts {
        method: method.as_str(),
        route: &route_name,
        path: &path,
        model: &model,
        model_version: &version,
        tenant: &tenant,
        body: &body,
        json: json.as_ref(),
    });
    let now = gw.now_s();
    let fwd = Forward { route: route_name.clone(), method: method.clone(), path, headers, body };
    let (swr, sie) = gw.graces(budget);

    // An expired entry kept for stale-if-error when it is not served at once.
    let mut fallback: Option<Arc<Cached>> = None;
    if cacheable_method && !d.no_store && !d.no_cache {
        match gw.store.get(&key, now).await {
            Lookup::Fresh(c) if d.max_age.is_none_or(|m| c.age(now) <= m) => {
                let age = c.age(now);
                m.hits.inc();
                m.bytes.inc_by(c.body.len() as u64);
                return respond(&c, format!("{CACHE_NAME}; hit; ttl={}", c.ttl.saturating_sub(age)), Some(age));
            }
            Lookup::Stale(c) => {
                let late = c.stale_for(now);
                let by_budget = budget == BudgetLevel::Exceeded
                    && gw.budget.on_exceeded == crate::OnExceeded::ServeStale
                    && late <= gw.budget.exceeded_stale.as_secs();
                if by_budget || (d.max_age.is_none() && late < swr) {
                    m.stale.inc();
                    m.bytes.inc_by(c.body.len() as u64);
                    let detail = if by_budget {
                        "budget-exceeded"
                    } else {
                        revalidate(&gw, &key, fwd, budget);
                        "stale-while-revalidate"
                    };
                    return respond(&c, format!("{CACHE_NAME}; hit; ttl=-{late}; detail={detail}"), Some(c.age(now)));
                }
                fallback = Some(c);
            }
            _ => {}
        }
    }
    m.misses.inc();
    let store_it = cacheable_method && !d.no_store;
    if !store_it {
        // Nothing will be kept: stream the answer through.
        let (why, detail) = if d.no_store { ("bypass", "; detail=no-store") } else { ("method", "") };
        return stream_backend(&gw, route, &fwd, why, detail).await;
    }

    // Identical concurrent misses wait for one backend call.
    let follow = if store_it {
        let inflight = gw.inflight.lock().expect("inflight lock");
        inflight.get(&key).map(|tx| tx.subscribe())
    } else {
        None
    };
    if let Some(mut rx) = follow {
        m.coalesced.inc();
        return match rx.recv().await {
            Ok(Ok(c)) => respond(&c, format!("{CACHE_NAME}; fwd=miss; collapsed"), None),
            Ok(Err((status, msg))) => error(status, msg),
            Err(_) => error(StatusCode::BAD_GATEWAY, "the shared backend call was lost"),
        };
    }
    let leader = store_it && gw.lead(&key);

    let outcome = call_backend(&gw, route, &fwd).await.map(|(c, cacheable)| (Arc::new(c), cacheable));
    if leader {
        gw.finish(&key, outcome.as_ref().map(|(c, _)| c.clone()).map_err(|e| e.clone()));
    }

    // stale-if-error: the backends failed, an expired entry within its grace answers.
    let failed_status = match &outcome {
        Ok((c, _)) if c.status >= 500 => Some(c.status.to_string()),
        Err((status, _)) => Some(status.as_u16().to_string()),
        Ok(_) => None,
    };
    if let (Some(fs), Some(c)) = (failed_status, fallback.as_ref()) {
        let late = c.stale_for(now);
        if late < sie {
            m.stale.inc();
            m.bytes.inc_by(c.body.len() as u64);
            let status = format!("{CACHE_NAME}; fwd=stale; fwd-status={fs}; ttl=-{late}; detail=stale-if-error");
            return respond(c, status, Some(c.age(now)));
        }
    }
    let fwd_why = if fallback.is_some() { "stale" } else { "miss" };
    match outcome {
        Ok((c, cacheable)) => {
            let stored = store_it && cacheable;
            if stored {
                gw.store_entry(&key, route, (*c).clone(), budget).await;
            }
            let status = if d.no_cache {
                format!("{CACHE_NAME}; fwd=request; fwd-status={}{}", c.status, if stored { "; stored" } else { "" })
            } else {
                format!("{CACHE_NAME}; fwd={fwd_why}; fwd-status={}{}", c.status, if stored { "; stored" } else { "" })
            };
            respond(&c, status, None)
        }
        Err((status, msg)) => error(status, msg),
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
];

/// Sends the request to one of the route's backends and returns its answer
/// (headers read, body not yet). Only a request that never reached a
/// backend (connection refused) is retried, on another backend; 5xx answers
/// and timeouts count towards the backend's outlier ejection.
async fn send(
    gw: &Gateway,
    route: &Route,
    fwd: &Forward,
    total_timeout: bool,
) -> Result<(reqwest::Response, usize), (StatusCode, String)> {
    let mut avoid = None;
    let (resp, i) = loop {
        let now_ms = gw.clock.now().timestamp_millis();
        let i = route
            .pick(avoid, now_ms)
            .ok_or((StatusCode::SERVICE_UNAVAILABLE, "no backend of this route is available".to_string()))?;
        let b = &route.backends[i];
        let url = format!("{}{}", b.url.trim_end_matches('/'), fwd.path);
        let mut req = gw.client.request(fwd.method.clone(), &url).body(fwd.body.clone());
        if total_timeout {
            req = req.timeout(gw.backend_timeout);
        }
        for (k, v) in &fwd.headers {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                req = req.header(k, v);
            }
        }
        match req.send().await {
            Ok(r) => break (r, i),
            // Nothing reached the backend: safe to try another one.
            Err(e) if e.is_connect() && avoid.is_none() => {
                tracing::warn!(backend = %b.url, error = %e, "backend unreachable; out of rotation, retrying elsewhere");
                b.failed.store(true, Ordering::Relaxed);
                avoid = Some(i);
            }
            Err(e) if e.is_timeout() => {
                note_failure(gw, route, i, &fwd.route);
                return Err((StatusCode::GATEWAY_TIMEOUT, format!("backend {} timed out", b.url)));
            }
            Err(e) => {
                if e.is_connect() {
                    b.failed.store(true, Ordering::Relaxed);
                }
                return Err((StatusCode::BAD_GATEWAY, format!("backend {} failed: {e}", b.url)));
            }
        }
    };
    if resp.status().as_u16() >= 500 {
        note_failure(gw, route, i, &fwd.route);
    } else {
        route.record_success(i);
    }
    Ok((resp, i))
}

/// Calls a backend and reads the whole answer (for the cache).
async fn call_backend(gw: &Gateway, route: &Route, fwd: &Forward) -> Result<(Cached, bool), (StatusCode, String)> {
    let started = Instant::now();
    let (resp, i) = send(gw, route, fwd, true).await?;
    let base = &route.backends[i].url;
    let status = resp.status().as_u16();
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let cc = resp.headers().get("cache-control").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let body = resp.bytes().await.map_err(|e| (StatusCode::BAD_GATEWAY, format!("backend {base} body: {e}")))?;
    route.counters.backend_ms.inc_by(started.elapsed().as_millis() as u64);
    let cacheable = (200..300).contains(&status) && !cc.contains("no-store") && !cc.contains("private");
    Ok((Cached { status, content_type, stored_at: gw.now_s(), ttl: 0, grace: 0, body }, cacheable))
}

/// Calls a backend and streams its answer to the client as it comes (for
/// requests the cache does not keep). Between reads the backend may pause
/// up to `backend_timeout`; the whole answer may take longer.
async fn stream_backend(gw: &Gateway, route: &Route, fwd: &Forward, why: &str, detail: &str) -> Response {
    let started = Instant::now();
    let resp = match send(gw, route, fwd, false).await {
        Ok((r, _)) => r,
        Err((status, msg)) => return error(status, msg),
    };
    route.counters.backend_ms.inc_by(started.elapsed().as_millis() as u64);
    let status = resp.status();
    let mut out = Response::builder().status(status.as_u16());
    for (k, v) in resp.headers() {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    out.header("cache-status", format!("{CACHE_NAME}; fwd={why}; fwd-status={}{detail}", status.as_u16()))
        .body(axum::body::Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn note_failure(gw: &Gateway, route: &Route, i: usize, route_name: &str) {
    if route.record_failure(i, &gw.outlier, gw.clock.now().timestamp_millis()) {
        let url = &route.backends[i].url;
        tracing::warn!(backend = %url, route = %route_name, failures = gw.outlier.consecutive_failures,
            ejected_for = ?gw.outlier.ejection_time, "backend ejected as an outlier");
        gw.stats.ejections.get_or_create(&BackendLabels { route: route_name.to_string(), backend: url.clone() }).inc();
    }
}
