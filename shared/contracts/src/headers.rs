//! Header names and a small ordered header map.
//!
//! The event attributes follow the CloudEvents NATS binding (binary mode):
//! `ce-id`, `ce-type`, `ce-source`, `ce-time`, `ce-specversion`, plus
//! `content-type`, `Nats-Msg-Id` (JetStream de-duplication) and the W3C
//! `traceparent` / `tracestate`.

/// Header names.
pub mod names {
    pub const EVENT_ID: &str = "ce-id";
    pub const EVENT_TYPE: &str = "ce-type";
    pub const SOURCE: &str = "ce-source";
    pub const TIME: &str = "ce-time";
    pub const SPEC_VERSION: &str = "ce-specversion";
    pub const CONTENT_TYPE: &str = "content-type";
    /// JetStream de-duplicates on this within the stream's duplicate window.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Set on dead letters: why the message could not be handled.
    pub const DLQ_REASON: &str = "costmesh-dlq-reason";
    /// Set on dead letters: the subject the message was first sent to.
    pub const DLQ_SUBJECT: &str = "costmesh-dlq-subject";
    /// Set on dead letters: the service that gave up on it.
    pub const DLQ_SERVICE: &str = "costmesh-dlq-service";
    /// Set on dead letters whose payload was cut to fit the max payload.
    pub const DLQ_TRUNCATED: &str = "costmesh-dlq-truncated";
    /// The public nkey (`U...`) of whoever signed the message.
    pub const SIGNER: &str = "costmesh-signer";
    /// Ed25519 signature (base64url, no padding) over subject, content type
    /// and payload, by [`SIGNER`]'s key.
    pub const SIGNATURE: &str = "costmesh-signature";
}

/// An ordered multi-map of headers with case-insensitive lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing every earlier value of that name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        self.0.push((name, value.into()));
    }

    /// Adds a value without removing earlier ones.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// The first value of `name`, ignoring case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Self(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_ignores_case_and_insert_replaces() {
        let mut h = Headers::new();
        h.insert("Content-Type", "a");
        h.insert("content-type", "b");
        h.append("x", "1");
        h.append("X", "2");
        assert_eq!(h.get("CONTENT-TYPE"), Some("b"));
        assert_eq!(h.get("x"), Some("1"));
        assert_eq!(h.len(), 3);
    }
}
