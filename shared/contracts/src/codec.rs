//! Encoding and decoding events with their headers.
//!
//! A producer picks the content type; a consumer accepts both, so a shell
//! script (`nats pub -H 'ce-type:costmesh.v1.PowerCommand' -H
//! 'content-type:application/json' ...`) can publish an event.
use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::headers::{names, Headers};
use crate::v1;

/// Every event type: a prost message with its proto name and JSON mapping.
pub trait Event:
    prost::Message + prost::Name + Default + serde::Serialize + serde::de::DeserializeOwned + Clone
{
}
impl<T> Event for T where
    T: prost::Message + prost::Name + Default + serde::Serialize + serde::de::DeserializeOwned + Clone
{
}

/// The payload encodings an event may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    #[default]
    Protobuf,
    Json,
}

impl ContentType {
    pub const PROTOBUF: &'static str = "application/protobuf";
    pub const JSON: &'static str = "application/json";

    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Protobuf => Self::PROTOBUF,
            ContentType::Json => Self::JSON,
        }
    }

    /// Parses a `content-type` value, ignoring parameters such as `charset`.
    /// `application/x-protobuf` is accepted as an alias.
    pub fn parse(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            Self::PROTOBUF | "application/x-protobuf" => Some(ContentType::Protobuf),
            Self::JSON => Some(ContentType::Json),
            _ => None,
        }
    }
}

/// The attributes every event carries in its headers.
#[derive(Clone, Debug, PartialEq)]
pub struct EventMeta {
    /// Unique per event; handlers de-duplicate on it.
    pub id: String,
    /// Full proto name, e.g. `costmesh.v1.GpuSample`.
    pub event_type: String,
    /// The producing service (and instance), e.g. `gpu-agent/node-1`.
    pub source: String,
    pub time: Option<DateTime<Utc>>,
    pub content_type: ContentType,
}

impl EventMeta {
    /// Metadata for a new event of type `E` with a fresh time-ordered id.
    pub fn new<E: Event>(source: impl Into<String>, time: DateTime<Utc>, content_type: ContentType) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            event_type: E::full_name(),
            source: source.into(),
            time: Some(time),
            content_type,
        }
    }
}

/// What went wrong while decoding; small and `Copy` so callers can match and
/// count by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    MissingHeader,
    UnsupportedContentType,
    UnknownEventType,
    UnexpectedEventType,
    MalformedPayload,
    MalformedHeader,
}

impl DecodeErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::MissingHeader => "missing_header",
            DecodeErrorKind::UnsupportedContentType => "unsupported_content_type",
            DecodeErrorKind::UnknownEventType => "unknown_event_type",
            DecodeErrorKind::UnexpectedEventType => "unexpected_event_type",
            DecodeErrorKind::MalformedPayload => "malformed_payload",
            DecodeErrorKind::MalformedHeader => "malformed_header",
        }
    }
}

/// A decoding failure with a human-readable reason (the DLQ reason header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub detail: String,
}

impl DecodeError {
    fn new(kind: DecodeErrorKind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }
}

/// Encodes `event` and returns the headers and payload to send.
pub fn encode<E: Event>(event: &E, meta: &EventMeta) -> (Headers, Bytes) {
    let payload = match meta.content_type {
        ContentType::Protobuf => Bytes::from(event.encode_to_vec()),
        // Serialising a generated message to JSON cannot fail: every field
        // maps to a JSON value and there are no maps with non-string keys.
        ContentType::Json => Bytes::from(serde_json::to_vec(event).unwrap_or_default()),
    };
    let mut h = Headers::new();
    h.insert(names::EVENT_ID, meta.id.clone());
    h.insert(names::NATS_MSG_ID, meta.id.clone());
    h.insert(names::EVENT_TYPE, meta.event_type.clone());
    h.insert(names::SOURCE, meta.source.clone());
    h.insert(names::SPEC_VERSION, "1.0");
    if let Some(t) = meta.time {
        h.insert(names::TIME, t.to_rfc3339_opts(SecondsFormat::Millis, true));
    }
    h.insert(names::CONTENT_TYPE, meta.content_type.as_str());
    (h, payload)
}

/// Reads the event attributes from headers. `ce-type` and `content-type` are
/// required; a missing `ce-id` falls back to `Nats-Msg-Id`, then to a random
/// id (such a message cannot be de-duplicated).
pub fn read_meta(headers: &Headers) -> Result<EventMeta, DecodeError> {
    let event_type = headers
        .get(names::EVENT_TYPE)
        .ok_or_else(|| DecodeError::new(DecodeErrorKind::MissingHeader, "header ce-type is missing"))?
        .to_string();
    let raw_ct = headers
        .get(names::CONTENT_TYPE)
        .ok_or_else(|| DecodeError::new(DecodeErrorKind::MissingHeader, "header content-type is missing"))?;
    let content_type = ContentType::parse(raw_ct).ok_or_else(|| {
        DecodeError::new(
            DecodeErrorKind::UnsupportedContentType,
            format!("content-type {raw_ct:?} is not application/protobuf or application/json"),
        )
    })?;
    let time = match headers.get(names::TIME) {
        None => None,
        Some(t) => Some(DateTime::parse_from_rfc3339(t).map(|t| t.with_timezone(&Utc)).map_err(|e| {
            DecodeError::new(DecodeErrorKind::MalformedHeader, format!("ce-time {t:?} is not RFC 3339: {e}"))
        })?),
    };
    let id = headers
        .get(names::EVENT_ID)
        .or_else(|| headers.get(names::NATS_MSG_ID))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Ok(EventMeta {
        id,
        event_type,
        source: headers.get(names::SOURCE).unwrap_or("unknown").to_string(),
        time,
        content_type,
    })
}

fn decode_payload<E: Event>(content_type: ContentType, payload: &[u8]) -> Result<E, DecodeError> {
    match content_type {
        ContentType::Protobuf => E::decode(payload).map_err(|e| {
            DecodeError::new(DecodeErrorKind::MalformedPayload, format!("not a valid protobuf {}: {e}", E::full_name()))
        }),
        ContentType::Json => serde_json::from_slice(payload).map_err(|e| {
            DecodeError::new(DecodeErrorKind::MalformedPayload, format!("not a valid JSON {}: {e}", E::full_name()))
        }),
    }
}

/// Decodes an event that must be of type `E`.
pub fn decode<E: Event>(headers: &Headers, payload: &[u8]) -> Result<(EventMeta, E), DecodeError> {
    let meta = read_meta(headers)?;
    let expected = E::full_name();
    if meta.event_type != expected {
        let kind = if AnyEvent::is_known(&meta.event_type) {
            DecodeErrorKind::UnexpectedEventType
        } else {
            DecodeErrorKind::UnknownEventType
        };
        return Err(DecodeError::new(kind, format!("ce-type is {:?}, expected {expected:?}", meta.event_type)));
    }
    let event = decode_payload(meta.content_type, payload)?;
    Ok((meta, event))
}

macro_rules! any_event {
    ($($name:ident),* $(,)?) => {
        /// Any costmesh event, for consumers that take several types (the
        /// event tail, the cost-watcher).
        #[derive(Clone, Debug, PartialEq)]
        pub enum AnyEvent {
            $($name(v1::$name),)*
        }

        impl AnyEvent {
            /// Every event type's full proto name.
            pub fn type_names() -> Vec<String> {
                vec![$(<v1::$name as prost::Name>::full_name(),)*]
            }

            pub fn is_known(type_name: &str) -> bool {
                Self::type_names().iter().any(|n| n == type_name)
            }

            pub fn type_name(&self) -> String {
                match self {
                    $(AnyEvent::$name(_) => <v1::$name as prost::Name>::full_name(),)*
                }
            }

            /// The event in the proto3 JSON mapping.
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $(AnyEvent::$name(e) => serde_json::to_value(e).unwrap_or_default(),)*
                }
            }

            fn decode_as(meta: &EventMeta, payload: &[u8]) -> Result<Self, DecodeError> {
                $(
                    if meta.event_type == <v1::$name as prost::Name>::full_name() {
                        return decode_payload::<v1::$name>(meta.content_type, payload).map(AnyEvent::$name);
                    }
                )*
                Err(DecodeError::new(
                    DecodeErrorKind::UnknownEventType,
                    format!("ce-type {:?} is not a costmesh event type", meta.event_type),
                ))
            }
        }
    };
}

any_event!(
    GpuSample,
    PreemptionNotice,
    BudgetEvent,
    JobEvent,
    JobAssignment,
    JobSignal,
    PowerCommand,
    StorageReport,
    CacheStats,
    Action,
    CloudBudgetNotification,
    JobCost,
);

/// Something a consumer can decode from headers and payload: one event type,
/// or [`AnyEvent`] for subscriptions that carry several.
pub trait Decodable: Sized + Send + 'static {
    fn decode_message(headers: &Headers, payload: &[u8]) -> Result<(EventMeta, Self), DecodeError>;
}

impl<E: Event + Send + 'static> Decodable for E {
    fn decode_message(headers: &Headers, payload: &[u8]) -> Result<(EventMeta, Self), DecodeError> {
        decode::<E>(headers, payload)
    }
}

impl Decodable for AnyEvent {
    fn decode_message(headers: &Headers, payload: &[u8]) -> Result<(EventMeta, Self), DecodeError> {
        decode_any(headers, payload)
    }
}

/// Decodes an event of any known type.
pub fn decode_any(headers: &Headers, payload: &[u8]) -> Result<(EventMeta, AnyEvent), DecodeError> {
    let meta = read_meta(headers)?;
    let event = AnyEvent::decode_as(&meta, payload)?;
    Ok((meta, event))
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> v1::GpuSample {
        v1::GpuSample {
            node: "n1".into(),
            gpu_index: 0,
            model: "NVIDIA GeForce RTX 4070".into(),
            power_draw_mw: 180_000,
            energy_mj: 12_345_678_901,
            active_profile: v1::PowerProfile::Training as i32,
            ..Default::default()
        }
    }

    fn meta(ct: ContentType) -> EventMeta {
        EventMeta::new::<v1::GpuSample>("test", Utc::now(), ct)
    }

    #[test]
    fn round_trips_both_content_types() {
        for ct in [ContentType::Protobuf, ContentType::Json] {
            let (h, p) = encode(&sample(), &meta(ct));
            assert_eq!(h.get("content-type"), Some(ct.as_str()));
            assert_eq!(h.get("ce-type"), Some("costmesh.v1.GpuSample"));
            assert_eq!(h.get("ce-id"), h.get("Nats-Msg-Id"));
            let (m, e) = decode::<v1::GpuSample>(&h, &p).unwrap();
            assert_eq!(e, sample());
            assert_eq!(m.content_type, ct);
            let (_, any) = decode_any(&h, &p).unwrap();
            assert_eq!(any, AnyEvent::GpuSample(sample()));
        }
    }

    #[test]
    fn json_uses_proto3_mapping() {
        let (_, p) = encode(&sample(), &meta(ContentType::Json));
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["powerDrawMw"], 180_000);
        // 64-bit integers are strings in proto3 JSON; enums are names.
        assert_eq!(v["energyMj"], "12345678901");
        assert_eq!(v["activeProfile"], "POWER_PROFILE_TRAINING");
    }

    #[test]
    fn a_hand_written_json_event_decodes() {
        let h: Headers = [("ce-type", "costmesh.v1.PowerCommand"), ("content-type", "application/json; charset=utf-8")]
            .into_iter()
            .collect();
        let body = br#"{"node":"n1","gpuIndex":1,"profile":"POWER_PROFILE_IDLE","reason":"manual"}"#;
        let (m, cmd) = decode::<v1::PowerCommand>(&h, body).unwrap();
        assert_eq!(cmd.gpu_index, Some(1));
        assert_eq!(cmd.profile(), v1::PowerProfile::Idle);
        assert!(!m.id.is_empty());
    }

    #[test]
    fn bad_input_names_the_problem() {
        let good = meta(ContentType::Protobuf);
        let (mut h, _) = encode(&sample(), &good);
        let err = decode::<v1::GpuSample>(&h, b"\xff\xff\xff garbage").unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::MalformedPayload);

        h.insert("content-type", "text/plain");
        let err = decode::<v1::GpuSample>(&h, b"").unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::UnsupportedContentType);
        assert!(err.to_string().contains("text/plain"), "{err}");

        h.insert("content-type", "application/protobuf");
        h.insert("ce-type", "costmesh.v1.Nope");
        assert_eq!(decode_any(&h, b"").unwrap_err().kind, DecodeErrorKind::UnknownEventType);
        assert_eq!(decode::<v1::GpuSample>(&h, b"").unwrap_err().kind, DecodeErrorKind::UnknownEventType);

        h.insert("ce-type", "costmesh.v1.BudgetEvent");
        assert_eq!(decode::<v1::GpuSample>(&h, b"").unwrap_err().kind, DecodeErrorKind::UnexpectedEventType);

        let empty = Headers::new();
        assert_eq!(decode_any(&empty, b"").unwrap_err().kind, DecodeErrorKind::MissingHeader);
    }
}
