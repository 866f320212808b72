//! `fillfs mount`: wires store → limiter → cache/prefetch → FUSE for one source and runs it.
//! Owns the sizing rules (how `--cache-size` is split) and the start-up order (preflight
//! before mounting). The CLI in `main.rs` only parses arguments into [`MountOptions`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::fs::{Fs, FsConfig};
use crate::fuse::{self, MountConfig};
use crate::limit::RateLimiter;
use crate::prefetch::PrefetchBudget;
use crate::store::{Store, StoreConfig};

/// Everything `fillfs mount` needs.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub store: StoreConfig,
    pub mountpoint: PathBuf,
    /// MiB/s for all store reads of this mount; 0 = unlimited.
    pub throughput_mib: f64,
    /// All memory for cached and prefetched data, in bytes.
    pub cache_size: u64,
    pub block_size: u64,
    pub metadata_ttl: Duration,
    pub allow_other: bool,
    pub uid: u32,
    pub gid: u32,
    pub fuse_threads: usize,
    /// Kernel read-ahead per file, bytes (0 = kernel default).
    pub kernel_read_ahead: u64,
    /// Mount a source with nothing under it (else refused as a likely typo).
    pub allow_empty: bool,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// How `--cache-size` is spent: half for the block cache, half for read-ahead not yet
/// consumed. Together they bound the data memory of the process.
pub fn split_cache_size(cache_size: u64, block_size: u64) -> Result<(u64, u64)> {
    if cache_size < 4 * block_size {
        return Err(Error::InvalidOption(format!(
            "--cache-size {} is too small: it must hold at least 4 blocks of {} (lower --block-size or raise --cache-size)",
            bytesize::ByteSize(cache_size).display().iec(),
            bytesize::ByteSize(block_size).display().iec()
        )));
    }
    Ok((cache_size / 2, cache_size / 2))
}

/// Builds the file system for `opts` (no mount yet). Must run inside a tokio runtime.
pub fn build_fs(opts: &MountOptions) -> Result<Arc<Fs>> {
    let (cache_bytes, budget_bytes) = split_cache_size(opts.cache_size, opts.block_size)?;
    let limiters = RateLimiter::for_throughput(opts.throughput_mib);
    let store = Store::new(&opts.store, limiters)?;
    let cache = BlockCache::new(cache_bytes, opts.block_size);
    let budget = PrefetchBudget::new(budget_bytes);
    let config = FsConfig {
        metadata_ttl: opts.metadata_ttl,
        // One handle may use at most half the read-ahead budget, so two streams always fit.
        max_prefetch_window: (budget_bytes / 2)
            .min(256 * 1024 * 1024)
            .max(opts.block_size),
        uid: opts.uid,
        gid: opts.gid,
        file_mode: 0o644,
        dir_mode: 0o755,
    };
    Ok(Arc::new(Fs::new(store, cache, budget, config)))
}

/// Checks the source, mounts, calls `on_mounted`, and serves until unmounted.
pub fn run(opts: &MountOptions, on_mounted: impl FnOnce()) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fillfs-io")
        .build()?;
    let fs = rt.block_on(async {
        let fs = build_fs(opts)?;
        let found = fs.store().preflight().await?;
        if found.empty && !opts.allow_empty {
            return Err(Error::EmptySource {
                source_url: opts.store.source.to_string(),
                allow: "pass --allow-empty to mount it anyway".into(),
            });
        }
        if let Some(addr) = opts.metrics_addr {
            let metrics = Arc::new(crate::metrics::ReadPathMetrics::new(
                fs.cache().clone(),
                Vec::new(),
            ));
            let limiters = fs
                .store()
                .limiters()
                .iter()
                .map(|l| ("mount", l.clone()))
                .collect();
            metrics.add(
                "",
                "",
                "",
                fs.store().clone(),
                limiters,
                fs.read_latency().clone(),
            );
            crate::metrics::spawn(addr, Arc::new(metrics.registry())).await?;
        }
        Ok::<_, Error>(fs)
    })?;
    tracing::info!(
        source = %opts.store.source,
        endpoint = fs.store().endpoint(),
        credentials = %opts.store.credentials.describe(),
        throughput_mib = opts.throughput_mib,
        cache_size = %bytesize::ByteSize(opts.cache_size).display().iec(),
        block_size = %bytesize::ByteSize(opts.block_size).display().iec(),
        "source reachable"
    );
    let cfg = MountConfig {
        fs_name: format!("fillfs:{}", opts.store.source),
        allow_other: opts.allow_other,
        threads: opts.fuse_threads,
        kernel_read_ahead: opts.kernel_read_ahead,
    };
    let result = fuse::mount(fs.clone(), &rt, &opts.mountpoint, &cfg, on_mounted);
    let s = fs.store().stats();
    let c = fs.cache().stats();
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        get_requests = s.get_requests.load(Relaxed),
        list_requests = s.list_requests.load(Relaxed),
        bytes_read = s.bytes_read.load(Relaxed),
        cache_hits = c.hits.load(Relaxed),
        cache_misses = c.misses.load(Relaxed),
        "store traffic of this mount"
    );
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}
