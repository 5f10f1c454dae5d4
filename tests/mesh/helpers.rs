//! Shared set-up: a private nats-server and services on their own prefix.
use costmesh_bus::{Bus, NatsBus};
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// A test's own mesh: server, prefix, shutdown.
pub struct TestMesh {
    pub nats: NatsServer,
    pub mesh: MeshConfig,
    pub shutdown: CancellationToken,
}

impl TestMesh {
    pub fn new(test: &str) -> Self {
        let nats = NatsServer::start_new();
        let mesh = MeshConfig { subject_prefix: costmesh_testkit::unique_prefix(test), ..Default::default() };
        Self { nats, mesh, shutdown: CancellationToken::new() }
    }

    /// A new connection, as a separate process would have.
    pub async fn bus(&self) -> Bus {
        Bus::Nats(NatsBus::connect(&self.nats.url(), &Default::default()).await.expect("connect to nats"))
    }

    /// A service context on its own connection.
    pub async fn context(&self, service: &str) -> ServiceContext {
        ServiceContext::new(service, None, self.bus().await, &self.mesh, Clock::system(), self.shutdown.clone())
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
