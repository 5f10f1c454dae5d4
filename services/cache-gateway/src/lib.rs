//! cache-gateway: the inference front door.
//!
//! # Layout
//! - [`key`]: cache keys (canonical JSON, tenant, model, version).
//! - [`store`]: the in-process tier in front of Redis; fails open.
//! - [`proxy`]: routing, caching, coalescing, `Cache-Status`.
//! - [`rules`]: RFC 9111 shared-cache rules (credentials, `Vary`, stored
//!   headers, conditional requests).
//! - [`paths`]: the route's remainder and method, checked before forwarding.
//! - [`tenants`]: tenants from API keys, trusted proxies, the admin token.
//! - [`serve`]: the client-facing server (header-read timeout, connection cap).
//!
//! The proxy has a two-tier cache (moka in front of Redis, fail-open),
//! RFC 9111 request directives, RFC 9211 `Cache-Status`, coalesced misses,
//! stale-while-revalidate and stale-if-error graces, weighted regular and
//! preemptible pools with preemption drain, return checks and outlier
//! ejection, budget-aware TTLs and degradation, purge, and cumulative
//! statistics on NATS.
#![forbid(unsafe_code)]

pub mod demo;
pub mod key;
pub mod paths;
pub mod proxy;
pub mod rules;
pub mod serve;
pub mod store;
pub mod tenants;

use std::time::Duration;

use std::sync::atomic::AtomicU64;

use costmesh_contracts::AnyEvent;
use costmesh_runtime::config::{key, AdminConfig, ConfigError, Validate};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::ServiceContext;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

/// Which pool a backend is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    #[default]
    Regular,
    Preemptible,
}

/// A backend: a URL, or a table naming its pool and the node it runs on
/// (preemption notices for that node drain it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum BackendSpec {
    Url(String),
    Full {
        url: String,
        #[serde(default)]
        pool: Pool,
        #[serde(default)]
        node: Option<String>,
    },
}

impl BackendSpec {
    pub fn url(&self) -> &str {
        match self {
            BackendSpec::Url(u) | BackendSpec::Full { url: u, .. } => u,
        }
    }
}

impl From<String> for BackendSpec {
    fn from(u: String) -> Self {
        BackendSpec::Url(u)
    }
}

/// One route: requests to `/<name>/...` go to these backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub backends: Vec<BackendSpec>,
    /// Overrides the gateway's TTL for this route.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// `low` routes are shed first when the budget is exceeded.
    #[serde(default)]
    pub priority: Priority,
    /// Request headers that are part of the cache key (default: Accept,
    /// Accept-Language, Accept-Encoding, Content-Type).
    #[serde(default)]
    pub key_headers: Option<Vec<String>>,
    /// Methods forwarded; others get 405 (default: GET, HEAD, POST, PUT,
    /// PATCH, DELETE, OPTIONS).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Requests with cookies may share entries (off: a `Cookie` makes a
    /// request private, like `Authorization`).
    #[serde(default)]
    pub cache_cookies: bool,
    /// Only clients with a tenant API key (`x-api-key`) may use the route;
    /// others get 401.
    #[serde(default)]
    pub require_tenant: bool,
}

/// A tenant and the SHA-256 (hex) of its API key; the key itself is never
/// in config (`printf %s KEY | sha256sum`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub key_sha256: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Normal,
    Low,
}

/// What the gateway does when a budget is exceeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceeded {
    /// Answer low-priority routes with 503 and `Retry-After`.
    #[default]
    ShedLowPriority,
    /// Serve expired entries (up to `budget.exceeded_stale` past their TTL)
    /// instead of calling a backend; only true misses reach backends.
    ServeStale,
    /// Keep serving as usual.
    Continue,
}

/// Budget-aware behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// On a budget warning, new entries live this many times longer.
    pub warning_ttl_factor: f64,
    /// On a budget warning, the stale graces are this many times longer.
    pub warning_grace_factor: f64,
    pub on_exceeded: OnExceeded,
    /// With `on_exceeded = "serve_stale"`: how long past its TTL an entry
    /// may still be served (entries are kept this long).
    #[serde(with = "humantime_serde")]
    pub exceeded_stale: Duration,
    /// `Retry-After` on shed requests.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            warning_ttl_factor: 2.0,
            warning_grace_factor: 2.0,
            on_exceeded: OnExceeded::ShedLowPriority,
            exceeded_stale: Duration::from_secs(24 * 3600),
            retry_after: Duration::from_secs(3600),
        }
    }
}

/// Passive health: a backend that fails this many requests in a row
/// (5xx or timeout) is ejected for a while, as long as enough of its route
/// stays in rotation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub ejection_time: Duration,
    /// At most this share of a route's backends is ejected at once.
    pub max_ejected_share: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self { consecutive_failures: 5, ejection_time: Duration::from_secs(30), max_ejected_share: 0.5 }
    }
}

/// The `[cache_gateway]` config section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    pub listen: String,
    pub routes: Vec<RouteConfig>,
    /// Cached responses live this long (seed: 1 h).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// An expired entry is served while it is refreshed in the background,
    /// up to this long past its TTL (0 turns it off).
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// An expired entry is served when the backends fail, up to this long
    /// past its TTL (0 turns it off).
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    pub outlier: OutlierConfig,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// A connection that has not sent a whole request head within this
    /// (new, or idle between keep-alive requests) is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request body must have arrived whole within this (else 408).
    #[serde(with = "humantime_serde")]
    pub request_body_timeout: Duration,
    /// Open client connections past this get a 503 and are closed.
    pub max_connections: usize,
    /// Threads serving client connections, each on its own
    /// single-threaded runtime; 0 = one per core the process may use.
    pub workers: usize,
    #[serde(with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// Bytes the in-process tier may hold (bodies, headers, keys and a
    /// fixed per-entry overhead).
    pub l1_max_bytes: u64,
    /// Larger answers are streamed to the client and not stored.
    pub max_object_bytes: usize,
    /// Tenants by API key hash.
    pub tenants: Vec<TenantConfig>,
    /// Peers whose `x-tenant` header is believed (a front proxy that
    /// authenticated the client); from anyone else it is ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// A file holding the admin token that `POST /_costmesh/purge` needs as
    /// `Authorization: Bearer <token>`; without one, purge is disabled.
    pub admin_token_file: Option<std::path::PathBuf>,
    pub budget: BudgetConfig,
    /// Share of requests sent to the preemptible pool (seed: 80 %).
    pub preemptible_share: f64,
    /// How often drained or failed backends are checked for a return.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How often cumulative statistics go to `<prefix>.cache.stats`.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Hit-rate target (seed: 85 %).
    pub hit_rate_target: f64,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            routes: Vec::new(),
            ttl: Duration::from_secs(3600),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(600),
            outlier: OutlierConfig::default(),
            max_body_bytes: 1 << 20,
            header_read_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            workers: 0,
            backend_timeout: Duration::from_secs(30),
            l1_max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
            tenants: Vec::new(),
            trusted_proxies: Vec::new(),
            admin_token_file: None,
            stats_interval: Duration::from_secs(10),
            budget: BudgetConfig::default(),
            preemptible_share: 0.8,
            health_interval: Duration::from_secs(2),
            hit_rate_target: 0.85,
            admin: AdminConfig::on_port(9105),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &str) -> Result<(), ConfigError> {
        use costmesh_runtime::config::{check_duration, check_size};
        const DAY: u64 = 24 * 3600;
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        check_duration(key(p, "ttl"), self.ttl, s(1), s(365 * DAY))?;
        check_duration(key(p, "stale_while_revalidate"), self.stale_while_revalidate, s(0), s(30 * DAY))?;
        check_duration(key(p, "stale_if_error"), self.stale_if_error, s(0), s(30 * DAY))?;
        check_duration(key(p, "backend_timeout"), self.backend_timeout, ms(10), s(3600))?;
        check_duration(key(p, "header_read_timeout"), self.header_read_timeout, ms(100), s(3600))?;
        check_duration(key(p, "request_body_timeout"), self.request_body_timeout, ms(100), s(3600))?;
        check_size(key(p, "max_connections"), self.max_connections as u64, 1, 1 << 20)?;
        check_size(key(p, "workers"), self.workers as u64, 0, 1024)?;
        check_duration(key(p, "health_interval"), self.health_interval, ms(100), s(3600))?;
        check_duration(key(p, "stats_interval"), self.stats_interval, ms(100), s(3600))?;
        check_duration(key(p, "budget.retry_after"), self.budget.retry_after, s(1), s(DAY))?;
        check_duration(key(p, "budget.exceeded_stale"), self.budget.exceeded_stale, s(0), s(30 * DAY))?;
        check_duration(key(p, "outlier.ejection_time"), self.outlier.ejection_time, s(1), s(DAY))?;
        check_size(key(p, "max_body_bytes"), self.max_body_bytes as u64, 1, 1 << 30)?;
        check_size(key(p, "l1_max_bytes"), self.l1_max_bytes, 1 << 20, 1 << 40)?;
        check_size(key(p, "max_object_bytes"), self.max_object_bytes as u64, 1, 1 << 30)?;
        if let Some(f) = &self.admin_token_file {
            costmesh_runtime::config::read_secret_file(f)
                .map_err(|why| ConfigError::new(key(p, "admin_token_file"), f.display(), why))?;
        }
        self.tenants(None).map_err(|why| ConfigError::new(key(p, "tenants"), "[..]", why))?;
        for (i, t) in self.tenants.iter().enumerate() {
            costmesh_contracts::subjects::validate_name(&t.name)
                .map_err(|why| ConfigError::new(key(p, &format!("tenants[{i}].name")), &t.name, why))?;
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(t) = r.ttl {
                check_duration(key(p, &format!("routes[{i}].ttl")), t, s(1), s(365 * DAY))?;
            }
        }
        self.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| ConfigError::new(key(p, "listen"), &self.listen, format!("not a socket address: {e}")))?;
        for (i, r) in self.routes.iter().enumerate() {
            if let Err(why) = costmesh_contracts::subjects::validate_name(&r.name) {
                return Err(ConfigError::new(key(p, &format!("routes[{i}].name")), &r.name, why));
            }
            for (j, m) in r.methods.iter().flatten().enumerate() {
                if axum::http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
                    return Err(ConfigError::new(
                        key(p, &format!("routes[{i}].methods[{j}]")),
                        m,
                        "not an upper-case HTTP method",
                    ));
                }
            }
            for (j, h) in r.key_headers.iter().flatten().enumerate() {
                if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(ConfigError::new(
                        key(p, &format!("routes[{i}].key_headers[{j}]")),
                        h,
                        "not a header name",
                    ));
                }
            }
            for (j, b) in r.backends.iter().map(BackendSpec::url).enumerate() {
                if !(b.starts_with("http://") || b.starts_with("https://")) {
                    return Err(ConfigError::new(
                        key(p, &format!("routes[{i}].backends[{j}]")),
                        b,
                        "must be an http:// or https:// URL",
                    ));
                }
            }
        }
        if !(self.budget.warning_ttl_factor.is_finite() && self.budget.warning_ttl_factor >= 1.0) {
            return Err(ConfigError::new(
                key(p, "budget.warning_ttl_factor"),
                self.budget.warning_ttl_factor,
                "must be at least 1",
            ));
        }
        if !(self.budget.warning_grace_factor.is_finite() && self.budget.warning_grace_factor >= 1.0) {
            return Err(ConfigError::new(
                key(p, "budget.warning_grace_factor"),
                self.budget.warning_grace_factor,
                "must be at least 1",
            ));
        }
        if self.outlier.consecutive_failures == 0 {
            return Err(ConfigError::new(key(p, "outlier.consecutive_failures"), 0, "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.outlier.max_ejected_share) {
            return Err(ConfigError::new(
                key(p, "outlier.max_ejected_share"),
                self.outlier.max_ejected_share,
                "must be between 0 and 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.preemptible_share) {
            return Err(ConfigError::new(
                key(p, "preemptible_share"),
                self.preemptible_share,
                "must be between 0 and 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.hit_rate_target) {
            return Err(ConfigError::new(key(p, "hit_rate_target"), self.hit_rate_target, "must be between 0 and 1"));
        }
        self.admin.validate(&key(p, "admin"))
    }
}

impl Config {
    /// The tenants, trusted proxies and admin token as the proxy checks them.
    pub fn tenants(&self, admin_token: Option<&str>) -> Result<tenants::Tenants, String> {
        let pairs: Vec<(String, String)> =
            self.tenants.iter().map(|t| (t.name.clone(), t.key_sha256.clone())).collect();
        tenants::Tenants::new(&pairs, &self.trusted_proxies, admin_token)
    }
}

impl ServiceConfig for Config {
    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
}

/// Builds the proxy from the config (Redis from `redis_url` when set).
pub async fn gateway(cfg: &Config, redis_url: Option<&str>, stats: proxy::Stats) -> anyhow::Result<proxy::Gateway> {
    gateway_with_tls(cfg, redis_url, &Default::default(), stats).await
}

/// [`gateway`], with TLS files for a `rediss://` Redis.
pub async fn gateway_with_tls(
    cfg: &Config,
    redis_url: Option<&str>,
    tls: &costmesh_runtime::config::RedisTls,
    stats: proxy::Stats,
) -> anyhow::Result<proxy::Gateway> {
    let store = store::Store::new(redis_url, tls, cfg.l1_max_bytes, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    let routes = cfg
        .routes
        .iter()
        .map(|r| {
            let backends = r
                .backends
                .iter()
                .map(|b| match b {
                    BackendSpec::Url(u) => proxy::Backend::new(u.clone(), Pool::Regular, None),
                    BackendSpec::Full { url, pool, node } => proxy::Backend::new(url.clone(), *pool, node.clone()),
                })
                .collect();
            let route = proxy::Route::with_backends(backends, r.ttl.unwrap_or(cfg.ttl), cfg.preemptible_share)
                .with_priority(r.priority)
                .with_rules(r);
            (r.name.clone(), route)
        })
        .collect();
    let admin_token = match &cfg.admin_token_file {
        Some(f) => Some(costmesh_runtime::config::read_secret_file(f).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let tenants = cfg.tenants(admin_token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok(proxy::Gateway::new(routes, store, cfg.backend_timeout, stats)
        .with_tenants(tenants)
        .with_limits(cfg.max_body_bytes, cfg.max_object_bytes)
        .with_body_timeout(cfg.request_body_timeout)
        .with_budget(cfg.budget.clone())
        .with_grace(cfg.stale_while_revalidate, cfg.stale_if_error)
        .with_outlier(cfg.outlier.clone()))
}

/// Runs the gateway until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let stats = proxy::Stats::default();
    ctx.register("costmesh_cache_requests", "Requests by route", stats.requests.clone());
    ctx.register("costmesh_cache_hits", "Cache hits by route", stats.hits.clone());
    ctx.register(
        "costmesh_cache_tenant_requests",
        "Requests by route and tenant (from API keys; empty: anonymous)",
        stats.tenant_requests.clone(),
    );
    ctx.register("costmesh_cache_misses", "Cache misses by route", stats.misses.clone());
    ctx.register("costmesh_cache_coalesced", "Requests that waited for an identical miss", stats.coalesced.clone());
    ctx.register("costmesh_cache_backend_ms", "Time spent in backends (ms)", stats.backend_ms.clone());
    ctx.register(
        "costmesh_cache_backend_calls",
        "Calls that reached a backend (misses, refreshes, pass-through)",
        stats.backend_calls.clone(),
    );
    ctx.register("costmesh_cache_hit_bytes", "Bytes served from cache", stats.bytes.clone());
    ctx.register(
        "costmesh_cache_stale",
        "Expired entries served (revalidating, on error, or by budget)",
        stats.stale.clone(),
    );
    ctx.register("costmesh_cache_backend_ejections", "Backends ejected as outliers", stats.ejections.clone());
    ctx.register(
        "costmesh_cache_budget_changes",
        "Budget state changes the gateway followed",
        stats.budget_changes.clone(),
    );
    let redis_url = ctx.redis_url.as_ref().map(|u| u.expose().to_string());
    let hit_rate: Family<proxy::RouteLabels, Gauge<f64, AtomicU64>> = Family::default();
    let target: Gauge<f64, AtomicU64> = Gauge::default();
    target.set(cfg.hit_rate_target);
    ctx.register(
        "costmesh_cache_hit_rate",
        "Share of requests answered from cache (fresh or stale) since start",
        hit_rate.clone(),
    );
    ctx.register("costmesh_cache_hit_rate_target", "The hit-rate target (seed: 85 %)", target);
    let gw = gateway_with_tls(&cfg, redis_url.as_deref(), &ctx.redis_tls, stats).await?.with_clock(ctx.clock.clone());
    let gw_stats = gw.stats.clone();
    let gw_budget = gw.budget_state.clone();
    let gw_routes = proxy::Routes(gw.routes.clone());
    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, routes = cfg.routes.len(), redis = redis_url.is_some(), "cache-gateway serving");
    let app = proxy::router(gw, cfg.max_body_bytes);
    let shutdown = ctx.shutdown.clone();
    let workers = match cfg.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let limits = serve::ServeLimits {
        header_read_timeout: cfg.header_read_timeout,
        max_connections: cfg.max_connections,
        workers,
    };
    let mut server = tokio::spawn(serve::serve(listener, app, limits, shutdown));

    // Cumulative counters for the cost-watcher (a lost report loses nothing).
    {
        let hit_rate = hit_rate.clone();
        let (ctx2, stats, routes) =
            (ctx.clone(), gw_stats.clone(), cfg.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>());
        let backends = gw_routes.clone();
        let instance = format!("cache-gateway/{}", uuid::Uuid::new_v4().simple());
        let started = costmesh_contracts::timestamp(ctx.clock.now());
        let mut ticker = ctx.clock.ticker(cfg.stats_interval);
        tokio::spawn(async move {
            loop {
                let now = tokio::select! {
                    _ = ctx2.shutdown.cancelled() => return,
                    t = ticker.tick() => t,
                };
                let report = costmesh_contracts::v1::CacheStats {
                    instance: instance.clone(),
                    started_at: Some(started),
                    time: Some(costmesh_contracts::timestamp(now)),
                    // One entry per route and tenant; they sum to the route's totals.
                    routes: routes.iter().flat_map(|r| stats.tenant_stats(r)).collect(),
                    backends: backends.health(now),
                };
                for route in &routes {
                    let r = stats.route_stats(route);
                    if r.requests > 0 {
                        let rate = (r.hits + r.stale) as f64 / r.requests as f64;
                        hit_rate.get_or_create(&proxy::RouteLabels { route: r.route.clone() }).set(rate);
                    }
                }
                if let Err(e) = ctx2.events.publish(&ctx2.subjects().cache_stats(), &report).await {
                    tracing::warn!(error = %e, "cache stats publish failed");
                }
            }
        });
    }
    let filters = vec![ctx.subjects().preemption_all(), ctx.subjects().budget_all()];
    // The durable consumer resumes after what was acked, so state that the
    // newest event defines is rebuilt first: each scope's budget state, and
    // the drain of nodes whose preemption deadline is still ahead.
    for (_, _, b) in
        ctx.events.latest_per_subject::<costmesh_contracts::v1::BudgetEvent>(vec![ctx.subjects().budget_all()]).await?
    {
        gw_budget.set(&b.scope, b.state());
    }
    if gw_budget.worst() != costmesh_contracts::v1::BudgetState::Ok {
        tracing::warn!(
            state = gw_budget.worst().as_str_name(),
            "budget state restored at start: the gateway follows it"
        );
    }
    for (_, _, n) in ctx
        .events
        .latest_per_subject::<costmesh_contracts::v1::PreemptionNotice>(vec![ctx.subjects().preemption_all()])
        .await?
    {
        if let Some(until) =
            n.deadline.as_ref().and_then(costmesh_contracts::from_timestamp).filter(|d| *d > ctx.clock.now())
        {
            let drained = gw_routes.drain_node(&n.node, until);
            tracing::warn!(node = %n.node, drained, "preemption still in progress at start: backends on this node drained");
        }
    }
    let budget = gw_budget;
    let routes = gw_routes.clone();
    let budget_changes = gw_stats.budget_changes.clone();
    let clock = ctx.clock.clone();
    // Drained or failed backends come back once they accept connections again.
    {
        let (routes, shutdown, every, clock) =
            (gw_routes, ctx.shutdown.clone(), cfg.health_interval, ctx.clock.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => routes.check_returns(clock.now()).await,
                }
            }
        });
    }
    let task = ctx
        .spawn_durable::<AnyEvent, _, _>("world", filters, move |_, _, event| {
            let (budget, routes, budget_changes, clock) =
                (budget.clone(), routes.clone(), budget_changes.clone(), clock.clone());
            async move {
                match event {
                    AnyEvent::PreemptionNotice(n) => {
                        // Until the VM's expected power-off (GCE: about 30 s).
                        let until = n
                            .deadline
                            .as_ref()
                            .and_then(costmesh_contracts::from_timestamp)
                            .unwrap_or_else(|| clock.now() + chrono::Duration::seconds(30));
                        let drained = routes.drain_node(&n.node, until);
                        tracing::warn!(node = %n.node, drained, "preemption notice: backends on this node drained");
                    }
                    AnyEvent::BudgetEvent(b) => {
                        let state = b.state();
                        let was = budget.set(&b.scope, state);
                        if was != state {
                            budget_changes.get_or_create(&proxy::StateLabels { state: state.as_str_name().to_string() }).inc();
                            tracing::warn!(scope = %b.scope, from = was.as_str_name(), to = state.as_str_name(), "budget state changed: cache behaviour follows");
                        }
                    }
                    other => return Err(HandlerError::Reject(format!("{} does not belong on this subject", other.type_name()))),
                }
                Ok(())
            }
        })
        .await?;
    ctx.bus_ready().await?;
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {}
        r = &mut server => {
            r.map_err(|e| anyhow::anyhow!("the client server failed: {e}"))?
                .map_err(|e| anyhow::anyhow!("starting the client server's threads: {e}"))?;
            anyhow::bail!("the client server stopped");
        }
    }
    let _ = task.await;
    let _ = server.await;
    Ok(())
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use costmesh_runtime::config::load_service;

    fn load(toml: &str) -> Result<Config, costmesh_runtime::config::ConfigError> {
        load_service::<Config>(Some(toml), &Default::default(), "cache_gateway").map(|l| l.service)
    }

    #[test]
    fn zero_intervals_sizes_and_unknown_backend_keys_are_refused_naming_the_key() {
        for (toml, key) in [
            ("[cache_gateway]\nstats_interval = \"0s\"\n", "cache_gateway.stats_interval"),
            ("[cache_gateway]\nhealth_interval = \"0s\"\n", "cache_gateway.health_interval"),
            ("[cache_gateway]\nbackend_timeout = \"0s\"\n", "cache_gateway.backend_timeout"),
            ("[cache_gateway]\nmax_body_bytes = 0\n", "cache_gateway.max_body_bytes"),
            ("[cache_gateway.budget]\nretry_after = \"0s\"\n", "cache_gateway.budget.retry_after"),
        ] {
            let e = load(toml).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let e =
            load("[[cache_gateway.routes]]\nname = \"r\"\nbackends = [{ url = \"http://127.0.0.1:1\", weight = 3 }]\n")
                .unwrap_err();
        assert!(e.key.starts_with("cache_gateway.routes"), "{e}");
        load("[[cache_gateway.routes]]\nname = \"r\"\nbackends = [{ url = \"http://127.0.0.1:1\", pool = \"preemptible\" }]\n")
            .unwrap();
        for bad in ["a/b", "..", "a.b", "-x"] {
            let e = load(&format!("[[cache_gateway.routes]]\nname = \"{bad}\"\nbackends = []\n")).unwrap_err();
            assert_eq!(e.key, "cache_gateway.routes[0].name", "{bad}: {e}");
        }
    }
}
