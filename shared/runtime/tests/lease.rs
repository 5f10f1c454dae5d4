//! The decider lease over a real nats-server: one instance active, a
//! standby taking over when the active one dies (its task aborted, as a
//! SIGKILL leaves it: no release) or is cut off from NATS by a proxy, the
//! deposed one's writes refused, and a clean release handing over at once.
use std::sync::Arc;
use std::time::{Duration, Instant};

use costmesh_bus::{Bus, Kv, NatsBus, NatsConnectOptions};
use costmesh_runtime::lease::{Lease, Role, Timing};
use costmesh_testkit::proxy::TcpProxy;
use costmesh_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

async fn kv(url: &str) -> Kv {
    let bus = Bus::Nats(NatsBus::connect(url, &NatsConnectOptions::default()).await.unwrap());
    bus.kv("LEASE_TEST_leases").await.unwrap()
}

struct Instance {
    lease: Arc<Lease>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(kv: Kv, name: &str) -> Instance {
    let lease = Arc::new(Lease::new(kv, "scheduler", name, Timing { ttl: TTL }));
    let stop = CancellationToken::new();
    let task = tokio::spawn(lease.clone().run(stop.clone()));
    Instance { lease, stop, task }
}

async fn wait_role(i: &Instance, what: &str, pred: impl Fn(&Role) -> bool) -> Role {
    let mut roles = i.lease.roles();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let r = roles.borrow_and_update().clone();
            if pred(&r) {
                return r;
            }
            roles.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still {:?}", i.lease.roles().borrow().clone()))
}

fn active(r: &Role) -> bool {
    matches!(r, Role::Active { .. })
}

#[tokio::test]
async fn a_standby_takes_over_a_killed_holder_within_the_ttl_and_the_old_fence_refuses() {
    let nats = NatsServer::start_new();
    let a = start(kv(&nats.url()).await, "a");
    assert_eq!(wait_role(&a, "a active", active).await, Role::Active { term: 1 });
    let b = start(kv(&nats.url()).await, "b");
    let r = wait_role(&b, "b standby", |r| matches!(r, Role::Standby { .. })).await;
    assert_eq!(r, Role::Standby { holder: "a".into(), term: 1 });
    let fence_a = a.lease.fence();
    assert_eq!(fence_a.check(), Ok(1));
    // B never becomes active while A renews.
    tokio::time::sleep(TTL * 2).await;
    assert!(!active(&b.lease.roles().borrow()), "two active instances");

    // SIGKILL as far as the lease can tell: A's task is gone, no release.
    a.task.abort();
    let killed = Instant::now();
    assert_eq!(wait_role(&b, "b takes over", active).await, Role::Active { term: 2 });
    let took = killed.elapsed();
    println!("takeover after the holder died: {took:?} (ttl {TTL:?})");
    assert!(took <= TTL + TTL / 3 + Duration::from_secs(1), "{took:?}");
    // A's lease ran out before B's began: its writes are refused.
    assert!(fence_a.check().is_err(), "the deposed holder's fence still passes");
    assert_eq!(b.lease.fence().check(), Ok(2));
    b.stop.cancel();
    b.task.await.unwrap();
}

#[tokio::test]
async fn a_holder_cut_off_from_nats_stops_acting_before_the_standby_starts_and_stays_deposed() {
    let nats = NatsServer::start_new();
    let proxy = TcpProxy::start(nats.port()).await;
    let a = start(kv(&proxy.nats_url()).await, "a");
    wait_role(&a, "a active", active).await;
    let b = start(kv(&nats.url()).await, "b");
    wait_role(&b, "b standby", |r| matches!(r, Role::Standby { .. })).await;
    let fence_a = a.lease.fence();

    // A's process goes on; its connection is gone.
    proxy.cut();
    let cut = Instant::now();
    let mut roles_a = a.lease.roles();
    let mut roles_b = b.lease.roles();
    let (mut a_stopped, mut b_started) = (None, None);
    tokio::time::timeout(Duration::from_secs(20), async {
        while a_stopped.is_none() || b_started.is_none() {
            tokio::select! {
                _ = roles_a.changed() => {}
                _ = roles_b.changed() => {}
            }
            if a_stopped.is_none() && !active(&roles_a.borrow_and_update()) {
                a_stopped = Some(cut.elapsed());
                assert!(fence_a.check().is_err(), "stood down but still writing");
            }
            if b_started.is_none() && active(&roles_b.borrow_and_update()) {
                b_started = Some(cut.elapsed());
            }
        }
    })
    .await
    .expect("a stands down and b takes over");
    let (a_stopped, b_started) = (a_stopped.unwrap(), b_started.unwrap());
    println!("cut off: old holder stopped acting after {a_stopped:?}, the standby began after {b_started:?}");
    assert!(a_stopped < b_started, "both acted at once: a stopped {a_stopped:?}, b began {b_started:?}");
    assert!(fence_a.check().is_err());

    // Back on the network, A learns of the new term and stays a standby.
    proxy.heal();
    let r = wait_role(&a, "a sees b's term", |r| matches!(r, Role::Standby { term: 2, .. })).await;
    assert_eq!(r, Role::Standby { holder: "b".into(), term: 2 });
    tokio::time::sleep(TTL).await;
    assert!(!active(&a.lease.roles().borrow()));
    assert!(fence_a.check().is_err(), "an old term's write passes after the heal");
    assert_eq!(b.lease.fence().check(), Ok(2));
    for i in [a, b] {
        i.stop.cancel();
        i.task.await.unwrap();
    }
}

#[tokio::test]
async fn a_clean_shutdown_releases_the_lease_and_the_standby_takes_it_at_once() {
    let nats = NatsServer::start_new();
    let a = start(kv(&nats.url()).await, "a");
    wait_role(&a, "a active", active).await;
    let b = start(kv(&nats.url()).await, "b");
    wait_role(&b, "b standby", |r| matches!(r, Role::Standby { .. })).await;
    let stopped = Instant::now();
    a.stop.cancel();
    a.task.await.unwrap();
    assert_eq!(wait_role(&b, "b takes over", active).await, Role::Active { term: 2 });
    let took = stopped.elapsed();
    println!("takeover after a release: {took:?}");
    assert!(took < TTL, "a released lease waited for the ttl: {took:?}");
    b.stop.cancel();
    b.task.await.unwrap();
}
