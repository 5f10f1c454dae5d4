//! `costmesh jobs`: the scheduler's job API over NATS request-reply.
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use costmesh_bus::{Bus, NatsBus};
use costmesh_contracts::Subjects;
use serde_json::{json, Value};

/// Where the mesh is, and how to print answers: shared by every command
/// that talks to running services over NATS.
#[derive(Args, Debug)]
pub struct Conn {
    /// NATS server (or COSTMESH__NATS__URL, or NATS_URL as the nats CLI
    /// reads it). `nats://user:pass@host` and `nats://token@host` work.
    #[arg(long, env = "COSTMESH__NATS__URL")]
    pub nats: Option<String>,
    /// A `.creds` file (JWT and nkey seed), or NATS_CREDS.
    #[arg(long = "nats-creds", env = "NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// User name; the password comes from `--nats-password-file`.
    #[arg(long = "nats-user")]
    pub nats_user: Option<String>,
    /// A file holding the password (never the password on the command line).
    #[arg(long = "nats-password-file")]
    pub nats_password_file: Option<std::path::PathBuf>,
    /// A file holding a token.
    #[arg(long = "nats-token-file")]
    pub nats_token_file: Option<std::path::PathBuf>,
    /// A file holding an nkey seed (what `costmesh nats-config` writes for
    /// each client user), or NATS_NKEY.
    #[arg(long = "nats-nkey-file", env = "NATS_NKEY")]
    pub nats_nkey_file: Option<std::path::PathBuf>,
    /// Subject prefix.
    #[arg(long, default_value = "costmesh")]
    pub prefix: String,
    /// JSON instead of the human-readable form.
    #[arg(long)]
    pub json: bool,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Queue a job: `costmesh jobs submit --name train --gpus 2 --duration 6h -- python train.py`.
    Submit {
        #[command(flatten)]
        conn: Conn,
        /// A whole job spec as proto3 JSON (`-` for stdin) instead of the flags.
        #[arg(long)]
        file: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 1)]
        gpus: u32,
        /// Estimated run time, e.g. 90m, 6h.
        #[arg(long, default_value = "1h")]
        duration: String,
        /// Must be done by (RFC 3339), e.g. 2026-07-01T16:00:00+08:00.
        #[arg(long)]
        deadline: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// training, inference or batch.
        #[arg(long, default_value = "training")]
        class: String,
        #[arg(long, default_value = "")]
        checkpoint_dir: String,
        /// May run on preemptible (spot) nodes.
        #[arg(long)]
        preemptible_ok: bool,
        /// May run on cloud nodes.
        #[arg(long)]
        cloud_ok: bool,
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// The team the job's cost is booked to (`costmesh cost --by team`).
        #[arg(long, default_value = "")]
        team: String,
        /// KEY=VALUE, repeatable: free-form labels carried into cost reports.
        #[arg(long = "label")]
        label: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List jobs.
    Ls {
        #[command(flatten)]
        conn: Conn,
    },
    /// One job in full.
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Cancel a job (a running one is stopped).
    Cancel {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// The end of a job's log, from the node that ran it.
    Logs {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Which attempt (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long, default_value_t = 65536)]
        tail_bytes: u64,
    },
    /// Nodes the scheduler knows from telemetry.
    Nodes {
        #[command(flatten)]
        conn: Conn,
    },
}

fn secret_file(flag: &str, path: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_string())
}

impl Conn {
    /// The server URL: `--nats`, COSTMESH__NATS__URL, then NATS_URL.
    pub fn url(&self) -> anyhow::Result<String> {
        self.nats
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok())
            .ok_or_else(|| anyhow::anyhow!("no NATS server: pass --nats (or set COSTMESH__NATS__URL or NATS_URL)"))
    }

    /// Connects with the credentials given by flags (or in the URL).
    pub async fn connect(&self, name: &str) -> anyhow::Result<NatsBus> {
        let mut o = costmesh_bus::NatsConnectOptions { name: Some(name.to_string()), ..Default::default() };
        o.credentials_file = self.nats_creds.clone();
        if let Some(user) = &self.nats_user {
            let Some(f) = &self.nats_password_file else {
                anyhow::bail!("--nats-user needs --nats-password-file");
            };
            o.user = Some(user.clone());
            o.password = Some(secret_file("--nats-password-file", f)?);
        }
        if let Some(f) = &self.nats_token_file {
            o.token = Some(secret_file("--nats-token-file", f)?);
        }
        if let Some(f) = &self.nats_nkey_file {
            o.nkey_seed = Some(secret_file("--nats-nkey-file", f)?);
        }
        // The error names the server with any secret masked (the bus does that).
        Ok(NatsBus::connect(&self.url()?, &o).await?)
    }
}

struct Client {
    bus: Bus,
    subjects: Subjects,
}

impl Client {
    async fn new(c: &Conn) -> anyhow::Result<Self> {
        let bus = Bus::Nats(c.connect("costmesh-cli").await?);
        Ok(Self { bus, subjects: Subjects::new(&c.prefix).map_err(anyhow::Error::msg)? })
    }

    async fn ask(&self, subject: &str, body: Value) -> anyhow::Result<Value> {
        self.ask_as(subject, body, None).await
    }

    /// A request under `request_id` (`costmesh-request-id`), if any.
    async fn ask_as(&self, subject: &str, body: Value, request_id: Option<&str>) -> anyhow::Result<Value> {
        use tracing::Instrument;
        // A traced request: `costmesh jobs submit` starts the job's trace.
        let span = costmesh_runtime::telemetry::client_span(&self.subjects, crate::CLI_SERVICE, subject);
        let reply = async {
            let mut headers = costmesh_bus::Headers::new();
            costmesh_runtime::telemetry::inject(&mut headers);
            if let Some(r) = request_id {
                headers.insert(costmesh_runtime::events::REQUEST_ID, r);
            }
            self.bus.request(subject, headers, bytes::Bytes::from(body.to_string()), Duration::from_secs(5)).await
        }
        .instrument(span)
        .await
        .map_err(|e| anyhow::anyhow!("no answer on {subject}: {e}"))?;
        let v: Value = serde_json::from_slice(&reply.payload)?;
        if let Some(e) = v["error"].as_str() {
            anyhow::bail!("{e}");
        }
        Ok(v)
    }

    async fn api(&self, verb: &str, body: Value) -> anyhow::Result<Value> {
        self.ask(&self.subjects.api("scheduler", verb), body).await
    }

    /// Submits `spec` under a request id of its own, sent again while no
    /// scheduler answers (one taking over, say) for up to
    /// [`SUBMIT_RETRY_FOR`]: the same request id makes it one job however
    /// many tries arrive.
    async fn submit(&self, spec: Value) -> anyhow::Result<Value> {
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let subject = self.subjects.api("scheduler", "submit");
        let until = std::time::Instant::now() + SUBMIT_RETRY_FOR;
        let mut wait = Duration::from_millis(500);
        loop {
            match self.ask_as(&subject, spec.clone(), Some(&request_id)).await {
                Err(e) if e.to_string().starts_with("no answer") && std::time::Instant::now() + wait < until => {
                    eprintln!("{e}; trying again in {wait:?} (request id {request_id})");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
                r => return r,
            }
        }
    }
}

/// How long `costmesh jobs submit` keeps trying while no scheduler answers.
const SUBMIT_RETRY_FOR: Duration = Duration::from_secs(30);

fn class_name(c: &str) -> anyhow::Result<&'static str> {
    Ok(match c {
        "training" => "JOB_CLASS_TRAINING",
        "inference" => "JOB_CLASS_INFERENCE",
        "batch" => "JOB_CLASS_BATCH",
        other => anyhow::bail!("--class {other:?}: must be training, inference or batch"),
    })
}

fn row(j: &Value) -> String {
    let s = |k: &str| j[k].as_str().unwrap_or("-").to_string();
    format!(
        "{:<15} {:<20} {:<10} {:>7} {:<12} {}",
        s("id"),
        j["spec"]["name"].as_str().unwrap_or("?"),
        s("state"),
        j["attempt"],
        s("node"),
        s("reason")
    )
}

pub async fn run(cmd: JobsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobsCommand::Submit {
            conn,
            file,
            name,
            gpus,
            duration,
            deadline,
            priority,
            class,
            checkpoint_dir,
            preemptible_ok,
            cloud_ok,
            max_retries,
            env,
            team,
            label,
            command,
        } => {
            let spec = match file {
                Some(f) => {
                    let text = if f == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{f}: {e}"))?
                    };
                    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{f}: not JSON: {e}"))?
                }
                None => {
                    let Some((program, args)) = command.split_first() else {
                        anyhow::bail!("give the command after `--`, e.g. costmesh jobs submit --name t -- ./train.sh");
                    };
                    let secs = humantime_serde::re::humantime::parse_duration(&duration)
                        .map_err(|e| anyhow::anyhow!("--duration {duration:?}: {e}"))?
                        .as_secs();
                    let mut vars = BTreeMap::new();
                    for kv in &env {
                        let (k, v) =
                            kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected KEY=VALUE"))?;
                        vars.insert(k.to_string(), v.to_string());
                    }
                    let mut labels = BTreeMap::new();
                    for kv in &label {
                        let (k, v) =
                            kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--label {kv:?}: expected KEY=VALUE"))?;
                        labels.insert(k.to_string(), v.to_string());
                    }
                    let mut spec = json!({
                        "name": name.unwrap_or_else(|| program.rsplit('/').next().unwrap_or(program).to_string()),
                        "command": program,
                        "args": args,
                        "env": vars,
                        "gpus": gpus,
                        "estimatedDurationS": secs.to_string(),
                        "priority": priority,
                        "class": class_name(&class)?,
                        "checkpointDir": checkpoint_dir,
                        "preemptibleOk": preemptible_ok,
                        "cloudOk": cloud_ok,
                        "maxRetries": max_retries,
                        "team": team,
                        "labels": labels,
                    });
                    if let Some(d) = deadline {
                        let t = chrono::DateTime::parse_from_rfc3339(&d)
                            .map_err(|e| anyhow::anyhow!("--deadline {d:?}: {e} (RFC 3339 expected)"))?;
                        spec["deadline"] = json!(t.with_timezone(&chrono::Utc).to_rfc3339());
                    }
                    spec
                }
            };
            let client = Client::new(&conn).await?;
            let v = client.submit(spec).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v["job"]["id"].as_str().unwrap_or("?"));
            }
        }
        JobsCommand::Ls { conn } => {
            // The scheduler answers a page at a time; follow `next` to the end.
            let client = Client::new(&conn).await?;
            let mut jobs: Vec<serde_json::Value> = Vec::new();
            let mut after: Option<u64> = None;
            loop {
                let v = client.api("list", json!({ "after": after })).await?;
                jobs.extend(v["jobs"].as_array().into_iter().flatten().cloned());
                match v["next"].as_u64() {
                    Some(n) if Some(n) != after => after = Some(n),
                    _ => break,
                }
            }
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&json!({ "jobs": jobs }))?);
            } else {
                println!("{:<15} {:<20} {:<10} {:>7} {:<12} REASON", "ID", "NAME", "STATE", "ATTEMPT", "NODE");
                for j in &jobs {
                    println!("{}", row(j));
                }
            }
        }
        JobsCommand::Show { conn, id } => {
            let v = Client::new(&conn).await?.api("show", json!({ "id": id })).await?;
            println!("{}", serde_json::to_string_pretty(&v["job"])?);
        }
        JobsCommand::Cancel { conn, id } => {
            let v = Client::new(&conn).await?.api("cancel", json!({ "id": id })).await?;
            println!("{} {}", id, v["job"]["state"].as_str().unwrap_or("?"));
        }
        JobsCommand::Nodes { conn } => {
            let v = Client::new(&conn).await?.api("nodes", json!({})).await?;
            println!("{}", serde_json::to_string_pretty(&v["nodes"])?);
        }
        JobsCommand::Logs { conn, id, attempt, tail_bytes } => {
            let client = Client::new(&conn).await?;
            let job = client.api("show", json!({ "id": id })).await?["job"].clone();
            let Some(node) = job["node"].as_str().map(str::to_string) else {
                anyhow::bail!("job {id} has not run yet (state {})", job["state"]);
            };
            let attempt = attempt.unwrap_or(job["attempt"].as_u64().unwrap_or(1) as u32);
            let v = client
                .ask(
                    &client.subjects.node_logs(&node),
                    json!({"job_id": id, "attempt": attempt, "tail_bytes": tail_bytes}),
                )
                .await?;
            print!("{}", v["log"].as_str().unwrap_or(""));
        }
    }
    Ok(ExitCode::SUCCESS)
}
