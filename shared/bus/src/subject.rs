//! NATS subject rules, shared by the in-process bus and input validation.
use crate::{BusError, BusErrorKind, Result};

/// Whether `subject` (a concrete subject) matches `filter` (which may hold
/// `*` for one token and a trailing `>` for one or more).
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn tokens_ok(subject: &str, wildcards: bool) -> Result<()> {
    let bad = |why: &str| Err(BusError::new(BusErrorKind::InvalidSubject, format!("subject {subject:?} {why}")));
    if subject.is_empty() {
        return bad("is empty");
    }
    let count = subject.split('.').count();
    for (i, t) in subject.split('.').enumerate() {
        if t.is_empty() {
            return bad("has an empty token");
        }
        if t.chars().any(char::is_whitespace) {
            return bad("has whitespace");
        }
        let wild = t == "*" || t == ">";
        if wild && !wildcards {
            return bad("has a wildcard, which a publish may not");
        }
        if t == ">" && i + 1 != count {
            return bad("has '>' before its last token");
        }
        if !wild && (t.contains('*') || t.contains('>')) {
            return bad("has a wildcard inside a token");
        }
    }
    Ok(())
}

pub fn validate_publish(subject: &str) -> Result<()> {
    tokens_ok(subject, false)
}

pub fn validate_filter(subject: &str) -> Result<()> {
    tokens_ok(subject, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.b.d"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches(">", "x"));
    }

    #[test]
    fn rejects_bad_subjects() {
        assert!(validate_publish("a.*").is_err());
        assert!(validate_publish("a..b").is_err());
        assert!(validate_filter("a.>.b").is_err());
        assert!(validate_filter("a.b*").is_err());
        assert!(validate_filter("a.*.>").is_ok());
    }
}
