//! A local server speaking the part of the Compute Engine REST API (v1) the
//! scheduler's GCE actuator calls, in Google's JSON formats: instances
//! `list` (with a `labels.K=V` filter and pages), `stop`, `start`,
//! `setMachineType` (each answering a zone operation, run once per
//! `requestId` as Compute Engine does) and `zoneOperations.get`, which
//! reports `RUNNING` for a few polls and then `DONE`. Faults: an HTTP error
//! in Google's error format for the next matching calls, an answer lost
//! after the call went through, operations that end in an error or never
//! end.
//!
//! Nothing real can run here (the Compute Engine is Google's); this fake
//! is what the actuator's tests are tested against.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

const BASE: &str = "https://www.googleapis.com/compute/v1";

/// One VM.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeInstance {
    pub zone: String,
    pub name: String,
    /// `RUNNING`, `TERMINATED`, ...
    pub status: String,
    /// The machine type's name (`n1-standard-8`).
    pub machine_type: String,
    pub labels: HashMap<String, String>,
}

impl FakeInstance {
    pub fn new(zone: &str, name: &str, status: &str, machine_type: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            zone: zone.into(),
            name: name.into(),
            status: status.into(),
            machine_type: machine_type.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

/// What an operation does to its instance once `DONE`.
#[derive(Clone, Debug)]
enum Effect {
    Status(&'static str),
    MachineType(String),
}

#[derive(Clone, Debug)]
struct Op {
    name: String,
    zone: String,
    kind: String,
    instance: String,
    polls_left: u32,
    effect: Effect,
    /// (HTTP status, message): the operation ends with this error.
    error: Option<(u16, String)>,
    hang: bool,
    done: bool,
}

/// A fault for the next calls whose verb (`list`, `stop`, `start`,
/// `setMachineType`, `operations`) matches.
#[derive(Clone, Debug)]
struct Fault {
    verb: String,
    status: u16,
    message: String,
    /// The call is carried out, then answered with the error (a lost answer).
    after: bool,
}

#[derive(Default)]
struct Inner {
    project: String,
    instances: Vec<FakeInstance>,
    ops: HashMap<String, Op>,
    by_request_id: HashMap<String, String>,
    next_op: u64,
    faults: VecDeque<Fault>,
    calls: Vec<String>,
    page_size: usize,
    polls_to_done: u32,
    op_error: Option<(String, u16, String)>,
    hang: bool,
}

/// The server. Clones share it.
#[derive(Clone)]
pub struct FakeCompute {
    url: String,
    inner: Arc<Mutex<Inner>>,
}

fn google_error(status: u16, message: &str) -> Response {
    let reason = match status {
        400 => "invalid",
        403 => "forbidden",
        404 => "notFound",
        429 => "rateLimitExceeded",
        _ => "backendError",
    };
    let body = json!({"error": {"code": status, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}]}});
    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

fn instance_json(project: &str, i: &FakeInstance) -> Value {
    let zone = format!("{BASE}/projects/{project}/zones/{}", i.zone);
    json!({
        "kind": "compute#instance",
        "id": "4512345678901234567",
        "name": i.name,
        "zone": zone,
        "status": i.status,
        "machineType": format!("{zone}/machineTypes/{}", i.machine_type),
        "labels": i.labels,
        "selfLink": format!("{zone}/instances/{}", i.name),
    })
}

fn op_json(project: &str, op: &Op) -> Value {
    let zone = format!("{BASE}/projects/{project}/zones/{}", op.zone);
    let mut v = json!({
        "kind": "compute#operation",
        "id": "7912345678901234567",
        "name": op.name,
        "zone": zone,
        "operationType": op.kind,
        "targetLink": format!("{zone}/instances/{}", op.instance),
        "status": if op.done { "DONE" } else { "RUNNING" },
        "progress": if op.done { 100 } else { 0 },
        "selfLink": format!("{zone}/operations/{}", op.name),
    });
    if op.done {
        if let Some((code, msg)) = &op.error {
            v["httpErrorStatusCode"] = json!(code);
            v["httpErrorMessage"] = json!(if *code == 403 { "FORBIDDEN" } else { "ERROR" });
            v["error"] = json!({"errors": [{"code": "RESOURCE_OPERATION_FAILED", "message": msg}]});
        }
    }
    v
}

/// A filter the actuator sends: `labels.K=V` (spaces and quotes allowed).
fn label_filter(f: &str) -> Option<(String, String)> {
    let (k, v) = f.split_once('=')?;
    let k = k.trim().strip_prefix("labels.")?;
    Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // compute/v1/projects/{p}/zones/{z}/{instances|operations}/...
    if segs.len() < 7 || segs[0..3] != ["compute", "v1", "projects"] || segs[4] != "zones" {
        return google_error(404, &format!("The requested URL {path} was not found on this server."));
    }
    let (project, zone, collection) = (segs[3], segs[5], segs[6]);
    let mut g = inner.lock().expect("fake compute lock");
    if project != g.project {
        return google_error(404, &format!("The resource 'projects/{project}' was not found"));
    }
    let verb = match (collection, segs.get(7), segs.get(8), &method) {
        ("instances", None, None, &Method::GET) => "list".to_string(),
        ("instances", Some(_), Some(v), &Method::POST) => v.to_string(),
        ("operations", Some(_), None, &Method::GET) => "operations".to_string(),
        _ => return google_error(400, &format!("{method} {path} is not supported by this fake")),
    };
    let target = segs.get(7).map(|s| s.to_string()).unwrap_or_default();
    let rid = q.get("requestId").cloned().unwrap_or_default();
    g.calls.push(if rid.is_empty() {
        format!("{verb} {zone}/{target}")
    } else {
        format!("{verb} {zone}/{target} {rid}")
    });
    let fault = match g.faults.front() {
        Some(f) if f.verb == verb => g.faults.pop_front(),
        _ => None,
    };
    if let Some(f) = &fault {
        if !f.after {
            return google_error(f.status, &f.message);
        }
    }
    let answer = match verb.as_str() {
        "list" => {
            let filter = match q.get("filter").map(|f| (f, label_filter(f))) {
                Some((f, None)) => {
                    return google_error(
                        400,
                        &format!("Invalid value for field 'filter': '{f}'. Invalid list filter expression."),
                    )
                }
                Some((_, Some(kv))) => Some(kv),
                None => None,
            };
            let all: Vec<&FakeInstance> = g
                .instances
                .iter()
                .filter(|i| i.zone == zone)
                .filter(|i| filter.as_ref().is_none_or(|(k, v)| i.labels.get(k) == Some(v)))
                .collect();
            let from: usize =
                q.get("pageToken").and_then(|t| t.strip_prefix("page-")).and_then(|n| n.parse().ok()).unwrap_or(0);
            let size = if g.page_size == 0 { 500 } else { g.page_size };
            let page: Vec<Value> = all.iter().skip(from).take(size).map(|i| instance_json(project, i)).collect();
            let mut v = json!({"kind": "compute#instanceList", "id": format!("projects/{project}/zones/{zone}/instances"),
                "items": page, "selfLink": format!("{BASE}/projects/{project}/zones/{zone}/instances")});
            if from + size < all.len() {
                v["nextPageToken"] = json!(format!("page-{}", from + size));
            }
            (StatusCode::OK, axum::Json(v)).into_response()
        }
        "operations" => {
            let project = g.project.clone();
            let Some(op) = g.ops.get_mut(&target) else {
                return google_error(
                    404,
                    &format!("The resource 'projects/{project}/zones/{zone}/operations/{target}' was not found"),
                );
            };
            let was_done = op.done;
            if !op.done && !op.hang {
                if op.polls_left > 0 {
                    op.polls_left -= 1;
                } else {
                    op.done = true;
                }
            }
            let (op, finished_now) = (op.clone(), op.done && !was_done);
            if finished_now && op.error.is_none() {
                if let Some(i) = g.instances.iter_mut().find(|i| i.zone == op.zone && i.name == op.instance) {
                    match &op.effect {
                        Effect::Status(s) => i.status = s.to_string(),
                        Effect::MachineType(t) => i.machine_type = t.clone(),
                    }
                }
            }
            (StatusCode::OK, axum::Json(op_json(&project, &op))).into_response()
        }
        action => {
            let project = g.project.clone();
            let Some(inst) = g.instances.iter().find(|i| i.zone == zone && i.name == target).cloned() else {
                return google_error(
                    404,
                    &format!("The resource 'projects/{project}/zones/{zone}/instances/{target}' was not found"),
                );
            };
            if let Some(name) = g.by_request_id.get(&rid).filter(|_| !rid.is_empty()).cloned() {
                // The same request again: Compute Engine answers the first operation.
                let op = g.ops[&name].clone();
                return (StatusCode::OK, axum::Json(op_json(&project, &op))).into_response();
            }
            let effect = match action {
                "stop" => Effect::Status("TERMINATED"),
                "start" => Effect::Status("RUNNING"),
                "setMachineType" => {
                    if inst.status != "TERMINATED" {
                        return google_error(
                            400,
                            &format!("Invalid resource usage: 'Instance {target} is {}; it must be stopped to change its machine type.'", inst.status),
                        );
                    }
                    let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let Some(mt) = b["machineType"].as_str() else {
                        return google_error(400, "Required field 'machineType' not specified");
                    };
                    let want = format!("zones/{zone}/machineTypes/");
                    let Some(name) = mt
                        .rsplit_once(&want)
                        .map(|(_, n)| n.to_string())
                        .or_else(|| mt.strip_prefix(&want).map(str::to_string))
                    else {
                        return google_error(400, &format!("Invalid value for field 'resource.machineType': '{mt}'."));
                    };
                    Effect::MachineType(name)
                }
                other => return google_error(400, &format!("{other} is not supported by this fake")),
            };
            g.next_op += 1;
            let name = format!("operation-{}-{action}", g.next_op);
            let error = g.op_error.as_ref().filter(|(v, _, _)| v == action).map(|(_, c, m)| (*c, m.clone()));
            let op = Op {
                name: name.clone(),
                zone: zone.to_string(),
                kind: action.to_string(),
                instance: target.clone(),
                polls_left: g.polls_to_done,
                effect,
                error,
                hang: g.hang,
                done: false,
            };
            if !rid.is_empty() {
                g.by_request_id.insert(rid.clone(), name.clone());
            }
            g.ops.insert(name, op.clone());
            (StatusCode::OK, axum::Json(op_json(&project, &op))).into_response()
        }
    };
    match fault {
        Some(f) => google_error(f.status, &f.message),
        None => answer,
    }
}

impl FakeCompute {
    /// A server for `project` holding `instances`.
    pub async fn start(project: &str, instances: Vec<FakeInstance>) -> Self {
        let inner =
            Arc::new(Mutex::new(Inner { project: project.into(), instances, polls_to_done: 2, ..Default::default() }));
        let url = crate::serve(Router::new().fallback(handle).with_state(inner.clone())).await;
        Self { url, inner }
    }

    /// The endpoint for `scheduler.gce.endpoint`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("fake compute lock"))
    }

    /// The instance as it stands.
    pub fn instance(&self, name: &str) -> FakeInstance {
        self.with(|g| g.instances.iter().find(|i| i.name == name).cloned())
            .unwrap_or_else(|| panic!("no instance {name}"))
    }

    /// Every call so far: `verb zone/target [requestId]`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|g| g.calls.clone())
    }

    /// Calls that change something (`stop`, `start`, `setMachineType`).
    pub fn mutations(&self) -> Vec<String> {
        self.calls().into_iter().filter(|c| !c.starts_with("list ") && !c.starts_with("operations ")).collect()
    }

    /// Answers the next `n` calls of `verb` with `status` and `message`.
    pub fn fail_next(&self, verb: &str, n: usize, status: u16, message: &str) {
        self.with(|g| {
            for _ in 0..n {
                g.faults.push_back(Fault { verb: verb.into(), status, message: message.into(), after: false })
            }
        })
    }

    /// Carries out the next `verb` call but answers it with `status` (the
    /// answer lost on the way back).
    pub fn lose_answer(&self, verb: &str, status: u16) {
        self.with(|g| {
            g.faults.push_back(Fault { verb: verb.into(), status, message: "backend error".into(), after: true })
        })
    }

    /// Operations of `verb` end in an error with `status` and `message`.
    pub fn fail_operations(&self, verb: &str, status: u16, message: &str) {
        self.with(|g| g.op_error = Some((verb.into(), status, message.into())))
    }

    /// New operations never reach `DONE`.
    pub fn hang_operations(&self) {
        self.with(|g| g.hang = true)
    }

    /// At most `n` instances per list page.
    pub fn set_page_size(&self, n: usize) {
        self.with(|g| g.page_size = n)
    }
}
