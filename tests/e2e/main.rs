//! End-to-end scenarios: the five service binaries as separate processes
//! against a private nats-server (JetStream) and redis-server, with
//! simulated GPUs, local GCE metadata servers, Google's Pub/Sub emulator and an
//! OTLP receiver, all on loopback. Waits are on events with timeouts.
//!
//! The binaries come from the same target directory as this test
//! (`cargo test --workspace` builds them: every service has integration tests).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::any;
use axum::Router;
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{BudgetState, JobEventKind};
use costmesh_contracts::{AnyEvent, Subjects};
use costmesh_testkit::emulator::PubSubEmulator;
use costmesh_testkit::metadata::MetadataServer;
use costmesh_testkit::otlp::OtlpReceiver;
use costmesh_testkit::{free_port, NatsServer, RedisServer};
use serde_json::{json, Value};

mod kills;
mod scenarios;
mod security;

const WAIT: Duration = Duration::from_secs(30);
/// How long a process may take to be ready: eight scenarios start their
/// meshes (and Java for the Pub/Sub emulator) at once on two cores; a
/// gateway once took over 30 s in CI.
const START_WAIT: Duration = Duration::from_secs(90);

/// One scenario at a time: each runs a dozen processes, and two cores
/// shared by four meshes starve them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// In `extra_env` (as a key): run the mesh on a cluster of that many servers.
const CLUSTER: &str = "@cluster";

/// In `extra_env`, stands for the real time the mesh starts (RFC 3339).
pub const STARTED_AT: &str = "@started-at";

fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    for b in ["gpu-agent", "scheduler", "storage-janitor", "cost-watcher", "cache-gateway", "costmesh"] {
        assert!(dir.join(b).is_file(), "{} missing: run `cargo build --workspace --bins` first", dir.join(b).display());
    }
    dir
}

fn workspace_root() -> PathBuf {
    let here = std::env::current_dir().unwrap();
    here.ancestors().find(|d| d.join("Cargo.lock").is_file()).unwrap().to_path_buf()
}

/// A simulated GPU host.
pub struct Host {
    pub name: &'static str,
    pub cloud: bool,
    pub preemptible: bool,
}

/// A model backend that counts its calls.
pub struct Model {
    pub url: String,
    pub calls: Arc<AtomicUsize>,
}

async fn model(tag: &'static str) -> Model {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().fallback(any(move || {
        c.fetch_add(1, Ordering::SeqCst);
        async move { ([("content-type", "application/json")], format!(r#"{{"from":"{tag}"}}"#)) }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Model { url, calls }
}

struct Proc {
    name: String,
    child: tokio::process::Child,
    admin: u16,
    /// How it was started, to start it again after a kill.
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, env: &[(String, String)], log: &Path) -> tokio::process::Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        tokio::process::Command::new(bin)
            .envs(env.iter().cloned())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }
}

/// The whole mesh as processes.
pub struct Mesh {
    /// The nats-server (the first of the cluster's on a cluster mesh).
    pub nats: NatsServer,
    /// The other servers of a 3-node cluster ([`Mesh::start_on_cluster`]).
    pub peers: Vec<NatsServer>,
    /// Every server's URL, as the services were given them.
    pub nats_urls: String,
    pub redis: RedisServer,
    /// Google's Pub/Sub emulator with the budget topic and the cost-watcher's
    /// subscription (meshes started with [`Mesh::start_with_billing`]).
    pub pubsub: Option<PubSubEmulator>,
    pub otlp: OtlpReceiver,
    pub metadata: HashMap<&'static str, MetadataServer>,
    pub bus: Bus,
    pub subjects: Subjects,
    pub work: tempfile::TempDir,
    pub gateway: String,
    pub regular: Model,
    pub spot: Model,
    /// Every event seen on the prefix, in order: (subject, event).
    pub events: Arc<Mutex<Vec<(String, AnyEvent)>>>,
    /// Under the generated authorization: the users' key files
    /// (`<user>.nk`) and the Redis password file.
    pub keys: Option<PathBuf>,
    procs: Vec<Proc>,
    /// The NATS connection of each standby started by
    /// [`Mesh::start_with_standbys`] goes through one of these, so a test can
    /// cut that process off without touching it.
    pub proxies: HashMap<String, costmesh_testkit::proxy::TcpProxy>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// How long a budget notification may take to be read after a
/// cost-watcher was killed: the emulator keeps a killed subscriber's stream
/// (its gRPC layer fails closing it) and hands messages there first; they
/// come back each time the 10 s ack deadline lapses, to a stream it picks,
/// now and then the dead one again (70 s seen once in 40 runs).
pub const PUBSUB_WAIT: Duration = Duration::from_secs(180);

/// The topic GCP budget notifications arrive on, in the emulator.
pub const BUDGET_TOPIC: &str = "budget-alerts";

/// The Redis password of a secure mesh (a test fixture, grepped for in logs).
pub const REDIS_PASSWORD: &str = "redis-pw-5f2c9a7e";

impl Mesh {
    pub async fn start(test: &str, hosts: &[Host], extra_env: &[(&str, &str)]) -> Mesh {
        Self::start_with(test, hosts, extra_env, false, false, false).await
    }

    /// On a 3-node nats-server cluster: every stream and bucket R3, the
    /// services given all three URLs.
    pub async fn start_on_cluster(test: &str, hosts: &[Host], extra_env: &[(&str, &str)]) -> Mesh {
        let mut env = extra_env.to_vec();
        env.push((CLUSTER, "3"));
        Self::start_with(test, hosts, &env, false, false, false).await
    }

    /// With a second scheduler (`scheduler-2`) and a second cost-watcher
    /// (`cost-watcher-2`) standing by; the first of each is the active one.
    pub async fn start_with_standbys(test: &str, hosts: &[Host], extra_env: &[(&str, &str)]) -> Mesh {
        Self::start_with(test, hosts, extra_env, false, false, true).await
    }

    /// With GCP budget notifications: the cost-watcher reads the
    /// subscription `budget` of Google's Pub/Sub emulator (about 15 s to start).
    pub async fn start_with_billing(test: &str, hosts: &[Host], extra_env: &[(&str, &str)]) -> Mesh {
        Self::start_with(test, hosts, extra_env, false, true, false).await
    }

    /// Publishes a budget notification on the emulator's topic.
    pub fn notify(&self, data: Vec<u8>, attributes: HashMap<String, String>) {
        self.pubsub.as_ref().expect("a mesh started with billing").publish(BUDGET_TOPIC, &data, &attributes);
    }

    /// The mesh as compose deploys it: NATS under `costmesh nats-config`'s
    /// authorization (one nkey user per service and node, a client user
    /// `alice`, the harness as operator `harness`), signed commands to
    /// nodes, and Redis behind a password read from a file.
    pub async fn start_secure(test: &str, hosts: &[Host]) -> Mesh {
        Self::start_with(test, hosts, &[], true, false, false).await
    }

    async fn start_with(
        test: &str,
        hosts: &[Host],
        extra_env: &[(&str, &str)],
        secure: bool,
        billing: bool,
        standbys: bool,
    ) -> Mesh {
        let serial = SERIAL.lock().await;
        let started_at = chrono::Utc::now().to_rfc3339();
        let cluster: Option<usize> = extra_env.iter().find(|(k, _)| *k == CLUSTER).map(|(_, n)| n.parse().unwrap());
        let extra_env: Vec<(String, String)> = extra_env
            .iter()
            .filter(|(k, _)| *k != CLUSTER)
            .map(|(k, v)| (k.to_string(), if *v == STARTED_AT { started_at.clone() } else { v.to_string() }))
            .collect();
        let bins = bin_dir();
        let prefix = costmesh_testkit::unique_prefix(test);
        let work = tempfile::tempdir().unwrap();
        let keys = secure.then(|| work.path().join("keys"));
        let mut peers = Vec::new();
        let (nats, redis, harness) = match &keys {
            None if cluster.is_some() => {
                let mut c = costmesh_testkit::NatsCluster::start(cluster.unwrap_or(3));
                let mut nodes = std::mem::take(&mut c.nodes).into_iter();
                let first = nodes.next().unwrap();
                peers.extend(nodes);
                let harness = costmesh_bus::NatsConnectOptions { replicas: peers.len() + 1, ..Default::default() };
                (first, RedisServer::start_new(), harness)
            }
            None => (NatsServer::start_new(), RedisServer::start_new(), Default::default()),
            Some(keys) => {
                let mut args = vec!["nats-config".to_string(), "--keys-dir".into(), keys.display().to_string()];
                args.extend(["--prefix".into(), prefix.clone(), "--client".into(), "alice".into()]);
                args.extend(["--admin".into(), "harness".into()]);
                for h in hosts {
                    args.extend(["--node".into(), h.name.to_string()]);
                }
                let auth = work.path().join("auth.conf");
                args.extend(["--out".into(), auth.display().to_string()]);
                let out = std::process::Command::new(bins.join("costmesh")).args(&args).output().unwrap();
                assert!(out.status.success(), "nats-config: {}", String::from_utf8_lossy(&out.stderr));
                std::fs::write(work.path().join("nats-config.out"), [out.stdout, out.stderr].concat()).unwrap();
                let conf = work.path().join("nats.conf");
                std::fs::write(&conf, "include \"auth.conf\"\n").unwrap();
                std::fs::write(keys.join("redis.pw"), format!("{REDIS_PASSWORD}\n")).unwrap();
                let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()]);
                let redis = RedisServer::start_with_args(&["--requirepass", REDIS_PASSWORD]);
                let harness = costmesh_bus::NatsConnectOptions {
                    nkey_seed: Some(std::fs::read_to_string(keys.join("admin-harness.nk")).unwrap()),
                    ..Default::default()
                };
                (nats, redis, harness)
            }
        };
        let pubsub = billing.then(|| {
            let e = PubSubEmulator::start("costmesh-test");
            e.create_subscription(BUDGET_TOPIC, "budget", 10);
            e
        });
        let otlp = OtlpReceiver::start().await;
        let nats_urls = std::iter::once(&nats).chain(&peers).map(NatsServer::url).collect::<Vec<_>>().join(",");
        let bus = Bus::Nats(NatsBus::connect(&nats_urls, &harness).await.unwrap());
        let subjects = Subjects::new(&prefix).unwrap();
        // Each process's NATS user, and what it signs or trusts.
        let auth = |user: &str| -> Vec<(String, String)> {
            match &keys {
                None => Vec::new(),
                Some(k) => {
                    vec![("COSTMESH__NATS__NKEY_SEED_FILE".into(), k.join(format!("{user}.nk")).display().to_string())]
                }
            }
        };
        let scheduler_key = keys.as_ref().map(|k| {
            let seed = std::fs::read_to_string(k.join("scheduler.nk")).unwrap();
            nkeys::KeyPair::from_seed(seed.trim()).unwrap().public_key()
        });
        let (regular, spot) = (model("regular").await, model("spot").await);

        // Record every event.
        let events: Arc<Mutex<Vec<(String, AnyEvent)>>> = Default::default();
        let mut sub = bus.subscribe(&subjects.all()).await.unwrap();
        bus.flush().await.unwrap();
        let ev = events.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok((_, e)) = costmesh_contracts::decode_any(&m.headers, &m.payload) {
                    ev.lock().unwrap().push((m.subject.clone(), e));
                }
            }
        });

        let gateway_port = free_port();
        let common: Vec<(String, String)> = vec![
            ("COSTMESH__NATS__URL".into(), nats_urls.clone()),
            ("COSTMESH__NATS__REPLICAS".into(), (peers.len() + 1).to_string()),
            ("COSTMESH__MESH__SUBJECT_PREFIX".into(), prefix.clone()),
            ("COSTMESH__LOG__LEVEL".into(), "info".into()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
            // A killed scheduler's or cost-watcher's successor waits this long.
            ("COSTMESH__MESH__LEASE__TTL".into(), "3s".into()),
        ];
        let mut metadata = HashMap::new();
        let mut procs = Vec::new();
        let mut proxies = HashMap::new();
        for name in ["scheduler-2", "cost-watcher-2"].into_iter().filter(|_| standbys) {
            proxies.insert(name.to_string(), costmesh_testkit::proxy::TcpProxy::start(nats.port()).await);
        }
        let via_proxy = |name: &str| -> Vec<(String, String)> {
            proxies.get(name).map(|p| vec![("COSTMESH__NATS__URL".to_string(), p.nats_url())]).unwrap_or_default()
        };
        let mut spawn = |name: &str, bin: &str, section: &str, env: Vec<(String, String)>| {
            let admin = free_port();
            let log = work.path().join(format!("{name}.log"));
            let mut all = common.clone();
            all.push((format!("COSTMESH__{section}__ADMIN__LISTEN"), format!("127.0.0.1:{admin}")));
            all.extend(env);
            all.extend(extra_env.iter().cloned());
            let bin = bins.join(bin);
            let child = Proc::spawn(&bin, &all, &log);
            procs.push(Proc { name: name.to_string(), child, admin, bin, env: all, log });
            admin
        };
        // The cost-watcher first, ready before any agent samples: it sees
        // each GPU's first sample, as the test's recorder does.
        let cw_env: Vec<(String, String)> = [
            auth("cost-watcher"),
            vec![
                ("COSTMESH__COST_WATCHER__EVALUATE_INTERVAL".into(), "1s".into()),
                ("COSTMESH__COST_WATCHER__JOB_COST_SETTLE".into(), "2s".into()),
            ],
            pubsub
                .iter()
                .flat_map(|e| {
                    [
                        (
                            "COSTMESH__COST_WATCHER__BILLING__SUBSCRIPTION".to_string(),
                            "projects/costmesh-test/subscriptions/budget".to_string(),
                        ),
                        ("COSTMESH__COST_WATCHER__BILLING__ENDPOINT".to_string(), e.endpoint()),
                        ("COSTMESH__COST_WATCHER__BILLING__CREDENTIALS".to_string(), "anonymous".to_string()),
                    ]
                })
                .collect(),
        ]
        .concat();
        let cw_admin = spawn("cost-watcher", "cost-watcher", "COST_WATCHER", cw_env.clone());
        costmesh_testkit::eventually(WAIT, "cost-watcher ready", || async move {
            costmesh_testkit::http_get(&format!("127.0.0.1:{cw_admin}"), "/readyz").await.is_ok_and(|(s, _)| s == 200)
        })
        .await;
        if standbys {
            spawn("cost-watcher-2", "cost-watcher", "COST_WATCHER", [cw_env, via_proxy("cost-watcher-2")].concat());
        }
        for h in hosts {
            let meta = MetadataServer::start().await;
            let e = |k: &str, v: String| (format!("COSTMESH__GPU_AGENT__{k}"), v);
            let mut env = auth(&format!("gpu-agent-{}", h.name));
            if let Some(k) = &scheduler_key {
                env.push(e("TRUSTED_SCHEDULER_KEYS", format!("[{k:?}]")));
            }
            spawn(
                h.name,
                "gpu-agent",
                "GPU_AGENT",
                [
                    env,
                    vec![
                        e("NODE", h.name.into()),
                        e("BACKEND", "sim".into()),
                        e("SAMPLE_INTERVAL", "500ms".into()),
                        e("CLOUD", h.cloud.to_string()),
                        e("PREEMPTIBLE", h.preemptible.to_string()),
                        e("PREEMPTION__ENABLED", h.preemptible.to_string()),
                        e("PREEMPTION__METADATA_URL", meta.url().to_string()),
                        e("JOBS__LOGS_ROOT", work.path().join("logs").join(h.name).display().to_string()),
                        e("JOBS__STOP_GRACE", "5s".into()),
                        e(
                            "JOBS__ALLOWED_COMMANDS",
                            format!("[{:?}]", workspace_root().join("examples/jobs").display().to_string()),
                        ),
                        e("JOBS__RUN_AS_USER", costmesh_testkit::current_user()),
                    ],
                ]
                .concat(),
            );
            metadata.insert(h.name, meta);
        }
        let sched_env: Vec<(String, String)> = [
            auth("scheduler"),
            vec![
                ("COSTMESH__SCHEDULER__RETRY_BACKOFF".into(), "1s".into()),
                ("COSTMESH__SCHEDULER__DECIDE_INTERVAL".into(), "1s".into()),
            ],
            keys.iter()
                .map(|k| {
                    ("COSTMESH__SCHEDULER__SIGNING_KEY_FILE".to_string(), k.join("scheduler.nk").display().to_string())
                })
                .collect(),
        ]
        .concat();
        let sched_admin = spawn("scheduler", "scheduler", "SCHEDULER", sched_env.clone());
        if standbys {
            // Started once the first one acts, so the first is the active one.
            costmesh_testkit::eventually(START_WAIT, "scheduler active", || async move {
                costmesh_testkit::http_get(&format!("127.0.0.1:{sched_admin}"), "/readyz")
                    .await
                    .is_ok_and(|(s, b)| s == 200 && b.contains("lease: ok, active"))
            })
            .await;
            spawn("scheduler-2", "scheduler", "SCHEDULER", [sched_env, via_proxy("scheduler-2")].concat());
        }
        let base = work.path().join("storage");
        std::fs::create_dir_all(base.join("logs")).unwrap();
        spawn(
            "storage-janitor",
            "storage-janitor",
            "STORAGE_JANITOR",
            [
                auth("storage-janitor"),
                vec![
                    ("COSTMESH__STORAGE_JANITOR__BASE_DIR".into(), base.display().to_string()),
                    // Passes only when asked (a full disk here must not add passes).
                    ("COSTMESH__STORAGE_JANITOR__DISK_PRESSURE_PCT".into(), "100".into()),
                ],
            ]
            .concat(),
        );
        let routes = format!(
            r#"[{{ name = "chat", backends = ["{}", {{ url = "{}", pool = "preemptible", node = "spot-1" }}] }}, {{ name = "batch", priority = "low", backends = ["{}"] }}]"#,
            regular.url, spot.url, regular.url
        );
        spawn(
            "cache-gateway",
            "cache-gateway",
            "CACHE_GATEWAY",
            [
                auth("cache-gateway"),
                keys.iter()
                    .map(|k| ("COSTMESH__REDIS__PASSWORD_FILE".to_string(), k.join("redis.pw").display().to_string()))
                    .collect(),
                vec![
                    ("COSTMESH__REDIS__URL".into(), redis.url()),
                    ("COSTMESH__CACHE_GATEWAY__LISTEN".into(), format!("127.0.0.1:{gateway_port}")),
                    ("COSTMESH__CACHE_GATEWAY__ROUTES".into(), routes),
                    ("COSTMESH__CACHE_GATEWAY__HEALTH_INTERVAL".into(), "200ms".into()),
                    ("COSTMESH__CACHE_GATEWAY__STATS_INTERVAL".into(), "1s".into()),
                ],
            ]
            .concat(),
        );
        let mesh = Mesh {
            nats,
            peers,
            nats_urls,
            redis,
            pubsub,
            otlp,
            metadata,
            bus,
            subjects,
            work,
            gateway: format!("127.0.0.1:{gateway_port}"),
            regular,
            spot,
            events,
            keys,
            procs,
            proxies,
            _serial: serial,
        };
        mesh.wait_ready().await;
        mesh.wait_nodes(hosts.len()).await;
        mesh
    }

    /// Every process answers `/readyz` with 200.
    pub async fn wait_ready(&self) {
        for p in &self.procs {
            let addr = format!("127.0.0.1:{}", p.admin);
            let name = p.name.clone();
            costmesh_testkit::eventually(START_WAIT, &format!("{name} ready"), || {
                let addr = addr.clone();
                async move { costmesh_testkit::http_get(&addr, "/readyz").await.is_ok_and(|(s, _)| s == 200) }
            })
            .await;
        }
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs.iter_mut().find(|p| p.name == name).unwrap_or_else(|| panic!("no process {name}"))
    }

    /// SIGKILL, as the OOM killer does: no drain, no final word.
    pub async fn kill(&mut self, name: &str) {
        let p = self.proc(name);
        p.child.start_kill().unwrap();
        p.child.wait().await.unwrap();
    }

    /// Starts a killed process again with the same configuration (and admin
    /// port) and waits until it is ready.
    /// A scheduler or cost-watcher with no other instance alive waits
    /// until it holds the lease (a killed one's lease runs out first).
    pub async fn restart(&mut self, name: &str) {
        let p = self.proc(name);
        p.child = Proc::spawn(&p.bin, &p.env, &p.log);
        let bin = p.bin.clone();
        let addr = format!("127.0.0.1:{}", p.admin);
        let alone =
            !self.procs.iter_mut().any(|o| o.name != name && o.bin == bin && o.child.try_wait().unwrap().is_none());
        costmesh_testkit::eventually(WAIT, &format!("{name} ready again"), || {
            let addr = addr.clone();
            async move {
                costmesh_testkit::http_get(&addr, "/readyz").await.is_ok_and(|(s, b)| {
                    s == 200 && (!alone || !b.contains("lease:") || b.contains("lease: ok, active"))
                })
            }
        })
        .await;
    }

    /// Which instance of `names` says it is active, waiting up to `wait`.
    pub async fn active_of(&self, names: &[&str], wait: Duration) -> String {
        costmesh_testkit::wait_for(wait, &format!("one of {names:?} active"), || async {
            for n in names {
                let (status, body) = self.readyz(n).await;
                if status == 200 && body.contains("lease: ok, active") {
                    return Ok(n.to_string());
                }
            }
            Err("none active".to_string())
        })
        .await
    }

    fn admin_of(&self, name: &str) -> u16 {
        self.procs.iter().find(|p| p.name == name).map(|p| p.admin).unwrap_or_else(|| panic!("no process {name}"))
    }

    /// A service's `/readyz`: (status, body).
    pub async fn readyz(&self, name: &str) -> (u16, String) {
        let addr = format!("127.0.0.1:{}", self.admin_of(name));
        costmesh_testkit::http_get(&addr, "/readyz").await.unwrap_or((0, String::new()))
    }

    /// A service's `/metrics` text.
    pub async fn metrics(&self, name: &str) -> String {
        let addr = format!("127.0.0.1:{}", self.admin_of(name));
        costmesh_testkit::http_get(&addr, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }

    /// No process has exited.
    pub fn all_alive(&mut self) {
        let dir = self.work.path().to_path_buf();
        for p in &mut self.procs {
            assert!(p.child.try_wait().unwrap().is_none(), "{} exited; see {}/{}.log", p.name, dir.display(), p.name);
        }
    }

    pub async fn wait_nodes(&self, n: usize) {
        costmesh_testkit::eventually(WAIT, "the scheduler knows every node", || async {
            let v = self.api("nodes", json!({})).await;
            v["nodes"].as_array().is_some_and(|a| a.iter().filter(|n| n["alive"] == true).count() >= n)
        })
        .await;
    }

    pub async fn api(&self, verb: &str, body: Value) -> Value {
        self.api_as(verb, body, None).await
    }

    /// A request under `costmesh-request-id: request_id`; Null without an answer.
    pub async fn api_as(&self, verb: &str, body: Value, request_id: Option<&str>) -> Value {
        let mut headers = costmesh_bus::Headers::new();
        if let Some(r) = request_id {
            headers.insert(costmesh_runtime::events::REQUEST_ID, r);
        }
        match self
            .bus
            .request(
                &self.subjects.api("scheduler", verb),
                headers,
                bytes::Bytes::from(body.to_string()),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(m) => serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    pub async fn submit(&self, spec: Value) -> String {
        let r = self.api("submit", spec).await;
        r["job"]["id"].as_str().unwrap_or_else(|| panic!("submit refused: {r}")).to_string()
    }

    pub async fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_job_for(WAIT, id, what, pred).await
    }

    pub async fn wait_job_for(&self, wait: Duration, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        costmesh_testkit::wait_for(wait, what, || async {
            let j = self.api("show", json!({ "id": id })).await["job"].clone();
            if pred(&j) {
                Ok(j)
            } else {
                Err(j.to_string())
            }
        })
        .await
    }

    /// Events whose subject starts with `<prefix>.<rest>`.
    pub fn seen(&self, rest: &str) -> Vec<(String, AnyEvent)> {
        let p = format!("{}.{rest}", self.subjects.prefix());
        self.events.lock().unwrap().iter().filter(|(s, _)| s.starts_with(&p)).cloned().collect()
    }

    pub async fn wait_seen(&self, rest: &str, what: &str, n: usize) {
        costmesh_testkit::eventually(WAIT, what, || async { self.seen(rest).len() >= n }).await;
    }

    pub fn job_events(&self, job: &str, kind: JobEventKind) -> Vec<costmesh_contracts::v1::JobEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, e)| match e {
                AnyEvent::JobEvent(j) if j.job_id == job && j.kind() == kind => Some(j.clone()),
                _ => None,
            })
            .collect()
    }

    /// Budget events seen, by (scope, state).
    pub fn budget_counts(&self) -> BTreeMap<(String, BudgetState), usize> {
        let mut by = BTreeMap::new();
        for (_, e) in self.events.lock().unwrap().iter() {
            if let AnyEvent::BudgetEvent(b) = e {
                *by.entry((b.scope.clone(), b.state())).or_insert(0) += 1;
            }
        }
        by
    }

    /// One request through the gateway: (status, cache-status).
    pub async fn ask(&self, route: &str, body: &str, no_store: bool) -> (u16, String) {
        let mut req = reqwest::Client::new()
            .post(format!("http://{}/{route}/v1/generate", self.gateway))
            .header("content-type", "application/json")
            .body(body.to_string());
        if no_store {
            req = req.header("cache-control", "no-store");
        }
        match req.send().await {
            Ok(r) => {
                let cs = r.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                (r.status().as_u16(), cs)
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// The example training job, on `gpus` GPUs.
    pub fn train_job(&self, name: &str, extra: Value) -> Value {
        let mut spec = json!({
            "name": name,
            "command": workspace_root().join("examples/jobs/train.sh").display().to_string(),
            "gpus": 1,
            "estimatedDurationS": "1800",
            "class": "JOB_CLASS_TRAINING",
            "checkpointDir": self.work.path().join("ckpt").join(name).display().to_string(),
            "maxRetries": 3,
        });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            spec[k] = v;
        }
        spec
    }

    /// A job attempt's log on its node.
    pub fn job_log(&self, node: &str, job: &str, attempt: u32) -> String {
        std::fs::read_to_string(self.work.path().join("logs").join(node).join(job).join(format!("{attempt}.log")))
            .unwrap_or_default()
    }

    /// Every process's log so far, by name.
    pub fn logs(&self) -> Vec<(String, String)> {
        self.procs.iter().map(|p| (p.name.clone(), std::fs::read_to_string(&p.log).unwrap_or_default())).collect()
    }

    /// Spans received for `trace_id`, by service.
    pub fn trace_services(&self, trace_id: &[u8]) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for s in self.otlp.spans().into_iter().filter(|s| s.trace_id == trace_id) {
            *by.entry(s.service).or_insert(0) += 1;
        }
        by
    }
}

impl Drop for Mesh {
    /// A failed scenario keeps its processes' logs (their directory goes
    /// with the mesh): copied to `$TMPDIR/costmesh-e2e-<prefix>`.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("costmesh-e2e-{}", self.subjects.prefix()));
            let _ = std::fs::create_dir_all(&keep);
            for p in &self.procs {
                let _ = std::fs::copy(&p.log, keep.join(p.log.file_name().unwrap_or_default()));
            }
            let _ = std::fs::copy(self.nats.store_dir().join("nats-server.log"), keep.join("nats-server.log"));
            eprintln!("e2e: process logs kept in {}", keep.display());
        }
    }
}
