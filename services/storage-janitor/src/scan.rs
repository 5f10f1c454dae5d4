//! Walking roots in parallel, and finding files that are open.
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rayon::prelude::*;

/// One file, directory or link under a root. Links are listed, never followed.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: PathBuf,
    /// Relative to the root, with `/` separators.
    pub rel: String,
    pub size: u64,
    pub modified: DateTime<Utc>,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub dev: u64,
    pub ino: u64,
}

/// Lists everything under `root` (not the root itself), walking directories
/// in parallel. A missing root is empty.
pub fn scan(root: &Path) -> Vec<Entry> {
    if !root.is_dir() {
        return Vec::new();
    }
    let paths: Vec<PathBuf> = jwalk::WalkDir::new(root)
        .follow_links(false)
        .skip_hidden(false)
        .sort(false)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.depth() > 0)
        .map(|e| e.path())
        .collect();
    paths
        .into_par_iter()
        .filter_map(|path| {
            let md = std::fs::symlink_metadata(&path).ok()?;
            let rel = path.strip_prefix(root).ok()?.to_string_lossy().replace('\\', "/");
            let modified = md.modified().ok().map(DateTime::<Utc>::from).unwrap_or_default();
            Some(Entry {
                rel,
                size: if md.is_file() { md.len() } else { 0 },
                modified,
                is_dir: md.is_dir(),
                is_symlink: md.file_type().is_symlink(),
                dev: md.dev(),
                ino: md.ino(),
                path,
            })
        })
        .collect()
}

/// (device, inode) of every file some process holds open, from `/proc`.
/// Processes we may not inspect are skipped.
pub fn open_files() -> HashSet<(u64, u64)> {
    let mut out = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(md) = std::fs::metadata(fd.path()) {
                if md.is_file() {
                    out.insert((md.dev(), md.ino()));
                }
            }
        }
    }
    out
}
