//! Runtime plumbing every costmesh service shares.
//!
//! # Layout
//! - [`authz`]: the NATS permissions of each mesh user, from the subject table.
//! - [`clock`]: the injectable clock (system or virtual) and fixed-rate tickers.
//! - [`config`]: TOML plus environment overrides, validation naming key, value
//!   and reason; secrets that never print.
//! - [`telemetry`]: logs, OTLP trace export, W3C trace context in headers.
//! - [`metrics`]: the Prometheus registry and the event plumbing's counters.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`events`]: typed publish, consumer loops, dead letters, de-duplication.
//! - [`tariff`]: flat and time-of-use electricity prices.
//! - [`signing`]: Ed25519 (nkey) signatures on commands to nodes.
//! - [`service`]: the context a service runs in, signals, bus connection.
//! - [`lease`]: one active scheduler / cost-watcher among standbys (a KV lease).
//! - [`host`]: runs one service as a process (the service binaries' `main`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod clock;
pub mod config;
pub mod events;
pub mod host;
pub mod lease;
pub mod metrics;
pub mod service;
pub mod signing;
pub mod tariff;
pub mod telemetry;

pub use clock::Clock;
pub use config::{ConfigError, Validate};
pub use events::{EventBus, HandlerError};
pub use service::ServiceContext;
