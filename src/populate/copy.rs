//! The copier: one object → one file in the target, with its ranges fetched concurrently
//! through [`Store::read_range_into`] (the same door, limiter and retries as the FUSE read
//! path) and written with positional writes into a [`PartFile`], which is renamed to its
//! final name only once complete and checked. Two semaphores bound the work: `requests`
//! (GETs in flight, `--jobs`) and `memory` (bytes fetched but not yet written).
//!
//! Integrity: every file's size; the MD5 of single-part ETags (for one-range files from the
//! buffer, for larger ones with `--verify` by re-reading what was written); `--verify` also
//! re-reads small files from disk. A mismatch is retried once, then the fill fails naming
//! the file. It must not plan (see `plan.rs`) or report (see `progress.rs`).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::sync::Semaphore;

use super::journal::Journal;
use super::part_file::{FileAttrs, PartFile};
use super::plan::FileJob;
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
    pub target: std::path::PathBuf,
    pub part_size: u64,
    pub verify: bool,
    /// Start each range's writeback as soon as it is written (see `part_file.rs`).
    pub early_writeback: bool,
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

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

fn check_md5(job: &FileJob, want: Option<&String>, got: impl FnOnce() -> String) -> Result<()> {
    let Some(want) = want else { return Ok(()) };
    let got = got();
    if &got != want {
        return Err(Error::ChecksumMismatch {
            path: job.key.clone(),
            expected: want.clone(),
            got,
        });
    }
    Ok(())
}

impl Copier {
    /// Copies one object, retrying once on a checksum mismatch, and records it as done.
    pub async fn copy_file(self: Arc<Self>, job: FileJob) -> Result<()> {
        let job = Arc::new(job);
        let final_path = self.target.join(&job.rel);
        let wrap = |e: Error| Error::Copy {
            path: job.rel.display().to_string(),
            source: Box::new(e),
        };
        let mut result = self.clone().try_copy(&job, &final_path).await;
        if let Err(Error::ChecksumMismatch { expected, got, .. }) = &result {
            tracing::warn!(file = %job.rel.display(), %expected, %got, "checksum mismatch, fetching the file again");
            result = self.clone().try_copy(&job, &final_path).await;
        }
        let part = result.map_err(wrap)?;
        // Mode, owner, mtime; then the rename that makes the file look complete; then the
        // journal line.
        let attrs = FileAttrs {
            mode: self.file_mode,
            uid: self.owner.0,
            gid: self.owner.1,
            mtime: job.mtime,
        };
        let (journal, done) = (self.journal.clone(), job.clone());
        blocking(move || {
            part.finish(&final_path, attrs)?;
            journal.record(&done.rel.to_string_lossy(), done.size, done.etag.as_deref())
        })
        .await
        .map_err(wrap)?;
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Fetches and writes the whole object into its part file and checks it; on any error
    /// the part file is removed.
    async fn try_copy(self: Arc<Self>, job: &Arc<FileJob>, final_path: &Path) -> Result<PartFile> {
        let expected_md5 = etag_md5(job.etag.as_deref());
        let written = std::sync::atomic::AtomicU64::new(0);
        let ew = self.early_writeback;
        let mut part: Option<Arc<PartFile>> = None;
        let result: Result<()> = async {
            if job.size <= self.part_size {
                // One GET, checked from memory, then create + write in one blocking hop.
                let data = self.fetcher.fetch(&job.key, 0..job.size).await?;
                check_md5(job, expected_md5.as_ref(), || hex(&Md5::digest(&data)))?;
                let (path, n) = (final_path.to_path_buf(), data.len() as u64);
                let p = blocking(move || {
                    let p = PartFile::create(&path, n, false, ew)?;
                    if let Err(e) = p.write_at(&data, 0) {
                        p.discard();
                        return Err(e.into());
                    }
                    Ok(p)
                })
                .await?;
                part = Some(Arc::new(p));
                self.wrote(&written, n);
            } else {
                let (path, size) = (final_path.to_path_buf(), job.size);
                let p = Arc::new(blocking(move || PartFile::create(&path, size, true, ew)).await?);
                part = Some(p.clone());
                let mut tasks = tokio::task::JoinSet::new();
                for r in split_ranges(job.size, self.part_size) {
                    let (me, p, job) = (self.clone(), p.clone(), job.clone());
                    tasks.spawn(async move {
                        let start = r.start;
                        let data = me.fetcher.fetch(&job.key, r).await?;
                        let n = data.len() as u64;
                        blocking(move || Ok(p.write_at(&data, start)?)).await?;
                        Ok::<u64, Error>(n)
                    });
                }
                while let Some(res) = tasks.join_next().await {
                    let n = res.map_err(|e| Error::Io(std::io::Error::other(e)))??;
                    self.wrote(&written, n);
                }
            }
            let p = part.as_ref().expect("created").clone();
            let on_disk = blocking(move || Ok(p.len_on_disk()?)).await?;
            let written = written.load(Ordering::Relaxed);
            if written != job.size || on_disk != job.size {
                return Err(Error::SizeMismatch {
                    path: job.key.clone(),
                    expected: job.size,
                    got: written.min(on_disk),
                });
            }
            if self.verify {
                let path = part.as_ref().expect("created").path().to_path_buf();
                let len = job.size;
                let got = blocking(move || Ok(md5_file(&path, len)?)).await?;
                check_md5(job, expected_md5.as_ref(), || got)?;
            }
            Ok(())
        }
        .await;
        match (result, part) {
            (Ok(()), Some(p)) => Ok(Arc::try_unwrap(p).expect("all writes finished")),
            (result, part) => {
                self.progress
                    .bytes_done
                    .fetch_sub(written.load(Ordering::Relaxed), Ordering::Relaxed);
                if let Some(p) = part {
                    // Writes of aborted ranges may still hold the descriptor; the name goes now.
                    let _ = std::fs::remove_file(p.path());
                }
                Err(result.err().unwrap_or_else(|| {
                    Error::Io(std::io::Error::other("part file was not created"))
                }))
            }
        }
    }

    fn wrote(&self, written: &std::sync::atomic::AtomicU64, n: u64) {
        written.fetch_add(n, Ordering::Relaxed);
        self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
    }
}
