use std::process::ExitCode;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "scheduler",
        "scheduler",
        |cfg: costmesh_runtime::config::Loaded<costmesh_scheduler::Config>, ctx| {
            costmesh_scheduler::run(cfg.service, ctx)
        },
    )
}
