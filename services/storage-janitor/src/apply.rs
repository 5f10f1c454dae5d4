//! Carrying out a plan, safely.
//!
//! - Nothing outside a rule's root is touched, and no symbolic link is
//!   followed: every path is checked against its canonical root again just
//!   before it is changed.
//! - A file that became busy since planning (open, or modified within the
//!   write guard) is left alone.
//! - Compression writes `<file>.gz.costmesh-tmp`, syncs it, checks that it
//!   decompresses to exactly the original bytes, renames it to `<file>.gz`
//!   (keeping the original's modification time), syncs the directory, and
//!   only then removes the original. A run killed at any point loses nothing:
//!   the next run removes the partial temporary file, or finds a verified
//!   `.gz` beside its original and finishes the job.
//! - Archiving uploads, checks the stored size, and only then removes the
//!   local copy.
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use rayon::prelude::*;
use serde::Serialize;

use crate::archive::Archive;
use crate::plan::{Plan, PlannedAction, Step, TMP_SUFFIX};

/// What one step did.
#[derive(Clone, Debug, Serialize)]
pub struct Done {
    pub rule: String,
    pub step: Step,
    pub path: PathBuf,
    pub freed_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub done: Vec<Done>,
    /// (path, why) of steps left undone on purpose.
    pub skipped: Vec<(PathBuf, String)>,
    /// (path, error) of steps that failed; their data is untouched.
    pub failed: Vec<(PathBuf, String)>,
}

impl Outcome {
    pub fn freed_bytes(&self) -> u64 {
        self.done.iter().map(|d| d.freed_bytes).sum()
    }
}

/// Appends a suffix to a file name (`a.log` + `.gz`).
pub(crate) fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether `path` lies inside `root` once links in its parent are resolved.
fn within_root(path: &Path, root: &Path) -> bool {
    let (Ok(root), Some(parent)) = (root.canonicalize(), path.parent()) else { return false };
    match parent.canonicalize() {
        Ok(p) => p.starts_with(&root) && path.file_name().is_some(),
        Err(_) => false,
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether the gzip file decompresses to exactly the bytes of `original`.
pub fn same_content(gz: &Path, original: &Path) -> io::Result<bool> {
    let mut a = GzDecoder::new(BufReader::with_capacity(1 << 16, File::open(gz)?));
    let mut b = BufReader::with_capacity(1 << 16, File::open(original)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match read_full(&mut a, &mut ba) {
            Ok(n) => n,
            Err(_) => return Ok(false), // corrupt or truncated gzip
        };
        let m = read_full(&mut b, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Gzips `src` to `src.gz` safely (see the module docs); returns the `.gz`
/// path and its size.
pub fn compress_file(src: &Path) -> io::Result<(PathBuf, u64)> {
    let gz = with_suffix(src, ".gz");
    let dir = src.parent().unwrap_or(Path::new("."));
    // An earlier run may have got as far as the rename.
    if gz.exists() && same_content(&gz, src)? {
        std::fs::remove_file(src)?;
        sync_dir(dir);
        return Ok((gz.clone(), std::fs::metadata(&gz)?.len()));
    }
    let tmp = with_suffix(src, &format!(".gz{TMP_SUFFIX}"));
    let modified = std::fs::metadata(src)?.modified()?;
    {
        let input = File::open(src)?;
        let out = File::create(&tmp)?;
        let mut enc = GzEncoder::new(BufWriter::with_capacity(1 << 16, out), flate2::Compression::default());
        io::copy(&mut BufReader::with_capacity(1 << 16, input), &mut enc)?;
        let mut w = enc.finish()?;
        w.flush()?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        f.set_modified(modified)?;
    }
    if !same_content(&tmp, src)? {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other("compressed copy did not verify"));
    }
    std::fs::rename(&tmp, &gz)?;
    sync_dir(dir);
    std::fs::remove_file(src)?;
    sync_dir(dir);
    Ok((gz.clone(), std::fs::metadata(&gz)?.len()))
}

/// Re-checks an action just before it runs.
fn still_safe(a: &PlannedAction, open: &HashSet<(u64, u64)>, write_guard: Duration) -> Result<(), String> {
    if !within_root(&a.path, &a.root) {
        return Err("outside its root (or the root is gone)".into());
    }
    let md = std::fs::symlink_metadata(&a.path).map_err(|e| format!("gone: {e}"))?;
    if md.file_type().is_symlink() {
        return Err("became a symbolic link".into());
    }
    use std::os::unix::fs::MetadataExt;
    if md.is_file() && open.contains(&(md.dev(), md.ino())) {
        return Err("open by a process".into());
    }
    let age = md.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or_default();
    // A directory's time moves with its entries; the plan judged its files.
    if md.is_file() && a.step != Step::CleanupTemp && age < write_guard {
        return Err("modified since the plan".into());
    }
    Ok(())
}

enum Local {
    Done(Done),
    /// Compressed; the `.gz` still has to go to the archive.
    ToArchive(PlannedAction, PathBuf, u64),
    Skipped(PathBuf, String),
    Failed(PathBuf, String),
}

fn run_local(a: &PlannedAction, open: &HashSet<(u64, u64)>, write_guard: Duration) -> Local {
    if let Err(why) = still_safe(a, open, write_guard) {
        return Local::Skipped(a.path.clone(), why);
    }
    let done =
        |freed| Local::Done(Done { rule: a.rule.clone(), step: a.step, path: a.path.clone(), freed_bytes: freed });
    let r: io::Result<Local> = (|| match a.step {
        Step::Delete | Step::CleanupTemp => {
            std::fs::remove_file(&a.path)?;
            Ok(done(a.bytes))
        }
        Step::RetireDelete => {
            if std::fs::symlink_metadata(&a.path)?.is_dir() {
                std::fs::remove_dir_all(&a.path)?;
            } else {
                std::fs::remove_file(&a.path)?;
            }
            Ok(done(a.bytes))
        }
        Step::Compress => {
            let (_, gz_len) = compress_file(&a.path)?;
            Ok(done(a.bytes.saturating_sub(gz_len)))
        }
        Step::CompressArchive => {
            let (gz, gz_len) = compress_file(&a.path)?;
            Ok(Local::ToArchive(a.clone(), gz, gz_len))
        }
        Step::Archive => Ok(Local::ToArchive(a.clone(), a.path.clone(), a.bytes)),
        Step::RetireArchive => Ok(Local::ToArchive(a.clone(), a.path.clone(), a.bytes)),
        Step::ReleaseCandidate => Ok(done(0)),
    })();
    r.unwrap_or_else(|e| Local::Failed(a.path.clone(), e.to_string()))
}

/// Files to upload for an archive step: (local path, key).
fn archive_items(a: &PlannedAction, local: &Path) -> Vec<(PathBuf, String)> {
    let rel = local.strip_prefix(&a.root).map(|p| p.to_string_lossy().to_string()).unwrap_or_else(|_| a.rel.clone());
    let base = format!("{}/{}", a.rule, rel);
    if local.is_dir() {
        jwalk::WalkDir::new(local)
            .follow_links(false)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                let inner = e.path().strip_prefix(local).map(|p| p.to_string_lossy().to_string()).unwrap_or_default();
                (e.path(), format!("{base}/{inner}"))
            })
            .collect()
    } else {
        vec![(local.to_path_buf(), base)]
    }
}

/// Carries out `plan`. `progress` ticks once per action.
pub async fn apply(
    plan: &Plan,
    archive: &Archive,
    open: HashSet<(u64, u64)>,
    write_guard: Duration,
    progress: Option<indicatif::ProgressBar>,
) -> Outcome {
    let actions: Vec<PlannedAction> = plan.actions.iter().filter(|a| a.step.changes_data()).cloned().collect();
    let pb = progress.clone();
    // Local work (delete, compress) in parallel on rayon's pool.
    let locals: Vec<Local> = tokio::task::spawn_blocking(move || {
        actions
            .par_iter()
            .map(|a| {
                let r = run_local(a, &open, write_guard);
                if !matches!(r, Local::ToArchive(..)) {
                    if let Some(p) = &pb {
                        p.inc(1);
                    }
                }
                r
            })
            .collect()
    })
    .await
    .unwrap_or_default();

    let mut out = Outcome::default();
    let mut uploads = Vec::new();
    for l in locals {
        match l {
            Local::Done(d) => out.done.push(d),
            Local::Skipped(p, w) => out.skipped.push((p, w)),
            Local::Failed(p, e) => out.failed.push((p, e)),
            Local::ToArchive(a, local, len) => uploads.push((a, local, len)),
        }
    }
    // Uploads, a few at a time; the local copy goes only once stored.
    use futures::StreamExt;
    let results: Vec<(PlannedAction, PathBuf, Result<u64, String>)> = futures::stream::iter(uploads)
        .map(|(a, local, len)| async move {
            let mut r = Ok(0);
            for (file, key) in archive_items(&a, &local) {
                if let Err(e) = archive.put_file(&key, &file).await {
                    r = Err(e);
                    break;
                }
            }
            if r.is_ok() {
                let removed =
                    if local.is_dir() { std::fs::remove_dir_all(&local) } else { std::fs::remove_file(&local) };
                r = match removed {
                    Ok(()) => Ok(len),
                    // Already gone (another step of this or a later run got
                    // there first): it is archived, which is what counts.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(len),
                    Err(e) => Err(format!("archived, but removing the local copy failed: {e}")),
                };
            }
            (a, local, r)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (a, local, r) in results {
        if let Some(p) = &progress {
            p.inc(1);
        }
        match r {
            Ok(_) => out.done.push(Done { rule: a.rule, step: a.step, path: a.path, freed_bytes: a.bytes }),
            Err(e) => out.failed.push((local, e)),
        }
    }
    out
}
