//! Cache keys: method, route, path, model and model version, the caller's
//! tenant, the route's key headers (Accept, ...), and the request body in a canonical form (JSON with sorted keys
//! and normalised numbers), hashed with SHA-256. Callers never share an
//! entry across tenants; semantically equal JSON bodies share one.
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Rewrites numbers so `1`, `1.0` and `1e0` are the same (integral values
/// as integers). Object keys come out sorted (serde_json's map is ordered).
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            Some(f) => serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null),
            None => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), canonical(v))).collect()),
        other => other.clone(),
    }
}

/// The parts a key is made of.
pub struct KeyParts<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub path: &'a str,
    pub model: &'a str,
    pub model_version: &'a str,
    pub tenant: &'a str,
    /// The route's key headers with the request's values.
    pub headers: &'a [(&'a str, String)],
    /// The body: canonical JSON when it parses, else the raw bytes.
    pub body: &'a [u8],
    pub json: Option<&'a Value>,
}

/// `costmesh:v1:<route>:<model>:<version>:<sha256 hex>`; route, model and
/// version stay readable so purges can match them.
pub fn cache_key(p: &KeyParts<'_>) -> String {
    let mut h = Sha256::new();
    for part in [p.method, p.route, p.path, p.model, p.model_version, p.tenant] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    for (name, value) in p.headers {
        for part in [*name, value.as_str()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    match p.json {
        Some(v) => h.update(canonical(v).to_string().as_bytes()),
        None => h.update(p.body),
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("costmesh:v1:{}:{}:{}:{hex}", part(p.route), part(p.model), part(p.model_version))
}

/// A key part that cannot break the key's shape (or a purge pattern).
pub fn part(s: &str) -> String {
    s.chars()
        .map(|c| if c == ':' || c == '*' || c == '?' || c == '[' || c == ']' || c.is_whitespace() { '_' } else { c })
        .collect()
}

/// The Redis `SCAN MATCH` pattern for a purge.
pub fn purge_pattern(route: Option<&str>, model_version: Option<&str>) -> String {
    format!(
        "costmesh:v1:{}:*:{}:*",
        route.map(part).unwrap_or_else(|| "*".into()),
        model_version.map(part).unwrap_or_else(|| "*".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, body: &str) -> String {
        let v: Value = serde_json::from_str(body).unwrap();
        cache_key(&KeyParts {
            method: "POST",
            route: "gen",
            path: "/v1",
            model: "m",
            model_version: "1",
            tenant,
            headers: &[],
            body: body.as_bytes(),
            json: Some(&v),
        })
    }

    #[test]
    fn equal_json_shares_a_key_tenants_never_do() {
        assert_eq!(key("a", r#"{"x":1,"y":[2.0,3]}"#), key("a", r#"{ "y": [2, 3.0], "x": 1.0 }"#));
        assert_ne!(key("a", r#"{"x":1}"#), key("b", r#"{"x":1}"#));
        assert_ne!(key("a", r#"{"x":1}"#), key("a", r#"{"x":1.5}"#));
        assert!(key("a", "{}").starts_with("costmesh:v1:gen:m:1:"));
    }
}
