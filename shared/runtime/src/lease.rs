//! One active instance among several: a lease in JetStream KV.
//!
//! The scheduler and the cost-watcher decide things that must be decided
//! once, so of the instances started for one prefix exactly one acts. Each
//! instance runs a [`Lease`] on the key `<service>` of the bucket
//! `<PREFIX>_<service>_lease` (`-` as `_`):
//!
//! - The holder renews it every `ttl / 3` with compare-and-set on the
//!   revision it last wrote. Its lease is good until `ttl * 4 / 5` after it
//!   *sent* its last renewal that was answered; past that it stops acting,
//!   answered or not (a partitioned holder steps down on its own).
//! - A standby reads the key every `ttl / 6`. When the revision it sees has
//!   not changed for a whole `ttl` of its own monotonic time, it takes the
//!   lease over with compare-and-set on that revision. It first saw that
//!   revision after the holder sent it, so the holder's lease ended at least
//!   `ttl / 5` earlier: two instances never act at once, whatever their wall
//!   clocks say (only the rate of their clocks matters).
//! - Every takeover raises the lease's **term** by one. What the holder
//!   writes carries its term (the `costmesh-lease-term` header on events);
//!   a write by an instance whose lease ended is refused before it leaves
//!   ([`Fence::check`]), and the KV state a holder writes is compare-and-set,
//!   so a write from a deposed holder that was already on its way lands on a
//!   revision the new holder has moved past and is refused by the server.
//! - An instance that shuts down cleanly writes the lease as released, so
//!   a standby takes over at its next read instead of after a `ttl`.
//!
//! Leases run on real (monotonic) time, not the mesh clock: they measure
//! whether a process is alive, and a simulated month passes in seconds.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use costmesh_bus::{BusErrorKind, Kv};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::service::ServiceContext;

/// What the lease key holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The holding instance; empty once released.
    pub holder: String,
    /// Goes up by one at each takeover.
    pub term: u64,
    /// The holder's TTL, for people reading the bucket.
    pub ttl_ms: u64,
}

/// What this instance is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The first read of the lease has not been answered yet.
    Starting,
    /// This instance holds the lease at `term` and acts.
    Active { term: u64 },
    /// Another instance (`holder`, empty when none) holds it at `term`.
    Standby { holder: String, term: u64 },
}

impl Role {
    pub fn describe(&self) -> String {
        match self {
            Role::Starting => "starting".into(),
            Role::Active { term } => format!("active (term {term})"),
            Role::Standby { holder, term } if holder.is_empty() => format!("standby (lease free, term {term})"),
            Role::Standby { holder, term } => format!("standby (active: {holder}, term {term})"),
        }
    }
}

/// Until when this instance may act, and at which term.
#[derive(Debug, Default)]
struct Held {
    term: u64,
    until: Option<Instant>,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service}: the lease of term {term} is no longer held by this instance; write refused")]
pub struct Deposed {
    pub service: String,
    pub term: u64,
}

/// The check every write of an active instance passes: its lease, at the
/// term it became active with, is still good.
#[derive(Clone, Debug)]
pub struct Fence {
    service: String,
    term: u64,
    held: Arc<Mutex<Held>>,
    refused: Counter,
}

impl Fence {
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Ok while the lease is held at this fence's term and has not run out.
    pub fn check(&self) -> Result<u64, Deposed> {
        let h = self.held.lock().expect("lease lock");
        if h.term == self.term && h.until.is_some_and(|u| Instant::now() < u) {
            return Ok(self.term);
        }
        drop(h);
        self.refused.inc();
        Err(Deposed { service: self.service.clone(), term: self.term })
    }
}

/// `[mesh.lease]` timing.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ttl: Duration,
}

impl Timing {
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }
    fn valid_for(&self) -> Duration {
        self.ttl * 4 / 5
    }
    fn poll_every(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(50))
    }
    /// How long one KV call of the lease may take before it is given up
    /// and tried again.
    fn attempt(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(100))
    }
    /// The pause between two tries of a renewal.
    fn pause(&self) -> Duration {
        (self.ttl / 40).max(Duration::from_millis(25))
    }
}

/// How a renewal ended.
enum Renewal {
    Done(u64),
    /// Another instance holds it (what it holds, if read).
    TakenOver(Option<LeaseValue>),
    /// Not answered before the lease ran out (the last error).
    RanOut(String),
}

/// The lease metrics of one service.
#[derive(Clone, Default)]
struct Metrics {
    active: Gauge,
    term: Gauge,
    takeovers: Counter,
    refused: Counter,
}

/// One instance's side of a service's lease.
pub struct Lease {
    kv: Kv,
    key: String,
    instance: String,
    timing: Timing,
    held: Arc<Mutex<Held>>,
    role: watch::Sender<Role>,
    metrics: Metrics,
}

impl Lease {
    /// The lease of `service` in `kv`, for the instance named `instance`.
    pub fn new(kv: Kv, service: &str, instance: &str, timing: Timing) -> Self {
        Self {
            kv,
            key: service.to_string(),
            instance: instance.to_string(),
            timing,
            held: Default::default(),
            role: watch::channel(Role::Starting).0,
            metrics: Metrics::default(),
        }
    }

    pub fn roles(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// The fence of the current term (meaningful while active).
    pub fn fence(&self) -> Fence {
        Fence {
            service: self.key.clone(),
            term: self.held.lock().expect("lease lock").term,
            held: self.held.clone(),
            refused: self.metrics.refused.clone(),
        }
    }

    fn value(&self, holder: &str, term: u64) -> Bytes {
        let v = LeaseValue { holder: holder.to_string(), term, ttl_ms: self.timing.ttl.as_millis() as u64 };
        Bytes::from(serde_json::to_vec(&v).expect("lease value serialises"))
    }

    fn set_role(&self, role: Role) {
        if *self.role.borrow() != role {
            tracing::info!(lease = %self.key, instance = %self.instance, role = %role.describe(), "lease role");
        }
        self.metrics.active.set(matches!(role, Role::Active { .. }) as i64);
        if let Role::Active { term } | Role::Standby { term, .. } = &role {
            self.metrics.term.set(*term as i64);
        }
        self.role.send_replace(role);
    }

    fn step_down(&self, holder: String, term: u64) {
        self.held.lock().expect("lease lock").until = None;
        self.set_role(Role::Standby { holder, term });
    }

    /// Holds, renews and takes over the lease until `shutdown`; then
    /// releases it if held.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Standby: the revision seen and since when (own monotonic time).
        let mut seen: Option<(u64, Instant)> = None;
        // Active: the revision last written.
        let mut revision = 0u64;
        loop {
            let active = matches!(*self.role.borrow(), Role::Active { .. });
            let wait = if active {
                let (term, until) = {
                    let h = self.held.lock().expect("lease lock");
                    (h.term, h.until.unwrap_or_else(Instant::now))
                };
                let sent = Instant::now();
                // A renewal not answered before the lease runs out is as
                // good as refused: the holder stops acting on time even
                // when the server cannot be reached.
                match self.renew(term, revision, until).await {
                    Renewal::Done(rev) => {
                        revision = rev;
                        // From the first try's sending: a later try, or an
                        // earlier one that landed unanswered, was sent after.
                        self.held.lock().expect("lease lock").until = Some(sent + self.timing.valid_for());
                    }
                    Renewal::TakenOver(now) => {
                        tracing::warn!(lease = %self.key, "lease taken over by another instance; standing by");
                        let (holder, t) = now.map(|v| (v.holder, v.term)).unwrap_or_default();
                        self.step_down(holder, t);
                        seen = None;
                        continue;
                    }
                    Renewal::RanOut(why) => {
                        tracing::warn!(lease = %self.key, error = %why, "lease ran out unrenewed; standing by");
                        self.step_down(String::new(), term);
                        seen = None;
                        continue;
                    }
                }
                let until = self.held.lock().expect("lease lock").until.unwrap_or_else(Instant::now);
                (sent + self.timing.renew_every()).min(until)
            } else {
                match self.read().await {
                    Ok(None) => {
                        if let Ok(rev) =
                            self.bounded(self.kv.create_once(&self.key, self.value(&self.instance, 1))).await
                        {
                            revision = rev;
                            self.activate(1, Instant::now());
                            continue;
                        }
                    }
                    Ok(Some((v, rev))) => {
                        let since = match seen {
                            Some((r, at)) if r == rev => at,
                            _ => {
                                seen = Some((rev, Instant::now()));
                                Instant::now()
                            }
                        };
                        let free = v.holder.is_empty() || v.holder == self.instance;
                        if free || since.elapsed() >= self.timing.ttl {
                            let sent = Instant::now();
                            let take = self.kv.update_once(&self.key, self.value(&self.instance, v.term + 1), rev);
                            match self.bounded(take).await {
                                Ok(new) => {
                                    revision = new;
                                    if !free {
                                        tracing::warn!(lease = %self.key, from = %v.holder, "lease expired: taking over");
                                    }
                                    self.activate(v.term + 1, sent);
                                    continue;
                                }
                                Err(e) => tracing::debug!(lease = %self.key, error = %e, "takeover lost the race"),
                            }
                        } else {
                            self.set_role(Role::Standby { holder: v.holder, term: v.term });
                        }
                    }
                    Err(e) => tracing::debug!(lease = %self.key, error = %e, "lease not read"),
                }
                Instant::now() + self.timing.poll_every()
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wait) => {}
            }
        }
        let role = self.role.borrow().clone();
        if let Role::Active { term } = role {
            self.held.lock().expect("lease lock").until = None;
            match self.bounded(self.kv.update_once(&self.key, self.value("", term), revision)).await {
                Ok(_) => tracing::info!(lease = %self.key, term, "lease released"),
                Err(e) => {
                    tracing::warn!(lease = %self.key, error = %e, "lease not released; a standby takes over when it expires")
                }
            }
        }
        self.metrics.active.set(0);
    }

    fn activate(&self, term: u64, sent: Instant) {
        *self.held.lock().expect("lease lock") = Held { term, until: Some(sent + self.timing.valid_for()) };
        self.metrics.takeovers.inc();
        self.set_role(Role::Active { term });
    }

    /// Renews the lease at `term` from `revision`: single tries, each
    /// bounded by [`Timing::attempt`], again and again until `until`. (A
    /// KV call that waits through a leader election could outlast the
    /// lease by itself.)
    async fn renew(&self, term: u64, revision: u64, until: Instant) -> Renewal {
        let value = self.value(&self.instance, term);
        let mut why = "no answer".to_string();
        loop {
            let now = Instant::now();
            if now >= until {
                return Renewal::RanOut(why);
            }
            let deadline = (now + self.timing.attempt()).min(until);
            let (key, v) = (&self.key, value.clone());
            match tokio::time::timeout_at(deadline, self.kv.update_once(key, v, revision)).await {
                Ok(Ok(rev)) => return Renewal::Done(rev),
                Ok(Err(e)) if e.kind == BusErrorKind::WrongRevision => {
                    // Someone wrote after `revision`: an earlier try of ours
                    // whose answer was lost (the value is ours: no one else
                    // writes this holder and term), or a new holder.
                    match tokio::time::timeout_at(deadline, self.kv.get_once(key)).await {
                        Ok(Ok(Some(en))) if en.value == value && en.revision > revision => {
                            return Renewal::Done(en.revision);
                        }
                        Ok(Ok(en)) => {
                            return Renewal::TakenOver(en.and_then(|e| serde_json::from_slice(&e.value).ok()))
                        }
                        Ok(Err(e)) => why = e.to_string(),
                        Err(_) => why = "lease not read back in time".into(),
                    }
                }
                Ok(Err(e)) => why = e.to_string(),
                Err(_) => why = format!("no answer within {:?}", deadline - now),
            }
            tracing::debug!(lease = %self.key, error = %why, "lease not renewed; trying again");
            tokio::time::sleep_until((Instant::now() + self.timing.pause()).min(until)).await;
        }
    }

    /// One KV call of the lease, given up after [`Timing::attempt`].
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, costmesh_bus::BusError>>,
    ) -> Result<T, costmesh_bus::BusError> {
        tokio::time::timeout(self.timing.attempt(), call)
            .await
            .unwrap_or_else(|_| Err(costmesh_bus::BusError::new(BusErrorKind::TimedOut, "no answer")))
    }

    async fn read(&self) -> Result<Option<(LeaseValue, u64)>, costmesh_bus::BusError> {
        Ok(self.bounded(self.kv.get_once(&self.key)).await?.map(|e| {
            match serde_json::from_slice::<LeaseValue>(&e.value) {
                Ok(v) => (v, e.revision),
                Err(err) => {
                    // Not ours to interpret: treat it as held (a person may be
                    // looking at it); it is taken over once it stops changing.
                    tracing::warn!(error = %err, "lease value unreadable");
                    (LeaseValue { holder: "<unreadable>".into(), ..Default::default() }, e.revision)
                }
            }
        }))
    }
}

/// A name for this instance: host, process id and a random tail.
pub fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "host".into());
    let tail = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &tail[tail.len() - 6..])
}

/// Runs `body` whenever this instance holds `service`'s lease, with a
/// context whose shutdown fires when the lease is lost and whose writes are
/// fenced by it; stands by in between. Returns when `ctx` shuts down, or
/// with the body's error when it fails while still holding the lease (a
/// failure after losing it is the loss, and the instance stands by again).
pub async fn run_when_active<F, Fut>(ctx: ServiceContext, service: &str, body: F) -> anyhow::Result<()>
where
    F: Fn(ServiceContext) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let timing = Timing { ttl: ctx.mesh.lease.ttl };
    // Its own bucket (`<PREFIX>_scheduler_lease`): a service's NATS user
    // may write only its own buckets, so none can touch another's lease.
    let bucket = crate::service::kv_bucket(ctx.subjects(), &format!("{}_lease", service.replace('-', "_")));
    let kv = ctx.bus().kv(&bucket).await?;
    let instance = instance_name();
    let lease = Arc::new(Lease::new(kv, service, &instance, timing));
    let m = &lease.metrics;
    ctx.register("costmesh_lease_active", "1 while this instance holds its service's lease and acts", m.active.clone());
    ctx.register("costmesh_lease_term", "The lease's term as this instance last saw it", m.term.clone());
    ctx.register("costmesh_lease_takeovers", "Times this instance became the active one", m.takeovers.clone());
    ctx.register(
        "costmesh_lease_refused_writes",
        "Writes refused because this instance's lease had ended",
        m.refused.clone(),
    );
    let mut roles = lease.roles();
    {
        let roles = lease.roles();
        ctx.health.describe("lease", move || roles.borrow().describe());
    }
    tracing::info!(service, instance, ttl = ?timing.ttl, "waiting for the lease");
    let stop = CancellationToken::new();
    // Dropped before the end (its task aborted): the holder stops too.
    let _stop_on_drop = stop.clone().drop_guard();
    let holder = tokio::spawn(lease.clone().run(stop.clone()));
    let outcome = loop {
        // Wait until active (or shutdown).
        let term = loop {
            if let Role::Active { term } = *roles.borrow_and_update() {
                break Some(term);
            }
            if !matches!(*roles.borrow(), Role::Starting) {
                // A standby is ready: it is connected and waits.
                ctx.health.set("lease", true);
                ctx.health.set("bus", true);
            }
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break None,
                r = roles.changed() => if r.is_err() { break None },
            }
        };
        let Some(term) = term else { break Ok(()) };
        // Active: ready once the body is (it marks the bus ready when its
        // subscriptions are in place).
        ctx.health.set("lease", true);
        ctx.health.set("bus", false);
        let fence = lease.fence();
        debug_assert_eq!(fence.term(), term);
        let lost = ctx.shutdown.child_token();
        let mut watch = lease.roles();
        let watcher = {
            let lost = lost.clone();
            tokio::spawn(async move {
                while watch.changed().await.is_ok() {
                    if *watch.borrow() != (Role::Active { term }) {
                        break;
                    }
                }
                lost.cancel();
            })
        };
        let mut active = ctx.clone();
        active.shutdown = lost.clone();
        active.events.fence = Some(fence.clone());
        tracing::info!(service, term, "active: acting");
        let r = body(active).await;
        watcher.abort();
        if ctx.shutdown.is_cancelled() || !lost.is_cancelled() {
            // Shut down, or ended on its own while holding the lease.
            break r;
        }
        match r {
            Err(e) => tracing::warn!(service, term, error = %e, "stopped acting: the lease was lost"),
            Ok(()) => tracing::info!(service, term, "stopped acting: the lease was lost"),
        }
    };
    // Released only now: the body's last writes went out under the lease.
    stop.cancel();
    let _ = holder.await;
    outcome
}
