//! Runs one service as its own process: the body of every service binary's
//! `main`. Reads `--config` (or `$COSTMESH_CONFIG`) and the environment,
//! exits 64 naming the key on a bad config, prints the effective config with
//! `--print-config`, connects to NATS, serves the admin endpoint, and drains
//! on SIGTERM/SIGINT with a grace period.
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{self, AdminConfig, ConfigError, Loaded, Validate, EXIT_BAD_CONFIG};
use crate::service::{cancel_on_signal, connect_bus, ServiceContext};

/// How long a service may take to drain after the shutdown signal.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// A service's own config section.
pub trait ServiceConfig: DeserializeOwned + Default + Validate + Serialize + Send + Sync + 'static {
    fn admin(&self) -> &AdminConfig;
    /// The instance name appended to `ce-source` (a node name, say).
    fn instance(&self) -> Option<&str> {
        None
    }
}

#[derive(Parser, Debug)]
struct Args {
    /// Config file (TOML). Defaults to $COSTMESH_CONFIG; without either the
    /// seed's defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

/// `--log-format` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormatArg {
    Human,
    Json,
}

impl From<LogFormatArg> for config::LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Human => config::LogFormat::Human,
            LogFormatArg::Json => config::LogFormat::Json,
        }
    }
}

/// Loads a service's configuration from a file and the environment.
pub fn load<S: ServiceConfig>(
    path: Option<&std::path::Path>,
    section: &'static str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Loaded<S>, ConfigError> {
    let text = config::read_file(path, env)?;
    config::load_service::<S>(text.as_deref(), env, section)
}

/// The whole `main` of a service binary.
pub fn main<S, F, Fut>(service: &'static str, section: &'static str, run: F) -> ExitCode
where
    S: ServiceConfig,
    F: FnOnce(Loaded<S>, ServiceContext) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let args = Args::parse();
    let env = config::process_env();
    let mut cfg = match load::<S>(args.config.as_deref(), section, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{service}: bad configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if let Some(f) = args.log_format {
        cfg.common.log.format = f.into();
    }
    if args.print_config {
        print!("{}", config::render(&cfg));
        return ExitCode::SUCCESS;
    }
    if cfg.common.nats.url.is_none() {
        eprintln!(
            "{service}: bad configuration: config key `nats.url`: required when a service runs as its own process \
             (set COSTMESH__NATS__URL, or run every service in one process with `costmesh up`)"
        );
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let id = crate::telemetry::Identity::new(service, cfg.service.instance());
        let _telemetry = crate::telemetry::init_for(&[id], &cfg.common.log, &env);
        match host(service, cfg, run).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "{service} stopped with an error");
                // And once in plain words, for whoever reads the terminal.
                eprintln!("{service}: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn host<S, F, Fut>(service: &'static str, cfg: Loaded<S>, run: F) -> anyhow::Result<()>
where
    S: ServiceConfig,
    F: FnOnce(Loaded<S>, ServiceContext) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let bus = connect_bus(&cfg.common.nats, service).await?;
    let ctx = ServiceContext::new(
        service,
        cfg.service.instance(),
        bus,
        &cfg.common.mesh,
        cfg.common.mesh.clock(),
        shutdown.clone(),
    )
    .with_redis(cfg.common.redis.effective_url().map_err(anyhow::Error::msg)?)
    .with_redis_tls(cfg.common.redis.tls());
    let listener = tokio::net::TcpListener::bind(&cfg.service.admin().listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding admin endpoint {}: {e}", cfg.service.admin().listen))?;
    tracing::info!(admin = %listener.local_addr()?, bus = ctx.bus().backend(), "{service} starting");
    let admin = tokio::spawn(crate::admin::serve(listener, ctx.registry.clone(), ctx.health.clone(), shutdown.clone()));
    let mut task = tokio::spawn(run(cfg, ctx));
    let result = tokio::select! {
        r = &mut task => r,
        _ = shutdown.cancelled() => match tokio::time::timeout(DRAIN_GRACE, &mut task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(grace = ?DRAIN_GRACE, "drain did not finish in time; stopping");
                task.abort();
                Ok(Ok(()))
            }
        },
    };
    shutdown.cancel();
    // A scrape held open must not keep the process alive past its grace.
    let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
    result.map_err(|e| anyhow::anyhow!("service task panicked: {e}"))?
}
