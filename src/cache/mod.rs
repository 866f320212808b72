//! The block cache: fixed-size blocks of objects in one byte-bounded in-memory cache.
//!
//! Keys are object *identity* (store, full key, [`Version`]) plus block index, so a changed
//! object (new ETag) never serves stale blocks, and several mounts of one bucket (the CSI
//! node plugin) can share blocks. A miss is fetched pinned to the key's version, so a
//! block's bytes are always that version's (or the fetch fails). Values are `Bytes`, so a
//! hit hands out a reference, not a copy.
//!
//! moka with the LRU policy: the default TinyLFU refuses to admit new blocks while a stream
//! passes through once, which is exactly the populate workload. `try_get_with` makes
//! concurrent misses on one block wait for a single fetch.
//!
//! Full blocks are read into buffers from a small [`BufferPool`]: an evicted block that no
//! reader holds any more gives its memory to the next fetch instead of back to the kernel.
//!
//! This module owns the cache and the fetch-on-miss of one block. It must not decide what to
//! fetch ahead ([`crate::prefetch`]) or talk to the store other than via
//! [`Store::read_range_into`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use moka::future::Cache;
use moka::policy::EvictionPolicy;

use crate::buffers::BufferPool;
use crate::error::Error;
use crate::store::{Store, Version};

/// What makes an object's bytes unique: store, full key and version (ETag, or size+mtime
/// where the store has no ETag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    /// Endpoint and bucket (or local directory).
    pub store: Arc<str>,
    /// Key relative to the store's root prefix.
    pub key: Arc<str>,
    /// The version every block is fetched from (the store refuses another).
    pub version: Version,
}

/// An object about to be read: its identity and length.
#[derive(Debug, Clone)]
pub struct ObjectRef {
    pub id: Arc<ObjectId>,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub object: Arc<ObjectId>,
    pub index: u64,
}

/// Hit, miss and eviction counters (shown as `fillfs_cache_*` by [`crate::metrics`], and
/// logged when a mount ends).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Blocks evicted to make room (not invalidations).
    pub evictions: AtomicU64,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct BlockCache {
    blocks: Cache<BlockKey, Bytes>,
    block_size: u64,
    stats: Arc<CacheStats>,
    /// Full blocks' buffers come back here when evicted and no reader holds them.
    buffers: Arc<BufferPool>,
}

/// Evicted blocks' buffers kept for the next fetch: enough for a stream's turnover
/// (evictions and fetches come in pairs), small beside any cache.
const FREE_BLOCKS_KEPT: usize = 8;

impl BlockCache {
    /// A cache holding at most `capacity` bytes of blocks of `block_size` bytes.
    pub fn new(capacity: u64, block_size: u64) -> Self {
        assert!(block_size > 0 && block_size <= u32::MAX as u64);
        let stats = Arc::new(CacheStats::default());
        let counted = stats.clone();
        let blocks = Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &BlockKey, v: &Bytes| v.len().max(1) as u32)
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |_k, _v, cause| {
                if cause.was_evicted() {
                    counted.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        BlockCache {
            blocks,
            block_size,
            stats,
            buffers: BufferPool::new(block_size as usize, FREE_BLOCKS_KEPT),
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes currently held.
    pub fn weighted_size(&self) -> u64 {
        self.blocks.weighted_size()
    }

    /// Number of blocks an object of `size` bytes spans.
    pub fn block_count(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }

    /// Byte range of block `index` of `obj`.
    pub fn block_range(&self, obj: &ObjectRef, index: u64) -> std::ops::Range<u64> {
        let start = index * self.block_size;
        start..(start + self.block_size).min(obj.size)
    }

    pub fn contains(&self, obj: &ObjectRef, index: u64) -> bool {
        self.blocks.contains_key(&BlockKey {
            object: obj.id.clone(),
            index,
        })
    }

    /// Returns block `index` of `obj`, fetching it from `store` on a miss. Concurrent callers
    /// for the same block share one fetch.
    pub async fn get_or_fetch(
        &self,
        store: &Store,
        obj: &ObjectRef,
        index: u64,
    ) -> Result<Bytes, Arc<Error>> {
        let key = BlockKey {
            object: obj.id.clone(),
            index,
        };
        let range = self.block_range(obj, index);
        // Set only when this caller's init ran, i.e. the block was fetched for us.
        let fetched = std::sync::atomic::AtomicBool::new(false);
        let data = self
            .blocks
            .try_get_with(key, async {
                fetched.store(true, Ordering::Relaxed);
                let buf = self.buffers.take((range.end - range.start) as usize);
                let id = &obj.id;
                let data = store
                    .read_range_into(&id.key, &id.version, range, buf)
                    .await?;
                Ok::<_, Error>(self.buffers.into_bytes(data, ()))
            })
            .await?;
        let counter = if fetched.load(Ordering::Relaxed) {
            // moka evicts in batched housekeeping that reads and writes trigger; readers
            // that hold their current block (see `prefetch`) touch the cache less, so
            // without this the cache overshoots its capacity by tens of MiB.
            self.blocks.run_pending_tasks().await;
            &self.stats.misses
        } else {
            &self.stats.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(data)
    }

    /// Drops every cached block (tests, and a future "drop caches" control).
    pub fn clear(&self) {
        self.blocks.invalidate_all();
    }
}
