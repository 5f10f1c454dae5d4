//! A real Prometheus (Debian's `prometheus`, installed with promtool by
//! scripts/install-test-deps.sh) scrapes `costmesh up` with the shipped
//! scrape config and rules, adapted to the test's ports: every target is up,
//! every rule loads and evaluates, and every metric the Grafana dashboard
//! and the rules use has data.
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use costmesh_testkit::free_port;

const SERVICES: [(&str, &str, u16); 5] = [
    ("gpu-agent", "GPU_AGENT", 9101),
    ("scheduler", "SCHEDULER", 9102),
    ("storage-janitor", "STORAGE_JANITOR", 9103),
    ("cost-watcher", "COST_WATCHER", 9104),
    ("cache-gateway", "CACHE_GATEWAY", 9105),
];

const WAIT: Duration = Duration::from_secs(60);

async fn get_json(client: &reqwest::Client, url: &str) -> Result<serde_json::Value, String> {
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    let text = r.text().await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

#[tokio::test]
async fn a_real_prometheus_scrapes_every_service_and_every_rule_and_panel_has_data() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let nats = costmesh_testkit::NatsServer::start_new();
    let work = tempfile::tempdir().unwrap();
    let prefix = costmesh_testkit::unique_prefix("prometheus");

    // costmesh up, each admin endpoint on a port of ours.
    let ports: BTreeMap<&str, u16> = SERVICES.iter().map(|(name, _, _)| (*name, free_port())).collect();
    let gateway = format!("127.0.0.1:{}", free_port());
    let mut up = costmesh_cmd();
    up.args(["up", "--quiet", "--nats", &nats.url()])
        .env("COSTMESH__MESH__SUBJECT_PREFIX", &prefix)
        .env("COSTMESH__CACHE_GATEWAY__LISTEN", &gateway)
        .env("COSTMESH__CACHE_GATEWAY__STATS_INTERVAL", "1s")
        .env("COSTMESH__COST_WATCHER__EVALUATE_INTERVAL", "1s")
        .env("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "500ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (name, section, _) in SERVICES {
        up.env(format!("COSTMESH__{section}__ADMIN__LISTEN"), format!("127.0.0.1:{}", ports[name]));
    }
    let _up = up.spawn().unwrap();

    // The shipped scrape config, its targets and intervals adapted.
    let mut config = std::fs::read_to_string(root.join("compose/prometheus/prometheus.yml")).unwrap();
    for (name, _, port) in SERVICES {
        let shipped = format!("{name}:{port}");
        assert!(config.contains(&shipped), "prometheus.yml has no target {shipped}");
        config = config.replace(&shipped, &format!("127.0.0.1:{}", ports[name]));
    }
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s");
    config = config.replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    std::fs::write(work.path().join("prometheus.yml"), config).unwrap();
    std::fs::copy(root.join("compose/prometheus/alerts.yml"), work.path().join("alerts.yml")).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", work.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", work.path().join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (scripts/install-test-deps.sh installs Debian's prometheus package)");
    let api = format!("http://{web}/api/v1");
    let client = reqwest::Client::new();

    // Traffic through the demo route, so the cache series exist.
    costmesh_testkit::eventually(WAIT, "the demo route answers", || async {
        let r = client
            .post(format!("http://{gateway}/demo/v1/generate"))
            .header("content-type", "application/json")
            .body(r#"{"prompt":"prometheus"}"#)
            .send()
            .await;
        r.is_ok_and(|r| r.status().is_success())
    })
    .await;

    let targets = costmesh_testkit::wait_for(WAIT, "every target up", || async {
        let v = get_json(&client, &format!("{api}/targets")).await?;
        let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        if active.len() == SERVICES.len() && active.iter().all(|t| t["health"] == "up") {
            Ok(active)
        } else {
            Err(format!("{active:?}"))
        }
    })
    .await;
    let scraped: Vec<String> = targets.iter().map(|t| t["scrapeUrl"].as_str().unwrap_or("").to_string()).collect();
    for (name, _, _) in SERVICES {
        let want = format!("127.0.0.1:{}/metrics", ports[name]);
        assert!(scraped.iter().any(|u| u.contains(&want)), "{name} not scraped: {scraped:?}");
    }

    // Every rule of alerts.yml loaded and evaluated without an error.
    let shipped_rules = std::fs::read_to_string(root.join("compose/prometheus/alerts.yml")).unwrap();
    let names: Vec<String> = shipped_rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert: ").map(|n| n.trim().to_string()))
        .collect();
    assert!(names.len() >= 5, "{names:?}");
    costmesh_testkit::wait_for(WAIT, "every rule loaded and healthy", || async {
        let v = get_json(&client, &format!("{api}/rules")).await?;
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let healthy = |n: &str| {
            rules
                .iter()
                .any(|r| r["name"] == n && r["health"] == "ok" && r["lastError"].as_str().unwrap_or("").is_empty())
        };
        if names.iter().all(|n| healthy(n)) {
            Ok(())
        } else {
            Err(format!("{rules:?}"))
        }
    })
    .await;

    // Every metric the dashboard and the rules query has data.
    let mut metrics: Vec<String> = Vec::new();
    for (_, e) in costmesh_testkit::shipped_promql() {
        for m in costmesh_testkit::promql_metric_names(&e) {
            if !metrics.contains(&m) {
                metrics.push(m);
            }
        }
    }
    assert!(metrics.len() >= 10, "{metrics:?}");
    for m in &metrics {
        costmesh_testkit::wait_for(WAIT, &format!("data for {m}"), || async {
            let v = get_json(&client, &format!("{api}/query?query={m}")).await?;
            let n = v["data"]["result"].as_array().map_or(0, |r| r.len());
            if n > 0 {
                Ok(())
            } else {
                Err(v.to_string())
            }
        })
        .await;
    }
    let _ = prometheus.kill().await;
}

/// The `costmesh` binary, its dashboard on a free port (tests run at once).
fn costmesh_cmd() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"));
    c.env("COSTMESH__DASHBOARD__LISTEN", "127.0.0.1:0");
    c
}
