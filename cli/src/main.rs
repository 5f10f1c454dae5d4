//! `costmesh`: run the whole mesh in one process, or tail its events.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use costmesh_runtime::config::EXIT_BAD_CONFIG;

// The cache-gateway binary's allocator (its memory figure in BENCHMARKS.md
// is measured with it), so the gateway in `costmesh up` behaves as alone.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod dashboard;
mod janitor;
mod jobs;
mod mesh;
mod natsconf;
mod view;

#[derive(Parser, Debug)]
#[command(name = "costmesh", version, about = "Cost control for ML teams: GPUs you own, inference on Google Cloud")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run all five services in one process. Without --nats it uses the
    /// in-process bus and simulated GPUs: nothing to install.
    Up(mesh::UpArgs),
    /// Storage lifecycle: plan, apply, bucket lifecycle rules.
    Janitor {
        #[command(subcommand)]
        command: janitor::JanitorCommand,
    },
    /// The dashboard against a running mesh (what `costmesh up` serves).
    Dashboard {
        #[command(flatten)]
        conn: jobs::Conn,
        /// Where to serve it.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        /// A file holding the admin token actions need (without it: read-only).
        #[arg(long)]
        admin_token_file: Option<std::path::PathBuf>,
    },
    /// Training jobs: submit, list, show, cancel, logs (asks the scheduler).
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// The inference cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// This month's cost, budgets, forecast and KPIs, asked of the
    /// cost-watcher; with --by, what each job, team, node, route or tenant
    /// cost (idle time as its own row).
    Cost {
        #[command(flatten)]
        conn: jobs::Conn,
        /// Break the month down by this.
        #[arg(long, value_enum)]
        by: Option<CostBy>,
        /// The month, YYYY-MM (default: the current one, in the ledger's time zone).
        #[arg(long)]
        month: Option<String>,
        /// How to print a breakdown.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Cloud Run right-sizing: the service's limits and scaling now, what
    /// it used over the window (Cloud Monitoring), the proposal from the
    /// seed's policy with the reason and the monthly saving; with --apply,
    /// the update. With --nats the proposal is also an `Action` event.
    Rightsize(RightsizeArgs),
    /// Owning GPUs against renting cloud GPUs, from `[cost_watcher.roi]`.
    Roi {
        #[arg(long, short)]
        config: Option<std::path::PathBuf>,
        /// JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Print the nats-server authorization for a mesh: one nkey user per
    /// service, node, client and operator, each allowed only its subjects.
    NatsConfig(natsconf::NatsConfigArgs),
    /// Live events from a NATS server.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CostBy {
    Job,
    Team,
    Node,
    Route,
    Tenant,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Serve the demo inference model on its own (what `costmesh up` puts
    /// behind the `demo` route): deterministic answers after a set latency.
    DemoModel {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Simulated model time per answer.
        #[arg(long, default_value_t = 150)]
        latency_ms: u64,
    },
    /// Remove cached responses of a route, a model version, or all.
    Purge {
        /// The gateway's client address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        model_version: Option<String>,
        #[arg(long)]
        all: bool,
        /// A file holding the gateway's admin token
        /// (`cache_gateway.admin_token_file`); default: the one `costmesh up`
        /// writes under the temp directory.
        #[arg(long, env = "COSTMESH_GATEWAY_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Print events as they arrive, decoded (protobuf or JSON).
    Tail {
        /// Subject filter; defaults to everything under the prefix.
        subject: Option<String>,
        /// `--json`: one JSON object per event instead of a summary line.
        #[command(flatten)]
        conn: jobs::Conn,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

async fn purge(
    gateway: &str,
    route: Option<String>,
    model_version: Option<String>,
    all: bool,
    token_file: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    if !all && route.is_none() && model_version.is_none() {
        anyhow::bail!("say what to purge: --route, --model-version, or --all");
    }
    let token_file = token_file.unwrap_or_else(mesh::demo_admin_token_file);
    let token = costmesh_runtime::config::read_secret_file(&token_file)
        .map_err(|e| anyhow::anyhow!("the gateway's admin token (--token-file): {e}"))?;
    let body = serde_json::json!({"route": route, "model_version": model_version, "all": all});
    let r = reqwest::Client::new()
        .post(format!("{}/_costmesh/purge", gateway.trim_end_matches('/')))
        .header("content-type", "application/json")
        .bearer_auth(token)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("gateway {gateway}: {e}"))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("gateway said {status}: {text}");
    }
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

async fn dashboard_cmd(
    conn: &jobs::Conn,
    listen: String,
    admin_token_file: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    use costmesh_runtime::config::Validate;
    let cfg = dashboard::Config { enabled: true, listen, admin_token_file };
    cfg.validate("").map_err(|e| anyhow::anyhow!("--{e}"))?;
    let bus = costmesh_bus::Bus::Nats(conn.connect("costmesh-dashboard").await?);
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", cfg.listen))?;
    println!("costmesh dashboard: http://{}/ (prefix {})", listener.local_addr()?, conn.prefix);
    let shutdown = tokio_util::sync::CancellationToken::new();
    costmesh_runtime::service::cancel_on_signal(shutdown.clone());
    dashboard::serve(listener, bus, &conn.prefix, &cfg, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn cost(conn: &jobs::Conn) -> anyhow::Result<ExitCode> {
    let (prefix, json) = (conn.prefix.as_str(), conn.json);
    let bus = costmesh_bus::Bus::Nats(conn.connect("costmesh-cost").await?);
    let subject = costmesh_contracts::Subjects::new(prefix).map_err(anyhow::Error::msg)?.api("cost-watcher", "summary");
    let reply = bus
        .request(&subject, Default::default(), Default::default(), std::time::Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("no answer from the cost-watcher on {subject}: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let cur = v["currency"].as_str().unwrap_or("");
    println!("{}  ({cur})", v["period"].as_str().unwrap_or("?"));
    if let Some(costs) = v["cost"].as_object() {
        for (scope, amount) in costs {
            println!("  {scope:<10} {:>12.2}", amount.as_f64().unwrap_or(0.0));
        }
    }
    println!(
        "  {:<10} {:>12.2}  of {:.2}",
        "total",
        v["total"].as_f64().unwrap_or(0.0),
        v["budget"].as_f64().unwrap_or(0.0)
    );
    if let Some(f) = v["forecast_month_end"].as_f64() {
        println!("  {:<10} {:>12.2}  (month end, linear)", "forecast", f);
    }
    for b in v["budgets"].as_array().into_iter().flatten() {
        println!("  budget {:<20} {}", b["budget"].as_str().unwrap_or(""), b["state"].as_str().unwrap_or(""));
    }
    println!("KPIs");
    if let Some(k) = v["kpis"].as_object() {
        for (name, value) in k.iter().filter(|(n, _)| *n != "period") {
            match value.as_f64() {
                Some(x) => println!("  {name:<28} {x:>10.4}"),
                None => println!("  {name:<28} {:>10}", "n/a"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `costmesh cost --by ...`: asks the cost-watcher's attribution API and
/// prints its rows as a table, JSON or CSV (one header line, the report's
/// columns in order).
#[derive(clap::Args, Debug)]
struct RightsizeArgs {
    /// The Cloud Run service, `projects/<p>/locations/<region>/services/<name>`.
    #[arg(long)]
    service: String,
    /// How far back usage is read.
    #[arg(long, default_value = "7d", value_parser = humantime_serde::re::humantime::parse_duration)]
    window: std::time::Duration,
    /// Update the service (limits and scaling, with an update mask).
    #[arg(long)]
    apply: bool,
    /// Cloud Run Admin API endpoint (default: Google's).
    #[arg(long)]
    run_endpoint: Option<String>,
    /// Cloud Monitoring API endpoint (default: Google's).
    #[arg(long)]
    monitoring_endpoint: Option<String>,
    /// `default`: Application Default Credentials
    /// (GOOGLE_APPLICATION_CREDENTIALS, the metadata server); `anonymous`
    /// for a local endpoint.
    #[arg(long, default_value = "default")]
    credentials: String,
    /// Policy: at least this CPU (vCPU), memory (GiB), and these instances.
    #[arg(long, default_value_t = 1.0)]
    cpu: f64,
    #[arg(long, default_value_t = 2.0)]
    memory_gib: f64,
    #[arg(long, default_value_t = 0)]
    min_instances: i32,
    #[arg(long, default_value_t = 5)]
    max_instances: i32,
    /// Target peak p95 CPU and memory utilisation.
    #[arg(long, default_value_t = 0.6)]
    target_cpu: f64,
    #[arg(long, default_value_t = 0.8)]
    target_memory: f64,
    #[command(flatten)]
    conn: jobs::Conn,
}

async fn rightsize(a: RightsizeArgs) -> anyhow::Result<ExitCode> {
    use costmesh_cost_watcher::rightsize as rs;
    let bad = |name: &str, v: f64, ok: bool, why: &str| {
        if ok {
            Ok(())
        } else {
            Err(anyhow::anyhow!("--{name} {v}: {why}"))
        }
    };
    bad("cpu", a.cpu, a.cpu > 0.0 && a.cpu <= 8.0, "must be more than 0 and at most 8 vCPU")?;
    bad("memory-gib", a.memory_gib, a.memory_gib >= 0.5 && a.memory_gib <= 32.0, "must be 0.5 to 32 GiB")?;
    bad("target-cpu", a.target_cpu, a.target_cpu > 0.0 && a.target_cpu <= 1.0, "must be a fraction in (0, 1]")?;
    bad(
        "target-memory",
        a.target_memory,
        a.target_memory > 0.0 && a.target_memory <= 1.0,
        "must be a fraction in (0, 1]",
    )?;
    bad("min-instances", a.min_instances as f64, a.min_instances >= 0, "must be 0 or more")?;
    bad(
        "max-instances",
        a.max_instances as f64,
        a.max_instances >= a.min_instances.max(1),
        "must be at least 1 and --min-instances",
    )?;
    rs::parse_service(&a.service).map_err(|e| anyhow::anyhow!("--{e}"))?;
    if !matches!(a.credentials.as_str(), "default" | "anonymous") {
        anyhow::bail!("--credentials: must be default (Application Default Credentials) or anonymous");
    }
    let target = rs::Target {
        service: a.service.clone(),
        run_endpoint: a.run_endpoint.clone().unwrap_or_default(),
        monitoring_endpoint: a.monitoring_endpoint.clone().unwrap_or_default(),
        credentials: a.credentials.clone(),
        window: a.window,
    };
    let policy = rs::Policy {
        cpu: a.cpu,
        memory_gib: a.memory_gib,
        min_instances: a.min_instances,
        max_instances: a.max_instances,
        target_cpu: a.target_cpu,
        target_memory: a.target_memory,
        ..Default::default()
    };
    let p = rs::read(&target, &policy).await.map_err(anyhow::Error::msg)?;
    let applied =
        if a.apply && p.changes { Some(rs::apply(&target, &p).await.map_err(anyhow::Error::msg)?) } else { None };
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"proposal": p, "applied": applied}))?);
    } else {
        let (c, n) = (&p.current, &p.proposed);
        println!("{}", p.service);
        println!("  cpu            {} -> {} vCPU", c.cpu, n.cpu);
        println!("  memory         {} -> {} GiB", c.memory_gib, n.memory_gib);
        println!("  min instances  {} -> {}", c.min_instances, n.min_instances);
        println!("  max instances  {} -> {}", c.max_instances, n.max_instances);
        for r in &p.reasons {
            println!("  because {r}");
        }
        println!("  monthly saving {:.2} USD", p.monthly_saving);
        match (&applied, a.apply, p.changes) {
            (Some(what), _, _) => println!("  applied: {what}"),
            (None, true, false) => println!("  nothing to change"),
            _ => println!("  dry run: nothing changed (--apply updates the service)"),
        }
    }
    if a.conn.nats.is_some() {
        let bus = costmesh_bus::Bus::Nats(a.conn.connect("costmesh-rightsize").await?);
        let mesh = costmesh_runtime::config::MeshConfig { subject_prefix: a.conn.prefix.clone(), ..Default::default() };
        let clock = costmesh_runtime::clock::Clock::system();
        let ctx = costmesh_runtime::ServiceContext::new(
            "costmesh-cli",
            None,
            bus,
            &mesh,
            clock.clone(),
            tokio_util::sync::CancellationToken::new(),
        );
        let (c, n) = (&p.current, &p.proposed);
        let action = costmesh_contracts::v1::Action {
            kind: "rightsize".into(),
            target: p.service.clone(),
            reason: p.reasons.join("; "),
            state: if applied.is_some() {
                costmesh_contracts::v1::ActionState::Taken
            } else {
                costmesh_contracts::v1::ActionState::Proposed
            } as i32,
            dry_run: applied.is_none(),
            service: "costmesh-cli".into(),
            time: Some(costmesh_contracts::timestamp(clock.now())),
            outcome: format!(
                "cpu {} -> {}, memory {} -> {} GiB, instances {}..{} -> {}..{}, saving {:.2} USD/month{}",
                c.cpu,
                n.cpu,
                c.memory_gib,
                n.memory_gib,
                c.min_instances,
                c.max_instances,
                n.min_instances,
                n.max_instances,
                p.monthly_saving,
                applied.as_ref().map(|w| format!("; {w}")).unwrap_or_default()
            ),
            resource: p.service.clone(),
            ..Default::default()
        };
        let subject = ctx.subjects().action("rightsize");
        ctx.events.publish_durable(&subject, &action).await.map_err(|e| {
            anyhow::anyhow!(
                "the Action event on {subject}: {e} (is the mesh running, with its events stream, under --prefix?)"
            )
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn cost_by(conn: &jobs::Conn, by: CostBy, month: Option<String>, format: Format) -> anyhow::Result<ExitCode> {
    let month = month
        .map(|m| costmesh_cost_watcher::report::parse_month(&m).map_err(|e| anyhow::anyhow!("--{e}")))
        .transpose()?;
    let by = format!("{by:?}").to_ascii_lowercase();
    let bus = costmesh_bus::Bus::Nats(conn.connect("costmesh-cost").await?);
    let subject =
        costmesh_contracts::Subjects::new(&conn.prefix).map_err(anyhow::Error::msg)?.api("cost-watcher", "attribution");
    let body = serde_json::json!({ "by": by, "month": month });
    let reply = bus
        .request(&subject, Default::default(), bytes::Bytes::from(body.to_string()), std::time::Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("no answer from the cost-watcher on {subject}: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("{e}");
    }
    let columns: Vec<&str> = v["columns"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    let cell = |row: &serde_json::Value, c: &str, table: bool| -> String {
        match &row[c] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            serde_json::Value::Number(n) if table && n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(0.0)),
            other => other.to_string(),
        }
    };
    match (format, conn.json) {
        (Format::Json, _) | (_, true) => println!("{}", serde_json::to_string_pretty(&v)?),
        (Format::Csv, false) => {
            let mut w = csv::Writer::from_writer(std::io::stdout());
            w.write_record(&columns)?;
            for r in &rows {
                w.write_record(columns.iter().map(|c| cell(r, c, false)))?;
            }
            w.flush()?;
        }
        (Format::Table, false) => {
            let closed = if v["closed"].as_bool() == Some(true) { ", closed" } else { "" };
            println!(
                "{} by {}  ({}{closed})",
                v["period"].as_str().unwrap_or("?"),
                v["by"].as_str().unwrap_or("?"),
                v["currency"].as_str().unwrap_or("")
            );
            let cells: Vec<Vec<String>> =
                rows.iter().map(|r| columns.iter().map(|c| cell(r, c, true)).collect()).collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
                .collect();
            let line = |items: Vec<String>| {
                items.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ")
            };
            println!("{}", line(columns.iter().map(|c| c.to_uppercase()).collect()));
            for r in cells {
                println!("{}", line(r));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn roi(path: Option<std::path::PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let env = costmesh_runtime::config::process_env();
    let text = costmesh_runtime::config::read_file(path.as_deref(), &env)?;
    let cfg = mesh::MeshFile::load(text.as_deref(), &env, false)?;
    let inputs = &cfg.cost_watcher.roi;
    let r = costmesh_cost_watcher::roi::compute(inputs);
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"inputs": inputs, "roi": r}))?);
    } else {
        print!("{}", costmesh_cost_watcher::roi::render(inputs, &r, &cfg.common.mesh.currency));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `service.name` of the CLI's own spans (a traced `jobs submit`).
pub const CLI_SERVICE: &str = "costmesh-cli";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("costmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `jobs` requests are traced (exported only when OTEL_EXPORTER_OTLP_*
    // asks; warnings only on stderr). The guard is dropped after the
    // command, outside the runtime's tasks, so its last spans are flushed
    // while the runtime still runs the exporter's connection.
    let telemetry = matches!(cli.command, Command::Jobs { .. }).then(|| {
        let log = costmesh_runtime::config::LogConfig { level: "warn".into(), ..Default::default() };
        let env = costmesh_runtime::config::process_env();
        rt.block_on(async { costmesh_runtime::telemetry::init(CLI_SERVICE, &log, &env) })
    });
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(args) => mesh::up(args).await,
            Command::Janitor { command } => janitor::run(command).await,
            Command::Roi { config, json } => roi(config, json),
            Command::NatsConfig(args) => natsconf::run(args),
            Command::Jobs { command } => jobs::run(command).await,
            Command::Dashboard { conn, listen, admin_token_file } => {
                dashboard_cmd(&conn, listen, admin_token_file).await
            }
            Command::Rightsize(a) => rightsize(a).await,
            Command::Cost { conn, by: None, month: None, .. } => cost(&conn).await,
            Command::Cost { by: None, month: Some(m), .. } => {
                Err(anyhow::anyhow!("--month {m:?} needs --by (the summary is always the current month)"))
            }
            Command::Cost { conn, by: Some(by), month, format } => cost_by(&conn, by, month, format).await,
            Command::Cache { command: CacheCommand::Purge { gateway, route, model_version, all, token_file } } => {
                purge(&gateway, route, model_version, all, token_file).await
            }
            Command::Cache { command: CacheCommand::DemoModel { listen, latency_ms } } => {
                let url = costmesh_cache_gateway::demo::start_on(&listen, std::time::Duration::from_millis(latency_ms))
                    .await?;
                println!("demo model at {url}/v1/generate ({latency_ms} ms per answer); Ctrl-C stops it");
                tokio::signal::ctrl_c().await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Events { command: EventsCommand::Tail { subject, conn, count } } => {
                view::tail(&conn, subject.as_deref(), count).await
            }
        }
    });
    drop(telemetry);
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<costmesh_runtime::ConfigError>() {
                eprintln!("costmesh: bad configuration: {c}");
                return ExitCode::from(EXIT_BAD_CONFIG as u8);
            }
            eprintln!("costmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
