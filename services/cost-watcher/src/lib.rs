//! cost-watcher: turns usage into money.
//!
//! # Layout
//! - [`config`]: the `[cost_watcher]` section (prices, budget).
//! - [`energy`]: energy accounting from GPU telemetry, exact across lost and
//!   repeated samples and agent restarts (deltas per boot id).
//! - [`kpi`]: the seed's KPIs and their formulas.
//! - [`roi`]: owning GPUs against renting cloud GPUs (`costmesh roi`).
//! - [`attribution`]: energy, GPU time and cloud node time booked to the
//!   job holding each GPU or to the node's idle row, exactly.
//! - [`inference`]: backend cost per route and tenant, and what the cache saved.
//! - [`carbon`]: grid carbon intensity (fixed, or Electricity Maps-shaped JSON).
//! - [`report`]: `costmesh cost --by ...` rows, from the ledger state.
//! - [`rightsize`]: Cloud Run right-sizing (`costmesh rightsize`).
//! - [`ledger`]: money per month and scope (time-zone months), the durable state, forecasts.
//! - [`billing`]: GCP budget notifications from Pub/Sub.
//! - [`budget`]: budget states and exactly-once budget events.
//! - [`watcher`]: the service loop.
#![forbid(unsafe_code)]

pub mod attribution;
pub mod billing;
pub mod budget;
pub mod carbon;
pub mod config;
pub mod energy;
pub mod inference;
pub mod kpi;
pub mod ledger;
pub mod report;
pub mod rightsize;
pub mod roi;
pub mod watcher;

pub use config::Config;
pub use watcher::run;
