//! How big the cost-watcher's ledger (one KV value) grows: the JSON state
//! after a month of samples for N nodes of 8 GPUs and J jobs, against the
//! NATS default `max_payload` of 1 MiB it must stay under. Not a timing:
//! bytes, so one run says it.
//!
//!     cargo bench -p costmesh-cost-watcher --bench ledger_size
use costmesh_contracts::v1::GpuSample;
use costmesh_cost_watcher::config::Config;
use costmesh_cost_watcher::ledger::State;
use costmesh_cost_watcher::watcher::on_sample;

fn ledger_bytes(nodes: usize, jobs: usize) -> usize {
    let cfg = Config::default();
    let intensity = costmesh_cost_watcher::carbon::Intensity::fixed(494.0);
    let tz = chrono_tz::Asia::Taipei;
    let mut st = State::default();
    let start = chrono::DateTime::parse_from_rfc3339("2026-07-01T00:00:00Z").unwrap().to_utc();
    // Each job holds one GPU for a stretch of samples; then the next job.
    let gpus = nodes * 8;
    let rounds = jobs.div_ceil(gpus).max(1) * 2;
    for r in 0..rounds {
        let at = start + chrono::Duration::minutes(r as i64);
        for n in 0..nodes {
            for g in 0..8u32 {
                let slot = r / 2 * gpus + n * 8 + g as usize;
                let (job_id, team) = if slot < jobs {
                    (format!("j-{slot:06}"), format!("team-{}", slot % 20))
                } else {
                    (String::new(), String::new())
                };
                let s = GpuSample {
                    node: format!("node-{n:04}"),
                    gpu_index: g,
                    boot_id: format!("boot-{n}"),
                    energy_mj: (r as u64 + 1) * 60_000_000,
                    time: Some(costmesh_contracts::timestamp(at)),
                    job_id,
                    job_attempt: 1,
                    job_team: team,
                    ..Default::default()
                };
                on_sample(&mut st, &cfg, &s, at, tz, &intensity);
            }
        }
    }
    serde_json::to_vec(&st).unwrap().len()
}

fn main() {
    println!("| nodes (8 GPUs) | jobs in the month | ledger JSON | of 1 MiB |");
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for (nodes, jobs) in [(1, 0), (10, 0), (100, 0), (10, 100), (10, 1000), (10, 5000)] {
        let b = ledger_bytes(nodes, jobs);
        rows.push((nodes, jobs, b));
        println!("| {nodes} | {jobs} | {b} B | {:.1} % |", b as f64 / (1 << 20) as f64 * 100.0);
    }
    let per_node = (rows[2].2 - rows[1].2) as f64 / 90.0;
    let per_job = (rows[5].2 - rows[4].2) as f64 / 4000.0;
    println!("about {per_node:.0} B per node of 8 GPUs, {per_job:.0} B per job of the month");
}
