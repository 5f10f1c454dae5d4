//! The preemption watcher against a local HTTP server that speaks the GCE
//! metadata API (`Metadata-Flavor: Google`, `wait_for_change`, ETags).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1;
use costmesh_gpu_agent::config::{BackendKind, Mode};
use costmesh_gpu_agent::Config;
use costmesh_runtime::clock::Clock;
use costmesh_runtime::config::MeshConfig;
use costmesh_runtime::ServiceContext;
use costmesh_testkit::NatsServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the fake metadata server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    Normal,
    Garbage,
    Error500,
}

#[derive(Clone)]
struct Meta {
    preempted: watch::Sender<bool>,
    behaviour: Arc<Mutex<Behaviour>>,
    requests: Arc<Mutex<u32>>,
}

async fn preempted(
    State(m): State<Meta>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    *m.requests.lock().unwrap() += 1;
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            [("metadata-flavor", "Google"), ("etag", "x")],
            "Missing Metadata-Flavor:Google header.".to_string(),
        );
    }
    match *m.behaviour.lock().unwrap() {
        Behaviour::Garbage => {
            return (
                StatusCode::OK,
                [("content-type", "text/html"), ("etag", "g")],
                "<html>captive portal</html>".to_string(),
            )
        }
        Behaviour::Error500 => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("metadata-flavor", "Google"), ("etag", "e")],
                "oops".to_string(),
            )
        }
        Behaviour::Normal => {}
    }
    let mut rx = m.preempted.subscribe();
    let etag_of = |v: bool| if v { "etag-true" } else { "etag-false" };
    if q.get("wait_for_change").map(String::as_str) == Some("true") {
        let last = q.get("last_etag").cloned().unwrap_or_default();
        // Hold the request until the value differs from what the client has.
        while etag_of(*rx.borrow_and_update()) == last {
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    let v = *rx.borrow();
    (
        StatusCode::OK,
        [("metadata-flavor", "Google"), ("etag", etag_of(v))],
        if v { "TRUE" } else { "FALSE" }.to_string(),
    )
}

async fn metadata_server(meta: Meta) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/computeMetadata/v1/instance/preempted", get(preempted)).with_state(meta);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn agent(
    nats: &NatsServer,
    prefix: &str,
    metadata_url: String,
    shutdown: CancellationToken,
) -> (Bus, costmesh_contracts::Subjects) {
    let mesh = MeshConfig { subject_prefix: prefix.into(), ..Default::default() };
    let bus = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    let ctx = ServiceContext::new("gpu-agent", Some("spot-1"), bus, &mesh, Clock::system(), shutdown);
    let subjects = ctx.subjects().clone();
    let mut cfg =
        Config { node: "spot-1".into(), backend: BackendKind::Sim, mode: Mode::Observe, ..Default::default() };
    cfg.preemption.enabled = true;
    cfg.preemption.metadata_url = metadata_url;
    cfg.sample_interval = Duration::from_secs(1);
    ctx.events.ensure_stream().await.unwrap();
    tokio::spawn(costmesh_gpu_agent::run(cfg, ctx));
    let observer = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    (observer, subjects)
}

#[tokio::test]
async fn a_preemption_notice_is_published_within_one_second() {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    let (tx, _) = watch::channel(false);
    let meta = Meta { preempted: tx, behaviour: Arc::new(Mutex::new(Behaviour::Normal)), requests: Default::default() };
    let url = metadata_server(meta.clone()).await;
    let shutdown = CancellationToken::new();
    let prefix = costmesh_testkit::unique_prefix("preempt");
    let (observer, subjects) = agent(&nats, &prefix, url, shutdown.clone()).await;
    let mut notices = observer.subscribe(&subjects.preemption_all()).await.unwrap();
    observer.flush().await.unwrap();

    // Wait until the watcher is long-polling (two requests: read, then wait).
    costmesh_testkit::eventually(Duration::from_secs(10), "watcher long-polling", || {
        let n = *meta.requests.lock().unwrap();
        async move { n >= 2 }
    })
    .await;
    let flipped = Instant::now();
    meta.preempted.send_replace(true);
    let m = tokio::time::timeout(Duration::from_secs(5), notices.next()).await.expect("notice").unwrap();
    let latency = flipped.elapsed();
    assert!(latency < Duration::from_secs(1), "notice after {latency:?}");
    eprintln!("preemption notice published {latency:?} after the flag turned TRUE");
    let (_, n) = costmesh_contracts::decode::<v1::PreemptionNotice>(&m.headers, &m.payload).unwrap();
    assert_eq!(n.node, "spot-1");
    assert_eq!(n.source, "gce-metadata");
    let noticed = costmesh_contracts::from_timestamp(n.noticed_at.as_ref().unwrap()).unwrap();
    let deadline = costmesh_contracts::from_timestamp(n.deadline.as_ref().unwrap()).unwrap();
    assert_eq!((deadline - noticed).num_seconds(), 30);
    assert_eq!(m.subject, subjects.preemption("spot-1"));
    // It is on the durable stream (JetStream acked it: a consumer can replay it).
    let stream = observer
        .consume(&costmesh_bus::ConsumerSpec {
            stream: subjects.stream_name(),
            durable: "check".into(),
            filter_subjects: vec![subjects.preemption_all()],
            ack_wait: Duration::from_secs(5),
            max_deliver: 0,
            deliver_from: costmesh_bus::DeliverFrom::All,
        })
        .await;
    let mut stream = stream.unwrap();
    let stored = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap();
    assert_eq!(stored.message.subject, subjects.preemption("spot-1"));
    shutdown.cancel();
}

#[tokio::test]
async fn a_down_or_garbage_metadata_server_is_retried_and_the_agent_keeps_working() {
    costmesh_runtime::telemetry::init_for_tests();
    let nats = NatsServer::start_new();
    // Nothing listens here yet.
    let port = costmesh_testkit::free_port();
    let shutdown = CancellationToken::new();
    let prefix = costmesh_testkit::unique_prefix("preempt_bad");
    let (observer, subjects) = agent(&nats, &prefix, format!("http://127.0.0.1:{port}"), shutdown.clone()).await;
    let mut samples = observer.subscribe(&subjects.gpu_telemetry_all()).await.unwrap();
    let mut notices = observer.subscribe(&subjects.preemption_all()).await.unwrap();
    observer.flush().await.unwrap();
    // The agent samples on while the metadata server is unreachable.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), samples.next()).await.expect("samples keep flowing").unwrap();
    }

    // Now a server that answers garbage, then errors, then the truth.
    let (tx, _) = watch::channel(true);
    let meta =
        Meta { preempted: tx, behaviour: Arc::new(Mutex::new(Behaviour::Garbage)), requests: Default::default() };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let app = Router::new().route("/computeMetadata/v1/instance/preempted", get(preempted)).with_state(meta.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    costmesh_testkit::eventually(Duration::from_secs(20), "garbage answered at least once", || {
        let n = *meta.requests.lock().unwrap();
        async move { n >= 1 }
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(300), notices.next()).await.is_err(), "garbage is not a notice");
    *meta.behaviour.lock().unwrap() = Behaviour::Error500;
    let seen = *meta.requests.lock().unwrap();
    costmesh_testkit::eventually(Duration::from_secs(40), "retried after garbage", || {
        let n = *meta.requests.lock().unwrap();
        async move { n > seen }
    })
    .await;
    *meta.behaviour.lock().unwrap() = Behaviour::Normal;
    let m =
        tokio::time::timeout(Duration::from_secs(70), notices.next()).await.expect("notice after recovery").unwrap();
    assert_eq!(m.subject, subjects.preemption("spot-1"));
    tokio::time::timeout(Duration::from_secs(5), samples.next()).await.expect("still sampling").unwrap();
    shutdown.cancel();
}
