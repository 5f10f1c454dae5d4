use std::process::ExitCode;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "gpu-agent",
        "gpu_agent",
        |cfg: costmesh_runtime::config::Loaded<costmesh_gpu_agent::Config>, ctx| {
            costmesh_gpu_agent::run(cfg.service, ctx)
        },
    )
}
