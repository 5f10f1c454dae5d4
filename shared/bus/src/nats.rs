//! The NATS backend, through `async-nats`.
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    Acker, BusError, BusErrorKind, ConsumerSpec, DeliverFrom, DurableMessage, DurableSubscription, Headers, KvEntry,
    Message, PubAck, Result, StreamSpec, Subscription,
};

/// How to authenticate and secure the connection. Exactly one of the
/// credentials may be set; secrets are passed in, never logged.
#[derive(Clone, Debug, Default)]
pub struct NatsConnectOptions {
    /// Connection name shown by the server (`nats server report connections`).
    pub name: Option<String>,
    /// A `.creds` file (JWT plus nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// CA bundle to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub require_tls: bool,
    /// Where replies to this client go (`_INBOX` by default). With an nkey
    /// and no prefix set, [`nkey_inbox_prefix`] of its public key, which is
    /// what `costmesh nats-config` permits that user to subscribe to.
    pub inbox_prefix: Option<String>,
    /// Keep trying the first connect instead of failing (services started
    /// before the server in compose).
    pub retry_on_initial_connect: bool,
    /// Replicas of the streams and KV buckets this client creates (1 on a
    /// single server, 3 on a 3-node cluster). Above 1, a durable publish
    /// that finds no stream leader (an election) is retried for a while.
    pub replicas: usize,
}

/// How long a flush waits for the server (through an outage at start, too).
const FLUSH_WAIT: Duration = Duration::from_secs(120);

/// How long a user that may not create the events stream waits for it.
const STREAM_WAIT: Duration = Duration::from_secs(60);

/// The longest a durable publish waits for its acknowledgement.
const DURABLE_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

fn conn_err(e: impl std::fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Connection, e.to_string())
}

fn other(e: impl std::fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Other, e.to_string())
}

/// A NATS connection and its JetStream context.
#[derive(Clone)]
pub struct NatsBus {
    inner: std::sync::Arc<Conn>,
}

#[doc(hidden)]
pub struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    pub(crate) replicas: usize,
}

/// How long a durable publish on a cluster waits out a stream leader
/// election (a few seconds in practice).
const ELECTION_WAIT: Duration = Duration::from_secs(20);

impl std::ops::Deref for NatsBus {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.inner
    }
}

/// Splits credentials out of `nats://user:pass@host` or `nats://token@host`
/// (percent-escapes decoded): the URL without them, user and password, token.
fn url_credentials(url: &str) -> (String, Option<(String, String)>, Option<String>) {
    let Ok(mut parsed) = url::Url::parse(url) else { return (url.to_string(), None, None) };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = (decode(parsed.username()), parsed.password().map(decode));
    if user.is_empty() && password.is_none() {
        return (url.to_string(), None, None);
    }
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    match password {
        Some(p) => (parsed.to_string(), Some((user, p)), None),
        None => (parsed.to_string(), None, Some(user)),
    }
}

/// The inbox prefix of the user with this public nkey: its own, so that no
/// other user may be allowed to read its replies.
pub fn nkey_inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

/// The URL with any password or token replaced by `***`, for messages and
/// printed configuration (NATS and Redis URLs alike).
pub fn masked_url(url: &str) -> String {
    // A server list: each one masked.
    if url.contains(',') {
        return url.split(',').map(|u| masked_url(u.trim())).collect::<Vec<_>>().join(",");
    }
    let Ok(mut parsed) = url::Url::parse(url) else { return url.to_string() };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        let _ = parsed.set_username("***");
    } else {
        return url.to_string();
    }
    parsed.to_string()
}

impl NatsBus {
    pub async fn connect(url: &str, opts: &NatsConnectOptions) -> Result<Self> {
        // Credentials in the URL work as the nats CLI's do; explicit options win.
        // A comma-separated list: the servers of a cluster (the client
        // learns the rest from them and moves between them); credentials
        // from the first URL that has any.
        let parts: Vec<_> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(url_credentials).collect();
        let url_user = parts.iter().find_map(|p| p.1.clone());
        let url_token = parts.iter().find_map(|p| p.2.clone());
        let urls: Vec<String> = parts.into_iter().map(|p| p.0).collect();
        let shown = masked_url(url);
        let mut opts = opts.clone();
        let explicit =
            opts.credentials_file.is_some() || opts.nkey_seed.is_some() || opts.user.is_some() || opts.token.is_some();
        if !explicit {
            if let Some((u, p)) = url_user {
                opts.user = Some(u);
                opts.password = Some(p);
            } else if let Some(t) = url_token {
                opts.token = Some(t);
            }
        }
        let mut o = async_nats::ConnectOptions::new().request_timeout(Some(Duration::from_secs(10))).event_callback(
            |ev| async move {
                match ev {
                    async_nats::Event::Disconnected => tracing::warn!(event = %ev, "nats connection lost"),
                    async_nats::Event::Connected => tracing::info!(event = %ev, "nats connected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            },
        );
        if let Some(n) = &opts.name {
            o = o.name(n);
        }
        if let Some(f) = &opts.credentials_file {
            o = o.credentials_file(f).await.map_err(|e| {
                BusError::new(BusErrorKind::Connection, format!("reading credentials file {}: {e}", f.display()))
            })?;
        }
        if let Some(seed) = &opts.nkey_seed {
            let pair = nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| {
                BusError::new(BusErrorKind::Connection, format!("the nkey seed is not valid ({})", e.kind()))
            })?;
            if opts.inbox_prefix.is_none() {
                o = o.custom_inbox_prefix(nkey_inbox_prefix(&pair.public_key()));
            }
            o = o.nkey(seed.trim().to_string());
        }
        if let Some(p) = &opts.inbox_prefix {
            o = o.custom_inbox_prefix(p);
        }
        if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &opts.token {
            o = o.token(t.clone());
        }
        if let Some(ca) = &opts.tls_ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&opts.tls_cert_file, &opts.tls_key_file) {
            o = o.add_client_certificate(c.clone(), k.clone());
        }
        if opts.require_tls {
            o = o.require_tls(true);
        }
        if opts.retry_on_initial_connect {
            o = o.retry_on_initial_connect();
        }
        let client = o.connect(urls).await.map_err(|e| conn_err(format!("connecting to {shown}: {e}")))?;
        let js = jetstream::new(client.clone());
        Ok(Self { inner: std::sync::Arc::new(Conn { client, js, replicas: opts.replicas.max(1) }) })
    }

    /// The underlying client, for what the bus API does not cover.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub(crate) async fn publish(
        &self,
        subject: &str,
        reply: Option<&str>,
        headers: Headers,
        payload: Bytes,
    ) -> Result<()> {
        let h = to_nats_headers(&headers);
        match reply {
            Some(r) => self.client.publish_with_reply_and_headers(subject.to_string(), r.to_string(), h, payload).await,
            None => self.client.publish_with_headers(subject.to_string(), h, payload).await,
        }
        .map_err(conn_err)
    }

    pub(crate) async fn subscribe(&self, subject: &str, group: Option<&str>) -> Result<Subscription> {
        let sub = match group {
            Some(g) => self.client.queue_subscribe(subject.to_string(), g.to_string()).await,
            None => self.client.subscribe(subject.to_string()).await,
        }
        .map_err(conn_err)?;
        Ok(Subscription::new(sub.map(from_nats_message)))
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let req = async_nats::Request::new().headers(to_nats_headers(&headers)).payload(payload).timeout(Some(timeout));
        self.client.send_request(subject.to_string(), req).await.map(from_nats_message).map_err(|e| {
            let kind = match e.kind() {
                async_nats::RequestErrorKind::NoResponders => BusErrorKind::NoResponders,
                async_nats::RequestErrorKind::TimedOut => BusErrorKind::TimedOut,
                _ => BusErrorKind::Connection,
            };
            BusError::new(kind, format!("request to {subject}: {e}"))
        })
    }

    /// Returns once the server has processed everything sent before, our
    /// subscriptions included: async-nats's own flush only empties the
    /// write buffer, so a message to ourselves is sent through the server
    /// and waited for (the server handles one connection's commands in order).
    pub(crate) async fn flush(&self) -> Result<()> {
        let inbox = self.client.new_inbox();
        let mut echo = self.client.subscribe(inbox.clone()).await.map_err(conn_err)?;
        // Sent again every few seconds: an echo lost in a reconnect (or a
        // start during an outage) is asked for once the server is back.
        let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
        let result = loop {
            self.client.publish(inbox.clone(), Bytes::new()).await.map_err(conn_err)?;
            let _ = self.client.flush().await;
            match tokio::time::timeout(Duration::from_secs(5), echo.next()).await {
                Ok(Some(_)) => break Ok(()),
                Ok(None) => break Err(conn_err("connection closed while flushing")),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    break Err(BusError::new(
                        BusErrorKind::TimedOut,
                        format!("the server did not answer a flush within {FLUSH_WAIT:?}"),
                    ))
                }
                Err(_) => tracing::debug!(connected = self.is_connected(), "flush not answered yet; asking again"),
            }
        };
        let _ = echo.unsubscribe().await;
        result
    }

    pub(crate) async fn ensure_stream(&self, spec: &StreamSpec) -> Result<()> {
        let config = stream::Config {
            name: spec.name.clone(),
            subjects: spec.subjects.clone(),
            duplicate_window: spec.duplicate_window,
            max_age: spec.max_age,
            max_bytes: if spec.max_bytes > 0 { spec.max_bytes } else { -1 },
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        match self.js.get_stream(&spec.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(other)?;
                if info.config.subjects != spec.subjects
                    || info.config.max_bytes != config.max_bytes
                    || info.config.max_age != config.max_age
                {
                    // A user without the right to update it (a gpu-agent)
                    // uses the stream as the control plane configured it.
                    if let Err(e) = self.js.update_stream(config).await {
                        tracing::warn!(stream = %spec.name, error = %e, "stream not updated to this service's settings; using it as it is");
                    }
                }
                Ok(())
            }
            Err(_) => match self.js.create_stream(config).await {
                Ok(_) => Ok(()),
                // Another service created it between our get and create.
                Err(e) if self.js.get_stream(&spec.name).await.is_ok() => {
                    tracing::debug!(error = %e, stream = %spec.name, "stream created concurrently");
                    Ok(())
                }
                Err(e) => {
                    // A user that may not create it waits for one that may.
                    let deadline = tokio::time::Instant::now() + STREAM_WAIT;
                    tracing::warn!(stream = %spec.name, error = %e, "stream not created here; waiting for a control-plane service to create it");
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if self.js.get_stream(&spec.name).await.is_ok() {
                            return Ok(());
                        }
                    }
                    Err(other(format!("creating stream {}: {e}", spec.name)))
                }
            },
        }
    }

    pub(crate) async fn publish_durable(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<PubAck> {
        let map = |e: jetstream::context::PublishError| {
            let kind = match e.kind() {
                jetstream::context::PublishErrorKind::StreamNotFound => BusErrorKind::NoStream,
                jetstream::context::PublishErrorKind::TimedOut => BusErrorKind::TimedOut,
                jetstream::context::PublishErrorKind::BrokenPipe => BusErrorKind::Connection,
                _ => BusErrorKind::Other,
            };
            BusError::new(kind, format!("publishing to {subject}: {e}"))
        };
        // Bounded whatever the client does: a publish caught by a server
        // restart must fail (and be retried by its caller), never hang.
        let send = || async {
            self.js
                .publish_with_headers(subject.to_string(), to_nats_headers(&headers), payload.clone())
                .await
                .map_err(map)?
                .await
                .map_err(map)
        };
        let attempt = || async {
            tokio::time::timeout(DURABLE_PUBLISH_TIMEOUT, send()).await.map_err(|_| {
                BusError::new(
                    BusErrorKind::TimedOut,
                    format!("publishing to {subject}: no acknowledgement within {DURABLE_PUBLISH_TIMEOUT:?}"),
                )
            })?
        };
        // On a cluster a stream leader election looks like no responders or
        // no answer: try again, with the same message id (the stream drops a
        // repeat), for a while.
        let ack = through_elections(self.replicas, "durable publish", attempt).await?;
        Ok(PubAck { sequence: ack.sequence, duplicate: ack.duplicate })
    }

    pub(crate) async fn consumer_backlog(&self, stream: &str, durable: &str) -> Result<u64> {
        let stream = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| BusError::new(BusErrorKind::NoStream, format!("stream {stream}: {e}")))?;
        let info = stream.consumer_info(durable).await.map_err(other)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    pub(crate) fn connects(&self) -> u64 {
        self.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    pub(crate) async fn last_per_subject(&self, stream: &str, filters: &[String]) -> Result<Vec<(u64, Message)>> {
        let stream = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| BusError::new(BusErrorKind::NoStream, format!("stream {stream}: {e}")))?;
        // An ephemeral consumer that goes away by itself once read.
        let config = consumer::pull::Config {
            filter_subjects: filters.to_vec(),
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        };
        let mut consumer: consumer::PullConsumer = stream.create_consumer(config).await.map_err(other)?;
        let pending = consumer.info().await.map_err(other)?.num_pending as usize;
        let mut out = Vec::with_capacity(pending);
        while out.len() < pending {
            let batch = consumer
                .fetch()
                .max_messages(pending - out.len())
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(other)?;
            let got: Vec<_> = batch.collect().await;
            if got.is_empty() {
                break;
            }
            for m in got {
                let m = m.map_err(other)?;
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                out.push((seq, from_nats_message(m.message.clone())));
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out)
    }

    pub(crate) async fn consume(&self, spec: &ConsumerSpec) -> Result<DurableSubscription> {
        // On a cluster the stream or its consumer may be between leaders.
        through_elections(self.replicas, "durable consumer", || self.consume_once(spec)).await
    }

    async fn consume_once(&self, spec: &ConsumerSpec) -> Result<DurableSubscription> {
        let stream = self
            .js
            .get_stream(&spec.stream)
            .await
            .map_err(|e| BusError::new(BusErrorKind::NoStream, format!("stream {}: {e}", spec.stream)))?;
        let config = consumer::pull::Config {
            durable_name: Some(spec.durable.clone()),
            // One filter goes in the singular field: the server then puts it
            // in the create request's subject, where NATS permissions can
            // limit which subjects a user's consumer may read.
            filter_subject: match spec.filter_subjects.as_slice() {
                [one] => one.clone(),
                _ => String::new(),
            },
            filter_subjects: if spec.filter_subjects.len() == 1 { Vec::new() } else { spec.filter_subjects.clone() },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_deliver: spec.max_deliver,
            deliver_policy: match spec.deliver_from {
                DeliverFrom::All => consumer::DeliverPolicy::All,
                DeliverFrom::New => consumer::DeliverPolicy::New,
            },
            ..Default::default()
        };
        let consumer: consumer::PullConsumer =
            stream.get_or_create_consumer(&spec.durable, config).await.map_err(other)?;
        let messages = consumer.messages().await.map_err(other)?;
        let durable = spec.durable.clone();
        Ok(DurableSubscription::new(messages.filter_map(move |m| {
            let durable = durable.clone();
            async move {
                match m {
                    Ok(m) => {
                        let (delivered, sequence) =
                            m.info().map(|i| (i.delivered.max(1) as u64, i.stream_sequence)).unwrap_or((1, 0));
                        let message = from_nats_message(m.message.clone());
                        Some(DurableMessage { message, delivered, sequence, acker: Acker::Nats(Box::new(m)) })
                    }
                    Err(e) => {
                        // The pull stream recovers by itself (missed
                        // heartbeats, reconnects); say so and carry on.
                        tracing::warn!(consumer = %durable, error = %e, "durable consumer hiccup");
                        None
                    }
                }
            }
        })))
    }

    pub(crate) async fn kv(&self, bucket: &str) -> Result<kv::Store> {
        self.kv_with(bucket, -1).await
    }

    pub(crate) async fn kv_with(&self, bucket: &str, max_bytes: i64) -> Result<kv::Store> {
        match self.js.get_key_value(bucket).await {
            Ok(s) => Ok(s),
            Err(_) => match self
                .js
                .create_key_value(kv::Config {
                    bucket: bucket.to_string(),
                    history: 5,
                    max_bytes: if max_bytes > 0 { max_bytes } else { -1 },
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => Ok(s),
                Err(e) => {
                    self.js.get_key_value(bucket).await.map_err(|_| other(format!("creating KV bucket {bucket}: {e}")))
                }
            },
        }
    }
}

/// A JetStream KV bucket. On a cluster (`replicas` above 1) an operation
/// caught by a leader election (no responders, no answer) is tried again
/// for a while; a compare-and-set whose first try landed but whose answer
/// was lost finds its own value there and counts as done.
#[derive(Clone)]
pub struct NatsKv {
    pub(crate) store: kv::Store,
    pub(crate) replicas: usize,
}

/// Errors that a stream leader election produces: no answer, or no
/// responders (which the client reports as no stream).
fn transient(e: &BusError) -> bool {
    let d = e.detail.to_ascii_lowercase();
    matches!(e.kind, BusErrorKind::TimedOut | BusErrorKind::NoStream)
        || ["timed out", "no responders", "503", "stream not found", "no stream found", "not ready", "leader"]
            .iter()
            .any(|t| d.contains(t))
}

/// Runs `f` and, on a cluster (`replicas` above 1), runs it again while it
/// fails the way an election makes things fail, for up to
/// [`ELECTION_WAIT`], backing off from 100 ms to 2 s. `what` names it in the
/// log.
async fn through_elections<T, F, Fut>(replicas: usize, what: &str, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + ELECTION_WAIT;
    let mut wait = Duration::from_millis(100);
    loop {
        match f().await {
            Err(e) if replicas > 1 && transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                tracing::debug!(error = %e, retry_in = ?wait, "{what} not answered; a leader election?");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

impl NatsKv {
    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        through_elections(self.replicas, "KV operation", f).await
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        self.retrying(|| kv_get(&self.store, key)).await
    }

    pub(crate) async fn put(&self, key: &str, value: Bytes) -> Result<u64> {
        self.retrying(|| async { self.store.put(key, value.clone()).await.map_err(other) }).await
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        self.retrying(|| async { self.store.delete(key).await.map_err(other) }).await
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>> {
        self.retrying(|| kv_keys(&self.store)).await
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        let retried = std::sync::atomic::AtomicBool::new(false);
        self.retrying(|| async {
            let again = retried.swap(true, std::sync::atomic::Ordering::Relaxed);
            match kv_create(&self.store, key, value.clone()).await {
                // Our own first try may have landed, its answer lost.
                Err(e) if again && e.kind == BusErrorKind::AlreadyExists => match kv_get(&self.store, key).await? {
                    Some(en) if en.value == value => Ok(en.revision),
                    _ => Err(e),
                },
                r => r,
            }
        })
        .await
    }

    pub(crate) async fn get_once(&self, key: &str) -> Result<Option<KvEntry>> {
        kv_get(&self.store, key).await
    }

    pub(crate) async fn create_once(&self, key: &str, value: Bytes) -> Result<u64> {
        kv_create(&self.store, key, value).await
    }

    pub(crate) async fn update_once(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        kv_update(&self.store, key, value, revision).await
    }

    pub(crate) async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        let retried = std::sync::atomic::AtomicBool::new(false);
        self.retrying(|| async {
            let again = retried.swap(true, std::sync::atomic::Ordering::Relaxed);
            match kv_update(&self.store, key, value.clone(), revision).await {
                Err(e) if again && e.kind == BusErrorKind::WrongRevision => match kv_get(&self.store, key).await? {
                    Some(en) if en.revision > revision && en.value == value => Ok(en.revision),
                    _ => Err(e),
                },
                r => r,
            }
        })
        .await
    }
}

async fn kv_get(store: &kv::Store, key: &str) -> Result<Option<KvEntry>> {
    let entry = store.entry(key.to_string()).await.map_err(other)?;
    Ok(entry.and_then(|e| match e.operation {
        kv::Operation::Put => Some(KvEntry { key: e.key, value: e.value, revision: e.revision }),
        _ => None,
    }))
}

async fn kv_create(store: &kv::Store, key: &str, value: Bytes) -> Result<u64> {
    store.create(key, value).await.map_err(|e| match e.kind() {
        kv::CreateErrorKind::AlreadyExists => BusError::new(BusErrorKind::AlreadyExists, format!("key {key} exists")),
        _ => other(e),
    })
}

async fn kv_update(store: &kv::Store, key: &str, value: Bytes, revision: u64) -> Result<u64> {
    store.update(key, value, revision).await.map_err(|e| match e.kind() {
        kv::UpdateErrorKind::WrongLastRevision => {
            BusError::new(BusErrorKind::WrongRevision, format!("key {key} is not at revision {revision}"))
        }
        _ => other(e),
    })
}

async fn kv_keys(store: &kv::Store) -> Result<Vec<String>> {
    let mut keys: Vec<String> = match store.keys().await {
        Ok(k) => k.filter_map(|k| async move { k.ok() }).collect().await,
        Err(e) => return Err(other(e)),
    };
    keys.sort();
    Ok(keys)
}

fn to_nats_headers(h: &Headers) -> async_nats::HeaderMap {
    let mut m = async_nats::HeaderMap::new();
    for (k, v) in h.iter() {
        m.append(k, v);
    }
    m
}

fn from_nats_message(m: async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(h) = &m.headers {
        for (k, vs) in h.iter() {
            for v in vs {
                headers.append(k.to_string(), v.as_str());
            }
        }
    }
    Message { subject: m.subject.to_string(), reply: m.reply.map(|r| r.to_string()), headers, payload: m.payload }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_out_of_the_url_and_never_show() {
        let (u, up, t) = url_credentials("nats://alice:s%40cret@127.0.0.1:4222");
        assert_eq!(u, "nats://127.0.0.1:4222");
        assert_eq!(up, Some(("alice".into(), "s@cret".into())));
        assert_eq!(t, None);
        let (u, up, t) = url_credentials("tls://tok123@nats.example:4222");
        assert_eq!((u.as_str(), up, t.as_deref()), ("tls://nats.example:4222", None, Some("tok123")));
        assert_eq!(url_credentials("nats://h:4222").0, "nats://h:4222");
        assert_eq!(masked_url("nats://alice:hunter2@h:4222"), "nats://alice:***@h:4222");
        assert_eq!(masked_url("nats://hunter2@h:4222"), "nats://***@h:4222");
        assert_eq!(
            masked_url("nats://alice:hunter2@a:4222,nats://alice:hunter2@b:4222"),
            "nats://alice:***@a:4222,nats://alice:***@b:4222",
            "every server of a list"
        );
    }
}
