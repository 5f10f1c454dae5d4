use std::process::ExitCode;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "cache-gateway",
        "cache_gateway",
        |cfg: costmesh_runtime::config::Loaded<costmesh_cache_gateway::Config>, ctx| {
            costmesh_cache_gateway::run(cfg.service, ctx)
        },
    )
}
