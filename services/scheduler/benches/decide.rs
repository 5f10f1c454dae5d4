//! Scheduling decisions per second: one pass over 10,000 queued jobs with
//! 100 nodes of 8 GPUs (800 GPUs: most jobs find no room, the costliest
//! path, every node looked at). Peer in the same run: serialising each
//! job record to JSON, the least a decision costs to persist.
//!
//!   cargo bench -p costmesh-scheduler --bench decide
use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Duration, NaiveTime, Utc};
use costmesh_contracts::v1::{BudgetState, JobClass, JobSpec};
use costmesh_runtime::tariff::Tariff;
use costmesh_scheduler::model::Job;
use costmesh_scheduler::plan::{plan_pass, Gpu, Node, Planner, PriceTable};

fn main() {
    let now: DateTime<Utc> = "2026-07-01T18:00:00Z".parse().unwrap(); // 02:00 in Taipei, off-peak
    let jobs: Vec<Job> = (0..10_000)
        .map(|i| {
            let spec = JobSpec {
                name: format!("job-{i}"),
                command: "/opt/train".into(),
                gpus: 1 + (i % 4) as u32,
                estimated_duration_s: 1800 + (i % 16) as u64 * 1800,
                class: [JobClass::Training, JobClass::Batch, JobClass::Inference][i % 3] as i32,
                priority: (i % 5) as i32,
                cloud_ok: i % 2 == 0,
                preemptible_ok: i % 4 == 0,
                deadline: (i % 7 == 0).then(|| costmesh_contracts::timestamp(now + Duration::hours(30))),
                ..Default::default()
            };
            let mut j = Job::new(format!("j-{i:06}"), spec, now - Duration::seconds(i as i64));
            j.seq = i as u64;
            j
        })
        .collect();
    let mut nodes = BTreeMap::new();
    for n in 0..100 {
        let name = format!("node-{n:03}");
        let mut node = Node::new(&name, now);
        node.cloud = n >= 60;
        node.preemptible = n >= 80;
        for g in 0..8 {
            node.gpus.insert(g, Gpu { util_pct: 0, seen: now });
        }
        nodes.insert(name, node);
    }
    let free0: BTreeMap<String, Vec<u32>> = nodes.keys().map(|k| (k.clone(), (0..8).collect())).collect();
    let planner = |tariff: Tariff| Planner {
        tz: "Asia/Taipei".parse().unwrap(),
        off_peak_start: NaiveTime::from_hms_opt(23, 0, 0).unwrap(),
        off_peak_end: NaiveTime::from_hms_opt(7, 0, 0).unwrap(),
        large_job: Duration::hours(2),
        tariff,
        horizon: Duration::hours(24),
        node_timeout: Duration::minutes(2),
        cannot_wait: Duration::hours(1),
    };
    let refs: Vec<&Job> = jobs.iter().collect();
    let rounds = 20;

    let run = |name: &str, p: &Planner| {
        let mut times = Vec::new();
        let mut placed = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let prices = (!p.tariff.is_flat()).then(|| PriceTable::new(&p.tariff, p.tz, now, Duration::hours(24 + 8)));
            let mut free = free0.clone();
            let d = plan_pass(p, &refs, &nodes, &mut free, BudgetState::Ok, now, prices.as_ref());
            times.push(t.elapsed().as_secs_f64());
            placed = d.iter().filter(|d| matches!(d, costmesh_scheduler::plan::Decision::Place { .. })).count();
            std::hint::black_box(d);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        println!(
            "{name:<28} pass {:>8.2} ms  {:>10.0} decisions/s  ({placed} placed of {})",
            med * 1e3,
            jobs.len() as f64 / med,
            jobs.len()
        );
        med
    };
    let flat = run("flat tariff, off-peak rule", &planner(Tariff::default()));
    let tou = run("Taipower time-of-use", &planner(Tariff::taipower_example()));

    let mut times = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut bytes = 0;
        for j in &jobs {
            bytes += serde_json::to_vec(j).unwrap().len();
        }
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(bytes);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let json = times[times.len() / 2];
    println!(
        "{:<28} pass {:>8.2} ms  {:>10.0} records/s",
        "peer: JSON-encode each job",
        json * 1e3,
        jobs.len() as f64 / json
    );
    println!("decision/JSON-encode time ratio: flat {:.2}x, time-of-use {:.2}x", flat / json, tou / json);
}
