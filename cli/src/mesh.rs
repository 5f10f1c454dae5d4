//! `costmesh up`: the five services in one process.
//!
//! One config file holds every section. Without a NATS URL the services
//! share an in-process bus with the same subject semantics; with `--nats`
//! they talk over a real server exactly as the separate binaries do.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use costmesh_runtime::config::{self, CommonConfig, ConfigError, SecretUrl, Validate};
use costmesh_runtime::host::ServiceConfig;
use costmesh_runtime::service::{cancel_on_signal, connect_bus};
use costmesh_runtime::ServiceContext;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Config file (TOML); defaults to $COSTMESH_CONFIG, else the seed's defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Use this NATS server instead of the in-process bus.
    #[arg(long)]
    nats: Option<String>,
    /// Use this Redis for the gateway's shared cache.
    #[arg(long)]
    redis: Option<String>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
    /// Do not print the live event view.
    #[arg(long)]
    quiet: bool,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    log_format: Option<costmesh_runtime::host::LogFormatArg>,
    /// Serve the dashboard here (overrides `dashboard.listen`).
    #[arg(long, value_name = "ADDR")]
    dashboard: Option<String>,
    /// Do not serve the dashboard.
    #[arg(long, conflicts_with = "dashboard")]
    no_dashboard: bool,
}

/// The whole mesh's configuration: common sections plus all five services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshFile {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub gpu_agent: costmesh_gpu_agent::Config,
    pub scheduler: costmesh_scheduler::Config,
    pub storage_janitor: costmesh_storage_janitor::Config,
    pub cost_watcher: costmesh_cost_watcher::Config,
    pub cache_gateway: costmesh_cache_gateway::Config,
    pub dashboard: crate::dashboard::Config,
}

impl MeshFile {
    /// Loads and validates every section.
    pub fn load(file: Option<&str>, env: &BTreeMap<String, String>, demo_defaults: bool) -> Result<Self, ConfigError> {
        let mut table = config::merged_table(file, env)?;
        let mut sections = BTreeMap::new();
        for s in config::SERVICE_SECTIONS {
            if let Some(v) = table.remove(*s) {
                sections.insert(*s, v);
            }
        }
        let common: CommonConfig = config::from_value("", toml::Value::Table(table))?;
        common.validate("")?;
        fn section<T: serde::de::DeserializeOwned + Default + Validate>(
            name: &'static str,
            sections: &mut BTreeMap<&'static str, toml::Value>,
        ) -> Result<T, ConfigError> {
            let v: T = match sections.remove(name) {
                Some(v) => config::from_value(name, v)?,
                None => T::default(),
            };
            v.validate(name)?;
            Ok(v)
        }
        let mut m = MeshFile {
            common,
            gpu_agent: section("gpu_agent", &mut sections)?,
            scheduler: section("scheduler", &mut sections)?,
            storage_janitor: section("storage_janitor", &mut sections)?,
            cost_watcher: section("cost_watcher", &mut sections)?,
            cache_gateway: section("cache_gateway", &mut sections)?,
            dashboard: section("dashboard", &mut sections)?,
        };
        // A newcomer's first run should show something moving.
        let demo_set =
            env.contains_key("COSTMESH__GPU_AGENT__SIM__DEMO_LOAD") || file.is_some_and(|f| f.contains("demo_load"));
        if demo_defaults && !demo_set {
            m.gpu_agent.sim.demo_load = true;
        }
        // The one-command demo must not need root: keep the janitor's data
        // under the temp directory unless a base_dir is configured.
        let base_set =
            env.contains_key("COSTMESH__STORAGE_JANITOR__BASE_DIR") || file.is_some_and(|f| f.contains("base_dir"));
        if demo_defaults && !base_set {
            m.storage_janitor.base_dir = std::env::temp_dir().join("costmesh-demo");
        }
        // Likewise job logs (the default is under /var/log).
        let logs_set =
            env.contains_key("COSTMESH__GPU_AGENT__JOBS__LOGS_ROOT") || file.is_some_and(|f| f.contains("logs_root"));
        if demo_defaults && !logs_set {
            m.gpu_agent.jobs.logs_root = std::env::temp_dir().join("costmesh-demo").join("job-logs");
        }
        // And the example jobs may run, as whoever runs the demo (a real
        // node names its job user; see docs/config.md).
        let policy_set = env.contains_key("COSTMESH__GPU_AGENT__JOBS__ALLOWED_COMMANDS")
            || file.is_some_and(|f| f.contains("allowed_commands"));
        let examples = std::env::current_dir().map(|d| d.join("examples/jobs")).ok().filter(|d| d.is_dir());
        if let (true, false, Some(dir)) = (demo_defaults, policy_set, examples) {
            m.gpu_agent.jobs.allowed_commands = vec![dir];
            if m.gpu_agent.jobs.run_as_user.is_empty() {
                let me = std::process::Command::new("id").arg("-un").output().ok();
                m.gpu_agent.jobs.run_as_user =
                    me.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
            }
        }
        Ok(m)
    }
}

/// Where `costmesh up` keeps the gateway's admin token.
pub fn demo_admin_token_file() -> std::path::PathBuf {
    std::env::temp_dir().join("costmesh-demo").join("gateway-admin-token")
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    // Written aside and renamed over: several `costmesh up`s may start at once.
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let env = config::process_env();
    let text = config::read_file(args.config.as_deref(), &env)?;
    let mut cfg = MeshFile::load(text.as_deref(), &env, true)?;
    if let Some(url) = args.nats {
        cfg.common.nats.url = Some(SecretUrl::new(url));
    }
    if let Some(url) = args.redis {
        cfg.common.redis.url = Some(SecretUrl::new(url));
    }
    if let Some(f) = args.log_format {
        cfg.common.log.format = f.into();
    }
    if let Some(a) = args.dashboard {
        cfg.dashboard.listen = a;
    }
    if args.no_dashboard {
        cfg.dashboard.enabled = false;
    }
    cfg.common.validate("")?;
    cfg.dashboard.validate("dashboard")?;
    if args.print_config {
        print!("{}", config::render(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    // Five services in one process, each under its own `service.name`.
    let identities = {
        use costmesh_runtime::host::ServiceConfig;
        use costmesh_runtime::telemetry::Identity;
        [
            Identity::new("costmesh", None),
            Identity::new("gpu-agent", cfg.gpu_agent.instance()),
            Identity::new("scheduler", None),
            Identity::new("storage-janitor", None),
            Identity::new("cost-watcher", None),
            Identity::new("cache-gateway", None),
        ]
    };
    let _telemetry = costmesh_runtime::telemetry::init_for(&identities, &cfg.common.log, &env);
    // A demo model behind the gateway when no route is configured, so a
    // request can be sent right away and a miss seen turning into a hit.
    let mut demo = None;
    if cfg.cache_gateway.routes.is_empty() {
        let url = costmesh_cache_gateway::demo::start(std::time::Duration::from_millis(150)).await?;
        cfg.cache_gateway.routes.push(costmesh_cache_gateway::RouteConfig {
            name: "demo".into(),
            backends: vec![url.into()],
            ttl: None,
            priority: Default::default(),
            ..Default::default()
        });
        demo = Some(cfg.cache_gateway.listen.clone());
    }
    // Purge needs an admin token: the demo makes one (`costmesh cache purge` reads it).
    if cfg.cache_gateway.admin_token_file.is_none() {
        let f = demo_admin_token_file();
        write_private(&f, &format!("{}{}\n", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()))?;
        tracing::info!(file = %f.display(), "gateway admin token for this run (costmesh cache purge uses it)");
        cfg.cache_gateway.admin_token_file = Some(f);
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let bus = connect_bus(&cfg.common.nats, "costmesh-up").await?;
    let clock = cfg.common.mesh.clock();
    let mesh = &cfg.common.mesh;
    let mut tasks = JoinSet::new();

    let view = if args.quiet {
        None
    } else {
        let sub = bus
            .subscribe(&costmesh_contracts::Subjects::new(&mesh.subject_prefix).map_err(anyhow::Error::msg)?.all())
            .await?;
        Some(tokio::spawn(crate::view::print_live(sub, mesh.subject_prefix.clone(), shutdown.clone())))
    };

    let mut admins = Vec::new();
    macro_rules! start {
        ($name:literal, $section:expr, $run:path) => {{
            let section = $section.clone();
            let ctx =
                ServiceContext::new($name, section.instance(), bus.clone(), mesh, clock.clone(), shutdown.clone())
                    .with_redis(cfg.common.redis.effective_url().map_err(anyhow::Error::msg)?)
                    .with_redis_tls(cfg.common.redis.tls());
            let listen = section.admin().listen.clone();
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("{}: binding admin endpoint {listen}: {e}", $name))?;
            admins.push(($name, listener.local_addr()?));
            tasks.spawn(
                costmesh_runtime::admin::serve(listener, ctx.registry.clone(), ctx.health.clone(), shutdown.clone())
                    .map_ok_unit(),
            );
            let stop = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = $run(section, ctx).await {
                    tracing::error!(service = $name, error = format!("{e:#}"), "service stopped with an error");
                    stop.cancel();
                }
            });
        }};
    }
    start!("gpu-agent", cfg.gpu_agent, costmesh_gpu_agent::run);
    start!("scheduler", cfg.scheduler, costmesh_scheduler::run);
    start!("storage-janitor", cfg.storage_janitor, costmesh_storage_janitor::run);
    start!("cost-watcher", cfg.cost_watcher, costmesh_cost_watcher::run);
    start!("cache-gateway", cfg.cache_gateway, costmesh_cache_gateway::run);

    let dashboard = if cfg.dashboard.enabled {
        let listen = &cfg.dashboard.listen;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!("dashboard.listen {listen}: {e} (set [dashboard] listen, --dashboard or --no-dashboard)")
        })?;
        let addr = listener.local_addr()?;
        let (bus, prefix, dash, stop) =
            (bus.clone(), mesh.subject_prefix.clone(), cfg.dashboard.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = crate::dashboard::serve(listener, bus, &prefix, &dash, stop).await {
                tracing::error!(error = format!("{e:#}"), "dashboard stopped with an error");
            }
        });
        Some(addr)
    } else {
        None
    };

    println!("costmesh up: bus={} prefix={}", bus.backend(), mesh.subject_prefix);
    for (name, addr) in &admins {
        println!("  {name:<16} admin http://{addr}/readyz");
    }
    if let Some(addr) = dashboard {
        println!("  dashboard        http://{addr}/");
    }
    if let Some(listen) = demo {
        println!(
            "  demo model       curl -si -H 'content-type: application/json' -d '{{\"prompt\":\"hi\"}}' http://{listen}/demo/v1/generate"
        );
    }
    println!("events (Ctrl-C stops):");

    shutdown.cancelled().await;
    let drain = async {
        while tasks.join_next().await.is_some() {}
        if let Some(v) = view {
            let _ = v.await;
        }
    };
    if tokio::time::timeout(costmesh_runtime::host::DRAIN_GRACE, drain).await.is_err() {
        eprintln!("costmesh: drain did not finish within {:?}", costmesh_runtime::host::DRAIN_GRACE);
    }
    Ok(ExitCode::SUCCESS)
}

trait MapOkUnit {
    fn map_ok_unit(self) -> impl std::future::Future<Output = ()> + Send + 'static;
}

impl<F> MapOkUnit for F
where
    F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    async fn map_ok_unit(self) {
        if let Err(e) = self.await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    }
}
