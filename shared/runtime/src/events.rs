//! Publishing and consuming typed events over the bus.
//!
//! [`EventBus`] stamps every event with its headers (id, type, source, time,
//! content type, trace context) and counts it. The consumer loops
//! ([`EventBus::consume_core`], [`EventBus::consume_durable`]) decode each
//! message, skip events already handled (same event id), run the handler in a
//! span that is the child of the producer's span, and send anything that
//! cannot be decoded or handled to `<prefix>.dlq.<service>` with the reason.
//! A bad message never stops a loop.
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use costmesh_bus::{
    Bus, BusError, ConsumerSpec, DeliverFrom, DurableSubscription, Message, PubAck, StreamSpec, Subscription,
};
use costmesh_contracts::headers::names;
use costmesh_contracts::{ContentType, Decodable, Event, EventMeta, Subjects};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::Clock;
use crate::metrics::{DeadLetterLabels, EventLabels, EventMetrics};
use crate::telemetry;

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The event is wrong and always will be: dead-letter it.
    #[error("{0}")]
    Reject(String),
    /// Something around us failed (bus, disk): try again later. On a durable
    /// consumer the message is redelivered; on core NATS it is logged.
    #[error("{0}")]
    Retry(String),
}

impl From<BusError> for HandlerError {
    fn from(e: BusError) -> Self {
        HandlerError::Retry(e.to_string())
    }
}

/// Remembers the last N event ids, to make handlers idempotent against
/// redelivery and duplicate publishes.
pub struct SeenIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

impl SeenIds {
    pub fn new(cap: usize) -> Self {
        Self { order: VecDeque::with_capacity(cap), set: HashSet::with_capacity(cap), cap }
    }

    /// Records `id`; false if it was already there.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

/// A service's handle on the bus for typed events.
#[derive(Clone)]
pub struct EventBus {
    pub bus: Bus,
    pub subjects: Subjects,
    /// `service` or `service/instance`, written to `ce-source`.
    pub source: String,
    /// The service name, for the DLQ subject and metrics labels.
    pub service: String,
    pub clock: Clock,
    pub content_type: ContentType,
    pub metrics: EventMetrics,
    /// `[mesh.limits]`: how much the events stream may hold.
    pub limits: crate::config::Limits,
    /// Signs everything this service publishes (the scheduler's commands to
    /// nodes); None sends unsigned.
    pub signer: Option<crate::signing::Signer>,
    /// While this instance acts under a lease: every write checks it and
    /// carries its term (`costmesh-lease-term`); a deposed instance's writes
    /// are refused before they leave.
    pub fence: Option<crate::lease::Fence>,
}

/// The header naming the lease term an event was published under.
pub const LEASE_TERM: &str = "costmesh-lease-term";

/// The header a client sets on a request it may send again (after no
/// answer, say): the same id asks for the same thing once. 1 to 64 of
/// `A-Z a-z 0-9 . _ -`.
pub const REQUEST_ID: &str = "costmesh-request-id";

/// The request id of `headers`, checked; None when there is none.
pub fn request_id(headers: &costmesh_bus::Headers) -> Result<Option<&str>, String> {
    let Some(id) = headers.get(REQUEST_ID) else { return Ok(None) };
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(Some(id))
    } else {
        Err(format!("header {REQUEST_ID}: 1 to 64 of A-Z a-z 0-9 . _ - expected"))
    }
}

/// The durable consumer name `<service>-<name>`, made a valid NATS name.
pub fn durable_name(service: &str, name: &str) -> String {
    format!("{service}-{name}").replace(['.', ' ', '*', '>'], "_")
}

/// The stream that stores every durable subject under `subjects`' prefix.
pub fn events_stream(subjects: &Subjects, limits: &crate::config::Limits) -> StreamSpec {
    StreamSpec {
        name: subjects.stream_name(),
        subjects: subjects.durable_subjects(),
        // Budget notifications and redeliveries within this window are
        // de-duplicated by the server.
        duplicate_window: Duration::from_secs(10 * 60),
        max_age: limits.events_max_age,
        max_bytes: limits.events_max_bytes.min(i64::MAX as u64) as i64,
    }
}

/// Room kept for headers and protocol framing when a dead letter's payload
/// is cut to fit the server's max payload.
const DLQ_HEADROOM: usize = 8 * 1024;

impl EventBus {
    /// Creates the events stream if it does not exist yet.
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        self.bus.ensure_stream(&events_stream(&self.subjects, &self.limits)).await
    }

    /// The newest stored event of each subject matching `filters`, oldest
    /// first, decoded; what cannot be decoded is skipped with a warning.
    /// Services rebuild state that the latest event defines (budget states)
    /// from this at start.
    pub async fn latest_per_subject<T: Decodable>(
        &self,
        filters: Vec<String>,
    ) -> Result<Vec<(u64, EventMeta, T)>, BusError> {
        self.ensure_stream().await?;
        let msgs = self.bus.last_per_subject(&self.subjects.stream_name(), &filters).await?;
        Ok(msgs
            .into_iter()
            .filter_map(|(seq, m)| match T::decode_message(&m.headers, &m.payload) {
                Ok((meta, e)) => Some((seq, meta, e)),
                Err(e) => {
                    tracing::warn!(subject = %m.subject, error = %e, "stored event unreadable; skipped while rebuilding state");
                    None
                }
            })
            .collect())
    }

    fn stamp<E: Event>(&self, event: &E) -> (EventMeta, costmesh_contracts::Headers, Bytes) {
        let meta = EventMeta::new::<E>(self.source.clone(), self.clock.now(), self.content_type);
        let (mut headers, payload) = costmesh_contracts::encode(event, &meta);
        telemetry::inject(&mut headers);
        (meta, headers, payload)
    }

    fn count_published<E: Event>(&self) {
        self.metrics
            .published
            .get_or_create(&EventLabels { service: self.service.clone(), event_type: E::full_name() })
            .inc();
    }

    /// Refuses the write when this instance's lease has ended; stamps its
    /// term otherwise.
    fn fenced(&self, headers: &mut costmesh_contracts::Headers) -> Result<(), BusError> {
        if self.fence.is_some() {
            let term = self.check_fence()?;
            headers.insert(LEASE_TERM, term.to_string().as_str());
        }
        Ok(())
    }

    /// Ok (with the term, 0 without a lease) while this instance may write.
    pub fn check_fence(&self) -> Result<u64, BusError> {
        match &self.fence {
            None => Ok(0),
            Some(f) => f.check().map_err(|e| BusError::new(costmesh_bus::BusErrorKind::Refused, e.to_string())),
        }
    }

    /// Publishes on core NATS (at most once).
    pub async fn publish<E: Event>(&self, subject: &str, event: &E) -> Result<EventMeta, BusError> {
        let span = self.producer_span(subject, &E::full_name());
        async {
            let (meta, mut headers, payload) = self.stamp(event);
            self.fenced(&mut headers)?;
            tracing::Span::current().record("messaging.message.id", meta.id.as_str());
            if let Some(s) = &self.signer {
                s.sign(subject, &mut headers, &payload);
            }
            self.bus.publish(subject, headers, payload).await?;
            self.count_published::<E>();
            Ok(meta)
        }
        .instrument(span)
        .await
    }

    /// Publishes to JetStream; the event id doubles as `Nats-Msg-Id`.
    pub async fn publish_durable<E: Event>(&self, subject: &str, event: &E) -> Result<(EventMeta, PubAck), BusError> {
        self.send_durable(subject, event, None).await
    }

    /// Publishes durably with a caller-chosen event id, so a retried
    /// decision (after a restart) is de-duplicated by the server.
    pub async fn publish_durable_with_id<E: Event>(
        &self,
        subject: &str,
        event: &E,
        id: &str,
    ) -> Result<PubAck, BusError> {
        self.send_durable(subject, event, Some(id)).await.map(|(_, ack)| ack)
    }

    async fn send_durable<E: Event>(
        &self,
        subject: &str,
        event: &E,
        id: Option<&str>,
    ) -> Result<(EventMeta, PubAck), BusError> {
        let span = self.producer_span(subject, &E::full_name());
        async {
            let (mut meta, mut headers, payload) = self.stamp(event);
            self.fenced(&mut headers)?;
            if let Some(id) = id {
                meta.id = id.to_string();
                headers.insert(names::EVENT_ID, id);
                headers.insert(names::NATS_MSG_ID, id);
            }
            tracing::Span::current().record("messaging.message.id", meta.id.as_str());
            if let Some(s) = &self.signer {
                s.sign(subject, &mut headers, &payload);
            }
            let ack = self.bus.publish_durable(subject, headers, payload).await?;
            self.count_published::<E>();
            Ok((meta, ack))
        }
        .instrument(span)
        .await
    }

    /// Sends `message` to this service's dead-letter subject with `reason`.
    /// The original payload and headers are kept; if the DLQ itself cannot be
    /// reached the message is logged in full, so nothing is lost silently.
    pub async fn dead_letter(&self, message: &Message, reason_kind: &str, reason: &str) {
        self.metrics
            .dead_letters
            .get_or_create(&DeadLetterLabels { service: self.service.clone(), reason: reason_kind.to_string() })
            .inc();
        let mut headers = message.headers.clone();
        // `<kind>: <detail>`, as docs/subjects.md says.
        let reason = format!("{reason_kind}: {reason}");
        headers.insert(names::DLQ_REASON, reason.clone());
        headers.insert(names::DLQ_SUBJECT, message.subject.clone());
        headers.insert(names::DLQ_SERVICE, self.service.clone());
        // A fresh id: the DLQ entry is its own event, and the original id may
        // be missing or repeated.
        headers.insert(names::NATS_MSG_ID, uuid::Uuid::now_v7().to_string());
        let subject = self.subjects.dlq(&self.service);
        tracing::warn!(subject = %message.subject, reason = %reason, dlq = %subject, "message dead-lettered");
        // A message near the max payload would not fit with the DLQ headers:
        // keep headers and reason, cut the payload, and say so.
        let room = self.bus.max_payload().saturating_sub(DLQ_HEADROOM + headers_len(&headers));
        let mut payload = message.payload.clone();
        if payload.len() > room {
            headers.insert(names::DLQ_TRUNCATED, format!("{} of {} bytes kept", room, payload.len()));
            payload = payload.slice(..room);
        }
        if let Err(e) = self.bus.publish_durable(&subject, headers, payload).await {
            tracing::error!(
                error = %e,
                subject = %message.subject,
                reason = %reason,
                payload_bytes = message.payload.len(),
                payload_base64_head = %base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    &message.payload[..message.payload.len().min(4096)]
                ),
                "dead-letter publish failed; message logged here instead (its first 4 KiB)"
            );
        }
    }

    /// Runs `handler` for every message on a core subscription until
    /// `shutdown`. Duplicate event ids are skipped.
    pub async fn consume_core<T, F, Fut>(&self, mut sub: Subscription, shutdown: CancellationToken, mut handler: F)
    where
        T: Decodable,
        F: FnMut(Message, EventMeta, T) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let mut seen = SeenIds::new(4096);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let (meta, event) = match T::decode_message(&msg.headers, &msg.payload) {
                Ok(x) => x,
                Err(e) => {
                    self.dead_letter(&msg, e.kind.as_str(), &e.detail).await;
                    continue;
                }
            };
            if let Some(why) = self.misplaced(&msg, &meta) {
                self.dead_letter(&msg, "wrong_subject", &why).await;
                continue;
            }
            if !seen.insert(&meta.id) {
                self.count(&self.metrics.duplicates, &meta);
                continue;
            }
            let span = self.handle_span(&msg, &meta);
            match handler(msg.clone(), meta.clone(), event).instrument(span).await {
                Ok(()) => self.count(&self.metrics.handled, &meta),
                Err(HandlerError::Reject(reason)) => self.dead_letter(&msg, "rejected", &reason).await,
                Err(HandlerError::Retry(reason)) => {
                    tracing::warn!(subject = %msg.subject, id = %meta.id, reason = %reason, "handler failed on a core subject; event dropped");
                }
            }
        }
    }

    fn durable_name(&self, name: &str) -> String {
        durable_name(&self.service, name)
    }

    /// Binds a durable consumer named `<service>-<name>` on this prefix's
    /// events stream.
    pub async fn durable(
        &self,
        name: &str,
        filters: Vec<String>,
        ack_wait: Duration,
    ) -> Result<DurableSubscription, BusError> {
        self.ensure_stream().await?;
        let spec = ConsumerSpec {
            stream: self.subjects.stream_name(),
            durable: self.durable_name(name),
            filter_subjects: filters,
            ack_wait,
            max_deliver: 20,
            deliver_from: DeliverFrom::All,
        };
        self.bus.consume(&spec).await
    }

    /// Waits until the durable consumer `<service>-<name>` has caught up
    /// (nothing undelivered or unacked), or `timeout` passes; false then.
    pub async fn caught_up(&self, name: &str, timeout: Duration) -> bool {
        let durable = self.durable_name(name);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.bus.consumer_backlog(&self.subjects.stream_name(), &durable).await {
                Ok(0) => return true,
                Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => return false,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Runs `handler` for every message of a durable consumer until
    /// `shutdown`: acks on success, redelivers on [`HandlerError::Retry`]
    /// with a growing delay, dead-letters undecodable or rejected messages.
    pub async fn consume_durable<T, F, Fut>(
        &self,
        mut sub: DurableSubscription,
        shutdown: CancellationToken,
        mut handler: F,
    ) where
        T: Decodable,
        F: FnMut(Message, EventMeta, T) -> Fut,
        Fut: Future<Output = Result<(), HandlerError>>,
    {
        let mut seen = SeenIds::new(4096);
        loop {
            let dm = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let msg = &dm.message;
            let (meta, event) = match T::decode_message(&msg.headers, &msg.payload) {
                Ok(x) => x,
                Err(e) => {
                    self.dead_letter(msg, e.kind.as_str(), &e.detail).await;
                    let _ = dm.term().await;
                    continue;
                }
            };
            if let Some(why) = self.misplaced(msg, &meta) {
                self.dead_letter(msg, "wrong_subject", &why).await;
                let _ = dm.term().await;
                continue;
            }
            if !seen.insert(&meta.id) {
                self.count(&self.metrics.duplicates, &meta);
                let _ = dm.ack().await;
                continue;
            }
            let span = self.handle_span(msg, &meta);
            match handler(msg.clone(), meta.clone(), event).instrument(span).await {
                Ok(()) => {
                    self.count(&self.metrics.handled, &meta);
                    if let Err(e) = dm.ack().await {
                        tracing::warn!(error = %e, "ack failed; the message will be redelivered and skipped by id");
                    }
                }
                Err(HandlerError::Reject(reason)) => {
                    self.dead_letter(msg, "rejected", &reason).await;
                    let _ = dm.term().await;
                }
                Err(HandlerError::Retry(reason)) => {
                    // Let a later delivery try again.
                    seen.forget(&meta.id);
                    let delay = Duration::from_millis(200 * dm.delivered.min(50));
                    tracing::warn!(subject = %msg.subject, id = %meta.id, reason = %reason, delivered = dm.delivered, "handler failed; will retry");
                    let _ = dm.nak(Some(delay)).await;
                }
            }
        }
    }

    /// Why an event is not handled where it arrived: a payload type other
    /// than the one the subject table gives its subject (a `JobAssignment`
    /// on a budget subject, say). `None` when it belongs.
    fn misplaced(&self, msg: &Message, meta: &EventMeta) -> Option<String> {
        let expected = self.subjects.expected_message(&msg.subject)?;
        (meta.event_type != expected)
            .then(|| format!("{} does not belong on {} (it carries {expected})", meta.event_type, msg.subject))
    }

    /// The family name of `subject` for span names (low cardinality).
    fn destination(&self, subject: &str) -> String {
        self.subjects.template(subject).unwrap_or_else(|| subject.to_string())
    }

    /// A producer span after the OpenTelemetry messaging conventions
    /// ([`telemetry::SEMCONV_VERSION`]): `publish <destination template>`.
    fn producer_span(&self, subject: &str, event_type: &str) -> tracing::Span {
        let dest = self.destination(subject);
        let span = crate::messaging_span!(verb: "publish", kind: "producer", system: "nats", op: "send" / "publish",
            subject: subject, dest: dest, service: self.service,
            "messaging.message.id" = tracing::field::Empty,
            event_type = %event_type,
        );
        telemetry::adopt_resumed(&span);
        span
    }

    /// A consumer span (`process <destination template>`), the producer's
    /// span its parent, or only linked when the message was handled long
    /// after it was sent (see [`telemetry::adopt`]).
    fn handle_span(&self, msg: &Message, meta: &EventMeta) -> tracing::Span {
        let dest = self.destination(&msg.subject);
        let span = crate::messaging_span!(verb: "process", kind: "consumer", system: "nats", op: "process" / "process",
            subject: msg.subject, dest: dest, service: self.service,
            "messaging.message.id" = %meta.id,
            "messaging.message.body.size" = msg.payload.len(),
            event_type = %meta.event_type,
            event_id = %meta.id,
        );
        telemetry::adopt(&msg.headers, &span, meta.time.map(|t| self.clock.now() - t));
        span
    }

    fn count(
        &self,
        family: &prometheus_client::metrics::family::Family<EventLabels, prometheus_client::metrics::counter::Counter>,
        meta: &EventMeta,
    ) {
        family.get_or_create(&EventLabels { service: self.service.clone(), event_type: meta.event_type.clone() }).inc();
    }
}

fn headers_len(h: &costmesh_contracts::Headers) -> usize {
    h.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
}

impl SeenIds {
    /// Forgets `id` so a redelivery is handled again.
    pub fn forget(&mut self, id: &str) {
        if self.set.remove(id) {
            self.order.retain(|x| x != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_ids_are_bounded() {
        let mut s = SeenIds::new(2);
        assert!(s.insert("a"));
        assert!(!s.insert("a"));
        assert!(s.insert("b"));
        assert!(s.insert("c"));
        assert!(s.insert("a"), "oldest id was evicted");
        s.forget("c");
        assert!(s.insert("c"));
    }
}
