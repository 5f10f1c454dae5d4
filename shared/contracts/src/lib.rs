//! costmesh event contracts.
//!
//! # Layout
//! - [`v1`]: message types generated at build time from `proto/costmesh/v1`
//!   (prost for protobuf, pbjson for the proto3 JSON mapping).
//! - [`subjects`]: the typed subject builder; no service formats a subject by hand.
//! - [`headers`]: the header names every message carries, and a small header map.
//! - [`codec`]: encoding an event with its headers, and decoding either content type.
//!
//! **Invariant:** this crate knows nothing of NATS, tokio or tracing. It is the
//! wire boundary, so every type that crosses a process lives here.
#![forbid(unsafe_code)]

pub mod codec;
pub mod headers;
pub mod subjects;

/// Generated `costmesh.v1` types.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/costmesh.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/costmesh.v1.serde.rs"));
}

impl v1::JobEventKind {
    /// Whether an event of this kind ends its attempt on the node (the
    /// process is gone: exited, failed, cancelled, interrupted or lost).
    pub fn ends_attempt(self) -> bool {
        matches!(self, Self::Exited | Self::Failed | Self::Cancelled | Self::Interrupted | Self::Lost)
    }
}

pub use codec::{
    decode, decode_any, encode, AnyEvent, ContentType, Decodable, DecodeError, DecodeErrorKind, Event, EventMeta,
};
pub use headers::Headers;
pub use subjects::Subjects;

/// Re-exported so callers can build timestamps without naming pbjson.
pub use pbjson_types::Timestamp;

/// Converts a chrono time into a protobuf timestamp.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// Converts a protobuf timestamp into a chrono time (None when out of range).
pub fn from_timestamp(t: &Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}
