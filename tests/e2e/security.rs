//! The mesh under the authorization `costmesh nats-config` generates: every
//! service works with only the permissions derived from the subject table,
//! a node's agent cannot speak for another node or move a budget, a client
//! can submit jobs but not assign them, anonymous clients are refused, a
//! forged assignment is dead-lettered, and no secret reaches any log or CLI
//! output.
use std::path::Path;

use costmesh_contracts::v1::{BudgetEvent, BudgetState, GpuSample, JobAssignment, JobSpec};
use costmesh_contracts::{ContentType, EventMeta};
use costmesh_runtime::config::mask_url_password;

use crate::scenarios::host;
use crate::{bin_dir, workspace_root, Mesh, REDIS_PASSWORD, WAIT};

/// A raw client as `user`, collecting what the server says back
/// (permission violations arrive as server errors).
async fn client_as(m: &Mesh, user: &str) -> (async_nats::Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seed = std::fs::read_to_string(m.keys.as_ref().unwrap().join(format!("{user}.nk"))).unwrap();
    let pair = nkeys::KeyPair::from_seed(seed.trim()).unwrap();
    let errors: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let e = errors.clone();
    let client = async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        .name(format!("attacker-{user}"))
        .custom_inbox_prefix(costmesh_bus::nkey_inbox_prefix(&pair.public_key()))
        .event_callback(move |ev| {
            let e = e.clone();
            async move {
                if let async_nats::Event::ServerError(err) = ev {
                    e.lock().unwrap().push(err.to_string());
                }
            }
        })
        .connect(m.nats.url())
        .await
        .unwrap();
    (client, errors)
}

async fn wait_violation(errors: &std::sync::Arc<std::sync::Mutex<Vec<String>>>, subject: &str) {
    costmesh_testkit::eventually(WAIT, &format!("a permissions violation for {subject}"), || async {
        errors.lock().unwrap().iter().any(|e| e.contains("Permissions Violation") && e.contains(subject))
    })
    .await;
}

fn encoded<E: costmesh_contracts::Event>(e: &E) -> (async_nats::HeaderMap, bytes::Bytes) {
    let (h, p) =
        costmesh_contracts::encode(e, &EventMeta::new::<E>("attacker", chrono::Utc::now(), ContentType::Protobuf));
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in h.iter() {
        map.insert(k, v);
    }
    (map, p)
}

#[tokio::test]
async fn least_privilege_holds_and_no_secret_leaks() {
    let hosts = [host("gpu-a", false, false), host("gpu-b", false, false)];
    let m = Mesh::start_secure("e2esecure", &hosts).await;
    let keys = m.keys.clone().unwrap();
    let mut outputs: Vec<String> = vec![std::fs::read_to_string(m.work.path().join("nats-config.out")).unwrap()];

    // The client user runs a job through the CLI, start to finish.
    let cli = |args: Vec<String>| {
        let (url, prefix, nkey) = (m.nats.url(), m.subjects.prefix().to_string(), keys.join("client-alice.nk"));
        async move {
            let mut all = vec![args[0].clone()];
            all.extend(args.iter().skip(1).take(1).cloned());
            all.extend(["--nats".into(), url, "--prefix".into(), prefix]);
            all.extend(["--nats-nkey-file".into(), nkey.display().to_string()]);
            all.extend(args.into_iter().skip(2));
            let out = tokio::process::Command::new(bin_dir().join("costmesh")).args(&all).output().await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let script = workspace_root().join("examples/jobs/train.sh").display().to_string();
    let ckpt = m.work.path().join("ckpt").display().to_string();
    let (ok, out) = cli(s(&[
        "jobs",
        "submit",
        "--name",
        "secure-train",
        "--duration",
        "30m",
        "--checkpoint-dir",
        &ckpt,
        "--env",
        "STEPS=20",
        "--",
        &script,
    ]))
    .await;
    outputs.push(out.clone());
    assert!(ok, "{out}");
    let id = out.trim().to_string();
    let j = m.wait_job(&id, "the job succeeds under least privilege", |j| j["state"] == "succeeded").await;
    let node = j["node"].as_str().unwrap().to_string();
    let (ok, out) = cli(s(&["jobs", "logs", &id])).await;
    outputs.push(out.clone());
    assert!(ok && out.contains("finished 20 steps"), "{out}");
    let (ok, out) = cli(s(&["cost", "--json"])).await;
    outputs.push(out.clone());
    assert!(ok && out.contains("energy"), "{out}");
    // The gateway reaches Redis with the password from its file.
    assert_eq!(m.ask("chat", r#"{"q":"secure"}"#, false).await.0, 200);
    let (status, _) = m.ask("chat", r#"{"q":"secure"}"#, false).await;
    assert_eq!(status, 200);
    let gateway_log = m.logs().into_iter().find(|(n, _)| n == "cache-gateway").unwrap().1;
    assert!(!gateway_log.contains("NOAUTH") && !gateway_log.contains("uthentication"), "{gateway_log}");

    // Anonymous clients are refused.
    let anon = costmesh_bus::NatsBus::connect(&m.nats.url(), &Default::default()).await;
    let err = anon.err().expect("an anonymous client was let in").to_string();
    assert!(err.to_lowercase().contains("authorization"), "{err}");

    // A node's agent may speak only for its own node, and never for a budget.
    let (agent, agent_errors) = client_as(&m, "gpu-agent-gpu-a").await;
    let other_node = m.subjects.gpu_telemetry("gpu-b", 99);
    let sample = GpuSample { node: "gpu-b".into(), gpu_index: 99, ..Default::default() };
    let (h, p) = encoded(&sample);
    agent.publish_with_headers(other_node.clone(), h, p).await.unwrap();
    let budget_subject = m.subjects.budget("attacker-scope", BudgetState::Exceeded);
    let budget =
        BudgetEvent { scope: "attacker-scope".into(), state: BudgetState::Exceeded as i32, ..Default::default() };
    let (h, p) = encoded(&budget);
    agent.publish_with_headers(budget_subject.clone(), h, p).await.unwrap();
    let _peek = agent.subscribe(m.subjects.node_assign("gpu-b")).await.unwrap();
    agent.flush().await.unwrap();
    wait_violation(&agent_errors, &other_node).await;
    wait_violation(&agent_errors, &budget_subject).await;
    wait_violation(&agent_errors, &m.subjects.node_assign("gpu-b")).await;
    // Its own node's telemetry is fine.
    let own = GpuSample { node: "gpu-a".into(), gpu_index: 98, ..Default::default() };
    let (h, p) = encoded(&own);
    agent.publish_with_headers(m.subjects.gpu_telemetry("gpu-a", 98), h, p).await.unwrap();
    agent.flush().await.unwrap();
    costmesh_testkit::eventually(WAIT, "the agent's own sample arrives", || async {
        m.seen("telemetry.gpu.gpu-a.98").len() == 1
    })
    .await;

    // A client may ask, not assign.
    let (client, client_errors) = client_as(&m, "client-alice").await;
    let forged = JobAssignment {
        job_id: "j-forged".into(),
        attempt: 1,
        node: node.clone(),
        gpu_indices: vec![0],
        spec: Some(JobSpec {
            name: "forged".into(),
            command: script.clone(),
            args: vec![],
            gpus: 1,
            ..Default::default()
        }),
        fencing_token: 999,
        resume_from: String::new(),
    };
    let (h, p) = encoded(&forged);
    client.publish_with_headers(m.subjects.node_assign(&node), h, p).await.unwrap();
    client.flush().await.unwrap();
    wait_violation(&client_errors, &m.subjects.node_assign(&node)).await;

    // An operator-level forger is stopped by the node: unsigned, dead-lettered, nothing runs.
    let mut dlq = m.bus.subscribe(&m.subjects.dlq("gpu-agent")).await.unwrap();
    m.bus.flush().await.unwrap();
    let (h, p) = costmesh_contracts::encode(
        &forged,
        &EventMeta::new::<JobAssignment>("attacker", chrono::Utc::now(), ContentType::Protobuf),
    );
    m.bus.publish_durable(&m.subjects.node_assign(&node), h, p).await.unwrap();
    let d = tokio::time::timeout(WAIT, dlq.next()).await.expect("the forged assignment dead-lettered").unwrap();
    let reason = d.headers.get(costmesh_contracts::headers::names::DLQ_REASON).unwrap_or_default().to_string();
    assert!(reason.contains("JobAssignment refused") && reason.contains("not signed"), "{reason}");
    // The dead letter is the handler's last word: it refused before anything could start.
    assert!(m.job_events("j-forged", costmesh_contracts::v1::JobEventKind::Started).is_empty());
    assert!(!Path::new(&m.work.path().join("logs").join(&node).join("j-forged")).exists(), "the forged job ran");
    assert!(m.seen("telemetry.gpu.gpu-b.99").is_empty(), "another node's forged sample got through");
    assert!(m.seen("budget.attacker-scope").is_empty(), "a forged budget event got through");

    // Every violation the server logged came from the attackers above: the
    // services need nothing the generated permissions do not give them.
    let server_log = std::fs::read_to_string(m.nats.store_dir().join("nats-server.log")).unwrap();
    let violations: Vec<&str> = server_log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(violations.len() >= 4, "the server logged the attackers' violations: {violations:#?}");
    for line in &violations {
        assert!(line.contains("attacker-"), "a service was refused a permission it needs: {line}");
    }
    for (name, log) in m.logs() {
        assert!(!log.contains("Permissions Violation"), "{name} hit a permissions violation:\n{log}");
    }

    // No secret in any log, CLI output or the server log, in any form.
    let mut secrets: Vec<(String, String)> = vec![("redis password".into(), REDIS_PASSWORD.into())];
    for e in std::fs::read_dir(&keys).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let seed = text.trim().to_string();
        if seed.starts_with('S') {
            // The seed, and its key material past the prefix.
            secrets.push((e.file_name().to_string_lossy().to_string(), seed.clone()));
            secrets.push((format!("{} (tail)", e.file_name().to_string_lossy()), seed[seed.len() - 20..].to_string()));
        }
    }
    let mut texts: Vec<(String, String)> = m.logs();
    texts.push(("nats-server.log".into(), server_log));
    texts.extend(outputs.into_iter().enumerate().map(|(i, o)| (format!("cli output {i}"), o)));
    let (ok, printed) = {
        let out = std::process::Command::new(bin_dir().join("gpu-agent"))
            .arg("--print-config")
            .envs([
                ("COSTMESH__NATS__URL", format!("nats://alice:{REDIS_PASSWORD}@127.0.0.1:1")),
                ("COSTMESH__REDIS__URL", format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1")),
                ("COSTMESH__GPU_AGENT__NODE", "gpu-a".into()),
            ])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    assert!(ok, "{printed}");
    texts.push(("--print-config".into(), printed));
    for (name, text) in &texts {
        for (what, secret) in &secrets {
            assert!(!text.contains(secret.as_str()), "{name} shows the {what}");
        }
    }
    assert!(mask_url_password(&format!("redis://:{REDIS_PASSWORD}@h")).contains("***"));
}
