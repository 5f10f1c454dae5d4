//! Google's own Pub/Sub emulator (the Google Cloud CLI's
//! `pubsub-emulator` component, Java 17), one per test on a free port.
//!
//! The emulator is started directly from its launcher
//! (`<sdk>/platform/pubsub-emulator/bin/cloud-pubsub-emulator`, which
//! `exec`s java, so killing the child kills the emulator), with its own data
//! directory. Topics and subscriptions are made, and messages published,
//! over its REST API, the way `gcloud pubsub` does. Dropping the handle
//! kills it, also when the test panics.
//!
//! Found in this order: `$PUBSUB_EMULATOR_BIN`, then the SDK root that
//! `gcloud info` names. Missing, it panics with what to install: the
//! billing tests never skip.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

/// How long the JVM may take to listen (about 15 s on this kind of machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the emulator's launcher is, or what to install.
pub fn find_emulator() -> PathBuf {
    if let Some(p) = std::env::var_os("PUBSUB_EMULATOR_BIN") {
        return PathBuf::from(p);
    }
    let sdk = Command::new("gcloud")
        .args(["info", "--format=value(installation.sdk_root)"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = sdk
        .iter()
        .map(|s| s.join("platform/pubsub-emulator/bin/cloud-pubsub-emulator"))
        .chain([PathBuf::from("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")]);
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "Google's Pub/Sub emulator was not found. Install the Google Cloud CLI with its emulator \
         (`gcloud components install pubsub-emulator`, or Debian's `google-cloud-cli-pubsub-emulator`) \
         and Java 17, or set PUBSUB_EMULATOR_BIN to its `cloud-pubsub-emulator` launcher."
    )
}

/// A running emulator.
pub struct PubSubEmulator {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    /// Its project (the emulator wants 6 or more characters).
    pub project: String,
}

impl PubSubEmulator {
    /// Starts an emulator and waits until it answers.
    pub fn start(project: &str) -> Self {
        assert!(project.len() >= 6, "Pub/Sub project ids need 6 or more characters");
        let bin = find_emulator();
        let port = crate::free_port();
        let dir = tempfile::tempdir().expect("emulator dir");
        let log = std::fs::File::create(dir.path().join("emulator.log")).expect("emulator log");
        let mut child = Command::new(&bin)
            .args(["--host=127.0.0.1", &format!("--port={port}")])
            .current_dir(dir.path())
            // A small JIT and GC start faster on two cores.
            .env("CLOUD_PUBSUB_EMULATOR_OPTS", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("emulator.log")).unwrap_or_default();
                panic!("the Pub/Sub emulator exited during start-up with {status}: {log}");
            }
            if http(port, "GET", "/", "").is_ok_and(|(code, _)| code == 200) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the Pub/Sub emulator did not answer on port {port} within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { port, child: Some(child), _dir: dir, project: project.to_string() }
    }

    /// The endpoint for the client library (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `host:port`, as `PUBSUB_EMULATOR_HOST` wants it.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn call(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let (code, text) = http(self.port, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Creates a topic and a pull subscription on it; returns the
    /// subscription's full name.
    pub fn create_subscription(&self, topic: &str, subscription: &str, ack_deadline_s: u32) -> String {
        let p = &self.project;
        self.call("PUT", &format!("/v1/projects/{p}/topics/{topic}"), "{}");
        let body = serde_json::json!({
            "topic": format!("projects/{p}/topics/{topic}"),
            "ackDeadlineSeconds": ack_deadline_s,
        });
        self.call("PUT", &format!("/v1/projects/{p}/subscriptions/{subscription}"), &body.to_string());
        format!("projects/{p}/subscriptions/{subscription}")
    }

    /// Publishes one message; returns its message id.
    pub fn publish(&self, topic: &str, data: &[u8], attributes: &HashMap<String, String>) -> String {
        let body = serde_json::json!({"messages": [{
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "attributes": attributes,
        }]});
        let v = self.call("POST", &format!("/v1/projects/{}/topics/{topic}:publish", self.project), &body.to_string());
        v["messageIds"][0].as_str().unwrap_or_default().to_string()
    }

    /// Messages the subscription still holds (pulled without acking, then
    /// put back): how many are not yet acknowledged.
    pub fn unacked(&self, subscription: &str) -> usize {
        let p = &self.project;
        let v = self.call(
            "POST",
            &format!("/v1/projects/{p}/subscriptions/{subscription}:pull"),
            r#"{"maxMessages": 100, "returnImmediately": true}"#,
        );
        let ids: Vec<String> = v["receivedMessages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["ackId"].as_str().map(str::to_string))
            .collect();
        if !ids.is_empty() {
            let body = serde_json::json!({"ackIds": ids, "ackDeadlineSeconds": 0});
            self.call(
                "POST",
                &format!("/v1/projects/{p}/subscriptions/{subscription}:modifyAckDeadline"),
                &body.to_string(),
            );
        }
        ids.len()
    }
}

impl Drop for PubSubEmulator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failing test shows what the emulator said.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._dir.path().join("emulator.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- Pub/Sub emulator log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// One HTTP/1.1 request to the emulator's REST API; (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // The emulator keeps the connection open: read the head, then exactly
    // the body its length (or its chunks) says.
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(len) => rest.len() >= len,
                None if lower.contains("transfer-encoding: chunked") => rest.contains("\r\n0\r\n"),
                None => false,
            };
            if done {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
