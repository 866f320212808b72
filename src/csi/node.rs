//! The node plugin's state and the two operations that matter: publish (mount a volume at a
//! kubelet target path) and unpublish. Independent of gRPC: [`super::service`] translates
//! the CSI messages into calls here and [`CsiError`]s into status codes.
//!
//! What is node-wide: one [`BlockCache`] and one read-ahead budget for every mount (keyed
//! by object identity, so N pods filling from one prefix fetch each block once), and the
//! node limiter that every mount's store pays in addition to its own `throughput`.
//!
//! Idempotency (CSI requires it): a target path has one slot, locked while it changes. A
//! second publish of the same volume with the same attributes succeeds without a second
//! mount (and refreshes an RRSA token, or switches to rotated keys once they work); with
//! different attributes it is AlreadyExists. Target paths must lie below `--kubelet-dir`
//! and be missing or empty. Each published volume is shown by the node's
//! [`crate::metrics::ReadPathMetrics`]. Unpublish
//! of a path we do not serve succeeds, after clearing a fillfs mount a previous run left.
//! This module must not parse volume attributes ([`super::volume`]).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;

use super::mounts;
use super::volume::VolumeSpec;
use crate::cache::BlockCache;
use crate::error::Error;
use crate::fs::{Fs, FsConfig};
use crate::fuse::{self, MountConfig, MountHandle};
use crate::limit::RateLimiter;
use crate::prefetch::PrefetchBudget;
use crate::store::Store;

/// Why a call failed, in the terms of CSI's status codes.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
    /// From the store's preflight or the mount; the code depends on the kind.
    #[error(transparent)]
    Source(#[from] Error),
}

/// Node-wide settings of `fillfs csi`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: String,
    /// MiB/s for the sum of all mounts' store reads; 0 = unlimited.
    pub node_throughput_mib: f64,
    /// All memory for cached and prefetched data of all mounts, bytes.
    pub cache_size: u64,
    pub block_size: u64,
    /// Default listing TTL (a volume's `metadataTTL` overrides it).
    pub metadata_ttl: Duration,
    /// fuser request threads per mount.
    pub fuse_threads: usize,
    pub kernel_read_ahead: u64,
    /// Where per-volume files live (RRSA token files, mode 0600).
    pub state_dir: PathBuf,
    /// kubelet's root directory: every target path must be below it. Stale fillfs mounts
    /// under it are cleared at start.
    pub kubelet_dir: PathBuf,
}

/// A volume mounted at a target path.
struct Published {
    volume_id: String,
    attributes: BTreeMap<String, String>,
    handle: MountHandle,
    fs: Arc<Fs>,
    token_file: Option<PathBuf>,
    /// The keys the volume reads with (from the node-publish secret), to notice a rotation.
    credentials: crate::store::Credentials,
}

type Slot = Arc<tokio::sync::Mutex<Option<Published>>>;

/// Store traffic of one published volume, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeTraffic {
    pub volume_id: String,
    pub target: PathBuf,
    pub get_requests: u64,
    pub bytes_read: u64,
}

/// The node plugin. Cheap to share (`Arc`).
pub struct NodePlugin {
    opts: NodeOptions,
    rt: Handle,
    node_limiters: Vec<Arc<RateLimiter>>,
    cache: BlockCache,
    budget: PrefetchBudget,
    max_prefetch_window: u64,
    slots: Mutex<HashMap<PathBuf, Slot>>,
    /// Each volume's own cap, by volume id and rate, held by its publishes' stores.
    volume_caps: Mutex<HashMap<(String, u64), std::sync::Weak<RateLimiter>>>,
    metrics: Arc<crate::metrics::ReadPathMetrics>,
}

impl NodePlugin {
    /// Builds the node-wide cache and limiter. Must run inside the runtime `rt` belongs to.
    pub fn new(opts: NodeOptions, rt: Handle) -> Result<Self, Error> {
        let (cache_bytes, budget_bytes) =
            crate::mount::split_cache_size(opts.cache_size, opts.block_size)?;
        let node_limiters = RateLimiter::for_throughput(opts.node_throughput_mib);
        let cache = BlockCache::new(cache_bytes, opts.block_size);
        let metrics = Arc::new(crate::metrics::ReadPathMetrics::new(
            cache.clone(),
            node_limiters.iter().map(|l| ("node", l.clone())).collect(),
        ));
        Ok(NodePlugin {
            node_limiters,
            cache,
            metrics,
            budget: PrefetchBudget::new(budget_bytes),
            max_prefetch_window: (budget_bytes / 4)
                .min(256 * 1024 * 1024)
                .max(opts.block_size),
            slots: Mutex::new(HashMap::new()),
            volume_caps: Mutex::new(HashMap::new()),
            opts,
            rt,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.opts.node_id
    }

    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// The node's read-path metrics (every published volume, the shared cache).
    pub fn metrics(&self) -> &Arc<crate::metrics::ReadPathMetrics> {
        &self.metrics
    }

    fn slot(&self, target: &Path) -> Slot {
        self.slots
            .lock()
            .expect("slots lock")
            .entry(target.to_path_buf())
            .or_default()
            .clone()
    }

    /// Forgets `target`'s slot if it is empty and nobody else holds it (keeps the map
    /// bounded). Call after releasing the slot's lock.
    /// The volume's own `throughput` cap: one per volume on this node, shared by every
    /// publish of it (a PV mounted by three pods of the node pays one cap, as the
    /// attribute says, not three), new when the volume has none alive or its rate changed.
    fn volume_cap(&self, volume_id: &str, throughput_mib: f64) -> Vec<Arc<RateLimiter>> {
        let mut caps = self.volume_caps.lock().unwrap_or_else(|e| e.into_inner());
        caps.retain(|_, cap| cap.strong_count() > 0);
        let key = (volume_id.to_string(), throughput_mib.to_bits());
        if let Some(cap) = caps.get(&key).and_then(std::sync::Weak::upgrade) {
            return vec![cap];
        }
        let fresh = RateLimiter::for_throughput(throughput_mib);
        if let Some(cap) = fresh.first() {
            caps.insert(key, Arc::downgrade(cap));
        }
        fresh
    }

    fn forget_slot(&self, target: &Path, slot: Slot) {
        let mut slots = self.slots.lock().expect("slots lock");
        // The map's reference and ours: no other call is waiting on this slot, and none can
        // take a new reference while we hold the map.
        if Arc::strong_count(&slot) == 2 && slot.try_lock().is_ok_and(|g| g.is_none()) {
            slots.remove(target);
        }
    }

    /// A target path kubelet may give: strictly below `--kubelet-dir` (compared as written;
    /// callers refuse `..` first). Anything else would mount over, or remove, a directory
    /// of the node that no pod owns.
    fn confined(&self, target: &Path) -> Result<(), CsiError> {
        let root = &self.opts.kubelet_dir;
        if target.starts_with(root) && target != root.as_path() {
            return Ok(());
        }
        Err(CsiError::InvalidArgument(format!(
            "target_path {} is not below the kubelet directory {} (--kubelet-dir)",
            target.display(),
            root.display()
        )))
    }

    /// Mounts `spec` at `target` (an absolute path), or confirms it is already there.
    pub async fn publish(
        &self,
        volume_id: &str,
        target: &Path,
        spec: VolumeSpec,
    ) -> Result<(), CsiError> {
        self.confined(target)?;
        let slot = self.slot(target);
        let result = {
            let mut guard = slot.lock().await;
            self.publish_locked(&mut guard, volume_id, target, spec)
                .await
        };
        if result.is_err() {
            self.forget_slot(target, slot);
        }
        result
    }

    async fn publish_locked(
        &self,
        slot: &mut Option<Published>,
        volume_id: &str,
        target: &Path,
        mut spec: VolumeSpec,
    ) -> Result<(), CsiError> {
        let pod = spec.pod.as_deref().unwrap_or("-");
        if let Some(p) = slot.as_ref() {
            if p.handle.is_alive() {
                if p.volume_id == volume_id && p.attributes == spec.attributes {
                    if let (Some(file), Some(token)) = (&p.token_file, &spec.rrsa_token) {
                        write_private(file, token.expose())
                            .map_err(|e| CsiError::Internal(format!("refreshing token: {e}")))?;
                    }
                    // The token file is the slot's (the spec's is empty until written).
                    if let (Some(file), Some(r)) =
                        (&p.token_file, spec.store.credentials.rrsa.as_mut())
                    {
                        r.oidc_token_file = file.display().to_string();
                    }
                    let rotated = !p.credentials.same_keys(&spec.store.credentials);
                    if rotated {
                        // A rotated secret: checked with a preflight, then used for every
                        // request from now on. A secret that does not work changes nothing.
                        p.fs.store()
                            .rotate_credentials(spec.store.credentials.clone())
                            .await?;
                        tracing::info!(volume_id, pod, target = %target.display(), credentials = %spec.store.credentials.describe(), "already published; credentials rotated");
                    } else {
                        tracing::info!(volume_id, pod, target = %target.display(), "already published");
                    }
                    if let Some(p) = slot.as_mut() {
                        p.credentials = spec.store.credentials;
                    }
                    return Ok(());
                }
                return Err(CsiError::AlreadyExists(format!(
                    "{} already holds volume {:?} with other attributes; unpublish it first",
                    target.display(),
                    p.volume_id
                )));
            }
            tracing::warn!(target = %target.display(), "previous mount ended behind our back; mounting again");
            *slot = None;
            self.metrics.remove(&target.display().to_string());
        }
        self.clear_foreign_mount(target).await?;
        // kubelet hands over a missing or empty directory; mounting over anything else
        // would hide what is there (and is no path kubelet makes).
        match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => {
                let empty = std::fs::read_dir(target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
                if !empty {
                    return Err(CsiError::InvalidArgument(format!(
                        "target_path {} is not empty; refusing to mount over its contents",
                        target.display()
                    )));
                }
            }
            Ok(_) => {
                return Err(CsiError::InvalidArgument(format!(
                    "target_path {} exists and is not a directory",
                    target.display()
                )));
            }
            Err(_) => {}
        }
        // Everything made from here on is undone if the publish fails.
        let mut undo = Undo::default();
        if !target.exists() {
            std::fs::create_dir_all(target).map_err(|e| {
                CsiError::Internal(format!("creating target {}: {e}", target.display()))
            })?;
            undo.dir = Some(target.to_path_buf());
        }

        let mut store_cfg = spec.store;
        let token_file = match &spec.rrsa_token {
            Some(token) => {
                let file = self.token_path(target);
                undo.file = Some(file.clone());
                write_private(&file, token.expose())
                    .map_err(|e| CsiError::Internal(format!("writing token file: {e}")))?;
                if let Some(r) = store_cfg.credentials.rrsa.as_mut() {
                    r.oidc_token_file = file.display().to_string();
                }
                Some(file)
            }
            None => None,
        };
        let own_limiters = self.volume_cap(volume_id, spec.throughput_mib);
        let mut limiters = own_limiters.clone();
        limiters.extend(self.node_limiters.iter().cloned());
        let store = Store::new(&store_cfg, limiters)?;
        match store.preflight().await {
            Ok(found) if found.empty && !spec.allow_empty => {
                return Err(Error::EmptySource {
                    source_url: store_cfg.source.to_string(),
                    allow: "set volumeAttributes allowEmpty: \"true\" to mount it anyway".into(),
                }
                .into());
            }
            Ok(_) => {}
            // Unclassified with RRSA is almost always the STS exchange, of which OpenDAL
            // only says it could not sign. Say what to check (never the token).
            Err(Error::Store(e)) if token_file.is_some() => {
                return Err(CsiError::PermissionDenied(format!(
                    "RRSA: listing the source with roleArn {:?} failed ({e}); usually the STS exchange: check that the role trusts oidcProviderArn and this pod's service account, and that STS is reachable",
                    store_cfg
                        .credentials
                        .rrsa
                        .as_ref()
                        .map(|r| r.role_arn.as_str())
                        .unwrap_or("")
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let config = FsConfig {
            metadata_ttl: spec.metadata_ttl.unwrap_or(self.opts.metadata_ttl),
            max_prefetch_window: self.max_prefetch_window,
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        };
        let fs = Arc::new(Fs::new(
            store,
            self.cache.clone(),
            self.budget.clone(),
            config,
        ));
        let mount_cfg = MountConfig {
            fs_name: format!("fillfs:{}", store_cfg.source),
            // Pods run as any user; files are 0644 and directories 0755, read-only.
            allow_other: true,
            threads: self.opts.fuse_threads,
            kernel_read_ahead: self.opts.kernel_read_ahead,
        };
        let (rt, fs2, target2) = (self.rt.clone(), fs.clone(), target.to_path_buf());
        let handle =
            tokio::task::spawn_blocking(move || fuse::spawn(fs2, rt, &target2, &mount_cfg))
                .await
                .map_err(|e| CsiError::Internal(format!("mount task: {e}")))??;
        undo.disarm();
        self.metrics.add(
            &target.display().to_string(),
            volume_id,
            &super::volume::metrics_pod(
                spec.pod.as_deref(),
                target
                    .strip_prefix(&self.opts.kubelet_dir)
                    .unwrap_or(target),
            ),
            fs.store().clone(),
            own_limiters.into_iter().map(|l| ("volume", l)).collect(),
            fs.read_latency().clone(),
        );
        tracing::info!(
            volume_id,
            pod,
            target = %target.display(),
            source = %store_cfg.source,
            credentials = %store_cfg.credentials.describe(),
            throughput_mib = spec.throughput_mib,
            "published"
        );
        *slot = Some(Published {
            volume_id: volume_id.to_string(),
            attributes: spec.attributes,
            handle,
            fs,
            token_file,
            credentials: store_cfg.credentials.clone(),
        });
        Ok(())
    }

    /// A mount at `target` that is not ours: a dead fillfs mount is cleared; anything else
    /// is refused (we never mount over someone else's file system).
    async fn clear_foreign_mount(&self, target: &Path) -> Result<(), CsiError> {
        match self.clear_dead_mount(target).await {
            Foreign::None | Foreign::Cleared => Ok(()),
            Foreign::Live(m) => Err(CsiError::AlreadyExists(format!(
                "{} is already a mount point ({} from {}) not served by this plugin",
                target.display(),
                m.fs_type,
                m.source
            ))),
            Foreign::Failed(e) => Err(CsiError::Internal(format!("clearing stale mount: {e}"))),
        }
    }

    /// The one rule for a mount at `target` that no slot of ours holds: a fillfs mount
    /// whose server is gone is detached, one that does not answer within
    /// [`mounts::PROBE_TIMEOUT`] is ended (connection aborted, detached); anything else is
    /// left alone.
    async fn clear_dead_mount(&self, target: &Path) -> Foreign {
        let Some(m) = crate::mountinfo::mounted_at(target) else {
            return Foreign::None;
        };
        if !m.is_fillfs() {
            return Foreign::Live(m);
        }
        let cleared = match mounts::probe(target, mounts::PROBE_TIMEOUT).await {
            mounts::Probe::Answers | mounts::Probe::Unknown => return Foreign::Live(m),
            mounts::Probe::Disconnected => mounts::detach(target),
            mounts::Probe::Frozen => {
                tracing::warn!(target = %target.display(), source = %m.source, timeout_s = mounts::PROBE_TIMEOUT.as_secs(), "a fillfs mount did not answer; ending it");
                mounts::end_frozen(&m)
            }
        };
        match cleared {
            Ok(()) => {
                tracing::info!(target = %target.display(), source = %m.source, "cleared a mount left by a previous run");
                Foreign::Cleared
            }
            Err(e) => Foreign::Failed(e),
        }
    }

    /// Start-up: every fillfs mount under `root` that no slot holds goes through
    /// `clear_dead_mount`, all at once (a frozen one costs its
    /// timeout, not everyone's), each under its target's lock so a publish of the same
    /// path waits for it. Runs while the plugin already serves. Returns how many were
    /// cleared.
    pub async fn clear_stale_under(&self, root: &Path) -> usize {
        let stale: Vec<_> = crate::mountinfo::table()
            .into_iter()
            .filter(|m| m.is_fillfs() && m.mount_point.starts_with(root))
            .map(|m| m.mount_point)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let each = stale.iter().map(|target| async move {
            let slot = self.slot(target);
            let outcome = {
                let guard = slot.lock().await;
                if guard.is_some() {
                    None // published by this process meanwhile
                } else {
                    Some(self.clear_dead_mount(target).await)
                }
            };
            self.forget_slot(target, slot);
            match outcome {
                Some(Foreign::Cleared) => true,
                Some(Foreign::Live(m)) => {
                    tracing::warn!(mountpoint = %target.display(), source = %m.source, "a fillfs mount served by another process; left alone");
                    false
                }
                Some(Foreign::Failed(e)) => {
                    tracing::error!(mountpoint = %target.display(), error = %e, "could not clear a stale mount");
                    false
                }
                Some(Foreign::None) | None => false,
            }
        });
        futures::future::join_all(each)
            .await
            .into_iter()
            .filter(|c| *c)
            .count()
    }

    /// Unmounts `target` and removes the directory. Succeeds if nothing is there.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        self.confined(target)?;
        let slot = self.slot(target);
        let result = {
            let mut guard = slot.lock().await;
            self.unpublish_locked(&mut guard, volume_id, target).await
        };
        self.forget_slot(target, slot);
        result
    }

    async fn unpublish_locked(
        &self,
        slot: &mut Option<Published>,
        volume_id: &str,
        target: &Path,
    ) -> Result<(), CsiError> {
        if let Some(p) = slot.take() {
            if let Err(e) = p.handle.try_unmount() {
                *slot = Some(p);
                return Err(CsiError::FailedPrecondition(format!(
                    "{e}; a process still uses the volume"
                )));
            }
            self.metrics.remove(&target.display().to_string());
            let Published {
                handle, token_file, ..
            } = p;
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| CsiError::Internal(format!("unmount task: {e}")))??;
            if let Some(f) = token_file {
                let _ = std::fs::remove_file(f);
            }
            tracing::info!(volume_id, target = %target.display(), "unpublished");
        } else {
            match self.clear_dead_mount(target).await {
                Foreign::None => {
                    tracing::info!(volume_id, target = %target.display(), "not published; nothing to do");
                }
                Foreign::Cleared => {}
                Foreign::Live(m) if m.is_fillfs() => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "{} is a live fillfs mount ({}) served by another process, not this plugin; it is left alone",
                        target.display(),
                        m.source
                    )));
                }
                Foreign::Live(m) => {
                    tracing::warn!(volume_id, target = %target.display(), fs_type = %m.fs_type, "not published by us; another file system is mounted there and left alone");
                }
                Foreign::Failed(e) => {
                    return Err(CsiError::Internal(format!("clearing stale mount: {e}")));
                }
            }
        }
        // Still under the slot's lock: a publish of the same path waiting for it must find
        // the directory as we leave it.
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "target left in place")
            }
        }
        Ok(())
    }

    /// Store traffic per published volume.
    pub fn traffic(&self) -> Vec<VolumeTraffic> {
        use std::sync::atomic::Ordering::Relaxed;
        let slots: Vec<(PathBuf, Slot)> = self
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        slots
            .into_iter()
            .filter_map(|(target, slot)| {
                let guard = slot.try_lock().ok()?;
                let p = guard.as_ref()?;
                let s = p.fs.store().stats();
                Some(VolumeTraffic {
                    volume_id: p.volume_id.clone(),
                    target,
                    get_requests: s.get_requests.load(Relaxed),
                    bytes_read: s.bytes_read.load(Relaxed),
                })
            })
            .collect()
    }

    fn token_path(&self, target: &Path) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        target.hash(&mut h);
        self.opts
            .state_dir
            .join("tokens")
            .join(format!("{:016x}.token", h.finish()))
    }
}

/// What a mount at a target path that no slot holds turned out to be.
enum Foreign {
    None,
    /// A fillfs mount whose server was gone, now detached.
    Cleared,
    /// Served by someone (another process, or not fillfs at all).
    Live(crate::mountinfo::MountEntry),
    Failed(std::io::Error),
}

/// What a publish has made so far (target directory, token file), removed on drop unless
/// the publish succeeded: every early return of a failed publish leaves nothing behind.
#[derive(Default)]
struct Undo {
    dir: Option<PathBuf>,
    file: Option<PathBuf>,
}

impl Undo {
    fn disarm(&mut self) {
        self.dir = None;
        self.file = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(&f);
            let _ = std::fs::remove_file(f.with_extension("tmp"));
        }
        if let Some(d) = self.dir.take() {
            // Only if still empty: a failed mount leaves nothing inside.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Writes `contents` to `path` readable by its owner only, replacing it atomically.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
