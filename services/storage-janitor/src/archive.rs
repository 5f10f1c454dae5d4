//! The archive store, through the `object_store` crate: a local directory
//! by default, GCS (`gs://`) or S3 (`s3://`) with the `cloud` build feature.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::config::Tiers;

/// Where the archive lives.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreLocation {
    Local(PathBuf),
    Url(url::Url),
}

/// Parses `archive_url`: a path (relative to `base`), `file://`, or a cloud URL.
pub fn parse_store_url(s: &str, base: &Path) -> Result<StoreLocation, String> {
    if !s.contains("://") {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        let p = Path::new(s);
        return Ok(StoreLocation::Local(if p.is_absolute() { p.to_path_buf() } else { base.join(p) }));
    }
    let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "file" => Ok(StoreLocation::Local(PathBuf::from(url.path()))),
        "gs" | "s3" if cfg!(feature = "cloud") => Ok(StoreLocation::Url(url)),
        "gs" | "s3" => Err(format!(
            "{}:// needs the `cloud` build feature (cargo build --features costmesh-storage-janitor/cloud)",
            url.scheme()
        )),
        other => Err(format!("scheme {other}:// is not supported (use a path, file://, gs:// or s3://)")),
    }
}

/// Bytes and objects in one storage class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierUsage {
    pub bytes: u64,
    pub objects: u64,
}

/// The archive store.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    pub location: StoreLocation,
}

impl Archive {
    pub fn open(location: StoreLocation) -> Result<Self, String> {
        let store: Arc<dyn ObjectStore> = match &location {
            StoreLocation::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating archive directory {}: {e}", dir.display()))?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| e.to_string())?)
            }
            StoreLocation::Url(url) => {
                let (store, _) = object_store::parse_url_opts(url, std::env::vars()).map_err(|e| e.to_string())?;
                Arc::from(store)
            }
        };
        Ok(Self { store, location })
    }

    /// Uploads `local` as `key` and checks the stored size; returns it.
    pub async fn put_file(&self, key: &str, local: &Path) -> Result<u64, String> {
        let data = tokio::fs::read(local).await.map_err(|e| format!("reading {}: {e}", local.display()))?;
        let len = data.len() as u64;
        let path = ObjectPath::from(key);
        self.store.put(&path, PutPayload::from(data)).await.map_err(|e| format!("uploading {key}: {e}"))?;
        let meta = self.store.head(&path).await.map_err(|e| format!("checking {key}: {e}"))?;
        if meta.size != len {
            return Err(format!("archived {key} has {} bytes, expected {len}", meta.size));
        }
        Ok(len)
    }

    /// Whether `key` is stored with `len` bytes.
    pub async fn has(&self, key: &str, len: u64) -> bool {
        matches!(self.store.head(&ObjectPath::from(key)).await, Ok(m) if m.size == len)
    }

    /// The object's bytes (tests and restores).
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes, String> {
        let r = self.store.get(&ObjectPath::from(key)).await.map_err(|e| e.to_string())?;
        r.bytes().await.map_err(|e| e.to_string())
    }

    /// Every key, sorted.
    pub async fn keys(&self) -> Result<Vec<String>, String> {
        let mut keys: Vec<String> =
            self.store.list(None).map_ok(|m| m.location.to_string()).try_collect().await.map_err(|e| e.to_string())?;
        keys.sort();
        Ok(keys)
    }

    /// Bytes per storage class, by object age under the tier policy:
    /// [STANDARD, NEARLINE, COLDLINE].
    pub async fn usage(&self, now: DateTime<Utc>, tiers: &Tiers) -> Result<[TierUsage; 3], String> {
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(None).try_collect().await.map_err(|e| e.to_string())?;
        let mut out = [TierUsage::default(); 3];
        for m in metas {
            let age_days = (now - m.last_modified).num_days();
            let i = if age_days >= tiers.coldline_after_days as i64 {
                2
            } else if age_days >= tiers.nearline_after_days as i64 {
                1
            } else {
                0
            };
            out[i].bytes += m.size;
            out[i].objects += 1;
        }
        Ok(out)
    }
}
