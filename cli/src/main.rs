//! `costmesh`: run the whole mesh in one process, or tail its events.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use costmesh_runtime::config::EXIT_BAD_CONFIG;

// The cache-gateway binary's allocator (its memory figure in BENCHMARKS.md
// is measured with it), so the gateway in `costmesh up` behaves as alone.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
