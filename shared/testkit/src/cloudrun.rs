//! A local server speaking the parts of the Cloud Run Admin API v2 and the
//! Cloud Monitoring API v3 that `costmesh rightsize` calls, in Google's
//! JSON formats: `services.get`, `services.patch` (its `updateMask`
//! recorded, answering a long-running operation) and `operations.get`
//! (`done` with the updated service as its response), and
//! `projects.timeSeries.list` returning the series set for a metric type
//! and aligner when the filter names the service. One URL serves both APIs.
//!
//! Nothing real can run here (both are Google's services); this fake is
//! what right-sizing is tested against.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

#[derive(Default)]
struct Inner {
    /// `projects/<p>/locations/<l>/services/<s>` -> the service's JSON.
    services: HashMap<String, Value>,
    /// (metric type suffix, aligner name) -> hourly points.
    series: HashMap<(String, String), Vec<f64>>,
    /// Every `updateMask` sent, with the body.
    patches: Vec<(String, Value)>,
    ops: HashMap<String, Value>,
    calls: Vec<String>,
}

/// The server. Clones share it.
#[derive(Clone)]
pub struct FakeCloudRun {
    url: String,
    inner: Arc<Mutex<Inner>>,
}

fn google_error(status: u16, grpc: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status, "message": message, "status": grpc}});
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

/// Aligners by name or number (the client may send either).
fn aligner(v: &str) -> &str {
    match v {
        "2" | "ALIGN_RATE" => "ALIGN_RATE",
        "11" | "ALIGN_MAX" => "ALIGN_MAX",
        "12" | "ALIGN_MEAN" => "ALIGN_MEAN",
        "19" | "ALIGN_PERCENTILE_95" => "ALIGN_PERCENTILE_95",
        other => other,
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let mut g = inner.lock().expect("fake cloud run lock");
    g.calls.push(format!("{method} {path}"));
    if let Some(name) = path.strip_prefix("/v3/").and_then(|p| p.strip_suffix("/timeSeries")) {
        let filter = q.get("filter").cloned().unwrap_or_default();
        let Some(mt) = filter.split("metric.type=\"run.googleapis.com/").nth(1).and_then(|r| r.split('"').next())
        else {
            return google_error(
                400,
                "INVALID_ARGUMENT",
                &format!("Field filter had an invalid value of \"{filter}\""),
            );
        };
        let al = aligner(q.get("aggregation.perSeriesAligner").map(String::as_str).unwrap_or("")).to_string();
        if !q.contains_key("aggregation.alignmentPeriod") || !q.contains_key("interval.endTime") {
            return google_error(400, "INVALID_ARGUMENT", "interval and aggregation.alignmentPeriod are required");
        }
        // Only the services this server holds have data, and only when the filter names them.
        let known = g.services.keys().any(|s| {
            let parts: Vec<&str> = s.split('/').collect();
            s.starts_with(&format!("{name}/"))
                && filter.contains(&format!("resource.labels.service_name=\"{}\"", parts[5]))
                && filter.contains(&format!("resource.labels.location=\"{}\"", parts[3]))
        });
        let points = g.series.get(&(mt.to_string(), al.clone())).filter(|_| known).cloned().unwrap_or_default();
        let int = mt.ends_with("instance_count") && al != "ALIGN_MEAN";
        let pts: Vec<Value> = points
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let value = if int { json!({"int64Value": format!("{}", *v as i64)}) } else { json!({"doubleValue": v}) };
                json!({"interval": {"startTime": format!("2026-11-01T{:02}:00:00Z", i % 24), "endTime": format!("2026-11-01T{:02}:59:59Z", i % 24)}, "value": value})
            })
            .collect();
        let ts = if pts.is_empty() {
            json!({})
        } else {
            json!({"timeSeries": [{"metric": {"type": format!("run.googleapis.com/{mt}")},
                "resource": {"type": "cloud_run_revision"}, "metricKind": "GAUGE",
                "valueType": if int { "INT64" } else { "DOUBLE" }, "points": pts}]})
        };
        return (StatusCode::OK, axum::Json(ts)).into_response();
    }
    let Some(name) = path.strip_prefix("/v2/") else {
        return google_error(404, "NOT_FOUND", &format!("{path} not found"));
    };
    let name = name.to_string();
    match method {
        Method::GET if name.contains("/operations/") => match g.ops.get(&name) {
            Some(op) => (StatusCode::OK, axum::Json(op.clone())).into_response(),
            None => google_error(404, "NOT_FOUND", &format!("Operation {name} not found")),
        },
        Method::GET => match g.services.get(&name) {
            Some(s) => (StatusCode::OK, axum::Json(s.clone())).into_response(),
            None => google_error(404, "NOT_FOUND", &format!("Resource '{name}' of kind 'SERVICE' does not exist.")),
        },
        Method::PATCH => {
            let Some(current) = g.services.get(&name).cloned() else {
                return google_error(404, "NOT_FOUND", &format!("Resource '{name}' of kind 'SERVICE' does not exist."));
            };
            let mask = q.get("updateMask").cloned().unwrap_or_default();
            let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            g.patches.push((mask.clone(), sent.clone()));
            let mut next = current.clone();
            for path in mask.split(',').filter(|p| !p.is_empty()) {
                let (a, b) = path.split_once('.').unwrap_or((path, ""));
                let v = if b.is_empty() { sent[a].clone() } else { sent[a][b].clone() };
                if b.is_empty() {
                    next[a] = v;
                } else {
                    next[a][b] = v;
                }
            }
            let gen = next["generation"].as_str().and_then(|g| g.parse::<i64>().ok()).unwrap_or(1) + 1;
            next["generation"] = json!(gen.to_string());
            g.services.insert(name.clone(), next.clone());
            let parts: Vec<&str> = name.split('/').collect();
            let op_name = format!("projects/{}/locations/{}/operations/op-{}", parts[1], parts[3], g.ops.len() + 1);
            let mut response = next.clone();
            response["@type"] = json!("type.googleapis.com/google.cloud.run.v2.Service");
            g.ops.insert(
                op_name.clone(),
                json!({"name": op_name, "done": true, "metadata": response.clone(), "response": response}),
            );
            let mut metadata = next;
            metadata["@type"] = json!("type.googleapis.com/google.cloud.run.v2.Service");
            (StatusCode::OK, axum::Json(json!({"name": op_name, "done": false, "metadata": metadata}))).into_response()
        }
        _ => google_error(400, "INVALID_ARGUMENT", &format!("{method} {path} is not supported by this fake")),
    }
}

impl FakeCloudRun {
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let url = crate::serve(Router::new().fallback(handle).with_state(inner.clone())).await;
        Self { url, inner }
    }

    /// The endpoint for both APIs.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("fake cloud run lock"))
    }

    /// Adds a service with one container of `cpu` and `memory` limits.
    pub fn add_service(&self, name: &str, cpu: &str, memory: &str, min: i32, max: i32) {
        let svc = json!({
            "name": name,
            "uid": "0b6c4ad8-2f2f-4b1c-9b1e-6f1f3d7c9a11",
            "generation": "1",
            "uri": "https://inference-abc-de.a.run.app",
            "template": {
                "scaling": {"minInstanceCount": min, "maxInstanceCount": max},
                "maxInstanceRequestConcurrency": 80,
                "containers": [{"image": "asia-docker.pkg.dev/costmesh-test/models/inference:1",
                    "resources": {"limits": {"cpu": cpu, "memory": memory}, "cpuIdle": true}}],
            },
        });
        self.with(|g| g.services.insert(name.into(), svc));
    }

    /// Hourly points for `metric` (after `run.googleapis.com/`) under `aligner`.
    pub fn set_series(&self, metric: &str, aligner: &str, points: &[f64]) {
        self.with(|g| g.series.insert((metric.into(), aligner.into()), points.to_vec()));
    }

    /// The service as it stands.
    pub fn service(&self, name: &str) -> Value {
        self.with(|g| g.services.get(name).cloned()).unwrap_or(Value::Null)
    }

    /// Every `services.patch`: (updateMask, body).
    pub fn patches(&self) -> Vec<(String, Value)> {
        self.with(|g| g.patches.clone())
    }

    /// Every call: `METHOD /path`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|g| g.calls.clone())
    }
}
