//! The injectable clock.
//!
//! Every decision that depends on time (intervals, windows, TTLs, month
//! boundaries) reads a [`Clock`]. In production it is the system clock; in
//! tests and `costmesh simulate` it is a [`VirtualClock`] that only moves
//! when told to, so a month passes in milliseconds.
//!
//! Periodic work uses [`Ticker`], whose deadlines are fixed in advance
//! (start + n * period). A task that is slow to re-arm after a virtual jump
//! still gets every tick, late rather than lost.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

/// Wall-clock time source. Cheap to clone.
#[derive(Clone)]
pub struct Clock(Source);

#[derive(Clone)]
enum Source {
    System,
    Virtual(Arc<VirtualClock>),
    /// Reads `start` at the real instant `epoch`, `speed` times faster than real time.
    Scaled {
        start: DateTime<Utc>,
        epoch: DateTime<Utc>,
        speed: f64,
    },
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(Source::System)
    }

    /// A virtual clock starting at `start`, and the handle that moves it.
    pub fn manual(start: DateTime<Utc>) -> (Self, Arc<VirtualClock>) {
        let v = Arc::new(VirtualClock { state: Mutex::new(State { now: start, timers: BTreeMap::new(), seq: 0 }) });
        (Clock(Source::Virtual(v.clone())), v)
    }

    /// Simulated time that runs by itself, `speed` times faster than real
    /// time, reading `start` at the real instant `epoch`. Processes given
    /// the same three values share one time line (see `[mesh.simulated_clock]`).
    pub fn scaled(start: DateTime<Utc>, epoch: DateTime<Utc>, speed: f64) -> Self {
        Clock(Source::Scaled { start, epoch, speed })
    }

    pub fn is_virtual(&self) -> bool {
        matches!(self.0, Source::Virtual(_))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            Source::System => Utc::now(),
            Source::Virtual(v) => v.now(),
            Source::Scaled { start, epoch, speed } => {
                let real = (Utc::now() - *epoch).num_microseconds().unwrap_or(i64::MAX) as f64;
                *start + chrono::Duration::microseconds((real * speed) as i64)
            }
        }
    }

    /// Sleeps until the clock reads `deadline` (returns at once if it has).
    pub async fn sleep_until(&self, deadline: DateTime<Utc>) {
        match &self.0 {
            Source::System => {
                let d = (deadline - Utc::now()).to_std().unwrap_or_default();
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
            }
            Source::Virtual(v) => v.sleep_until(deadline).await,
            Source::Scaled { speed, .. } => {
                let left = (deadline - self.now()).num_microseconds().unwrap_or(i64::MAX);
                if left > 0 {
                    tokio::time::sleep(Duration::from_micros((left as f64 / speed).ceil() as u64)).await;
                }
            }
        }
    }

    pub async fn sleep(&self, d: Duration) {
        let deadline = self.now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        self.sleep_until(deadline).await
    }

    /// Ticks every `period`, the first tick one period from now.
    pub fn ticker(&self, period: Duration) -> Ticker {
        // A zero period would never let `tick` yield; config validation
        // refuses one, and this keeps a caller's mistake from spinning.
        let period = chrono::Duration::from_std(period.max(Duration::from_millis(1))).unwrap_or(chrono::Duration::MAX);
        Ticker { clock: self.clone(), next: self.now() + period, period }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Source::System => f.write_str("Clock::System"),
            Source::Virtual(v) => write!(f, "Clock::Virtual({})", v.now()),
            Source::Scaled { speed, .. } => write!(f, "Clock::Scaled({}, x{speed})", self.now()),
        }
    }
}

/// Fixed-rate periodic ticks.
pub struct Ticker {
    clock: Clock,
    next: DateTime<Utc>,
    period: chrono::Duration,
}

impl Ticker {
    /// Waits for the next tick and returns the time it was due.
    pub async fn tick(&mut self) -> DateTime<Utc> {
        let due = self.next;
        self.clock.sleep_until(due).await;
        self.next = due + self.period;
        // After a long real stall (laptop sleep) skip missed ticks rather
        // than bursting; on a virtual clock every tick is kept.
        if !self.clock.is_virtual() {
            let now = self.clock.now();
            while self.next <= now {
                self.next += self.period;
            }
        }
        due
    }
}

struct State {
    now: DateTime<Utc>,
    timers: BTreeMap<(DateTime<Utc>, u64), oneshot::Sender<()>>,
    seq: u64,
}

/// A clock that moves only when advanced.
pub struct VirtualClock {
    state: Mutex<State>,
}

impl VirtualClock {
    pub fn now(&self) -> DateTime<Utc> {
        self.state.lock().expect("clock lock").now
    }

    async fn sleep_until(&self, deadline: DateTime<Utc>) {
        let rx = {
            let mut s = self.state.lock().expect("clock lock");
            if deadline <= s.now {
                return;
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let key = (deadline, s.seq);
            s.timers.insert(key, tx);
            rx
        };
        let _ = rx.await;
    }

    /// Moves time forward by `d`, waking each sleeper at its own deadline in
    /// order and letting woken tasks run before moving on.
    pub async fn advance(&self, d: Duration) {
        let target = self.now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        self.advance_to(target).await
    }

    /// Moves time forward to `target` (never backwards).
    pub async fn advance_to(&self, target: DateTime<Utc>) {
        loop {
            let fired = {
                let mut s = self.state.lock().expect("clock lock");
                let due = s.timers.first_key_value().map(|(k, _)| k.0).filter(|t| *t <= target);
                match due {
                    Some(t) => {
                        s.now = s.now.max(t);
                        let mut fired = Vec::new();
                        while let Some(entry) = s.timers.first_entry() {
                            if entry.key().0 > t {
                                break;
                            }
                            fired.push(entry.remove());
                        }
                        fired
                    }
                    None => {
                        s.now = s.now.max(target);
                        Vec::new()
                    }
                }
            };
            if fired.is_empty() {
                settle().await;
                return;
            }
            for tx in fired {
                let _ = tx.send(());
            }
            settle().await;
        }
    }

    /// How many sleepers are waiting (for tests that must know a task has
    /// armed its timer before advancing).
    pub fn sleepers(&self) -> usize {
        self.state.lock().expect("clock lock").timers.len()
    }

    /// Whether some task sleeps until exactly `deadline` (for tests that
    /// wait for a timer to be armed instead of sleeping).
    pub fn has_timer_at(&self, deadline: DateTime<Utc>) -> bool {
        self.state.lock().expect("clock lock").timers.keys().any(|(t, _)| *t == deadline)
    }
}

/// Gives woken tasks a chance to run (and re-arm their timers) before the
/// clock moves again.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
    // Tasks on other worker threads need a moment of real time.
    tokio::time::sleep(Duration::from_micros(200)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn t0() -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_scaled_clock_runs_speed_times_faster_from_its_epoch() {
        let epoch = Utc::now() - chrono::Duration::seconds(2);
        let before = Utc::now();
        let now = Clock::scaled(t0(), epoch, 600.0).now();
        let after = Utc::now();
        assert!(now >= t0() + (before - epoch) * 600 && now <= t0() + (after - epoch) * 600, "{now}");
        assert!(now >= t0() + chrono::Duration::minutes(20));
    }

    #[tokio::test]
    async fn a_month_of_ticks_passes_in_virtual_time() {
        let (clock, handle) = Clock::manual(t0());
        let ticks = Arc::new(AtomicU32::new(0));
        let counted = ticks.clone();
        let mut ticker = clock.ticker(Duration::from_secs(15 * 60));
        tokio::spawn(async move {
            loop {
                ticker.tick().await;
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let started = std::time::Instant::now();
        handle.advance(Duration::from_secs(30 * 24 * 3600)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 30 * 24 * 4);
        assert_eq!(clock.now(), t0() + chrono::Duration::days(30));
        assert!(started.elapsed() < Duration::from_secs(30), "virtual month took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn sleepers_wake_in_deadline_order() {
        let (clock, handle) = Clock::manual(t0());
        let order = Arc::new(Mutex::new(Vec::new()));
        for (i, secs) in [(1, 30u64), (2, 10), (3, 20)] {
            let (c, o) = (clock.clone(), order.clone());
            tokio::spawn(async move {
                c.sleep(Duration::from_secs(secs)).await;
                o.lock().unwrap().push((i, c.now()));
            });
        }
        while handle.sleepers() < 3 {
            tokio::task::yield_now().await;
        }
        handle.advance(Duration::from_secs(25)).await;
        let seen = order.lock().unwrap().clone();
        assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(seen[0].1, t0() + chrono::Duration::seconds(10));
        assert_eq!(clock.now(), t0() + chrono::Duration::seconds(25));
    }
}
