//! Prometheus metrics shared by every service: what the event plumbing
//! counts. Each service registers its own metrics in the same registry.
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub service: String,
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub service: String,
    pub reason: String,
}

/// The registry one service's `/metrics` serves.
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// Counters of the event plumbing.
#[derive(Clone, Default)]
pub struct EventMetrics {
    pub published: Family<EventLabels, Counter>,
    pub handled: Family<EventLabels, Counter>,
    pub duplicates: Family<EventLabels, Counter>,
    pub dead_letters: Family<DeadLetterLabels, Counter>,
}

impl EventMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("costmesh_events_published", "Events published", m.published.clone());
        registry.register("costmesh_events_handled", "Events handled successfully", m.handled.clone());
        registry.register(
            "costmesh_events_duplicate",
            "Events skipped as already handled (same event id)",
            m.duplicates.clone(),
        );
        registry.register(
            "costmesh_dead_letters",
            "Messages sent to the dead-letter subject, by reason",
            m.dead_letters.clone(),
        );
        m
    }
}

/// Renders the registry in the Prometheus/OpenMetrics text format.
pub fn render(registry: &SharedRegistry) -> String {
    let mut out = String::new();
    let reg = registry.lock().expect("metrics lock");
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}
