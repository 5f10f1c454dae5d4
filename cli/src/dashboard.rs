//! The built-in dashboard: one page, its assets in the binary, live over
//! server-sent events.
//!
//! `costmesh up` serves it (`[dashboard] listen`, loopback by default) and
//! `costmesh dashboard --nats URL` serves the same page against a running
//! mesh. The server subscribes to the prefix's subjects, keeps the latest
//! of each thing the page shows (every GPU's sample, each budget's state,
//! each gateway's statistics, the last storage report, the newest actions),
//! asks the cost-watcher for the month's summary and the scheduler for the
//! job list every [`POLL`], and pushes each change to every open page. A
//! page that connects gets the whole snapshot first. Read-only unless
//! `[dashboard] admin_token_file` is set; then cancelling a job needs that
//! token as `Authorization: Bearer <token>`.
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use costmesh_bus::{Bus, Message};
use costmesh_contracts::{v1, AnyEvent, Subjects};
use costmesh_runtime::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How often the summary and the job list are asked for.
pub const POLL: Duration = Duration::from_secs(2);
/// Actions kept for the log.
const ACTIONS: usize = 200;
/// Jobs asked of the scheduler (the newest first page).
const JOBS: usize = 200;
/// Bytes of a job's log shown in its detail.
const LOG_TAIL: u64 = 4096;
/// Attempts (and marks) kept for the timeline.
const RUNS: usize = 500;

/// `[dashboard]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Serve the dashboard from `costmesh up`.
    pub enabled: bool,
    /// Where; loopback by default (it shows the mesh's costs to anyone who
    /// can reach it).
    pub listen: String,
    /// A file holding the admin token that actions (cancel a job) need;
    /// without it the dashboard only reads.
    pub admin_token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:8090".into(), admin_token_file: None }
    }
}

impl Validate for Config {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let k = |n: &str| costmesh_runtime::config::key(prefix, n);
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError {
                key: k("listen"),
                value: Some(self.listen.clone()),
                reason: "an IP address and port expected, e.g. 127.0.0.1:8090".into(),
            });
        }
        if let Some(f) = &self.admin_token_file {
            if let Err(e) = read_token(f) {
                return Err(ConfigError { key: k("admin_token_file"), value: None, reason: e });
            }
        }
        Ok(())
    }
}

fn read_token(f: &std::path::Path) -> Result<String, String> {
    let t = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(format!("{}: the token must be at least 16 characters", f.display()));
    }
    Ok(t)
}

/// What every page is shown first.
#[derive(Default, Serialize)]
struct Snapshot {
    prefix: String,
    /// Whether this server hears the mesh (its NATS connection is up).
    connected: bool,
    /// `node/gpu` -> the latest sample, in the page's terms.
    gpus: BTreeMap<String, Value>,
    /// scope -> the latest budget event.
    budgets: BTreeMap<String, Value>,
    /// gateway instance -> its latest statistics.
    cache: BTreeMap<String, Value>,
    storage: Option<Value>,
    /// The cost-watcher's month summary (`api.cost-watcher.summary`).
    summary: Option<Value>,
    /// The scheduler's job list (`api.scheduler.list`).
    jobs: Option<Value>,
    /// Newest first.
    actions: VecDeque<Value>,
    /// `job#attempt` -> {job, attempt, node, start, end, how}: what ran
    /// when, from the job events (the stream's latest of each kind per job
    /// at start, then every one heard).
    runs: BTreeMap<String, Value>,
    /// Checkpoints, interruptions and losses: {job, attempt, time, kind}.
    marks: VecDeque<Value>,
    /// The scheduler's off-peak window and tariff bands (`api.scheduler.policy`).
    policy: Option<Value>,
    /// Whether actions are possible, and why not.
    admin: Value,
}

struct Board {
    bus: Bus,
    subjects: Subjects,
    snap: Mutex<Snapshot>,
    /// (event name, JSON) to every open page.
    tx: broadcast::Sender<(&'static str, Arc<str>)>,
    token: Option<String>,
    /// Ends every open stream (a graceful shutdown waits for them).
    stop: CancellationToken,
}

impl Board {
    fn push(&self, name: &'static str, v: &Value) {
        let _ = self.tx.send((name, Arc::from(v.to_string())));
    }

    fn action(&self, a: Value) {
        {
            let mut s = self.snap.lock().expect("board lock");
            s.actions.push_front(a.clone());
            s.actions.truncate(ACTIONS);
        }
        self.push("action", &a);
    }

    /// One message from the bus into the snapshot and out to the pages.
    fn on_message(&self, msg: &Message) {
        let prefix = format!("{}.", self.subjects.prefix());
        let subject = msg.subject.strip_prefix(&prefix).unwrap_or(&msg.subject).to_string();
        if subject.starts_with("dlq.") {
            let h = |n| msg.headers.get(n).unwrap_or("?").to_string();
            self.action(json!({
                "time": chrono::Utc::now().to_rfc3339(),
                "kind": "dead letter",
                "text": format!("from {}", h(costmesh_contracts::headers::names::DLQ_SUBJECT)),
                "reason": h(costmesh_contracts::headers::names::DLQ_REASON),
            }));
            return;
        }
        let Ok((meta, e)) = costmesh_contracts::decode_any(&msg.headers, &msg.payload) else { return };
        let time = meta.time.unwrap_or_else(chrono::Utc::now).to_rfc3339();
        match e {
            AnyEvent::GpuSample(s) => {
                let v = json!({
                    "node": s.node, "gpu": s.gpu_index, "model": s.model, "time": time,
                    "power_w": s.power_draw_mw as f64 / 1000.0, "limit_w": s.power_limit_mw as f64 / 1000.0,
                    "temp_c": s.temperature_c, "util_pct": s.utilization_gpu_pct,
                    "profile": s.active_profile().as_str_name().trim_start_matches("POWER_PROFILE_").to_lowercase(),
                    "mode": s.mode().as_str_name().trim_start_matches("ENFORCEMENT_MODE_").to_lowercase(),
                    "job": s.job_id, "team": s.job_team,
                });
                self.snap.lock().expect("board lock").gpus.insert(format!("{}/{}", s.node, s.gpu_index), v.clone());
                self.push("gpu", &v);
            }
            AnyEvent::BudgetEvent(b) => {
                let money = |m: &Option<v1::Money>| m.as_ref().map_or(0.0, |m| m.micros as f64 / 1e6);
                let state = b.state().as_str_name().trim_start_matches("BUDGET_STATE_").to_lowercase();
                let v = json!({
                    "scope": b.scope, "state": state, "spent": money(&b.spent), "budget": money(&b.budget),
                    "currency": b.budget.as_ref().map(|m| m.currency_code.clone()).unwrap_or_default(),
                    "threshold": b.threshold, "period": b.period, "reason": b.reason, "time": time,
                });
                self.snap.lock().expect("board lock").budgets.insert(b.scope.clone(), v.clone());
                self.push("budget", &v);
                self.action(json!({
                    "time": time, "kind": "budget",
                    "text": format!("{} budget {}: {:.2} of {:.2}", b.scope, state, money(&b.spent), money(&b.budget)),
                    "reason": b.reason, "state": state,
                }));
            }
            AnyEvent::Action(a) => {
                let state = a.state().as_str_name().trim_start_matches("ACTION_STATE_").to_lowercase();
                let how = if a.dry_run { "proposed (dry run)".to_string() } else { state };
                self.action(json!({
                    "time": time, "kind": a.kind, "text": format!("{} {}: {how}", a.service, a.target),
                    "reason": if a.outcome.is_empty() { a.reason } else { format!("{} ({})", a.reason, a.outcome) },
                }));
            }
            AnyEvent::PowerCommand(p) => {
                let gpu = p.gpu_index.map_or("all GPUs".to_string(), |g| format!("GPU {g}"));
                let profile = p.profile().as_str_name().trim_start_matches("POWER_PROFILE_").to_lowercase();
                self.action(json!({
                    "time": time, "kind": "power", "text": format!("{} {gpu} -> {profile}", p.node), "reason": p.reason,
                }));
            }
            AnyEvent::StorageReport(r) => {
                let v = serde_json::to_value(&r).unwrap_or_default();
                self.snap.lock().expect("board lock").storage = Some(v.clone());
                self.push("storage", &v);
                let dry = r.actions.iter().any(|a| a.dry_run);
                self.action(json!({
                    "time": time, "kind": "janitor",
                    "text": format!("pass: {} action(s), {} freed{}", r.actions.len(), crate::janitor::human_bytes(r.bytes_freed), if dry { " (dry run)" } else { "" }),
                    "reason": r.actions.first().map(|a| format!("{}: {} {}", a.rule, a.action, a.path)).unwrap_or_default(),
                }));
            }
            AnyEvent::CacheStats(c) => {
                let v = serde_json::to_value(&c).unwrap_or_default();
                self.snap.lock().expect("board lock").cache.insert(c.instance.clone(), v.clone());
                self.push("cache", &v);
            }
            AnyEvent::JobEvent(j) => {
                // The list is asked for again; the event itself goes out now.
                let kind = j.kind().as_str_name().trim_start_matches("JOB_EVENT_KIND_").to_lowercase();
                self.on_run(&j, &kind, &time);
                self.push(
                    "job",
                    &json!({"id": j.job_id, "kind": kind, "node": j.node, "reason": j.reason, "time": time}),
                );
            }
            _ => {}
        }
    }

    /// A job event into the timeline: an attempt's start and end, and the
    /// marks on it.
    fn on_run(&self, j: &v1::JobEvent, kind: &str, time: &str) {
        use v1::JobEventKind as K;
        let key = format!("{}#{}", j.job_id, j.attempt);
        let ends = matches!(j.kind(), K::Exited | K::Failed | K::Interrupted | K::Lost | K::Cancelled);
        let mark = matches!(j.kind(), K::Checkpointed | K::Interrupted | K::Lost);
        if !(j.kind() == K::Started || ends || mark) || j.attempt == 0 {
            return;
        }
        let mut s = self.snap.lock().expect("board lock");
        let run = s.runs.entry(key).or_insert_with(|| json!({"job": j.job_id, "attempt": j.attempt}));
        if j.kind() == K::Started {
            run["start"] = json!(time);
            run["node"] = json!(j.node);
        } else if ends && run.get("end").is_none() {
            run["end"] = json!(time);
            run["how"] = json!(kind);
        }
        let run = run.clone();
        // Bounded: the earliest attempts go first.
        while s.runs.len() > RUNS {
            let first = s.runs.iter().min_by_key(|(_, r)| r["start"].as_str().unwrap_or("").to_string());
            match first.map(|(k, _)| k.clone()) {
                Some(k) => s.runs.remove(&k),
                None => break,
            };
        }
        let m = mark.then(|| json!({"job": j.job_id, "attempt": j.attempt, "time": time, "kind": kind}));
        if let Some(m) = &m {
            s.marks.push_front(m.clone());
            s.marks.truncate(RUNS);
        }
        drop(s);
        self.push("run", &json!({"run": run, "mark": m}));
    }

    /// The timeline from before this server started: the stream's latest
    /// job event of each kind per job.
    async fn seed_runs(&self) {
        let kinds = ["started", "checkpointed", "interrupted", "lost", "exited", "failed", "cancelled"];
        let p = self.subjects.prefix();
        let filters: Vec<String> = kinds.iter().map(|k| format!("{p}.jobs.*.{k}")).collect();
        match self.bus.last_per_subject(&self.subjects.stream_name(), &filters).await {
            Ok(mut msgs) => {
                msgs.sort_by_key(|(seq, _)| *seq);
                for (_, m) in msgs {
                    self.on_message(&m);
                }
            }
            Err(e) => tracing::debug!(error = %e, "no job history for the timeline"),
        }
    }

    async fn ask(&self, service: &str, verb: &str, body: Value) -> Result<Value, String> {
        self.ask_on(&self.subjects.api(service, verb), service, body).await
    }

    async fn ask_on(&self, subject: &str, service: &str, body: Value) -> Result<Value, String> {
        let r = self
            .bus
            .request(subject, Default::default(), Bytes::from(body.to_string()), Duration::from_secs(2))
            .await
            .map_err(|e| format!("no answer from the {service} ({e})"))?;
        serde_json::from_slice(&r.payload).map_err(|e| format!("the {service}'s answer: {e}"))
    }

    /// The summary and the job list, asked for again.
    async fn poll(&self) {
        let connected = self.bus.is_connected();
        let changed = {
            let mut s = self.snap.lock().expect("board lock");
            std::mem::replace(&mut s.connected, connected) != connected
        };
        if changed {
            self.push("status", &json!({"connected": connected}));
        }
        if let Ok(mut v) = self.ask("cost-watcher", "summary", json!({})).await {
            // The month by team (idle as its own row), for "cost by team".
            if let Ok(t) = self.ask("cost-watcher", "attribution", json!({"by": "team"})).await {
                let teams: serde_json::Map<String, Value> = t["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r["team"].as_str()?.to_string(), json!(r["cost"].as_f64()?))))
                    .collect();
                v["teams"] = Value::Object(teams);
            }
            self.snap.lock().expect("board lock").summary = Some(v.clone());
            self.push("summary", &v);
        }
        if let Ok(v) = self.ask("scheduler", "policy", json!({})).await {
            if v.get("bands").is_some() {
                self.snap.lock().expect("board lock").policy = Some(v.clone());
                self.push("policy", &v);
            }
        }
        if let Ok(v) = self.ask("scheduler", "list", json!({"limit": JOBS})).await {
            if v.get("jobs").is_some() {
                self.snap.lock().expect("board lock").jobs = Some(v.clone());
                self.push("jobs", &v);
            }
        }
    }
}

/// A 4xx (or 5xx) with the reason, as JSON.
fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(json!({"error": why.into()}))).into_response()
}

const INDEX: &str = include_str!("../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../assets/dashboard/app.js");
const STYLE: &str = include_str!("../assets/dashboard/style.css");
const UPLOT_JS: &str = include_str!("../assets/dashboard/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/dashboard/vendor/uplot/uPlot.min.css");
const FAVICON: &str = include_str!("../assets/dashboard/favicon.svg");

/// Every asset the page loads, with its type: all of it is in the binary.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", INDEX),
    ("/assets/app.js", "text/javascript; charset=utf-8", APP_JS),
    ("/assets/style.css", "text/css; charset=utf-8", STYLE),
    ("/assets/uplot.js", "text/javascript; charset=utf-8", UPLOT_JS),
    ("/assets/uplot.css", "text/css; charset=utf-8", UPLOT_CSS),
    ("/favicon.svg", "image/svg+xml", FAVICON),
];

fn asset(path: &str) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, ty, body)) => (
            [
                (header::CONTENT_TYPE, *ty),
                (header::CACHE_CONTROL, "no-cache"),
                // Nothing from anywhere else: the machine may be offline.
                (header::CONTENT_SECURITY_POLICY, "default-src 'self'; style-src 'self' 'unsafe-inline'"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no such page: {path}")),
    }
}

async fn state(State(b): State<Arc<Board>>) -> Response {
    let s = b.snap.lock().expect("board lock");
    Json(serde_json::to_value(&*s).unwrap_or_default()).into_response()
}

async fn events(State(b): State<Arc<Board>>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let rx = b.tx.subscribe();
    let stop = b.stop.clone().cancelled_owned();
    let first = serde_json::to_string(&*b.snap.lock().expect("board lock")).unwrap_or_default();
    let start = futures::stream::once(async move { Ok(Event::default().event("snapshot").data(first)) });
    let rest = futures::stream::unfold((rx, b), |(mut rx, b)| async move {
        let event = match rx.recv().await {
            Ok((name, data)) => Event::default().event(name).data(&*data),
            // Too slow a page: it gets the whole picture again.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let s = serde_json::to_string(&*b.snap.lock().expect("board lock")).unwrap_or_default();
                Event::default().event("snapshot").data(s)
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), (rx, b)))
    });
    use futures::StreamExt;
    Sse::new(start.chain(rest).take_until(stop)).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

/// A job id from a path, checked as every name that becomes a subject
/// token is, before it becomes a request.
fn job_id(id: &str) -> Result<&str, Box<Response>> {
    costmesh_contracts::subjects::validate_name(id)
        .map(|()| id)
        .map_err(|e| Box::new(refuse(StatusCode::BAD_REQUEST, format!("job id: {e}"))))
}

async fn job(State(b): State<Arc<Board>>, Path(id): Path<String>) -> Response {
    let id = match job_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match b.ask("scheduler", "show", json!({"id": id})).await {
        Ok(mut v) if v.get("job").is_some() => {
            // What it cost so far (all attempts), and the tail of its log
            // from the node it ran on; each left out when not answered.
            if let Ok(c) = b.ask("cost-watcher", "attribution", json!({"by": "job"})).await {
                let row = c["rows"].as_array().into_iter().flatten().find(|r| r["job"] == id).cloned();
                v["cost"] = row.unwrap_or(Value::Null);
                v["currency"] = c["currency"].clone();
            }
            if let Some(node) =
                v["job"]["node"].as_str().filter(|n| costmesh_contracts::subjects::validate_token(n).is_ok())
            {
                let attempt = v["job"]["attempt"].as_u64().unwrap_or(1);
                let ask = json!({"job_id": id, "attempt": attempt, "tail_bytes": LOG_TAIL});
                if let Ok(l) = b.ask_on(&b.subjects.node_logs(node), "gpu-agent", ask).await {
                    v["log_tail"] = l["log"].clone();
                }
            }
            Json(v).into_response()
        }
        Ok(v) => refuse(StatusCode::NOT_FOUND, v["error"].as_str().unwrap_or("unknown job")),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn cancel(State(b): State<Arc<Board>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(token) = &b.token else {
        return refuse(StatusCode::FORBIDDEN, "actions are off: set [dashboard] admin_token_file to allow them");
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return refuse(StatusCode::UNAUTHORIZED, "the admin token is needed: Authorization: Bearer <token>");
    };
    use subtle::ConstantTimeEq;
    if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong admin token");
    }
    let id = match job_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match b.ask("scheduler", "cancel", json!({"id": id})).await {
        Ok(v) if v.get("error").is_none() => Json(v).into_response(),
        Ok(v) => refuse(StatusCode::CONFLICT, v["error"].as_str().unwrap_or("refused")),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Serves the dashboard on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    bus: Bus,
    prefix: &str,
    cfg: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(prefix).map_err(anyhow::Error::msg)?;
    let token = cfg.admin_token_file.as_deref().map(read_token).transpose().map_err(anyhow::Error::msg)?;
    let admin = match &token {
        Some(_) => json!({"enabled": true, "why": "actions need the admin token"}),
        None => json!({"enabled": false, "why": "read-only: [dashboard] admin_token_file is not set"}),
    };
    let snap = Snapshot { prefix: prefix.to_string(), connected: bus.is_connected(), admin, ..Default::default() };
    let board = Arc::new(Board {
        bus: bus.clone(),
        subjects: subjects.clone(),
        snap: Mutex::new(snap),
        tx: broadcast::channel(1024).0,
        token,
        stop: shutdown.clone(),
    });

    let mut sub = bus.subscribe(&subjects.all()).await?;
    board.seed_runs().await;
    let (b, stop) = (board.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                m = sub.next() => match m { Some(m) => b.on_message(&m), None => return },
            }
        }
    });
    let (b, stop) = (board.clone(), shutdown.clone());
    tokio::spawn(async move {
        loop {
            b.poll().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    });

    let app = Router::new()
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .method_not_allowed_fallback(|m: axum::http::Method, uri: axum::http::Uri| async move {
            refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{m} is not allowed on {}", uri.path()))
        })
        .fallback(|uri: axum::http::Uri| async move {
            let p = uri.path();
            if p.starts_with("/api/") {
                refuse(StatusCode::NOT_FOUND, format!("no such endpoint: {p} (see docs/dashboard.md)"))
            } else {
                asset(p)
            }
        })
        .with_state(board);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}
