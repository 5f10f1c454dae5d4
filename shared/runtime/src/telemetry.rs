//! Logs and traces: one `init` per process.
//!
//! Logs go to stderr through `tracing` (human or JSON). When the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! variable is set, spans are also exported over OTLP/gRPC (the exporter
//! reads the other `OTEL_EXPORTER_OTLP_*` variables itself). Trace context
//! crosses processes in the W3C `traceparent`/`tracestate` headers of each
//! message ([`inject`], [`extract`]).
use std::collections::BTreeMap;

use costmesh_contracts::headers::{names, Headers};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Keeps the exporter alive; flushes spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Whether the environment asks for OTLP export.
pub fn otlp_requested(env: &BTreeMap<String, String>) -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|k| env.get(*k).is_some_and(|v| !v.is_empty()))
        && env.get("OTEL_TRACES_EXPORTER").map(|v| v != "none").unwrap_or(true)
}

/// Who a process's spans belong to: a service, and its node when it has
/// one (a gpu-agent). Becomes the `service.name`, `service.instance.id`
/// and `costmesh.node` resource attributes.
#[derive(Clone, Debug)]
pub struct Identity {
    pub service: String,
    pub node: Option<String>,
}

impl Identity {
    pub fn new(service: &str, node: Option<&str>) -> Self {
        Self { service: service.to_string(), node: node.map(str::to_string) }
    }
}

/// The span attribute naming the service a span belongs to (every
/// messaging span carries it): [`ByService`] exports each span under that
/// service's resource.
pub const SERVICE_ATTRIBUTE: &str = "service";

/// An OTLP exporter per service of a process, so that `costmesh up` (five
/// services in one process) shows five `service.name`s: each span goes
/// out with the resource of the service its [`SERVICE_ATTRIBUTE`] names,
/// spans without one with the first (the process's own).
#[derive(Debug)]
struct ByService {
    exporters: Vec<(Identity, opentelemetry_otlp::SpanExporter)>,
    instance: String,
}

impl ByService {
    fn resource(&self, base: &opentelemetry_sdk::Resource, id: &Identity) -> opentelemetry_sdk::Resource {
        use opentelemetry::KeyValue;
        let replaced = ["service.name", "service.instance.id", "costmesh.node"];
        let mut attrs: Vec<KeyValue> = base
            .iter()
            .filter(|(k, _)| !replaced.contains(&k.as_str()))
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        // One instance id per service per process start.
        attrs.push(KeyValue::new("service.instance.id", format!("{}-{}", self.instance, id.service)));
        if let Some(n) = &id.node {
            attrs.push(KeyValue::new("costmesh.node", n.clone()));
        }
        opentelemetry_sdk::Resource::builder_empty()
            .with_attributes(attrs)
            .with_service_name(id.service.clone())
            .build()
    }
}

impl opentelemetry_sdk::trace::SpanExporter for ByService {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let mut groups: Vec<Vec<opentelemetry_sdk::trace::SpanData>> =
            self.exporters.iter().map(|_| Vec::new()).collect();
        for span in batch {
            let i = span
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == SERVICE_ATTRIBUTE)
                .and_then(|kv| self.exporters.iter().position(|(id, _)| id.service == kv.value.as_str()))
                .unwrap_or(0);
            groups[i].push(span);
        }
        async move {
            let mut result = Ok(());
            for ((_, exporter), group) in self.exporters.iter().zip(groups) {
                if !group.is_empty() {
                    if let Err(e) = exporter.export(group).await {
                        result = Err(e);
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&mut self, timeout: std::time::Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        let mut result = Ok(());
        for (_, e) in &mut self.exporters {
            if let Err(x) = e.shutdown_with_timeout(timeout) {
                result = Err(x);
            }
        }
        result
    }

    fn force_flush(&mut self) -> opentelemetry_sdk::error::OTelSdkResult {
        for (_, e) in &mut self.exporters {
            e.force_flush()?;
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        let resources: Vec<_> = self.exporters.iter().map(|(id, _)| self.resource(resource, id)).collect();
        for ((_, e), r) in self.exporters.iter_mut().zip(resources) {
            e.set_resource(&r);
        }
    }
}

/// Builds a tracer provider exporting over OTLP/gRPC, one resource per
/// identity (the first is the process's own). Must run inside a tokio
/// runtime (the gRPC channels live on it).
pub fn otlp_provider(identities: &[Identity]) -> Result<SdkTracerProvider, String> {
    let mut exporters = Vec::new();
    for id in identities {
        let e = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        exporters.push((id.clone(), e));
    }
    let first = identities.first().map_or("costmesh", |i| i.service.as_str()).to_string();
    let exporter = ByService { exporters, instance: uuid::Uuid::new_v4().simple().to_string() };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(first).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Installs the global subscriber for `service`. Call once, from `main`,
/// inside the tokio runtime. Tests do not call it (they stay quiet unless
/// `TEST_LOG` is set, see [`init_for_tests`]).
pub fn init(service: &str, log: &LogConfig, env: &BTreeMap<String, String>) -> TelemetryGuard {
    init_for(&[Identity::new(service, None)], log, env)
}

/// [`init`] for a process that hosts several services (`costmesh up`) or a
/// service with a node: spans are exported under each one's identity.
pub fn init_for(identities: &[Identity], log: &LogConfig, env: &BTreeMap<String, String>) -> TelemetryGuard {
    let filter = env
        .get("RUST_LOG")
        .filter(|f| f.is_ascii())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    let fmt = match log.format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut provider = None;
    let mut otel_error = None;
    let otel = if otlp_requested(env) {
        match otlp_provider(identities) {
            Ok(p) => {
                let layer = tracing_opentelemetry::layer().with_tracer(p.tracer("costmesh"));
                provider = Some(p);
                Some(layer)
            }
            Err(e) => {
                otel_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    // The log level filters logs only: spans go to the exporter at `info`
    // whatever the log level (a CLI logging warnings still traces).
    let otel = otel.map(|l| l.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    if let Some(e) = otel_error {
        tracing::warn!(error = %e, "trace export disabled");
    }
    TelemetryGuard { provider }
}

/// A quiet subscriber for tests; `TEST_LOG=1` prints logs.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(EnvFilter::new("debug")).with_test_writer().try_init();
    }
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes the current span's context into `traceparent`/`tracestate`.
pub fn inject(headers: &mut Headers) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The OpenTelemetry semantic conventions the messaging spans follow
/// (`messaging.*` attributes, `{operation} {destination}` span names).
pub const SEMCONV_VERSION: &str = "1.30.0";

/// A message handled later than this after it was sent (a redelivery, a
/// backlog after a restart, a replay) starts its own trace, linked to the
/// producer's span rather than parented by it.
pub const LINK_AFTER: chrono::Duration = chrono::Duration::seconds(60);

/// Attaches `span` to the producer whose context is in `headers`: as its
/// child when the message is `age` old at most [`LINK_AFTER`] (or of
/// unknown age), else as a new trace with a link to it.
pub fn adopt(headers: &Headers, span: &tracing::Span, age: Option<chrono::Duration>) {
    if headers.get(names::TRACEPARENT).is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if age.is_some_and(|a| a > LINK_AFTER) {
        use opentelemetry::trace::TraceContextExt;
        span.add_link(cx.span().span_context().clone());
    } else {
        let _ = span.set_parent(cx);
    }
}

/// The current span's W3C `traceparent`, to keep with work that outlives
/// the span (a queued job, a running process); `None` when not traced.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the span a stored `traceparent` names.
fn set_parent_from(span: &tracing::Span, traceparent: &str) {
    let mut h = Headers::new();
    h.insert(names::TRACEPARENT, traceparent);
    let _ = span.set_parent(TraceContextPropagator::new().extract(&HeaderExtractor(&h)));
}

tokio::task_local! {
    static RESUMED: Option<String>;
}

/// Runs `fut` on behalf of something that started a trace earlier (a job
/// placed by a planning pass, an exit reported by a job's watcher task):
/// the messaging spans started in it while no span is current join the
/// trace `traceparent` names, as children of that span.
pub async fn resume<F: std::future::Future>(traceparent: Option<String>, fut: F) -> F::Output {
    RESUMED.scope(traceparent, fut).await
}

/// Gives `span` the parent [`resume`] set, when nothing else is current.
pub fn adopt_resumed(span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    if tracing::Span::current().context().span().span_context().is_valid() {
        return;
    }
    let _ = RESUMED.try_with(|tp| {
        if let Some(tp) = tp {
            set_parent_from(span, tp);
        }
    });
}

/// A messaging span after the conventions ([`SEMCONV_VERSION`]): named
/// `<verb> <destination>`, with its kind, `messaging.system`, operation
/// type and name, destination (subject and family), and the service it
/// belongs to; more fields may follow.
#[macro_export]
macro_rules! messaging_span {
    (verb: $verb:literal, kind: $kind:literal, system: $system:literal, op: $op_type:literal / $op_name:literal,
     subject: $subject:expr, dest: $dest:expr, service: $service:expr $(, $($rest:tt)*)?) => {
        tracing::info_span!(
            $verb,
            otel.name = %format!("{} {}", $verb, $dest),
            otel.kind = $kind,
            "messaging.system" = $system,
            "messaging.operation.type" = $op_type,
            "messaging.operation.name" = $op_name,
            "messaging.destination.name" = %$subject,
            "messaging.destination.template" = %$dest,
            service = %$service
            $(, $($rest)*)?
        )
    };
}

/// The client span of a request-reply call (`send <destination
/// template>`); [`inject`] its context into the request's headers.
pub fn client_span(subjects: &costmesh_contracts::Subjects, service: &str, subject: &str) -> tracing::Span {
    let dest = subjects.template(subject).unwrap_or_else(|| subject.to_string());
    crate::messaging_span!(verb: "send", kind: "client", system: "nats", op: "send" / "request",
        subject: subject, dest: dest, service: service)
}

/// The server span answering a request (`process <destination
/// template>`), a child of the caller's span.
pub fn server_span(
    subjects: &costmesh_contracts::Subjects,
    service: &str,
    subject: &str,
    headers: &Headers,
) -> tracing::Span {
    let dest = subjects.template(subject).unwrap_or_else(|| subject.to_string());
    let span = crate::messaging_span!(verb: "process", kind: "server", system: "nats", op: "process" / "respond",
        subject: subject, dest: dest, service: service);
    extract(headers, &span);
    span
}

/// `span`'s W3C `traceparent` (`None` when it is not traced).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let mut h = Headers::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(&mut h));
    h.get(names::TRACEPARENT).map(str::to_string)
}

/// The consumer span of a Google Cloud Pub/Sub message (`process
/// <subscription>`, `messaging.system = "gcp_pubsub"`), a child of the
/// sender's span when the message's attributes carry a `traceparent`.
pub fn pubsub_span(
    service: &str,
    subscription: &str,
    message_id: &str,
    body_size: usize,
    attributes: &std::collections::HashMap<String, String>,
) -> tracing::Span {
    let span = crate::messaging_span!(verb: "process", kind: "consumer", system: "gcp_pubsub", op: "process" / "process",
        subject: subscription, dest: subscription, service: service,
        "messaging.destination.subscription.name" = %subscription,
        "messaging.message.id" = %message_id,
        "messaging.message.body.size" = body_size,
    );
    if let Some(tp) = attributes.get(names::TRACEPARENT) {
        set_parent_from(&span, tp);
    }
    span
}

/// Makes `span` a child of the producer whose context is in `headers`.
pub fn extract(headers: &Headers, span: &tracing::Span) {
    if headers.get(names::TRACEPARENT).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}
