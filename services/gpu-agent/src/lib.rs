//! gpu-agent: owns the GPUs of one host.
//!
//! # Layout
//! - [`config`]: the `[gpu_agent]` section.
//! - [`sim`]: simulated GPUs with real models' power ranges, a first-order
//!   thermal model and a monotonic energy counter.
//! - [`agent`]: the sampling loop and the command handlers.
//!
//! **Invariant:** the agent changes no GPU setting unless `mode = "enforce"`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod sim;

pub use agent::run;
pub use config::Config;
