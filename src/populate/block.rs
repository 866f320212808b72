//! Block targets. `--block`: one object (a disk image) written raw into a block device or
//! image file, its ranges fetched concurrently and written in place, then fsync'ed.
//! `--mkfs ext4`: a prefix copied into a block device by formatting it, mounting it on a
//! temporary directory, running the directory fill, and unmounting (always). Either holds
//! the device's lock (`lock.rs`) throughout, so a second fill of it is refused.
//! It must not plan directory fills itself; it calls [`super::populate`] for that.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::copy::{Fetcher, split_ranges};
use super::integrity::{self, Checked, Expected, RangeCrcs};
use super::progress::{self, Progress};
use super::{PopulateOptions, Summary, iec};
use crate::error::{Error, Result};
use crate::store::{Scheme, SourceUrl, Store};

/// `s3://b/images/disk.img` parses as prefix `images/disk.img/`; for `--block` that names
/// object `disk.img` under `images/`.
fn split_object(src: &SourceUrl) -> Result<(SourceUrl, String)> {
    let trimmed = src.prefix.trim_end_matches('/');
    let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if name.is_empty() || (src.scheme == Scheme::File && parent.is_empty()) {
        return Err(Error::InvalidOption(format!(
            "--block needs SOURCE to name one object (e.g. s3://bucket/images/disk.img), got {src}"
        )));
    }
    let mut parent_url = src.clone();
    parent_url.prefix = if parent.is_empty() {
        String::new()
    } else {
        format!("{parent}/")
    };
    Ok((parent_url, name.to_string()))
}

/// Writes one object raw into `opts.target` (block device or image file).
pub async fn fill_raw(opts: &PopulateOptions) -> Result<Summary> {
    let (parent, key) = split_object(&opts.store.source)?;
    let mut cfg = opts.store.clone();
    cfg.source = parent;
    let store = Store::new(&cfg, opts.limiters())?;
    store.preflight().await?;
    let meta = store.stat(&key).await.map_err(|e| {
        if e.is_not_found() {
            Error::InvalidOption(format!(
                "object {key:?} not found under {}; --block copies one object (use --mkfs ext4 to copy a prefix)",
                cfg.source
            ))
        } else {
            e
        }
    })?;
    let target = &opts.target;
    let is_device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if !is_device && !target.exists() {
        std::fs::File::create(target)?;
    }
    let _lock = super::lock::DeviceLock::acquire(target)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!is_device)
        .truncate(false)
        .open(target)?;
    if is_device {
        let capacity = file.seek(SeekFrom::End(0))?;
        if capacity < meta.size {
            return Err(Error::NoSpace {
                target: target.display().to_string(),
                needs: iec(meta.size),
                has: iec(capacity),
            });
        }
    } else if file.metadata()?.len() < meta.size {
        file.set_len(meta.size)?;
    }
    tracing::info!(object = %key, size = %iec(meta.size), target = %target.display(), device = is_device, "writing image");
    let file = Arc::new(file);
    let fetcher = Arc::new(Fetcher::new(store, opts.jobs, opts.memory));
    let progress = Arc::new(Progress::new(meta.size, 1));
    let reporter = progress::spawn_reporter(progress.clone(), opts.progress);
    let early = opts.early_writeback;
    // Every range of the image from the version just looked at: an object replaced
    // mid-write fails the fill (412), never leaves a device of two images.
    let version = meta.version();
    let mut tasks = tokio::task::JoinSet::new();
    for r in split_ranges(meta.size, opts.part_size) {
        let (fetcher, file, key, progress, version) = (
            fetcher.clone(),
            file.clone(),
            key.clone(),
            progress.clone(),
            version.clone(),
        );
        tasks.spawn(async move {
            let done = fetcher
                .fetch_version_to(&key, &version, r, move |chunks, off| {
                    let n = super::part_file::write_all_vectored_at(&file, chunks, off)?;
                    if early {
                        super::part_file::start_writeback(&file, off, n);
                    }
                    Ok(())
                })
                .await?;
            progress.bytes_done.fetch_add(done.len, Ordering::Relaxed);
            Ok::<_, Error>(done)
        });
    }
    let mut result = Ok(());
    let mut crcs = RangeCrcs::default();
    while let Some(r) = tasks.join_next().await {
        match r
            .map_err(|e| Error::Io(std::io::Error::other(e)))
            .and_then(|r| r)
        {
            Ok(d) => crcs.add(d.offset, d.len, d.crc64, d.declared_crc64),
            // The first error is the one to report: the tasks aborted after it end as
            // "cancelled", which says nothing.
            Err(e) if result.is_ok() => {
                tasks.abort_all();
                result = Err(e);
            }
            Err(_) => {}
        }
    }
    progress::finish_reporter(reporter, &progress, opts.progress);
    result?;
    file.sync_all()?;
    let mut checked = crcs.check(&key)?;
    let expected = Expected {
        crc64: crcs.declared(),
        md5: integrity::etag_md5(meta.etag.as_deref()),
    };
    if opts.verify {
        let (path, len, name, exp) = (target.clone(), meta.size, key.clone(), expected.clone());
        let reread =
            tokio::task::spawn_blocking(move || integrity::verify_file(&path, len, &exp, &name))
                .await
                .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        if reread != Checked::SizeOnly {
            checked = reread;
        }
    }
    if checked == Checked::SizeOnly {
        tracing::warn!(object = %key, "the store declares no CRC-64 and no single-part MD5 (or --verify is off) for this object; only its size was checked");
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    progress.count_checked(checked);
    Ok(Summary {
        files: 1,
        bytes: progress.bytes_done.load(Ordering::Relaxed),
        resumed_files: 0,
        skipped_keys: 0,
        seconds: progress.elapsed().as_secs_f64(),
        checked: progress.check_counts(),
    })
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::InvalidOption(format!("{cmd:?}: {e} (is it installed?)")))?;
    if !out.status.success() {
        return Err(Error::InvalidOption(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Formats `opts.target` as ext4 (unless it holds an unfinished fillfs fill, which is then
/// resumed), mounts it, fills it from the prefix, unmounts.
pub async fn fill_mkfs(opts: &PopulateOptions) -> Result<Summary> {
    let device = &opts.target;
    let meta = std::fs::metadata(device)
        .map_err(|e| Error::InvalidOption(format!("--mkfs target {}: {e}", device.display())))?;
    // Before the probe mount and mkfs: a second fill must not format a device in use.
    let _lock = super::lock::DeviceLock::acquire(device)?;
    // And a source that is missing or empty must not cost the device its contents.
    let store = Store::new(&opts.store, Vec::new())?;
    super::refuse_empty(&store, opts).await?;
    let loop_opt = if meta.file_type().is_block_device() {
        None
    } else {
        Some("loop")
    };
    let mnt = tempfile::Builder::new().prefix("fillfs-mkfs-").tempdir()?;
    let mount = |dir: &Path| {
        let mut c = Command::new("mount");
        if let Some(o) = loop_opt {
            c.args(["-o", o]);
        }
        run_tool(c.arg(device).arg(dir))
    };
    let resumable = mount(mnt.path()).is_ok() && {
        let found = mnt.path().join(super::journal::JOURNAL_NAME).exists();
        let _ = run_tool(Command::new("umount").arg(mnt.path()));
        found
    };
    if resumable {
        tracing::info!(device = %device.display(), "resuming an unfinished fill on the existing file system");
    } else {
        tracing::info!(device = %device.display(), "formatting ext4");
        run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(device))?;
    }
    mount(mnt.path())?;
    let mut inner = opts.clone();
    inner.target = mnt.path().to_path_buf();
    let result = super::populate(&inner).await;
    let unmounted = run_tool(Command::new("umount").arg(mnt.path()));
    let summary = result?;
    unmounted?;
    Ok(summary)
}
