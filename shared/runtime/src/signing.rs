//! Signed commands: who may tell a node what to run.
//!
//! The scheduler signs what it sends to nodes (assignments, signals, power
//! commands) with an Ed25519 nkey; each gpu-agent is configured with the
//! public keys it trusts and refuses anything else. NATS permissions already
//! keep other users off a node's subjects; the signature holds even when
//! they are misconfigured, or when a message is replayed onto another
//! node's subject (the subject is part of what is signed).
//!
//! What is signed: `subject`, a newline, the content type, a newline, the
//! payload. The signature and the signer's public key travel as headers
//! ([`names::SIGNATURE`], [`names::SIGNER`]).
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use costmesh_contracts::headers::names;
use costmesh_contracts::Headers;
use nkeys::KeyPair;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn signed_bytes(subject: &str, headers: &Headers, payload: &[u8]) -> Vec<u8> {
    let content_type = headers.get(names::CONTENT_TYPE).unwrap_or("");
    let mut b = Vec::with_capacity(subject.len() + content_type.len() + payload.len() + 2);
    b.extend_from_slice(subject.as_bytes());
    b.push(b'\n');
    b.extend_from_slice(content_type.as_bytes());
    b.push(b'\n');
    b.extend_from_slice(payload);
    b
}

/// A private key that signs what its service publishes.
#[derive(Clone)]
pub struct Signer(Arc<KeyPair>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.0.public_key())
    }
}

impl Signer {
    /// From an nkey seed (`SU...`); the error never repeats the seed.
    pub fn from_seed(seed: &str) -> Result<Self, String> {
        KeyPair::from_seed(seed.trim())
            .map(|k| Signer(Arc::new(k)))
            .map_err(|e| format!("not an nkey seed ({})", e.kind()))
    }

    /// Reads a seed file (the first line that starts with `S`, so a
    /// `nsc`-style file with comments works too).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let seed = text.lines().map(str::trim).find(|l| l.starts_with('S')).unwrap_or("");
        Self::from_seed(seed).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    /// Adds the signature headers for `subject` and `payload`.
    pub fn sign(&self, subject: &str, headers: &mut Headers, payload: &[u8]) {
        match self.0.sign(&signed_bytes(subject, headers, payload)) {
            Ok(sig) => {
                headers.insert(names::SIGNER, self.0.public_key());
                headers.insert(names::SIGNATURE, B64.encode(sig));
            }
            // Only a public-key-only pair fails here, and from_seed never builds one.
            Err(e) => tracing::error!(error = %e, "signing failed; message sent unsigned"),
        }
    }
}

/// The public keys a consumer accepts signatures from.
#[derive(Clone, Default)]
pub struct Verifier {
    trusted: Vec<(String, Arc<KeyPair>)>,
}

impl Verifier {
    /// From public nkeys (`U...`); names the first bad one.
    pub fn new(public_keys: &[String]) -> Result<Self, String> {
        let mut trusted = Vec::with_capacity(public_keys.len());
        for k in public_keys {
            let pair =
                KeyPair::from_public_key(k.trim()).map_err(|e| format!("{k:?} is not a public nkey ({})", e.kind()))?;
            trusted.push((k.trim().to_string(), Arc::new(pair)));
        }
        Ok(Self { trusted })
    }

    /// Whether any key is configured (with none, nothing is checked).
    pub fn is_enabled(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Ok when a trusted key signed exactly this subject, content type and
    /// payload; otherwise why not, for the dead letter.
    pub fn verify(&self, subject: &str, headers: &Headers, payload: &[u8]) -> Result<(), String> {
        let Some(signer) = headers.get(names::SIGNER) else {
            return Err(format!("not signed (no {} header); only a trusted scheduler may send this", names::SIGNER));
        };
        let Some((_, key)) = self.trusted.iter().find(|(k, _)| k == signer) else {
            return Err(format!("signed by {signer}, which is not a trusted key"));
        };
        let sig = headers
            .get(names::SIGNATURE)
            .ok_or_else(|| format!("no {} header", names::SIGNATURE))
            .and_then(|s| B64.decode(s).map_err(|e| format!("{} is not base64url: {e}", names::SIGNATURE)))?;
        key.verify(&signed_bytes(subject, headers, payload), &sig)
            .map_err(|_| format!("signature by {signer} does not match this subject and payload"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_subject_and_payload() {
        let pair = KeyPair::new_user();
        let signer = Signer::from_seed(&pair.seed().unwrap()).unwrap();
        let verifier = Verifier::new(&[pair.public_key()]).unwrap();
        let mut h = Headers::new();
        h.insert(names::CONTENT_TYPE, "application/protobuf");
        signer.sign("p.node.n1.assign", &mut h, b"payload");
        assert_eq!(verifier.verify("p.node.n1.assign", &h, b"payload"), Ok(()));
        assert!(verifier.verify("p.node.n2.assign", &h, b"payload").unwrap_err().contains("does not match"));
        assert!(verifier.verify("p.node.n1.assign", &h, b"payloaX").is_err());
        let mut json = h.clone();
        json.insert(names::CONTENT_TYPE, "application/json");
        assert!(verifier.verify("p.node.n1.assign", &json, b"payload").is_err());
        assert!(verifier.verify("s", &Headers::new(), b"").unwrap_err().contains("not signed"));
        let other = Verifier::new(&[KeyPair::new_user().public_key()]).unwrap();
        assert!(other.verify("p.node.n1.assign", &h, b"payload").unwrap_err().contains("not a trusted key"));
        assert!(Verifier::new(&["UNOPE".into()]).is_err());
        let err = Signer::from_seed("SUAAAAsecretish").unwrap_err();
        assert!(!err.contains("secretish"), "{err}");
    }
}
