//! storage-janitor: the lifecycle of what the ML system leaves on disk and
//! in buckets: logs, temp files, checkpoints, model versions, snapshots.
//!
//! # Layout
//! - [`config`]: the `[storage_janitor]` section and its rules (seed defaults).
//! - [`scan`]: parallel walk of the roots (never following links); open files.
//! - [`plan`]: what each rule would do, why, bytes freed, money saved.
//! - [`apply`]: carrying a plan out safely (verify before remove).
//! - [`archive`]: the archive store (`object_store`: local, GCS, S3).
//! - [`lifecycle`]: GCS lifecycle rules JSON from the tier policy.
//! - [`janitor`]: one pass, reports, and the service loop.
//!
//! **Invariant:** nothing is deleted or rewritten unless apply is configured
//! (`apply = true`) or asked for (`costmesh janitor apply`); nothing outside a
//! rule's root is touched; no symbolic link is followed.
#![forbid(unsafe_code)]

pub mod apply;
pub mod archive;
pub mod config;
pub mod janitor;
pub mod lifecycle;
pub mod plan;
pub mod scan;

pub use config::Config;
pub use janitor::run;
