//! Uploads: a file, a directory tree or a stream into the store, every byte paid to the
//! store's limiters, every part checked, files over one part resumable.
//!
//! - Up to one part (`part_size`), a file is one signed PUT (`store/multipart.rs`'s
//!   `put_object`; OpenDAL's writer for `file://` and for short streams); above it, a
//!   multipart upload whose parts run in parallel under two bounds shared by every file of
//!   the [`Uploader`]: `jobs` parts (or small files) in flight, and `memory` bytes of parts
//!   read and not yet acknowledged.
//! - Until the store has answered one part, a part is read into memory once, hashed
//!   (CRC-64/XZ; MD5 for S3, sent as `Content-MD5`, which the store verifies) and sent
//!   from memory. Once the store answers parts with their `x-oss-hash-crc64ecma` (OSS),
//!   parts are streamed from the file and the CRC-64 taken while sending is compared with
//!   the answer. A mismatch, a BadDigest, a 5xx or a reset sends the part again (up to
//!   `max_attempts`); so do the other requests of an upload (initiate, list, complete,
//!   abort) on transient failures.
//! - After CompleteMultipartUpload the object's CRC-64 (the parts' CRCs combined, without
//!   reading anything again) must equal what the store declares; on S3, which declares none,
//!   the multipart ETag (MD5 of the parts' MD5s) is compared (a different ETag scheme, as
//!   with SSE-KMS, is logged, not failed). A CRC-64 mismatch deletes the object, and so
//!   does a source file changed (size or mtime) while it was read.
//! - Resuming: a checkpoint (`checkpoint.rs`) records the upload id, part size, the source's
//!   size and mtime and the acknowledged parts. A new upload of the same file to the same key
//!   confirms those parts with ListParts and sends only the others; without a checkpoint (a
//!   container restarted with a fresh disk) the key's open uploads are found with
//!   ListMultipartUploads and their parts confirmed by hashing the file's own bytes. A changed
//!   source starts over. Uploads of the key not resumed are aborted, and so is an upload that
//!   fails: nothing is left open to be billed, and a half-written object is never visible.
//!   An upload that is only interrupted (the process killed, or the future dropped on Ctrl-C)
//!   stays open for the next run to resume.
//!
//! This module must not parse options or print (commands do), nor speak HTTP itself.

pub mod checkpoint;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::checkpoint::{Checkpoint, CheckpointDir, DonePart, SourceVersion};
use crate::error::{Error, Result};
use crate::populate::integrity::{self, Checked};
use crate::populate::progress::Progress;
use crate::store::multipart::{self, Client, ListedPart, PartBody};
use crate::store::objects::UploadShape;
use crate::store::{Scheme, Store};

/// How uploads are cut and run.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Part size; grown for a file that would otherwise need more than 10,000 parts.
    pub part_size: u64,
    /// Parts (and small files) in flight.
    pub jobs: usize,
    /// Bytes of parts read and not yet acknowledged.
    pub memory: u64,
    /// Where checkpoints are kept; `None`: no checkpoints (resuming then relies on
    /// ListMultipartUploads and the file's bytes).
    pub state_dir: Option<PathBuf>,
    /// Sends of one part (or one complete) before giving up.
    pub max_attempts: u32,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            part_size: 16 * 1024 * 1024,
            jobs: 16,
            memory: 512 * 1024 * 1024,
            state_dir: None,
            max_attempts: 10,
        }
    }
}

/// Counters of an [`Uploader`], for logs, tests and benchmarks.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Body bytes sent (parts and single PUTs), re-sent parts included.
    pub bytes_sent: AtomicU64,
    pub parts_sent: AtomicU64,
    /// Parts sent again after a mismatch or a transient failure.
    pub parts_retried: AtomicU64,
    /// Parts an earlier run had sent, confirmed and not sent again.
    pub parts_resumed: AtomicU64,
    pub bytes_resumed: AtomicU64,
    /// Open uploads aborted (failed, or abandoned by an earlier run).
    pub uploads_aborted: AtomicU64,
}

/// What one object's upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    pub bytes: u64,
    pub crc64: u64,
    pub checked: Checked,
    /// 0 for a single PUT.
    pub parts: u32,
    pub parts_resumed: u32,
}

/// Uploads into one store; cheap to clone, and clones share the bounds and counters.
#[derive(Clone)]
pub struct Uploader {
    store: Store,
    opts: UploadOptions,
    slots: Arc<Semaphore>,
    /// In KiB.
    memory: Arc<Semaphore>,
    stats: Arc<UploadStats>,
    progress: Option<Arc<Progress>>,
    /// One of the `PART_CRC_*` states below.
    part_crc: Arc<std::sync::atomic::AtomicU8>,
    /// Held by a first part sent alone (see `multipart_file`).
    first_part: Arc<tokio::sync::Mutex<()>>,
}

/// A part to send: read and hashed, or (when the store answers each part's CRC-64) a range
/// of the file, streamed and hashed as it goes.
struct PartData {
    number: u32,
    len: u64,
    body: PartSource,
    /// Known up front for a part in memory; a streamed part's is taken as it is sent.
    crc64: Option<u64>,
    md5: Option<[u8; 16]>,
}

enum PartSource {
    Memory(Bytes),
    File {
        file: Arc<std::fs::File>,
        offset: u64,
    },
}

/// Whether the store answers an UploadPart with the part's CRC-64 (learned from the first
/// answer): then parts of a file are streamed from it and checked by that CRC, with no
/// MD5 and no part-sized buffer; else each part is read into memory and MD5-hashed first
/// for `Content-MD5`.
const PART_CRC_UNKNOWN: u8 = 0;
const PART_CRC_DECLARED: u8 = 1;
const PART_CRC_ABSENT: u8 = 2;

impl Uploader {
    pub fn new(store: Store, opts: UploadOptions) -> Self {
        let kib = (opts.memory / 1024).clamp(1, u32::MAX as u64 / 2) as usize;
        // Under a cap, parts in flight beyond what the cap moves in about a second only
        // share it: each would finish later, and an interrupted upload would have fewer
        // whole parts to resume from.
        let rate = store
            .limiters()
            .iter()
            .filter_map(|l| l.bytes_per_sec())
            .min();
        let jobs = match rate {
            Some(r) => opts.jobs.min((r / opts.part_size.max(1)) as usize + 2),
            None => opts.jobs,
        };
        Uploader {
            slots: Arc::new(Semaphore::new(jobs.max(1))),
            memory: Arc::new(Semaphore::new(kib)),
            stats: Arc::new(UploadStats::default()),
            progress: None,
            part_crc: Arc::new(std::sync::atomic::AtomicU8::new(PART_CRC_UNKNOWN)),
            first_part: Arc::new(tokio::sync::Mutex::new(())),
            store,
            opts,
        }
    }

    /// Counts uploaded bytes and files into `progress`.
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn stats(&self) -> &UploadStats {
        &self.stats
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The part size for an object of `size` bytes: the configured one, grown (in whole
    /// MiB) so that no more than 10,000 parts are needed; 5 TiB fits.
    pub fn part_size_for(&self, size: u64) -> u64 {
        part_size_for(self.opts.part_size, size)
    }

    fn object_url(&self, key: &str) -> String {
        let s = self.store.source();
        format!("{}://{}/{}{key}", s.scheme, s.bucket, s.prefix)
    }

    fn progress_bytes(&self, n: u64) {
        if let Some(p) = &self.progress {
            p.bytes_done.fetch_add(n, Ordering::Relaxed);
        }
    }

    async fn memory_for(&self, bytes: u64) -> OwnedSemaphorePermit {
        let total = (self.opts.memory / 1024).clamp(1, u32::MAX as u64 / 2);
        let kib = bytes.div_ceil(1024).clamp(1, total) as u32;
        self.memory
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the memory semaphore is never closed")
    }

    async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the job semaphore is never closed")
    }

    /// Uploads the file at `path` to `key`.
    pub async fn file(&self, path: &Path, key: &str) -> Result<Uploaded> {
        let meta = std::fs::metadata(path).map_err(|e| io_at(path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidOption(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let full_key = format!("{}{key}", self.store.source().prefix);
        if key.is_empty() || !multipart::Client::key_is_addressable(&full_key) {
            return Err(Error::InvalidOption(format!(
                "key {full_key:?} is empty or has a . or .. segment"
            )));
        }
        let size = meta.len();
        let multipart_ok = self.store.source().scheme != Scheme::File;
        let part_size = self.part_size_for(size);
        let up = if size <= part_size || !multipart_ok {
            self.single_put(path, key, size).await?
        } else {
            self.multipart_file(path, key, &meta, part_size).await?
        };
        // A file written to while it was read is stored torn even though every part
        // checked out: the stored object is withdrawn.
        let now = std::fs::metadata(path).map(|m| SourceVersion::of(&m)).ok();
        if now != Some(SourceVersion::of(&meta)) {
            if let Err(e) = self.store.delete_object(key).await {
                tracing::error!(key, error = %e, "deleting a torn upload failed");
            }
            return Err(Error::Io(std::io::Error::other(format!(
                "{} changed while it was uploaded (size or mtime); nothing was kept, upload it again",
                path.display()
            ))));
        }
        if let Some(p) = &self.progress {
            p.files_done.fetch_add(1, Ordering::Relaxed);
            p.count_checked(up.checked);
        }
        Ok(up)
    }

    async fn single_put(&self, path: &Path, key: &str, size: u64) -> Result<Uploaded> {
        let _slot = self.slot().await;
        if self.store.source().scheme != Scheme::File {
            // One signed PUT, checked by its answer (CRC-64 or MD5 ETag): no HEAD after it.
            let _mem = self.memory_for(size).await;
            let client = self.store.multipart()?;
            let md5 = self.wants_md5(client.scheme == Scheme::S3);
            let p = path.to_path_buf();
            let part = tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&p).map_err(|e| io_at(&p, e))?;
                read_part(&f, 0, size).map(|d| hash_part(0, d, md5))
            })
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
            let done = self.send_part(&client, key, "", &part).await?;
            let checked = if self.part_crc.load(Ordering::Relaxed) == PART_CRC_DECLARED {
                Checked::Crc64
            } else if !done.md5.is_empty() {
                Checked::Md5
            } else {
                Checked::SizeOnly
            };
            return Ok(Uploaded {
                bytes: size,
                crc64: done.crc64,
                checked,
                parts: 0,
                parts_resumed: 0,
            });
        }
        let _mem = self.memory_for(size.min(8 << 20)).await;
        let shape = UploadShape {
            part_size: size.max(1),
            concurrent: 1,
        };
        let up = self.store.upload_file(path, key, shape).await?;
        self.progress_bytes(up.bytes);
        Ok(self.one_put(up))
    }

    /// What a single PUT through OpenDAL's writer stored, counted.
    fn one_put(&self, up: crate::store::objects::Uploaded) -> Uploaded {
        self.stats.bytes_sent.fetch_add(up.bytes, Ordering::Relaxed);
        Uploaded {
            bytes: up.bytes,
            crc64: up.crc64,
            checked: if up.crc_checked {
                Checked::Crc64
            } else {
                Checked::SizeOnly
            },
            parts: 0,
            parts_resumed: 0,
        }
    }

    /// Uploads every regular file under `dir` to `prefix` + its path relative to `dir`
    /// (`prefix` empty or ending in `/`), `jobs` at a time. Returns (files, bytes).
    pub async fn tree(&self, dir: &Path, prefix: &str) -> Result<(u64, u64)> {
        let files = walk_files(dir).map_err(|e| io_at(dir, e))?;
        let results: Vec<Result<u64>> = futures::stream::iter(files)
            .map(|(rel, _)| {
                let (path, key) = (dir.join(&rel), format!("{prefix}{rel}"));
                async move {
                    self.file(&path, &key)
                        .await
                        .map(|u| u.bytes)
                        .map_err(|e| Error::Copy {
                            path: path.display().to_string(),
                            cause: Box::new(e),
                        })
                }
            })
            .buffer_unordered(self.opts.jobs.max(1))
            .collect()
            .await;
        let files = results.len() as u64;
        let bytes = results.into_iter().sum::<Result<u64>>()?;
        Ok((files, bytes))
    }

    /// Uploads what `chunks` yields to `key`: one PUT if it ends within one part, else a
    /// multipart upload fed as the stream arrives (at most `jobs` parts in flight and one
    /// filling: no temporary file). Parts grow (doubling every 1,000) so a stream of
    /// unknown length never runs out of part numbers. Not resumable: a stream cannot be
    /// replayed.
    pub async fn stream<S>(&self, key: &str, mut chunks: S) -> Result<Uploaded>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let first = stream_part_size(self.opts.part_size, 1);
        let mut buf = BytesMut::new();
        let mut ended = false;
        while buf.len() as u64 <= first {
            match chunks.try_next().await? {
                Some(c) => buf.extend_from_slice(&c),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended || self.store.source().scheme == Scheme::File {
            return self.single_put_stream(key, buf, chunks).await;
        }
        let client = self.store.multipart()?;
        let upload_id = self
            .retrying("InitiateMultipartUpload", key, || client.initiate(key))
            .await?;
        let result = self
            .stream_parts(&client, key, &upload_id, buf, &mut chunks)
            .await;
        self.finish_or_abort(&client, key, &upload_id, result, None)
            .await
    }

    async fn single_put_stream<S>(&self, key: &str, buf: BytesMut, mut rest: S) -> Result<Uploaded>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let _slot = self.slot().await;
        let shape = UploadShape {
            part_size: self.opts.part_size,
            concurrent: self.opts.jobs.max(1),
        };
        let mut sink = self.store.upload(key, shape).await?;
        let result = async {
            sink.write(buf.freeze()).await?;
            while let Some(c) = rest.try_next().await? {
                sink.write(c).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            sink.abort().await;
            return Err(e);
        }
        let up = sink.finish().await?;
        Ok(self.one_put(up))
    }

    async fn stream_parts<S>(
        &self,
        client: &Arc<Client>,
        key: &str,
        upload_id: &str,
        mut buf: BytesMut,
        chunks: &mut S,
    ) -> Result<BTreeMap<u32, DonePart>>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let s3 = client.scheme == Scheme::S3;
        let mut sending = tokio::task::JoinSet::new();
        let mut done = BTreeMap::new();
        let mut number = 0u32;
        let mut ended = false;
        loop {
            let size = stream_part_size(self.opts.part_size, number + 1);
            while !ended && (buf.len() as u64) < size {
                match chunks.try_next().await? {
                    Some(c) => buf.extend_from_slice(&c),
                    None => ended = true,
                }
                while let Some(r) = sending.try_join_next() {
                    let (n, part) = joined(r)?;
                    done.insert(n, part);
                }
            }
            if buf.is_empty() {
                break;
            }
            if number as u64 >= multipart::MAX_PARTS {
                return Err(Error::InvalidOption(format!(
                    "{key}: the stream needs more than 10,000 parts"
                )));
            }
            number += 1;
            let data = buf.split_to((size as usize).min(buf.len())).freeze();
            // The bounds are taken before the next part is read: a slow store holds the
            // stream back instead of filling memory.
            let slot = self.slot().await;
            let mem = self.memory_for(data.len() as u64).await;
            let me = self.clone();
            let (client, key, upload_id) = (client.clone(), key.to_string(), upload_id.to_string());
            sending.spawn(async move {
                let _held = (slot, mem);
                let md5 = me.wants_md5(s3);
                let part = tokio::task::spawn_blocking(move || hash_part(number, data, md5))
                    .await
                    .map_err(|e| Error::Io(std::io::Error::other(e)))?;
                let sent = me.send_part(&client, &key, &upload_id, &part).await?;
                Ok::<_, Error>((number, sent))
            });
            if ended && buf.is_empty() {
                break;
            }
        }
        while let Some(r) = sending.join_next().await {
            let (n, part) = joined(r)?;
            done.insert(n, part);
        }
        Ok(done)
    }

    async fn multipart_file(
        &self,
        path: &Path,
        key: &str,
        meta: &std::fs::Metadata,
        part_size: u64,
    ) -> Result<Uploaded> {
        let client = self.store.multipart()?;
        let size = meta.len();
        let version = SourceVersion::of(meta);
        let object = self.object_url(key);
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let cp_path = self
            .opts
            .state_dir
            .as_ref()
            .map(|d| CheckpointDir::new(d).file_for(&object, &abs));
        let (upload_id, confirmed) = self
            .resume_or_start(&client, path, key, version, part_size, cp_path.as_deref())
            .await?;
        let resumed = confirmed.len() as u32;
        let resumed_bytes: u64 = confirmed.values().map(|p| p.size).sum();
        if resumed > 0 {
            self.stats
                .parts_resumed
                .fetch_add(resumed as u64, Ordering::Relaxed);
            self.stats
                .bytes_resumed
                .fetch_add(resumed_bytes, Ordering::Relaxed);
            self.progress_bytes(resumed_bytes);
            tracing::info!(
                key,
                upload_id,
                parts = resumed,
                bytes = resumed_bytes,
                "resuming an upload: parts already stored are not sent again"
            );
        }
        let nparts = size.div_ceil(part_size) as u32;
        let mut cp = Checkpoint {
            version: 1,
            object,
            upload_id: upload_id.clone(),
            part_size,
            source: version,
            parts: confirmed,
        };
        if let Some(p) = &cp_path
            && let Err(e) = cp.save(p)
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot write the upload checkpoint; the upload goes on without it");
        }
        let todo: Vec<u32> = (1..=nparts).filter(|n| !cp.parts.contains_key(n)).collect();
        let shared = Arc::new(Mutex::new((cp.clone(), Instant::now())));
        let file = Arc::new(std::fs::File::open(path).map_err(|e| io_at(path, e))?);
        let s3 = client.scheme == Scheme::S3;
        // Until a store has answered one part, it is not known whether parts can be
        // streamed (CRC-64 answered) or must be held in memory for an MD5: the first part
        // goes alone, so a whole wave of parts is not read into memory for nothing.
        let first_alone = self.part_crc.load(Ordering::Relaxed) == PART_CRC_UNKNOWN;
        let result = futures::stream::iter(todo.into_iter().enumerate())
            .map(|(i, number)| {
                let alone = (first_alone && i == 0).then(|| self.first_part.clone());
                let (file, shared, client, cp_path) = (
                    file.clone(),
                    shared.clone(),
                    client.clone(),
                    cp_path.clone(),
                );
                let (key, upload_id) = (key.to_string(), upload_id.clone());
                async move {
                    let (offset, len) = part_range(size, part_size, number);
                    // The first part holds the gate until it is answered; the others wait.
                    let _gate = match alone {
                        // Another file's first part may have taught it meanwhile.
                        Some(gate) => {
                            let g = gate.lock_owned().await;
                            (self.part_crc.load(Ordering::Relaxed) == PART_CRC_UNKNOWN).then_some(g)
                        }
                        None => {
                            drop(self.first_part.lock().await);
                            None
                        }
                    };
                    let _slot = self.slot().await;
                    let streamed = self.part_crc.load(Ordering::Relaxed) == PART_CRC_DECLARED;
                    let _mem = self
                        .memory_for(if streamed { len.min(4 << 20) } else { len })
                        .await;
                    let part = if streamed {
                        PartData {
                            number,
                            len,
                            body: PartSource::File { file, offset },
                            crc64: None,
                            md5: None,
                        }
                    } else {
                        let md5 = self.wants_md5(s3);
                        tokio::task::spawn_blocking(move || {
                            read_part(&file, offset, len).map(|d| hash_part(number, d, md5))
                        })
                        .await
                        .map_err(|e| Error::Io(std::io::Error::other(e)))??
                    };
                    let sent = self.send_part(&client, &key, &upload_id, &part).await?;
                    let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
                    g.0.parts.insert(number, sent);
                    // At most twice a second: a part lost from the checkpoint is still
                    // found by ListParts and confirmed from the file.
                    if let Some(p) = &cp_path
                        && g.1.elapsed() >= Duration::from_millis(500)
                    {
                        let _ = g.0.save(p);
                        g.1 = Instant::now();
                    }
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(self.opts.jobs.max(1))
            .try_collect::<()>()
            .await
            .map(|()| {
                let g = shared.lock().unwrap_or_else(|e| e.into_inner());
                g.0.parts.clone()
            });
        cp.parts = BTreeMap::new();
        let mut up = self
            .finish_or_abort(&client, key, &upload_id, result, cp_path.as_deref())
            .await?;
        up.parts_resumed = resumed;
        if up.bytes != size {
            return Err(Error::SizeMismatch {
                path: key.to_string(),
                expected: size,
                got: up.bytes,
            });
        }
        Ok(up)
    }

    /// The upload to continue and the parts of it confirmed, or a new upload.
    async fn resume_or_start(
        &self,
        client: &Client,
        path: &Path,
        key: &str,
        version: SourceVersion,
        part_size: u64,
        cp_path: Option<&Path>,
    ) -> Result<(String, BTreeMap<u32, DonePart>)> {
        let mut candidates: Vec<(String, BTreeMap<u32, DonePart>)> = Vec::new();
        if let Some(cp) = cp_path.and_then(Checkpoint::load) {
            if cp.source == version && cp.part_size == part_size {
                candidates.push((cp.upload_id, cp.parts));
            } else {
                tracing::info!(
                    key,
                    upload_id = cp.upload_id,
                    "the source changed since the last upload began (size or mtime): starting over"
                );
                self.abort(client, key, &cp.upload_id).await;
                if let Some(p) = cp_path {
                    Checkpoint::remove(p);
                }
            }
        }
        // Uploads of the key the store holds: a checkpoint may have been lost with its
        // container, or never kept.
        match self
            .retrying("ListMultipartUploads", key, || client.open_uploads(key))
            .await
        {
            Ok(mut open) => {
                open.sort_by(|a, b| b.initiated.cmp(&a.initiated));
                for u in open {
                    if !candidates.iter().any(|(id, _)| *id == u.upload_id) {
                        candidates.push((u.upload_id, BTreeMap::new()));
                    }
                }
            }
            Err(e) => tracing::warn!(key, error = %e, "cannot list the key's open uploads"),
        }
        let size = version.size;
        // Every candidate is confirmed; the one with the most bytes already stored is
        // continued, the others are abandoned and aborted.
        let mut best: Option<(String, BTreeMap<u32, DonePart>, u64)> = None;
        let mut abandoned = Vec::new();
        for (id, known) in candidates {
            let listed = match self
                .retrying("ListParts", key, || client.list_parts(key, &id))
                .await
            {
                Ok(l) => l,
                Err(Error::Request { code, .. }) if code == "NoSuchUpload" => continue,
                Err(e) => {
                    tracing::warn!(key, upload_id = id, error = %e, "cannot list an upload's parts: not resuming it");
                    continue;
                }
            };
            let confirmed = confirm_parts(
                path,
                size,
                part_size,
                &listed,
                &known,
                client.scheme == Scheme::S3,
            )
            .await?;
            let bytes: u64 = confirmed.values().map(|p| p.size).sum();
            match &best {
                Some((_, _, b)) if *b >= bytes => abandoned.push(id),
                _ => {
                    if let Some((old, _, _)) = best.replace((id, confirmed, bytes)) {
                        abandoned.push(old);
                    }
                }
            }
        }
        for id in abandoned {
            tracing::info!(
                key,
                upload_id = id,
                "aborting an abandoned upload of the key"
            );
            self.abort(client, key, &id).await;
        }
        match best {
            Some((id, parts, _)) => Ok((id, parts)),
            None => Ok((
                self.retrying("InitiateMultipartUpload", key, || client.initiate(key))
                    .await?,
                BTreeMap::new(),
            )),
        }
    }

    /// Whether a part held in memory gets an MD5 (`Content-MD5`): on S3, and on any store
    /// that did not answer a part's CRC-64; never once a store has answered one.
    fn wants_md5(&self, s3: bool) -> bool {
        match self.part_crc.load(Ordering::Relaxed) {
            PART_CRC_DECLARED => false,
            PART_CRC_ABSENT => true,
            _ => s3,
        }
    }

    /// `request` until it succeeds, fails for good, or `max_attempts` transient failures.
    async fn retrying<T, F, Fut>(&self, op: &str, key: &str, mut request: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match request().await {
                Err(e) if e.is_transient_request() && attempt < self.opts.max_attempts => {
                    let delay = backoff(attempt);
                    tracing::warn!(
                        key,
                        attempt,
                        after_ms = delay.as_millis() as u64,
                        "retrying {op}: {e}"
                    );
                    tokio::time::sleep(delay).await;
                }
                r => return r,
            }
        }
    }

    async fn abort(&self, client: &Client, key: &str, upload_id: &str) {
        match self
            .retrying("AbortMultipartUpload", key, || client.abort(key, upload_id))
            .await
        {
            Ok(()) => {
                self.stats.uploads_aborted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(key, upload_id, error = %e, "aborting an upload failed"),
        }
    }

    /// Sends one part until the store acknowledges the bytes that were sent.
    async fn send_part(
        &self,
        client: &Client,
        key: &str,
        upload_id: &str,
        part: &PartData,
    ) -> Result<DonePart> {
        let mut md5 = part.md5;
        // Set when a part is re-sent from memory with an MD5 it did not have at first.
        let mut held: Option<Bytes> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if md5.is_none() && self.part_crc.load(Ordering::Relaxed) == PART_CRC_ABSENT {
                // The store does not answer CRC-64s after all: the part needs an MD5.
                let data = match &part.body {
                    PartSource::Memory(d) => d.clone(),
                    PartSource::File { file, offset } => {
                        let (file, offset, len) = (file.clone(), *offset, part.len);
                        tokio::task::spawn_blocking(move || read_part(&file, offset, len))
                            .await
                            .map_err(|e| Error::Io(std::io::Error::other(e)))??
                    }
                };
                md5 = Some(Md5::digest(&data).into());
                held = Some(data);
            }
            let md5_hex = md5.map(|m| integrity::hex(&m));
            let taken = Arc::new(Mutex::new(crc_fast::Digest::new(
                crc_fast::CrcAlgorithm::Crc64Xz,
            )));
            let stream: std::pin::Pin<
                Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + Sync>,
            > = match (&held, &part.body) {
                (Some(data), _) | (None, PartSource::Memory(data)) => {
                    Box::pin(paced(&self.store, data.clone()))
                }
                (None, PartSource::File { file, offset }) => Box::pin(streamed_range(
                    &self.store,
                    file.clone(),
                    *offset,
                    part.len,
                    taken.clone(),
                )),
            };
            let body = PartBody {
                len: part.len,
                content_md5: md5.map(|m| base64::engine::general_purpose::STANDARD.encode(m)),
                stream,
            };
            self.stats.parts_sent.fetch_add(1, Ordering::Relaxed);
            let answer = if part.number == 0 {
                client.put_object(key, body).await
            } else {
                client.upload_part(key, upload_id, part.number, body).await
            };
            let err = match answer {
                Ok(r) => {
                    self.stats.bytes_sent.fetch_add(part.len, Ordering::Relaxed);
                    self.part_crc.store(
                        if r.crc64.is_some() {
                            PART_CRC_DECLARED
                        } else {
                            PART_CRC_ABSENT
                        },
                        Ordering::Relaxed,
                    );
                    let sent_crc = match (&held, part.crc64) {
                        (Some(d), _) => integrity::crc64(d),
                        (None, Some(c)) => c,
                        (None, None) => taken.lock().unwrap_or_else(|e| e.into_inner()).finalize(),
                    };
                    let etag_md5 = integrity::etag_md5(Some(&r.etag));
                    let bad = match (r.crc64, &etag_md5, &md5_hex) {
                        (Some(c), _, _) if c != sent_crc => {
                            Some((format!("CRC-64 {sent_crc}"), format!("CRC-64 {c}")))
                        }
                        (None, _, None) => Some((
                            "a CRC-64 in the answer (the part was streamed unhashed)".into(),
                            "none: sending it again with Content-MD5".into(),
                        )),
                        _ => None,
                    };
                    match bad {
                        None => {
                            self.progress_bytes(part.len);
                            return Ok(DonePart {
                                etag: r.etag,
                                size: part.len,
                                crc64: sent_crc,
                                md5: md5_hex.clone().or(etag_md5).unwrap_or_default(),
                            });
                        }
                        Some((expected, got)) => Error::ChecksumMismatch {
                            path: format!("{key} part {}", part.number),
                            expected,
                            got,
                        },
                    }
                }
                Err(e) if e.is_transient_request() => e,
                Err(e) => return Err(e),
            };
            if attempt >= self.opts.max_attempts {
                return Err(err);
            }
            self.stats.parts_retried.fetch_add(1, Ordering::Relaxed);
            let delay = backoff(attempt);
            tracing::warn!(
                key,
                part = part.number,
                attempt,
                after_ms = delay.as_millis() as u64,
                "sending a part again: {err}"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Completes the upload from `parts` and checks the object; on any failure (before or
    /// here) the upload is aborted and the checkpoint removed.
    async fn finish_or_abort(
        &self,
        client: &Client,
        key: &str,
        upload_id: &str,
        parts: Result<BTreeMap<u32, DonePart>>,
        cp_path: Option<&Path>,
    ) -> Result<Uploaded> {
        let result = match parts {
            Ok(parts) => self.complete(client, key, upload_id, &parts).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            tracing::warn!(key, upload_id, error = %e, "the upload failed; aborting it");
            self.abort(client, key, upload_id).await;
        }
        if let Some(p) = cp_path {
            Checkpoint::remove(p);
        }
        result
    }

    async fn complete(
        &self,
        client: &Client,
        key: &str,
        upload_id: &str,
        parts: &BTreeMap<u32, DonePart>,
    ) -> Result<Uploaded> {
        let list: Vec<(u32, String)> = parts.iter().map(|(n, p)| (*n, p.etag.clone())).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.complete(key, upload_id, &list).await {
                Ok(_) => break,
                // An earlier attempt completed it and its answer was lost: the check below
                // says whether the object is what was sent.
                Err(Error::Request { code, .. }) if attempt > 1 && code == "NoSuchUpload" => break,
                Err(e) if e.is_transient_request() && attempt < self.opts.max_attempts => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
        let bytes: u64 = parts.values().map(|p| p.size).sum();
        let crc64 = parts.values().fold(0, |acc, p| {
            crc_fast::checksum_combine(crc_fast::CrcAlgorithm::Crc64Xz, acc, p.crc64, p.size)
        });
        let (meta, declared) = self.store.stat_with_crc64(key).await?;
        let mut checked = Checked::SizeOnly;
        let mut mismatch = (meta.size != bytes).then(|| {
            (
                format!("{bytes} bytes (sent)"),
                format!("{} bytes (stored)", meta.size),
            )
        });
        if mismatch.is_none() {
            if let Some(d) = declared {
                checked = Checked::Crc64;
                if d != crc64 {
                    mismatch = Some((
                        format!("CRC-64 {crc64} (sent)"),
                        format!("CRC-64 {d} (stored)"),
                    ));
                }
            } else if let Some(want) = multipart_etag(parts)
                && let Some(got) = meta
                    .etag
                    .as_deref()
                    .map(|e| e.trim_matches('"').to_ascii_lowercase())
                && got.contains('-')
            {
                if got == want {
                    checked = Checked::Md5;
                } else {
                    // Stores with server-side encryption (SSE-KMS, SSE-C) and some
                    // S3-compatible ones compute ETags otherwise: not evidence of damage
                    // (each part's Content-MD5 was verified by the store).
                    tracing::warn!(
                        key,
                        sent = want,
                        stored = got,
                        "the multipart ETag is not the MD5 of the parts' MD5s; checked by size only"
                    );
                }
            }
        }
        if let Some((expected, got)) = mismatch {
            if let Err(e) = self.store.delete_object(key).await {
                tracing::error!(key, error = %e, "deleting an object that failed its check failed: it is still visible");
            }
            return Err(Error::ChecksumMismatch {
                path: key.to_string(),
                expected,
                got,
            });
        }
        Ok(Uploaded {
            bytes,
            crc64,
            checked,
            parts: parts.len() as u32,
            parts_resumed: 0,
        })
    }
}

/// `part_size` grown (in whole MiB) so `size` fits in 10,000 parts; at most 5 GiB.
pub fn part_size_for(part_size: u64, size: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let needed = size.div_ceil(multipart::MAX_PARTS).div_ceil(MIB) * MIB;
    part_size
        .max(needed)
        .clamp(multipart::MIN_PART, multipart::MAX_SINGLE_PUT)
}

/// Part `number`'s size in a stream: `base` for the first 1,000, doubling each 1,000 after.
fn stream_part_size(base: u64, number: u32) -> u64 {
    let doublings = ((number.max(1) - 1) / 1000).min(20);
    (base.max(multipart::MIN_PART) << doublings).min(multipart::MAX_SINGLE_PUT)
}

/// Offset and length of part `number` (from 1) of an object of `size` cut in `part_size`.
fn part_range(size: u64, part_size: u64, number: u32) -> (u64, u64) {
    let offset = (number as u64 - 1) * part_size;
    (offset, part_size.min(size - offset))
}

fn read_part(file: &std::fs::File, offset: u64, len: u64) -> Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

fn hash_part(number: u32, data: Bytes, md5: bool) -> PartData {
    let crc64 = integrity::crc64(&data);
    let md5 = md5.then(|| Md5::digest(&data).into());
    PartData {
        number,
        len: data.len() as u64,
        body: PartSource::Memory(data),
        crc64: Some(crc64),
        md5,
    }
}

/// `len` bytes of `file` from `offset` as 1 MiB chunks read by a blocking task two chunks
/// ahead, each added to `crc` and paid to the store's limiters as it goes out.
fn streamed_range(
    store: &Store,
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
    crc: Arc<Mutex<crc_fast::Digest>>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1024 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut at = 0;
        while at < len {
            let n = CHUNK.min(len - at) as usize;
            let mut buf = vec![0u8; n];
            let r = file.read_exact_at(&mut buf, offset + at).map(|()| {
                crc.lock().unwrap_or_else(|e| e.into_inner()).update(&buf);
                Bytes::from(buf)
            });
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
            at += n as u64;
        }
    });
    let limiters: Vec<_> = store.limiters().to_vec();
    tokio_stream::wrappers::ReceiverStream::new(rx).then(move |c| {
        let limiters = limiters.clone();
        async move {
            if let Ok(c) = &c {
                for l in &limiters {
                    l.acquire(c.len() as u64).await;
                }
            }
            c
        }
    })
}

/// The listed parts that hold this file's bytes: those the checkpoint knows with the same
/// ETag and size, and others whose ETag is the MD5 of the file's bytes at that place.
async fn confirm_parts(
    path: &Path,
    size: u64,
    part_size: u64,
    listed: &[ListedPart],
    known: &BTreeMap<u32, DonePart>,
    md5: bool,
) -> Result<BTreeMap<u32, DonePart>> {
    let nparts = size.div_ceil(part_size) as u32;
    let mut out = BTreeMap::new();
    let mut to_hash = Vec::new();
    for p in listed {
        if p.number == 0 || p.number > nparts || part_range(size, part_size, p.number).1 != p.size {
            continue;
        }
        match known.get(&p.number) {
            Some(k) if k.etag == p.etag && k.size == p.size => {
                out.insert(p.number, k.clone());
            }
            _ => to_hash.push(p.clone()),
        }
    }
    if to_hash.is_empty() {
        return Ok(out);
    }
    let file = std::fs::File::open(path).map_err(|e| io_at(path, e))?;
    let checked = tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        for p in to_hash {
            let Some(want) = integrity::etag_md5(Some(&p.etag)) else {
                continue;
            };
            let (offset, len) = part_range(size, part_size, p.number);
            let data = read_part(&file, offset, len)?;
            let h = hash_part(p.number, data, true);
            let got = integrity::hex(&h.md5.expect("asked for"));
            if got == want {
                found.push((
                    p.number,
                    DonePart {
                        etag: p.etag,
                        size: p.size,
                        crc64: h.crc64.unwrap_or_default(),
                        md5: if md5 { got } else { String::new() },
                    },
                ));
            }
        }
        Ok::<_, Error>(found)
    })
    .await
    .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    out.extend(checked);
    Ok(out)
}

/// The ETag S3 gives a multipart object: MD5 of the parts' MD5s, `-` and the count.
fn multipart_etag(parts: &BTreeMap<u32, DonePart>) -> Option<String> {
    let mut h = Md5::new();
    for p in parts.values() {
        if p.md5.len() != 32 || !p.md5.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let raw: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&p.md5[2 * i..2 * i + 2], 16))
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        h.update(raw);
    }
    Some(format!("{}-{}", integrity::hex(&h.finalize()), parts.len()))
}

/// The part's bytes as 256 KiB chunks, each paid to the store's limiters as it goes out.
fn paced(
    store: &Store,
    data: Bytes,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static {
    const CHUNK: usize = 256 * 1024;
    let limiters: Vec<_> = store.limiters().to_vec();
    let chunks: Vec<Bytes> = (0..data.len())
        .step_by(CHUNK)
        .map(|at| data.slice(at..(at + CHUNK).min(data.len())))
        .collect();
    futures::stream::iter(chunks).then(move |c| {
        let limiters = limiters.clone();
        async move {
            for l in &limiters {
                l.acquire(c.len() as u64).await;
            }
            Ok(c)
        }
    })
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100) * 2u32.pow(attempt.min(6));
    let jitter = Duration::from_millis(fastrand::u64(0..100));
    base.min(Duration::from_secs(5)) + jitter
}

fn joined(
    r: std::result::Result<Result<(u32, DonePart)>, tokio::task::JoinError>,
) -> Result<(u32, DonePart)> {
    r.map_err(|e| Error::Io(std::io::Error::other(e)))?
}

fn io_at(path: &Path, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}

/// Every regular file under `dir` as (path relative to `dir` with `/`, size), sorted.
/// Symbolic links are not followed (what a link points to is not the tree's).
pub fn walk_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        for e in std::fs::read_dir(&abs)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push((e.path(), rel));
            } else if ty.is_file() {
                out.push((rel, e.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_fit_ten_thousand_parts() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(16 * MIB, 1 << 30), 16 * MIB);
        let five_tib = 5u64 << 40;
        let p = part_size_for(16 * MIB, five_tib);
        assert!(five_tib.div_ceil(p) <= 10_000, "{p}");
        assert_eq!(p % MIB, 0);
        assert_eq!(part_size_for(1, 10), multipart::MIN_PART);
        assert_eq!(stream_part_size(8 * MIB, 1000), 8 * MIB);
        assert_eq!(stream_part_size(8 * MIB, 1001), 16 * MIB);
        let total: u64 = (1..=10_000).map(|n| stream_part_size(8 * MIB, n)).sum();
        assert!(
            total > 5 * (1u64 << 40),
            "a stream may reach 5 TiB: {total}"
        );
    }

    #[test]
    fn parts_tile_the_object() {
        assert_eq!(part_range(10, 4, 1), (0, 4));
        assert_eq!(part_range(10, 4, 3), (8, 2));
    }

    #[test]
    fn the_multipart_etag_is_the_md5_of_the_part_md5s() {
        let part = |d: &[u8]| DonePart {
            etag: String::new(),
            size: d.len() as u64,
            crc64: 0,
            md5: integrity::hex(&Md5::digest(d)),
        };
        let mut parts = BTreeMap::new();
        parts.insert(1, part(b"a"));
        parts.insert(2, part(b"b"));
        let mut h = Md5::new();
        h.update(Md5::digest(b"a"));
        h.update(Md5::digest(b"b"));
        assert_eq!(
            multipart_etag(&parts),
            Some(format!("{}-2", integrity::hex(&h.finalize())))
        );
    }
}
