//! The in-process bus: the same subject semantics as NATS (wildcards, queue
//! groups, request-reply, no-responders), plus streams with de-duplication,
//! durable consumers with ack-wait redelivery, and KV with compare-and-set.
//! State lives as long as the `MemoryBus`; nothing is written to disk.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use costmesh_contracts::headers::names;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::subject::matches;
use crate::{
    Acker, BusError, BusErrorKind, ConsumerSpec, DeliverFrom, DurableMessage, DurableSubscription, Headers, KvEntry,
    Message, PubAck, Result, StreamSpec, Subscription,
};

struct Sub {
    id: u64,
    filter: String,
    group: Option<String>,
    tx: mpsc::UnboundedSender<Message>,
}

#[derive(Default)]
struct Core {
    subs: Vec<Sub>,
    /// Round-robin cursor per queue group.
    group_cursor: HashMap<String, usize>,
}

struct Stored {
    seq: u64,
    at: Instant,
    message: Message,
}

struct ConsumerState {
    filters: Vec<String>,
    ack_wait: Duration,
    max_deliver: i64,
    /// Next stream sequence not yet delivered for the first time.
    cursor: u64,
    /// Delivered, not yet acked: seq -> (deliveries, redeliver at).
    pending: BTreeMap<u64, (u64, Instant)>,
    /// The one delivery queue the consumer's subscribers share.
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<DurableMessage>>>,
    tx: mpsc::UnboundedSender<DurableMessage>,
    wake: Arc<Notify>,
}

struct StreamState {
    spec: StreamSpec,
    last_seq: u64,
    messages: VecDeque<Stored>,
    /// Message id -> (sequence, first seen).
    dedupe: HashMap<String, (u64, Instant)>,
    consumers: HashMap<String, ConsumerState>,
}

#[derive(Default)]
struct Js {
    streams: HashMap<String, StreamState>,
}

struct Inner {
    core: Mutex<Core>,
    js: Mutex<Js>,
    kv: Mutex<HashMap<String, MemoryKv>>,
    next_id: AtomicU64,
}

/// The in-process bus. Clones share one bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                core: Mutex::new(Core::default()),
                js: Mutex::new(Js::default()),
                kv: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Delivers to every plain subscriber that matches and to one member of
    /// each matching queue group. Returns how many received it.
    pub(crate) fn deliver(&self, message: Message) -> usize {
        let mut core = self.inner.core.lock().expect("bus lock");
        core.subs.retain(|s| !s.tx.is_closed());
        let mut delivered = 0;
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, s) in core.subs.iter().enumerate() {
            if !matches(&s.filter, &message.subject) {
                continue;
            }
            match &s.group {
                Some(g) => groups.entry(g.clone()).or_default().push(i),
                None => {
                    if s.tx.send(message.clone()).is_ok() {
                        delivered += 1;
                    }
                }
            }
        }
        for (g, members) in groups {
            let cursor = core.group_cursor.entry(g).or_insert(0);
            let pick = members[*cursor % members.len()];
            *cursor = cursor.wrapping_add(1);
            if core.subs[pick].tx.send(message.clone()).is_ok() {
                delivered += 1;
            }
        }
        delivered
    }

    pub(crate) fn publish(&self, subject: &str, reply: Option<&str>, headers: Headers, payload: Bytes) -> Result<()> {
        self.deliver(Message { subject: subject.to_string(), reply: reply.map(str::to_string), headers, payload });
        Ok(())
    }

    pub(crate) fn subscribe(&self, filter: &str, group: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id();
        self.inner.core.lock().expect("bus lock").subs.push(Sub {
            id,
            filter: filter.to_string(),
            group: group.map(str::to_string),
            tx,
        });
        Subscription::new(tokio_stream_from(rx))
    }

    fn unsubscribe(&self, id: u64) {
        self.inner.core.lock().expect("bus lock").subs.retain(|s| s.id != id);
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let inbox = format!("_INBOX.{}", uuid::Uuid::new_v4().simple());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = self.next_id();
        self.inner.core.lock().expect("bus lock").subs.push(Sub { id, filter: inbox.clone(), group: None, tx });
        let n = self.deliver(Message { subject: subject.to_string(), reply: Some(inbox), headers, payload });
        let result = if n == 0 {
            Err(BusError::new(BusErrorKind::NoResponders, format!("request to {subject}: no responders")))
        } else {
            match tokio::time::timeout(timeout, rx.recv()).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(BusError::new(BusErrorKind::Connection, "bus closed")),
                Err(_) => Err(BusError::new(BusErrorKind::TimedOut, format!("request to {subject}: timed out"))),
            }
        };
        self.unsubscribe(id);
        result
    }

    pub(crate) fn ensure_stream(&self, spec: &StreamSpec) {
        let mut js = self.inner.js.lock().expect("bus lock");
        match js.streams.get_mut(&spec.name) {
            Some(s) => s.spec = spec.clone(),
            None => {
                js.streams.insert(
                    spec.name.clone(),
                    StreamState {
                        spec: spec.clone(),
                        last_seq: 0,
                        messages: VecDeque::new(),
                        dedupe: HashMap::new(),
                        consumers: HashMap::new(),
                    },
                );
            }
        }
    }

    pub(crate) fn publish_durable(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<PubAck> {
        let now = Instant::now();
        let mut js = self.inner.js.lock().expect("bus lock");
        let stream =
            js.streams.values_mut().find(|s| s.spec.subjects.iter().any(|f| matches(f, subject))).ok_or_else(|| {
                BusError::new(BusErrorKind::NoStream, format!("publishing to {subject}: no stream captures it"))
            })?;
        let window = stream.spec.duplicate_window;
        stream.dedupe.retain(|_, (_, at)| now.duration_since(*at) < window);
        let msg_id = headers.get(names::NATS_MSG_ID).map(str::to_string);
        if let Some((seq, _)) = msg_id.as_ref().and_then(|id| stream.dedupe.get(id)) {
            return Ok(PubAck { sequence: *seq, duplicate: true });
        }
        stream.last_seq += 1;
        let seq = stream.last_seq;
        if let Some(id) = msg_id {
            stream.dedupe.insert(id, (seq, now));
        }
        stream.messages.push_back(Stored {
            seq,
            at: now,
            message: Message { subject: subject.to_string(), reply: None, headers, payload },
        });
        if !stream.spec.max_age.is_zero() {
            let max_age = stream.spec.max_age;
            while stream.messages.front().is_some_and(|m| now.duration_since(m.at) > max_age) {
                stream.messages.pop_front();
            }
        }
        if stream.spec.max_bytes > 0 {
            // Oldest first, as JetStream's discard-old policy does.
            let size = |m: &Stored| (m.message.payload.len() + m.message.subject.len()) as i64;
            let mut total: i64 = stream.messages.iter().map(size).sum();
            while total > stream.spec.max_bytes && stream.messages.len() > 1 {
                if let Some(m) = stream.messages.pop_front() {
                    total -= size(&m);
                }
            }
        }
        for c in stream.consumers.values() {
            c.wake.notify_one();
        }
        Ok(PubAck { sequence: seq, duplicate: false })
    }

    pub(crate) fn consumer_backlog(&self, stream: &str, durable: &str) -> Result<u64> {
        let js = self.inner.js.lock().expect("bus lock");
        let s = js
            .streams
            .get(stream)
            .ok_or_else(|| BusError::new(BusErrorKind::NoStream, format!("stream {stream} not found")))?;
        let c = s
            .consumers
            .get(durable)
            .ok_or_else(|| BusError::new(BusErrorKind::Other, format!("consumer {durable} not found")))?;
        let undelivered = s
            .messages
            .iter()
            .filter(|m| m.seq >= c.cursor && c.filters.iter().any(|f| matches(f, &m.message.subject)))
            .count();
        Ok((undelivered + c.pending.len()) as u64)
    }

    pub(crate) fn last_per_subject(&self, stream: &str, filters: &[String]) -> Result<Vec<(u64, Message)>> {
        let js = self.inner.js.lock().expect("bus lock");
        let s = js
            .streams
            .get(stream)
            .ok_or_else(|| BusError::new(BusErrorKind::NoStream, format!("stream {stream} not found")))?;
        let mut last: HashMap<&str, (u64, &Message)> = HashMap::new();
        for m in s.messages.iter().filter(|m| filters.iter().any(|f| matches(f, &m.message.subject))) {
            last.insert(m.message.subject.as_str(), (m.seq, &m.message));
        }
        let mut out: Vec<(u64, Message)> = last.into_values().map(|(seq, m)| (seq, m.clone())).collect();
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out)
    }

    pub(crate) fn consume(&self, spec: &ConsumerSpec) -> Result<DurableSubscription> {
        let queue = {
            let mut js = self.inner.js.lock().expect("bus lock");
            let stream = js
                .streams
                .get_mut(&spec.stream)
                .ok_or_else(|| BusError::new(BusErrorKind::NoStream, format!("stream {} not found", spec.stream)))?;
            let start = match spec.deliver_from {
                DeliverFrom::All => 1,
                DeliverFrom::New => stream.last_seq + 1,
            };
            let mut spawn = false;
            let c = stream.consumers.entry(spec.durable.clone()).or_insert_with(|| {
                spawn = true;
                let (tx, rx) = mpsc::unbounded_channel();
                ConsumerState {
                    filters: spec.filter_subjects.clone(),
                    ack_wait: spec.ack_wait,
                    max_deliver: spec.max_deliver,
                    cursor: start,
                    pending: BTreeMap::new(),
                    queue: Arc::new(tokio::sync::Mutex::new(rx)),
                    tx,
                    wake: Arc::new(Notify::new()),
                }
            });
            if spawn {
                let wake = c.wake.clone();
                tokio::spawn(deliver_loop(
                    Arc::downgrade(&self.inner),
                    spec.stream.clone(),
                    spec.durable.clone(),
                    wake,
                ));
            }
            c.queue.clone()
        };
        let stream = futures::stream::unfold(queue, |q| async move {
            let m = q.lock().await.recv().await;
            m.map(|m| (m, q))
        });
        Ok(DurableSubscription::new(stream))
    }

    pub(crate) fn kv(&self, bucket: &str) -> MemoryKv {
        self.inner.kv.lock().expect("bus lock").entry(bucket.to_string()).or_default().clone()
    }
}

fn tokio_stream_from(rx: mpsc::UnboundedReceiver<Message>) -> impl futures::Stream<Item = Message> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// What the delivery loop decided to do next, computed under the lock.
enum Next {
    Sent,
    WaitUntil(Option<Instant>),
}

/// Moves a consumer's messages into its delivery queue: new messages in
/// order, and unacked ones again once their ack-wait has passed.
async fn deliver_loop(inner: Weak<Inner>, stream: String, durable: String, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let mut js = inner.js.lock().expect("bus lock");
            let Some(s) = js.streams.get_mut(&stream) else { return };
            let now = Instant::now();
            let last_seq = s.last_seq;
            let first_seq = s.messages.front().map(|m| m.seq).unwrap_or(last_seq + 1);
            let StreamState { messages, consumers, .. } = s;
            let Some(c) = consumers.get_mut(&durable) else { return };
            let find = |seq: u64| -> Option<&Stored> {
                let idx = seq.checked_sub(first_seq)? as usize;
                messages.get(idx)
            };
            let mut out = Vec::new();
            // Redeliveries first.
            let due: Vec<u64> = c.pending.iter().filter(|(_, (_, at))| *at <= now).map(|(s, _)| *s).collect();
            for seq in due {
                let (count, _) = c.pending[&seq];
                match find(seq) {
                    Some(m) if c.max_deliver <= 0 || (count as i64) < c.max_deliver => {
                        c.pending.insert(seq, (count + 1, now + c.ack_wait));
                        out.push(make_durable(&inner, &stream, &durable, m, count + 1));
                    }
                    _ => {
                        c.pending.remove(&seq);
                    }
                }
            }
            while c.cursor <= last_seq {
                let seq = c.cursor;
                c.cursor += 1;
                if let Some(m) = find(seq) {
                    if c.filters.is_empty() || c.filters.iter().any(|f| matches(f, &m.message.subject)) {
                        c.pending.insert(seq, (1, now + c.ack_wait));
                        out.push(make_durable(&inner, &stream, &durable, m, 1));
                    }
                }
            }
            if out.is_empty() {
                Next::WaitUntil(c.pending.values().map(|(_, at)| *at).min())
            } else {
                for m in out {
                    let _ = c.tx.send(m);
                }
                Next::Sent
            }
        };
        match next {
            Next::Sent => tokio::task::yield_now().await,
            Next::WaitUntil(Some(at)) => {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            Next::WaitUntil(None) => wake.notified().await,
        }
    }
}

fn make_durable(inner: &Arc<Inner>, stream: &str, durable: &str, m: &Stored, delivered: u64) -> DurableMessage {
    DurableMessage {
        message: m.message.clone(),
        delivered,
        sequence: m.seq,
        acker: Acker::Memory(MemoryAcker {
            inner: Arc::downgrade(inner),
            stream: stream.to_string(),
            durable: durable.to_string(),
            seq: m.seq,
        }),
    }
}

/// Acks a message of the in-process bus.
pub struct MemoryAcker {
    inner: Weak<Inner>,
    stream: String,
    durable: String,
    seq: u64,
}

impl MemoryAcker {
    fn with_consumer(&self, f: impl FnOnce(&mut ConsumerState)) {
        let Some(inner) = self.inner.upgrade() else { return };
        let mut js = inner.js.lock().expect("bus lock");
        if let Some(c) = js.streams.get_mut(&self.stream).and_then(|s| s.consumers.get_mut(&self.durable)) {
            f(c);
            c.wake.notify_one();
        }
    }

    pub(crate) fn ack(&self) {
        self.with_consumer(|c| {
            c.pending.remove(&self.seq);
        });
    }

    pub(crate) fn nak(&self, delay: Option<Duration>) {
        let at = Instant::now() + delay.unwrap_or_default();
        self.with_consumer(|c| {
            if let Some(p) = c.pending.get_mut(&self.seq) {
                p.1 = at;
            }
        });
    }
}

#[derive(Default)]
struct KvState {
    revision: u64,
    entries: BTreeMap<String, (Bytes, u64)>,
}

/// An in-memory KV bucket with per-bucket revisions, like JetStream KV.
#[derive(Clone, Default)]
pub struct MemoryKv {
    state: Arc<Mutex<KvState>>,
}

impl MemoryKv {
    pub(crate) fn get(&self, key: &str) -> Option<KvEntry> {
        let s = self.state.lock().expect("kv lock");
        s.entries.get(key).map(|(v, r)| KvEntry { key: key.to_string(), value: v.clone(), revision: *r })
    }

    pub(crate) fn put(&self, key: &str, value: Bytes) -> u64 {
        let mut s = self.state.lock().expect("kv lock");
        s.revision += 1;
        let r = s.revision;
        s.entries.insert(key.to_string(), (value, r));
        r
    }

    pub(crate) fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        let mut s = self.state.lock().expect("kv lock");
        if s.entries.contains_key(key) {
            return Err(BusError::new(BusErrorKind::AlreadyExists, format!("key {key} exists")));
        }
        s.revision += 1;
        let r = s.revision;
        s.entries.insert(key.to_string(), (value, r));
        Ok(r)
    }

    pub(crate) fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        let mut s = self.state.lock().expect("kv lock");
        match s.entries.get(key) {
            Some((_, r)) if *r == revision => {}
            _ => {
                return Err(BusError::new(
                    BusErrorKind::WrongRevision,
                    format!("key {key} is not at revision {revision}"),
                ))
            }
        }
        s.revision += 1;
        let r = s.revision;
        s.entries.insert(key.to_string(), (value, r));
        Ok(r)
    }

    pub(crate) fn delete(&self, key: &str) {
        self.state.lock().expect("kv lock").entries.remove(key);
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        self.state.lock().expect("kv lock").entries.keys().cloned().collect()
    }
}
