//! Whole-object operations on keys relative to the store's root, for the upload engine and
//! the Argo artifact driver: upload a file or a stream through OpenDAL (used for `file://`
//! and for streams that end within one part; `crate::upload` sends the rest itself),
//! delete a key or a prefix (batched, one request per 1,000 keys), list a prefix's keys,
//! tell whether a prefix has anything under it, and the CRC-64 the store declares for a
//! stored object.
//!
//! Uploads go through OpenDAL's writer: one PUT up to a part, else a multipart upload with
//! `concurrent` parts in flight; the CRC-64/XZ of what was sent is taken as it is read and
//! compared with the one the store declares afterwards (OSS and COS declare one; S3 does
//! not, and then the size is checked). It must not decide keys or formats (the artifact
//! driver does) and must not read object data (that is `mod.rs`'s ranged reads).

use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::TryStreamExt;
use opendal::ErrorKind;
use tokio::io::AsyncReadExt;

use super::Store;
use super::response::with_object_crc64;
use crate::error::{Error, Result};

/// How an upload is cut and run.
#[derive(Debug, Clone, Copy)]
pub struct UploadShape {
    /// Size of a multipart part (and of a single PUT's ceiling).
    pub part_size: u64,
    /// Parts in flight.
    pub concurrent: usize,
}

/// What an upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    pub bytes: u64,
    /// CRC-64/XZ of the bytes sent.
    pub crc64: u64,
    /// Whether the store declared a CRC-64 that was compared (else only the size was).
    pub crc_checked: bool,
}

/// Feeds an upload: the bytes go to OpenDAL's writer after the limiters are paid.
pub struct UploadSink {
    store: Store,
    key: String,
    writer: opendal::Writer,
    crc: crc_fast::Digest,
    bytes: u64,
}

impl UploadSink {
    /// Sends `data` (paid to the limiters first).
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        let ticket = self.store.ticket();
        for limiter in self.store.limiters.iter() {
            limiter.acquire_for(n, &ticket).await;
        }
        self.crc.update(&data);
        self.bytes += n;
        self.writer.write(data).await?;
        Ok(())
    }

    /// Completes the upload and checks what the store holds: its size, and its CRC-64
    /// where the store declares one. A failed check deletes the object.
    pub async fn finish(mut self) -> Result<Uploaded> {
        self.writer.close().await?;
        let crc64 = self.crc.finalize();
        let (meta, declared) = self.store.stat_with_crc64(&self.key).await?;
        let mismatch = if meta.size != self.bytes {
            Some((
                format!("{} bytes (sent)", self.bytes),
                format!("{} bytes (stored)", meta.size),
            ))
        } else {
            declared.filter(|d| *d != crc64).map(|d| {
                (
                    format!("CRC-64 {crc64} (sent)"),
                    format!("CRC-64 {d} (declared by the store)"),
                )
            })
        };
        if let Some((expected, got)) = mismatch {
            let _ = self.store.delete_object(&self.key).await;
            return Err(Error::ChecksumMismatch {
                path: self.key.clone(),
                expected,
                got,
            });
        }
        Ok(Uploaded {
            bytes: self.bytes,
            crc64,
            crc_checked: declared.is_some(),
        })
    }

    /// Gives up: a multipart upload begun is aborted, nothing becomes visible.
    pub async fn abort(mut self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(key = %self.key, error = %e, "aborting an upload failed");
        }
    }
}

impl Store {
    /// An upload of `key`; feed it with [`UploadSink::write`], then [`UploadSink::finish`].
    pub async fn upload(&self, key: &str, shape: UploadShape) -> Result<UploadSink> {
        let writer = self
            .access()
            .op
            .writer_with(key)
            .chunk(shape.part_size.max(1) as usize)
            .concurrent(shape.concurrent.max(1))
            .await?;
        Ok(UploadSink {
            store: self.clone(),
            key: key.to_string(),
            writer,
            crc: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Xz),
            bytes: 0,
        })
    }

    /// Uploads the file at `path` to `key`, read a part at a time; a failure aborts it.
    pub async fn upload_file(
        &self,
        path: &Path,
        key: &str,
        shape: UploadShape,
    ) -> Result<Uploaded> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let mut sink = self.upload(key, shape).await?;
        let piece = shape.part_size.clamp(64 * 1024, 8 * 1024 * 1024) as usize;
        let result = async {
            loop {
                let mut buf = Vec::with_capacity(piece);
                let n = (&mut file).take(piece as u64).read_to_end(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                sink.write(Bytes::from(buf)).await?;
            }
        }
        .await;
        match result {
            Ok(()) => sink.finish().await,
            Err(e) => {
                sink.abort().await;
                Err(e)
            }
        }
    }

    /// HEAD of `key` with the CRC-64 the response declares, if any.
    pub async fn stat_with_crc64(&self, key: &str) -> Result<(super::ObjectMeta, Option<u64>)> {
        self.stats.stat_requests.fetch_add(1, Ordering::Relaxed);
        let (meta, crc) = with_object_crc64(self.access().op.stat(key)).await;
        Ok((super::object_meta(&meta?), crc))
    }

    /// Deletes one object (one already gone is not an error).
    pub async fn delete_object(&self, key: &str) -> Result<()> {
        Ok(self.access().op.delete(key).await?)
    }

    /// Whether `key` is an object.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.access().op.stat(key).await {
            Ok(m) => Ok(!m.is_dir()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object key under `prefix` (ending in `/`), recursively, directory markers left
    /// out; keys are relative to the store's root.
    pub async fn keys_under(&self, prefix: &str) -> Result<Vec<String>> {
        self.stats.list_requests.fetch_add(1, Ordering::Relaxed);
        let mut lister = self.access().op.lister_with(prefix).recursive(true).await?;
        let mut out = Vec::new();
        while let Some(entry) = lister.try_next().await? {
            let key = entry.path();
            if !key.ends_with('/') && !entry.metadata().is_dir() {
                out.push(key.to_string());
            }
        }
        Ok(out)
    }

    /// Whether anything (object or deeper prefix) is listed under `prefix` (ending in `/`).
    pub async fn has_children(&self, prefix: &str) -> Result<bool> {
        self.stats.list_requests.fetch_add(1, Ordering::Relaxed);
        let mut lister = self.access().op.lister_with(prefix).limit(2).await?;
        while let Some(entry) = lister.try_next().await? {
            if entry.path() != prefix {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Deletes `key` (unless empty) and every object under `prefix` (ending in `/`), in
    /// batches where the service has a batch delete (S3 and OSS: up to 1,000 keys a request),
    /// the key in the same batches. Keys already gone are not an error. Returns how many
    /// objects were under the prefix.
    pub async fn delete_key_and_prefix(&self, key: &str, prefix: &str) -> Result<usize> {
        let mut lister = self.access().op.lister_with(prefix).recursive(true).await?;
        let mut under = Vec::new();
        while let Some(entry) = lister.try_next().await? {
            if entry.path() != prefix {
                under.push(entry.path().to_string());
            }
        }
        let n = under.iter().filter(|k| !k.ends_with('/')).count();
        let mut deleter = self.access().op.deleter().await?;
        for k in (!key.is_empty())
            .then(|| key.to_string())
            .into_iter()
            .chain(under)
        {
            deleter.delete(k).await?;
        }
        deleter.close().await?;
        Ok(n)
    }
}
