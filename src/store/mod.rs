//! The object store: the one door every byte from a bucket comes through.
//!
//! [`Store`] wraps an OpenDAL [`Operator`] (built in [`operator`]) for `s3`, `oss` or `fs`,
//! with OpenDAL's retry layer (exponential backoff with jitter; it also resumes a body that
//! breaks mid-stream) and timeout layer around it. On top it adds what OpenDAL's layers don't
//! give us: the byte-rate [`RateLimiter`]s (OpenDAL's ThrottleLayer only limits writes) and
//! byte/request counters. Every read of object data ends in [`Store::open_range`]: the
//! block cache (FUSE reads, prefetch) through `read_range_into`, populate through
//! `read_range_chunks` and `open_range`, Argo's OpenStream through `read_range`; nothing
//! else may read object data, so the limiter and counters see everything. Every read is pinned to the [`Version`] its caller listed, so no reader
//! ever gets bytes of two versions of one object (see [`version`]).
//!
//! This module owns: building operators (and swapping them when credentials rotate),
//! preflight checks with clear errors, LIST with a delimiter, ranged reads pinned to a
//! version. It must not cache (that is
//! [`crate::cache`]) nor decide what to read ahead (that is [`crate::prefetch`]).

pub mod credentials;
pub mod multipart;
pub mod objects;
pub mod operator;
pub mod response;
pub mod url;
pub mod version;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use opendal::{EntryMode, ErrorKind, Operator};

pub use credentials::{Credentials, Rrsa, Secret};
pub use url::{Scheme, SourceUrl};
pub use version::Version;

use crate::error::{Error, Result};
use crate::limit::{Admitted, RateLimiter, Ticket};

/// Everything needed to reach a source.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub source: SourceUrl,
    /// Endpoint URL; `None` means the provider default (AWS, or OSS from `region`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Credentials,
    /// Attempts for a transient failure (5xx, reset, timeout) before giving up.
    pub max_retries: usize,
    /// Whether the process's own identity may be used when `credentials` has none: for S3
    /// the AWS config files and instance metadata. True for the CLI; false in the CSI
    /// plugin, which must never lend the node's identity to a user's volume.
    pub ambient_credentials: bool,
}

impl StoreConfig {
    /// A config with credentials from the environment and default retries.
    pub fn new(source: SourceUrl, endpoint: Option<String>, region: Option<String>) -> Self {
        let credentials = Credentials::from_env(source.scheme);
        StoreConfig {
            source,
            endpoint,
            region,
            credentials,
            max_retries: 5,
            ambient_credentials: true,
        }
    }
}

/// Size, modification time and version tag of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub mtime: Option<SystemTime>,
    /// ETag when the store has one; identifies the content for caching and pinning.
    pub etag: Option<String>,
}

impl ObjectMeta {
    /// The version reads of this object are pinned to.
    pub fn version(&self) -> Version {
        Version::of(self.etag.as_deref(), self.size, self.mtime)
    }
}

/// One child of a listed directory. `name` is a single path component, not yet checked
/// for being a valid file name (that is the file system's job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    File { name: String, meta: ObjectMeta },
    Dir { name: String },
}

#[cfg(test)]
impl Listed {
    /// A one-byte object named `name`, with no mtime or ETag: for tests of what a
    /// listing becomes.
    pub fn test_file(name: &str) -> Self {
        Listed::File {
            name: name.into(),
            meta: ObjectMeta {
                size: 1,
                mtime: None,
                etag: None,
            },
        }
    }
}

/// Most items [`Store::list_dir_batches`] hands on at once.
pub const LIST_BATCH: usize = 1000;

/// What one entry of a listing of directory `dir` is, relative to `dir`; `None` for the
/// directory itself (its marker object) and for paths outside it.
fn listed(dir: &str, entry: &opendal::Entry) -> Option<Listed> {
    let rel = entry.path().strip_prefix(dir)?;
    if rel.is_empty() || rel == "/" {
        return None;
    }
    let meta = entry.metadata();
    Some(if meta.mode() == EntryMode::DIR || rel.ends_with('/') {
        Listed::Dir {
            name: rel.trim_end_matches('/').to_string(),
        }
    } else {
        Listed::File {
            name: rel.to_string(),
            meta: object_meta(meta),
        }
    })
}

/// One range as the network delivered it.
#[derive(Debug, Default)]
pub struct RangeChunks {
    pub chunks: Vec<Bytes>,
    pub len: u64,
    /// CRC-64/XZ of these bytes, taken as they arrived.
    pub crc64: u64,
    /// The CRC-64 the response declared for the whole object.
    pub declared_crc64: Option<u64>,
}

/// Counters of what the store was asked for and what it delivered.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub get_requests: AtomicU64,
    pub list_requests: AtomicU64,
    pub stat_requests: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// A source bucket prefix (or directory) with its limiters and counters. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Everything that depends on the credentials, replaced whole by
    /// [`Store::rotate_credentials`]; every request takes the current one.
    access: Arc<std::sync::RwLock<Arc<Access>>>,
    source: SourceUrl,
    endpoint: String,
    limiters: Arc<[Arc<RateLimiter>]>,
    /// This store's share of its limiters (see `limit.rs`): a node cap is divided between
    /// stores (volumes) first. Clones are the same flow.
    flow: u64,
    stats: Arc<StoreStats>,
}

/// What a store's requests are signed with.
struct Access {
    op: Operator,
    /// The same operator without retries: preflight must fail fast and say why.
    op_no_retry: Operator,
    /// Who reads: see [`Store::principal`].
    principal: Arc<str>,
    /// What the store was built from, for the multipart client (built on first use).
    config: Arc<StoreConfig>,
    multipart: std::sync::OnceLock<std::result::Result<Arc<multipart::Client>, String>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("source", &self.source)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Access {
    /// The operators for `cfg`, and the endpoint they talk to.
    fn build(cfg: &StoreConfig) -> Result<(Access, String)> {
        let built = operator::build(cfg)?;
        Ok((
            Access {
                op: built.op,
                op_no_retry: built.op_no_retry,
                principal: principal(cfg).into(),
                config: Arc::new(cfg.clone()),
                multipart: Default::default(),
            },
            built.endpoint,
        ))
    }
}

/// What the preflight found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preflight {
    /// Nothing is stored under the source prefix (no object, no sub-prefix).
    pub empty: bool,
}

/// Flow numbers of stores (each [`Store::new`] is a flow of its limiters).
static NEXT_FLOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Store {
    /// Builds the store. `limiters` are all applied to every byte read (e.g. the mount's own
    /// cap and the node-wide cap); pass an empty vec for no limit.
    pub fn new(cfg: &StoreConfig, limiters: Vec<Arc<RateLimiter>>) -> Result<Self> {
        let (access, endpoint) = Access::build(cfg)?;
        Ok(Store {
            access: Arc::new(std::sync::RwLock::new(Arc::new(access))),
            source: cfg.source.clone(),
            endpoint,
            limiters: limiters.into(),
            flow: NEXT_FLOW.fetch_add(1, Ordering::Relaxed),
            stats: Arc::new(StoreStats::default()),
        })
    }

    /// The current credentials' operators and client.
    fn access(&self) -> Arc<Access> {
        self.access
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Signs every request from now on with `credentials` (a rotated secret), once a
    /// preflight with them has worked; on failure nothing changes. Requests under way
    /// finish with the old ones. The principal follows the credentials, so files opened
    /// from now on share cached blocks only with readers of the new principal.
    pub async fn rotate_credentials(&self, credentials: Credentials) -> Result<()> {
        let mut cfg = (*self.access().config).clone();
        cfg.credentials = credentials;
        let probe = Store::new(&cfg, Vec::new())?;
        probe.preflight().await?;
        let fresh = probe.access();
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The multipart-protocol client of this store (S3 and OSS only).
    pub fn multipart(&self) -> Result<Arc<multipart::Client>> {
        let a = self.access();
        a.multipart
            .get_or_init(|| {
                multipart::Client::new(&a.config, &self.endpoint)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::InvalidOption)
    }

    /// This store's place in its limiters' queues, as nobody waits for it in particular.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            flow: self.flow,
            urgent: None,
        }
    }

    /// The limiters every byte sent or received pays.
    pub fn limiters(&self) -> &[Arc<RateLimiter>] {
        &self.limiters
    }

    pub fn source(&self) -> &SourceUrl {
        &self.source
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Who this store reads as, for keys of shared caches: a digest of the access key id,
    /// the RRSA role, or `ambient`/`anonymous`. Never a secret, and not the key id itself.
    /// Two stores with different principals must not share cached object data: one may be
    /// allowed to read what the other is not.
    pub fn principal(&self) -> Arc<str> {
        self.access().principal.clone()
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Checks, before anything is mounted or written, that the bucket (or directory)
    /// exists, the credentials are accepted and the endpoint answers as an object store,
    /// and tells whether the prefix holds anything. Two LISTs of at most one key (OpenDAL's,
    /// whose errors say most, then [`multipart::Client::probe_listing`], which checks the
    /// answer's shape); no retries, so an unreachable endpoint fails in seconds.
    pub async fn preflight(&self) -> Result<Preflight> {
        if self.source.scheme == Scheme::File {
            let dir = &self.source.prefix;
            return match std::fs::read_dir(dir) {
                Ok(mut entries) => Ok(Preflight {
                    empty: entries.next().is_none(),
                }),
                _ => Err(Error::DirectoryNotFound(dir.clone())),
            };
        }
        let res = async {
            let mut lister = self.access().op_no_retry.lister_with("/").limit(1).await?;
            lister.try_next().await
        }
        .await;
        if let Err(e) = res {
            return Err(self.explain(e));
        }
        // OpenDAL took the answer for a listing; make sure it was one (an HTML page is an
        // empty listing to it), and learn whether the prefix holds anything. The probe
        // signs with its own client, which does not know every credential source OpenDAL
        // does (an ECS RAM role for OSS): a refusal of the probe after OpenDAL's LIST
        // worked says nothing about the source, so only a 200 that is no listing fails.
        match self
            .multipart()
            .map(|c| async move { c.probe_listing().await })
        {
            Ok(probe) => match probe.await {
                Ok(any) => Ok(Preflight { empty: !any }),
                Err(e @ Error::NotAStore { .. }) => Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "the listing probe could not tell; taking the source as not empty");
                    Ok(Preflight { empty: false })
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "no listing probe for this store");
                Ok(Preflight { empty: false })
            }
        }
    }

    /// Turns an OpenDAL error of a preflight into one a user can act on.
    fn explain(&self, e: opendal::Error) -> Error {
        let text = e.to_string();
        match e.kind() {
            ErrorKind::NotFound => Error::BucketNotFound {
                bucket: self.source.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            ErrorKind::PermissionDenied => Error::AccessDenied {
                what: format!("{} at {}", self.source, self.endpoint),
                hint: match self.source.scheme {
                    _ if &*self.principal() == "anonymous" => {
                        "the bucket refuses unsigned requests; give credentials".into()
                    }
                    Scheme::Oss => "ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET or RRSA".into(),
                    _ => "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY".into(),
                },
            },
            _ if text.contains("NoSuchBucket") => Error::BucketNotFound {
                bucket: self.source.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            _ if text.contains("SignatureDoesNotMatch")
                || text.contains("InvalidAccessKeyId")
                || text.contains("AccessDenied") =>
            {
                Error::AccessDenied {
                    what: format!("{} at {}", self.source, self.endpoint),
                    hint: "the store rejected the signature".into(),
                }
            }
            _ if e.is_temporary()
                || text.contains("send http request")
                || text.contains("connect") =>
            {
                Error::Unreachable {
                    endpoint: self.endpoint.clone(),
                    reason: root_cause(&e),
                }
            }
            _ => Error::Store(e),
        }
    }

    /// Lists the direct children of directory `dir` (`""` for the root, else ending in `/`):
    /// one paginated LIST with delimiter `/`, handed on as it arrives. Each item of the
    /// stream is a batch: what the store had answered when the next answer was not yet in
    /// (one LIST page, usually; at most [`LIST_BATCH`] items), so a caller can use the
    /// first page while the next ones are fetched. Objects ending in `/` (directory
    /// markers) and common prefixes both come back as [`Listed::Dir`]; the directory's own
    /// marker is left out. Batches keep the store's order (S3 and OSS: pages in key
    /// order; within a page OpenDAL hands on the prefixes, then the objects).
    pub fn list_dir_batches(
        &self,
        dir: &str,
    ) -> impl futures::Stream<Item = Result<Vec<Listed>>> + Send + 'static {
        self.stats.list_requests.fetch_add(1, Ordering::Relaxed);
        enum Step {
            Start(Arc<Access>),
            Listing(opendal::Lister),
            Done,
        }
        let dir = dir.to_string();
        futures::stream::try_unfold(Step::Start(self.access()), move |step| {
            let dir = dir.clone();
            async move {
                let mut lister = match step {
                    Step::Done => return Ok(None),
                    Step::Listing(lister) => lister,
                    Step::Start(access) => {
                        let path = if dir.is_empty() { "/" } else { dir.as_str() };
                        access.op.lister_with(path).await?
                    }
                };
                let mut batch = Vec::new();
                loop {
                    // Take what is already in without waiting; wait only with nothing
                    // to hand on.
                    let next = match futures::FutureExt::now_or_never(lister.try_next()) {
                        Some(next) => next?,
                        None if !batch.is_empty() => break,
                        None => lister.try_next().await?,
                    };
                    let Some(entry) = next else {
                        return Ok(Some((batch, Step::Done)));
                    };
                    batch.extend(listed(&dir, &entry));
                    if batch.len() >= LIST_BATCH {
                        break;
                    }
                }
                Ok(Some((batch, Step::Listing(lister))))
            }
        })
        .try_filter(|batch| futures::future::ready(!batch.is_empty()))
    }

    /// Lists every object under the root, recursively (no delimiter, paginated). Names in
    /// the result are keys relative to the root; directory markers come back as
    /// [`Listed::Dir`] so empty directories can be recreated.
    ///
    /// At a bucket's root a key beginning with `/` keeps it (OpenDAL would list `/etc/x` as
    /// `etc/x`, which is another key): such a name is unsafe, and a fill refuses it.
    pub async fn list_recursive(&self) -> Result<Vec<Listed>> {
        let (out, slash_keys) = response::with_slash_keys(self.list_recursive_stripped()).await;
        let mut out = out?;
        if self.source.prefix.is_empty() {
            for key in slash_keys {
                // The first entry listed under the stripped name is this key's.
                let stripped = &key[1..];
                if let Some(Listed::File { name, .. } | Listed::Dir { name }) = out
                    .iter_mut()
                    .find(|l| matches!(l, Listed::File { name, .. } | Listed::Dir { name } if name == stripped))
                {
                    *name = key;
                }
            }
        }
        Ok(out)
    }

    async fn list_recursive_stripped(&self) -> Result<Vec<Listed>> {
        self.stats.list_requests.fetch_add(1, Ordering::Relaxed);
        let mut lister = self.access().op.lister_with("/").recursive(true).await?;
        let mut out = Vec::new();
        while let Some(entry) = lister.try_next().await? {
            out.extend(listed("", &entry));
        }
        Ok(out)
    }

    /// HEAD of one object.
    pub async fn stat(&self, key: &str) -> Result<ObjectMeta> {
        self.stats.stat_requests.fetch_add(1, Ordering::Relaxed);
        Ok(object_meta(&self.access().op.stat(key).await?))
    }

    /// Reads `range` of version `version` of `key` with one ranged GET, paying every chunk
    /// to the limiters as it arrives (so the network, not just the caller, is paced). Errors
    /// if the store returns fewer bytes than asked for, or holds another version.
    pub async fn read_range(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<Bytes> {
        let want = (range.end - range.start) as usize;
        Ok(self
            .read_range_into(key, version, range, BytesMut::with_capacity(want))
            .await?
            .freeze())
    }

    /// [`read_range`](Self::read_range) into a buffer the caller provides (cleared first),
    /// so a caller can reuse its buffers.
    pub async fn read_range_into(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
        mut out: BytesMut,
    ) -> Result<BytesMut> {
        out.clear();
        out.reserve((range.end - range.start) as usize);
        self.read_each(key, version, range, |chunk| out.extend_from_slice(&chunk))
            .await?;
        Ok(out)
    }

    /// Reads `range` of `key` as the chunks the network delivered, without copying them
    /// into one buffer (a copier writes them with one `pwritev`). The CRC-64 of these
    /// bytes is taken chunk by chunk as they arrive, while they are still in the CPU's
    /// cache, and returned with the one the response declared for the object, if any.
    pub async fn read_range_chunks(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<RangeChunks> {
        let mut chunks = Vec::new();
        let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Xz);
        let (res, declared) = response::with_object_crc64(async {
            self.read_each(key, version, range.clone(), |chunk| {
                crc.update(&chunk);
                chunks.push(chunk);
            })
            .await
        })
        .await;
        res?;
        Ok(RangeChunks {
            len: range.end - range.start,
            chunks,
            crc64: crc.finalize(),
            declared_crc64: declared,
        })
    }

    /// One ranged GET, each chunk paid to the limiters and handed to `sink` as it arrives;
    /// fails unless exactly the range's length arrived.
    async fn read_each(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
        mut sink: impl FnMut(Bytes),
    ) -> Result<()> {
        let mut reader = self.open_range(key, version, range).await?;
        while let Some(chunk) = reader.next_chunk().await? {
            sink(chunk);
        }
        Ok(())
    }

    /// Starts reading `range` of version `version` of `key`, whose chunks the caller pulls
    /// with [`RangeReader::next_chunk`] (a copier writes them as they come). Run it inside
    /// [`response::with_object_crc64`] to learn the CRC-64 the response declares.
    ///
    /// Unlimited, this is one ranged GET. Under a cap, the range is read as consecutive GETs
    /// of at most [`RateLimiter::max_request`] bytes, each sent only once the limiters admit
    /// its bytes (see `limit.rs`): the server is never more than a horizon ahead of the cap.
    ///
    /// An ETag is sent as `If-Match` (where the service supports it: S3, OSS); a changed
    /// object then fails the read with [`version::changed`] true, before any byte of it.
    pub async fn open_range(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<RangeReader> {
        let piece = self
            .limiters
            .iter()
            .filter_map(|l| l.max_request())
            .min()
            .unwrap_or(u64::MAX);
        let range_is_empty = range.is_empty();
        let mut reader = RangeReader {
            store: self.clone(),
            key: key.to_string(),
            version: version.clone(),
            requested: range.start,
            range,
            piece,
            stream: None,
            admitted: Vec::new(),
            ticket: Ticket {
                flow: self.flow,
                urgent: crate::limit::current_urgency(),
            },
            pending: Default::default(),
            got: 0,
            finished: range_is_empty,
        };
        // The first GET now, so that a missing or changed object fails the open.
        reader.request_next().await?;
        Ok(reader)
    }

    /// One ranged GET of `range` (not empty), pinned to `version` where the service can.
    async fn get(
        &self,
        key: &str,
        version: &Version,
        range: Range<u64>,
    ) -> Result<opendal::BufferStream> {
        self.stats.get_requests.fetch_add(1, Ordering::Relaxed);
        let access = self.access();
        let mut read = access.op.reader_with(key);
        if let Version::ETag(etag) = version
            && access.op.info().capability().read_with_if_match
        {
            read = read.if_match(etag);
        }
        let stream = async { read.await?.into_stream(range).await }.await;
        stream.map_err(|e| self.read_error(key, version, e))
    }

    /// A failed read's error; a failed condition says which object changed, in words.
    fn read_error(&self, key: &str, version: &Version, e: opendal::Error) -> Error {
        if e.kind() == ErrorKind::ConditionNotMatch {
            tracing::debug!(key, error = %e, "read refused: the object changed");
            return version::changed_error(key, version, "the store answers 412 to If-Match");
        }
        Error::Store(e)
    }

    /// For a store without ETags: fails unless `key` still has the size and modification
    /// time it was listed with. Run after a range has been read, so a change before or
    /// during the read shows.
    async fn check_unchanged(&self, key: &str, version: &Version) -> Result<()> {
        let Version::Stat { size, mtime } = version else {
            return Ok(());
        };
        let now = self.stat(key).await?;
        if now.size != *size || now.mtime != Some(*mtime) {
            let detail = match now.version() {
                Version::Any => "now without a modification time".to_string(),
                v => format!("now {v}"),
            };
            return Err(version::changed_error(key, version, &detail));
        }
        Ok(())
    }
}

/// The chunks of one range, pulled one at a time; see [`Store::open_range`].
pub struct RangeReader {
    store: Store,
    key: String,
    version: Version,
    range: Range<u64>,
    /// Where the next GET starts; `range.end` once every byte has been asked for.
    requested: u64,
    /// The most one GET asks for.
    piece: u64,
    /// The GET being read.
    stream: Option<opendal::BufferStream>,
    /// The current GET's bytes not yet paid, per capped limiter.
    admitted: Vec<Admitted>,
    /// Who the GETs are for, in the limiters' queues: this store's flow, and whether a
    /// reader waits (set by [`crate::limit::with_urgency`] around the read).
    ticket: Ticket,
    pending: std::collections::VecDeque<Bytes>,
    got: u64,
    /// Every byte arrived and was checked (or the range was empty).
    finished: bool,
}

impl RangeReader {
    /// Sends the next GET of the range, once every limiter admits its bytes. Nothing when
    /// every byte has been asked for.
    async fn request_next(&mut self) -> Result<()> {
        if self.requested >= self.range.end {
            return Ok(());
        }
        let next = self.requested
            ..self
                .range
                .end
                .min(self.requested.saturating_add(self.piece));
        let len = next.end - next.start;
        self.admitted.clear();
        for limiter in self.store.limiters.iter() {
            if let Some(a) = limiter.admit(len, &self.ticket).await {
                self.admitted.push(a);
            }
        }
        self.stream = Some(
            self.store
                .get(&self.key, &self.version, next.clone())
                .await?,
        );
        self.requested = next.end;
        Ok(())
    }

    /// The next chunk, paid to the limiters; `None` at the end, which is an error unless
    /// exactly the range's length arrived from the version the read was pinned to.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(Some(c));
            }
            if self.finished {
                return Ok(None);
            }
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let next = stream.try_next().await;
            let next = next.map_err(|e| self.store.read_error(&self.key, &self.version, e))?;
            let Some(buf) = next else {
                // This GET is over: it must have brought all it asked for.
                self.stream = None;
                self.admitted.clear();
                if self.range.start + self.got != self.requested {
                    break;
                }
                self.request_next().await?;
                continue;
            };
            let n = buf.len() as u64;
            for limiter in self.store.limiters.iter() {
                limiter.acquire_for(n, &self.ticket).await;
            }
            for a in &mut self.admitted {
                a.paid(n);
            }
            self.store.stats.bytes_read.fetch_add(n, Ordering::Relaxed);
            self.got += n;
            self.pending
                .extend(buf.into_iter().filter(|c| !c.is_empty()));
        }
        let want = self.range.end - self.range.start;
        if self.got != want {
            return Err(Error::ShortRead {
                key: self.key.clone(),
                offset: self.range.start,
                expected: want,
                got: self.got,
            });
        }
        self.store.check_unchanged(&self.key, &self.version).await?;
        self.finished = true;
        Ok(None)
    }
}

fn principal(cfg: &StoreConfig) -> String {
    use md5::Digest;
    let c = &cfg.credentials;
    match (&c.access_key_id, &c.rrsa) {
        (Some(id), _) => {
            let d = format!("{:x}", md5::Md5::digest(id.expose().as_bytes()));
            format!("key:{}", &d[..16])
        }
        (None, Some(r)) => format!("role:{}", r.role_arn),
        (None, None) if cfg.ambient_credentials => "ambient".into(),
        (None, None) => "anonymous".into(),
    }
}

fn object_meta(meta: &opendal::Metadata) -> ObjectMeta {
    ObjectMeta {
        size: meta.content_length(),
        mtime: meta.last_modified().map(SystemTime::from),
        // Not the version id: reads are pinned with If-Match, which compares ETags.
        etag: meta.etag().map(str::to_string),
    }
}

/// The innermost cause of an error, for one-line messages ("connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ak: Option<&str>, rrsa: Option<&str>, ambient: bool) -> Store {
        let mut cfg = StoreConfig::new(
            SourceUrl::parse("s3://bucket/p/").unwrap(),
            Some("http://127.0.0.1:1".into()),
            None,
        );
        cfg.ambient_credentials = ambient;
        cfg.credentials = Credentials {
            access_key_id: ak.map(Secret::new),
            secret_access_key: ak.map(|_| Secret::new("s")),
            session_token: None,
            rrsa: rrsa.map(|r| Rrsa {
                role_arn: r.into(),
                oidc_provider_arn: "p".into(),
                oidc_token_file: "/t".into(),
            }),
        };
        Store::new(&cfg, Vec::new()).unwrap()
    }

    #[test]
    fn principals_tell_readers_apart_without_naming_keys() {
        let a = store(Some("AKIDAAAA"), None, true);
        assert_eq!(
            a.principal(),
            store(Some("AKIDAAAA"), None, false).principal()
        );
        assert_ne!(
            a.principal(),
            store(Some("AKIDBBBB"), None, true).principal()
        );
        assert!(a.principal().starts_with("key:") && !a.principal().contains("AKID"));
        assert_eq!(
            &*store(None, Some("acs:ram::1:role/r"), false).principal(),
            "role:acs:ram::1:role/r"
        );
        assert_eq!(&*store(None, None, false).principal(), "anonymous");
        assert_eq!(&*store(None, None, true).principal(), "ambient");
    }
}
