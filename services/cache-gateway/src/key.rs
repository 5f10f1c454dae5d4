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

/// Feeds `canonical(v).to_string()` to `h` without building either (the
/// POST hot path): the same bytes, so keys do not change.
pub fn hash_canonical(v: &Value, h: &mut Sha256) {
    struct Feed<'a>(&'a mut Sha256);
    impl std::io::Write for Feed<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    fn leaf<T: serde::Serialize + ?Sized>(h: &mut Sha256, v: &T) {
        // Writing to a hasher cannot fail; a leaf always serialises.
        let _ = serde_json::to_writer(Feed(h), v);
    }
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => leaf(h, &(f as i64)),
            Some(f) => match serde_json::Number::from_f64(f) {
                Some(n) => leaf(h, &n),
                None => h.update(b"null"),
            },
            None => leaf(h, n),
        },
        Value::Array(a) => {
            h.update(b"[");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                hash_canonical(x, h);
            }
            h.update(b"]");
        }
        Value::Object(o) => {
            h.update(b"{");
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                leaf(h, k);
                h.update(b":");
                hash_canonical(x, h);
            }
            h.update(b"}");
        }
        other => leaf(h, other),
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
        Some(v) => hash_canonical(v, &mut h),
        None => h.update(p.body),
    }
    let digest = h.finalize();
    let mut key = String::with_capacity(16 + p.route.len() + p.model.len() + p.model_version.len() + 64);
    for (i, s) in ["costmesh:v1", p.route, p.model, p.model_version].into_iter().enumerate() {
        if i > 0 {
            key.push(':');
            push_part(&mut key, s);
        } else {
            key.push_str(s);
        }
    }
    key.push(':');
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in digest {
        key.push(HEX[usize::from(b >> 4)] as char);
        key.push(HEX[usize::from(b & 15)] as char);
    }
    key
}

/// A key part that cannot break the key's shape (or a purge pattern).
pub fn part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_part(&mut out, s);
    out
}

fn push_part(out: &mut String, s: &str) {
    out.extend(s.chars().map(|c| {
        if c == ':' || c == '*' || c == '?' || c == '[' || c == ']' || c.is_whitespace() {
            '_'
        } else {
            c
        }
    }));
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
    fn the_streamed_hash_is_the_hash_of_the_canonical_text() {
        for body in [
            r#"{"b":[1,2.5,-0.0,1e300,"x\"y",null,true,{"z":{},"a":[]}],"a":"\u00e9\n","c":12345678901234567890}"#,
            r#"[1.0, 2, 3.25e-7, "", {"k": false}]"#,
            r#""just a string""#,
            "42",
        ] {
            let v: Value = serde_json::from_str(body).unwrap();
            let mut streamed = Sha256::new();
            hash_canonical(&v, &mut streamed);
            assert_eq!(streamed.finalize(), Sha256::digest(canonical(&v).to_string().as_bytes()), "{body}");
        }
    }

    #[test]
    fn equal_json_shares_a_key_tenants_never_do() {
        assert_eq!(key("a", r#"{"x":1,"y":[2.0,3]}"#), key("a", r#"{ "y": [2, 3.0], "x": 1.0 }"#));
        assert_ne!(key("a", r#"{"x":1}"#), key("b", r#"{"x":1}"#));
        assert_ne!(key("a", r#"{"x":1}"#), key("a", r#"{"x":1.5}"#));
        assert!(key("a", "{}").starts_with("costmesh:v1:gen:m:1:"));
    }
}
