//! The copier: one object → one file in the target, with its ranges fetched concurrently
//! through [`Store::read_range`] (the same door, limiter and retries as the FUSE read path)
//! and written with positional writes into a preallocated `NAME.fillfs-part` file, renamed
//! to `NAME` only once complete and checked. Two semaphores bound the work: `requests`
//! (GETs in flight, `--jobs`) and `memory` (bytes fetched but not yet written).
//!
//! Integrity: every file's size; the MD5 of single-part ETags (for one-range files from the
//! buffer, for larger ones with `--verify` by re-reading what was written); `--verify` also
//! re-reads small files from disk. A mismatch is retried once, then the fill fails naming
//! the file. It must not plan (see `plan.rs`) or report (see `progress.rs`).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::sync::Semaphore;

use super::journal::Journal;
use super::plan::{FileJob, PART_SUFFIX};
use super::progress::Progress;
use crate::buffers::BufferPool;
use crate::error::{Error, Result};
use crate::store::Store;

/// Semaphore unit for the memory budget.
const KIB: u64 = 1024;

/// Ranged GETs within two budgets: requests in flight and bytes held in memory.
pub struct Fetcher {
    pub store: Store,
    pub requests: Semaphore,
    pub memory: Arc<Semaphore>,
    buffers: Arc<BufferPool>,
}

impl Fetcher {
    /// `part_size`: the range size whose buffers are kept for reuse.
    pub fn new(store: Store, jobs: usize, memory: u64, part_size: u64) -> Self {
        let units = (memory / KIB).min(Semaphore::MAX_PERMITS as u64) as usize;
        Fetcher {
            store,
            requests: Semaphore::new(jobs),
            memory: Arc::new(Semaphore::new(units)),
            // Never more buffers than the memory budget has in flight at once.
            buffers: BufferPool::new(
                part_size as usize,
                (memory / part_size.max(1)).max(1) as usize,
            ),
        }
    }

    /// One ranged GET. The returned bytes carry their memory permit (and, for a full
    /// part, their reusable buffer) until dropped.
    pub async fn fetch(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let len = range.end - range.start;
        let _request = self.requests.acquire().await.expect("semaphore open");
        let units = len.div_ceil(KIB).clamp(1, u32::MAX as u64) as u32;
        let permit = self
            .memory
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("semaphore open");
        let buf = self.buffers.take(len as usize);
        let data = self.store.read_range_into(key, range, buf).await?;
        // The permit is released with the buffer, after the write.
        Ok(self.buffers.into_bytes(data, permit))
    }
}

/// `0..size` cut into consecutive ranges of at most `part` bytes.
pub fn split_ranges(size: u64, part: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    (0..size)
        .step_by(part as usize)
        .map(move |start| start..(start + part).min(size))
}

pub struct Copier {
    pub fetcher: Fetcher,
    pub target: PathBuf,
    pub part_size: u64,
    pub verify: bool,
    pub file_mode: u32,
    pub owner: (Option<u32>, Option<u32>),
    pub progress: Arc<Progress>,
    pub journal: Arc<Journal>,
}

/// The MD5 an ETag stands for, when it is a single-part ETag (32 hex digits, no `-N`).
pub fn etag_md5(etag: Option<&str>) -> Option<String> {
    let e = etag?.trim_matches('"');
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// MD5 of the first `len` bytes of `path` (a file, or a block device holding an image).
pub fn md5_file(path: &Path, len: u64) -> std::io::Result<String> {
    let mut f = File::open(path)?.take(len);
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn part_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.file_name().expect("file name").to_os_string();
    name.push(PART_SUFFIX);
    final_path.with_file_name(name)
}

impl Copier {
    /// Copies one object, retrying once on a checksum mismatch, and records it as done.
    pub async fn copy_file(self: Arc<Self>, job: FileJob) -> Result<()> {
        let final_path = self.target.join(&job.rel);
        let part = part_path(&final_path);
        let wrap = |e: Error| Error::Copy {
            path: job.rel.display().to_string(),
            source: Box::new(e),
        };
        let mut result = self.clone().try_copy(&job, &part).await;
        if let Err(Error::ChecksumMismatch { expected, got, .. }) = &result {
            tracing::warn!(file = %job.rel.display(), %expected, %got, "checksum mismatch, fetching the file again");
            result = self.clone().try_copy(&job, &part).await;
        }
        if let Err(e) = result {
            let _ = std::fs::remove_file(&part);
            return Err(wrap(e));
        }
        self.finish_file(&job, &part, &final_path).map_err(wrap)?;
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Mode, owner, mtime; then the rename that makes the file look complete; then the
    /// journal line.
    fn finish_file(&self, job: &FileJob, part: &Path, final_path: &Path) -> Result<()> {
        let f = File::options().write(true).open(part)?;
        f.set_permissions(std::fs::Permissions::from_mode(self.file_mode))?;
        if let Some(mtime) = job.mtime {
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(mtime)
                    .set_accessed(mtime),
            )?;
        }
        drop(f);
        if self.owner.0.is_some() || self.owner.1.is_some() {
            std::os::unix::fs::chown(part, self.owner.0, self.owner.1)?;
        }
        std::fs::rename(part, final_path)?;
        let rel = job.rel.to_string_lossy();
        self.journal.record(&rel, job.size, job.etag.as_deref())
    }

    async fn try_copy(self: Arc<Self>, job: &FileJob, part: &Path) -> Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .read(true)
            .open(part)?;
        if job.size > 0 {
            // Reserve the blocks up front (also fails fast with ENOSPC); fall back to a
            // sparse file where fallocate is not supported.
            if let Err(e) = nix::fcntl::fallocate(
                &file,
                nix::fcntl::FallocateFlags::empty(),
                0,
                job.size as i64,
            ) {
                if e == nix::errno::Errno::ENOSPC {
                    return Err(std::io::Error::from(e).into());
                }
                file.set_len(job.size)?;
            }
        }
        let file = Arc::new(file);
        let expected_md5 = etag_md5(job.etag.as_deref());
        let mut written = 0u64;
        let result: Result<()> = async {
            if job.size <= self.part_size {
                let data = self.fetcher.fetch(&job.key, 0..job.size).await?;
                if let Some(want) = &expected_md5 {
                    let got = hex(&Md5::digest(&data));
                    if &got != want {
                        return Err(Error::ChecksumMismatch {
                            path: job.key.clone(),
                            expected: want.clone(),
                            got,
                        });
                    }
                }
                written += self.write_at(&file, data, 0).await?;
            } else {
                let mut tasks = tokio::task::JoinSet::new();
                for r in split_ranges(job.size, self.part_size) {
                    let (me, file, key) = (self.clone(), file.clone(), job.key.clone());
                    tasks.spawn(async move {
                        let start = r.start;
                        let data = me.fetcher.fetch(&key, r).await?;
                        me.write_at(&file, data, start).await
                    });
                }
                while let Some(res) = tasks.join_next().await {
                    written += res.map_err(|e| Error::Io(std::io::Error::other(e)))??;
                }
            }
            let on_disk = file.metadata()?.len();
            if written != job.size || on_disk != job.size {
                return Err(Error::SizeMismatch {
                    path: job.key.clone(),
                    expected: job.size,
                    got: written.min(on_disk),
                });
            }
            if self.verify {
                let path = part.to_path_buf();
                let len = job.size;
                let got = tokio::task::spawn_blocking(move || md5_file(&path, len))
                    .await
                    .map_err(|e| Error::Io(std::io::Error::other(e)))??;
                if let Some(want) = &expected_md5
                    && &got != want
                {
                    return Err(Error::ChecksumMismatch {
                        path: job.key.clone(),
                        expected: want.clone(),
                        got,
                    });
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.progress
                .bytes_done
                .fetch_sub(written, Ordering::Relaxed);
        }
        result
    }

    async fn write_at(&self, file: &Arc<File>, data: Bytes, offset: u64) -> Result<u64> {
        let file = file.clone();
        let n = data.len() as u64;
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}
