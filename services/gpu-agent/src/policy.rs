//! What a job may run, and as whom.
//!
//! An assignment names a command; the agent runs it only if the command,
//! resolved the way `execve` would find it (through `PATH` when it has no
//! `/`) and with every link followed, is an allowed executable or lies under
//! an allowed directory (`[gpu_agent.jobs] allowed_commands`). Nothing is
//! allowed by default. The resolved path is what runs, so a link swapped
//! after the check cannot send the job elsewhere.
//!
//! A job's environment may not set what decides which code a process loads
//! (`PATH`, `LD_*`, shell startup files): otherwise an allowed program could
//! be made to run anything.
//!
//! When the agent runs as root, jobs run as `run_as_user` (and
//! `run_as_group`), which must then be set.
use std::path::{Path, PathBuf};

use crate::config::JobsConfig;

/// Environment names a job may not set, and prefixes it may not use.
const DENIED_ENV: &[&str] = &["PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PYTHONSTARTUP"];
const DENIED_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_", "BASH_FUNC_", "COSTMESH_"];

#[derive(Clone, Debug)]
enum Allowed {
    File(PathBuf),
    Dir(PathBuf),
}

/// The user and group jobs run as, when they differ from the agent's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// The job policy of one node.
#[derive(Clone, Debug)]
pub struct Policy {
    allowed: Vec<Allowed>,
    run_as: Option<RunAs>,
    /// `PATH` of the agent, where bare command names are looked up.
    search_path: Option<std::ffi::OsString>,
}

/// Why a config is refused: (key under `jobs.`, value, reason).
pub type PolicyError = (&'static str, String, String);

impl Policy {
    /// Checks and resolves the `[gpu_agent.jobs]` policy keys.
    pub fn from_config(cfg: &JobsConfig) -> Result<Policy, PolicyError> {
        let mut allowed = Vec::with_capacity(cfg.allowed_commands.len());
        for (i, entry) in cfg.allowed_commands.iter().enumerate() {
            let name = "allowed_commands";
            let shown = entry.display().to_string();
            if !entry.is_absolute() {
                return Err((name, shown, format!("entry {i} must be an absolute path")));
            }
            let real = std::fs::canonicalize(entry).map_err(|e| (name, shown.clone(), format!("entry {i}: {e}")))?;
            allowed.push(if real.is_dir() { Allowed::Dir(real) } else { Allowed::File(real) });
        }
        let me = nix::unistd::geteuid();
        let run_as = if cfg.run_as_user.is_empty() {
            if me.is_root() && !allowed.is_empty() {
                return Err((
                    "run_as_user",
                    String::new(),
                    "the agent runs as root: name the unprivileged user jobs run as (or \"root\" to run them as root on purpose)".into(),
                ));
            }
            None
        } else {
            let user = nix::unistd::User::from_name(&cfg.run_as_user)
                .map_err(|e| ("run_as_user", cfg.run_as_user.clone(), format!("looking it up: {e}")))?
                .ok_or_else(|| ("run_as_user", cfg.run_as_user.clone(), "no such user on this host".to_string()))?;
            let gid = if cfg.run_as_group.is_empty() {
                user.gid
            } else {
                nix::unistd::Group::from_name(&cfg.run_as_group)
                    .map_err(|e| ("run_as_group", cfg.run_as_group.clone(), format!("looking it up: {e}")))?
                    .ok_or_else(|| {
                        ("run_as_group", cfg.run_as_group.clone(), "no such group on this host".to_string())
                    })?
                    .gid
            };
            if user.uid == me && gid == nix::unistd::getegid() {
                None
            } else if !me.is_root() {
                return Err((
                    "run_as_user",
                    cfg.run_as_user.clone(),
                    "only an agent running as root can run jobs as another user or group".into(),
                ));
            } else {
                Some(RunAs { user: user.name, uid: user.uid.as_raw(), gid: gid.as_raw() })
            }
        };
        Ok(Policy { allowed, run_as, search_path: std::env::var_os("PATH") })
    }

    /// The user jobs run as, if not the agent's.
    pub fn run_as(&self) -> Option<&RunAs> {
        self.run_as.as_ref()
    }

    /// Where `command` resolves to, if the policy allows it; otherwise why
    /// not, naming the rule.
    pub fn check(&self, command: &str, env: &std::collections::HashMap<String, String>) -> Result<PathBuf, String> {
        let mut names: Vec<&String> = env.keys().collect();
        names.sort();
        for name in names {
            let upper = name.to_ascii_uppercase();
            if DENIED_ENV.contains(&upper.as_str()) || DENIED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p)) {
                return Err(format!(
                    "the job's env may not set {name}: it decides which code runs (refused by the gpu-agent's job policy)"
                ));
            }
        }
        if self.allowed.is_empty() {
            return Err(format!(
                "command {command:?} not allowed: gpu_agent.jobs.allowed_commands is empty, so this node runs no command"
            ));
        }
        let real = self.resolve(command)?;
        let ok = self.allowed.iter().any(|a| match a {
            Allowed::File(f) => *f == real,
            Allowed::Dir(d) => real.starts_with(d),
        });
        if !ok {
            let list: Vec<String> = self
                .allowed
                .iter()
                .map(|a| match a {
                    Allowed::File(f) => f.display().to_string(),
                    Allowed::Dir(d) => format!("{}/", d.display()),
                })
                .collect();
            return Err(format!(
                "command {command:?} (resolved to {}) not allowed by gpu_agent.jobs.allowed_commands ({})",
                real.display(),
                list.join(", ")
            ));
        }
        Ok(real)
    }

    fn resolve(&self, command: &str) -> Result<PathBuf, String> {
        if command.is_empty() {
            return Err("the job has no command".into());
        }
        let found = if command.contains('/') {
            Some(PathBuf::from(command))
        } else {
            self.search_path
                .as_ref()
                .and_then(|p| std::env::split_paths(p).map(|d| d.join(command)).find(|c| is_executable(c)))
        };
        let Some(path) = found else {
            return Err(format!("command {command:?} not found on the gpu-agent's PATH"));
        };
        std::fs::canonicalize(&path).map_err(|e| format!("command {command:?} not found: {e}"))
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allowed: &[&Path]) -> JobsConfig {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap();
        JobsConfig {
            allowed_commands: allowed.iter().map(|p| p.to_path_buf()).collect(),
            run_as_user: me.name,
            ..Default::default()
        }
    }

    #[test]
    fn only_allowed_commands_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join("jobs");
        std::fs::create_dir(&jobs).unwrap();
        let script = jobs.join("train.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/bin/sh", jobs.join("sneaky")).unwrap();
        let env = Default::default();
        let p = Policy::from_config(&cfg(&[&jobs])).unwrap();
        assert_eq!(p.check(script.to_str().unwrap(), &env).unwrap(), std::fs::canonicalize(&script).unwrap());
        let dotdot = format!("{}/../../../../../../bin/sh", jobs.display());
        assert!(p.check(&dotdot, &env).unwrap_err().contains("not allowed by gpu_agent.jobs.allowed_commands"));
        let link = jobs.join("sneaky");
        assert!(p.check(link.to_str().unwrap(), &env).unwrap_err().contains("not allowed"), "a link out is refused");
        assert!(p.check("sh", &env).unwrap_err().contains("not allowed"));
        assert!(p.check("no-such-binary-xyz", &env).unwrap_err().contains("not found"));

        let none = Policy::from_config(&cfg(&[])).unwrap();
        assert!(none.check(script.to_str().unwrap(), &env).unwrap_err().contains("allowed_commands is empty"));

        let sh = Policy::from_config(&cfg(&[Path::new("/bin/sh")])).unwrap();
        assert!(sh.check("sh", &env).is_ok(), "a bare name resolves through PATH");
        let bad: std::collections::HashMap<String, String> =
            [("LD_PRELOAD".to_string(), "/tmp/x.so".to_string())].into();
        assert!(sh.check("sh", &bad).unwrap_err().contains("may not set LD_PRELOAD"));
    }

    #[test]
    fn bad_policy_keys_are_named() {
        let mut c = cfg(&[Path::new("relative/dir")]);
        assert_eq!(Policy::from_config(&c).unwrap_err().0, "allowed_commands");
        c.allowed_commands = vec!["/no/such/dir".into()];
        assert_eq!(Policy::from_config(&c).unwrap_err().0, "allowed_commands");
        c.allowed_commands = vec![];
        c.run_as_user = "no-such-user-xyz".into();
        assert!(Policy::from_config(&c).unwrap_err().2.contains("no such user"));
        if nix::unistd::geteuid().is_root() {
            c.run_as_user = String::new();
            c.allowed_commands = vec!["/bin/sh".into()];
            assert_eq!(Policy::from_config(&c).unwrap_err().0, "run_as_user", "root must name the job user");
            c.run_as_user = "nobody".into();
            let p = Policy::from_config(&c).unwrap();
            assert_eq!(p.run_as().map(|r| r.user.as_str()), Some("nobody"));
        }
    }
}
