//! The NVML backend on a machine without an NVIDIA driver: `nvml` stops
//! with the reason, `auto` falls back to simulated GPUs and says why.
use std::process::Stdio;
use std::time::Duration;

use costmesh_testkit::NatsServer;
use tokio::io::{AsyncBufReadExt, BufReader};

fn nvml_present() -> bool {
    ["/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1", "/usr/lib/libnvidia-ml.so.1"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

fn agent(nats: &NatsServer, backend: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_gpu-agent"));
    c.env("COSTMESH__NATS__URL", nats.url())
        .env("COSTMESH__GPU_AGENT__BACKEND", backend)
        .env("COSTMESH__GPU_AGENT__ADMIN__LISTEN", "127.0.0.1:0")
        .env("COSTMESH__MESH__SUBJECT_PREFIX", costmesh_testkit::unique_prefix(backend))
        .env("RUST_LOG", "info")
        .env_remove("COSTMESH_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

#[tokio::test]
async fn backend_nvml_without_a_driver_stops_with_the_reason() {
    if nvml_present() {
        eprintln!("libnvidia-ml is installed here; this test is about machines without it");
        return;
    }
    let nats = NatsServer::start_new();
    let out = tokio::time::timeout(Duration::from_secs(20), agent(&nats, "nvml").output())
        .await
        .expect("agent exits")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpu-agent: gpu_agent.backend = \"nvml\": libnvidia-ml.so.1 could not be loaded"), "{err}");
    assert!(err.contains("libnvidia-ml.so.1"), "{err}");
}

#[tokio::test]
async fn backend_auto_falls_back_to_sim_and_logs_why() {
    if nvml_present() {
        eprintln!("libnvidia-ml is installed here; auto would use it");
        return;
    }
    let nats = NatsServer::start_new();
    let mut child = agent(&nats, "auto").spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut why = None;
    let mut sampling = false;
    while !(why.is_some() && sampling) {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("log line")
            .unwrap()
            .expect("stderr open");
        if line.contains("NVML unavailable; using simulated GPUs") {
            why = Some(line.clone());
        }
        if line.contains("gpu-agent ready to sample") && line.contains("sim") {
            sampling = true;
        }
    }
    assert!(why.unwrap().contains("libnvidia-ml.so.1"), "the fallback line names the reason");
    child.kill().await.unwrap();
}
