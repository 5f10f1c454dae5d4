//! TLS for real: a throwaway CA signs the certificates of a nats-server
//! that verifies client certificates and of a TLS-only redis-server that
//! requires them; the services' connection code (`connect_bus`, the
//! gateway's store) talks to both. A client trusting another CA, or
//! without a client certificate, is refused with an error that says so.
use std::time::Duration;

use costmesh_cache_gateway::store::{Cached, Lookup, Store};
use costmesh_runtime::config::{NatsConfig, RedisTls, SecretUrl, Validate};
use costmesh_runtime::service::connect_bus;
use costmesh_testkit::tls::Pki;
use costmesh_testkit::{NatsServer, RedisServer};

fn tls_nats(pki: &Pki) -> NatsServer {
    let conf = pki.ca.parent().unwrap().join("nats-tls.conf");
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
            pki.server_cert, pki.server_key, pki.ca
        ),
    )
    .unwrap();
    NatsServer::start_with_args(&["-c", conf.to_str().unwrap()])
}

fn nats_cfg(server: &NatsServer, ca: &Pki, client: Option<&Pki>) -> NatsConfig {
    NatsConfig {
        url: Some(SecretUrl::new(format!("tls://127.0.0.1:{}", server.port()))),
        tls_ca_file: Some(ca.ca.clone()),
        tls_cert_file: client.map(|c| c.client_cert.clone()),
        tls_key_file: client.map(|c| c.client_key.clone()),
        require_tls: true,
        ..Default::default()
    }
}

async fn connect_once(cfg: &NatsConfig) -> Result<costmesh_bus::NatsBus, String> {
    let opts =
        costmesh_bus::NatsConnectOptions { retry_on_initial_connect: false, ..cfg.connect_options("tls").unwrap() };
    let url = cfg.url.as_ref().unwrap().expose().to_string();
    tokio::time::timeout(Duration::from_secs(10), costmesh_bus::NatsBus::connect(&url, &opts))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn nats_with_verified_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("good"), "costmesh test CA");
    let wrong = Pki::generate(&dir.path().join("wrong"), "some other CA");
    let server = tls_nats(&pki);

    let good = nats_cfg(&server, &pki, Some(&pki));
    good.validate("nats").unwrap();
    let bus = connect_bus(&good, "tls-test").await.expect("TLS with a client certificate connects");
    // JetStream works over it: a stream, a durable publish, its ack.
    let spec = costmesh_bus::StreamSpec {
        name: "TLS_EVENTS".into(),
        subjects: vec!["tls.>".into()],
        duplicate_window: Duration::from_secs(60),
        max_age: Duration::from_secs(3600),
        max_bytes: -1,
    };
    bus.ensure_stream(&spec).await.unwrap();
    let ack = bus.publish_durable("tls.hello", Default::default(), bytes::Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(ack.sequence, 1);

    let err = connect_once(&nats_cfg(&server, &wrong, Some(&pki))).await.err().expect("a wrong CA was trusted");
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "unclear error for a wrong CA: {err}");
    let err = connect_once(&nats_cfg(&server, &pki, None)).await.err().expect("no client certificate, yet connected");
    assert!(!err.is_empty());
    // A client certificate from another CA is refused by the server.
    assert!(connect_once(&nats_cfg(&server, &pki, Some(&wrong))).await.is_err(), "a foreign client certificate got in");
}

fn entry() -> Cached {
    Cached {
        status: 200,
        content_type: "application/json".into(),
        stored_at: 1_000,
        ttl: 60,
        grace: 0,
        body: bytes::Bytes::from_static(b"{\"tls\":true}"),
        ..Default::default()
    }
}

#[tokio::test]
async fn redis_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("good"), "costmesh test CA");
    let wrong = Pki::generate(&dir.path().join("wrong"), "some other CA");
    let redis = RedisServer::start_tls(&pki);
    assert!(redis.url().starts_with("rediss://"));
    let tls = |ca: &Pki, client: &Pki| RedisTls {
        ca_file: Some(ca.ca.clone()),
        cert_file: Some(client.client_cert.clone()),
        key_file: Some(client.client_key.clone()),
    };
    let writer = Store::new(Some(&redis.url()), &tls(&pki, &pki), 1 << 20, Duration::from_secs(30)).await.unwrap();
    writer.put("k-tls", entry()).await;
    // A second store has nothing in its own tier: a hit comes from Redis.
    let reader = Store::new(Some(&redis.url()), &tls(&pki, &pki), 1 << 20, Duration::from_secs(30)).await.unwrap();
    assert!(
        matches!(reader.get("k-tls", 1_001).await, Lookup::Fresh(c) if c.body == entry().body),
        "not read back over TLS"
    );

    let err = Store::new(Some(&redis.url()), &tls(&wrong, &pki), 1 << 20, Duration::from_secs(30))
        .await
        .err()
        .expect("a wrong CA was trusted");
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "unclear error for a wrong CA: {err}");
    assert!(
        Store::new(Some(&redis.url()), &tls(&pki, &wrong), 1 << 20, Duration::from_secs(30)).await.is_err(),
        "a foreign client certificate got in"
    );
}
