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

/// Builds a tracer provider exporting over OTLP/gRPC. Must run inside a
/// tokio runtime (the gRPC channel lives on it).
pub fn otlp_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter =
        opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(|e| format!("OTLP exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Installs the global subscriber for `service`. Call once, from `main`,
/// inside the tokio runtime. Tests do not call it (they stay quiet unless
/// `TEST_LOG` is set, see [`init_for_tests`]).
pub fn init(service: &str, log: &LogConfig, env: &BTreeMap<String, String>) -> TelemetryGuard {
    let filter =
        env.get("RUST_LOG").and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| EnvFilter::new(&log.level));
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
        match otlp_provider(service) {
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
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
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

/// Makes `span` a child of the producer whose context is in `headers`.
pub fn extract(headers: &Headers, span: &tracing::Span) {
    if headers.get(names::TRACEPARENT).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}
