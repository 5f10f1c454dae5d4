//! The NATS settings authenticate for real: user/password and token against
//! a nats-server that requires them; wrong secrets are refused with a clear
//! error, and the secret never appears in it.
use costmesh_runtime::config::{NatsConfig, Secret, SecretUrl};
use costmesh_runtime::service::connect_bus;
use costmesh_testkit::NatsServer;

fn cfg(url: String) -> NatsConfig {
    NatsConfig { url: Some(SecretUrl::new(url)), ..Default::default() }
}

#[tokio::test]
async fn user_and_password() {
    let server = NatsServer::start_with_args(&["--user", "mesh", "--pass", "s3cret-pw"]);
    let mut ok = cfg(server.url());
    ok.user = Some("mesh".into());
    ok.password = Some(Secret::new("s3cret-pw"));
    let bus = connect_bus(&ok, "test").await.expect("right password connects");
    bus.flush().await.unwrap();

    let mut bad = ok.clone();
    bad.password = Some(Secret::new("wrong-pw"));
    bad.url = Some(SecretUrl::new(server.url()));
    let opts = bad.connect_options("test").unwrap();
    let opts = costmesh_bus::NatsConnectOptions { retry_on_initial_connect: false, ..opts };
    let err = costmesh_bus::NatsBus::connect(&server.url(), &opts).await.err().expect("wrong password refused");
    let text = err.to_string();
    assert!(text.to_lowercase().contains("auth"), "{text}");
    assert!(!text.contains("wrong-pw"), "the secret leaked into the error: {text}");
}

#[tokio::test]
async fn token() {
    let server = NatsServer::start_with_args(&["--auth", "t0ken-value"]);
    let mut ok = cfg(server.url());
    ok.token = Some(Secret::new("t0ken-value"));
    connect_bus(&ok, "test").await.expect("right token connects").flush().await.unwrap();
    let opts = costmesh_bus::NatsConnectOptions { token: Some("nope".into()), ..Default::default() };
    assert!(costmesh_bus::NatsBus::connect(&server.url(), &opts).await.is_err());
}
