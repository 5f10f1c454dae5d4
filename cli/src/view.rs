//! The one-line-per-event view (`costmesh up`, `costmesh events tail`).
use std::process::ExitCode;

use costmesh_bus::{Message, Subscription};
use costmesh_contracts::{v1, AnyEvent};
use tokio_util::sync::CancellationToken;

/// One line for a message: local time, subject without prefix, summary.
pub fn line(prefix: &str, msg: &Message) -> String {
    let subject = msg.subject.strip_prefix(prefix).map(|s| s.trim_start_matches('.')).unwrap_or(&msg.subject);
    let time = chrono::Local::now().format("%H:%M:%S%.3f");
    match costmesh_contracts::decode_any(&msg.headers, &msg.payload) {
        Ok((_, e)) => format!("{time} {subject:<32} {}", summary(&e)),
        Err(_) if subject.starts_with("dlq.") => format!(
            "{time} {subject:<32} dead letter from {}: {}",
            msg.headers.get(costmesh_contracts::headers::names::DLQ_SUBJECT).unwrap_or("?"),
            msg.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or("?")
        ),
        Err(e) => format!("{time} {subject:<32} undecodable: {e}"),
    }
}

fn money(m: &Option<v1::Money>) -> String {
    m.as_ref().map(|m| format!("{:.2} {}", m.micros as f64 / 1e6, m.currency_code)).unwrap_or_else(|| "-".into())
}

/// A short human summary of an event.
pub fn summary(e: &AnyEvent) -> String {
    match e {
        AnyEvent::GpuSample(s) => format!(
            "GpuSample {} power={:.0}W limit={:.0}W temp={:.1}C util={}% energy={:.1}kJ",
            s.model,
            s.power_draw_mw as f64 / 1000.0,
            s.power_limit_mw as f64 / 1000.0,
            s.temperature_c,
            s.utilization_gpu_pct,
            s.energy_mj as f64 / 1e6
        ),
        AnyEvent::PreemptionNotice(n) => format!("PreemptionNotice node={} source={}", n.node, n.source),
        AnyEvent::BudgetEvent(b) => format!(
            "BudgetEvent {} {} -> {} spent={} of {}",
            b.scope,
            b.previous_state().as_str_name(),
            b.state().as_str_name(),
            money(&b.spent),
            money(&b.budget)
        ),
        AnyEvent::JobEvent(j) => {
            format!("JobEvent {} {} node={} {}", j.job_id, j.kind().as_str_name(), j.node, j.reason)
        }
        AnyEvent::JobAssignment(a) => format!("JobAssignment {} -> {} gpus={:?}", a.job_id, a.node, a.gpu_indices),
        AnyEvent::JobSignal(s) => format!("JobSignal {} {}", s.job_id, s.kind().as_str_name()),
        AnyEvent::PowerCommand(p) => {
            format!("PowerCommand node={} gpu={:?} {}", p.node, p.gpu_index, p.profile().as_str_name())
        }
        AnyEvent::StorageReport(r) => {
            format!("StorageReport used={}B freed={}B actions={}", r.used_bytes, r.bytes_freed, r.actions.len())
        }
        AnyEvent::CacheStats(c) => {
            let (req, hits) = c.routes.iter().fold((0, 0), |(r, h), x| (r + x.requests, h + x.hits));
            format!("CacheStats {} requests={req} hits={hits}", c.instance)
        }
        AnyEvent::CloudBudgetNotification(n) => format!(
            "CloudBudgetNotification {} {:.2} of {:.2} {}",
            n.budget_display_name, n.cost_amount, n.budget_amount, n.currency_code
        ),
        AnyEvent::Action(a) if a.outcome.is_empty() => {
            format!("Action {} {} {} ({})", a.kind, a.target, a.state().as_str_name(), a.reason)
        }
        AnyEvent::Action(a) => {
            format!("Action {} {} {} ({}): {}", a.kind, a.target, a.state().as_str_name(), a.reason, a.outcome)
        }
        AnyEvent::JobCost(c) => format!(
            "JobCost {} team={} cost={} energy={:.3}kWh gpu_hours={:.2} attempts={:?} nodes={:?}",
            c.job_id,
            c.team,
            money(&c.cost),
            c.energy_mj as f64 / 3.6e9,
            c.gpu_ms as f64 / 3.6e6,
            c.attempts,
            c.nodes
        ),
    }
}

/// Prints every message until shutdown.
pub async fn print_live(mut sub: Subscription, prefix: String, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => println!("{}", line(&prefix, &m)),
                None => return,
            },
        }
    }
}

/// `costmesh events tail`.
pub async fn tail(conn: &crate::jobs::Conn, subject: Option<&str>, count: Option<u64>) -> anyhow::Result<ExitCode> {
    let (prefix, json) = (conn.prefix.as_str(), conn.json);
    let bus = conn.connect("costmesh-tail").await?;
    let subjects = costmesh_contracts::Subjects::new(prefix).map_err(anyhow::Error::msg)?;
    let filter = subject.map(str::to_string).unwrap_or_else(|| subjects.all());
    let bus = costmesh_bus::Bus::Nats(bus);
    let mut sub = bus.subscribe(&filter).await?;
    // The server has the subscription once the flush returns.
    bus.flush().await?;
    eprintln!("tailing {filter} on {}", costmesh_bus::masked_url(&conn.url()?));
    let mut seen = 0u64;
    while let Some(m) = sub.next().await {
        if json {
            let v = match costmesh_contracts::decode_any(&m.headers, &m.payload) {
                Ok((meta, e)) => {
                    serde_json::json!({"subject": m.subject, "id": meta.id, "type": meta.event_type, "source": meta.source, "time": meta.time, "event": e.to_json()})
                }
                Err(err) => {
                    serde_json::json!({"subject": m.subject, "error": err.to_string(), "headers": m.headers.iter().collect::<Vec<_>>()})
                }
            };
            println!("{v}");
        } else {
            println!("{}", line(prefix, &m));
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
