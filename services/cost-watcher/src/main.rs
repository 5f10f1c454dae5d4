use std::process::ExitCode;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "cost-watcher",
        "cost_watcher",
        |cfg: costmesh_runtime::config::Loaded<costmesh_cost_watcher::Config>, ctx| {
            costmesh_cost_watcher::run(cfg.service, ctx)
        },
    )
}
