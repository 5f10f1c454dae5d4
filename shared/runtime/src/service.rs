//! What a service is handed to run: the bus, the clock, metrics, health and
//! the shutdown token. `costmesh up`, the service binaries and the tests all
//! build one of these and call the service's `run`.
use std::sync::{Arc, Mutex};

use costmesh_bus::Bus;
use costmesh_contracts::Subjects;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::clock::Clock;
use crate::config::MeshConfig;
use crate::events::EventBus;
use crate::metrics::{EventMetrics, SharedRegistry};

/// Everything a service needs from its host.
#[derive(Clone)]
pub struct ServiceContext {
    pub events: EventBus,
    pub clock: Clock,
    pub registry: SharedRegistry,
    pub health: Health,
    pub shutdown: CancellationToken,
    pub mesh: MeshConfig,
    /// `[redis]` url, for the services that cache (the gateway).
    pub redis_url: Option<crate::config::SecretUrl>,
    /// `[redis]` TLS files.
    pub redis_tls: crate::config::RedisTls,
}

impl ServiceContext {
    /// A context for `service` on `bus`. `instance` (a node name, say)
    /// is appended to the event source when set.
    pub fn new(
        service: &str,
        instance: Option<&str>,
        bus: Bus,
        mesh: &MeshConfig,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Self {
        let mut registry = Registry::default();
        let metrics = EventMetrics::register(&mut registry);
        let subjects = Subjects::new(&mesh.subject_prefix).unwrap_or_default();
        let source = match instance {
            Some(i) => format!("{service}/{i}"),
            None => service.to_string(),
        };
        let health = Health::new();
        {
            // Readiness follows the connection: a service cut off from NATS
            // cannot react to budgets, so it is not ready.
            let bus = bus.clone();
            health.probe("bus", move || if bus.is_connected() { Ok(()) } else { Err("disconnected from NATS".into()) });
        }
        Self {
            events: EventBus {
                bus,
                subjects,
                source,
                service: service.to_string(),
                clock: clock.clone(),
                content_type: mesh.content_type,
                metrics,
                limits: mesh.limits.clone(),
                signer: None,
                fence: None,
            },
            clock,
            registry: Arc::new(Mutex::new(registry)),
            health,
            shutdown,
            mesh: mesh.clone(),
            redis_url: None,
            redis_tls: Default::default(),
        }
    }

    /// Hands over the `[redis]` URL.
    pub fn with_redis(mut self, url: Option<crate::config::SecretUrl>) -> Self {
        self.redis_url = url;
        self
    }

    /// Hands over the `[redis]` TLS files.
    pub fn with_redis_tls(mut self, tls: crate::config::RedisTls) -> Self {
        self.redis_tls = tls;
        self
    }

    /// Signs everything this service publishes with `signer`.
    pub fn with_signer(mut self, signer: Option<crate::signing::Signer>) -> Self {
        self.events.signer = signer;
        self
    }

    /// Opens this service's KV bucket `<PREFIX>_<name>`, bounded by
    /// `[mesh.limits] kv_max_bytes`.
    pub async fn kv(&self, name: &str) -> Result<costmesh_bus::Kv, costmesh_bus::BusError> {
        let bucket = kv_bucket(self.subjects(), name);
        self.bus().kv_bounded(&bucket, self.mesh.limits.kv_max_bytes.min(i64::MAX as u64) as i64).await
    }

    pub fn bus(&self) -> &Bus {
        &self.events.bus
    }

    /// Marks the service ready on the bus once the server has processed
    /// its subscriptions: a request sent the moment readiness shows must
    /// find its responder, not "no responders".
    pub async fn bus_ready(&self) -> Result<(), costmesh_bus::BusError> {
        self.bus().flush().await?;
        self.health.set("bus", true);
        Ok(())
    }

    pub fn subjects(&self) -> &Subjects {
        &self.events.subjects
    }

    pub fn service(&self) -> &str {
        &self.events.service
    }

    /// Binds the durable consumer `name` on `filters` and handles its
    /// messages on a task until shutdown (see [`EventBus::consume_durable`]).
    pub async fn spawn_durable<T, F, Fut>(
        &self,
        name: &str,
        filters: Vec<String>,
        handler: F,
    ) -> Result<tokio::task::JoinHandle<()>, costmesh_bus::BusError>
    where
        T: costmesh_contracts::Decodable,
        F: FnMut(costmesh_bus::Message, costmesh_contracts::EventMeta, T) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), crate::events::HandlerError>> + Send,
    {
        let sub = self.events.durable(name, filters, std::time::Duration::from_secs(30)).await?;
        let (events, shutdown) = (self.events.clone(), self.shutdown.clone());
        Ok(tokio::spawn(async move { events.consume_durable::<T, _, _>(sub, shutdown, handler).await }))
    }

    /// Registers a metric in this service's registry.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().expect("metrics lock").register(name, help, metric);
    }
}

/// The KV bucket `<PREFIX>_<name>` of a service (dots and dashes of the
/// prefix become `_`).
pub fn kv_bucket(subjects: &Subjects, name: &str) -> String {
    format!("{}_{name}", subjects.prefix().replace(['.', '-'], "_"))
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received; draining");
        token.cancel();
    });
}

/// Connects to the bus the config names: NATS when a URL is set, else a
/// fresh in-process bus.
pub async fn connect_bus(nats: &crate::config::NatsConfig, client_name: &str) -> Result<Bus, costmesh_bus::BusError> {
    match &nats.url {
        Some(url) => {
            let opts = nats
                .connect_options(client_name)
                .map_err(|e| costmesh_bus::BusError::new(costmesh_bus::BusErrorKind::Connection, e))?;
            let b = costmesh_bus::NatsBus::connect(url.expose(), &opts).await?;
            Ok(Bus::Nats(b))
        }
        None => Ok(Bus::memory()),
    }
}
