//! `costmesh up` on a machine with no NATS or Redis running: all five
//! services become ready and events are printed.
use std::process::Stdio;
use std::time::{Duration, Instant};

use costmesh_testkit::{free_port, http_get};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn up_starts_all_five_and_prints_events() {
    up_runs(None).await;
}

#[tokio::test]
async fn up_runs_over_a_real_nats_server() {
    let nats = costmesh_testkit::NatsServer::start_new();
    up_runs(Some(nats.url())).await;
}

async fn up_runs(nats: Option<String>) {
    let sections = ["GPU_AGENT", "SCHEDULER", "STORAGE_JANITOR", "COST_WATCHER", "CACHE_GATEWAY"];
    let ports: Vec<u16> = sections.iter().map(|_| free_port()).collect();
    let mut cmd = costmesh_cmd();
    cmd.arg("up")
        .env_remove("COSTMESH__NATS__URL")
        .env("COSTMESH__CACHE_GATEWAY__LISTEN", "127.0.0.1:0")
        .env_remove("COSTMESH_CONFIG")
        .env("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "200ms")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (s, p) in sections.iter().zip(&ports) {
        cmd.env(format!("COSTMESH__{s}__ADMIN__LISTEN"), format!("127.0.0.1:{p}"));
    }
    if let Some(url) = &nats {
        cmd.args(["--nats", url]);
        cmd.env("COSTMESH__MESH__SUBJECT_PREFIX", costmesh_testkit::unique_prefix("up"));
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn costmesh up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // Every service answers /readyz 200.
    for (s, p) in sections.iter().zip(&ports) {
        let addr = format!("127.0.0.1:{p}");
        costmesh_testkit::eventually(Duration::from_secs(10), &format!("{s} /readyz 200 on {addr}"), || {
            let addr = addr.clone();
            async move { matches!(http_get(&addr, "/readyz").await, Ok((200, body)) if body.contains("ok")) }
        })
        .await;
        let (code, metrics) = http_get(&addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        assert!(metrics.trim_end().ends_with("# EOF"), "{s} /metrics is not OpenMetrics text: {metrics}");
    }
    let ready_after = started.elapsed();
    assert!(ready_after < Duration::from_secs(10), "ready after {ready_after:?}");

    // Events are printed, one line each.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut telemetry_lines = 0;
    while telemetry_lines < 2 {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("no event printed")
            .unwrap()
            .expect("stdout closed");
        if line.contains("telemetry.gpu.") && line.contains("GpuSample") {
            telemetry_lines += 1;
        }
    }
    let (code, _) = http_get(&format!("127.0.0.1:{}", ports[0]), "/healthz").await.unwrap();
    assert_eq!(code, 200);

    // SIGTERM drains and exits cleanly.
    let pid = child.id().unwrap();
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    let status =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("did not exit after SIGTERM").unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_bad_config_exits_64_naming_the_key() {
    let out = costmesh_cmd().arg("up").env("COSTMESH__GPU_AGENT__PROFILES__TRAINING_W", "0").output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gpu_agent.profiles.training_w"), "{err}");
}

#[tokio::test]
async fn print_config_masks_secrets() {
    let out = costmesh_cmd()
        .args([
            "up",
            "--print-config",
            "--nats",
            "nats://alice:s3cret@127.0.0.1:4222",
            "--redis",
            "redis://:s3cret@127.0.0.1:6379/0",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("training_w = 320"), "{text}");
    assert!(text.contains("electricity_price_per_kwh = 2.6"), "{text}");
    // Google credentials are chosen, never held: the key says which.
    assert!(text.contains("[scheduler.gce]") && text.contains("credentials = \"default\""), "{text}");
}

#[tokio::test]
async fn events_tail_prints_decoded_events_and_names_bad_ones() {
    use costmesh_contracts::{v1, ContentType, EventMeta};
    let nats = costmesh_testkit::NatsServer::start_new();
    let mut child = costmesh_cmd()
        .args(["events", "tail", "--nats", &nats.url(), "--prefix", "tail", "--json", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It says "tailing ..." once subscribed.
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), err.next_line()).await.unwrap().unwrap().unwrap();
    assert!(first.starts_with("tailing tail.>"), "{first}");

    let bus = costmesh_bus::NatsBus::connect(&nats.url(), &Default::default()).await.unwrap();
    let bus = costmesh_bus::Bus::Nats(bus);
    let cmd = v1::PowerCommand { node: "n1".into(), profile: v1::PowerProfile::Idle as i32, ..Default::default() };
    let (h, p) = costmesh_contracts::encode(
        &cmd,
        &EventMeta::new::<v1::PowerCommand>("test", chrono::Utc::now(), ContentType::Protobuf),
    );
    bus.publish("tail.node.n1.power", h, p).await.unwrap();
    bus.publish("tail.node.n1.power", Default::default(), bytes::Bytes::from_static(b"junk")).await.unwrap();
    bus.flush().await.unwrap();

    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["type"], "costmesh.v1.PowerCommand");
    assert_eq!(lines[0]["event"]["profile"], "POWER_PROFILE_IDLE");
    assert!(lines[1]["error"].as_str().unwrap().contains("missing_header"), "{}", lines[1]);
}

#[tokio::test]
async fn roi_with_the_seeds_inputs_prints_the_seeds_numbers() {
    let out = costmesh_cmd().arg("roi").env_remove("COSTMESH_CONFIG").output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["17.5 TWD", "525 TWD", "6,300 TWD", "98.3 %", "116,700 TWD", "80.5 %", "Payback 1.76 months"] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[tokio::test]
async fn cost_asks_the_running_cost_watcher() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("cost");
    let _up = spawn_up(&nats.url(), &prefix, &[]);
    let ask = || async {
        costmesh_cmd().args(["cost", "--json", "--nats", &nats.url(), "--prefix", &prefix]).output().await.unwrap()
    };
    // Wait until the cost-watcher answers and has accounted some energy.
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    costmesh_testkit::eventually(Duration::from_secs(20), "cost-watcher answers with energy", || {
        let (fut, last) = (ask(), last.clone());
        async move {
            let out = fut.await;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let ok = out.status.success()
                && serde_json::from_str::<serde_json::Value>(&text)
                    .is_ok_and(|v| v["energy_kwh"].as_f64().is_some_and(|e| e > 0.0));
            *last.lock().unwrap() = text;
            ok
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["currency"], "TWD");
    assert!(v["cost"]["local"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["kpis"].get("gpu_utilisation").is_some(), "{v}");
    assert_eq!(v["budget"], 3000.0);
}

#[tokio::test]
async fn up_exports_traces_over_otlp_when_asked() {
    let receiver = costmesh_testkit::otlp::OtlpReceiver::start().await;
    let nats = costmesh_testkit::NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("otlp");
    let endpoint = receiver.endpoint();
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let mut child = spawn_up(&nats.url(), &prefix, &otel);
    // A traced request to the scheduler, as an operator's CLI makes it.
    costmesh_testkit::eventually(Duration::from_secs(20), "the scheduler answers a traced CLI", || async {
        costmesh_cmd()
            .args(["jobs", "ls", "--nats", &nats.url(), "--prefix", &prefix])
            .envs(otel)
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    })
    .await;
    // A consumer span whose parent is a producer span of the same trace,
    // named after the messaging conventions.
    costmesh_testkit::eventually(Duration::from_secs(20), "a linked publish/process pair over OTLP", || {
        let (spans, process, publish) = (receiver.spans(), format!("process {prefix}."), format!("publish {prefix}."));
        async move {
            spans.iter().any(|h| {
                h.name.starts_with(&process)
                    && spans.iter().any(|p| {
                        p.name.starts_with(&publish) && p.span_id == h.parent_span_id && p.trace_id == h.trace_id
                    })
            })
        }
    })
    .await;
    // Five services in one process, each under its own service.name.
    costmesh_testkit::wait_for(Duration::from_secs(30), "five service names", || {
        let names: std::collections::BTreeSet<String> = receiver.spans().into_iter().map(|s| s.service).collect();
        async move {
            let all = ["gpu-agent", "scheduler", "storage-janitor", "cost-watcher", "cache-gateway"];
            if all.iter().all(|n| names.contains(*n)) {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        }
    })
    .await;
    for s in receiver.spans() {
        assert_ne!(s.service, "costmesh", "span {:?} has no service of its own", s.name);
        assert_eq!(s.attr("messaging.system"), Some("nats"), "{:?}", s.name);
    }
    // The CLI's request and the scheduler's answer: one trace, parent and child.
    let spans = receiver.spans();
    let answered = spans.iter().filter(|s| s.service == "costmesh-cli").find_map(|asked| {
        spans
            .iter()
            .find(|s| s.service == "scheduler" && s.parent_span_id == asked.span_id && s.trace_id == asked.trace_id)
    });
    assert!(answered.is_some_and(|a| a.name == format!("process {prefix}.api.scheduler.{{verb}}")), "{answered:?}");
    child.start_kill().unwrap();
}

#[tokio::test]
async fn up_serves_a_demo_model_whose_second_answer_is_a_cache_hit() {
    let gw_port = free_port();
    // Its own admin token (other tests' `up`s write the demo's default one).
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "purge-token-for-this-test\n").unwrap();
    let mut cmd = costmesh_cmd();
    cmd.env("COSTMESH__CACHE_GATEWAY__ADMIN_TOKEN_FILE", token.path());
    cmd.arg("up")
        .env_remove("COSTMESH__NATS__URL")
        .env_remove("COSTMESH_CONFIG")
        .env("COSTMESH__CACHE_GATEWAY__LISTEN", format!("127.0.0.1:{gw_port}"))
        .env("COSTMESH__CACHE_GATEWAY__STATS_INTERVAL", "200ms")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for s in ["GPU_AGENT", "SCHEDULER", "STORAGE_JANITOR", "COST_WATCHER", "CACHE_GATEWAY"] {
        cmd.env(format!("COSTMESH__{s}__ADMIN__LISTEN"), "127.0.0.1:0");
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = format!("127.0.0.1:{gw_port}");
    let ask = || costmesh_testkit::http_post_json(&addr, "/demo/v1/generate", r#"{"prompt":"hi"}"#);
    costmesh_testkit::eventually(Duration::from_secs(10), "the gateway answers", || async {
        ask().await.is_ok_and(|r| r.0 == 200)
    })
    .await;
    let (status, headers, first) = ask().await.unwrap();
    assert_eq!(status, 200);
    let cache_status = |h: &Vec<(String, String)>| {
        h.iter().find(|(k, _)| k == "cache-status").map(|(_, v)| v.clone()).unwrap_or_default()
    };
    assert!(cache_status(&headers).contains("hit"), "the warm-up request stored it: {}", cache_status(&headers));
    assert!(first.contains(r#""model":"demo""#), "{first}");
    // A new prompt: a miss, then a hit with the same answer.
    let other = || costmesh_testkit::http_post_json(&addr, "/demo/v1/generate", r#"{"prompt":"night training"}"#);
    let (_, h1, a1) = other().await.unwrap();
    let (_, h2, a2) = other().await.unwrap();
    assert!(cache_status(&h1).contains("fwd=miss"), "{}", cache_status(&h1));
    assert!(cache_status(&h2).contains("hit"), "{}", cache_status(&h2));
    assert_eq!(a1, a2);
    // `costmesh cache purge` empties the route: the next answer is a miss.
    let out = costmesh_cmd()
        .args(["cache", "purge", "--route", "demo", "--gateway", &format!("http://{addr}")])
        .arg("--token-file")
        .arg(token.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, h3, _) = other().await.unwrap();
    assert!(cache_status(&h3).contains("fwd=miss"), "{}", cache_status(&h3));
    // The gateway's statistics reach the bus (and the live view).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("cache stats printed")
            .unwrap()
            .unwrap();
        if line.contains("CacheStats") && line.contains("hits=") && !line.contains("hits=0") {
            break;
        }
    }
    child.start_kill().unwrap();
}

#[tokio::test]
async fn jobs_submit_ls_show_logs_cancel_against_the_running_mesh() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("jobs");
    let logs = tempfile::tempdir().unwrap();
    let logs_root = logs.path().display().to_string();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let allowed = format!("[{:?}]", examples.canonicalize().unwrap().display().to_string());
    let user = costmesh_testkit::current_user();
    let _up = spawn_up(
        &nats.url(),
        &prefix,
        &[
            ("COSTMESH__GPU_AGENT__JOBS__LOGS_ROOT", &logs_root),
            ("COSTMESH__GPU_AGENT__JOBS__ALLOWED_COMMANDS", &allowed),
            ("COSTMESH__GPU_AGENT__JOBS__RUN_AS_USER", &user),
        ],
    );
    let url = nats.url();
    let jobs = |args: Vec<String>| {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            let mut all = vec!["jobs".to_string()];
            all.extend(args.iter().take(1).cloned());
            all.extend(["--nats".into(), url, "--prefix".into(), prefix]);
            all.extend(args.into_iter().skip(1));
            let out = costmesh_cmd().args(&all).output().await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    costmesh_testkit::eventually(Duration::from_secs(20), "the scheduler knows the node", || {
        let f = jobs(s(&["nodes"]));
        async move { f.await.1.contains("\"alive\": true") }
    })
    .await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs/train.sh");
    let (ok, out, err) =
        jobs(s(&["submit", "--name", "demo-train", "--duration", "30m", "--", script.to_str().unwrap()])).await;
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    assert!(id.starts_with("j-"), "{out}");

    costmesh_testkit::eventually(Duration::from_secs(20), "the job running", || {
        let f = jobs(s(&["ls"]));
        let id = id.clone();
        async move { f.await.1.lines().any(|l| l.starts_with(&id) && l.contains("running")) }
    })
    .await;
    let (ok, show, _) = jobs(s(&["show", &id])).await;
    assert!(ok && show.contains("\"name\": \"demo-train\""), "{show}");
    costmesh_testkit::eventually(Duration::from_secs(20), "its log", || {
        let f = jobs(s(&["logs", &id]));
        async move { f.await.1.contains(": ready") }
    })
    .await;
    let (ok, out, _) = jobs(s(&["cancel", &id])).await;
    assert!(ok && out.contains("cancelled"), "{out}");
    let (ok, _, err) = jobs(s(&["show", "j-nope"])).await;
    assert!(!ok && err.contains("unknown job \"j-nope\""), "{err}");
    let (ok, _, err) = jobs(s(&["submit", "--gpus", "0", "--", "/bin/true"])).await;
    assert!(!ok && err.contains("gpus: must be at least 1"), "{err}");
}

/// Every `COSTMESH__*` variable compose sets is a real config key with a
/// valid value (defaults from `compose/.env` substituted), so the compose
/// deployment cannot drift from the config reference.
#[tokio::test]
async fn compose_environment_is_valid_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let compose = std::fs::read_to_string(root.join("compose/docker-compose.yml")).unwrap();
    let dotenv: std::collections::BTreeMap<String, String> = std::fs::read_to_string(root.join("compose/.env"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    // The secrets compose mounts, as scripts/compose-secrets.sh writes them
    // (`costmesh nats-config` for the keys), in a directory standing in for
    // /run/secrets.
    let secrets = tempfile::tempdir().unwrap();
    let out = costmesh_cmd()
        .args(["nats-config", "--keys-dir"])
        .arg(secrets.path())
        .args(["--node", "gpu-host-1", "--client", "cli", "--admin", "operator", "--out"])
        .arg(secrets.path().join("nats-auth.conf"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["redis.pw", "gateway-admin.token"] {
        std::fs::write(secrets.path().join(f), "secret\n").unwrap();
    }
    let mut env = Vec::new();
    for line in compose.lines() {
        let Some((k, v)) = line.trim().split_once(':') else { continue };
        if !k.starts_with("COSTMESH__") {
            continue;
        }
        let v = match v.trim().strip_prefix("/run/secrets/") {
            Some(name) => {
                assert!(
                    compose.contains(&format!("\n  {name}:\n    file: ./secrets/{name}\n")),
                    "{k}: secret {name} is not declared"
                );
                let path = secrets.path().join(name);
                assert!(path.is_file(), "{k}: scripts/compose-secrets.sh does not write {name}");
                path.display().to_string()
            }
            None => v.to_string(),
        };
        let mut v = v.trim().trim_matches('\'').trim_matches('"').to_string();
        // ${NAME:-default}: the .env value, else the default.
        while let Some(start) = v.find("${") {
            let end = start + v[start..].find('}').expect("closing brace");
            let inner = &v[start + 2..end];
            let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
            assert!(dotenv.contains_key(name), "compose uses ${{{name}}} but compose/.env does not set it");
            let value = dotenv.get(name).cloned().unwrap_or_else(|| default.to_string());
            v.replace_range(start..=end, &value);
        }
        env.push((k.to_string(), v));
    }
    assert!(env.len() > 15, "found only {} COSTMESH__ variables", env.len());
    let out = costmesh_cmd()
        .args(["up", "--print-config"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "compose env refused: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("http://demo-model:9000"), "{printed}");
}

/// The Python integration example (examples/python/integrate.py, nats-py)
/// against a real nats-server and the services: it publishes JSON telemetry
/// and reads the budget event the cost-watcher answers with.
#[tokio::test]
async fn the_python_integration_example_runs_against_the_mesh() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".tools/py/bin/python");
    assert!(python.is_file(), "run scripts/install-test-deps.sh first (it installs nats-py into .tools/py)");
    let nats = costmesh_testkit::NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("python");
    let _up = spawn_up(
        &nats.url(),
        &prefix,
        &[
            ("COSTMESH__MESH__CONTENT_TYPE", "json"),
            ("COSTMESH__COST_WATCHER__MONTHLY_BUDGET", "10"),
            ("COSTMESH__COST_WATCHER__EVALUATE_INTERVAL", "1s"),
            ("COSTMESH__GPU_AGENT__SIM__DEMO_LOAD", "false"),
        ],
    );
    // Ready when the cost-watcher answers.
    costmesh_testkit::eventually(Duration::from_secs(20), "the cost-watcher answers", || async {
        costmesh_cmd()
            .args(["cost", "--json", "--nats", &nats.url(), "--prefix", &prefix])
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    })
    .await;
    let out = tokio::process::Command::new(&python)
        .arg(root.join("examples/python/integrate.py"))
        .env("NATS_URL", nats.url())
        .env("COSTMESH_PREFIX", &prefix)
        .env("TIMEOUT_S", "30")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("BUDGET_STATE_EXCEEDED"), "{stdout}");
    // docs/integration.md shows this run's output: the same lines, in the
    // same order (`...` stands for the rest of a line), on the test's prefix.
    let doc = std::fs::read_to_string(root.join("docs/integration.md")).unwrap();
    let shown: Vec<String> = doc
        .split("```")
        .find(|block| block.trim_start().starts_with("published"))
        .expect("docs/integration.md shows the example's output")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.replace("costmesh.", &format!("{prefix}.")))
        .collect();
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed.len(), shown.len(), "docs show {shown:#?}\nthe example printed {printed:#?}");
    for (doc_line, line) in shown.iter().zip(&printed) {
        let ok = match doc_line.split_once("...") {
            Some((head, _)) => line.starts_with(head.trim_end()),
            None => line == doc_line,
        };
        assert!(ok, "docs show {doc_line:?}, the example printed {line:?}");
    }
}

/// `costmesh up --quiet` over a real nats-server on its own prefix, every
/// port free, with `extra` environment; killed when dropped.
fn spawn_up(nats: &str, prefix: &str, extra: &[(&str, &str)]) -> tokio::process::Child {
    let mut up = costmesh_cmd();
    up.args(["up", "--quiet", "--nats", nats])
        .env("COSTMESH__CACHE_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("COSTMESH__MESH__SUBJECT_PREFIX", prefix)
        .env("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "200ms")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for s in ["GPU_AGENT", "SCHEDULER", "STORAGE_JANITOR", "COST_WATCHER", "CACHE_GATEWAY"] {
        up.env(format!("COSTMESH__{s}__ADMIN__LISTEN"), "127.0.0.1:0");
    }
    up.spawn().unwrap()
}

/// The CLI talks to an auth-enabled NATS: with `--nats-user` and a password
/// file, or with credentials in the URL; a refused password is never printed.
#[tokio::test]
async fn the_cli_authenticates_and_never_prints_a_password() {
    let server = costmesh_testkit::NatsServer::start_with_args(&["--user", "ops", "--pass", "pw-from-file-42"]);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "pw-from-file-42\n").unwrap();
    let url = format!("nats://127.0.0.1:{}", server.port());
    let run = |args: Vec<String>| async move {
        let out =
            costmesh_cmd().args(&args).env_remove("COSTMESH__NATS__URL").env_remove("NATS_URL").output().await.unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    // Connected (nobody answers the summary request: no cost-watcher runs).
    let with_file = run(vec![
        "cost".into(),
        "--nats".into(),
        url.clone(),
        "--nats-user".into(),
        "ops".into(),
        "--nats-password-file".into(),
        pw.display().to_string(),
    ])
    .await;
    assert!(with_file.contains("no answer from the cost-watcher"), "{with_file}");
    let in_url =
        run(vec!["cost".into(), "--nats".into(), format!("nats://ops:pw-from-file-42@127.0.0.1:{}", server.port())])
            .await;
    assert!(in_url.contains("no answer from the cost-watcher"), "{in_url}");
    assert!(!in_url.contains("pw-from-file-42"), "{in_url}");
    let refused =
        run(vec!["cost".into(), "--nats".into(), format!("nats://ops:wrong-secret-7@127.0.0.1:{}", server.port())])
            .await;
    assert!(!refused.contains("wrong-secret-7") && refused.contains("ops:***@"), "{refused}");
}

/// The `costmesh` binary, its dashboard on a free port (tests run at once).
fn costmesh_cmd() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"));
    c.env("COSTMESH__DASHBOARD__LISTEN", "127.0.0.1:0");
    c
}
