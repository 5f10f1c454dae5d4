//! The proxy: routes requests to a route's backends, answers repeated
//! requests from the cache, makes one backend call for concurrent identical
//! misses, and says what happened in an RFC 9211 `Cache-Status` header.
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::StreamExt;
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
pub struct TenantLabels {
    pub route: String,
    /// Empty for anonymous clients.
    pub tenant: String,
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
    /// Requests by route and tenant (as resolved from API keys).
    pub tenant_requests: Family<TenantLabels, Counter>,
    /// Calls made to backends, by route.
    pub backend_calls: Family<RouteLabels, Counter>,
    /// Every counter per route and tenant, for the cost-watcher's report
    /// (tenants are the configured set, so this stays small).
    tallies: Arc<Mutex<Tallies>>,
}

/// (route, tenant) -> its tally.
type Tallies = std::collections::BTreeMap<(String, String), Arc<Tally>>;

/// One route's counters for one tenant (cumulative since start).
#[derive(Debug, Default)]
pub struct Tally {
    requests: std::sync::atomic::AtomicU64,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    stale: std::sync::atomic::AtomicU64,
    coalesced: std::sync::atomic::AtomicU64,
    backend_calls: std::sync::atomic::AtomicU64,
    backend_ms: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
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
    /// `tenant_requests` for the anonymous tenant, looked up once.
    anonymous: Counter,
    backend_calls: Counter,
    /// The anonymous tenant's tally, looked up once.
    anonymous_tally: Arc<Tally>,
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
            anonymous: self
                .tenant_requests
                .get_or_create(&TenantLabels { route: route.to_string(), tenant: String::new() })
                .clone(),
            backend_calls: self.backend_calls.get_or_create(&l).clone(),
            anonymous_tally: self.tally(route, ""),
        }
    }

    /// The tally of `route` for `tenant` ("" for anonymous clients).
    pub fn tally(&self, route: &str, tenant: &str) -> Arc<Tally> {
        let mut t = self.tallies.lock().expect("tallies lock");
        t.entry((route.to_string(), tenant.to_string())).or_default().clone()
    }

    /// `route`'s counters per tenant, as reported on NATS: one entry per
    /// tenant seen (the anonymous one always), summing to the route's totals.
    pub fn tenant_stats(&self, route: &str) -> Vec<costmesh_contracts::v1::RouteStats> {
        let t = self.tallies.lock().expect("tallies lock");
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        t.range((route.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == route)
            .map(|((_, tenant), x)| costmesh_contracts::v1::RouteStats {
                route: route.to_string(),
                tenant: tenant.clone(),
                requests: get(&x.requests),
                hits: get(&x.hits),
                misses: get(&x.misses),
                stale: get(&x.stale),
                coalesced: get(&x.coalesced),
                backend_calls: get(&x.backend_calls),
                backend_time_ms: get(&x.backend_ms),
                bytes: get(&x.bytes),
            })
            .collect()
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
            backend_calls: self.backend_calls.get_or_create(&l).get(),
            tenant: String::new(),
        }
    }
}

/// `url` with any `user:password@` taken out (it goes on the bus).
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
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
    /// Request headers in the key (lower case).
    pub key_headers: Vec<String>,
    pub methods: Vec<Method>,
    pub cache_cookies: bool,
    pub require_tenant: bool,
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
            key_headers: crate::rules::DEFAULT_KEY_HEADERS.iter().map(|s| s.to_string()).collect(),
            methods: crate::paths::DEFAULT_METHODS
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            cache_cookies: false,
            require_tenant: false,
            next: AtomicUsize::new(0),
            counters: RouteCounters::default(),
        }
    }

    /// The route's shared-cache, method and tenant settings.
    pub fn with_rules(mut self, r: &crate::RouteConfig) -> Self {
        if let Some(h) = &r.key_headers {
            self.key_headers = h.iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        if let Some(m) = &r.methods {
            self.methods = m.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect();
        }
        self.cache_cookies = r.cache_cookies;
        self.require_tenant = r.require_tenant;
        self
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
    /// Every backend of every route as it stands at `now`, by route and URL.
    pub fn health(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<costmesh_contracts::v1::BackendHealth> {
        let now_ms = now.timestamp_millis();
        let mut out: Vec<_> = self
            .0
            .iter()
            .flat_map(|(name, r)| {
                r.backends.iter().map(move |b| {
                    let drained = *b.drained_until.lock().expect("backend lock");
                    let state = if drained.is_some() {
                        "drained"
                    } else if b.failed.load(Ordering::Relaxed) {
                        "failed"
                    } else if b.ejected_until_ms.load(Ordering::Relaxed) > now_ms {
                        "ejected"
                    } else {
                        "ok"
                    };
                    costmesh_contracts::v1::BackendHealth {
                        route: name.clone(),
                        url: without_userinfo(&b.url),
                        pool: match b.pool {
                            crate::Pool::Regular => "regular",
                            crate::Pool::Preemptible => "preemptible",
                        }
                        .into(),
                        node: b.node.clone().unwrap_or_default(),
                        state: state.into(),
                        drained_until: drained.map(costmesh_contracts::timestamp),
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.route, &a.url).cmp(&(&b.route, &b.url)));
        out
    }

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
    pub tenants: crate::tenants::Tenants,
    /// Request bodies above this get 413.
    pub max_body_bytes: usize,
    /// Answers above this are streamed and not stored.
    pub max_object_bytes: usize,
    /// A request body must arrive whole within this.
    pub body_timeout: Duration,
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
            tenants: Default::default(),
            max_body_bytes: 1 << 20,
            max_object_bytes: 1 << 20,
            body_timeout: Duration::from_secs(30),
            inflight: Default::default(),
        }
    }

    pub fn with_tenants(mut self, t: crate::tenants::Tenants) -> Self {
        self.tenants = t;
        self
    }

    pub fn with_body_timeout(mut self, t: Duration) -> Self {
        self.body_timeout = t;
        self
    }

    pub fn with_limits(mut self, max_body_bytes: usize, max_object_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self.max_object_bytes = max_object_bytes;
        self
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
        if let Some(max) = entry.max_age {
            entry.ttl = entry.ttl.min(max);
        }
        let (swr, sie) = self.graces(budget);
        let by_budget = if self.budget.on_exceeded == crate::OnExceeded::ServeStale {
            self.budget.exceeded_stale.as_secs()
        } else {
            0
        };
        entry.grace = swr.max(sie).max(by_budget);
        // Parsed again on its first hit: an entry never served from the
        // cache keeps no header map.
        entry.parsed = Default::default();
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
    /// The requesting tenant's counters (backend calls are booked to it).
    tally: Arc<Tally>,
}

/// Refreshes a stale entry in the background (one refresh per key).
fn revalidate(gw: &Arc<Gateway>, key: &str, fwd: Forward, budget: BudgetLevel) {
    if !gw.lead(key) {
        return;
    }
    let (gw, key) = (gw.clone(), key.to_string());
    tokio::spawn(async move {
        let Some(route) = gw.routes.get(&fwd.route) else {
            return gw.finish(&key, Err((StatusCode::NOT_FOUND, "route gone".into())));
        };
        match call_backend(&gw, route, &fwd).await {
            Ok(Answer::Whole(c, policy)) => {
                gw.finish(&key, Ok(Arc::new(c.clone())));
                if policy.storable {
                    gw.store_entry(&key, route, c, budget).await;
                } else {
                    tracing::warn!(route = %fwd.route, status = c.status, why = policy.reason, "background refresh not cacheable; stale entry kept");
                }
            }
            Ok(Answer::Large { .. }) => {
                gw.finish(&key, Err(too_large()));
                tracing::warn!(route = %fwd.route, "background refresh larger than max_object_bytes; stale entry kept");
            }
            Err(e) => {
                tracing::warn!(route = %fwd.route, error = %e.1, "background refresh failed; stale entry kept");
                gw.finish(&key, Err(e));
            }
        }
    });
}

/// The outcome a coalesced follower gets for an answer too large to share.
fn too_large() -> (StatusCode, String) {
    (StatusCode::PAYLOAD_TOO_LARGE, "the answer is larger than max_object_bytes and is not shared".into())
}

/// The gateway's HTTP router. `max_body_bytes` bounds request bodies.
pub fn router(mut gw: Gateway, max_body_bytes: usize) -> Router {
    gw.max_body_bytes = max_body_bytes;
    // Shared, not cloned per request (the gateway holds a few dozen handles).
    Router::new().route("/_costmesh/purge", any(purge)).fallback(entry).with_state(Arc::new(gw))
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
/// both, or `{"all": true}`; only with `Authorization: Bearer <admin token>`.
async fn purge(State(gw): State<Arc<Gateway>>, method: Method, headers: HeaderMap, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        route: Option<String>,
        model_version: Option<String>,
        #[serde(default)]
        all: bool,
    }
    if method != Method::POST {
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "purge is POST");
        r.headers_mut().insert("allow", HeaderValue::from_static("POST"));
        return r;
    }
    if !gw.tenants.admin_enabled() {
        return error(StatusCode::FORBIDDEN, "purge is disabled: set cache_gateway.admin_token_file");
    }
    if !gw.tenants.is_admin(&headers) {
        let mut r = error(StatusCode::UNAUTHORIZED, "purge needs Authorization: Bearer <admin token>");
        r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
        return r;
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
    let mut r = Response::new(axum::body::Body::from(c.body.clone()));
    *r.status_mut() = StatusCode::from_u16(c.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    // Parsed once per entry, then copied (shared bytes) into each answer.
    *h = c.response_headers().clone();
    h.reserve(2);
    if let Some(a) = age {
        h.insert("age", HeaderValue::from(a));
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(cache_status)) {
        h.insert("cache-status", v);
    }
    r
}

/// 304 for a conditional request that matches a fresh entry's `ETag`.
fn not_modified(c: &Cached, cache_status: String, age: u64) -> Response {
    let mut r = Response::builder().status(StatusCode::NOT_MODIFIED);
    for (k, v) in c.headers.iter().filter(|(k, _)| k != "content-encoding" && k != "content-language") {
        r = r.header(k.as_str(), v.as_str());
    }
    r.header("age", age.to_string())
        .header("cache-status", cache_status)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Every request but purge: `/<route>/<rest>`. The remainder is taken from
/// the raw path, so percent-escapes are checked before anything decodes them.
async fn entry(State(gw): State<Arc<Gateway>>, req: axum::extract::Request) -> Response {
    let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    let raw = parts.uri.path().strip_prefix('/').unwrap_or(parts.uri.path());
    let (route, rest) = raw.split_once('/').unwrap_or((raw, ""));
    let route = route.to_string();
    let rest = match crate::paths::check_rest(rest) {
        Ok(r) => r.to_string(),
        Err(why) => return error(StatusCode::BAD_REQUEST, format!("bad path: {why}")),
    };
    // No timer for a request without a body (most GETs): the hot path.
    let read = async {
        if axum::body::HttpBody::is_end_stream(&body) {
            return Ok(Ok(Bytes::new()));
        }
        tokio::time::timeout(gw.body_timeout, axum::body::to_bytes(body, gw.max_body_bytes)).await
    };
    let body = match read.await {
        Ok(Ok(b)) => b,
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within request_body_timeout ({:?})", gw.body_timeout),
            )
        }
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than max_body_bytes ({})", gw.max_body_bytes),
            )
        }
    };
    let rest = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    proxy(gw, route, rest, parts.method, parts.headers, body, peer).await
}

/// What a backend call gave.
enum Answer {
    /// Read whole, with what its headers say about storing it.
    Whole(Cached, crate::rules::ResponsePolicy),
    /// Larger than `max_object_bytes`: what was read, and the rest to stream.
    Large { status: u16, headers: HeaderMap, head: Bytes, rest: reqwest::Response },
}

impl Answer {
    fn status(&self) -> u16 {
        match self {
            Answer::Whole(c, _) => c.status,
            Answer::Large { status, .. } => *status,
        }
    }

    fn into_response(self, cache_status: String) -> Response {
        match self {
            Answer::Whole(c, _) => respond(&c, cache_status, None),
            Answer::Large { status, headers, head, rest } => {
                let mut out = Response::builder().status(status);
                for (k, v) in &headers {
                    if !HOP_BY_HOP.contains(&k.as_str()) {
                        out = out.header(k, v);
                    }
                }
                let stream =
                    futures::stream::once(async move { Ok::<Bytes, reqwest::Error>(head) }).chain(rest.bytes_stream());
                out.header("cache-status", format!("{cache_status}; detail=too-large"))
                    .body(axum::body::Body::from_stream(stream))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    gw: Arc<Gateway>,
    route_name: String,
    rest: String,
    method: Method,
    mut headers: HeaderMap,
    body: Bytes,
    peer: Option<std::net::IpAddr>,
) -> Response {
    let Some(route) = gw.routes.get(&route_name) else {
        return error(StatusCode::NOT_FOUND, format!("unknown route {route_name:?}"));
    };
    if !route.methods.contains(&method) {
        let allow: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
        let mut r =
            error(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} is not allowed on route {route_name:?}"));
        if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
            r.headers_mut().insert("allow", v);
        }
        return r;
    }
    let tenant = match gw.tenants.resolve(&headers, peer) {
        crate::tenants::Tenant::Known(t) => t,
        crate::tenants::Tenant::UnknownKey => {
            return error(StatusCode::UNAUTHORIZED, format!("unknown API key ({})", crate::tenants::API_KEY_HEADER))
        }
        crate::tenants::Tenant::Anonymous if route.require_tenant => {
            return error(
                StatusCode::UNAUTHORIZED,
                format!("route {route_name:?} needs a tenant API key in {}", crate::tenants::API_KEY_HEADER),
            )
        }
        crate::tenants::Tenant::Anonymous => String::new(),
    };
    // The key stays here; the backend learns the tenant the gateway settled on.
    headers.remove(crate::tenants::API_KEY_HEADER);
    headers.remove(crate::tenants::TENANT_HEADER);
    if let Ok(v) = HeaderValue::from_str(&tenant) {
        if !tenant.is_empty() {
            headers.insert(crate::tenants::TENANT_HEADER, v);
        }
    }
    let m = &route.counters;
    m.requests.inc();
    let tally = if tenant.is_empty() {
        m.anonymous.inc();
        m.anonymous_tally.clone()
    } else {
        gw.stats
            .tenant_requests
            .get_or_create(&TenantLabels { route: route_name.clone(), tenant: tenant.clone() })
            .inc();
        gw.stats.tally(&route_name, &tenant)
    };
    bump(&tally.requests, 1);
    let t = tally.clone();
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
    let hv = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (model, version) = (hv("x-model"), hv("x-model-version"));
    let d = directives(&headers);
    // Credentials make the answer private unless the response says otherwise.
    let private = crate::rules::is_private_request(&headers, route.cache_cookies);
    let cacheable_method = method == Method::GET || method == Method::POST;
    let varied = crate::rules::key_headers(&headers, &route.key_headers);
    let key = cache_key(&KeyParts {
        method: method.as_str(),
        route: &route_name,
        path: &path,
        model,
        model_version: version,
        tenant: &tenant,
        headers: &varied,
        body: &body,
        json: json.as_ref(),
    });
    let now = gw.now_s();
    let fwd = Forward { route: route_name.clone(), method: method.clone(), path, headers, body, tally };
    let (swr, sie) = gw.graces(budget);

    // An expired entry kept for stale-if-error when it is not served at once.
    let mut fallback: Option<Arc<Cached>> = None;
    if cacheable_method && !d.no_store && !d.no_cache {
        match gw.store.get(&key, now).await {
            Lookup::Fresh(c) if servable(&fwd.headers, private, &c) && d.max_age.is_none_or(|m| c.age(now) <= m) => {
                let age = c.age(now);
                m.hits.inc();
                bump(&t.hits, 1);
                let status = format!("{CACHE_NAME}; hit; ttl={}", c.ttl.saturating_sub(age));
                if crate::rules::not_modified(&fwd.headers, c.etag()) {
                    return not_modified(&c, status, age);
                }
                m.bytes.inc_by(c.body.len() as u64);
                bump(&t.bytes, c.body.len() as u64);
                return respond(&c, status, Some(age));
            }
            Lookup::Stale(c) if servable(&fwd.headers, private, &c) => {
                let late = c.stale_for(now);
                let by_budget = budget == BudgetLevel::Exceeded
                    && gw.budget.on_exceeded == crate::OnExceeded::ServeStale
                    && late <= gw.budget.exceeded_stale.as_secs();
                if by_budget || (d.max_age.is_none() && late < swr) {
                    m.stale.inc();
                    m.bytes.inc_by(c.body.len() as u64);
                    bump(&t.stale, 1);
                    bump(&t.bytes, c.body.len() as u64);
                    let detail = if by_budget {
                        "budget-exceeded"
                    } else {
                        revalidate(&gw, &key, fwd.clone(), budget);
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
    bump(&t.misses, 1);
    let store_it = cacheable_method && !d.no_store;
    if !store_it {
        // Nothing will be kept: stream the answer through.
        let (why, detail) = if d.no_store { ("bypass", "; detail=no-store") } else { ("method", "") };
        return stream_backend(&gw, route, &fwd, why, detail).await;
    }

    // Identical concurrent misses wait for one backend call; a private
    // request neither waits for nor leads one (its answer is its own).
    let follow = if private {
        None
    } else {
        let inflight = gw.inflight.lock().expect("inflight lock");
        inflight.get(&key).map(|tx| tx.subscribe())
    };
    if let Some(mut rx) = follow {
        m.coalesced.inc();
        bump(&t.coalesced, 1);
        match rx.recv().await {
            Ok(Ok(c)) if servable(&fwd.headers, private, &c) => {
                return respond(&c, format!("{CACHE_NAME}; fwd=miss; collapsed"), None)
            }
            Ok(Ok(_)) => {} // varies on something this request differs in: its own call
            Ok(Err((status, _))) if status == StatusCode::PAYLOAD_TOO_LARGE => {
                return stream_backend(&gw, route, &fwd, "miss", "; detail=too-large").await
            }
            Ok(Err((status, msg))) => return error(status, msg),
            Err(_) => return error(StatusCode::BAD_GATEWAY, "the shared backend call was lost"),
        }
    }
    let leader = !private && gw.lead(&key);

    let outcome = call_backend(&gw, route, &fwd).await;
    if leader {
        let shared = match &outcome {
            Ok(Answer::Whole(c, _)) => Ok(Arc::new(c.clone())),
            Ok(Answer::Large { .. }) => Err(too_large()),
            Err(e) => Err(e.clone()),
        };
        gw.finish(&key, shared);
    }

    // stale-if-error: the backends failed, an expired entry within its grace answers.
    let failed_status = match &outcome {
        Ok(a) if a.status() >= 500 => Some(a.status().to_string()),
        Err((status, _)) => Some(status.as_u16().to_string()),
        Ok(_) => None,
    };
    if let (Some(fs), Some(c)) = (failed_status, fallback.as_ref()) {
        let late = c.stale_for(now);
        if late < sie {
            m.stale.inc();
            m.bytes.inc_by(c.body.len() as u64);
            bump(&t.stale, 1);
            bump(&t.bytes, c.body.len() as u64);
            let status = format!("{CACHE_NAME}; fwd=stale; fwd-status={fs}; ttl=-{late}; detail=stale-if-error");
            return respond(c, status, Some(c.age(now)));
        }
    }
    let fwd_why = if d.no_cache {
        "request"
    } else if fallback.is_some() {
        "stale"
    } else {
        "miss"
    };
    match outcome {
        Ok(Answer::Whole(c, policy)) => {
            let shareable = !private || policy.shareable_with_credentials;
            let stored = policy.storable && shareable;
            let detail = if stored {
                "; stored".to_string()
            } else if !policy.storable {
                format!("; detail={}", policy.reason)
            } else {
                "; detail=credentials".to_string()
            };
            let status = format!("{CACHE_NAME}; fwd={fwd_why}; fwd-status={}{detail}", c.status);
            let r = respond(&c, status, None);
            if stored {
                gw.store_entry(&key, route, c, budget).await;
            }
            r
        }
        Ok(large) => {
            let fs = large.status();
            large.into_response(format!("{CACHE_NAME}; fwd={fwd_why}; fwd-status={fs}"))
        }
        Err((status, msg)) => error(status, msg),
    }
}

/// Whether an entry may answer this request: shareable with its
/// credentials, and made for the same values of the headers it varies on.
fn servable(req: &HeaderMap, private: bool, c: &Cached) -> bool {
    (!private || c.shared_with_credentials) && crate::rules::vary_matches(req, &c.vary)
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
        let sent = req.send().await;
        // A call that reached a backend costs what the route says it costs.
        if sent.as_ref().is_ok() || sent.as_ref().is_err_and(|e| e.is_timeout()) {
            route.counters.backend_calls.inc();
            bump(&fwd.tally.backend_calls, 1);
        }
        match sent {
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

/// Calls a backend and reads the whole answer (for the cache), unless it
/// is larger than `max_object_bytes`: then what was read and the rest are
/// handed back to stream.
async fn call_backend(gw: &Gateway, route: &Route, fwd: &Forward) -> Result<Answer, (StatusCode, String)> {
    let started = Instant::now();
    let (mut resp, i) = send(gw, route, fwd, true).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if resp.content_length().is_some_and(|n| n > gw.max_object_bytes as u64) {
        return Ok(Answer::Large { status, headers, head: Bytes::new(), rest: resp });
    }
    let mut buf = bytes::BytesMut::new();
    loop {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("backend {} body: {e}", route.backends[i].url)))?;
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        if buf.len() > gw.max_object_bytes {
            return Ok(Answer::Large { status, headers, head: buf.freeze(), rest: resp });
        }
    }
    let ms = started.elapsed().as_millis() as u64;
    route.counters.backend_ms.inc_by(ms);
    bump(&fwd.tally.backend_ms, ms);
    let policy = crate::rules::response_policy(status, &headers);
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let kept = crate::rules::stored_headers(&headers).into_iter().filter(|(k, _)| k != "content-type").collect();
    let vary = crate::rules::vary_values(&fwd.headers, &policy.vary, &route.key_headers);
    let entry = Cached {
        status,
        content_type,
        stored_at: gw.now_s(),
        headers: kept,
        vary,
        shared_with_credentials: policy.shareable_with_credentials,
        max_age: policy.max_age,
        // Exactly its size: an entry never pins a larger read buffer.
        body: Bytes::copy_from_slice(&buf),
        ..Default::default()
    };
    Ok(Answer::Whole(entry, policy))
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
    let ms = started.elapsed().as_millis() as u64;
    route.counters.backend_ms.inc_by(ms);
    bump(&fwd.tally.backend_ms, ms);
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

#[cfg(test)]
mod health_tests {
    #[test]
    fn backend_urls_on_the_bus_carry_no_user_information() {
        assert_eq!(super::without_userinfo("http://u:secret@h:8000/api/v1"), "http://h:8000/api/v1");
        assert_eq!(super::without_userinfo("https://h:8000"), "https://h:8000");
        assert_eq!(super::without_userinfo("http://a@b@h/x@y"), "http://h/x@y");
    }
}
