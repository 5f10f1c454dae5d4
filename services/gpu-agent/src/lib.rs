//! gpu-agent: owns the GPUs of one host.
//!
//! # Layout
//! - [`config`]: the `[gpu_agent]` section.
//! - [`backend`]: the `GpuBackend` trait and backend selection (`auto`,
//!   `nvml`, `sim`).
//! - [`nvml`]: NVML through `nvml-wrapper`, loaded at run time.
//! - [`sim`]: simulated GPUs with real models' power ranges, a first-order
//!   thermal model with a fan, and a monotonic energy counter.
//! - [`guard`]: the thermal guard (step the ceiling down, back up with hysteresis).
//! - [`drift`]: cooler drift (temperature at a given power over days).
//! - [`preemption`]: the GCE metadata watcher.
//! - [`agent`]: the sampling loop, profiles and command handlers.
//! - [`jobs`]: runs the jobs the scheduler places here (child processes,
//!   logs, checkpoint and stop signals, job events through an outbox).
//! - [`policy`]: which commands a job may run, and as which user.
//!
//! **Invariant:** the agent changes no GPU setting unless `mode = "enforce"`.
//! **Invariant:** no job runs unless its command is on
//! `jobs.allowed_commands`; with `trusted_scheduler_keys` set, no command
//! from the bus is obeyed unless a trusted scheduler signed it.
// One `unsafe` block, in `jobs::supervise`: a `pre_exec` hook (see there).
#![deny(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod config;
pub mod drift;
pub mod guard;
pub mod jobs;
pub mod nvml;
pub mod policy;
pub mod preemption;
pub mod sim;

pub use agent::{run, run_with_backend};
pub use config::Config;
