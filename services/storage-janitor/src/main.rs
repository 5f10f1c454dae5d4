use std::process::ExitCode;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "storage-janitor",
        "storage_janitor",
        |cfg: costmesh_runtime::config::Loaded<costmesh_storage_janitor::Config>, ctx| {
            costmesh_storage_janitor::run(cfg.service, ctx)
        },
    )
}
