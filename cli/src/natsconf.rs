//! `costmesh nats-config`: the nats-server `authorization` block for a mesh,
//! one nkey user per service, per gpu-agent node, per client and operator,
//! with the permissions [`costmesh_runtime::authz`] derives from the subject
//! table. Seeds are written to `<keys-dir>/<user>.nk` (mode 0600) the first
//! time and reused after (public keys to `<user>.pub`), so running it again for a new node keeps every
//! other user's key.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use costmesh_contracts::Subjects;
use costmesh_runtime::authz::{self, Role};

#[derive(Args, Debug)]
pub struct NatsConfigArgs {
    /// Where each user's nkey seed lives (`<user>.nk`); missing ones are created.
    #[arg(long)]
    pub keys_dir: PathBuf,
    /// Subject prefix of the mesh.
    #[arg(long, default_value = "costmesh")]
    pub prefix: String,
    /// A gpu-agent node (repeatable): its user may publish only its own telemetry.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// A client user (repeatable): may use the job and cost APIs, nothing else.
    #[arg(long = "client")]
    pub clients: Vec<String>,
    /// An operator with every permission (repeatable): `costmesh events tail`, the nats CLI.
    #[arg(long = "admin")]
    pub admins: Vec<String>,
    /// Write the block here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The seed in `path`, or a new one written there (0600, never overwritten).
fn load_or_create(path: &Path) -> anyhow::Result<nkeys::KeyPair> {
    if path.exists() {
        let seed = costmesh_runtime::config::read_secret_file(path).map_err(anyhow::Error::msg)?;
        return nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| anyhow::anyhow!("{} does not hold an nkey seed ({})", path.display(), e.kind()));
    }
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| anyhow::anyhow!("new nkey: {e}"))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    writeln!(f, "{seed}")?;
    Ok(pair)
}

pub fn run(args: NatsConfigArgs) -> anyhow::Result<ExitCode> {
    let subjects = Subjects::new(&args.prefix).map_err(anyhow::Error::msg)?;
    let mut roles: Vec<Role> = authz::SERVICES.to_vec();
    for node in &args.nodes {
        costmesh_contracts::subjects::validate_name(node).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
        roles.push(Role::GpuAgent { node: node.clone() });
    }
    for name in &args.clients {
        costmesh_contracts::subjects::validate_name(name).map_err(|e| anyhow::anyhow!("--client: {e}"))?;
        roles.push(Role::Client { name: name.clone() });
    }
    for name in &args.admins {
        costmesh_contracts::subjects::validate_name(name).map_err(|e| anyhow::anyhow!("--admin: {e}"))?;
        roles.push(Role::Admin { name: name.clone() });
    }
    std::fs::create_dir_all(&args.keys_dir).map_err(|e| anyhow::anyhow!("{}: {e}", args.keys_dir.display()))?;
    let mut users = Vec::with_capacity(roles.len());
    for role in roles {
        let path = args.keys_dir.join(format!("{}.nk", role.user()));
        let pair = load_or_create(&path)?;
        let public = args.keys_dir.join(format!("{}.pub", role.user()));
        std::fs::write(&public, format!("{}\n", pair.public_key()))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", public.display()))?;
        eprintln!("{:<28} {}  {}", role.user(), pair.public_key(), path.display());
        users.push((role, pair.public_key()));
    }
    let scheduler = users.iter().find(|(r, _)| *r == Role::Scheduler).map(|(_, k)| k.clone()).unwrap_or_default();
    let mut text = authz::render(&subjects, &users);
    text.push_str(&format!(
        "# Each service: [nats] nkey_seed_file = \"<keys-dir>/<user>.nk\".\n\
         # Scheduler: [scheduler] signing_key_file = \"<keys-dir>/scheduler.nk\";\n\
         # every gpu-agent: [gpu_agent] trusted_scheduler_keys = [\"{scheduler}\"]\n\
         # (or trusted_scheduler_keys_file = \"<keys-dir>/scheduler.pub\").\n"
    ));
    match &args.out {
        Some(p) => std::fs::write(p, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
