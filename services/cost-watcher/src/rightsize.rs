//! Cloud Run right-sizing (seed section 2): read the inference service's
//! revision template (`google-cloud-run-v2`) and what it used over a window
//! (`google-cloud-monitoring-v3`), propose CPU and memory limits and min and
//! max instances from a policy that starts at the seed's values (1 vCPU,
//! 2 GiB, min 0, max 5), and apply them with an update mask only when asked.
//!
//! The proposal ([`propose`]) is pure:
//! - CPU: the current limit times the peak hourly p95 CPU utilisation is
//!   what was used; divided by the target utilisation it is what is needed;
//!   the limit is the smallest Cloud Run CPU step (1, 2, 4, 6, 8) that holds
//!   both that and the policy's CPU.
//! - Memory likewise, against its own target, rounded up to 0.5 GiB.
//! - Max instances: the peak instance count scaled by the CPU used over the
//!   CPU a new instance offers at the target, or the policy's, whichever is
//!   more. Min instances: the policy's.
//! - Monthly saving: the price of one instance-second (vCPU-seconds and
//!   GiB-seconds at the policy's prices) now minus proposed, times the mean
//!   instance count over a 30-day month, plus the min instances no longer
//!   kept warm at the current price (an upper bound: idle instances are
//!   billed at a lower rate).
use std::time::Duration;

use google_cloud_wkt as wkt;
use serde::{Deserialize, Serialize};

/// Where to look and how to talk to Google.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `projects/<p>/locations/<l>/services/<s>`.
    pub service: String,
    /// Cloud Run Admin API endpoint; empty: Google's.
    pub run_endpoint: String,
    /// Cloud Monitoring endpoint; empty: Google's.
    pub monitoring_endpoint: String,
    /// `"default"`: Application Default Credentials; `"anonymous"`: none.
    pub credentials: String,
    pub window: Duration,
}

/// The policy; defaults are the seed's starting values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub cpu: f64,
    pub memory_gib: f64,
    pub min_instances: i32,
    pub max_instances: i32,
    /// Target peak p95 CPU utilisation of the limit.
    pub target_cpu: f64,
    pub target_memory: f64,
    /// USD per vCPU-second and per GiB-second while an instance is billed.
    pub vcpu_second: f64,
    pub gib_second: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            memory_gib: 2.0,
            min_instances: 0,
            max_instances: 5,
            target_cpu: 0.6,
            target_memory: 0.8,
            vcpu_second: 0.000024,
            gib_second: 0.0000025,
        }
    }
}

/// The service's limits and scaling as they stand.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shape {
    pub cpu: f64,
    pub memory_gib: f64,
    pub min_instances: i32,
    pub max_instances: i32,
}

/// What the service did over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Observed {
    /// Peak of the hourly p95 CPU utilisation (fraction of the limit).
    pub cpu_p95: f64,
    pub memory_p95: f64,
    pub peak_instances: f64,
    pub mean_instances: f64,
    /// Peak hourly request rate, per second.
    pub peak_rps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Proposal {
    pub service: String,
    pub current: Shape,
    pub proposed: Shape,
    pub observed: Observed,
    pub reasons: Vec<String>,
    /// USD per 30-day month (negative: it costs more, to meet the load).
    pub monthly_saving: f64,
    pub changes: bool,
}

const CPU_STEPS: [f64; 5] = [1.0, 2.0, 4.0, 6.0, 8.0];
const MONTH_S: f64 = 30.0 * 86_400.0;

fn instance_second(cpu: f64, mem: f64, p: &Policy) -> f64 {
    cpu * p.vcpu_second + mem * p.gib_second
}

/// The proposal for `current` under `policy`, given what was observed.
pub fn propose(service: &str, current: &Shape, observed: &Observed, policy: &Policy) -> Proposal {
    let used_cpu = current.cpu * observed.cpu_p95;
    let need_cpu = used_cpu / policy.target_cpu;
    let cpu = CPU_STEPS.iter().copied().find(|s| *s >= need_cpu.max(policy.cpu) - 1e-9).unwrap_or(8.0);
    let used_mem = current.memory_gib * observed.memory_p95;
    let need_mem = used_mem / policy.target_memory;
    let memory_gib = ((need_mem.max(policy.memory_gib) * 2.0 - 1e-9).ceil() / 2.0).max(0.5);
    let need_instances = (observed.peak_instances * used_cpu / (cpu * policy.target_cpu) - 1e-9).ceil() as i32;
    let max_instances = need_instances.max(policy.max_instances);
    let proposed = Shape { cpu, memory_gib, min_instances: policy.min_instances, max_instances };
    let pct = |f: f64| format!("{:.0}%", f * 100.0);
    let reasons = vec![
        format!(
            "CPU: p95 {} of {} vCPU = {used_cpu:.2} vCPU used; {need_cpu:.2} needed at {} -> {cpu} vCPU (policy at least {})",
            pct(observed.cpu_p95),
            current.cpu,
            pct(policy.target_cpu),
            policy.cpu
        ),
        format!(
            "memory: p95 {} of {} GiB = {used_mem:.2} GiB used; {need_mem:.2} needed at {} -> {memory_gib} GiB (policy at least {})",
            pct(observed.memory_p95),
            current.memory_gib,
            pct(policy.target_memory),
            policy.memory_gib
        ),
        format!(
            "instances: peak {} at {:.1} req/s needs {need_instances} of the proposed size -> max {max_instances} (policy {}); min {} (policy)",
            observed.peak_instances, observed.peak_rps, policy.max_instances, policy.min_instances
        ),
    ];
    let now = instance_second(current.cpu, current.memory_gib, policy);
    let then = instance_second(cpu, memory_gib, policy);
    let warm = f64::from((current.min_instances - proposed.min_instances).max(0)) * MONTH_S * now;
    let monthly_saving = (now - then) * observed.mean_instances * MONTH_S + warm;
    let changes = &proposed != current;
    Proposal {
        service: service.into(),
        current: current.clone(),
        proposed,
        observed: observed.clone(),
        reasons,
        monthly_saving,
        changes,
    }
}

/// Cloud Run CPU (`"1"`, `"1000m"`, `"2.5"`) in vCPU.
pub fn parse_cpu(v: &str) -> Option<f64> {
    match v.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok().map(|m| m / 1000.0),
        None => v.parse().ok(),
    }
    .filter(|c: &f64| c.is_finite() && *c > 0.0)
}

/// Cloud Run memory (`"512Mi"`, `"2Gi"`, `"1G"`, bytes) in GiB.
pub fn parse_memory(v: &str) -> Option<f64> {
    let units: [(&str, f64); 6] = [
        ("Gi", 1.0),
        ("Mi", 1.0 / 1024.0),
        ("Ki", 1.0 / 1024.0 / 1024.0),
        ("G", 1e9 / 1024f64.powi(3)),
        ("M", 1e6 / 1024f64.powi(3)),
        ("k", 1e3 / 1024f64.powi(3)),
    ];
    let (n, f) =
        units.iter().find_map(|(u, f)| v.strip_suffix(u).map(|n| (n, *f))).unwrap_or((v, 1.0 / 1024f64.powi(3)));
    n.parse::<f64>().ok().map(|n| n * f).filter(|g| g.is_finite() && *g > 0.0)
}

fn format_cpu(c: f64) -> String {
    format!("{}", c)
}

fn format_memory(g: f64) -> String {
    if (g.fract()).abs() < 1e-9 {
        format!("{}Gi", g as i64)
    } else {
        format!("{}Mi", (g * 1024.0).round() as i64)
    }
}

/// Checks `projects/<p>/locations/<l>/services/<s>` and returns (project,
/// location, service).
pub fn parse_service(name: &str) -> Result<(String, String, String), String> {
    let parts: Vec<&str> = name.split('/').collect();
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    match parts.as_slice() {
        ["projects", p, "locations", l, "services", s] if ok(p) && ok(l) && ok(s) => {
            Ok((p.to_string(), l.to_string(), s.to_string()))
        }
        _ => Err(format!(
            "service {name:?}: must be projects/<project>/locations/<region>/services/<name> (lowercase letters, digits, -)"
        )),
    }
}

fn gax<T>(what: &str, r: Result<T, google_cloud_gax::error::Error>) -> Result<T, String> {
    r.map_err(|e| match (e.http_status_code(), e.status()) {
        (Some(h), Some(s)) => format!("{what}: HTTP {h}: {}", s.message),
        _ => format!("{what}: {e}"),
    })
}

async fn clients(
    t: &Target,
) -> Result<(google_cloud_run_v2::client::Services, google_cloud_monitoring_v3::client::MetricService), String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut run = google_cloud_run_v2::client::Services::builder();
    let mut mon = google_cloud_monitoring_v3::client::MetricService::builder();
    if !t.run_endpoint.is_empty() {
        run = run.with_endpoint(t.run_endpoint.clone());
    }
    if !t.monitoring_endpoint.is_empty() {
        mon = mon.with_endpoint(t.monitoring_endpoint.clone());
    }
    if t.credentials == "anonymous" {
        run = run.with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
        mon = mon.with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let run = run.build().await.map_err(|e| format!("Cloud Run client: {e}"))?;
    let mon = mon.build().await.map_err(|e| format!("Cloud Monitoring client: {e}"))?;
    Ok((run, mon))
}

fn shape_of(svc: &google_cloud_run_v2::model::Service) -> Result<Shape, String> {
    let t = svc.template.as_ref().ok_or("the service has no revision template")?;
    let c = t.containers.first().ok_or("the revision template has no container")?;
    let limits = c.resources.as_ref().map(|r| r.limits.clone()).unwrap_or_default();
    let cpu = limits.get("cpu").map(String::as_str).unwrap_or("1");
    let mem = limits.get("memory").map(String::as_str).unwrap_or("512Mi");
    let s = t.scaling.clone().unwrap_or_default();
    Ok(Shape {
        cpu: parse_cpu(cpu).ok_or_else(|| format!("cpu limit {cpu:?} is not a CPU amount"))?,
        memory_gib: parse_memory(mem).ok_or_else(|| format!("memory limit {mem:?} is not a memory amount"))?,
        min_instances: s.min_instance_count,
        max_instances: if s.max_instance_count == 0 { 100 } else { s.max_instance_count },
    })
}

/// One number from a metric over the window: hourly points of `aligner`
/// summed or maxed across series, then `fold`ed over the hours.
async fn metric(
    mon: &google_cloud_monitoring_v3::client::MetricService,
    project: &str,
    filter: String,
    window: Duration,
    aligner: google_cloud_monitoring_v3::model::aggregation::Aligner,
    reducer: google_cloud_monitoring_v3::model::aggregation::Reducer,
    fold: fn(&[f64]) -> f64,
) -> Result<f64, String> {
    use google_cloud_gax::paginator::ItemPaginator;
    use google_cloud_monitoring_v3::model::{Aggregation, TimeInterval};
    let end = std::time::SystemTime::now();
    let start = end - window;
    let ts = |t: std::time::SystemTime| wkt::Timestamp::try_from(t).map_err(|e| format!("time: {e}"));
    let mut items = mon
        .list_time_series()
        .set_name(format!("projects/{project}"))
        .set_filter(filter.clone())
        .set_interval(TimeInterval::new().set_start_time(ts(start)?).set_end_time(ts(end)?))
        .set_aggregation(
            Aggregation::new()
                .set_alignment_period(wkt::Duration::clamp(3600, 0))
                .set_per_series_aligner(aligner)
                .set_cross_series_reducer(reducer),
        )
        .by_item();
    let mut points = Vec::new();
    while let Some(series) = items.next().await {
        let series = gax(&format!("timeSeries.list {filter}"), series)?;
        for p in series.points {
            let v = p.value.as_ref();
            if let Some(v) =
                v.and_then(|v| v.double_value().copied()).or_else(|| v.and_then(|v| v.int64_value()).map(|i| *i as f64))
            {
                points.push(v);
            }
        }
    }
    Ok(if points.is_empty() { 0.0 } else { fold(&points) })
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Reads the service and its usage and returns the proposal.
pub async fn read(t: &Target, policy: &Policy) -> Result<Proposal, String> {
    use google_cloud_monitoring_v3::model::aggregation::{Aligner, Reducer};
    let (project, location, name) = parse_service(&t.service)?;
    let (run, mon) = clients(t).await?;
    let svc = gax("services.get", run.get_service().set_name(t.service.clone()).send().await)?;
    let current = shape_of(&svc)?;
    let of = |m: &str| {
        format!(
            "metric.type=\"run.googleapis.com/{m}\" AND resource.type=\"cloud_run_revision\" \
             AND resource.labels.service_name=\"{name}\" AND resource.labels.location=\"{location}\""
        )
    };
    let w = t.window;
    let observed = Observed {
        cpu_p95: metric(
            &mon,
            &project,
            of("container/cpu/utilizations"),
            w,
            Aligner::AlignPercentile95,
            Reducer::ReduceMax,
            max,
        )
        .await?,
        memory_p95: metric(
            &mon,
            &project,
            of("container/memory/utilizations"),
            w,
            Aligner::AlignPercentile95,
            Reducer::ReduceMax,
            max,
        )
        .await?,
        peak_instances: metric(
            &mon,
            &project,
            of("container/instance_count"),
            w,
            Aligner::AlignMax,
            Reducer::ReduceSum,
            max,
        )
        .await?,
        mean_instances: metric(
            &mon,
            &project,
            of("container/instance_count"),
            w,
            Aligner::AlignMean,
            Reducer::ReduceSum,
            mean,
        )
        .await?,
        peak_rps: metric(&mon, &project, of("request_count"), w, Aligner::AlignRate, Reducer::ReduceSum, max).await?,
    };
    Ok(propose(&t.service, &current, &observed, policy))
}

/// The paths an update sends.
pub const UPDATE_MASK: [&str; 2] = ["template.containers", "template.scaling"];

/// Applies `p` (reads the service again, changes the first container's
/// limits and the scaling, sends them with [`UPDATE_MASK`], and follows
/// the operation to its end).
pub async fn apply(t: &Target, p: &Proposal) -> Result<String, String> {
    use google_cloud_lro::Poller;
    let (run, _) = clients(t).await?;
    let mut svc = gax("services.get", run.get_service().set_name(t.service.clone()).send().await)?;
    let tpl = svc.template.get_or_insert_with(Default::default);
    let c = tpl.containers.first_mut().ok_or("the revision template has no container")?;
    let r = c.resources.get_or_insert_with(Default::default);
    r.limits.insert("cpu".into(), format_cpu(p.proposed.cpu));
    r.limits.insert("memory".into(), format_memory(p.proposed.memory_gib));
    let s = tpl.scaling.get_or_insert_with(Default::default);
    s.min_instance_count = p.proposed.min_instances;
    s.max_instance_count = p.proposed.max_instances;
    let done = run
        .update_service()
        .set_service(svc)
        .set_update_mask(wkt::FieldMask::default().set_paths(UPDATE_MASK))
        .poller()
        .until_done()
        .await;
    let done = gax("services.patch", done)?;
    Ok(format!("updated {} (generation {})", done.name, done.generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_cpu("1000m"), Some(1.0));
        assert_eq!(parse_cpu("2"), Some(2.0));
        assert_eq!(parse_cpu("x"), None);
        assert_eq!(parse_memory("2Gi"), Some(2.0));
        assert_eq!(parse_memory("512Mi"), Some(0.5));
        assert_eq!(parse_memory("-1Gi"), None);
        assert_eq!(format_memory(2.0), "2Gi");
        assert_eq!(format_memory(2.5), "2560Mi");
        assert!(parse_service("projects/p-123456/locations/asia-east1/services/inference").is_ok());
        assert!(parse_service("projects/p/locations/x/services/../../y").is_err());
    }
}
