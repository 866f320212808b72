//! `fillfs populate`: copy a bucket prefix (or a local directory, e.g. a fillfs mount) into
//! a target directory — fast, capped, verified, resumable.
//!
//! Order of work, each step before anything is written: preflight the source; open TARGET
//! (`target.rs`: nothing beneath it is reached through a link) and take its lock (`lock.rs`:
//! one fill at a time); list the source recursively; plan (refusing keys that cannot be
//! written safely, see `plan.rs`); load the resume journal and keep only files of another
//! version than the one listed; check free space and free inodes (statvfs) against what is
//! left to copy, after removing the part files an interrupted fill left if the space is
//! short. Then create the directories, and copy files with up to `--jobs` GETs in flight
//! (`copy.rs`), while `progress.rs` reports. On success the journal is removed (and, with
//! `--fsync`, the file system synced); on failure the part files are removed and the
//! journal kept.

pub mod block;
pub mod copy;
pub mod integrity;
pub mod journal;
pub mod lock;
pub mod part_file;
pub mod plan;
pub mod progress;
pub mod target;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
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
    /// Limiters to pay instead of new ones of `throughput_mib`: a process that fills
    /// several times at once under one cap (the Argo plugin's loads of one repository)
    /// shares its own.
    pub shared_limiters: Option<Vec<Arc<RateLimiter>>>,
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
    /// Fill (nothing) when nothing is stored under the source; without it an empty prefix
    /// is refused before TARGET is touched (a typo'd prefix must not make an empty volume
    /// that looks filled).
    pub allow_empty: bool,
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

/// A file an earlier, completed fill wrote: a regular file (not a link) of the object's
/// size and mtime (fillfs sets it from Last-Modified) that carries the listed ETag in its
/// xattr (see `part_file.rs`; on file systems without user xattrs size and mtime decide).
/// Files without a known mtime are always copied.
fn already_present(dir: &target::Dir, name: &OsStr, f: &plan::FileJob) -> bool {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs() as i64)
    };
    let Some(mtime) = f.mtime.and_then(secs) else {
        return false;
    };
    let Some(st) = target::regular_file(dir, name) else {
        return false;
    };
    if st.st_size as u64 != f.size || st.st_mtime != mtime {
        return false;
    }
    match (&f.etag, part_file::read_etag(dir, name)) {
        (None, _) | (Some(_), part_file::RecordedEtag::Unsupported) => true,
        (Some(want), part_file::RecordedEtag::Some(got)) => *want == got,
        (Some(_), part_file::RecordedEtag::None) => false,
    }
}

/// The files of `plan` still to copy: those the journal records with another version than
/// the listed one, and those it does not record unless already present.
fn still_to_copy(
    target: &target::Target,
    plan: &plan::Plan,
    journal: &journal::Journal,
) -> Vec<plan::FileJob> {
    let mut dir: Option<(PathBuf, Option<target::Dir>)> = None;
    plan.files
        .iter()
        .filter(|f| {
            if let Some(copied) = journal.lookup(&f.rel.to_string_lossy()) {
                return !copied.is(f.size, f.etag.as_deref(), f.mtime);
            }
            let parent = f.rel.parent().unwrap_or(Path::new(""));
            if dir.as_ref().is_none_or(|(p, _)| p != parent) {
                dir = Some((parent.to_path_buf(), target.dir(parent).ok()));
            }
            let name = f.rel.file_name().expect("a file has a name");
            match dir.as_ref().and_then(|(_, d)| d.as_ref()) {
                Some(d) => !already_present(d, name, f),
                None => true,
            }
        })
        .cloned()
        .collect()
}

/// Checks free space and free inodes against what is left to copy. If the space is short,
/// first removes the part files an interrupted fill left for these files (preallocated, they
/// may hold most of a tight volume) and looks again.
fn check_space(
    target: &target::Target,
    parts: &part_file::PartFiles,
    plan: &plan::Plan,
    todo: &[plan::FileJob],
) -> Result<()> {
    let statvfs = || nix::sys::statvfs::fstatvfs(target.root()).map_err(std::io::Error::from);
    let needs: u64 = todo
        .iter()
        .map(|f| f.size.div_ceil(4096) * 4096 + 4096)
        .sum();
    let mut vfs = statvfs()?;
    let has = |vfs: &nix::sys::statvfs::Statvfs| {
        let (blocks, size): (u64, u64) = (vfs.blocks_available(), vfs.fragment_size());
        blocks * size
    };
    if needs > has(&vfs) {
        let (files, bytes) = parts.reclaim(todo.iter().map(|f| f.rel.as_path()));
        if files > 0 {
            tracing::info!(files, bytes = %iec(bytes), "removed the part files an interrupted fill left");
            vfs = statvfs()?;
        }
    }
    if needs > has(&vfs) {
        return Err(Error::NoSpace {
            target: target.path().display().to_string(),
            needs: iec(needs),
            has: iec(has(&vfs)),
        });
    }
    // One inode per file (its part file becomes it) and per directory still to create, and
    // the journal's. File systems that allocate inodes as they go report none (f_files 0).
    if vfs.files() > 0 {
        let new_dirs = plan
            .dirs
            .iter()
            .filter(|d| {
                nix::sys::stat::fstatat(
                    target.root(),
                    d.as_path(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .is_err()
            })
            .count() as u64;
        let inodes = todo.len() as u64 + new_dirs + 1;
        let free: u64 = vfs.files_available();
        if inodes > free {
            return Err(Error::NoSpace {
                target: target.path().display().to_string(),
                needs: format!(
                    "{inodes} inodes ({} files, {new_dirs} directories, the journal)",
                    todo.len()
                ),
                has: format!("{free} free inodes"),
            });
        }
    }
    Ok(())
}

/// Gives TARGET the mode (and owner) asked for. A failure is logged, not fatal: the data
/// is right either way, and the log says what consumers will not be able to do.
fn set_root_attributes(target: &target::Target, mode: u32, uid: Option<u32>, gid: Option<u32>) {
    let path = target.path().display();
    if (uid.is_some() || gid.is_some())
        && let Err(e) = nix::unistd::fchown(
            target.root(),
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
        )
    {
        tracing::warn!(target = %path, ?uid, ?gid, error = %e, "could not give the target directory its owner");
    }
    match nix::sys::stat::fchmod(
        target.root(),
        nix::sys::stat::Mode::from_bits_truncate(mode),
    ) {
        Ok(()) => {
            tracing::info!(target = %path, mode = %format!("{mode:04o}"), "target directory mode set")
        }
        Err(e) => tracing::warn!(
            target = %path,
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

impl PopulateOptions {
    /// The limiters a fill pays: the shared ones, or new ones of `throughput_mib`.
    pub fn limiters(&self) -> Vec<Arc<RateLimiter>> {
        match &self.shared_limiters {
            Some(l) => l.clone(),
            None => RateLimiter::for_throughput(self.throughput_mib),
        }
    }
}

/// Preflights the source; an empty prefix is an error unless `opts.allow_empty`.
pub(crate) async fn refuse_empty(store: &Store, opts: &PopulateOptions) -> Result<()> {
    if store.preflight().await?.empty && !opts.allow_empty {
        return Err(Error::EmptySource {
            source_url: opts.store.source.to_string(),
            allow: "pass --allow-empty to fill an empty volume anyway".into(),
        });
    }
    Ok(())
}

pub async fn populate(opts: &PopulateOptions) -> Result<Summary> {
    if opts.jobs == 0 || opts.part_size == 0 || opts.memory < opts.part_size {
        return Err(Error::InvalidOption(
            "--jobs and --part-size must be positive and --memory at least one part".into(),
        ));
    }
    let store = Store::new(&opts.store, opts.limiters())?;
    refuse_empty(&store, opts).await?;
    if !opts.target.is_dir() {
        std::fs::create_dir(&opts.target)
            .map_err(|e| Error::InvalidOption(format!("target {}: {e}", opts.target.display())))?;
    }
    let target = Arc::new(target::Target::open(&opts.target)?);
    let lock = lock::FillLock::acquire(&target)?;

    if let Some(mode) = opts.root_mode {
        set_root_attributes(&target, mode, opts.uid, opts.gid);
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
    let journal = Arc::new(journal::Journal::load(target.clone(), &source)?);
    let todo = still_to_copy(&target, &plan, &journal);
    let resumed = (plan.files.len() - todo.len()) as u64;
    let parts = part_file::PartFiles::new(target.clone());
    check_space(&target, &parts, &plan, &todo)?;
    tracing::info!(
        source = %source,
        target = %target.path().display(),
        files = plan.files.len(),
        bytes = %iec(plan.total_bytes()),
        resumed_files = resumed,
        skipped_keys = plan.rejected.len(),
        "starting fill"
    );

    for d in &plan.dirs {
        target.create_dir(d, opts.dir_mode, (opts.uid, opts.gid))?;
    }

    let todo_bytes: u64 = todo.iter().map(|f| f.size).sum();
    let progress = Arc::new(progress::Progress::new(todo_bytes, todo.len() as u64));
    let copier = Arc::new(copy::Copier {
        fetcher: copy::Fetcher::new(store.clone(), opts.jobs, opts.memory),
        parts: parts.clone(),
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
    if let Err(e) = result {
        // The copies still under way were dropped with the stream; their part files (and
        // any a blocking step creates after this) go, the journal stays for a rerun.
        let removed = parts.remove_all();
        if removed > 0 {
            tracing::info!(
                files = removed,
                "removed the part files of unfinished copies"
            );
        }
        return Err(e);
    }

    if opts.fsync {
        nix::unistd::syncfs(target.root()).map_err(std::io::Error::from)?;
    }
    drop(copier);
    Arc::try_unwrap(journal)
        .ok()
        .map(journal::Journal::finish)
        .transpose()?;
    drop(lock);
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
