//! `ArtifactService` over a unix socket: each RPC resolved to a store (one per distinct
//! configuration, kept for the process's life so its limiter and connections are shared)
//! and a key, then done with the store, the upload engine (Save, SaveStream: one
//! `Uploader` per configuration, so its bounds are shared) and the populate engine (Load).
//!
//! Errors go back the way Argo's client reads them: `success: false` (or `error`) with a
//! message naming the key and the cause; a gRPC status only for a malformed request. Argo
//! turns either into a failed step, so IsDirectory answers `false` for a missing key rather
//! than an error (argo-server makes any error a 500). It must not parse configuration
//! (`config.rs`) or move bytes itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::config::PluginConfig;
use super::proto::artifact_service_server::{ArtifactService, ArtifactServiceServer};
use super::proto::*;
use crate::error::{Error, Result};
use crate::limit::RateLimiter;
use crate::populate::{self, PopulateOptions, ProgressMode, TargetKind};
use crate::store::{SourceUrl, Store};
use crate::upload::Uploader;

/// Bytes in one OpenStream frame: well under the 4 MiB a gRPC client accepts by default.
const FRAME: usize = 1024 * 1024;
/// Ranges an OpenStream keeps in flight ahead of the client: 12 × 4 MiB = 48 MiB, enough
/// to keep a store with 20 ms first byte and 50 MiB/s per connection near its ceiling
/// (4 × 8 MiB reached 134 MiB/s there).
const STREAM_WINDOW: usize = 12;
/// Size of those ranges.
const STREAM_RANGE: u64 = 4 * 1024 * 1024;

/// One configuration's store.
#[derive(Clone)]
struct Repo {
    config: PluginConfig,
    store: Store,
    /// Every upload of this repository: one bound on parts in flight and memory.
    uploader: Uploader,
    /// Bytes handed to Argo by Load and OpenStream.
    reads: Arc<ReadCounts>,
}

/// What Load and OpenStream delivered, for the metrics.
#[derive(Default)]
struct ReadCounts {
    load_bytes: std::sync::atomic::AtomicU64,
    stream_bytes: std::sync::atomic::AtomicU64,
}

/// The plugin: stores by configuration.
#[derive(Default)]
pub struct Driver {
    repos: Mutex<HashMap<String, Repo>>,
}

impl Driver {
    /// The store and key of `artifact`, or why there are none.
    fn resolve(&self, artifact: Option<&Artifact>) -> std::result::Result<(Repo, String), String> {
        let plugin = artifact
            .and_then(|a| a.plugin.as_ref())
            .ok_or("the request has no plugin artifact (artifact.plugin)")?;
        let key = plugin.key.trim_start_matches('/').to_string();
        if key.is_empty() || key.split('/').any(|c| c == "." || c == "..") {
            return Err(format!(
                "artifact key {:?} is empty or has . or .. in it",
                plugin.key
            ));
        }
        let mut repos = self.repos.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = repos.get(&plugin.configuration) {
            return Ok((r.clone(), key));
        }
        let config = PluginConfig::parse(&plugin.configuration)?;
        let limiters = RateLimiter::for_throughput(config.throughput_mib);
        let store = Store::new(&config.store, limiters).map_err(|e| e.to_string())?;
        tracing::info!(
            store = %config.store.source,
            endpoint = store.endpoint(),
            credentials = %config.store.credentials.describe(),
            throughput_mib = config.throughput_mib,
            "artifact repository"
        );
        let uploader = Uploader::new(store.clone(), config.upload_options());
        let repo = Repo {
            config,
            store,
            uploader,
            reads: Default::default(),
        };
        repos.insert(plugin.configuration.clone(), repo.clone());
        Ok((repo, key))
    }
}

/// The plugin's Prometheus metrics, read at scrape from each repository's upload and read
/// counters (label `repository`: the store's source URL).
struct DriverMetrics(Arc<Driver>);

impl std::fmt::Debug for DriverMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverMetrics")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RepoLabel {
    repository: String,
}

impl prometheus_client::collector::Collector for DriverMetrics {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use std::sync::atomic::Ordering::Relaxed;
        let repos: Vec<Repo> = {
            let r = self.0.repos.lock().unwrap_or_else(|e| e.into_inner());
            r.values().cloned().collect()
        };
        // One series per source, even if two configurations name the same one.
        let mut by_source: std::collections::BTreeMap<String, [u64; 8]> = Default::default();
        for r in &repos {
            let u = r.uploader.stats();
            let v = by_source.entry(r.store.source().to_string()).or_default();
            for (i, n) in [
                u.bytes_sent.load(Relaxed),
                u.parts_sent.load(Relaxed),
                u.parts_retried.load(Relaxed),
                u.parts_resumed.load(Relaxed),
                u.bytes_resumed.load(Relaxed),
                u.uploads_aborted.load(Relaxed),
                r.reads.load_bytes.load(Relaxed),
                r.reads.stream_bytes.load(Relaxed),
            ]
            .into_iter()
            .enumerate()
            {
                v[i] += n;
            }
        }
        const NAMES: [(&str, &str); 8] = [
            (
                "upload_bytes",
                "Body bytes sent by Save and SaveStream, re-sent parts included",
            ),
            ("upload_parts", "Parts (and single PUTs) sent"),
            (
                "upload_parts_retried",
                "Parts sent again after a mismatch or a transient failure",
            ),
            (
                "upload_parts_resumed",
                "Parts an earlier run had sent, confirmed and not sent again",
            ),
            (
                "upload_resumed_bytes",
                "Bytes of resumed parts, not sent again",
            ),
            (
                "upload_aborted",
                "Multipart uploads aborted (failed, or abandoned by an earlier run)",
            ),
            (
                "load_bytes",
                "Bytes written by Load (objects and directories), resumed files not counted",
            ),
            (
                "stream_bytes",
                "Bytes OpenStream handed to its response stream (a client that goes away may not have read the last frames)",
            ),
        ];
        for (i, (name, help)) in NAMES.iter().enumerate() {
            let mut m = e.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (source, v) in &by_source {
                let label = RepoLabel {
                    repository: source.clone(),
                };
                prometheus_client::metrics::counter::ConstCounter::new(v[i])
                    .encode(m.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// `Clean(key) + "/"`: the prefix under which a key's "directory" lives.
fn dir_prefix(key: &str) -> String {
    format!("{}/", key.trim_end_matches('/'))
}

fn populate_options(
    repo: &Repo,
    source: &str,
    target: &Path,
    kind: TargetKind,
) -> Result<PopulateOptions> {
    let mut store = repo.config.store.clone();
    store.source = SourceUrl::parse(source)?;
    Ok(PopulateOptions {
        store,
        target: target.to_path_buf(),
        throughput_mib: repo.config.throughput_mib,
        jobs: repo.config.jobs.max(8),
        part_size: 8 * 1024 * 1024,
        memory: 256 * 1024 * 1024,
        verify: false,
        progress: ProgressMode::None,
        uid: None,
        gid: None,
        file_mode: 0o644,
        dir_mode: 0o755,
        root_mode: None,
        skip_invalid_keys: false,
        allow_empty: false, // loads only a prefix with children
        // Every load of a repository pays its one cap (as its saves and streams do).
        shared_limiters: Some(repo.store.limiters().to_vec()),
        fsync: false,
        early_writeback: true,
        target_kind: kind,
    })
}

fn url_of(repo: &Repo, key: &str) -> String {
    let s = &repo.config.store.source;
    format!("{}://{}/{key}", s.scheme, s.bucket)
}

impl Driver {
    async fn load(&self, art: Option<&Artifact>, path: &str) -> std::result::Result<(), String> {
        let (repo, key) = self.resolve(art)?;
        let path = PathBuf::from(path);
        let err = |e: Error| format!("loading {key}: {e}");
        if repo.store.exists(&key).await.map_err(err)? {
            let opts = populate_options(&repo, &url_of(&repo, &key), &path, TargetKind::Raw)
                .map_err(err)?;
            let s = populate::block::fill_raw(&opts).await.map_err(err)?;
            repo.reads.load_bytes.fetch_add(s.bytes, Ordering::Relaxed);
            tracing::info!(
                key,
                bytes = s.bytes,
                seconds = s.seconds,
                "loaded an object"
            );
            return Ok(());
        }
        let prefix = dir_prefix(&key);
        if repo.store.has_children(&prefix).await.map_err(err)? {
            let opts =
                populate_options(&repo, &url_of(&repo, &prefix), &path, TargetKind::Directory)
                    .map_err(err)?;
            let s = populate::populate(&opts).await.map_err(err)?;
            repo.reads.load_bytes.fetch_add(s.bytes, Ordering::Relaxed);
            tracing::info!(key, files = s.files, bytes = s.bytes, "loaded a directory");
            return Ok(());
        }
        Err(format!(
            "loading {key}: no such object or prefix in {}",
            repo.config.store.source
        ))
    }

    async fn save(&self, art: Option<&Artifact>, path: &str) -> std::result::Result<(), String> {
        let (repo, key) = self.resolve(art)?;
        let path = PathBuf::from(path);
        let err = |e: Error| format!("saving {} to {key}: {e}", path.display());
        let meta = std::fs::metadata(&path).map_err(|e| err(e.into()))?;
        if meta.is_dir() {
            let (files, bytes) = repo
                .uploader
                .tree(&path, &dir_prefix(&key))
                .await
                .map_err(err)?;
            tracing::info!(key, files, bytes, "saved a directory");
            return Ok(());
        }
        let up = repo.uploader.file(&path, &key).await.map_err(err)?;
        tracing::info!(
            key,
            bytes = up.bytes,
            parts = up.parts,
            parts_resumed = up.parts_resumed,
            checked = ?up.checked,
            "saved a file"
        );
        Ok(())
    }

    async fn save_stream(
        &self,
        mut frames: Streaming<SaveStreamArtifactRequest>,
    ) -> std::result::Result<(), String> {
        let first = frames
            .message()
            .await
            .map_err(|e| format!("reading the stream: {e}"))?
            .ok_or("the stream ended before its first frame (the artifact)")?;
        let (repo, key) = self.resolve(first.output_artifact.as_ref())?;
        let head = futures::stream::iter([Ok(Bytes::from(first.chunk))]);
        let rest = frames.map(|f| match f {
            Ok(f) => Ok(Bytes::from(f.chunk)),
            Err(e) => Err(Error::Io(std::io::Error::other(format!(
                "the client's stream failed: {e}"
            )))),
        });
        let up = repo
            .uploader
            .stream(&key, head.chain(rest))
            .await
            .map_err(|e| format!("saving a stream to {key}: {e}"))?;
        tracing::info!(
            key,
            bytes = up.bytes,
            parts = up.parts,
            checked = ?up.checked,
            "saved a stream"
        );
        Ok(())
    }

    async fn delete(&self, art: Option<&Artifact>) -> std::result::Result<(), String> {
        let (repo, key) = self.resolve(art)?;
        let err = |e: Error| format!("deleting {key}: {e}");
        // The key itself, and a directory saved with `archive: none` under `key/`, in the
        // same batches: GC leaves nothing, in as few requests as the store allows.
        let own = if key.ends_with('/') { "" } else { key.as_str() };
        let deleted = repo
            .store
            .delete_key_and_prefix(own, &dir_prefix(&key))
            .await
            .map_err(err)?;
        tracing::info!(key, deleted, "deleted");
        Ok(())
    }

    async fn list(&self, art: Option<&Artifact>) -> std::result::Result<Vec<String>, String> {
        let (repo, key) = self.resolve(art)?;
        let err = |e: Error| format!("listing {key}: {e}");
        let keys = repo
            .store
            .keys_under(&dir_prefix(&key))
            .await
            .map_err(err)?;
        if keys.is_empty() && !repo.store.exists(&key).await.map_err(err)? {
            return Err(format!("listing {key}: no such object or prefix"));
        }
        Ok(keys)
    }

    async fn is_directory(&self, art: Option<&Artifact>) -> std::result::Result<bool, String> {
        let (repo, key) = self.resolve(art)?;
        repo.store
            .has_children(&dir_prefix(&key))
            .await
            .map_err(|e| format!("looking under {key}/: {e}"))
    }

    /// The object's bytes as frames, read ahead at most [`STREAM_WINDOW`] ranges and paced
    /// by the channel (which the client drains).
    async fn open_stream(
        &self,
        art: Option<&Artifact>,
    ) -> std::result::Result<ReceiverStream<std::result::Result<OpenStreamResponse, Status>>, String>
    {
        let (repo, key) = self.resolve(art)?;
        let meta = repo.store.stat(&key).await.map_err(|e| {
            if e.is_not_found() {
                format!("streaming {key}: no such object")
            } else {
                format!("streaming {key}: {e}")
            }
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let version = meta.version();
            let store = repo.store.clone();
            let ranges = populate::copy::split_ranges(meta.size, STREAM_RANGE);
            let mut chunks = futures::stream::iter(ranges)
                .map(|r| {
                    let (store, key, version) = (store.clone(), key.clone(), version.clone());
                    async move { store.read_range(&key, &version, r).await }
                })
                .buffered(STREAM_WINDOW);
            while let Some(range) = chunks.next().await {
                let frames = match range {
                    Ok(data) => data,
                    Err(e) => {
                        let _ = tx
                            .send(Ok(OpenStreamResponse {
                                error: format!("streaming {key}: {e}"),
                                ..Default::default()
                            }))
                            .await;
                        return;
                    }
                };
                for piece in frames.chunks(FRAME) {
                    let frame = OpenStreamResponse {
                        data: piece.to_vec(),
                        ..Default::default()
                    };
                    if tx.send(Ok(frame)).await.is_err() {
                        return; // the client went away
                    }
                    let sent = piece.len() as u64;
                    repo.reads.stream_bytes.fetch_add(sent, Ordering::Relaxed);
                }
            }
            let _ = tx
                .send(Ok(OpenStreamResponse {
                    is_end: true,
                    ..Default::default()
                }))
                .await;
        });
        Ok(ReceiverStream::new(rx))
    }
}

fn failed(what: &str, e: &str) {
    tracing::warn!("{what} failed: {e}");
}

#[tonic::async_trait]
impl ArtifactService for Arc<Driver> {
    async fn load(
        &self,
        req: Request<LoadArtifactRequest>,
    ) -> std::result::Result<Response<LoadArtifactResponse>, Status> {
        let r = req.into_inner();
        let out = Driver::load(self, r.input_artifact.as_ref(), &r.path).await;
        Ok(Response::new(match out {
            Ok(()) => LoadArtifactResponse {
                success: true,
                error: String::new(),
            },
            Err(e) => {
                failed("Load", &e);
                LoadArtifactResponse {
                    success: false,
                    error: e,
                }
            }
        }))
    }

    type OpenStreamStream = Pin<
        Box<dyn Stream<Item = std::result::Result<OpenStreamResponse, Status>> + Send + 'static>,
    >;

    async fn open_stream(
        &self,
        req: Request<OpenStreamRequest>,
    ) -> std::result::Result<Response<Self::OpenStreamStream>, Status> {
        let r = req.into_inner();
        match Driver::open_stream(self, r.artifact.as_ref()).await {
            Ok(s) => Ok(Response::new(Box::pin(s))),
            Err(e) => {
                failed("OpenStream", &e);
                let frame = OpenStreamResponse {
                    error: e,
                    ..Default::default()
                };
                Ok(Response::new(Box::pin(futures::stream::iter([Ok(frame)]))))
            }
        }
    }

    async fn save(
        &self,
        req: Request<SaveArtifactRequest>,
    ) -> std::result::Result<Response<SaveArtifactResponse>, Status> {
        let r = req.into_inner();
        let out = Driver::save(self, r.output_artifact.as_ref(), &r.path).await;
        Ok(Response::new(save_response("Save", out)))
    }

    async fn delete(
        &self,
        req: Request<DeleteArtifactRequest>,
    ) -> std::result::Result<Response<DeleteArtifactResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            match Driver::delete(self, r.artifact.as_ref()).await {
                Ok(()) => DeleteArtifactResponse {
                    success: true,
                    error: String::new(),
                },
                Err(e) => {
                    failed("Delete", &e);
                    DeleteArtifactResponse {
                        success: false,
                        error: e,
                    }
                }
            },
        ))
    }

    async fn list_objects(
        &self,
        req: Request<ListObjectsRequest>,
    ) -> std::result::Result<Response<ListObjectsResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            match Driver::list(self, r.artifact.as_ref()).await {
                Ok(objects) => ListObjectsResponse {
                    objects,
                    error: String::new(),
                },
                Err(e) => {
                    failed("ListObjects", &e);
                    ListObjectsResponse {
                        objects: Vec::new(),
                        error: e,
                    }
                }
            },
        ))
    }

    async fn is_directory(
        &self,
        req: Request<IsDirectoryRequest>,
    ) -> std::result::Result<Response<IsDirectoryResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            match Driver::is_directory(self, r.artifact.as_ref()).await {
                Ok(is_directory) => IsDirectoryResponse {
                    is_directory,
                    error: String::new(),
                },
                Err(e) => {
                    failed("IsDirectory", &e);
                    IsDirectoryResponse {
                        is_directory: false,
                        error: e,
                    }
                }
            },
        ))
    }

    async fn save_stream(
        &self,
        req: Request<Streaming<SaveStreamArtifactRequest>>,
    ) -> std::result::Result<Response<SaveArtifactResponse>, Status> {
        let out = Driver::save_stream(self, req.into_inner()).await;
        Ok(Response::new(save_response("SaveStream", out)))
    }

    async fn get_capabilities(
        &self,
        _req: Request<GetCapabilitiesRequest>,
    ) -> std::result::Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(GetCapabilitiesResponse {
            supports_save_stream: true,
        }))
    }
}

fn save_response(what: &str, out: std::result::Result<(), String>) -> SaveArtifactResponse {
    match out {
        Ok(()) => SaveArtifactResponse {
            success: true,
            error: String::new(),
        },
        Err(e) => {
            failed(what, &e);
            SaveArtifactResponse {
                success: false,
                error: e,
            }
        }
    }
}

/// Serves the plugin on the unix socket `socket` (a stale socket file is replaced) until
/// `shutdown` resolves; RPCs under way are finished first.
pub async fn serve(
    socket: &Path,
    metrics_addr: Option<std::net::SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let driver = Arc::new(Driver::default());
    if let Some(addr) = metrics_addr {
        // Before the socket: a taken port is a start-up error.
        let mut registry = prometheus_client::registry::Registry::with_prefix("fillfs");
        registry.register_collector(Box::new(DriverMetrics(driver.clone())));
        crate::metrics::spawn(addr, Arc::new(registry)).await?;
    }
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("binding {}: {e}", socket.display()),
        ))
    })?;
    tracing::info!(socket = %socket.display(), "Argo artifact driver serving");
    let result = tonic::transport::Server::builder()
        .add_service(ArtifactServiceServer::new(driver))
        .serve_with_incoming_shutdown(crate::grpc_uds::incoming(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.map_err(|e| Error::Io(std::io::Error::other(format!("gRPC server: {e}"))))
}
