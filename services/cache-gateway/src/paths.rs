//! What part of a request reaches a backend: the route's remainder of the
//! path, checked so that percent-decoding cannot climb above the backend's
//! base path or smuggle a query or fragment, and the method, checked
//! against the route's allow-list.

/// Methods a route allows unless it lists its own.
pub const DEFAULT_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Checks the raw (still percent-encoded) path after the route name and
/// returns it to forward as it came; the error says which segment and why.
pub fn check_rest(raw: &str) -> Result<&str, String> {
    for seg in raw.split('/') {
        let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(format!("path segment {seg:?} would leave the route"));
        }
        if let Some(c) = decoded.chars().find(|c| matches!(c, '/' | '\\' | '?' | '#' | '\0')) {
            return Err(format!("path segment {seg:?} encodes {c:?}, which is not allowed in a path segment"));
        }
        if decoded.chars().any(char::is_control) {
            return Err(format!("path segment {seg:?} holds a control character"));
        }
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_climbs_or_smuggles() {
        assert_eq!(check_rest("v1/generate"), Ok("v1/generate"));
        assert_eq!(check_rest("v1/a%20b"), Ok("v1/a%20b"));
        for bad in ["..%2f..%2fadmin", "%2e%2e/admin", "../x", "a/./b", "a%3Fb", "a%23b", "a%5cb", "a%00b", "%2E%2E"] {
            assert!(check_rest(bad).is_err(), "{bad} accepted");
        }
    }
}
