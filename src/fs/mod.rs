//! The file system's logic, independent of FUSE: directories from LIST, inodes, open
//! handles, reads. [`crate::fuse`] translates kernel requests into calls here; this module
//! never sees fuser types, so it can be tested without mounting.
//!
//! Metadata. A directory's children come from one paginated LIST with delimiter, cached for
//! `metadata_ttl` (moka, so concurrent lookups in a cold directory share one LIST). A lookup
//! is answered from the parent's listing: a name that is not in it does not exist, with no
//! HEAD request (mountpoint-s3 pays a LIST plus a HEAD per lookup). Objects named like
//! directories (`dir/` markers) and prefixes without markers are both directories; a key
//! that is both a file and a prefix shows as the directory.
//!
//! Directory handles. `opendir` creates a handle; its first `readdir` takes the listing
//! (from the cache, or one LIST) and every later page of that handle reads the same
//! snapshot, so offsets stay meaningful however long the listing takes and whatever the
//! TTL does meanwhile (before, each page indexed into whatever listing was cached then:
//! entries were skipped or repeated when it changed, and with `--metadata-ttl 0` every page
//! listed the directory again). A `readdir` at offset 0 (rewinddir) takes a new snapshot.
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
pub mod names;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use moka::future::Cache;

pub use inode::{Ino, Kind, Node, ROOT_INO};

use crate::cache::{BlockCache, ObjectId, ObjectRef};
use crate::error::{Error, Result};
use crate::prefetch::{PrefetchBudget, Prefetcher};
use crate::store::{Listed, Store};
use inode::InodeTable;

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

/// One child in a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub name: String,
    pub kind: Kind,
}

type Listing = Arc<Vec<DirEntry>>;

struct OpenFile {
    prefetcher: Mutex<Prefetcher>,
}

/// An open directory: the listing its pages are read from, once its first page is asked.
struct OpenDir {
    ino: Ino,
    snapshot: tokio::sync::Mutex<Option<Listing>>,
}

/// Called with (parent, name) of a path whose listing shows a new version.
type ReplacedHook = Box<dyn Fn(Ino, &str) + Send + Sync>;

/// The file system over one store.
pub struct Fs {
    store: Store,
    cache: BlockCache,
    budget: PrefetchBudget,
    config: FsConfig,
    inodes: Mutex<InodeTable>,
    listings: Cache<Ino, Listing>,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    /// Time to answer each read (shown by [`crate::metrics`]).
    read_latency: prometheus_client::metrics::histogram::Histogram,
    on_replaced: OnceLock<ReplacedHook>,
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
            inodes: Mutex::new(InodeTable::new()),
            listings,
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            read_latency: crate::metrics::read_latency_histogram(),
            next_fh: AtomicU64::new(1),
            on_replaced: OnceLock::new(),
        }
    }

    /// Sets what to do when a refreshed listing shows a path with a new version (the FUSE
    /// adapter tells the kernel to forget the name, so its next lookup finds the new
    /// inode). Called from a listing load, possibly inside a lookup the kernel is waiting
    /// for: `hook` must not block on the kernel. Only the first call counts.
    pub fn on_replaced(&self, hook: impl Fn(Ino, &str) + Send + Sync + 'static) {
        let _ = self.on_replaced.set(Box::new(hook));
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
            .lock()
            .expect("inode lock")
            .get(ino)
            .ok_or_else(|| Error::errno(libc::ENOENT))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Arc<Node>> {
        self.node(ino)
    }

    /// The node now named `name` in directory `parent`: the newest version any listing
    /// showed, which may be newer than an open directory handle's snapshot.
    pub fn child(&self, parent: Ino, name: &str) -> Option<Arc<Node>> {
        self.inodes.lock().expect("inode lock").child(parent, name)
    }

    /// The children of directory `ino`, from the listing cache or one LIST.
    pub async fn readdir(&self, ino: Ino) -> Result<Listing> {
        let dir = self.node(ino)?;
        if dir.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        self.listings
            .try_get_with(ino, self.load_listing(dir))
            .await
            .map_err(Error::Shared)
    }

    async fn load_listing(&self, dir: Arc<Node>) -> Result<Listing> {
        let listed = self.store.list_dir(&dir.key).await?;
        let mut dirs = std::collections::BTreeSet::new();
        let mut files = std::collections::BTreeMap::new();
        for item in listed {
            let name = match &item {
                Listed::Dir { name } | Listed::File { name, .. } => name,
            };
            if let Some(why) = names::invalid_reason(name) {
                tracing::warn!(dir = %dir.key, name = %name.escape_debug(), "hiding key: {why}");
                continue;
            }
            match item {
                Listed::Dir { name } => {
                    dirs.insert(name);
                }
                Listed::File { name, meta } => {
                    files.insert(name, meta);
                }
            }
        }
        let mut inodes = self.inodes.lock().expect("inode lock");
        let mut entries = Vec::with_capacity(dirs.len() + files.len());
        let mut replaced = Vec::new();
        for name in &dirs {
            let (n, new) = inodes.upsert(&dir, name, Kind::Dir, None);
            if new {
                replaced.push(name.as_str());
            }
            entries.push(DirEntry {
                ino: n.ino,
                name: name.clone(),
                kind: Kind::Dir,
            });
        }
        for (name, meta) in &files {
            if dirs.contains(name) {
                tracing::warn!(dir = %dir.key, name = %name, "key is both an object and a prefix; showing the directory");
                continue;
            }
            let (n, new) = inodes.upsert(&dir, name, Kind::File, Some(meta));
            if new {
                tracing::info!(key = %n.key, version = %n.version, "object changed; new inode");
                replaced.push(name.as_str());
            }
            entries.push(DirEntry {
                ino: n.ino,
                name: name.clone(),
                kind: Kind::File,
            });
        }
        drop(inodes);
        if let Some(hook) = self.on_replaced.get() {
            for name in replaced {
                hook(dir.ino, name);
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Arc::new(entries))
    }

    /// Opens directory `ino` for reading its entries; returns the handle id.
    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        if self.node(ino)?.kind != Kind::Dir {
            return Err(Error::errno(libc::ENOTDIR));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dir = Arc::new(OpenDir {
            ino,
            snapshot: Default::default(),
        });
        self.dirs.lock().expect("dir lock").insert(fh, dir);
        Ok(fh)
    }

    /// The listing a page at `offset` of directory handle `fh` is read from: the handle's
    /// snapshot, taken at its first page and again at offset 0 (rewinddir).
    pub async fn readdir_handle(&self, fh: u64, offset: u64) -> Result<Listing> {
        let dir = self
            .dirs
            .lock()
            .expect("dir lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::errno(libc::EBADF))?;
        let mut snapshot = dir.snapshot.lock().await;
        match snapshot.as_ref() {
            Some(listing) if offset > 0 => Ok(listing.clone()),
            _ => {
                let listing = self.readdir(dir.ino).await?;
                *snapshot = Some(listing.clone());
                Ok(listing)
            }
        }
    }

    /// Closes a directory handle and drops its snapshot.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().expect("dir lock").remove(&fh);
    }

    /// Finds `name` in directory `parent` from its listing; no HEAD request.
    pub async fn lookup(&self, parent: Ino, name: &str) -> Result<Arc<Node>> {
        let listing = self.readdir(parent).await?;
        let found = listing
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .map(|i| listing[i].ino);
        match found {
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
        let names = |l: &Listing| l.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&fs.readdir_handle(fh, 0).await.unwrap()), ["b", "c"]);
        std::fs::write(d.path().join("a"), "a").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await; // past the TTL
        assert_eq!(
            names(&fs.readdir_handle(fh, 2).await.unwrap()),
            ["b", "c"],
            "a later page reads the handle's snapshot"
        );
        assert_eq!(
            names(&fs.readdir_handle(fh, 0).await.unwrap()),
            ["a", "b", "c"],
            "offset 0 (rewinddir) lists again"
        );
        fs.releasedir(fh);
        let err = fs.readdir_handle(fh, 1).await.unwrap_err();
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
