//! Runs the jobs the scheduler places on this node.
//!
//! An assignment (`<prefix>.node.<node>.assign`) starts the job's command as
//! a child process with `CUDA_VISIBLE_DEVICES` set to its GPUs and
//! `COSTMESH_JOB_ID`, `COSTMESH_ATTEMPT`, `COSTMESH_CHECKPOINT_DIR` and
//! `COSTMESH_RESUME_FROM` in its environment. Its stdout and stderr go to
//! `<logs_root>/<job>/<attempt>.log`.
//!
//! **Checkpoint protocol:** a job reports a checkpoint by printing one line
//! `COSTMESH_CHECKPOINT <path>` on stdout. The agent reports it as a
//! `checkpointed` event; the scheduler hands the newest path back as
//! `COSTMESH_RESUME_FROM` when the job runs again. `examples/jobs/train.sh`
//! is a job that follows it.
//!
//! Signals (`<prefix>.node.<node>.signal`): checkpoint sends the configured
//! signal (SIGUSR1 by default); stop sends SIGTERM, then SIGKILL after the
//! grace period.
//!
//! Fencing: an assignment whose attempt is not newer than one this agent
//! has already seen for the job is ignored, so a redelivered or duplicated
//! assignment never starts a job twice.
//!
//! Supervision: each job runs in its own process group, with
//! `PR_SET_PDEATHSIG` so it dies with the agent (SIGKILL included), and a
//! record under `<logs_root>/.running/` names its process. An agent that
//! starts and finds a record kills what is left of that group (its
//! grandchildren, say) and reports the attempt interrupted. When a job's
//! main process ends, what is left of its group is killed too. An attempt
//! whose log file already exists was started before (by this agent or one
//! killed before it acked the assignment) and is never started again.
//!
//! Events (started, checkpointed, exited, failed) go through an outbox that
//! retries until NATS takes them: a node that loses NATS keeps its jobs
//! running and reports what happened when it reconnects. When the agent
//! itself stops, it stops its jobs (SIGTERM, then SIGKILL after the grace)
//! and reports them as interrupted, so the scheduler runs them again.
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use costmesh_contracts::v1::{JobAssignment, JobEvent, JobEventKind, JobSignal, JobSignalKind};
use costmesh_runtime::events::HandlerError;
use costmesh_runtime::ServiceContext;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::agent::AgentHandle;
use crate::config::JobsConfig;

/// The line prefix a job prints on stdout to report a checkpoint.
pub const CHECKPOINT_MARKER: &str = "COSTMESH_CHECKPOINT ";

/// `SIGUSR1`, `USR1`, `sigusr1` -> the signal.
pub fn parse_signal(name: &str) -> Option<Signal> {
    let n = name.trim().to_ascii_uppercase();
    let full = if n.starts_with("SIG") { n } else { format!("SIG{n}") };
    full.parse().ok()
}

struct Running {
    attempt: u32,
    pid: Option<u32>,
    gpus: Vec<u32>,
}

/// What `<logs_root>/.running/<job>.json` says of a job's process, so a
/// restarted agent can find what a killed one left running.
#[derive(serde::Serialize, serde::Deserialize)]
struct RunRecord {
    job_id: String,
    attempt: u32,
    pid: u32,
    /// `/proc/<pid>/stat` start time, so a reused pid is never taken for the job.
    start_ticks: u64,
    gpus: Vec<u32>,
}

/// The start time of a process in clock ticks since boot (`/proc/<pid>/stat`
/// field 22), or None when it is gone.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Puts the job in its own process group and has the kernel kill it when
/// the agent dies, however it dies.
#[allow(unsafe_code)]
fn supervise(cmd: &mut tokio::process::Command) {
    let agent = nix::unistd::getpid();
    cmd.process_group(0);
    // SAFETY: runs in the forked child before exec; it only makes two
    // async-signal-safe system calls (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The agent may have died between fork and prctl.
            if nix::unistd::getppid() != agent {
                return Err(std::io::Error::other("gpu-agent exited while the job was starting"));
            }
            Ok(())
        });
    }
}

/// SIGKILL to what is left of a job's process group.
fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// The jobs on this node.
#[derive(Clone)]
pub struct Runner {
    node: String,
    cfg: JobsConfig,
    policy: crate::policy::Policy,
    /// Newest attempt seen per job (the fence).
    seen: Arc<Mutex<HashMap<String, u32>>>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    outbox: Outbox,
    agent: Option<AgentHandle>,
    ctx: ServiceContext,
    /// Set once the agent is shutting down: jobs that end now were stopped
    /// by the agent, and are reported as interrupted (the scheduler requeues them).
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Job events waiting to be published, and how many are not yet out.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<(JobEvent, Option<String>)>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    /// The trace of each attempt's assignment (`traceparent`), so the
    /// events its process reports later (from other tasks) join it.
    traces: Arc<Mutex<HashMap<(String, u32), String>>>,
}

impl Outbox {
    /// Keeps the current span's trace for the attempt's later events.
    fn remember(&self, job: &str, attempt: u32) {
        if let Some(tp) = costmesh_runtime::telemetry::current_traceparent() {
            self.traces.lock().expect("traces lock").insert((job.to_string(), attempt), tp);
        }
    }

    fn send(&self, e: JobEvent) {
        let key = (e.job_id.clone(), e.attempt);
        let trace = {
            let mut t = self.traces.lock().expect("traces lock");
            if e.kind().ends_attempt() {
                t.remove(&key)
            } else {
                t.get(&key).cloned()
            }
        };
        self.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.tx.send((e, trace)).is_err() {
            // The publisher is gone (the agent is exiting): it will never go out.
            self.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Runner {
    /// Starts the outbox publisher and the logs responder; the agent hands
    /// it assignments and signals ([`Runner::assign`], [`Runner::signal`]).
    pub async fn start(
        node: &str,
        cfg: JobsConfig,
        ctx: ServiceContext,
        agent: Option<AgentHandle>,
    ) -> anyhow::Result<Runner> {
        let policy = crate::policy::Policy::from_config(&cfg)
            .map_err(|(name, value, why)| anyhow::anyhow!("gpu_agent.jobs.{name} = {value:?}: {why}"))?;
        match (cfg.allowed_commands.is_empty(), policy.run_as()) {
            (true, _) => tracing::warn!("gpu_agent.jobs.allowed_commands is empty: every assignment will be refused"),
            (false, Some(u)) => tracing::info!(user = %u.user, uid = u.uid, gid = u.gid, "jobs run as this user"),
            (false, None) => tracing::info!("jobs run as the agent's own user"),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(publish_outbox(ctx.clone(), rx, pending.clone()));
        let runner = Runner {
            node: node.to_string(),
            cfg: cfg.clone(),
            policy,
            seen: Default::default(),
            running: Default::default(),
            outbox: Outbox { tx, pending, traces: Default::default() },
            agent,
            ctx: ctx.clone(),
            stopping: Default::default(),
        };
        runner.reap_orphans();
        // Logs on request: `costmesh jobs logs`.
        let sub = ctx.bus().subscribe(&ctx.subjects().node_logs(node)).await?;
        let r = runner.clone();
        tokio::spawn(async move { r.serve_logs(sub).await });
        Ok(runner)
    }

    fn event(&self, job: &str, attempt: u32, kind: JobEventKind, gpus: &[u32]) -> JobEvent {
        JobEvent {
            job_id: job.to_string(),
            kind: kind as i32,
            node: self.node.clone(),
            gpu_indices: gpus.to_vec(),
            attempt,
            time: Some(costmesh_contracts::timestamp(self.ctx.clock.now())),
            ..Default::default()
        }
    }

    fn record_path(&self, job: &str, attempt: u32) -> PathBuf {
        self.cfg.logs_root.join(".running").join(format!("{}-{attempt}.json", costmesh_contracts::subjects::token(job)))
    }

    /// What a killed agent left behind: kill it, report it interrupted.
    fn reap_orphans(&self) {
        let dir = self.cfg.logs_root.join(".running");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let rec: RunRecord = match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                Some(r) => r,
                None => {
                    tracing::warn!(path = %path.display(), "unreadable job record removed");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            // The leader normally died with the agent (PDEATHSIG); its group
            // may still hold children, which go now.
            let alive = start_ticks(rec.pid) == Some(rec.start_ticks);
            tracing::warn!(job = %rec.job_id, attempt = rec.attempt, pid = rec.pid, leader_alive = alive, "job left behind by a killed agent: stopping its process group");
            kill_group(rec.pid);
            self.seen.lock().expect("jobs lock").insert(rec.job_id.clone(), rec.attempt);
            let mut ev = self.event(&rec.job_id, rec.attempt, JobEventKind::Interrupted, &rec.gpus);
            ev.exit_code = 137;
            ev.reason =
                "the gpu-agent running it was killed; its processes were stopped when the agent restarted".into();
            self.outbox.send(ev);
            let _ = std::fs::remove_file(&path);
        }
    }

    fn log_path(&self, job: &str, attempt: u32) -> PathBuf {
        self.cfg.logs_root.join(costmesh_contracts::subjects::token(job)).join(format!("{attempt}.log"))
    }

    pub async fn assign(&self, a: JobAssignment) -> Result<(), HandlerError> {
        let Some(spec) = a.spec.clone() else {
            return Err(HandlerError::Reject(format!("assignment of {} has no job spec", a.job_id)));
        };
        if a.node != self.node {
            return Err(HandlerError::Reject(format!("assignment for node {:?} reached node {:?}", a.node, self.node)));
        }
        // The id becomes a directory under the logs root and a subject token.
        if let Err(why) = costmesh_contracts::subjects::validate_name(&a.job_id) {
            return Err(HandlerError::Reject(format!("assignment's job id refused: {why}")));
        }
        // Handled under the assignment's span: what the attempt reports later joins its trace.
        self.outbox.remember(&a.job_id, a.attempt);
        {
            let mut seen = self.seen.lock().expect("jobs lock");
            let newest = seen.entry(a.job_id.clone()).or_insert(0);
            if a.attempt <= *newest {
                tracing::warn!(job = %a.job_id, attempt = a.attempt, newest = *newest, "stale or repeated assignment ignored (fenced)");
                return Ok(());
            }
            *newest = a.attempt;
        }
        if !self.cfg.enabled {
            let mut e = self.event(&a.job_id, a.attempt, JobEventKind::Failed, &a.gpu_indices);
            e.reason = "this node does not run jobs (gpu_agent.jobs.enabled = false)".into();
            self.outbox.send(e);
            return Ok(());
        }
        let program = match self.policy.check(&spec.command, &spec.env) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(job = %a.job_id, attempt = a.attempt, command = %spec.command, %why, "job refused by the node's policy; nothing run");
                let mut ev = self.event(&a.job_id, a.attempt, JobEventKind::Failed, &a.gpu_indices);
                ev.reason = why;
                self.outbox.send(ev);
                return Ok(());
            }
        };
        let log_path = self.log_path(&a.job_id, a.attempt);
        let log = async {
            tokio::fs::create_dir_all(log_path.parent().expect("log dir")).await?;
            // A new file per attempt: one that exists means the attempt
            // was started before, here, by this agent or a killed one.
            tokio::fs::OpenOptions::new().create_new(true).append(true).open(&log_path).await
        }
        .await;
        let mut log = match log {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::warn!(job = %a.job_id, attempt = a.attempt, log = %log_path.display(), "attempt already started on this node (its log exists): not started again");
                return Ok(());
            }
            Err(e) => {
                let mut ev = self.event(&a.job_id, a.attempt, JobEventKind::Failed, &a.gpu_indices);
                ev.reason = format!("cannot open log file {}: {e}", log_path.display());
                self.outbox.send(ev);
                return Ok(());
            }
        };
        let gpus: Vec<String> = a.gpu_indices.iter().map(u32::to_string).collect();
        // The resolved path runs (a link changed after the check cannot
        // redirect it); the job still sees the name it was given as argv[0].
        let mut cmd = tokio::process::Command::new(&program);
        cmd.arg0(&spec.command);
        if let Some(u) = self.policy.run_as() {
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd.args(&spec.args)
            .envs(&spec.env)
            .env("CUDA_VISIBLE_DEVICES", gpus.join(","))
            .env("COSTMESH_JOB_ID", &a.job_id)
            .env("COSTMESH_ATTEMPT", a.attempt.to_string())
            .env("COSTMESH_CHECKPOINT_DIR", &spec.checkpoint_dir)
            .env("COSTMESH_RESUME_FROM", &a.resume_from)
            // The agent going away takes its jobs with it (the scheduler
            // then sees the node's telemetry stop).
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        supervise(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    format!("command {:?} not found: {e}", spec.command)
                } else {
                    format!("command {:?} could not start: {e}", spec.command)
                };
                tracing::warn!(job = %a.job_id, attempt = a.attempt, %why, "job failed to start");
                let _ = log.write_all(format!("costmesh: {why}\n").as_bytes()).await;
                let mut ev = self.event(&a.job_id, a.attempt, JobEventKind::Failed, &a.gpu_indices);
                ev.reason = why;
                self.outbox.send(ev);
                return Ok(());
            }
        };
        let pid = child.id();
        tracing::info!(job = %a.job_id, attempt = a.attempt, ?pid, gpus = %gpus.join(","), command = %spec.command, "job started");
        if let Some(pid) = pid {
            let rec = RunRecord {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                pid,
                start_ticks: start_ticks(pid).unwrap_or(0),
                gpus: a.gpu_indices.clone(),
            };
            let path = self.record_path(&a.job_id, a.attempt);
            let written = std::fs::create_dir_all(path.parent().expect("record dir"))
                .and_then(|_| std::fs::write(&path, serde_json::to_vec(&rec).unwrap_or_default()));
            if let Err(e) = written {
                tracing::warn!(job = %a.job_id, error = %e, "job record not written; a restarted agent would not find this job");
            }
        }
        self.running
            .lock()
            .expect("jobs lock")
            .insert(a.job_id.clone(), Running { attempt: a.attempt, pid, gpus: a.gpu_indices.clone() });
        if let Some(agent) = &self.agent {
            let team = a.spec.as_ref().map(|s| s.team.clone()).unwrap_or_default();
            for g in &a.gpu_indices {
                agent.hold(
                    *g,
                    crate::agent::Holder { job_id: a.job_id.clone(), attempt: a.attempt, team: team.clone() },
                );
                agent.set_load(*g, 95);
            }
        }
        let mut started = self.event(&a.job_id, a.attempt, JobEventKind::Started, &a.gpu_indices);
        started.reason = format!("pid {}", pid.unwrap_or(0));
        self.outbox.send(started);

        // stdout: into the log, checkpoint lines reported; stderr: into the log.
        let (log_tx, mut log_rx) = mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (r, job, attempt, gpu_list) = (self.clone(), a.job_id.clone(), a.attempt, a.gpu_indices.clone());
        let out_tx = log_tx.clone();
        let out_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(path) = line.strip_prefix(CHECKPOINT_MARKER) {
                    let mut ev = r.event(&job, attempt, JobEventKind::Checkpointed, &gpu_list);
                    ev.checkpoint_path = path.trim().to_string();
                    tracing::info!(%job, attempt, path = %ev.checkpoint_path, "job checkpointed");
                    r.outbox.send(ev);
                }
                let _ = out_tx.send(line);
            }
        });
        let err_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = log_tx.send(line);
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(line) = log_rx.recv().await {
                let _ = log.write_all(line.as_bytes()).await;
                let _ = log.write_all(b"\n").await;
                let _ = log.flush().await;
            }
        });
        let (r, job, attempt) = (self.clone(), a.job_id.clone(), a.attempt);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the job started and left behind goes with it.
            if let Some(pid) = pid {
                kill_group(pid);
            }
            let _ = out_task.await;
            let _ = err_task.await;
            let _ = writer.await;
            let _ = std::fs::remove_file(r.record_path(&job, attempt));
            let gpus = {
                let mut running = r.running.lock().expect("jobs lock");
                match running.get(&job) {
                    Some(run) if run.attempt == attempt => running.remove(&job).map(|x| x.gpus).unwrap_or_default(),
                    _ => Vec::new(),
                }
            };
            if let Some(agent) = &r.agent {
                for g in &gpus {
                    agent.set_load(*g, 0);
                    agent.release(*g, &job, attempt);
                }
            }
            let stopped_by_agent = r.stopping.load(std::sync::atomic::Ordering::SeqCst);
            let kind = if stopped_by_agent { JobEventKind::Interrupted } else { JobEventKind::Exited };
            let mut ev = r.event(&job, attempt, kind, &gpus);
            match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    ev.exit_code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                    ev.reason = match s.signal() {
                        Some(sig) => format!("killed by signal {sig}"),
                        None => format!("exit code {}", ev.exit_code),
                    };
                }
                Err(e) => {
                    ev.exit_code = -1;
                    ev.reason = format!("waiting for the process failed: {e}");
                }
            }
            if stopped_by_agent {
                ev.reason = format!("stopped because the gpu-agent is shutting down ({})", ev.reason);
            }
            tracing::info!(%job, attempt, code = ev.exit_code, reason = %ev.reason, "job ended");
            r.outbox.send(ev);
        });
        Ok(())
    }

    pub fn signal(&self, s: JobSignal) -> Result<(), HandlerError> {
        let kind = s.kind();
        let pid = {
            let running = self.running.lock().expect("jobs lock");
            match running.get(&s.job_id) {
                Some(r) if r.attempt == s.attempt || s.attempt == 0 => r.pid,
                _ => {
                    tracing::info!(job = %s.job_id, attempt = s.attempt, ?kind, "signal for a job not running here; ignored");
                    return Ok(());
                }
            }
        };
        let Some(pid) = pid else { return Ok(()) };
        let pid = Pid::from_raw(pid as i32);
        match kind {
            JobSignalKind::Checkpoint => {
                let sig = parse_signal(&self.cfg.checkpoint_signal).unwrap_or(Signal::SIGUSR1);
                tracing::info!(job = %s.job_id, attempt = s.attempt, %sig, reason = %s.reason, "asking job to checkpoint");
                let _ = nix::sys::signal::kill(pid, sig);
            }
            JobSignalKind::Stop => {
                tracing::info!(job = %s.job_id, attempt = s.attempt, reason = %s.reason, "stopping job (SIGTERM)");
                let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
                let (running, job, attempt, grace) =
                    (self.running.clone(), s.job_id.clone(), s.attempt, self.cfg.stop_grace);
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let still = running
                        .lock()
                        .expect("jobs lock")
                        .get(&job)
                        .is_some_and(|r| r.attempt == attempt || attempt == 0);
                    if still {
                        tracing::warn!(%job, "job ignored SIGTERM for the grace period: SIGKILL");
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    }
                });
            }
            JobSignalKind::Unspecified => {
                return Err(HandlerError::Reject("JobSignal.kind is unspecified".into()));
            }
        }
        Ok(())
    }

    /// The agent is stopping: asks every job to stop (SIGTERM, SIGKILL after
    /// the grace), waits for them, then for their events to be published
    /// (up to `publish_wait`), so the scheduler learns they were interrupted.
    pub async fn shutdown(&self, publish_wait: Duration) {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        let pids: Vec<(String, u32)> =
            self.running.lock().expect("jobs lock").iter().filter_map(|(j, r)| r.pid.map(|p| (j.clone(), p))).collect();
        if pids.is_empty() && self.outbox.pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (job, pid) in &pids {
            tracing::warn!(%job, pid, "gpu-agent shutting down: stopping job (SIGTERM)");
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.stop_grace;
        while !self.running.lock().expect("jobs lock").is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (job, pid) in pids.iter().filter(|(j, _)| self.running.lock().expect("jobs lock").contains_key(j)) {
            tracing::warn!(%job, pid, "job ignored SIGTERM for the grace period: SIGKILL");
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + publish_wait;
        while self.outbox.pending.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.outbox.pending.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(left, "job events not published before exit (NATS unreachable)");
        }
    }

    /// `path` with links resolved, if it lies under the logs root (also
    /// resolved): a link inside the root pointing out of it is refused.
    fn inside_logs_root(&self, path: &std::path::Path) -> Result<PathBuf, String> {
        let root = std::fs::canonicalize(&self.cfg.logs_root)
            .map_err(|e| format!("logs root {}: {e}", self.cfg.logs_root.display()))?;
        let real = std::fs::canonicalize(path).map_err(|e| format!("no log at {}: {e}", path.display()))?;
        if !real.starts_with(&root) {
            return Err(format!("{} resolves outside the logs root", path.display()));
        }
        Ok(real)
    }

    /// Answers `{"job_id": .., "attempt": .., "tail_bytes": ..}` with the end of that log.
    async fn serve_logs(&self, mut sub: costmesh_bus::Subscription) {
        #[derive(serde::Deserialize)]
        struct Req {
            job_id: String,
            attempt: u32,
            #[serde(default)]
            tail_bytes: Option<u64>,
        }
        loop {
            let msg = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let body = match serde_json::from_slice::<Req>(&msg.payload) {
                Err(e) => {
                    serde_json::json!({"error": format!("logs request: {e} (expected {{\"job_id\", \"attempt\"}})")})
                }
                Ok(req) if costmesh_contracts::subjects::validate_name(&req.job_id).is_err() => {
                    let why = costmesh_contracts::subjects::validate_name(&req.job_id).unwrap_err();
                    serde_json::json!({"error": format!("logs request: job_id refused: {why}")})
                }
                Ok(req) => {
                    let path = self.log_path(&req.job_id, req.attempt);
                    match self.inside_logs_root(&path) {
                        Err(why) => serde_json::json!({"error": format!("logs request refused: {why}")}),
                        Ok(path) => match tokio::fs::read(&path).await {
                            Ok(bytes) => {
                                let tail = req.tail_bytes.unwrap_or(64 * 1024) as usize;
                                let from = bytes.len().saturating_sub(tail);
                                serde_json::json!({"path": path, "log": String::from_utf8_lossy(&bytes[from..])})
                            }
                            Err(e) => serde_json::json!({"error": format!("no log at {}: {e}", path.display())}),
                        },
                    }
                }
            };
            let mut h = costmesh_bus::Headers::new();
            h.insert("content-type", "application/json");
            let _ = self.ctx.bus().respond(&msg, h, bytes::Bytes::from(body.to_string())).await;
        }
    }
}

/// Publishes job events in order, retrying each until NATS takes it.
async fn publish_outbox(
    ctx: ServiceContext,
    mut rx: mpsc::UnboundedReceiver<(JobEvent, Option<String>)>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (mut seq, run) = (0u64, uuid::Uuid::new_v4().simple().to_string());
    while let Some((ev, trace)) = rx.recv().await {
        seq += 1;
        let subject = ctx.subjects().job(&ev.job_id, ev.kind());
        let id = format!("job-{}-{}-{}-{}-{seq}", ev.job_id, ev.attempt, ev.kind().as_str_name(), run);
        let mut backoff = Duration::from_millis(100);
        loop {
            match costmesh_runtime::telemetry::resume(
                trace.clone(),
                ctx.events.publish_durable_with_id(&subject, &ev, &id),
            )
            .await
            {
                Ok(_) => {
                    pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, %subject, "job event not published yet; keeping it and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
