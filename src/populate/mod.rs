//! `fillfs populate`: copy a bucket prefix (or a local directory, e.g. a fillfs mount) into
//! a target directory — fast, capped, verified, resumable.
//!
//! Order of work, each step before anything is written: preflight the source; list it
//! recursively; plan (refusing keys that cannot be written safely, see `plan.rs`); load
//! the resume journal; check free space (statvfs) against what is left to copy. Then create
//! the directories, and copy files with up to `--jobs` GETs in flight (`copy.rs`), while
//! `progress.rs` reports. On success the journal is removed and the file system synced.

pub mod block;
pub mod copy;
pub mod integrity;
pub mod journal;
pub mod part_file;
pub mod plan;
pub mod progress;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::limit::RateLimiter;
use crate::store::{Store, StoreConfig};
pub use progress::{ProgressLine, ProgressMode};

#[derive(Debug, Clone)]
pub struct PopulateOptions {
    pub store: StoreConfig,
    pub target: PathBuf,
    /// MiB/s for all store reads; 0 = unlimited.
    pub throughput_mib: f64,
    /// GETs in flight.
    pub jobs: usize,
    /// Size of each ranged GET of a large file.
    pub part_size: u64,
    /// Bytes fetched but not yet written, at most.
    pub memory: u64,
    pub verify: bool,
    pub progress: ProgressMode,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub file_mode: u32,
    pub dir_mode: u32,
    /// Mode (and, with `uid`/`gid`, owner) given to TARGET itself: set when the caller
    /// asked for a directory mode (`--dir-mode`), so a volume's consumers of any uid can
    /// write in its root. `None` leaves TARGET as it is.
    pub root_mode: Option<u32>,
    pub skip_invalid_keys: bool,
    /// Flush the target file system before reporting success. Off by default: the fill's
    /// consumer unmounts the volume (which flushes) before using it, and the journal
    /// already makes a crashed fill resumable.
    pub fsync: bool,
    /// Start the device write of each range as soon as it is written (see
    /// `part_file.rs`), so the flush at the end (unmount or `--fsync`) has little left.
    pub early_writeback: bool,
    /// What `target` is.
    pub target_kind: TargetKind,
}

/// Where a fill goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory (a filesystem-mode volume).
    Directory,
    /// A block device or image file receiving one object raw (`--block`).
    Raw,
    /// A block device or image file formatted as ext4 and filled (`--mkfs ext4`).
    Ext4,
}

/// What a fill did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    /// Files an interrupted earlier run had finished.
    pub resumed_files: u64,
    pub skipped_keys: usize,
    pub seconds: f64,
    /// How the copied files' contents were checked.
    pub checked: progress::CheckCounts,
}

impl Summary {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds.max(1e-9)
    }
}

fn iec(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// A file an earlier, completed fill wrote: same size and the object's mtime (fillfs sets
/// it from Last-Modified). Files without a known mtime are always copied.
fn already_present(target: &std::path::Path, f: &plan::FileJob) -> bool {
    let Some(mtime) = f.mtime else { return false };
    std::fs::symlink_metadata(target.join(&f.rel)).is_ok_and(|m| {
        m.is_file()
            && m.len() == f.size
            && m.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                == mtime
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
    })
}

/// Gives TARGET the mode (and owner) asked for. A failure is logged, not fatal: the data
/// is right either way, and the log says what consumers will not be able to do.
fn set_root_attributes(target: &std::path::Path, mode: u32, uid: Option<u32>, gid: Option<u32>) {
    if (uid.is_some() || gid.is_some())
        && let Err(e) = std::os::unix::fs::chown(target, uid, gid)
    {
        tracing::warn!(target = %target.display(), ?uid, ?gid, error = %e, "could not give the target directory its owner");
    }
    match std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => {
            tracing::info!(target = %target.display(), mode = %format!("{mode:04o}"), "target directory mode set")
        }
        Err(e) => tracing::warn!(
            target = %target.display(),
            mode = %format!("{mode:04o}"),
            error = %e,
            "could not set the target directory's mode (only its owner or root can); consumers may not be able to write in it"
        ),
    }
}

/// Runs a fill on its own runtime.
pub fn run(opts: &PopulateOptions) -> Result<Summary> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fillfs-populate")
        .build()?;
    rt.block_on(async {
        match opts.target_kind {
            TargetKind::Directory => populate(opts).await,
            TargetKind::Raw => block::fill_raw(opts).await,
            TargetKind::Ext4 => block::fill_mkfs(opts).await,
        }
    })
}

pub async fn populate(opts: &PopulateOptions) -> Result<Summary> {
    if opts.jobs == 0 || opts.part_size == 0 || opts.memory < opts.part_size {
        return Err(Error::InvalidOption(
            "--jobs and --part-size must be positive and --memory at least one part".into(),
        ));
    }
    let limiters = RateLimiter::for_throughput(opts.throughput_mib);
    let store = Store::new(&opts.store, limiters)?;
    store.preflight().await?;
    let target = &opts.target;
    if !target.is_dir() {
        std::fs::create_dir(target)
            .map_err(|e| Error::InvalidOption(format!("target {}: {e}", target.display())))?;
    }

    if let Some(mode) = opts.root_mode {
        set_root_attributes(target, mode, opts.uid, opts.gid);
    }

    let listing = store.list_recursive().await?;
    let plan = plan::plan(listing);
    if !plan.rejected.is_empty() {
        for (key, why) in &plan.rejected {
            tracing::warn!(key = %key.escape_debug(), "cannot be written safely: {why}");
        }
        if !opts.skip_invalid_keys {
            let examples = plan
                .rejected
                .iter()
                .take(3)
                .map(|(k, w)| format!("{:?} ({w})", k))
                .collect::<Vec<_>>();
            return Err(Error::UnsafeKeys {
                count: plan.rejected.len(),
                examples: examples.join(", "),
            });
        }
    }

    let source = opts.store.source.to_string();
    let journal = Arc::new(journal::Journal::load(target, &source)?);
    let todo: Vec<_> = plan
        .files
        .iter()
        .filter(|f| !journal.is_done(&f.rel.to_string_lossy(), f.size, f.etag.as_deref()))
        .filter(|f| !already_present(target, f))
        .cloned()
        .collect();
    let resumed = (plan.files.len() - todo.len()) as u64;
    let needs: u64 = todo
        .iter()
        .map(|f| f.size.div_ceil(4096) * 4096 + 4096)
        .sum();
    let vfs = nix::sys::statvfs::statvfs(target.as_path()).map_err(std::io::Error::from)?;
    let has = vfs.blocks_available() as u64 * vfs.fragment_size() as u64;
    if needs > has {
        return Err(Error::NoSpace {
            target: target.display().to_string(),
            needs: iec(needs),
            has: iec(has),
        });
    }
    tracing::info!(
        source = %source,
        target = %target.display(),
        files = plan.files.len(),
        bytes = %iec(plan.total_bytes()),
        resumed_files = resumed,
        skipped_keys = plan.rejected.len(),
        "starting fill"
    );

    for d in &plan.dirs {
        let path = target.join(d);
        match std::fs::create_dir(&path) {
            Ok(()) => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(opts.dir_mode))?;
                if opts.uid.is_some() || opts.gid.is_some() {
                    std::os::unix::fs::chown(&path, opts.uid, opts.gid)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => {
                return Err(Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", path.display()),
                )));
            }
        }
    }

    let todo_bytes: u64 = todo.iter().map(|f| f.size).sum();
    let progress = Arc::new(progress::Progress::new(todo_bytes, todo.len() as u64));
    let copier = Arc::new(copy::Copier {
        fetcher: copy::Fetcher::new(store.clone(), opts.jobs, opts.memory),
        target: target.clone(),
        part_size: opts.part_size,
        verify: opts.verify,
        early_writeback: opts.early_writeback,
        file_mode: opts.file_mode,
        owner: (opts.uid, opts.gid),
        progress: progress.clone(),
        journal: journal.clone(),
    });
    let reporter = progress::spawn_reporter(progress.clone(), opts.progress);
    // At most `jobs` files open at once; their ranges share the request budget.
    let result = futures::stream::iter(todo.into_iter().map(|job| copier.clone().copy_file(job)))
        .buffer_unordered(opts.jobs)
        .try_collect::<Vec<()>>()
        .await;
    progress::finish_reporter(reporter, &progress, opts.progress);
    result?;

    if opts.fsync {
        let dir = std::fs::File::open(target)?;
        nix::unistd::syncfs(&dir).map_err(std::io::Error::from)?;
    }
    drop(copier);
    Arc::try_unwrap(journal)
        .ok()
        .map(journal::Journal::finish)
        .transpose()?;
    let summary = Summary {
        files: progress
            .files_done
            .load(std::sync::atomic::Ordering::Relaxed),
        bytes: progress
            .bytes_done
            .load(std::sync::atomic::Ordering::Relaxed),
        resumed_files: resumed,
        skipped_keys: plan.rejected.len(),
        seconds: progress.elapsed().as_secs_f64(),
        checked: progress.check_counts(),
    };
    Ok(summary)
}
