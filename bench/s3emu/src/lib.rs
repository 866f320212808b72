//! s3emu: a fast, in-memory S3-protocol server on loopback for fillfs tests
//! and benchmarks.
//!
//! This module owns the public API: [`Config`], and the [`Emulator`] handle
//! that runs the server on its own multi-thread tokio runtime in a background
//! thread, seeds data directly, turns the emulation knobs (latency, bandwidth
//! cap, faults) and reads the counters. It is sync-friendly: plain `#[test]`
//! functions can use it without a runtime of their own.
//!
//! ```no_run
//! let emu = s3emu::Emulator::start(s3emu::Config::default()).unwrap();
//! emu.create_bucket("data");
//! emu.put_object("data", "dir/file", bytes::Bytes::from_static(b"hello"));
//! println!("{}", emu.endpoint()); // http://127.0.0.1:PORT, path-style, SigV4
//! ```

mod body;
mod emulation;
mod s3;
mod server;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::oneshot;

pub use crate::emulation::{Faults, PartFaults, Stats};
pub use crate::store::MIN_PART_SIZE;

use crate::emulation::Knobs;
use crate::s3::Shared;
use crate::store::Object;

/// Server configuration. Everything but `listen`, the credentials, the region
/// and the seed can also be changed at runtime through the [`Emulator`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Default `127.0.0.1:0` (an ephemeral port; see [`Emulator::endpoint`]).
    pub listen: SocketAddr,
    /// Default `fillfs`.
    pub access_key: String,
    /// Default `fillfs-secret`.
    pub secret_key: String,
    /// Default `us-east-1`. Reported by HeadBucket / GetBucketLocation; SigV4
    /// signatures are accepted for any region in the credential scope.
    pub region: String,
    /// Slept before every response. Default zero.
    pub first_byte_latency: Duration,
    /// Bytes per second cap on each GET body stream. Default `None` (unlimited).
    pub per_connection_bandwidth: Option<u64>,
    /// Seed of the RNG that drives probabilistic faults. Default 0.
    pub seed: u64,
    /// Keep parts and objects of 4 MiB or more in memory-mapped files here instead of
    /// the heap (objects over 5 GiB without 5 GiB of RAM). Default `None`.
    pub spill_dir: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_key: "fillfs".to_owned(),
            secret_key: "fillfs-secret".to_owned(),
            region: "us-east-1".to_owned(),
            first_byte_latency: Duration::ZERO,
            per_connection_bandwidth: None,
            seed: 0,
            spill_dir: None,
        }
    }
}

/// A running emulator. Dropping it (or [`Emulator::shutdown`]) stops the
/// server and joins its thread.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    access_key: String,
    secret_key: String,
    shutdown_tx: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Bind, start serving on a background runtime, and return once the
    /// socket is listening (connections made after this returns are served).
    pub fn start(cfg: Config) -> anyhow::Result<Emulator> {
        let std_listener = std::net::TcpListener::bind(cfg.listen)
            .with_context(|| format!("s3emu: binding {}", cfg.listen))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let endpoint = format!("http://{addr}");

        let knobs = Knobs::new(cfg.first_byte_latency, cfg.per_connection_bandwidth);
        let shared = Arc::new(Shared::new(knobs, cfg.seed, cfg.region.clone(), endpoint));
        shared.store.set_spill_dir(cfg.spill_dir.clone());
        let service = server::build_service(Arc::clone(&shared), &cfg.access_key, &cfg.secret_key);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("s3emu-worker")
            .build()
            .context("s3emu: building tokio runtime")?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("s3emu".to_owned())
            .spawn(move || {
                rt.block_on(server::serve(listener, service, shutdown_rx));
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("s3emu: spawning server thread")?;

        Ok(Emulator {
            shared,
            addr,
            access_key: cfg.access_key,
            secret_key: cfg.secret_key,
            shutdown_tx: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT` (path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn region(&self) -> &str {
        &self.shared.region
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Replaces the accepted access keys by this one pair (the old ones are refused from
    /// now on), as a rotated credential does.
    pub fn rotate_key(&self, access_key: &str, secret_key: &str) {
        let mut keys = self.shared.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.clear();
        keys.insert(access_key.to_owned(), secret_key.to_owned());
    }

    /// Create a bucket (no-op if it exists). No name validation.
    pub fn create_bucket(&self, name: &str) {
        self.shared.store.create_bucket(name);
    }

    /// Insert an object directly (ETag = quoted MD5 as for PUT). Creates the
    /// bucket if it does not exist.
    pub fn put_object(&self, bucket: &str, key: &str, data: Bytes) {
        self.shared
            .store
            .put_force(bucket, key, Object::new(data, None, None));
    }

    /// Insert an object directly with the given Last-Modified (seconds since the epoch),
    /// as one written long ago would be.
    pub fn put_object_modified_at(&self, bucket: &str, key: &str, data: Bytes, unix_secs: i64) {
        let mut obj = Object::new(data, None, None);
        obj.last_modified = time::OffsetDateTime::from_unix_timestamp(unix_secs)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        self.shared.store.put_force(bucket, key, obj);
    }

    /// The stored bytes of an object (no copy).
    pub fn object(&self, bucket: &str, key: &str) -> Option<Bytes> {
        self.shared
            .store
            .get(bucket, key)
            .ok()
            .map(|o| o.data.clone())
    }

    /// The stored ETag, quoted as on the wire (`"<md5hex>"` or `"<hex>-N"`).
    pub fn object_etag(&self, bucket: &str, key: &str) -> Option<String> {
        self.shared
            .store
            .get(bucket, key)
            .ok()
            .map(|o| o.etag.clone())
    }

    /// Remove an object; returns whether it existed.
    pub fn delete_object(&self, bucket: &str, key: &str) -> bool {
        self.shared.store.delete(bucket, key).unwrap_or(false)
    }

    /// All keys of a bucket in listing order (empty if the bucket is missing).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        self.shared.store.keys(bucket)
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// [`stats`](Self::stats) for another thread (e.g. a sampler while a client runs).
    pub fn stats_handle(&self) -> impl Fn() -> Stats + Send + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.counters.snapshot()
    }

    pub fn reset_stats(&self) {
        self.shared.counters.reset();
    }

    pub fn latency(&self) -> Duration {
        self.shared.knobs.latency()
    }

    /// Delay before every response (first-byte latency).
    pub fn set_latency(&self, d: Duration) {
        self.shared.knobs.set_latency(d);
    }

    pub fn bandwidth(&self) -> Option<u64> {
        self.shared.knobs.bandwidth()
    }

    /// Bytes/s cap on each GET body stream (`None` or `Some(0)` = unlimited).
    /// Takes effect on streams already in flight too.
    pub fn set_bandwidth(&self, b: Option<u64>) {
        self.shared.knobs.set_bandwidth(b);
    }

    pub fn faults(&self) -> Faults {
        self.shared.knobs.faults()
    }

    /// Probabilistic faults; rates are clamped to `[0, 1]`.
    pub fn set_faults(&self, f: Faults) {
        self.shared.knobs.set_faults(f);
    }

    /// The next `n` GetObject requests (cumulative with earlier calls) answer
    /// 503 SlowDown before any body.
    pub fn fail_next_gets(&self, n: u64) {
        self.shared.knobs.add_fail_next_gets(n);
    }

    /// Cancel pending `fail_next_gets`.
    pub fn clear_fail_next_gets(&self) {
        self.shared.knobs.clear_fail_next_gets();
    }

    /// Every GET of this key (whole or ranged) gets the middle byte of its
    /// body flipped (XOR 0xFF); length and headers are unchanged.
    pub fn corrupt_key(&self, bucket: &str, key: &str) {
        self.shared.knobs.corrupt_key(bucket, key);
    }

    pub fn clear_corrupt_keys(&self) {
        self.shared.knobs.clear_corrupt_keys();
    }

    /// Send the whole object's CRC-64 as `x-oss-hash-crc64ecma` on GET and HEAD, as OSS
    /// does (on by default), or not, as S3 does not.
    pub fn set_declare_crc64(&self, on: bool) {
        self.shared.knobs.set_declare_crc64(on);
    }

    /// Serve unsigned reads (GET and HEAD: objects and listings), as a public-read bucket
    /// does; writes still need a signature. Off by default.
    pub fn set_public_read(&self, on: bool) {
        self.shared.knobs.set_public_read(on);
    }

    /// Stop serving and join the server thread (same as dropping).
    /// Largest PutObject accepted (default 5 GiB, as S3 and OSS); above it EntityTooLarge.
    pub fn set_max_single_put(&self, bytes: u64) {
        self.shared.knobs.set_max_single_put(bytes);
    }

    pub fn set_part_faults(&self, f: PartFaults) {
        self.shared.knobs.set_part_faults(f);
    }

    /// The next `n` UploadParts get one byte flipped on the way in.
    pub fn corrupt_next_parts(&self, n: u64) {
        self.shared.knobs.add_corrupt_next_parts(n);
    }

    /// The first UploadPart of part `number` (of any upload) to arrive gets one byte flipped.
    pub fn corrupt_part_number(&self, number: i32) {
        self.shared.knobs.add_corrupt_part_number(number);
    }

    /// The next `n` UploadParts are answered 5xx after their body is received.
    pub fn fail_next_parts(&self, n: u64) {
        self.shared.knobs.add_fail_next_parts(n);
    }

    /// Open multipart uploads of `bucket` as (key, upload id).
    pub fn open_uploads(&self, bucket: &str) -> Vec<(String, String)> {
        self.shared
            .store
            .list_uploads(bucket, "")
            .map(|v| v.into_iter().map(|u| (u.key, u.upload_id)).collect())
            .unwrap_or_default()
    }

    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
