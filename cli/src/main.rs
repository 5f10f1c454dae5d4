//! `costmesh`: run the whole mesh in one process, or tail its events.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use costmesh_runtime::config::EXIT_BAD_CONFIG;

mod janitor;
mod mesh;
mod view;

#[derive(Parser, Debug)]
#[command(name = "costmesh", version, about = "Cost control for ML teams: GPUs you own, inference on Google Cloud")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

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
    /// Live events from a NATS server.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Print events as they arrive, decoded (protobuf or JSON).
    Tail {
        /// Subject filter; defaults to everything under the prefix.
        subject: Option<String>,
        /// NATS server (or COSTMESH__NATS__URL).
        #[arg(long, env = "COSTMESH__NATS__URL")]
        nats: String,
        /// Subject prefix.
        #[arg(long, default_value = "costmesh")]
        prefix: String,
        /// One JSON object per event instead of a summary line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("costmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(args) => mesh::up(args).await,
            Command::Janitor { command } => janitor::run(command).await,
            Command::Events { command: EventsCommand::Tail { subject, nats, prefix, json, count } } => {
                view::tail(&nats, &prefix, subject.as_deref(), json, count).await
            }
        }
    });
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
