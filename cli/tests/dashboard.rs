//! The dashboard in a real headless Chromium (Debian's `chromium`, driven
//! over CDP by chromiumoxide), served by `costmesh up` over a real
//! nats-server: it loads with no console error, the GPU panel fills, a
//! budget event published on the bus shows in the actions log and turns the
//! budget tile red, a submitted job shows in the job list, the page says it
//! is disconnected while `costmesh up` is stopped and recovers when it is
//! back. Its API refuses bad requests with the reason and actions without
//! the token. Screenshots (wide and narrow) go to `$COSTMESH_SCREENSHOTS`
//! when set (docs/img is where the docs take them from).
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::js_protocol::runtime::{ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown};
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::v1::{BudgetEvent, BudgetState, Money};
use costmesh_contracts::{ContentType, EventMeta, Subjects};
use costmesh_testkit::free_port;
use futures::StreamExt;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn up(nats: &str, prefix: &str, dashboard: u16) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"));
    cmd.args(["up", "--quiet", "--nats", nats, "--dashboard", &format!("127.0.0.1:{dashboard}")])
        .env_remove("COSTMESH_CONFIG")
        .env("COSTMESH__MESH__SUBJECT_PREFIX", prefix)
        .env("COSTMESH__CACHE_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("COSTMESH__GPU_AGENT__SAMPLE_INTERVAL", "500ms")
        .env("COSTMESH__CACHE_GATEWAY__STATS_INTERVAL", "1s")
        // The example job may run, as whoever runs the test.
        .env("COSTMESH__GPU_AGENT__JOBS__ALLOWED_COMMANDS", format!("[{:?}]", examples()))
        .env("COSTMESH__GPU_AGENT__JOBS__RUN_AS_USER", whoami())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for s in ["GPU_AGENT", "SCHEDULER", "STORAGE_JANITOR", "COST_WATCHER", "CACHE_GATEWAY"] {
        cmd.env(format!("COSTMESH__{s}__ADMIN__LISTEN"), "127.0.0.1:0");
    }
    cmd.spawn().expect("spawn costmesh up")
}

fn examples() -> String {
    std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/jobs")).unwrap().display().to_string()
}

fn whoami() -> String {
    let out = std::process::Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn stop(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running");
    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert!(status.success(), "{status}");
}

/// Evaluates `js` in the page until it returns true.
async fn until(page: &Page, what: &str, js: &str) {
    costmesh_testkit::wait_for(WAIT, what, || async {
        match page.evaluate(js).await.map(|v| v.into_value::<bool>()) {
            Ok(Ok(true)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

async fn text(page: &Page, js: &str) -> String {
    page.evaluate(js).await.unwrap().into_value::<String>().unwrap_or_default()
}

#[tokio::test]
async fn the_dashboard_in_chromium_is_live_acts_only_with_the_token_and_survives_a_restart() {
    let nats = costmesh_testkit::NatsServer::start_new();
    let prefix = costmesh_testkit::unique_prefix("dash");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let work = tempfile::tempdir().unwrap();
    let mut mesh = up(&nats.url(), &prefix, port);
    let http = reqwest::Client::new();
    // Up once it has heard from the scheduler and the cost-watcher.
    costmesh_testkit::eventually(WAIT, "the dashboard with the job list and the month's summary", || async {
        let Ok(r) = http.get(format!("{base}/api/state")).send().await else { return false };
        let s: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or_default();
        !s["jobs"].is_null() && !s["summary"].is_null()
    })
    .await;

    // The API: reasons for bad requests, no actions without the token.
    for (method, path, status, says) in [
        ("GET", "/api/jobs/..%2fetc", 400, "job id"),
        ("GET", "/api/jobs/j-000000000000", 404, "unknown job"),
        ("GET", "/api/nope", 404, "no such endpoint"),
        ("DELETE", "/api/state", 405, "not allowed"),
        ("POST", "/api/jobs/j-000000000000/cancel", 403, "actions are off"),
    ] {
        let r = http.request(method.parse().unwrap(), format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(body["error"].as_str().unwrap_or("").contains(says), "{method} {path}: {body}");
    }
    // Everything the page loads comes from the binary.
    let mut weight = 0;
    for a in ["/", "/assets/app.js", "/assets/style.css", "/assets/uplot.js", "/assets/uplot.css", "/favicon.svg"] {
        let r = http.get(format!("{base}{a}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{a}");
        weight += r.bytes().await.unwrap().len();
    }
    println!("dashboard: page weight {weight} B (all assets, uncompressed)");

    let chromium = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .expect("chromium on PATH (scripts/install-test-deps.sh installs it)");
    std::fs::create_dir_all(work.path().join("profile")).unwrap();
    let (mut browser, mut handler) = Browser::launch(
        BrowserConfig::builder()
            .chrome_executable(chromium)
            .no_sandbox()
            .user_data_dir(work.path().join("profile"))
            .arg("--disable-dev-shm-usage")
            .arg("--disable-gpu")
            .viewport(Viewport { width: 1280, height: 900, ..Default::default() })
            .build()
            .unwrap(),
    )
    .await
    .expect("chromium starts (installed by scripts/install-test-deps.sh)");
    let cdp = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page("about:blank").await.unwrap();
    let errors: Arc<Mutex<Vec<String>>> = Default::default();
    let mut console = page.event_listener::<EventConsoleApiCalled>().await.unwrap();
    let mut thrown = page.event_listener::<EventExceptionThrown>().await.unwrap();
    let mut logged = page.event_listener::<EventEntryAdded>().await.unwrap();
    page.execute(chromiumoxide::cdp::browser_protocol::log::EnableParams::default()).await.unwrap();
    let e = errors.clone();
    tokio::spawn(async move {
        loop {
            let line = tokio::select! {
                Some(c) = console.next() => (c.r#type == ConsoleApiCalledType::Error).then(|| format!("console.error {:?}", c.args)),
                Some(t) = thrown.next() => Some(format!("exception {:?}", t.exception_details)),
                Some(l) = logged.next() => (l.entry.level == LogEntryLevel::Error).then(|| format!("log {} {}", l.entry.text, l.entry.url.clone().unwrap_or_default())),
                else => return,
            };
            if let Some(l) = line {
                e.lock().unwrap().push(l);
            }
        }
    });
    page.goto(base.as_str()).await.unwrap();
    until(&page, "the page says it is live", "document.getElementById('status').textContent === 'live'").await;
    until(&page, "the GPU panel shows data", "document.querySelectorAll('#gpu-rows tr').length > 0").await;
    until(&page, "the power chart drawn", "!!document.querySelector('#power-chart canvas')").await;
    until(&page, "the month's tiles", "document.querySelectorAll('#tiles .tile').length >= 6").await;
    // The demo model behind the gateway, healthy.
    until(
        &page,
        "the gateway's backends",
        "[...document.querySelectorAll('#backend-rows tr')].some(r => r.dataset.state === 'ok')",
    )
    .await;

    // A budget event on the bus: in the actions log, and the tile red.
    let bus = Bus::Nats(NatsBus::connect(&nats.url(), &Default::default()).await.unwrap());
    let subjects = Subjects::new(&prefix).unwrap();
    let money = |units: i64| Some(Money { currency_code: "TWD".into(), micros: units * 1_000_000 });
    let b = BudgetEvent {
        scope: "total".into(),
        state: BudgetState::Exceeded as i32,
        previous_state: BudgetState::Warning as i32,
        spent: money(3100),
        budget: money(3000),
        threshold: 1.0,
        reason: "test: over the month's budget".into(),
        ..Default::default()
    };
    let (h, p) =
        costmesh_contracts::encode(&b, &EventMeta::new::<BudgetEvent>("test", chrono::Utc::now(), ContentType::Json));
    bus.publish(&subjects.budget("total", BudgetState::Exceeded), h, p).await.unwrap();
    until(&page, "the budget event in the actions log", "[...document.querySelectorAll('#action-log li')].some(l => l.dataset.kind === 'budget' && l.textContent.includes('over the month'))").await;
    until(&page, "the budget tile red", "document.getElementById('budget-tile').classList.contains('bad')").await;

    // A submitted job in the job list.
    let r = bus
        .request(&subjects.api("scheduler", "submit"), Default::default(), bytes::Bytes::from(json!({
            "name": "dash-job", "command": format!("{}/train.sh", examples()), "gpus": 1, "estimatedDurationS": "60",
            "class": "JOB_CLASS_TRAINING", "env": {"STEPS": "20", "STEP_SECONDS": "0.05"},
            "checkpointDir": work.path().join("ckpt").display().to_string(),
        }).to_string()), Duration::from_secs(5))
        .await
        .unwrap();
    let job: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    let id = job["job"]["id"].as_str().unwrap_or_else(|| panic!("{job}")).to_string();
    until(&page, "the job in the list", &format!("!!document.querySelector('#job-rows tr[data-job=\"{id}\"]')")).await;
    // It runs about a second: a finished bar on the timeline, over the bands.
    until(
        &page,
        "the job's run on the timeline",
        &format!("Object.values(state.runs).some(r => r.job === '{id}' && r.end && r.how === 'exited')"),
    )
    .await;
    until(
        &page,
        "the timeline drawn with the tariff",
        "!!document.querySelector('#timeline-chart canvas') && !!state.policy && state.policy.bands.length > 0",
    )
    .await;
    // Its detail, with the cancel button disabled and saying why.
    page.evaluate(format!("document.querySelector('#job-rows tr[data-job=\"{id}\"]').click()")).await.unwrap();
    until(&page, "the job's detail", "document.querySelector('#job-detail button') !== null").await;
    let detail = text(&page, "document.getElementById('job-detail').textContent").await;
    assert!(detail.contains("succeeded"), "{detail}");
    // Its log's tail from the node, and what it cost.
    assert!(detail.contains("finished 20 steps"), "{detail}");
    assert!(detail.contains("kWh"), "{detail}");
    // Ended: nothing to cancel, and the button says so.
    assert!(
        text(&page, "document.querySelector('#job-detail button').title").await.contains("ended"),
        "the disabled button says why"
    );

    // `costmesh dashboard` against the same mesh, with an admin token: a
    // cancel without it or with a wrong one is refused, with it done.
    let token_file = work.path().join("admin-token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").unwrap();
    let admin_port = free_port();
    let mut admin = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"))
        .args(["dashboard", "--nats", &nats.url(), "--prefix", &prefix, "--listen", &format!("127.0.0.1:{admin_port}")])
        .arg("--admin-token-file")
        .arg(&token_file)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // One that waits (two GPUs on a one-GPU node), so it can be cancelled.
    let r = bus
        .request(&subjects.api("scheduler", "submit"), Default::default(), bytes::Bytes::from(json!({
            "name": "dash-wait", "command": "/bin/true", "gpus": 2, "estimatedDurationS": "60", "class": "JOB_CLASS_TRAINING",
        }).to_string()), Duration::from_secs(5))
        .await
        .unwrap();
    let waiting: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    let waiting = waiting["job"]["id"].as_str().unwrap().to_string();
    // On the read-only page its cancel button is disabled and says why.
    let row = format!("document.querySelector('#job-rows tr[data-job=\"{waiting}\"]')");
    until(&page, "the waiting job in the list", &format!("!!{row}")).await;
    page.evaluate(format!("{row}.click()")).await.unwrap();
    until(&page, "its detail", &format!("document.querySelector('#job-detail h3') && document.querySelector('#job-detail h3').textContent.startsWith('{waiting}')")).await;
    let why = text(&page, "document.querySelector('#job-detail button').title").await;
    assert!(why.contains("read-only"), "{why}");
    let cancel = format!("http://127.0.0.1:{admin_port}/api/jobs/{waiting}/cancel");
    costmesh_testkit::eventually(WAIT, "costmesh dashboard answering", || async {
        http.post(&cancel).send().await.is_ok_and(|r| r.status() == 401)
    })
    .await;
    let wrong = http.post(&cancel).bearer_auth("0123456789abcdef0123456789abcdeX").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let done = http.post(&cancel).bearer_auth("0123456789abcdef0123456789abcdef").send().await.unwrap();
    let status = done.status();
    let body = String::from_utf8_lossy(&done.bytes().await.unwrap()).to_string();
    assert_eq!(status, 200, "{body}");
    let again = http.post(&cancel).bearer_auth("0123456789abcdef0123456789abcdef").send().await.unwrap();
    assert_eq!(again.status(), 409, "cancelling an ended job is refused with the scheduler's reason");
    let shown = http.get(format!("http://127.0.0.1:{admin_port}/api/jobs/{waiting}")).send().await.unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.bytes().await.unwrap()).unwrap();
    assert_eq!(shown["job"]["state"], "cancelled", "{shown}");
    stop(&mut admin).await;

    // Screenshots, wide and narrow (one column under 800 px).
    let shots = std::env::var_os("COSTMESH_SCREENSHOTS").map(std::path::PathBuf::from).unwrap_or(work.path().into());
    std::fs::create_dir_all(&shots).unwrap();
    let png = page.screenshot(ScreenshotParams::builder().full_page(true).build()).await.unwrap();
    assert!(png.len() > 10_000, "a wide screenshot of {} B", png.len());
    std::fs::write(shots.join("dashboard-wide.png"), &png).unwrap();
    page.execute(SetDeviceMetricsOverrideParams::new(420, 900, 1.0, true)).await.unwrap();
    until(
        &page,
        "one column when narrow",
        "getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length === 1",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // charts resized on the next frame
    let png = page.screenshot(ScreenshotParams::builder().full_page(true).build()).await.unwrap();
    std::fs::write(shots.join("dashboard-narrow.png"), &png).unwrap();

    // The mesh stopped: the page says so; back: live again, with data.
    stop(&mut mesh).await;
    until(
        &page,
        "the page saying it is disconnected",
        "document.getElementById('status').textContent.startsWith('disconnected')",
    )
    .await;
    let mut mesh = up(&nats.url(), &prefix, port);
    until(&page, "the page live again", "document.getElementById('status').textContent === 'live'").await;
    until(&page, "the job list back", &format!("!!document.querySelector('#job-rows tr[data-job=\"{id}\"]')")).await;

    let errors = errors.lock().unwrap().clone();
    // The browser logs each failed reconnection while the server was down;
    // nothing else may be an error.
    let other: Vec<&String> = errors.iter().filter(|e| !e.contains("/api/events")).collect();
    assert!(other.is_empty(), "console errors: {other:#?}");
    browser.close().await.unwrap();
    let _ = browser.wait().await;
    cdp.abort();
    stop(&mut mesh).await;
}
