//! The file system's logic, independent of FUSE: directories from LIST, inodes, open
//! handles, reads. [`crate::fuse`] translates kernel requests into calls here; this module
//! never sees fuser types, so it can be tested without mounting.
//!
//! Metadata. A directory's children come from one paginated LIST with delimiter, cached for
//! `metadata_ttl` from when it started (moka, so concurrent lookups in a cold directory
//! share one LIST while it is within the TTL; with a TTL of 0 each lookup lists again,
//! and a listing nobody holds any more stops). The listing is used as it arrives ([`listing`]): a directory handle
//! hands the kernel each LIST page's entries while the next page is fetched, and a lookup
//! is answered as soon as the name is listed. A lookup is answered from the parent's
//! listing: a name that is not in it does not exist, with no HEAD request (mountpoint-s3
//! pays a LIST plus a HEAD per lookup). Objects named like directories (`dir/` markers)
//! and prefixes without markers are both directories; a key that is both a file and a
//! prefix shows as the directory.
//!
//! Directory handles. `opendir` creates a handle; its first `readdir` takes the listing
//! (the cached one, complete or still arriving, or a new LIST) and every later page of
//! that handle reads the same listing, so offsets stay meaningful however long the listing
//! takes and whatever the TTL does meanwhile (before, each page indexed into whatever
//! listing was cached then: entries were skipped or repeated when it changed, and with
//! `--metadata-ttl 0` every page listed the directory again). A `readdir` at offset 0
//! (rewinddir) takes the listing again.
//!
//! Data. `open` creates a handle with its own [`Prefetcher`]; `read` plans under the
//! handle's lock and awaits outside it.
//!
//! Versions. An inode is one version of an object (see [`inode`]); every read of a handle
//! is pinned to it, so a handle reads that version or gets EIO once the object has been
//! overwritten, never a mix. A refreshed listing that shows a new version gives the path a
//! new inode and tells the kernel to drop the old name ([`Fs::on_replaced`]), so the next
//! open after the TTL switches cleanly to the new version.

pub mod inode;
pub mod listing;
pub mod names;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

pub use inode::{Ino, Kind, Node, ROOT_INO};
pub use listing::{DirEntry, DirListing};

use crate::cache::{BlockCache, ObjectId, ObjectRef};
use crate::error::{Error, Result};
use crate::prefetch::{PrefetchBudget, Prefetcher};
use crate::store::Store;
use inode::InodeTable;
use listing::{Child, Merge};

/// Tunables of the file system.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long listings (and the attributes they carry) are trusted.
    pub metadata_ttl: Duration,
    /// Largest read-ahead window of one handle, in bytes.
    pub max_prefetch_window: u64,
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
}

struct OpenFile {
    prefetcher: Mutex<Prefetcher>,
}

/// An open directory: the listing its pages are read from, once its first page is asked.
struct OpenDir {
    ino: Ino,
    listing: Mutex<Option<Arc<DirListing>>>,
}

/// Called with (parent, name) of a path whose listing shows a new version.
type ReplacedHook = Box<dyn Fn(Ino, &str) + Send + Sync>;

/// What a listing's task needs of the file system: it outlives the request that started it.
#[derive(Clone)]
struct Inodes {
    table: Arc<Mutex<InodeTable>>,
    on_replaced: Arc<OnceLock<ReplacedHook>>,
}

/// The file system over one store.
pub struct Fs {
    store: Store,
    cache: BlockCache,
    budget: PrefetchBudget,
    config: FsConfig,
    inodes: Inodes,
    listings: Cache<Ino, Arc<DirListing>>,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    /// Time to answer each read (shown by [`crate::metrics`]).
    read_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Inodes {
    /// Gives listed children their inodes (a new one for a path whose version changed,
    /// then the replaced-name hook).
    fn admit(&self, dir: &Arc<Node>, children: Vec<Child>) -> Vec<DirEntry> {
        let mut entries = Vec::with_capacity(children.len());
        let mut replaced = Vec::new();
        let mut table = self.table.lock().expect("inode lock");
        for c in children {
            let (n, new) = table.upsert(dir, &c.name, c.kind, c.meta.as_ref());
            if new {
                if c.kind == Kind::File {
                    tracing::info!(key = %n.key, version = %n.version, "object changed; new inode");
                }
                replaced.push(c.name.clone());
            }
            entries.push(DirEntry {
                ino: n.ino,
                name: c.name,
                kind: c.kind,
            });
        }
        drop(table);
        if let Some(hook) = self.on_replaced.get() {
            for name in replaced {
                hook(dir.ino, &name);
            }
        }
        entries
    }
}

impl Fs {
    pub fn new(store: Store, cache: BlockCache, budget: PrefetchBudget, config: FsConfig) -> Self {
        let listings = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.metadata_ttl.max(Duration::from_millis(1)))
            .build();
        Fs {
            store,
            cache,
            budget,
            config,
            inodes: Inodes {
                table: Arc::new(Mutex::new(InodeTable::new())),
                on_replaced: Arc::new(OnceLock::new()),
            },
            listings,
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            read_latency: crate::metrics::read_latency_histogram(),
            next_fh: AtomicU64::new(1),
        }
    }

    /// Sets what to do when a refreshed listing shows a path with a new version (the FUSE
    /// adapter tells the kernel to forget the name, so its next lookup finds the new
    /// inode). Called from a listing load, possibly inside a lookup the kernel is waiting
    /// for: `hook` must not block on the kernel. Only the first call counts.
    pub fn on_replaced(&self, hook: impl Fn(Ino, &str) + Send + Sync + 'static) {
        let _ = self.inodes.on_replaced.set(Box::new(hook));
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    pub fn budget(&self) -> &PrefetchBudget {
        &self.budget
    }

    /// The time each read took to answer.
    pub fn read_latency(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.read_latency
    }

    fn node(&self, ino: Ino) -> Result<Arc<Node>> {
        self.inodes
            .table
            .lock()
            .expect("inode lock")
            .get(ino)
            .ok_or_else(|| Error::errno(libc::ENOENT))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Arc<Node>> {
        self.node(ino)
    }

    /// The node now named `name` in directory `parent`: the newest version any listing
    /// showed, which may be newer than the listing an open directory handle reads.
    pub fn child(&self, parent: Ino, name: &str) -> Option<Arc<Node>> {
        self.inodes
            .table
            .lock()
            .expect("inode lock")
            .child(parent, name)
    }

    /// The listing of directory `ino`: the cached one (complete or still arriving), or a
    /// new LIST started in the background. A listing that failed is replaced (one caller
    /// replaces it; the others take the new one).
    pub async fn listing(&self, ino: Ino) -> Result<Arc<DirListing>> {
        let dir = self.node(ino)?;
        if dir.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        let entry = self
            .listings
            .entry(ino)
            .and_compute_with(|cached| async {
                match cached {
                    Some(c) if !c.value().failed() => moka::ops::compute::Op::Nop,
                    _ => moka::ops::compute::Op::Put(self.start_listing(dir.clone())),
                }
            })
            .await;
        Ok(entry.unwrap().into_value())
    }

    /// Starts listing `dir`: a task takes the LIST pages as they come, gives the children
    /// inodes and publishes them. It stops early once nobody holds the listing any more
    /// (it expired from the cache, no directory handle reads it, nobody waits for it).
    fn start_listing(&self, dir: Arc<Node>) -> Arc<DirListing> {
        let listing = DirListing::new();
        let batches = self.store.list_dir_batches(&dir.key);
        let (inodes, out) = (self.inodes.clone(), Arc::downgrade(&listing));
        // Whatever ends the task (a panic, the runtime shutting down, even before its first
        // poll) ends the listing: nobody waits for pages that will not come.
        let ends = listing::EndsOnDrop(out.clone());
        tokio::spawn(async move {
            let _ends = ends;
            let mut merge = Merge::new(&dir.key);
            let mut batches = std::pin::pin!(batches);
            loop {
                let mut children = Vec::new();
                let end = match futures::TryStreamExt::try_next(&mut batches).await {
                    Ok(Some(batch)) => {
                        batch.into_iter().for_each(|i| merge.push(i, &mut children));
                        None
                    }
                    Ok(None) => {
                        merge.finish(&mut children);
                        Some(Ok(()))
                    }
                    Err(e) => Some(Err(e)),
                };
                let Some(out) = out.upgrade() else {
                    tracing::debug!(dir = %dir.key, "listing no longer wanted; stopped");
                    return;
                };
                out.publish(inodes.admit(&dir, children));
                if let Some(end) = end {
                    out.finish(end);
                    return;
                }
            }
        });
        listing
    }

    /// Opens directory `ino` for reading its entries; returns the handle id.
    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        if self.node(ino)?.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dir = Arc::new(OpenDir {
            ino,
            listing: Default::default(),
        });
        self.dirs.lock().expect("dir lock").insert(fh, dir);
        Ok(fh)
    }

    /// The listing directory handle `fh` reads its pages from: taken at its first page,
    /// and again when `rewind` (a page at offset 0: rewinddir).
    pub async fn dir_listing(&self, fh: u64, rewind: bool) -> Result<Arc<DirListing>> {
        let dir = self
            .dirs
            .lock()
            .expect("dir lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::errno(libc::EBADF))?;
        let kept = dir.listing.lock().expect("dir lock").clone();
        match kept {
            Some(listing) if !rewind => Ok(listing),
            _ => {
                let listing = self.listing(dir.ino).await?;
                *dir.listing.lock().expect("dir lock") = Some(listing.clone());
                Ok(listing)
            }
        }
    }

    /// Closes a directory handle and drops its listing.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().expect("dir lock").remove(&fh);
    }

    /// Finds `name` in directory `parent` from its listing (as soon as it is listed); no
    /// HEAD request.
    pub async fn lookup(&self, parent: Ino, name: &str) -> Result<Arc<Node>> {
        match self.listing(parent).await?.find(name).await? {
            Some(ino) => self.node(ino),
            None => Err(Error::errno(libc::ENOENT)),
        }
    }

    /// Opens a file for reading; returns the handle id.
    pub fn open(&self, ino: Ino) -> Result<u64> {
        let node = self.node(ino)?;
        if node.kind != Kind::File {
            return Err(Error::errno(libc::EISDIR));
        }
        // Cached blocks are shared only between readers of the same principal (see
        // `Store::principal`), taken at each open: credentials can be rotated.
        let store_id: Arc<str> = format!(
            "{}|{}|{}",
            self.store.endpoint(),
            self.store.source(),
            self.store.principal()
        )
        .into();
        let obj = ObjectRef {
            id: Arc::new(ObjectId {
                store: store_id,
                key: node.key.as_str().into(),
                version: node.version.clone(),
            }),
            size: node.size,
        };
        let max_window = crate::prefetch::window_under_cap(
            (self.config.max_prefetch_window / self.cache.block_size()).max(1),
            self.store.limiters(),
            self.cache.block_size(),
        );
        let prefetcher = Prefetcher::new(
            self.store.clone(),
            self.cache.clone(),
            self.budget.clone(),
            obj,
            max_window,
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handle lock").insert(
            fh,
            Arc::new(OpenFile {
                prefetcher: Mutex::new(prefetcher),
            }),
        );
        Ok(fh)
    }

    /// Reads up to `len` bytes at `offset` through the handle's prefetcher.
    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> Result<Bytes> {
        let started = std::time::Instant::now();
        let handle = self
            .handles
            .lock()
            .expect("handle lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::errno(libc::EBADF))?;
        let pending = handle
            .prefetcher
            .lock()
            .expect("prefetcher lock")
            .plan_read(offset, len as u64);
        let r = pending.await.map_err(Error::Shared);
        self.read_latency.observe(started.elapsed().as_secs_f64());
        r
    }

    /// Closes a handle; its read-ahead is cancelled.
    pub fn release(&self, fh: u64) {
        self.handles.lock().expect("handle lock").remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SourceUrl, StoreConfig};

    /// The file system over a real store on a temp directory (OpenDAL fs), without FUSE.
    fn fs_over(dir: &std::path::Path, ttl: Duration) -> Fs {
        let url = SourceUrl::parse(&format!("file://{}", dir.display())).unwrap();
        let store = Store::new(&StoreConfig::new(url, None, None), Vec::new()).unwrap();
        let config = FsConfig {
            metadata_ttl: ttl,
            max_prefetch_window: 1 << 20,
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        };
        Fs::new(
            store,
            BlockCache::new(4 << 20, 1 << 20),
            PrefetchBudget::new(4 << 20),
            config,
        )
    }

    #[tokio::test]
    async fn an_open_directory_keeps_its_listing_and_rewinddir_takes_a_new_one() {
        let d = tempfile::tempdir().unwrap();
        for n in ["b", "c"] {
            std::fs::write(d.path().join(n), n).unwrap();
        }
        let fs = fs_over(d.path(), Duration::ZERO);
        let fh = fs.opendir(ROOT_INO).unwrap();
        let names = |l: Arc<DirListing>| async move {
            let mut names: Vec<String> =
                l.all().await.unwrap().into_iter().map(|e| e.name).collect();
            names.sort(); // a local directory lists in no particular order
            names
        };
        assert_eq!(
            names(fs.dir_listing(fh, true).await.unwrap()).await,
            ["b", "c"]
        );
        std::fs::write(d.path().join("a"), "a").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await; // past the TTL
        assert_eq!(
            names(fs.dir_listing(fh, false).await.unwrap()).await,
            ["b", "c"],
            "a later page reads the handle's listing"
        );
        assert_eq!(
            names(fs.dir_listing(fh, true).await.unwrap()).await,
            ["a", "b", "c"],
            "offset 0 (rewinddir) lists again"
        );
        fs.releasedir(fh);
        let err = fs.dir_listing(fh, false).await.unwrap_err();
        assert_eq!(err.to_errno(), libc::EBADF);
        let file = fs.lookup(ROOT_INO, "a").await.unwrap();
        assert_eq!(fs.opendir(file.ino).unwrap_err().to_errno(), libc::ENOTDIR);
    }

    #[tokio::test]
    async fn lookups_open_reads_and_release() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"hello world").unwrap();
        let fs = fs_over(d.path(), Duration::from_secs(60));
        let sub = fs.lookup(ROOT_INO, "sub").await.unwrap();
        assert_eq!(sub.kind, Kind::Dir);
        assert_eq!(
            fs.lookup(ROOT_INO, "nope").await.unwrap_err().to_errno(),
            libc::ENOENT
        );
        let f = fs.lookup(sub.ino, "f").await.unwrap();
        assert_eq!((f.kind, f.size, f.key.as_str()), (Kind::File, 11, "sub/f"));
        assert_eq!(
            fs.lookup(sub.ino, "f").await.unwrap().ino,
            f.ino,
            "same version, same inode"
        );
        assert_eq!(fs.open(sub.ino).unwrap_err().to_errno(), libc::EISDIR);
        let fh = fs.open(f.ino).unwrap();
        assert_eq!(&fs.read(fh, 6, 100).await.unwrap()[..], b"world");
        assert!(fs.read(fh, 11, 10).await.unwrap().is_empty(), "at EOF");
        fs.release(fh);
        assert_eq!(fs.read(fh, 0, 1).await.unwrap_err().to_errno(), libc::EBADF);
    }
}
