//! Inference cost per route and tenant, and what the cache saved.
//!
//! The gateway reports cumulative counters per route and tenant since it
//! started (`CacheStats`); the ledger books their growth. A route's backend
//! cost is its price per backend call plus its price per backend-second
//! (`[cost_watcher.routes.<route>]`). The cache saved what the answers it
//! gave (hits and stale answers) would have cost at the backend: each at
//! the price of one call plus the route's mean backend time per call this
//! month.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use costmesh_contracts::v1::RouteStats;
use serde::{Deserialize, Serialize};

use crate::attribution::Carry;

/// A route's price, in ledger micros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutePrice {
    pub per_call_micros: u64,
    pub per_backend_second_micros: u64,
}

/// What one route and tenant did and cost in one month.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteBook {
    pub requests: u64,
    pub hits: u64,
    pub stale: u64,
    pub misses: u64,
    pub backend_calls: u64,
    pub backend_ms: u64,
    pub cost_micros: i64,
    pub saved_micros: i64,
    time_carry: Carry,
}

impl RouteBook {
    /// Adds `o`'s counts and money (not its carried remainder).
    pub fn add(&mut self, o: &RouteBook) {
        self.requests += o.requests;
        self.hits += o.hits;
        self.stale += o.stale;
        self.misses += o.misses;
        self.backend_calls += o.backend_calls;
        self.backend_ms += o.backend_ms;
        self.cost_micros += o.cost_micros;
        self.saved_micros += o.saved_micros;
    }
}

impl From<&Seen> for RouteBook {
    /// The counts of a report's growth, no money yet.
    fn from(d: &Seen) -> Self {
        RouteBook {
            requests: d.requests,
            hits: d.hits,
            stale: d.stale,
            misses: d.misses,
            backend_calls: d.backend_calls,
            backend_ms: d.backend_ms,
            ..Default::default()
        }
    }
}

/// Counters of one gateway instance, route and tenant as last seen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    started: i64,
    requests: u64,
    hits: u64,
    stale: u64,
    misses: u64,
    backend_calls: u64,
    backend_ms: u64,
    at: Option<DateTime<Utc>>,
}

/// Inference books: period -> route -> tenant ("" anonymous) -> book.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inference {
    pub periods: BTreeMap<String, BTreeMap<String, BTreeMap<String, RouteBook>>>,
    /// "instance route tenant" -> counters last seen.
    seen: BTreeMap<String, Seen>,
}

/// Growth of a cumulative counter (a new start counts from zero).
fn grew(same_start: bool, now: u64, before: u64) -> u64 {
    if same_start {
        now.saturating_sub(before)
    } else {
        now
    }
}

impl Inference {
    /// Books one gateway report: the growth of every route and tenant's
    /// counters since that gateway's last report.
    pub fn book(
        &mut self,
        period: &str,
        instance: &str,
        started: i64,
        routes: &[RouteStats],
        prices: &BTreeMap<String, RoutePrice>,
        now: DateTime<Utc>,
    ) -> bool {
        let mut changed = false;
        for r in routes {
            let key = format!("{instance} {} {}", r.route, r.tenant);
            let prev = self.seen.get(&key).cloned();
            let same = prev.as_ref().is_some_and(|p| p.started == started);
            let p = prev.unwrap_or_default();
            let d = Seen {
                started,
                requests: grew(same, r.requests, p.requests),
                hits: grew(same, r.hits, p.hits),
                stale: grew(same, r.stale, p.stale),
                misses: grew(same, r.misses, p.misses),
                backend_calls: grew(same, r.backend_calls, p.backend_calls),
                backend_ms: grew(same, r.backend_time_ms, p.backend_ms),
                at: None,
            };
            // A late, older report of the same start moves nothing back.
            if !same || r.requests >= p.requests {
                self.seen.insert(
                    key,
                    Seen {
                        started,
                        requests: r.requests,
                        hits: r.hits,
                        stale: r.stale,
                        misses: r.misses,
                        backend_calls: r.backend_calls,
                        backend_ms: r.backend_time_ms,
                        at: Some(now),
                    },
                );
            }
            if d.requests == 0 && d.backend_calls == 0 && d.backend_ms == 0 {
                continue;
            }
            changed = true;
            let price = prices.get(&r.route).copied().unwrap_or_default();
            let route = self.periods.entry(period.to_string()).or_default().entry(r.route.clone()).or_default();
            let b = route.entry(r.tenant.clone()).or_default();
            b.add(&RouteBook::from(&d));
            let time_cost = b.time_carry.take(d.backend_ms, price.per_backend_second_micros, 1000);
            b.cost_micros += (d.backend_calls * price.per_call_micros + time_cost) as i64;
            // The route's mean backend time per call this month, all tenants.
            let (calls, ms) = route.values().fold((0u64, 0u64), |(c, m), b| (c + b.backend_calls, m + b.backend_ms));
            let mean_s = if calls > 0 { ms as f64 / 1000.0 / calls as f64 } else { 0.0 };
            let avoided = price.per_call_micros as f64 + price.per_backend_second_micros as f64 * mean_s;
            let b = route.get_mut(&r.tenant).expect("just made");
            b.saved_micros += ((d.hits + d.stale) as f64 * avoided).round() as i64;
        }
        changed
    }

    /// Forgets counters of gateways not heard from since `before`.
    pub fn forget_seen_before(&mut self, before: DateTime<Utc>) {
        self.seen.retain(|_, s| s.at.is_none_or(|at| at >= before));
    }

    /// Keeps the newest `keep` months.
    pub fn keep_months(&mut self, keep: usize) {
        while self.periods.len() > keep {
            self.periods.pop_first();
        }
    }

    /// `period`'s books.
    pub fn period(&self, period: &str) -> impl Iterator<Item = (&String, &String, &RouteBook)> {
        self.periods
            .get(period)
            .into_iter()
            .flat_map(|r| r.iter())
            .flat_map(|(route, t)| t.iter().map(move |(tenant, b)| (route, tenant, b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(tenant: &str, requests: u64, hits: u64, calls: u64, ms: u64) -> RouteStats {
        RouteStats {
            route: "llm".into(),
            tenant: tenant.into(),
            requests,
            hits,
            misses: requests - hits,
            backend_calls: calls,
            backend_time_ms: ms,
            ..Default::default()
        }
    }

    #[test]
    fn growth_is_booked_once_and_savings_price_the_avoided_calls() {
        let mut i = Inference::default();
        let prices = BTreeMap::from([(
            "llm".to_string(),
            RoutePrice { per_call_micros: 2_000, per_backend_second_micros: 10_000 },
        )]);
        let now = Utc::now();
        i.book("2026-12", "gw1", 100, &[stats("a", 10, 6, 4, 2_000)], &prices, now);
        i.book("2026-12", "gw1", 100, &[stats("a", 10, 6, 4, 2_000)], &prices, now); // the same report again
        let b = &i.periods["2026-12"]["llm"]["a"];
        // 4 calls x 2000 + 2 s x 10000 = 28000; 6 answers x (2000 + 0.5 s x 10000) = 42000.
        assert_eq!((b.requests, b.backend_calls, b.cost_micros, b.saved_micros), (10, 4, 28_000, 42_000));
        // The gateway restarted: its counters start again from zero.
        i.book("2026-12", "gw1", 200, &[stats("a", 3, 3, 0, 0)], &prices, now);
        let b = &i.periods["2026-12"]["llm"]["a"];
        assert_eq!((b.requests, b.hits, b.cost_micros), (13, 9, 28_000));
        assert_eq!(b.saved_micros, 42_000 + 3 * 7_000);
    }
}
