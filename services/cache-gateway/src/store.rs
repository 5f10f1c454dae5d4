//! The two-tier response cache: a small in-process tier (moka) in front of
//! Redis (shared by every gateway). Values are stored compressed. Redis
//! failing or slow never fails a request: the cache then behaves as a miss
//! (fail open), and the connection manager reconnects by itself.
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What an entry costs beyond its key, body and headers (the struct, the
/// `Arc`, moka's node and its indexes), counted in the byte budget.
pub const ENTRY_OVERHEAD: usize = 1024;

/// What the parsed header map of a served entry costs per header slot
/// (`Content-Type` and the stored headers, plus room for `Age` and
/// `Cache-Status`): counted whether or not it has been parsed yet.
pub const PARSED_HEADER_SLOT: usize = 128;

/// A stored response's headers, parsed once: not part of what the entry
/// is (equal entries compare equal whether or not they were parsed).
#[derive(Clone, Debug, Default)]
pub struct ParsedHeaders(std::sync::OnceLock<axum::http::HeaderMap>);

impl PartialEq for ParsedHeaders {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A stored response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    pub status: u16,
    pub content_type: String,
    /// Unix seconds when it was stored (for `Age`).
    pub stored_at: i64,
    /// Lifetime in seconds.
    pub ttl: u64,
    /// Seconds it is kept after `ttl` to be served stale (while it is
    /// refreshed, while backends fail, or while the budget says so).
    #[serde(default)]
    pub grace: u64,
    /// Response headers a client needs besides `Content-Type`
    /// ([`crate::rules::STORED_HEADERS`]).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Request headers the response varies on (beyond the key), with the
    /// values of the request it answered.
    #[serde(default)]
    pub vary: Vec<(String, String)>,
    /// May be served to requests with credentials (RFC 9111 §3.5).
    #[serde(default)]
    pub shared_with_credentials: bool,
    /// `s-maxage`/`max-age` of the response, which caps the route's TTL.
    #[serde(default)]
    pub max_age: Option<u64>,
    #[serde(skip)]
    pub body: Bytes,
    /// `content_type` and `headers` as a header map, built on first use.
    #[serde(skip)]
    pub parsed: ParsedHeaders,
}

impl Cached {
    /// The stored headers ready to answer with (`Content-Type` first);
    /// a pair that is not a valid header is left out.
    pub fn response_headers(&self) -> &axum::http::HeaderMap {
        self.parsed.0.get_or_init(|| {
            let mut h = axum::http::HeaderMap::with_capacity(self.headers.len() + 3);
            let ct = std::iter::once(("content-type", self.content_type.as_str())).filter(|(_, v)| !v.is_empty());
            for (k, v) in ct.chain(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
                if let (Ok(k), Ok(v)) =
                    (axum::http::HeaderName::from_bytes(k.as_bytes()), axum::http::HeaderValue::from_str(v))
                {
                    h.append(k, v);
                }
            }
            h
        })
    }

    fn encode(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(meta.len() + self.body.len() / 3 + 16);
        out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        out.extend_from_slice(&meta);
        let mut enc = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
        let _ = enc.write_all(&self.body);
        enc.finish().unwrap_or_default()
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let n = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?) as usize;
        let mut c: Cached = serde_json::from_slice(raw.get(4..4 + n)?).ok()?;
        let mut body = Vec::new();
        flate2::read::DeflateDecoder::new(raw.get(4 + n..)?).read_to_end(&mut body).ok()?;
        c.body = Bytes::from(body);
        Some(c)
    }

    /// The stored `ETag`, if any.
    pub fn etag(&self) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == "etag").map(|(_, v)| v.as_str())
    }

    /// Bytes it holds in the in-process tier (what the byte budget counts).
    pub fn weight(&self, key: &str) -> u32 {
        let headers: usize = self.headers.iter().chain(&self.vary).map(|(k, v)| k.len() + v.len() + 48).sum();
        let parsed = PARSED_HEADER_SLOT * (self.headers.len() + 3) + self.content_type.len();
        (key.len() + self.body.len() + self.content_type.len() + headers + parsed + ENTRY_OVERHEAD)
            .min(u32::MAX as usize) as u32
    }

    /// Seconds since it was stored.
    pub fn age(&self, now: i64) -> u64 {
        (now - self.stored_at).max(0) as u64
    }

    pub fn fresh(&self, now: i64) -> bool {
        self.age(now) < self.ttl
    }

    /// Seconds past its lifetime (0 while fresh).
    pub fn stale_for(&self, now: i64) -> u64 {
        self.age(now).saturating_sub(self.ttl)
    }

    /// Still kept: fresh, or stale within its grace.
    pub fn usable(&self, now: i64) -> bool {
        self.age(now) < self.ttl + self.grace
    }
}

/// The cache.
#[derive(Clone)]
pub struct Store {
    l1: moka::future::Cache<String, Arc<Cached>>,
    redis: Option<redis::aio::ConnectionManager>,
    /// How long a Redis call may take before the request goes on without it.
    redis_timeout: Duration,
}

/// What a lookup found.
pub enum Lookup {
    Fresh(Arc<Cached>),
    /// Past its TTL but within its grace.
    Stale(Arc<Cached>),
    Miss,
}

impl Lookup {
    fn of(c: Arc<Cached>, now: i64) -> Self {
        if c.fresh(now) {
            Lookup::Fresh(c)
        } else if c.usable(now) {
            Lookup::Stale(c)
        } else {
            Lookup::Miss
        }
    }
}

impl Store {
    /// `redis_url` None: in-process tier only. A Redis that is down at start
    /// is not fatal: the manager keeps trying.
    /// With `rediss://`, `tls` names the CA and the client certificate.
    /// The in-process tier holds at most `l1_max_bytes`, weighed by
    /// [`Cached::weight`].
    pub async fn new(
        redis_url: Option<&str>,
        tls: &costmesh_runtime::config::RedisTls,
        l1_max_bytes: u64,
        l1_ttl: Duration,
    ) -> Result<Self, String> {
        let redis = match redis_url {
            None => None,
            Some(url) => {
                let client = if tls.ca_file.is_some() || tls.cert_file.is_some() {
                    let read =
                        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("redis TLS {}: {e}", p.display()));
                    let client_tls = match (&tls.cert_file, &tls.key_file) {
                        (Some(c), Some(k)) => {
                            Some(redis::ClientTlsConfig { client_cert: read(c)?, client_key: read(k)? })
                        }
                        _ => None,
                    };
                    let root_cert = tls.ca_file.as_deref().map(read).transpose()?;
                    redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert })
                } else {
                    redis::Client::open(url)
                }
                .map_err(|e| format!("redis URL: {e}"))?;
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Duration::from_millis(500))
                    .set_response_timeout(Duration::from_millis(500))
                    .set_number_of_retries(1);
                match tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager_with_config(cfg)).await
                {
                    Ok(Ok(m)) => Some(m),
                    Ok(Err(e)) => return Err(format!("redis: {e}")),
                    Err(_) => return Err("redis: connect timed out".into()),
                }
            }
        };
        let l1 = moka::future::Cache::builder()
            .max_capacity(l1_max_bytes)
            .weigher(|k: &String, v: &Arc<Cached>| v.weight(k))
            .time_to_live(l1_ttl)
            .support_invalidation_closures()
            .build();
        Ok(Self { l1, redis, redis_timeout: Duration::from_millis(200) })
    }

    pub async fn get(&self, key: &str, now: i64) -> Lookup {
        let l1 = self.l1.get(key).await;
        if let Some(c) = l1.as_ref().filter(|c| c.fresh(now)) {
            return Lookup::Fresh(c.clone());
        }
        // A stale first-tier copy, for when Redis cannot answer.
        let l1_stale = l1.map_or(Lookup::Miss, |c| Lookup::of(c, now));
        let Some(mut r) = self.redis.clone() else { return l1_stale };
        let got: Result<Result<Option<Vec<u8>>, _>, _> =
            tokio::time::timeout(self.redis_timeout, redis::cmd("GET").arg(key).query_async(&mut r)).await;
        match got {
            Ok(Ok(Some(raw))) => match Cached::decode(&raw) {
                Some(c) if c.usable(now) => {
                    let c = Arc::new(c);
                    if c.fresh(now) {
                        self.l1.insert(key.to_string(), c.clone()).await;
                    }
                    Lookup::of(c, now)
                }
                _ => Lookup::Miss,
            },
            Ok(Ok(None)) => Lookup::Miss,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis unavailable: serving without the shared cache");
                l1_stale
            }
            Err(_) => {
                tracing::warn!("redis too slow: serving without the shared cache");
                l1_stale
            }
        }
    }

    /// Removes every entry whose key matches `pattern` (Redis glob, `*`
    /// only) from both tiers; returns how many Redis keys went.
    pub async fn purge(&self, pattern: &str) -> Result<u64, String> {
        let re: Vec<String> = pattern.split('*').map(str::to_string).collect();
        let matches = move |k: &str| {
            let mut rest = k;
            for (i, seg) in re.iter().enumerate() {
                if i == 0 {
                    match rest.strip_prefix(seg.as_str()) {
                        Some(r) => rest = r,
                        None => return false,
                    }
                } else if i == re.len() - 1 {
                    return rest.ends_with(seg.as_str());
                } else {
                    match rest.find(seg.as_str()) {
                        Some(p) => rest = &rest[p + seg.len()..],
                        None => return false,
                    }
                }
            }
            rest.is_empty()
        };
        self.l1.invalidate_entries_if(move |k, _| matches(k)).map_err(|e| e.to_string())?;
        let Some(mut r) = self.redis.clone() else { return Ok(0) };
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut r)
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut r).await.map_err(|e| e.to_string())?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    pub async fn put(&self, key: &str, c: Cached) {
        let ttl = (c.ttl + c.grace).max(1);
        let raw = c.encode();
        self.l1.insert(key.to_string(), Arc::new(c)).await;
        if let Some(mut r) = self.redis.clone() {
            let set: Result<Result<(), _>, _> = tokio::time::timeout(
                self.redis_timeout,
                redis::cmd("SET").arg(key).arg(raw).arg("EX").arg(ttl).query_async(&mut r),
            )
            .await;
            if !matches!(set, Ok(Ok(()))) {
                tracing::warn!("redis unavailable: response kept in the in-process tier only");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_compressed() {
        let c = Cached {
            status: 200,
            content_type: "application/json".into(),
            stored_at: 10,
            ttl: 60,
            grace: 30,
            headers: vec![("etag".into(), "\"v1\"".into())],
            body: Bytes::from("x".repeat(10_000)),
            ..Default::default()
        };
        let raw = c.encode();
        assert!(raw.len() < 500, "{} bytes", raw.len());
        assert_eq!(Cached::decode(&raw).unwrap(), c);
        assert!(c.fresh(69) && !c.fresh(70));
        assert!(c.usable(99) && !c.usable(100) && c.stale_for(95) == 25);
    }
}
