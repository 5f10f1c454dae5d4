//! The bus on a 3-node nats-server cluster (R3 streams): durable publishes
//! go on while any one server is SIGKILLed, the stream's leader included,
//! and after it comes back; a durable consumer gets every message once.
use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use costmesh_bus::{Bus, ConsumerSpec, DeliverFrom, Headers, NatsBus, NatsConnectOptions, StreamSpec};
use costmesh_testkit::NatsCluster;

const N: usize = 300;

/// One cluster at a time: each is three servers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn id(i: usize) -> Headers {
    let mut h = Headers::new();
    h.insert("Nats-Msg-Id", format!("m{i}"));
    h
}

async fn leader(bus: &NatsBus, stream: &str) -> String {
    let js = async_nats::jetstream::new(bus.client().clone());
    costmesh_testkit::wait_for(Duration::from_secs(10), &format!("a leader for {stream}"), || async {
        let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let info = s.info().await.map_err(|e| e.to_string())?;
        info.cluster.as_ref().and_then(|c| c.leader.clone()).ok_or_else(|| "no leader yet".to_string())
    })
    .await
}

#[tokio::test]
async fn durable_publishes_survive_killing_the_stream_leader_and_any_other_server() {
    let _one = SERIAL.lock().await;
    let mut cluster = NatsCluster::start(3);
    let opts = NatsConnectOptions { replicas: 3, ..Default::default() };
    let nats = NatsBus::connect(&cluster.urls(), &opts).await.unwrap();
    let bus = Bus::Nats(nats.clone());
    let spec = StreamSpec {
        name: "CLUSTER_EVENTS".into(),
        subjects: vec!["c.>".into()],
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::ZERO,
        max_bytes: 0,
    };
    bus.ensure_stream(&spec).await.unwrap();
    let js = async_nats::jetstream::new(nats.client().clone());
    let info = js.get_stream("CLUSTER_EVENTS").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3, "created R3");

    let mut killed = Vec::new();
    for i in 0..N {
        if i == 100 {
            // The stream's leader.
            let l = leader(&nats, "CLUSTER_EVENTS").await;
            let at = cluster.index_of(&l).unwrap_or_else(|| panic!("leader {l}"));
            cluster.nodes[at].stop();
            killed.push(format!("{l} (leader)"));
        }
        if i == 170 {
            let at = cluster.nodes.iter().position(|n| !n.is_running()).unwrap();
            cluster.nodes[at].start();
        }
        if i == 200 {
            // Another one, not the leader now.
            let l = leader(&nats, "CLUSTER_EVENTS").await;
            let at = (0..3).find(|j| format!("n{j}") != l && cluster.nodes[*j].is_running()).unwrap();
            cluster.nodes[at].stop();
            killed.push(format!("n{at}"));
        }
        bus.publish_durable(&format!("c.{}", i % 7), id(i), Bytes::from(i.to_string()))
            .await
            .unwrap_or_else(|e| panic!("publish {i} after killing {killed:?}: {e}"));
    }
    let at = cluster.nodes.iter().position(|n| !n.is_running()).unwrap();
    cluster.nodes[at].start();

    let consumer = ConsumerSpec {
        stream: "CLUSTER_EVENTS".into(),
        durable: "reader".into(),
        filter_subjects: vec!["c.>".into()],
        ack_wait: Duration::from_secs(5),
        max_deliver: 5,
        deliver_from: DeliverFrom::All,
    };
    let mut sub = bus.consume(&consumer).await.unwrap();
    let mut seen = BTreeSet::new();
    let mut repeats = 0;
    while seen.len() < N {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} read", seen.len()))
            .unwrap();
        let n: usize = std::str::from_utf8(&m.message.payload).unwrap().parse().unwrap();
        if !seen.insert(n) {
            repeats += 1;
        }
        m.ack().await.unwrap();
    }
    println!("cluster: {N} published across killing {killed:?}; read {} distinct, {repeats} repeated", seen.len());
    assert_eq!(seen.len(), N, "none lost");
    let info = js.get_stream("CLUSTER_EVENTS").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.state.messages, N as u64, "none stored twice (the message id dedupes a retried publish)");
}

#[tokio::test]
async fn compare_and_set_goes_on_while_the_bucket_leader_is_killed() {
    let _one = SERIAL.lock().await;
    let mut cluster = NatsCluster::start(3);
    let opts = NatsConnectOptions { replicas: 3, ..Default::default() };
    let nats = NatsBus::connect(&cluster.urls(), &opts).await.unwrap();
    let bus = Bus::Nats(nats.clone());
    let kv = bus.kv("cluster_jobs").await.unwrap();
    let js = async_nats::jetstream::new(nats.client().clone());
    let info = js.get_stream("KV_cluster_jobs").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3, "the bucket is R3");
    kv.create("counter", Bytes::from("0")).await.unwrap();
    let mut killed = String::new();
    let (mut done, mut refused) = (0u32, 0u32);
    while done < 200 {
        if done == 60 && killed.is_empty() {
            killed = leader(&nats, "KV_cluster_jobs").await;
            let at = cluster.index_of(&killed).unwrap();
            cluster.nodes[at].stop();
        }
        if done == 140 && cluster.nodes.iter().any(|n| !n.is_running()) {
            let at = cluster.nodes.iter().position(|n| !n.is_running()).unwrap();
            cluster.nodes[at].start();
        }
        // The scheduler's pattern: read, then write only over what was read.
        // A read may be served by a replica that is behind (one just back):
        // the write over it is refused, and the next read is newer.
        let e =
            kv.get("counter").await.unwrap_or_else(|e| panic!("get after {done} with {killed} killed: {e}")).unwrap();
        let n: u32 = std::str::from_utf8(&e.value).unwrap().parse().unwrap();
        match kv.update("counter", Bytes::from((n + 1).to_string()), e.revision).await {
            Ok(_) => done += 1,
            Err(err) if err.kind == costmesh_bus::BusErrorKind::WrongRevision => refused += 1,
            Err(err) => panic!("update after {done} with {killed} (leader) killed: {err}"),
        }
        assert!(refused < 1000, "stale reads do not end");
    }
    let last = kv.get("counter").await.unwrap().unwrap();
    println!(
        "cluster kv: 200 compare-and-set updates across killing {killed} (leader), {refused} refused over stale reads: final {:?}",
        last.value
    );
    assert_eq!(&last.value[..], b"200", "every write once: none lost, none doubled");
}
