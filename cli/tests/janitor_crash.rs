//! The janitor killed (SIGKILL) at random points during apply, then run
//! again, many times: every original byte is still there, in the original
//! file or in a verified `.gz` (local or archived), and no partial file is
//! left behind.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

fn content(i: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(300_000);
    let mut x = i as u64 * 2_654_435_761 + 1;
    while v.len() < 150_000 + (i % 7) * 20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Compressible but not trivial: log-like lines with varying numbers.
        v.extend_from_slice(
            format!("epoch {} step {} loss {:.5}\n", i, x % 10_000, (x % 1000) as f64 / 997.0).as_bytes(),
        );
    }
    v
}

fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).ok()?;
    Some(out)
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(all_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn killed_at_random_points_and_rerun_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let files = 120;
    for i in 0..files {
        let p = base.join(format!("logs/run{}/part{i}.log", i % 5));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content(i)).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(10 * 86_400)).unwrap();
    }
    let cfg = base.join("costmesh.toml");
    std::fs::write(&cfg, format!("[storage_janitor]\nbase_dir = \"{}\"\n", base.display())).unwrap();

    let run = || {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_costmesh"));
        c.args(["janitor", "apply", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // Kill points spread over the run: pseudo-random, reproducible.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut kills = 0;
    for _ in 0..15 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = Duration::from_millis(30 + seed % 600);
        let mut child = run().spawn().unwrap();
        if tokio::time::timeout(at, child.wait()).await.is_err() {
            child.start_kill().unwrap(); // SIGKILL
            child.wait().await.unwrap();
            kills += 1;
        }
    }
    assert!(kills >= 5, "only {kills} runs were killed mid-way: make the work bigger");
    let status = run().status().await.unwrap();
    assert!(status.success(), "the final run finishes");

    // Every original is recoverable, from exactly the bytes it had.
    let archive = base.join("archive/logs");
    for i in 0..files {
        let rel = format!("run{}/part{i}.log", i % 5);
        let original = base.join("logs").join(&rel);
        let local_gz = base.join("logs").join(format!("{rel}.gz"));
        let archived = archive.join(format!("{rel}.gz"));
        let expected = content(i);
        let found = if original.exists() {
            std::fs::read(&original).unwrap() == expected
        } else if archived.exists() {
            gunzip(&std::fs::read(&archived).unwrap()).as_deref() == Some(&expected[..])
        } else if local_gz.exists() {
            gunzip(&std::fs::read(&local_gz).unwrap()).as_deref() == Some(&expected[..])
        } else {
            false
        };
        assert!(found, "part{i}.log lost or corrupted");
    }
    // After a complete run everything went to the archive; no half-file anywhere.
    let left: Vec<PathBuf> = all_files(&base.join("logs"));
    assert!(left.is_empty(), "left behind: {left:?}");
    for f in all_files(&archive) {
        assert!(!f.to_string_lossy().contains("costmesh-tmp"), "temporary file in the archive: {}", f.display());
        assert!(gunzip(&std::fs::read(&f).unwrap()).is_some(), "corrupt archive file {}", f.display());
    }
    assert_eq!(all_files(&archive).len(), files);
    eprintln!("{kills} of 15 runs killed mid-way; all {files} files intact");
}
