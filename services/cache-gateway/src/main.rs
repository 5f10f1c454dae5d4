use std::process::ExitCode;

// The hit path allocates a few small buffers per request on several
// threads; mimalloc's thread-local free lists serve them for less than
// glibc's arenas (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    costmesh_runtime::host::main(
        "cache-gateway",
        "cache_gateway",
        |cfg: costmesh_runtime::config::Loaded<costmesh_cache_gateway::Config>, ctx| {
            costmesh_cache_gateway::run(cfg.service, ctx)
        },
    )
}
