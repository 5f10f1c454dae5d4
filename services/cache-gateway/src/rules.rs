//! RFC 9111 rules for a shared cache: what may be served from, and stored
//! in, entries every client shares.
//!
//! - A request with `Authorization` (or `Cookie`, unless the route opts in)
//!   is served only from an entry whose response said it may be shared
//!   (`public`, `s-maxage`, `must-revalidate`; §3.5), and its answer is
//!   stored only then.
//! - A response with `no-store`, `private`, `no-cache`, `Set-Cookie` or
//!   `Vary: *` is never stored; `s-maxage`, then `max-age`, shortens the
//!   route's TTL.
//! - The request headers a route keys on (`Accept`, `Accept-Language`,
//!   `Accept-Encoding`, `Content-Type` by default) are part of the key; any
//!   other header a response varies on is recorded with the entry and must
//!   match for it to be served.
//! - An entry keeps the response headers a client needs
//!   ([`STORED_HEADERS`]); hop-by-hop ones are never stored.
use axum::http::HeaderMap;

/// Response headers kept with an entry and sent with every hit.
pub const STORED_HEADERS: &[&str] =
    &["content-type", "content-encoding", "content-language", "vary", "etag", "last-modified", "cache-control"];

/// Request headers that are part of the key unless a route says otherwise.
pub const DEFAULT_KEY_HEADERS: &[&str] = &["accept", "accept-language", "accept-encoding", "content-type"];

fn value(h: &HeaderMap, name: &str) -> String {
    let mut all = h.get_all(name).iter();
    // The hot path: absent or one value, no sorting.
    let Some(first) = all.next() else { return String::new() };
    let first = first.to_str().unwrap_or("");
    let rest: Vec<&str> = all.filter_map(|v| v.to_str().ok()).collect();
    if rest.is_empty() {
        return first.trim().to_string();
    }
    let mut vals = rest;
    vals.push(first);
    vals.sort_unstable();
    vals.join(",").trim().to_string()
}

/// The request's values of the route's key headers, in order.
pub fn key_headers<'a>(h: &HeaderMap, names: &'a [String]) -> Vec<(&'a str, String)> {
    names.iter().map(|n| (n.as_str(), value(h, n))).collect()
}

/// Whether the request carries credentials that make its answer private.
pub fn is_private_request(h: &HeaderMap, cookies_shared: bool) -> bool {
    h.contains_key(axum::http::header::AUTHORIZATION) || (!cookies_shared && h.contains_key(axum::http::header::COOKIE))
}

/// What the response says about storing it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponsePolicy {
    /// May be stored in a shared cache at all.
    pub storable: bool,
    /// May be served to requests with `Authorization`/`Cookie` (§3.5).
    pub shareable_with_credentials: bool,
    /// `s-maxage` or `max-age`, seconds.
    pub max_age: Option<u64>,
    /// The request headers it varies on (lower case), beyond the key.
    pub vary: Vec<String>,
    /// Why not storable, for `Cache-Status`.
    pub reason: &'static str,
}

/// The comma-separated items of every `name` header, trimmed, lower case.
fn list(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect()
}

/// Reads `Cache-Control`, `Set-Cookie` and `Vary` of a backend answer.
pub fn response_policy(status: u16, h: &HeaderMap) -> ResponsePolicy {
    let cc = list(h, "cache-control");
    let has = |d: &str| cc.iter().any(|x| x == d || x.starts_with(&format!("{d}=")));
    let num = |d: &str| {
        cc.iter().find_map(|x| x.strip_prefix(&format!("{d}=")).and_then(|n| n.trim_matches('"').parse().ok()))
    };
    let vary = list(h, "vary");
    let mut p = ResponsePolicy {
        storable: true,
        shareable_with_credentials: has("public") || has("s-maxage") || has("must-revalidate"),
        max_age: num("s-maxage").or_else(|| num("max-age")),
        vary,
        reason: "",
    };
    let refuse = |p: &mut ResponsePolicy, why| {
        p.storable = false;
        p.reason = why;
    };
    if !(200..300).contains(&status) {
        refuse(&mut p, "status");
    } else if has("no-store") {
        refuse(&mut p, "no-store");
    } else if has("private") {
        refuse(&mut p, "private");
    } else if has("no-cache") {
        refuse(&mut p, "no-cache");
    } else if h.contains_key(axum::http::header::SET_COOKIE) {
        refuse(&mut p, "set-cookie");
    } else if p.vary.iter().any(|v| v == "*") {
        refuse(&mut p, "vary-star");
    } else if p.max_age == Some(0) {
        refuse(&mut p, "max-age=0");
    }
    p
}

/// The headers of `h` an entry keeps.
pub fn stored_headers(h: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in STORED_HEADERS {
        for v in h.get_all(*name) {
            if let Ok(v) = v.to_str() {
                out.push((name.to_string(), v.to_string()));
            }
        }
    }
    out
}

/// The request's values for the headers a response varies on (beyond the key).
pub fn vary_values(req: &HeaderMap, vary: &[String], key_names: &[String]) -> Vec<(String, String)> {
    vary.iter().filter(|v| !key_names.contains(v)).map(|v| (v.clone(), value(req, v))).collect()
}

/// Whether a request matches the varied headers recorded with an entry.
pub fn vary_matches(req: &HeaderMap, recorded: &[(String, String)]) -> bool {
    recorded.iter().all(|(name, v)| value(req, name) == *v)
}

/// `If-None-Match` against an entry's `ETag` (weak comparison, RFC 9110 §13.1.2).
pub fn not_modified(req: &HeaderMap, etag: Option<&str>) -> bool {
    let Some(etag) = etag else { return false };
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    req.get_all(axum::http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        m
    }

    #[test]
    fn what_a_shared_cache_may_store() {
        assert!(response_policy(200, &h(&[])).storable);
        for (cc, why) in [
            ("no-store", "no-store"),
            ("private, max-age=60", "private"),
            ("no-cache", "no-cache"),
            ("max-age=0", "max-age=0"),
        ] {
            let p = response_policy(200, &h(&[("cache-control", cc)]));
            assert_eq!((p.storable, p.reason), (false, why), "{cc}");
        }
        assert_eq!(response_policy(200, &h(&[("set-cookie", "s=1")])).reason, "set-cookie");
        assert_eq!(response_policy(200, &h(&[("vary", "Accept, *")])).reason, "vary-star");
        assert_eq!(response_policy(404, &h(&[])).reason, "status");
        let p = response_policy(200, &h(&[("cache-control", "public, s-maxage=30, max-age=5"), ("vary", "X-Region")]));
        assert!(p.storable && p.shareable_with_credentials);
        assert_eq!((p.max_age, p.vary.clone()), (Some(30), vec!["x-region".to_string()]));
        assert!(!response_policy(200, &h(&[("cache-control", "max-age=60")])).shareable_with_credentials);
        assert!(is_private_request(&h(&[("authorization", "Bearer x")]), true));
        assert!(is_private_request(&h(&[("cookie", "a=1")]), false));
        assert!(!is_private_request(&h(&[("cookie", "a=1")]), true));
        assert!(not_modified(&h(&[("if-none-match", "\"a\", W/\"b\"")]), Some("\"b\"")));
        assert!(!not_modified(&h(&[("if-none-match", "\"a\"")]), Some("\"b\"")));
    }
}
