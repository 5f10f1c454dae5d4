//! Pure scheduling decisions: when a job should start (off-peak window,
//! time-of-use tariff, deadline) and where it fits (free GPUs learnt from
//! telemetry, node kind, budget state). No I/O: the service applies them,
//! the benchmark and unit tests call them directly.
use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use costmesh_contracts::v1::{BudgetState, JobClass};
use costmesh_runtime::tariff::Tariff;

use crate::model::Job;

/// One GPU as telemetry last showed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    pub util_pct: u32,
    pub seen: DateTime<Utc>,
}

/// A node learnt from telemetry.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub gpus: BTreeMap<u32, Gpu>,
    pub cloud: bool,
    pub preemptible: bool,
    pub last_seen: DateTime<Utc>,
    /// Preempted: not used before this time.
    pub held_until: Option<DateTime<Utc>>,
    /// Every GPU below the idle threshold since then.
    pub idle_since: Option<DateTime<Utc>>,
    /// An idle action was taken for the current idle stretch.
    pub idle_acted: bool,
}

impl Node {
    pub fn new(name: &str, now: DateTime<Utc>) -> Self {
        Self {
            name: name.to_string(),
            gpus: BTreeMap::new(),
            cloud: false,
            preemptible: false,
            last_seen: now,
            held_until: None,
            idle_since: None,
            idle_acted: false,
        }
    }
}

/// The planner's settings (from the `[scheduler]` section and `[mesh]`).
#[derive(Clone, Debug)]
pub struct Planner {
    pub tz: Tz,
    pub off_peak_start: NaiveTime,
    pub off_peak_end: NaiveTime,
    /// Training jobs at least this long wait for the off-peak window.
    pub large_job: Duration,
    pub tariff: Tariff,
    /// How far ahead a cheaper start is looked for.
    pub horizon: Duration,
    /// A node with no telemetry for this long is gone.
    pub node_timeout: Duration,
    /// A job whose latest start is within this of now cannot wait.
    pub cannot_wait: Duration,
}

/// Candidate starts and tariff slots are this long.
const SLOT_MIN: i64 = 15;

/// Average tariff price over any span, from prefix sums over 15-minute slots.
pub struct PriceTable {
    start: DateTime<Utc>,
    prefix: Vec<f64>,
}

impl PriceTable {
    pub fn new(tariff: &Tariff, tz: Tz, from: DateTime<Utc>, span: Duration) -> Self {
        let start = floor_slot(from);
        let slots = (span.num_minutes() / SLOT_MIN + 2).max(1) as usize;
        let mut prefix = Vec::with_capacity(slots + 1);
        prefix.push(0.0);
        let mut acc = 0.0;
        for i in 0..slots {
            acc += tariff.price_at(start + Duration::minutes(SLOT_MIN * i as i64), tz, 1.0);
            prefix.push(acc);
        }
        Self { start, prefix }
    }

    /// Average price per kWh over `[from, from + d)` (slot resolution).
    pub fn average(&self, from: DateTime<Utc>, d: Duration) -> f64 {
        let n = self.prefix.len() - 1;
        let a = (((from - self.start).num_minutes() / SLOT_MIN).max(0) as usize).min(n);
        let slots = ((d.num_minutes() + SLOT_MIN - 1) / SLOT_MIN).max(1) as usize;
        let b = (a + slots).min(n);
        if b <= a {
            return self.prefix[n] - self.prefix[n - 1];
        }
        (self.prefix[b] - self.prefix[a]) / (b - a) as f64
    }
}

fn floor_slot(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    let slot = SLOT_MIN * 60;
    Utc.timestamp_opt(s - s.rem_euclid(slot), 0).single().unwrap_or(t)
}

/// Why a job cannot be placed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoPlace(pub String);

/// A placement: node, its GPUs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub gpus: Vec<u32>,
    pub cloud: bool,
    pub reason: String,
}

impl Planner {
    fn local_minutes(&self, t: DateTime<Utc>) -> u32 {
        let l = t.with_timezone(&self.tz);
        l.hour() * 60 + l.minute()
    }

    /// Inside the off-peak window (which may wrap midnight).
    pub fn in_off_peak(&self, t: DateTime<Utc>) -> bool {
        let m = self.local_minutes(t);
        let (s, e) = (
            self.off_peak_start.hour() * 60 + self.off_peak_start.minute(),
            self.off_peak_end.hour() * 60 + self.off_peak_end.minute(),
        );
        if s <= e {
            m >= s && m < e
        } else {
            m >= s || m < e
        }
    }

    /// `t` if it is off-peak, else the next start of the window.
    pub fn next_off_peak(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        if self.in_off_peak(t) {
            return t;
        }
        let local = t.with_timezone(&self.tz);
        for day in 0..2 {
            let date = local.date_naive() + Duration::days(day);
            if let Some(start) = self.tz.from_local_datetime(&date.and_time(self.off_peak_start)).earliest() {
                let start = start.with_timezone(&Utc);
                if start > t {
                    return start;
                }
            }
        }
        t
    }

    /// The off-peak window on each local day, as far as it overlaps
    /// `from .. to`.
    pub fn off_peak_windows(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let at = |d: chrono::NaiveDate, t: NaiveTime| {
            self.tz.from_local_datetime(&d.and_time(t)).earliest().map(|x| x.with_timezone(&Utc))
        };
        let wraps = self.off_peak_end <= self.off_peak_start;
        let mut day = from.with_timezone(&self.tz).date_naive() - Duration::days(1);
        let last = to.with_timezone(&self.tz).date_naive();
        let mut out = Vec::new();
        while day <= last {
            let end_day = if wraps { day + Duration::days(1) } else { day };
            if let (Some(a), Some(b)) = (at(day, self.off_peak_start), at(end_day, self.off_peak_end)) {
                if b > from && a < to {
                    out.push((a, b));
                }
            }
            day += Duration::days(1);
        }
        out
    }

    /// The tariff over `from .. to` as runs of [`SLOT_MIN`]-minute slots at
    /// one price: (start, end, price per kWh).
    pub fn tariff_bands(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>, f64)> {
        let mut out: Vec<(DateTime<Utc>, DateTime<Utc>, f64)> = Vec::new();
        let mut t = floor_slot(from);
        while t < to {
            let next = t + Duration::minutes(SLOT_MIN);
            let price = self.tariff.price_at(t, self.tz, 1.0);
            match out.last_mut() {
                Some(last) if last.2 == price => last.1 = next,
                _ => out.push((t, next, price)),
            }
            t = next;
        }
        out
    }

    fn is_large(&self, job: &Job) -> bool {
        JobClass::try_from(job.spec.class) == Ok(JobClass::Training) && job.duration() >= self.large_job
    }

    /// When `job` should start, and why. `prices` covers at least
    /// `now .. now + horizon + the job's duration` when the tariff is not flat.
    pub fn start_time(&self, job: &Job, now: DateTime<Utc>, prices: Option<&PriceTable>) -> (DateTime<Utc>, String) {
        let earliest = job.not_before.map_or(now, |nb| nb.max(now));
        let latest = job.latest_start();
        if let (false, Some(prices)) = (self.tariff.is_flat(), prices) {
            let end = latest.unwrap_or(earliest + self.horizon).min(earliest + self.horizon).max(earliest);
            let here = prices.average(earliest, job.duration());
            let mut best = (earliest, here);
            // Candidates on slot boundaries after the earliest start.
            let mut t = floor_slot(earliest) + Duration::minutes(SLOT_MIN);
            while t <= end {
                let c = prices.average(t, job.duration());
                if c < best.1 - 1e-9 {
                    best = (t, c);
                }
                t += Duration::minutes(SLOT_MIN);
            }
            return if best.0 == earliest {
                (earliest, format!("time-of-use tariff: starting now is cheapest ({here:.2}/kWh on average)"))
            } else {
                let by = latest.map(|l| format!(", deadline allows until {l}")).unwrap_or_default();
                (
                    best.0,
                    format!(
                        "time-of-use tariff: cheapest feasible start {:.2}/kWh on average vs {here:.2} now{by}",
                        best.1
                    ),
                )
            };
        }
        if self.is_large(job) {
            let window = self.next_off_peak(earliest);
            if window == earliest {
                return (earliest, "large training job, inside the off-peak window".into());
            }
            if let Some(l) = latest.filter(|l| window > *l) {
                return (
                    earliest,
                    format!("deadline needs a start by {l}, before the off-peak window at {window}: starts now"),
                );
            }
            let (s, e) = (self.off_peak_start.format("%H:%M"), self.off_peak_end.format("%H:%M"));
            return (window, format!("large training job waits for the off-peak window ({s}-{e} {})", self.tz));
        }
        (earliest, "starts as soon as GPUs are free".into())
    }

    /// Where `job` fits now. `free` holds each node's free GPUs (updated by
    /// the caller as it places jobs in one pass).
    pub fn place(
        &self,
        job: &Job,
        nodes: &BTreeMap<String, Node>,
        free: &BTreeMap<String, Vec<u32>>,
        budget: BudgetState,
        now: DateTime<Utc>,
    ) -> Result<Placement, NoPlace> {
        let want = job.spec.gpus as usize;
        let can_wait = job.latest_start().is_none_or(|l| l > now + self.cannot_wait);
        let mut budget_block = None;
        type Rank<'n> = (bool, bool, usize, &'n str);
        let mut best: Option<(Rank, &Node)> = None;
        let mut largest_free = 0;
        for n in nodes.values() {
            if now - n.last_seen > self.node_timeout || n.held_until.is_some_and(|h| h > now) {
                continue;
            }
            if (n.cloud && !job.spec.cloud_ok) || (n.preemptible && !job.spec.preemptible_ok) {
                continue;
            }
            let nfree = free.get(&n.name).map_or(0, Vec::len);
            if nfree < want {
                largest_free = largest_free.max(nfree);
                continue;
            }
            if n.cloud && budget == BudgetState::Exceeded {
                budget_block = Some(format!("budget exceeded: no new cloud work ({} would fit)", n.name));
                continue;
            }
            if n.cloud && budget == BudgetState::Warning && can_wait {
                budget_block =
                    Some(format!("budget warning: cloud work that can wait is deferred ({} would fit)", n.name));
                continue;
            }
            // Own GPUs first, then preemptible cloud (cheaper), then regular
            // cloud; the tightest fit; then by name.
            let key = (n.cloud, !n.preemptible, nfree, n.name.as_str());
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, n));
            }
        }
        let Some((_, n)) = best else {
            return Err(NoPlace(budget_block.unwrap_or_else(|| {
                format!("waiting for {want} free GPU(s) on an eligible node (largest free: {largest_free})")
            })));
        };
        let gpus: Vec<u32> = free[&n.name].iter().take(want).copied().collect();
        let kind = if !n.cloud {
            "own GPUs"
        } else if n.preemptible {
            "preemptible cloud"
        } else {
            "cloud"
        };
        Ok(Placement {
            node: n.name.clone(),
            gpus,
            cloud: n.cloud,
            reason: format!(
                "placed on {} ({kind}), GPUs {:?}",
                n.name,
                free[&n.name].iter().take(want).collect::<Vec<_>>()
            ),
        })
    }
}

/// One decision about one queued job.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Not yet: it starts later (off-peak, cheaper tariff, backoff).
    Defer {
        id: String,
        start: DateTime<Utc>,
        reason: String,
    },
    /// Due, but nowhere to run it now.
    Wait {
        id: String,
        reason: String,
    },
    Place {
        id: String,
        placement: Placement,
    },
}

/// Decides every queued job once, in priority order (higher first, then
/// older first), placing jobs into `free` as it goes.
pub fn plan_pass(
    planner: &Planner,
    jobs: &[&Job],
    nodes: &BTreeMap<String, Node>,
    free: &mut BTreeMap<String, Vec<u32>>,
    budget: BudgetState,
    now: DateTime<Utc>,
    prices: Option<&PriceTable>,
) -> Vec<Decision> {
    let mut order: Vec<&Job> = jobs.to_vec();
    order.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then(a.submitted_at.cmp(&b.submitted_at))
            .then(a.seq.cmp(&b.seq))
            .then(a.id.cmp(&b.id))
    });
    let mut out = Vec::with_capacity(order.len());
    for job in order {
        let (start, reason) = planner.start_time(job, now, prices);
        if start > now {
            out.push(Decision::Defer { id: job.id.clone(), start, reason });
            continue;
        }
        match planner.place(job, nodes, free, budget, now) {
            Err(NoPlace(reason)) => out.push(Decision::Wait { id: job.id.clone(), reason }),
            Ok(placement) => {
                if let Some(f) = free.get_mut(&placement.node) {
                    f.retain(|g| !placement.gpus.contains(g));
                }
                out.push(Decision::Place { id: job.id.clone(), placement });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use costmesh_contracts::v1::JobSpec;
    use costmesh_runtime::tariff::{Days, TouPeriod};

    fn planner(tariff: Tariff) -> Planner {
        Planner {
            tz: "Asia/Taipei".parse().unwrap(),
            off_peak_start: NaiveTime::from_hms_opt(23, 0, 0).unwrap(),
            off_peak_end: NaiveTime::from_hms_opt(7, 0, 0).unwrap(),
            large_job: Duration::hours(2),
            tariff,
            horizon: Duration::hours(24),
            node_timeout: Duration::minutes(1),
            cannot_wait: Duration::hours(1),
        }
    }

    #[test]
    fn off_peak_windows_and_tariff_bands_over_a_day() {
        let p = planner(Tariff::taipower_example());
        let (from, to) = (t("2026-07-01T00:00:00Z"), t("2026-07-02T00:00:00Z")); // 08:00 to 08:00 in Taipei
        // 23:00-07:00 Taipei is 15:00-23:00 UTC: the one that starts this day.
        assert_eq!(p.off_peak_windows(from, to), vec![(t("2026-07-01T15:00:00Z"), t("2026-07-01T23:00:00Z"))]);
        let bands = p.tariff_bands(from, to);
        assert!(bands.len() > 1, "{bands:?}");
        assert_eq!((bands[0].0, bands.last().unwrap().1), (from, to));
        for w in bands.windows(2) {
            assert_eq!(w[0].1, w[1].0, "contiguous");
            assert_ne!(w[0].2, w[1].2, "merged runs of one price");
        }
        assert_eq!(planner(Tariff::default()).tariff_bands(from, to), vec![(from, to, 1.0)]);
    }

    fn job(hours: i64, deadline: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Job {
        let spec = JobSpec {
            name: "t".into(),
            command: "x".into(),
            gpus: 1,
            estimated_duration_s: (hours * 3600) as u64,
            class: JobClass::Training as i32,
            deadline: deadline.map(costmesh_contracts::timestamp),
            ..Default::default()
        };
        Job::new("j".into(), spec, now)
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn large_jobs_wait_for_off_peak_unless_the_deadline_cannot() {
        let p = planner(Tariff::default());
        let now = t("2026-07-01T06:00:00Z"); // 14:00 in Taipei
        assert_eq!(p.start_time(&job(4, None, now), now, None).0, t("2026-07-01T15:00:00Z"));
        let urgent = job(1, Some(t("2026-07-01T08:00:00Z")), now); // 16:00 Taipei
        assert_eq!(p.start_time(&urgent, now, None).0, now);
        let small = job(1, None, now);
        assert_eq!(p.start_time(&small, now, None).0, now, "short jobs do not wait");
        let night = t("2026-07-01T16:30:00Z"); // 00:30 Taipei
        assert_eq!(p.start_time(&job(4, None, night), night, None).0, night);
    }

    #[test]
    fn the_cheapest_feasible_start_under_a_two_price_tariff() {
        let tariff = Tariff {
            periods: vec![
                TouPeriod {
                    months: (1..=12).collect(),
                    days: Days::All,
                    from: "20:00".into(),
                    to: "24:00".into(),
                    price_per_kwh: 1.0,
                },
                TouPeriod {
                    months: (1..=12).collect(),
                    days: Days::All,
                    from: "00:00".into(),
                    to: "24:00".into(),
                    price_per_kwh: 3.0,
                },
            ],
        };
        let p = planner(tariff);
        let now = t("2026-07-01T06:00:00Z"); // 14:00 Taipei
        let prices = PriceTable::new(&p.tariff, p.tz, now, Duration::hours(48));
        // 2 h, done by 23:00 Taipei: the cheap block starts at 20:00.
        let j = job(2, Some(t("2026-07-01T15:00:00Z")), now);
        let (start, why) = p.start_time(&j, now, Some(&prices));
        assert_eq!(start, t("2026-07-01T12:00:00Z"), "{why}");
        // Done by 21:00: only a partly cheap start fits, and the latest is cheapest.
        let j = job(2, Some(t("2026-07-01T13:00:00Z")), now);
        assert_eq!(p.start_time(&j, now, Some(&prices)).0, t("2026-07-01T11:00:00Z"));
        // Due at 16:00: no time to wait.
        let j = job(2, Some(t("2026-07-01T08:00:00Z")), now);
        assert_eq!(p.start_time(&j, now, Some(&prices)).0, now);
    }

    #[test]
    fn placement_prefers_own_gpus_and_gates_cloud_by_budget() {
        let p = planner(Tariff::default());
        let now = t("2026-07-01T06:00:00Z");
        let mut nodes = BTreeMap::new();
        for (name, cloud, pre) in [("local", false, false), ("spot", true, true), ("cloud", true, false)] {
            let mut n = Node::new(name, now);
            n.cloud = cloud;
            n.preemptible = pre;
            nodes.insert(name.to_string(), n);
        }
        let mut free: BTreeMap<String, Vec<u32>> = nodes.keys().map(|k| (k.clone(), vec![0, 1])).collect();
        let mut j = job(1, None, now);
        j.spec.cloud_ok = true;
        j.spec.preemptible_ok = true;
        assert_eq!(p.place(&j, &nodes, &free, BudgetState::Ok, now).unwrap().node, "local");
        free.insert("local".into(), vec![]);
        assert_eq!(p.place(&j, &nodes, &free, BudgetState::Ok, now).unwrap().node, "spot");
        let e = p.place(&j, &nodes, &free, BudgetState::Exceeded, now).unwrap_err();
        assert!(e.0.starts_with("budget exceeded"), "{e:?}");
        let w = p.place(&j, &nodes, &free, BudgetState::Warning, now).unwrap_err();
        assert!(w.0.starts_with("budget warning"), "{w:?}");
        j.spec.deadline = Some(costmesh_contracts::timestamp(now + Duration::minutes(90)));
        assert_eq!(p.place(&j, &nodes, &free, BudgetState::Warning, now).unwrap().node, "spot", "cannot wait");
        j.spec.cloud_ok = false;
        assert!(p.place(&j, &nodes, &free, BudgetState::Ok, now).unwrap_err().0.starts_with("waiting for 1"));
    }
}
