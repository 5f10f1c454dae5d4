//! The cost-watcher loop: telemetry in, energy cost out (as metrics).
use std::sync::{Arc, Mutex};

use costmesh_contracts::v1::GpuSample;
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::Config;
use crate::energy::EnergyLedger;

/// Runs the cost-watcher until shutdown.
pub async fn run(cfg: Config, ctx: ServiceContext) -> anyhow::Result<()> {
    let ledger = Arc::new(Mutex::new(EnergyLedger::default()));
    let energy_kwh: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    let electricity_cost: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    ctx.register("costmesh_energy_kwh", "GPU energy accounted since start (kWh)", energy_kwh.clone());
    ctx.register(
        "costmesh_electricity_cost",
        "Electricity cost accounted since start, in the ledger currency",
        electricity_cost.clone(),
    );

    // One cost-watcher of a group accounts each sample.
    let sub = ctx.bus().queue_subscribe(&ctx.subjects().gpu_telemetry_all(), "cost-watcher").await?;
    ctx.health.set("bus", true);
    let price = cfg.electricity_price_per_kwh;
    ctx.events
        .consume_core::<GpuSample, _, _>(sub, ctx.shutdown.clone(), move |_, _, s| {
            let (ledger, energy_kwh, electricity_cost) = (ledger.clone(), energy_kwh.clone(), electricity_cost.clone());
            async move {
                if s.boot_id.is_empty() {
                    return Err(HandlerError::Reject("GpuSample without boot_id: energy cannot be accounted".into()));
                }
                let mut l = ledger.lock().expect("ledger lock");
                l.observe(&s.node, s.gpu_index, &s.boot_id, s.energy_mj);
                energy_kwh.set(l.total_kwh());
                electricity_cost.set(l.total_kwh() * price);
                Ok(())
            }
        })
        .await;
    Ok(())
}
