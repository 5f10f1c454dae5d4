//! Cost attribution: every energy delta, every GPU-second and every second
//! of a cloud node's time is booked to the job attempt that held the GPU
//! (the sample says which, from the agent's own job table), or to the
//! node's idle row ([`IDLE`], OpenCost's `__idle__`) when none did.
//!
//! The rules are pure functions over [`Attribution`], which lives in the
//! ledger [`crate::ledger::State`] and is saved with the energy counters it
//! was booked from, so a restart books exactly the growth since the save.
//!
//! Exactness: amounts are integers (mJ, ms, micros, mg). Money and carbon
//! come from a rate times a quantity; each node keeps the exact remainder
//! of that product ([`Carry`]), so the units booked to a node's rows add up
//! to the node's total *exactly*, however the deltas fall.
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The row of a node's GPU time that no job held.
pub const IDLE: &str = "__idle__";
/// The team of a job submitted without one.
pub const UNASSIGNED_TEAM: &str = "__unassigned__";
/// The row that reconciles cloud node time with the GCP bill.
pub const UNEXPLAINED_CLOUD: &str = "__unexplained_cloud__";

/// mJ in a kWh.
const MJ_PER_KWH: u128 = 3_600_000_000;
/// ms in an hour.
const MS_PER_HOUR: u128 = 3_600_000;

/// What a row has been booked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub energy_mj: u64,
    /// GPU time held, in milliseconds.
    pub gpu_ms: u64,
    pub electricity_micros: i64,
    /// Cloud node time at its hourly price.
    pub cloud_micros: i64,
    pub carbon_mg: u64,
}

impl Amounts {
    pub fn add(&mut self, o: &Amounts) {
        self.energy_mj += o.energy_mj;
        self.gpu_ms += o.gpu_ms;
        self.electricity_micros += o.electricity_micros;
        self.cloud_micros += o.cloud_micros;
        self.carbon_mg += o.carbon_mg;
    }

    /// Electricity plus cloud node time.
    pub fn cost_micros(&self) -> i64 {
        self.electricity_micros + self.cloud_micros
    }

    pub fn is_zero(&self) -> bool {
        *self == Amounts::default()
    }
}

/// The exact remainder of `quantity x rate / divisor` conversions: the units
/// handed out are `floor(sum of exact products / divisor)`, never more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    /// Remainder below one unit, in units of 1/divisor (as a decimal string:
    /// JSON numbers stop being exact above 2^53).
    #[serde(with = "u128_string")]
    rem: u128,
    /// The divisor the remainder is in (a change drops the remainder).
    #[serde(with = "u128_string")]
    divisor: u128,
}

impl Carry {
    /// Converts `quantity x rate / divisor` into whole units, carrying the rest.
    pub fn take(&mut self, quantity: u64, rate: u64, divisor: u128) -> u64 {
        if self.divisor != divisor {
            self.divisor = divisor;
            self.rem = 0;
        }
        let num = self.rem + quantity as u128 * rate as u128;
        self.rem = num % divisor;
        (num / divisor).min(u64::MAX as u128) as u64
    }
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One node's book for one month.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeBook {
    pub cloud: bool,
    pub preemptible: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_type: String,
    /// Everything booked on the node; the rows add up to it exactly.
    pub total: Amounts,
    /// Job id (or [`IDLE`]) -> what it was booked on this node.
    pub rows: BTreeMap<String, Amounts>,
    electricity: Carry,
    carbon: Carry,
    cloud_time: Carry,
}

/// How a job ended (the scheduler's terminal decision).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// `JOB_EVENT_KIND_EXITED`, `_FAILED` or `_CANCELLED`.
    pub kind: String,
    pub at: DateTime<Utc>,
    /// `traceparent` of the handling of that event: the `JobCost` joins the job's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// One job over its whole life: every attempt, node and month.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub team: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub attempts: BTreeSet<u32>,
    pub nodes: BTreeSet<String>,
    pub total: Amounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// Its `JobCost` event: saved as pending before it is published, then
    /// marked sent; the event id is fixed by the job, so a crash between
    /// the two re-publishes the same id and JetStream drops the repeat.
    #[serde(default)]
    pub cost_event: CostEvent,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostEvent {
    #[default]
    NotYet,
    Pending,
    Sent,
}

impl JobRecord {
    /// The team its cost is reported under.
    pub fn team_or_unassigned(&self) -> &str {
        if self.team.is_empty() {
            UNASSIGNED_TEAM
        } else {
            &self.team
        }
    }
}

/// Attributed cost, per month and node, and per job over its life.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// period -> node -> book.
    pub periods: BTreeMap<String, BTreeMap<String, NodeBook>>,
    pub jobs: BTreeMap<String, JobRecord>,
    /// Months a rollover closed (their rows are final).
    #[serde(default)]
    pub closed: BTreeSet<String>,
}

/// A node's hourly price, shared by the GPUs the agent samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloudRate {
    pub micros_per_hour: u64,
    pub gpus: u32,
}

/// The job attempt a sample names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub team: &'a str,
}

/// What one sample adds: its energy growth and the time since the GPU's
/// previous sample, both booked to the holder the sample names (the one
/// that held the GPU as the interval ended).
#[derive(Clone, Copy, Debug)]
pub struct Delta<'a> {
    pub period: &'a str,
    pub node: &'a str,
    pub holder: Option<Holder<'a>>,
    pub energy_mj: u64,
    pub gpu_ms: u64,
    /// Electricity price when the energy was reported (micros per kWh).
    pub price_micros_per_kwh: u64,
    /// Grid intensity then (mg CO2e per kWh).
    pub carbon_mg_per_kwh: u64,
    /// Set for a cloud node: its time is booked at this price.
    pub cloud: Option<CloudRate>,
    pub preemptible: bool,
    pub machine_type: &'a str,
}

impl Attribution {
    /// Books one sample's delta; returns what was booked.
    pub fn book(&mut self, d: &Delta) -> Amounts {
        let node = self.periods.entry(d.period.to_string()).or_default().entry(d.node.to_string()).or_default();
        node.cloud = d.cloud.is_some();
        node.preemptible = d.preemptible;
        if !d.machine_type.is_empty() && node.machine_type != d.machine_type {
            node.machine_type = d.machine_type.to_string();
        }
        let cloud_micros = match d.cloud {
            Some(r) => node.cloud_time.take(d.gpu_ms, r.micros_per_hour, MS_PER_HOUR * r.gpus.max(1) as u128),
            None => 0,
        };
        let a = Amounts {
            energy_mj: d.energy_mj,
            gpu_ms: d.gpu_ms,
            electricity_micros: node.electricity.take(d.energy_mj, d.price_micros_per_kwh, MJ_PER_KWH) as i64,
            cloud_micros: cloud_micros as i64,
            carbon_mg: node.carbon.take(d.energy_mj, d.carbon_mg_per_kwh, MJ_PER_KWH),
        };
        if a.is_zero() && d.holder.is_none() {
            return a;
        }
        node.total.add(&a);
        let row = d.holder.map_or(IDLE, |h| h.job_id);
        node.rows.entry(row.to_string()).or_default().add(&a);
        if let Some(h) = d.holder {
            let job = self.jobs.entry(h.job_id.to_string()).or_default();
            if job.team.is_empty() && !h.team.is_empty() {
                job.team = h.team.to_string();
            }
            job.attempts.insert(h.attempt);
            job.nodes.insert(d.node.to_string());
            job.total.add(&a);
        }
        a
    }

    /// What the scheduler said of a job: its team and labels, and its end.
    pub fn job_event(
        &mut self,
        job_id: &str,
        team: &str,
        labels: &BTreeMap<String, String>,
        attempt: u32,
        ended: Option<Ended>,
    ) {
        let job = self.jobs.entry(job_id.to_string()).or_default();
        if !team.is_empty() {
            job.team = team.to_string();
        }
        if !labels.is_empty() {
            job.labels = labels.clone();
        }
        if attempt > 0 && ended.is_none() {
            // Assigned attempts count even if they never ran long enough to be sampled.
            job.attempts.insert(attempt);
        }
        if job.ended.is_none() {
            job.ended = ended;
        }
    }

    /// Jobs that ended at least `settle` before `now` and whose `JobCost`
    /// has not gone out: marked pending (save, then publish).
    pub fn due_job_costs(&mut self, now: DateTime<Utc>, settle: chrono::Duration) -> Vec<String> {
        let mut due = Vec::new();
        for (id, j) in &mut self.jobs {
            if let Some(e) = &j.ended {
                if j.cost_event != CostEvent::Sent && e.at + settle <= now {
                    j.cost_event = CostEvent::Pending;
                    due.push(id.clone());
                }
            }
        }
        due
    }

    /// Closes `period` (its rows are final) and forgets what no report
    /// needs: months beyond `keep_months`, and jobs whose cost went out and
    /// that booked nothing in a month still kept.
    pub fn close(&mut self, period: &str, keep_months: usize) {
        self.closed.insert(period.to_string());
        while self.periods.len() > keep_months {
            let Some(oldest) = self.periods.keys().next().cloned() else { break };
            self.periods.remove(&oldest);
            self.closed.remove(&oldest);
        }
        let live: BTreeSet<&String> =
            self.periods.values().flat_map(|n| n.values()).flat_map(|b| b.rows.keys()).collect();
        let gone: Vec<String> = self
            .jobs
            .iter()
            .filter(|(id, j)| j.cost_event == CostEvent::Sent && !live.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.jobs.remove(&id);
        }
    }

    /// Every node's book for `period`.
    pub fn nodes(&self, period: &str) -> impl Iterator<Item = (&String, &NodeBook)> {
        self.periods.get(period).into_iter().flat_map(|n| n.iter())
    }

    /// `period`'s amounts per job (summed over nodes), with [`IDLE`] as one row.
    pub fn by_job(&self, period: &str) -> BTreeMap<String, (Amounts, BTreeSet<String>)> {
        let mut out: BTreeMap<String, (Amounts, BTreeSet<String>)> = BTreeMap::new();
        for (node, book) in self.nodes(period) {
            for (row, a) in &book.rows {
                let e = out.entry(row.clone()).or_default();
                e.0.add(a);
                e.1.insert(node.clone());
            }
        }
        out
    }

    /// `period`'s amounts per team ([`IDLE`] for idle time).
    pub fn by_team(&self, period: &str) -> BTreeMap<String, Amounts> {
        let mut out: BTreeMap<String, Amounts> = BTreeMap::new();
        for (row, (a, _)) in self.by_job(period) {
            let team = if row == IDLE {
                IDLE.to_string()
            } else {
                self.jobs.get(&row).map_or(UNASSIGNED_TEAM, |j| j.team_or_unassigned()).to_string()
            };
            out.entry(team).or_default().add(&a);
        }
        out
    }

    /// Cloud node time booked in `period`, all nodes.
    pub fn cloud_booked(&self, period: &str) -> i64 {
        self.nodes(period).map(|(_, b)| b.total.cloud_micros).sum()
    }

    /// GPU time held by jobs and in all, in `period` (ms).
    pub fn gpu_ms(&self, period: &str) -> (u64, u64) {
        self.nodes(period).fold((0, 0), |(held, all), (_, b)| {
            let idle = b.rows.get(IDLE).map_or(0, |a| a.gpu_ms);
            (held + b.total.gpu_ms - idle, all + b.total.gpu_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta<'a>(node: &'a str, job: Option<&'a str>, energy_mj: u64, gpu_ms: u64) -> Delta<'a> {
        Delta {
            period: "2026-12",
            node,
            holder: job.map(|j| Holder { job_id: j, attempt: 1, team: "vision" }),
            energy_mj,
            gpu_ms,
            price_micros_per_kwh: 2_600_000,
            carbon_mg_per_kwh: 494_000,
            cloud: None,
            preemptible: false,
            machine_type: "",
        }
    }

    #[test]
    fn rows_add_up_to_the_node_total_exactly_however_the_deltas_fall() {
        let mut a = Attribution::default();
        // Deltas that each convert to a fraction of a micro.
        let mut booked = 0i64;
        for i in 0..1_000u64 {
            let job = match i % 3 {
                0 => Some("j1"),
                1 => Some("j2"),
                _ => None,
            };
            booked += a.book(&delta("n1", job, 1_234 + i, 5_000)).electricity_micros;
        }
        let book = &a.periods["2026-12"]["n1"];
        let sum = |f: fn(&Amounts) -> i64| book.rows.values().map(f).sum::<i64>();
        assert_eq!(sum(|r| r.electricity_micros), book.total.electricity_micros);
        assert_eq!(sum(|r| r.energy_mj as i64), book.total.energy_mj as i64);
        assert_eq!(sum(|r| r.carbon_mg as i64), book.total.carbon_mg as i64);
        assert_eq!(booked, book.total.electricity_micros);
        // The node's money is the exact product, rounded down once.
        let exact = book.total.energy_mj as u128 * 2_600_000 / MJ_PER_KWH;
        assert_eq!(book.total.electricity_micros as u128, exact);
        assert!(book.rows.contains_key(IDLE));
    }

    #[test]
    fn cloud_time_is_shared_by_the_gpus_of_the_node() {
        let mut a = Attribution::default();
        let rate = CloudRate { micros_per_hour: 43_000_000, gpus: 2 };
        // GPU 0 held by j1 for an hour, GPU 1 idle for the same hour.
        for job in [Some("j1"), None] {
            let mut d = delta("spot", job, 0, 3_600_000);
            d.cloud = Some(rate);
            a.book(&d);
        }
        let book = &a.periods["2026-12"]["spot"];
        assert_eq!(book.rows["j1"].cloud_micros, 21_500_000);
        assert_eq!(book.rows[IDLE].cloud_micros, 21_500_000);
        assert_eq!(book.total.cloud_micros, 43_000_000);
        assert_eq!(a.cloud_booked("2026-12"), 43_000_000);
    }

    #[test]
    fn a_job_keeps_one_record_across_attempts_and_nodes() {
        let mut a = Attribution::default();
        a.book(&delta("n1", Some("j1"), 1_000, 10));
        let mut d = delta("n2", Some("j1"), 2_000, 20);
        d.holder = Some(Holder { job_id: "j1", attempt: 2, team: "vision" });
        a.book(&d);
        let j = &a.jobs["j1"];
        assert_eq!(j.attempts, BTreeSet::from([1, 2]));
        assert_eq!(j.nodes, BTreeSet::from(["n1".to_string(), "n2".to_string()]));
        assert_eq!((j.total.energy_mj, j.total.gpu_ms), (3_000, 30));
        assert_eq!(a.by_team("2026-12")["vision"].energy_mj, 3_000);
    }

    #[test]
    fn job_costs_are_due_once_after_the_settle_time() {
        let mut a = Attribution::default();
        let end: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        a.job_event(
            "j1",
            "nlp",
            &BTreeMap::new(),
            1,
            Some(Ended { kind: "JOB_EVENT_KIND_EXITED".into(), at: end, trace: None }),
        );
        let settle = chrono::Duration::seconds(30);
        assert!(a.due_job_costs(end, settle).is_empty());
        assert_eq!(a.due_job_costs(end + settle, settle), vec!["j1".to_string()]);
        a.jobs.get_mut("j1").unwrap().cost_event = CostEvent::Sent;
        assert!(a.due_job_costs(end + settle * 2, settle).is_empty());
        assert_eq!(a.jobs["j1"].team, "nlp");
    }

    #[test]
    fn closing_keeps_a_bounded_number_of_months() {
        let mut a = Attribution::default();
        for m in 1..=14 {
            let p = format!("2026-{m:02}");
            let mut d = delta("n1", Some("old"), 1, 1);
            d.period = if m <= 12 { &p } else { "2027-01" };
            a.book(&d);
        }
        a.jobs.get_mut("old").unwrap().cost_event = CostEvent::Sent;
        a.close("2026-12", 3);
        assert_eq!(a.periods.len(), 3);
        assert!(a.jobs.contains_key("old"), "still has rows in a kept month");
        a.periods.clear();
        a.close("2027-01", 3);
        assert!(!a.jobs.contains_key("old"));
    }

    #[test]
    fn the_carry_survives_a_save() {
        let mut c = Carry::default();
        c.take(1, 7, 10);
        let json = serde_json::to_string(&c).unwrap();
        let mut back: Carry = serde_json::from_str(&json).unwrap();
        assert_eq!(back.take(1, 7, 10), 1, "0.7 + 0.7 makes one unit");
    }
}
