//! Who is asking: tenants come from the API key a client presents
//! (`x-api-key`), matched against the SHA-256 hashes in config; a client's
//! own `x-tenant` is believed only from a configured trusted proxy. Admin
//! actions (purge) need the admin token.
use std::net::IpAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header a client presents its tenant key in (never forwarded).
pub const API_KEY_HEADER: &str = "x-api-key";
/// The tenant header a trusted proxy may set (forwarded as resolved).
pub const TENANT_HEADER: &str = "x-tenant";

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// SHA-256 of a key, as hex: what `[[cache_gateway.tenants]] key_sha256` holds.
pub fn hash_key(key: &str) -> String {
    digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// How a request's tenant was settled.
#[derive(Debug, PartialEq, Eq)]
pub enum Tenant {
    /// No key and no trusted `x-tenant`: the shared anonymous tenant.
    Anonymous,
    Known(String),
    /// A key was presented that matches no tenant.
    UnknownKey,
}

/// The tenants and trusted proxies of a gateway.
#[derive(Clone, Default)]
pub struct Tenants {
    keys: Vec<(String, [u8; 32])>,
    trusted: Vec<IpAddr>,
    admin: Option<[u8; 32]>,
}

impl Tenants {
    /// `tenants` as (name, SHA-256 hex); the error names the bad entry.
    pub fn new(tenants: &[(String, String)], trusted: &[IpAddr], admin_token: Option<&str>) -> Result<Self, String> {
        let mut keys = Vec::with_capacity(tenants.len());
        for (i, (name, hex)) in tenants.iter().enumerate() {
            let h = parse_hex(&hex.to_ascii_lowercase())
                .ok_or_else(|| format!("tenants[{i}].key_sha256 must be 64 hex digits (sha256sum of the key)"))?;
            keys.push((name.clone(), h));
        }
        Ok(Self { keys, trusted: trusted.to_vec(), admin: admin_token.map(digest) })
    }

    /// The tenant of a request from `peer` with these headers. Every hash is
    /// compared, in constant time, whatever matches.
    pub fn resolve(&self, headers: &axum::http::HeaderMap, peer: Option<IpAddr>) -> Tenant {
        if let Some(key) = headers.get(API_KEY_HEADER) {
            let d = digest(key.to_str().unwrap_or(""));
            let mut found = None;
            for (name, h) in &self.keys {
                if bool::from(h.ct_eq(&d)) {
                    found = Some(name.clone());
                }
            }
            return found.map(Tenant::Known).unwrap_or(Tenant::UnknownKey);
        }
        let trusted = peer.is_some_and(|p| self.trusted.contains(&p));
        match headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok()) {
            Some(t) if trusted && !t.is_empty() => Tenant::Known(t.to_string()),
            _ => Tenant::Anonymous,
        }
    }

    /// Whether admin actions are enabled (an admin token is configured).
    pub fn admin_enabled(&self) -> bool {
        self.admin.is_some()
    }

    /// `Authorization: Bearer <admin token>`, compared in constant time.
    pub fn is_admin(&self, headers: &axum::http::HeaderMap) -> bool {
        let Some(want) = &self.admin else { return false };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        bool::from(want.ct_eq(&digest(given)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_come_from_keys_not_from_the_client() {
        let t = Tenants::new(&[("a".into(), hash_key("key-a"))], &["10.0.0.1".parse().unwrap()], Some("adm")).unwrap();
        let mut h = axum::http::HeaderMap::new();
        h.insert(TENANT_HEADER, "a".parse().unwrap());
        assert_eq!(t.resolve(&h, Some("127.0.0.1".parse().unwrap())), Tenant::Anonymous, "spoofed x-tenant ignored");
        assert_eq!(t.resolve(&h, Some("10.0.0.1".parse().unwrap())), Tenant::Known("a".into()), "trusted proxy");
        h.insert(API_KEY_HEADER, "key-a".parse().unwrap());
        assert_eq!(t.resolve(&h, None), Tenant::Known("a".into()));
        h.insert(API_KEY_HEADER, "key-b".parse().unwrap());
        assert_eq!(t.resolve(&h, None), Tenant::UnknownKey);
        assert!(Tenants::new(&[("x".into(), "abc".into())], &[], None).is_err());
        let mut a = axum::http::HeaderMap::new();
        assert!(!t.is_admin(&a));
        a.insert("authorization", "Bearer adm".parse().unwrap());
        assert!(t.is_admin(&a));
    }
}
