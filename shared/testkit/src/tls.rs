//! A throwaway PKI for TLS tests: a CA, a server certificate for
//! `127.0.0.1`/`localhost` and a client certificate it signed, as PEM files.
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM files under one directory.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn ca(name: &str) -> (Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    (p.self_signed(&key).expect("CA certificate"), key)
}

fn leaf(
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Certificate,
    issuer_key: &KeyPair,
) -> (Certificate, KeyPair) {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate().expect("leaf key");
    (p.signed_by(&key, issuer, issuer_key).expect("leaf certificate"), key)
}

impl Pki {
    /// A CA named `name` and its server and client certificates, in `dir`.
    pub fn generate(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let (ca_cert, ca_key) = ca(name);
        let (server, server_key) =
            leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, &ca_cert, &ca_key);
        let (client, client_key) =
            leaf(&["costmesh-test-client"], ExtendedKeyUsagePurpose::ClientAuth, &ca_cert, &ca_key);
        let write = |file: &str, pem: String| {
            let p = dir.join(file);
            std::fs::write(&p, pem).expect("writing PEM");
            p
        };
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client-key.pem", client_key.serialize_pem()),
        }
    }
}
