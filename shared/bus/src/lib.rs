//! The costmesh message bus: one API over NATS and an in-process bus.
//!
//! # Layout
//! - [`subject`]: NATS subject matching (`*` one token, `>` the rest).
//! - [`nats`]: the NATS backend (`async-nats`): core pub/sub, queue groups,
//!   request-reply, JetStream streams, durable pull consumers, KV.
//! - [`memory`]: the in-process backend with the same semantics, for
//!   `costmesh up` with no server installed.
//!
//! Both backends pass one conformance suite (`tests/conformance.rs`).
//!
//! **Invariant:** the bus moves bytes and headers; it knows nothing of event
//! types, encodings or tracing (those live in `costmesh-contracts` and
//! `costmesh-runtime`).
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use costmesh_contracts::Headers;

pub mod memory;
pub mod nats;
pub mod subject;

pub use memory::MemoryBus;
pub use nats::{masked_url, nkey_inbox_prefix, NatsBus, NatsConnectOptions};

/// One message as a handler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub subject: String,
    /// Where a request wants its reply.
    pub reply: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// What went wrong on the bus. Small and `Copy` so callers can match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusErrorKind {
    /// Could not reach the server, or the connection dropped.
    Connection,
    /// A request found nobody subscribed to answer it.
    NoResponders,
    TimedOut,
    /// A durable publish matched no stream.
    NoStream,
    /// KV create on a key that exists.
    AlreadyExists,
    /// KV update whose expected revision is not the current one.
    WrongRevision,
    InvalidSubject,
    /// Refused before it left: the writer's lease has ended (a deposed
    /// active instance).
    Refused,
    Other,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct BusError {
    pub kind: BusErrorKind,
    pub detail: String,
}

impl BusError {
    pub fn new(kind: BusErrorKind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// A JetStream stream: which subjects it stores, and for how long it
/// remembers message ids for de-duplication.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub duplicate_window: Duration,
    /// Oldest messages are dropped past this age (zero: keep forever).
    pub max_age: Duration,
    /// Oldest messages are dropped once the stream holds more than this
    /// many bytes (zero or negative: no limit).
    pub max_bytes: i64,
}

/// Where a new durable consumer starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverFrom {
    /// Every message still in the stream.
    All,
    /// Only messages published after the consumer was created.
    New,
}

/// A durable pull consumer with explicit acks.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub stream: String,
    /// The durable name; consumers with the same name share the work.
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// An unacked message is delivered again after this long.
    pub ack_wait: Duration,
    /// Deliveries before the server gives up on a message (0: no limit).
    pub max_deliver: i64,
    pub deliver_from: DeliverFrom,
}

/// The server's answer to a durable publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PubAck {
    pub sequence: u64,
    /// The message id was seen within the duplicate window; nothing stored.
    pub duplicate: bool,
}

/// A live subscription: a stream of messages.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl Subscription {
    pub(crate) fn new(inner: impl Stream<Item = Message> + Send + 'static) -> Self {
        Self { inner: Box::pin(inner) }
    }

    /// The next message, or None when the subscription ended.
    pub async fn next(&mut self) -> Option<Message> {
        futures::StreamExt::next(self).await
    }
}

impl Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A message from a durable consumer; ack it once handled.
pub struct DurableMessage {
    pub message: Message,
    /// How many times this message has been delivered (1 on first delivery).
    pub delivered: u64,
    /// The stream sequence.
    pub sequence: u64,
    acker: Acker,
}

enum Acker {
    Nats(Box<async_nats::jetstream::Message>),
    Memory(memory::MemoryAcker),
}

impl DurableMessage {
    /// Marks the message handled; it is not delivered again.
    pub async fn ack(&self) -> Result<()> {
        match &self.acker {
            Acker::Nats(m) => m.ack().await.map_err(|e| BusError::new(BusErrorKind::Connection, e.to_string())),
            Acker::Memory(a) => {
                a.ack();
                Ok(())
            }
        }
    }

    /// Asks for redelivery after `delay` (at once when None).
    pub async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        match &self.acker {
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Nak(delay))
                .await
                .map_err(|e| BusError::new(BusErrorKind::Connection, e.to_string())),
            Acker::Memory(a) => {
                a.nak(delay);
                Ok(())
            }
        }
    }

    /// Gives up on the message for good (it is never redelivered).
    pub async fn term(&self) -> Result<()> {
        match &self.acker {
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Term)
                .await
                .map_err(|e| BusError::new(BusErrorKind::Connection, e.to_string())),
            Acker::Memory(a) => {
                a.ack();
                Ok(())
            }
        }
    }
}

/// A durable consumer's messages.
pub struct DurableSubscription {
    inner: Pin<Box<dyn Stream<Item = DurableMessage> + Send>>,
}

impl DurableSubscription {
    pub(crate) fn new(inner: impl Stream<Item = DurableMessage> + Send + 'static) -> Self {
        Self { inner: Box::pin(inner) }
    }

    pub async fn next(&mut self) -> Option<DurableMessage> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for DurableSubscription {
    type Item = DurableMessage;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DurableMessage>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A value in a KV bucket with the revision it was written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Bytes,
    pub revision: u64,
}

/// A key-value bucket (JetStream KV, or in memory).
#[derive(Clone)]
pub enum Kv {
    Nats(Box<nats::NatsKv>),
    Memory(memory::MemoryKv),
}

impl Kv {
    pub async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        match self {
            Kv::Nats(s) => s.get(key).await,
            Kv::Memory(m) => Ok(m.get(key)),
        }
    }

    /// Writes unconditionally; returns the new revision.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64> {
        match self {
            Kv::Nats(s) => s.put(key, value).await,
            Kv::Memory(m) => Ok(m.put(key, value)),
        }
    }

    /// Writes only if the key does not exist ([`BusErrorKind::AlreadyExists`]).
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        match self {
            Kv::Nats(s) => s.create(key, value).await,
            Kv::Memory(m) => m.create(key, value),
        }
    }

    /// Compare-and-set: writes only if the key is at `revision`
    /// ([`BusErrorKind::WrongRevision`] otherwise).
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        match self {
            Kv::Nats(s) => s.update(key, value, revision).await,
            Kv::Memory(m) => m.update(key, value, revision),
        }
    }

    /// [`Kv::get`] tried once, without waiting through a leader election:
    /// for a caller that bounds each try and retries on its own schedule.
    pub async fn get_once(&self, key: &str) -> Result<Option<KvEntry>> {
        match self {
            Kv::Nats(s) => s.get_once(key).await,
            Kv::Memory(m) => Ok(m.get(key)),
        }
    }

    /// [`Kv::create`] tried once (see [`Kv::get_once`]).
    pub async fn create_once(&self, key: &str, value: Bytes) -> Result<u64> {
        match self {
            Kv::Nats(s) => s.create_once(key, value).await,
            Kv::Memory(m) => m.create(key, value),
        }
    }

    /// [`Kv::update`] tried once (see [`Kv::get_once`]). A try whose
    /// answer was lost may still have landed: the caller finds out from the
    /// value at the next revision.
    pub async fn update_once(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        match self {
            Kv::Nats(s) => s.update_once(key, value, revision).await,
            Kv::Memory(m) => m.update(key, value, revision),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Kv::Nats(s) => s.delete(key).await,
            Kv::Memory(m) => {
                m.delete(key);
                Ok(())
            }
        }
    }

    /// Every live key, sorted.
    pub async fn keys(&self) -> Result<Vec<String>> {
        match self {
            Kv::Nats(s) => s.keys().await,
            Kv::Memory(m) => Ok(m.keys()),
        }
    }
}

/// The bus every service talks through.
#[derive(Clone)]
pub enum Bus {
    Nats(NatsBus),
    Memory(MemoryBus),
}

impl Bus {
    /// A fresh in-process bus.
    pub fn memory() -> Self {
        Bus::Memory(MemoryBus::new())
    }

    /// Short name of the backend, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Bus::Nats(_) => "nats",
            Bus::Memory(_) => "memory",
        }
    }

    /// Publishes at most once (core NATS).
    pub async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<()> {
        subject::validate_publish(subject)?;
        match self {
            Bus::Nats(b) => b.publish(subject, None, headers, payload).await,
            Bus::Memory(b) => b.publish(subject, None, headers, payload),
        }
    }

    pub async fn subscribe(&self, subject: &str) -> Result<Subscription> {
        subject::validate_filter(subject)?;
        match self {
            Bus::Nats(b) => b.subscribe(subject, None).await,
            Bus::Memory(b) => Ok(b.subscribe(subject, None)),
        }
    }

    /// Each message goes to one member of the group.
    pub async fn queue_subscribe(&self, subject: &str, group: &str) -> Result<Subscription> {
        subject::validate_filter(subject)?;
        match self {
            Bus::Nats(b) => b.subscribe(subject, Some(group)).await,
            Bus::Memory(b) => Ok(b.subscribe(subject, Some(group))),
        }
    }

    /// Sends a request and waits for the first reply.
    pub async fn request(&self, subject: &str, headers: Headers, payload: Bytes, timeout: Duration) -> Result<Message> {
        subject::validate_publish(subject)?;
        match self {
            Bus::Nats(b) => b.request(subject, headers, payload, timeout).await,
            Bus::Memory(b) => b.request(subject, headers, payload, timeout).await,
        }
    }

    /// Answers a request (no-op error when the message wants no reply).
    pub async fn respond(&self, request: &Message, headers: Headers, payload: Bytes) -> Result<()> {
        let reply = request
            .reply
            .as_deref()
            .ok_or_else(|| BusError::new(BusErrorKind::InvalidSubject, "message has no reply subject"))?;
        match self {
            Bus::Nats(b) => b.publish(reply, None, headers, payload).await,
            Bus::Memory(b) => b.publish(reply, None, headers, payload),
        }
    }

    /// Waits until everything published so far has reached the server.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Bus::Nats(b) => b.flush().await,
            Bus::Memory(_) => Ok(()),
        }
    }

    /// Creates the stream, or updates its subjects if it exists.
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()> {
        match self {
            Bus::Nats(b) => b.ensure_stream(spec).await,
            Bus::Memory(b) => {
                b.ensure_stream(spec);
                Ok(())
            }
        }
    }

    /// Stores a message in the stream that captures `subject`. A repeated
    /// `Nats-Msg-Id` inside the duplicate window is acknowledged as a
    /// duplicate and not stored again.
    pub async fn publish_durable(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<PubAck> {
        subject::validate_publish(subject)?;
        match self {
            Bus::Nats(b) => b.publish_durable(subject, headers, payload).await,
            Bus::Memory(b) => b.publish_durable(subject, headers, payload),
        }
    }

    /// The newest message of each subject matching `filters` in `stream`,
    /// oldest first, with its stream sequence. A service rebuilds state that
    /// only the latest event of a subject defines (a budget's state) from
    /// this at start, instead of from its durable consumer's position.
    pub async fn last_per_subject(&self, stream: &str, filters: &[String]) -> Result<Vec<(u64, Message)>> {
        for f in filters {
            subject::validate_filter(f)?;
        }
        match self {
            Bus::Nats(b) => b.last_per_subject(stream, filters).await,
            Bus::Memory(b) => b.last_per_subject(stream, filters),
        }
    }

    /// Messages a durable consumer has yet to see acked: not yet delivered,
    /// or delivered and unacked. Zero means it has caught up.
    pub async fn consumer_backlog(&self, stream: &str, durable: &str) -> Result<u64> {
        match self {
            Bus::Nats(b) => b.consumer_backlog(stream, durable).await,
            Bus::Memory(b) => b.consumer_backlog(stream, durable),
        }
    }

    /// How many times the connection was made so far, the first included
    /// (once, in process). A service that judges others by what it heard
    /// compares this between judgements: it heard nothing while cut off.
    pub fn connects(&self) -> u64 {
        match self {
            Bus::Nats(b) => b.connects(),
            Bus::Memory(_) => 1,
        }
    }

    /// Whether the connection to the server is up (always, in process).
    pub fn is_connected(&self) -> bool {
        match self {
            Bus::Nats(b) => b.is_connected(),
            Bus::Memory(_) => true,
        }
    }

    /// The largest payload the server takes (NATS's `max_payload`).
    pub fn max_payload(&self) -> usize {
        match self {
            Bus::Nats(b) => b.max_payload(),
            Bus::Memory(_) => 1024 * 1024,
        }
    }

    /// Binds to (creating if needed) a durable pull consumer.
    pub async fn consume(&self, spec: &ConsumerSpec) -> Result<DurableSubscription> {
        for f in &spec.filter_subjects {
            subject::validate_filter(f)?;
        }
        match self {
            Bus::Nats(b) => b.consume(spec).await,
            Bus::Memory(b) => b.consume(spec),
        }
    }

    /// Opens (creating if needed) a KV bucket that holds at most
    /// `max_bytes` (an existing bucket keeps its limit).
    pub async fn kv_bounded(&self, bucket: &str, max_bytes: i64) -> Result<Kv> {
        match self {
            Bus::Nats(b) => b
                .kv_with(bucket, max_bytes)
                .await
                .map(|s| Kv::Nats(Box::new(nats::NatsKv { store: s, replicas: b.replicas }))),
            Bus::Memory(b) => Ok(Kv::Memory(b.kv(bucket))),
        }
    }

    /// Opens (creating if needed) a KV bucket.
    pub async fn kv(&self, bucket: &str) -> Result<Kv> {
        match self {
            Bus::Nats(b) => {
                b.kv(bucket).await.map(|s| Kv::Nats(Box::new(nats::NatsKv { store: s, replicas: b.replicas })))
            }
            Bus::Memory(b) => Ok(Kv::Memory(b.kv(bucket))),
        }
    }
}
