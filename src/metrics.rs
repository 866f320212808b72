//! Prometheus metrics of the long-running commands (`fillfs_` prefix) and the small HTTP
//! server every one of them uses (`/metrics`, `/healthz`, `/readyz`).
//!
//! The read path (`fillfs mount`, `fillfs csi`) is exposed by [`ReadPathMetrics`], a
//! collector that reads, at each scrape, the counters the data path keeps anyway (the
//! store's [`StoreStats`](crate::store::StoreStats), the cache's
//! [`CacheStats`](crate::cache::CacheStats), each limiter's wait time, each file system's
//! read-latency histogram): nothing on the data path knows about Prometheus, and a scrape
//! costs a few atomic loads. Names and style are the controller's
//! ([`crate::controller::metrics`]). This module must not change what it reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::BlockCache;
use crate::limit::RateLimiter;
use crate::store::Store;

/// What an HTTP metrics server shows.
pub trait Exposition: Send + Sync + 'static {
    /// The text exposition format.
    fn render(&self) -> String;
    /// `None` when ready; else what is wrong (`/readyz` answers 503 with it).
    fn readiness_problem(&self) -> Option<String> {
        None
    }
}

/// A registry with the `fillfs` prefix, rendered as OpenMetrics text.
impl Exposition for Registry {
    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, self)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The read-latency histogram of one file system: 100 µs to about 13 s.
pub fn read_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// One source of read-path numbers: a mount, or one CSI volume published for one pod.
struct Source {
    volume: String,
    pod: String,
    store: Store,
    /// The limiters only this source pays, with their label (`mount` or `volume`).
    limiters: Vec<(&'static str, Arc<RateLimiter>)>,
    read_latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    volume: String,
    pod: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimiterLabel {
    volume: String,
    pod: String,
    limiter: &'static str,
}

/// The read path's numbers, read at each scrape. One per process: one block cache, the
/// limiters every source pays (the CSI node cap), and the sources by key (a CSI target
/// path; `""` for `fillfs mount`), each labelled with its volume id and pod (empty for a
/// mount).
pub struct ReadPathMetrics {
    cache: BlockCache,
    shared_limiters: Vec<(&'static str, Arc<RateLimiter>)>,
    sources: Mutex<BTreeMap<String, Source>>,
}

impl std::fmt::Debug for ReadPathMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPathMetrics").finish_non_exhaustive()
    }
}

impl ReadPathMetrics {
    pub fn new(cache: BlockCache, shared_limiters: Vec<(&'static str, Arc<RateLimiter>)>) -> Self {
        ReadPathMetrics {
            cache,
            shared_limiters,
            sources: Default::default(),
        }
    }

    /// Starts showing the source `key` (a CSI target path, or `""`) as `volume` of `pod`:
    /// its store's requests and bytes, the limiters only it pays, and its reads' latency.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        key: &str,
        volume: &str,
        pod: &str,
        store: Store,
        limiters: Vec<(&'static str, Arc<RateLimiter>)>,
        read_latency: Histogram,
    ) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.to_string(),
                Source {
                    volume: volume.to_string(),
                    pod: pod.to_string(),
                    store,
                    limiters,
                    read_latency,
                },
            );
    }

    /// Stops showing the source `key` (unpublished).
    pub fn remove(&self, key: &str) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// A registry (prefix `fillfs`) with these metrics, ready for [`serve`].
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("fillfs");
        r.register_collector(Box::new(self.clone()));
        r
    }
}

/// One counter family: `values` are its label sets and their values (u64 or f64).
fn counter<N>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(impl EncodeLabelSet, N)],
) -> std::fmt::Result
where
    N: prometheus_client::encoding::EncodeCounterValue + Copy + std::fmt::Debug,
{
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ReadPathMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let vol = |s: &Source| VolumeLabel {
            volume: s.volume.clone(),
            pod: s.pod.clone(),
        };

        let mut requests = Vec::new();
        let mut bytes = Vec::new();
        let mut waits = Vec::new();
        for s in sources.values() {
            let st = s.store.stats();
            for (op, n) in [
                ("get", st.get_requests.load(Relaxed)),
                ("list", st.list_requests.load(Relaxed)),
                ("stat", st.stat_requests.load(Relaxed)),
            ] {
                requests.push((
                    OpLabel {
                        volume: s.volume.clone(),
                        pod: s.pod.clone(),
                        op,
                    },
                    n,
                ));
            }
            bytes.push((vol(s), st.bytes_read.load(Relaxed)));
            for (name, l) in &s.limiters {
                waits.push((
                    LimiterLabel {
                        volume: s.volume.clone(),
                        pod: s.pod.clone(),
                        limiter: name,
                    },
                    l.waited().as_secs_f64(),
                ));
            }
        }
        for (name, l) in &self.shared_limiters {
            waits.push((
                LimiterLabel {
                    volume: String::new(),
                    pod: String::new(),
                    limiter: name,
                },
                l.waited().as_secs_f64(),
            ));
        }
        counter(
            &mut e,
            "store_requests",
            "Requests sent to the object store, by operation (retries included)",
            &requests,
        )?;
        counter(
            &mut e,
            "store_read_bytes",
            "Object bytes received from the store",
            &bytes,
        )?;
        counter(
            &mut e,
            "limiter_wait_seconds",
            "Time reads waited for a throughput limiter (mount, volume or node cap)",
            &waits,
        )?;

        let c = self.cache.stats();
        for (name, help, v) in [
            (
                "cache_hits",
                "Block reads served from the cache",
                c.hits.load(Relaxed),
            ),
            (
                "cache_misses",
                "Block reads fetched from the store",
                c.misses.load(Relaxed),
            ),
            (
                "cache_evictions",
                "Blocks evicted from the cache to make room",
                c.evictions.load(Relaxed),
            ),
        ] {
            let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let m = e.encode_descriptor(
            "cache_bytes",
            "Bytes of blocks held in the cache",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.cache.weighted_size() as i64).encode(m)?;

        let mut m = e.encode_descriptor(
            "read_duration_seconds",
            "Time to answer one read of a file (FUSE READ)",
            None,
            MetricType::Histogram,
        )?;
        for s in sources.values() {
            s.read_latency.encode(m.encode_family(&vol(s))?)?;
        }
        Ok(())
    }
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<dyn Exposition>) -> std::io::Result<()> {
    serve_on(tokio::net::TcpListener::bind(addr).await?, metrics).await
}

/// Binds `addr` now (a taken port is the caller's start-up error, not a log line later)
/// and serves `metrics` there from a task of its own.
pub async fn spawn(addr: SocketAddr, metrics: Arc<dyn Exposition>) -> crate::error::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::error::Error::InvalidOption(format!("--metrics-addr {addr}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = serve_on(listener, metrics).await {
            tracing::error!(%addr, error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// [`serve`] on a listener already bound (so a taken port is the caller's error at start).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<dyn Exposition>,
) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = match req.uri().path() {
                            "/metrics" => Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.render()))),
                            "/healthz" => Response::builder().body(Full::new(Bytes::from("ok\n"))),
                            "/readyz" => match metrics.readiness_problem() {
                                None => Response::builder().body(Full::new(Bytes::from("ok\n"))),
                                Some(p) => Response::builder()
                                    .status(StatusCode::SERVICE_UNAVAILABLE)
                                    .body(Full::new(Bytes::from(format!("{p}\n")))),
                            },
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from("not found\n"))),
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("static response"))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

/// Parses `--metrics-addr`: an address to listen on, or `none` (or empty) for no server.
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "none" | "" => Ok(None),
        s => s.parse().map(Some).map_err(|e| {
            format!("--metrics-addr {s:?}: {e} (expected HOST:PORT such as 0.0.0.0:9810, or none)")
        }),
    }
}
