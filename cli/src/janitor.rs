//! `costmesh janitor plan|apply|lifecycle`.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use costmesh_runtime::config;
use costmesh_storage_janitor::janitor::Janitor;

#[derive(Subcommand, Debug)]
pub enum JanitorCommand {
    /// Show what the policy would do, and what it would save. Changes nothing.
    Plan {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Carry the plan out now (whatever `apply` says in the config).
    Apply {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The archive bucket's lifecycle rules, in GCS's JSON format.
    Lifecycle {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

pub(crate) fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub async fn run(cmd: JanitorCommand) -> anyhow::Result<ExitCode> {
    let env = config::process_env();
    let path = match &cmd {
        JanitorCommand::Plan { config, .. }
        | JanitorCommand::Apply { config, .. }
        | JanitorCommand::Lifecycle { config } => config.clone(),
    };
    let text = config::read_file(path.as_deref(), &env)?;
    let mesh = crate::mesh::MeshFile::load(text.as_deref(), &env, false)?;
    let cfg = mesh.storage_janitor.clone();
    let currency = mesh.common.mesh.currency.clone();
    if let JanitorCommand::Lifecycle { .. } = cmd {
        println!("{}", serde_json::to_string_pretty(&costmesh_storage_janitor::lifecycle::gcs_lifecycle(&cfg))?);
        return Ok(ExitCode::SUCCESS);
    }
    let (apply, json) = match cmd {
        JanitorCommand::Plan { json, .. } => (false, json),
        JanitorCommand::Apply { json, .. } => (true, json),
        JanitorCommand::Lifecycle { .. } => unreachable!("handled above"),
    };
    let janitor = Janitor::new(cfg).map_err(anyhow::Error::msg)?;
    let progress = (apply && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let pass = janitor.pass(chrono::Utc::now(), apply, &currency, progress.clone()).await;
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&pass)?);
        return Ok(if pass.outcome.as_ref().is_some_and(|o| !o.failed.is_empty()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    println!("{:<12} {:<18} {:>10} {:>10} {:>9}  PATH  (WHY)", "RULE", "STEP", "SIZE", "FREES", "SAVES/MO");
    for a in &pass.plan.actions {
        println!(
            "{:<12} {:<18} {:>10} {:>10} {:>9.3}  {}  ({})",
            a.rule,
            a.step.as_str(),
            human_bytes(a.bytes),
            human_bytes(a.freed_bytes),
            a.saving_per_month,
            a.path.display(),
            a.reason
        );
    }
    for s in &pass.plan.skipped {
        println!(
            "{:<12} {:<18} {:>10} {:>10} {:>9}  {}  (left alone: {})",
            s.rule,
            "skip",
            "",
            "",
            "",
            s.path.display(),
            s.reason
        );
    }
    println!(
        "plan: {} actions, frees {}, saves {:.2} {currency}/month{}",
        pass.plan.actions.len(),
        human_bytes(pass.plan.freed_bytes()),
        pass.plan.saving_per_month(),
        if apply { "" } else { " (dry run: nothing changed; `costmesh janitor apply` carries it out)" }
    );
    if let Some(o) = &pass.outcome {
        println!(
            "applied: {} done, {} skipped, {} failed, {} freed",
            o.done.len(),
            o.skipped.len(),
            o.failed.len(),
            human_bytes(o.freed_bytes())
        );
        for (p, e) in &o.failed {
            eprintln!("failed: {}: {e}", p.display());
        }
        if !o.failed.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
