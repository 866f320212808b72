//! `fillfs upload SRC URL` as a library call: where SRC goes (a file to a key, a tree under
//! a prefix), the runtime, the progress reporter, Ctrl-C, and the summary. The command is a
//! thin shell over [`run`]. It must not move bytes itself (`Uploader` does).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{UploadOptions, Uploader, walk_files};
use crate::error::{Error, Result};
use crate::limit::RateLimiter;
use crate::populate::progress::{self, CheckCounts, Progress, ProgressMode};
use crate::store::{Scheme, SourceUrl, Store, StoreConfig};

/// Where an upload goes, from SRC and URL (`aws s3 cp` rules): a file to the key URL names,
/// or under it when URL ends in `/` (the file's name appended); a directory's files under
/// the prefix URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The store's URL: the bucket and the prefix keys are relative to.
    pub store_url: String,
    /// For a file, its key under `store_url`; for a directory, `None`.
    pub key: Option<String>,
}

impl Destination {
    pub fn of(source: &Path, url: &str) -> Result<Destination> {
        let meta = std::fs::metadata(source)
            .map_err(|e| Error::InvalidOption(format!("SRC {}: {e}", source.display())))?;
        let parsed = SourceUrl::parse(url)?;
        if parsed.scheme != Scheme::File && parsed.bucket.is_empty() {
            return Err(Error::InvalidSource {
                source_url: url.into(),
                reason: "no bucket".into(),
            });
        }
        if meta.is_dir() {
            return Ok(Destination {
                store_url: url.to_string(),
                key: None,
            });
        }
        if !meta.is_file() {
            return Err(Error::InvalidOption(format!(
                "SRC {} is neither a regular file nor a directory",
                source.display()
            )));
        }
        let name = source.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            Error::InvalidOption(format!("SRC {} has no UTF-8 name", source.display()))
        })?;
        let (_, rest) = url.split_once("://").unwrap_or(("", url));
        if rest.ends_with('/') || !rest.trim_start_matches('/').contains('/') {
            // `s3://b/dir/` or `s3://b`: the file keeps its name.
            return Ok(Destination {
                store_url: url.to_string(),
                key: Some(name.to_string()),
            });
        }
        let (parent, key) = url.rsplit_once('/').expect("has a slash");
        Ok(Destination {
            store_url: format!("{parent}/"),
            key: Some(key.to_string()),
        })
    }
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_sent: u64,
    pub parts_resumed: u64,
    pub bytes_resumed: u64,
    pub parts_retried: u64,
    pub checked: CheckCounts,
}

impl Summary {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds.max(1e-9)
    }
}

/// Uploads `source` to the store `cfg` names (`key` for a file; see [`Destination`]).
pub fn run(
    cfg: &StoreConfig,
    source: &Path,
    key: Option<&str>,
    throughput_mib: f64,
    opts: UploadOptions,
    mode: ProgressMode,
) -> Result<Summary> {
    if cfg.source.scheme == Scheme::File {
        std::fs::create_dir_all(&cfg.source.prefix)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fillfs-upload")
        .build()?;
    rt.block_on(async {
        let store = Store::new(cfg, RateLimiter::for_throughput(throughput_mib))?;
        store.preflight().await?;
        let (bytes_total, files_total) = match key {
            Some(_) => (std::fs::metadata(source)?.len(), 1),
            None => {
                let files = walk_files(source)?;
                (files.iter().map(|f| f.1).sum(), files.len() as u64)
            }
        };
        let progress = Arc::new(Progress::new(bytes_total, files_total));
        let up = Uploader::new(store, opts).with_progress(progress.clone());
        let reporter = progress::spawn_reporter(progress.clone(), mode);
        let started = Instant::now();
        let work = async {
            match key {
                Some(k) => up.file(source, k).await.map(|u| (1, u.bytes)),
                None => up.tree(source, "").await,
            }
        };
        let result = tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted: run the same command again to resume (parts already sent are kept)",
            ))),
        };
        progress::finish_reporter(reporter, &progress, mode);
        let (files, bytes) = result?;
        let s = up.stats();
        use std::sync::atomic::Ordering::Relaxed;
        Ok(Summary {
            files,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            bytes_sent: s.bytes_sent.load(Relaxed),
            parts_resumed: s.parts_resumed.load(Relaxed),
            bytes_resumed: s.bytes_resumed.load(Relaxed),
            parts_retried: s.parts_retried.load(Relaxed),
            checked: progress.check_counts(),
        })
    })
}

/// The default state directory: `$XDG_STATE_HOME/fillfs/uploads`, else
/// `~/.local/state/fillfs/uploads`, else `/tmp/fillfs-uploads`.
pub fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
    match base {
        Some(b) => b.join("fillfs/uploads"),
        None => PathBuf::from("/tmp/fillfs-uploads"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_follow_cp_rules() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data.bin");
        std::fs::write(&f, b"x").unwrap();
        let d = |url: &str| Destination::of(&f, url).unwrap();
        assert_eq!(
            d("s3://bkt/a/b.bin"),
            Destination {
                store_url: "s3://bkt/a/".into(),
                key: Some("b.bin".into())
            }
        );
        assert_eq!(d("s3://bkt/a/").key.as_deref(), Some("data.bin"));
        assert_eq!(d("s3://bkt/a/").store_url, "s3://bkt/a/");
        assert_eq!(d("s3://bkt").key.as_deref(), Some("data.bin"));
        let t = Destination::of(dir.path(), "oss://bkt/p").unwrap();
        assert_eq!(t.key, None);
        assert!(Destination::of(&dir.path().join("missing"), "s3://bkt/k").is_err());
        assert!(Destination::of(&f, "http://bkt/k").is_err());
    }
}
