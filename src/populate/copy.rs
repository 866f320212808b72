//! The copier: one object → one file in the target. A file of up to one part is one GET
//! ([`Store::read_range_chunks`]), checked in memory, then created and written. A larger one
//! is cut into ranges fetched concurrently ([`Store::open_range`]: the same door, limiter
//! and retries as the FUSE read path), each written *as it arrives*, a
//! [`WRITE_BATCH`] of the network's chunks per `pwritev`, into a preallocated [`PartFile`],
//! which is renamed to its final name only once complete and checked. Two semaphores bound
//! the work: `requests` (GETs in flight, `--jobs`) and `memory` (bytes fetched but not yet
//! written).
//!
//! Integrity (see `integrity.rs`): every file's size; the CRC-64 the store declares (per
//! range as it is written, combined); else the MD5 of a single-part ETag (one-range files
//! from the buffer, larger ones with `--verify`, which re-reads what was written). A
//! mismatch is retried once, then the fill fails naming the file. It must not plan (see
//! `plan.rs`) or report (see `progress.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::integrity::{self, Checked, Expected, RangeCrcs};
use super::journal::{Copied, Journal};
use super::part_file::{FileAttrs, PartFile, PartFiles};
use super::plan::FileJob;
use super::progress::Progress;
use crate::error::{Error, Result};
use crate::store::response::with_object_crc64;
use crate::store::{RangeChunks, Scheme, Store, Version, version};

/// Semaphore unit for the memory budget.
const KIB: u64 = 1024;

/// Ranged GETs within two budgets: requests in flight and bytes held in memory.
pub struct Fetcher {
    pub store: Store,
    pub requests: Semaphore,
    pub memory: Arc<Semaphore>,
}

/// One fetched range: the chunks as the network delivered them (never copied into one
/// buffer) and the memory permit they hold until dropped, after their write.
pub struct Fetched {
    pub data: RangeChunks,
    _permit: OwnedSemaphorePermit,
}

impl Fetcher {
    pub fn new(store: Store, jobs: usize, memory: u64) -> Self {
        let units = (memory / KIB).min(Semaphore::MAX_PERMITS as u64) as usize;
        Fetcher {
            store,
            requests: Semaphore::new(jobs),
            memory: Arc::new(Semaphore::new(units)),
        }
    }

    /// One ranged GET of `version`, with the CRC-64 the store declared for the whole object
    /// and, then, the CRC-64 of the range.
    pub async fn fetch(
        &self,
        key: &str,
        version: &Version,
        range: std::ops::Range<u64>,
    ) -> Result<Fetched> {
        let len = range.end - range.start;
        let _request = self.requests.acquire().await.expect("semaphore open");
        let units = len.div_ceil(KIB).clamp(1, u32::MAX as u64) as u32;
        let permit = self
            .memory
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("semaphore open");
        let data = self.store.read_range_chunks(key, version, range).await?;
        Ok(Fetched {
            data,
            _permit: permit,
        })
    }
}

/// Bytes of a range held before they are written: enough for one cheap `pwritev`, few
/// enough that they are still in the CPU's cache when the kernel copies them.
const WRITE_BATCH: u64 = 256 << 10;

/// Largest body chunk hyper hands over (its read buffer stops growing at 8 KiB + 400 KiB).
const MAX_HTTP_CHUNK: u64 = 512 << 10;

/// A range written by [`Fetcher::fetch_to`].
#[derive(Debug, Clone, Copy)]
pub struct RangeDone {
    pub offset: u64,
    pub len: u64,
    /// CRC-64 of the range's bytes.
    pub crc64: u64,
    pub declared_crc64: Option<u64>,
}

impl Fetcher {
    /// [`fetch_version_to`](Self::fetch_version_to) of whatever version the store holds
    /// (`block.rs`; it should pass the version it stat'ed).
    pub async fn fetch_to<W>(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
        write: W,
    ) -> Result<RangeDone>
    where
        W: Fn(&[bytes::Bytes], u64) -> std::io::Result<()> + Clone + Send + 'static,
    {
        self.fetch_version_to(key, &Version::Any, range, write)
            .await
    }

    /// One ranged GET of `version` written as it arrives: every [`WRITE_BATCH`] bytes,
    /// `write(chunks, offset)` runs on the blocking pool. Memory per range stays near one
    /// batch, and the CRC of each chunk is taken as it arrives.
    pub async fn fetch_version_to<W>(
        &self,
        key: &str,
        version: &Version,
        range: std::ops::Range<u64>,
        write: W,
    ) -> Result<RangeDone>
    where
        W: Fn(&[bytes::Bytes], u64) -> std::io::Result<()> + Clone + Send + 'static,
    {
        let start = range.start;
        let len = range.end - range.start;
        let _request = self.requests.acquire().await.expect("semaphore open");
        // What this range can hold at once: an HTTP body arrives in chunks of at most
        // hyper's read buffer (~400 KiB) and is written every WRITE_BATCH; a local file's
        // reader may hand over the whole range in one chunk.
        let held = if self.store.source().scheme == Scheme::File {
            len
        } else {
            len.min(WRITE_BATCH + MAX_HTTP_CHUNK)
        };
        let units = held.div_ceil(KIB).max(1) as u32;
        let _permit = self
            .memory
            .acquire_many(units)
            .await
            .expect("semaphore open");
        let (written, declared) = with_object_crc64(async {
            let mut reader = self.store.open_range(key, version, range).await?;
            let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Xz);
            let (mut batch, mut batch_len, mut at) = (Vec::new(), 0u64, start);
            loop {
                let next = reader.next_chunk().await?;
                let end = next.is_none();
                if let Some(chunk) = next {
                    crc.update(&chunk);
                    batch_len += chunk.len() as u64;
                    batch.push(chunk);
                }
                if batch_len >= WRITE_BATCH || (end && batch_len > 0) {
                    let (chunks, off, w) = (std::mem::take(&mut batch), at, write.clone());
                    blocking(move || Ok(w(&chunks, off)?)).await?;
                    at += batch_len;
                    batch_len = 0;
                }
                if end {
                    return Ok::<_, Error>((at - start, crc.finalize()));
                }
            }
        })
        .await;
        let (len, crc) = written?;
        Ok(RangeDone {
            offset: start,
            len,
            crc64: crc,
            declared_crc64: declared,
        })
    }
}

/// `0..size` cut into consecutive ranges of at most `part` bytes (a `part` of 0 counts as 1).
pub fn split_ranges(size: u64, part: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    let part = part.max(1);
    (0..size)
        .step_by(part as usize)
        .map(move |start| start..(start + part).min(size))
}

pub struct Copier {
    pub fetcher: Fetcher,
    /// Creates the part files, beneath the target and known until finished (`part_file.rs`).
    pub parts: Arc<PartFiles>,
    pub part_size: u64,
    pub verify: bool,
    /// Start each range's writeback as soon as it is written (see `part_file.rs`).
    pub early_writeback: bool,
    pub file_mode: u32,
    pub owner: (Option<u32>, Option<u32>),
    pub progress: Arc<Progress>,
    pub journal: Arc<Journal>,
}

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

impl Copier {
    /// Copies one object, retrying once on a checksum mismatch or, with its new version, on
    /// an overwrite mid-copy, and records it as done.
    pub async fn copy_file(self: Arc<Self>, job: FileJob) -> Result<()> {
        let mut job = Arc::new(job);
        let final_path = job.rel.clone();
        let rel = job.rel.display().to_string();
        let wrap = |e: Error| Error::Copy {
            path: rel.clone(),
            cause: Box::new(e),
        };
        let mut result = self.clone().try_copy(&job, &final_path).await;
        if let Err(e) = &result
            && version::changed(e)
        {
            tracing::warn!(file = %rel, error = %e, "object changed while being copied, fetching its new version");
            let meta = self.fetcher.store.stat(&job.key).await.map_err(wrap)?;
            job = Arc::new(FileJob {
                size: meta.size,
                etag: meta.etag,
                mtime: meta.mtime,
                ..(*job).clone()
            });
            result = self.clone().try_copy(&job, &final_path).await;
        }
        if let Err(Error::ChecksumMismatch { expected, got, .. }) = &result {
            tracing::warn!(file = %job.rel.display(), %expected, %got, "checksum mismatch, fetching the file again");
            result = self.clone().try_copy(&job, &final_path).await;
        }
        let (part, checked, crc64) = result.map_err(wrap)?;
        // Owner, mode, mtime, version; then the rename that makes the file look complete;
        // then the journal line.
        let attrs = FileAttrs {
            mode: self.file_mode,
            uid: self.owner.0,
            gid: self.owner.1,
            mtime: job.mtime,
            etag: job.etag.clone(),
        };
        let (journal, done) = (self.journal.clone(), job.clone());
        blocking(move || {
            part.finish(&attrs)?;
            let copied = Copied::new(done.size, done.etag.as_deref(), done.mtime, crc64);
            journal.record(&done.rel.to_string_lossy(), &copied)
        })
        .await
        .map_err(wrap)?;
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        self.progress.count_checked(checked);
        Ok(())
    }

    /// Fetches and writes the whole object into its part file and checks it; on any error
    /// the part file is removed.
    async fn try_copy(
        self: Arc<Self>,
        job: &Arc<FileJob>,
        final_path: &Path,
    ) -> Result<(PartFile, Checked, Option<u64>)> {
        let mut expected = Expected {
            crc64: None,
            md5: integrity::etag_md5(job.etag.as_deref()),
        };
        let version = Version::of(job.etag.as_deref(), job.size, job.mtime);
        let written = std::sync::atomic::AtomicU64::new(0);
        let ew = self.early_writeback;
        let mut part: Option<Arc<PartFile>> = None;
        let result: Result<Checked> = async {
            let mut checked = Checked::SizeOnly;
            if job.size <= self.part_size {
                // One GET, checked from memory, then create + write in one blocking hop.
                let f = self.fetcher.fetch(&job.key, &version, 0..job.size).await?;
                expected.crc64 = f.data.declared_crc64;
                if let Some(want) = f.data.declared_crc64 {
                    integrity::check_crc64(&job.key, want, f.data.crc64)?;
                    checked = Checked::Crc64;
                } else if let Some(want) = &expected.md5 {
                    integrity::check_md5(&job.key, want, &integrity::md5(&f.data.chunks))?;
                    checked = Checked::Md5;
                }
                let (path, n, parts) = (final_path.to_path_buf(), f.data.len, self.parts.clone());
                let p = blocking(move || {
                    let p = parts.create(&path, n, false, ew)?;
                    if let Err(e) = p.write_chunks_at(&f.data.chunks, 0) {
                        p.discard();
                        return Err(e.into());
                    }
                    Ok(p)
                })
                .await?;
                part = Some(Arc::new(p));
                self.wrote(&written, n);
            } else {
                let (path, size, parts) = (final_path.to_path_buf(), job.size, self.parts.clone());
                let p = Arc::new(blocking(move || parts.create(&path, size, true, ew)).await?);
                part = Some(p.clone());
                let mut tasks = tokio::task::JoinSet::new();
                for r in split_ranges(job.size, self.part_size) {
                    let (me, p, job, v) = (self.clone(), p.clone(), job.clone(), version.clone());
                    tasks.spawn(async move {
                        let write = move |c: &[bytes::Bytes], off| p.write_chunks_at(c, off);
                        me.fetcher.fetch_version_to(&job.key, &v, r, write).await
                    });
                }
                let mut crcs = RangeCrcs::default();
                while let Some(res) = tasks.join_next().await {
                    let r = res.map_err(|e| Error::Io(std::io::Error::other(e)))??;
                    crcs.add(r.offset, r.len, r.crc64, r.declared_crc64);
                    self.wrote(&written, r.len);
                }
                expected.crc64 = crcs.declared();
                checked = crcs.check(&job.key)?;
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
                let (len, key, expected) = (job.size, job.key.clone(), expected.clone());
                let reread =
                    blocking(move || integrity::verify_file(&path, len, &expected, &key)).await?;
                if reread != Checked::SizeOnly {
                    checked = reread;
                }
            }
            Ok(checked)
        }
        .await;
        match (result, part) {
            (Ok(checked), Some(p)) => Ok((
                Arc::try_unwrap(p).expect("all writes finished"),
                checked,
                expected.crc64,
            )),
            (result, part) => {
                self.progress
                    .bytes_done
                    .fetch_sub(written.load(Ordering::Relaxed), Ordering::Relaxed);
                if let Some(p) = part {
                    // Writes of aborted ranges may still hold the descriptor; the name goes now.
                    p.unlink();
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
