//! Read-ahead for one open file handle.
//!
//! How it works. Each open handle owns a [`Prefetcher`]. On every read it classifies the
//! access: *sequential* when the offset lands near where the previous read ended (within one
//! block behind or the current window ahead — the kernel's own readahead delivers reads
//! slightly out of order), *random* otherwise. A random read cancels all read-ahead of the
//! handle (the tasks are aborted, their memory released) and resets the window. A sequential
//! read that crosses into a new block doubles the window, up to `max_window` blocks, and the
//! prefetcher keeps `window` blocks past the reader in flight, each one ranged GET through
//! the shared [`BlockCache`], so other readers of the same object find them and concurrent
//! misses are fetched once.
//!
//! Memory. All read-ahead of the process draws from one [`PrefetchBudget`] (a byte
//! semaphore sized from `--cache-size`). A block holds its permit from the moment its fetch
//! is scheduled until the reader reaches it (or it is cancelled). When the budget is
//! exhausted the window shrinks to what the handle already holds, so memory stays bounded
//! however many files are open: budget + block cache + one current block per handle.
//!
//! Several handles on one file each have their own prefetcher, hence their own stream.
//!
//! This module must not talk to FUSE, and reads object data only through the block cache.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::cache::{BlockCache, ObjectRef};
use crate::error::Error;
use crate::store::Store;

/// Blocks kept ahead right after the first sequential read.
const INITIAL_WINDOW: u64 = 2;
/// Semaphore permits are KiB: tokio semaphores count in u32 units.
const PERMIT_UNIT: u64 = 1024;

type BlockFuture = Shared<BoxFuture<'static, Result<Bytes, Arc<Error>>>>;

/// Process-wide cap on bytes fetched ahead of readers and not yet consumed.
#[derive(Clone, Debug)]
pub struct PrefetchBudget {
    permits: Arc<Semaphore>,
    bytes: u64,
}

impl PrefetchBudget {
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / PERMIT_UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        PrefetchBudget {
            permits: Arc::new(Semaphore::new(units)),
            bytes,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes currently reserved by read-ahead.
    pub fn in_use(&self) -> u64 {
        self.bytes
            .saturating_sub(self.permits.available_permits() as u64 * PERMIT_UNIT)
    }

    fn try_reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(PERMIT_UNIT).max(1) as u32;
        self.permits.clone().try_acquire_many_owned(units).ok()
    }
}

/// One block fetched (or being fetched) ahead of the reader.
struct Ahead {
    data: BlockFuture,
    abort: AbortHandle,
    _permit: OwnedSemaphorePermit,
}

/// Read-ahead state of one open handle.
pub struct Prefetcher {
    store: Store,
    cache: BlockCache,
    budget: PrefetchBudget,
    obj: ObjectRef,
    max_window: u64,
    window: u64,
    /// Where the previous read ended.
    next_offset: u64,
    /// Block of the previous read's last byte.
    last_block: Option<u64>,
    ahead: BTreeMap<u64, Ahead>,
}

impl Prefetcher {
    pub fn new(
        store: Store,
        cache: BlockCache,
        budget: PrefetchBudget,
        obj: ObjectRef,
        max_window: u64,
    ) -> Self {
        Prefetcher {
            store,
            cache,
            budget,
            obj,
            max_window: max_window.max(1),
            window: INITIAL_WINDOW.min(max_window.max(1)),
            next_offset: 0,
            last_block: None,
            ahead: BTreeMap::new(),
        }
    }

    /// Current window in blocks (for tests and metrics).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Blocks currently held ahead of the reader.
    pub fn ahead_blocks(&self) -> usize {
        self.ahead.len()
    }

    /// Plans a read of `len` bytes at `offset`: updates the window, schedules read-ahead and
    /// returns a future that yields the bytes. Planning is synchronous so callers can hold a
    /// lock for it and await the data outside the lock.
    pub fn plan_read(
        &mut self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'static, Result<Bytes, Arc<Error>>> {
        let size = self.obj.size;
        if offset >= size || len == 0 {
            return async { Ok(Bytes::new()) }.boxed();
        }
        let end = (offset + len).min(size);
        let bs = self.cache.block_size();
        let first = offset / bs;
        let last = (end - 1) / bs;

        let sequential =
            offset + bs >= self.next_offset && offset <= self.next_offset + self.window * bs;
        if !sequential {
            self.cancel_all();
            self.window = INITIAL_WINDOW.min(self.max_window);
        }
        // Blocks the reader skipped over are no longer needed.
        let keep = self.ahead.split_off(&first);
        for (_, skipped) in std::mem::replace(&mut self.ahead, keep) {
            skipped.abort.abort();
        }

        let mut parts: Vec<BlockFuture> = Vec::with_capacity((last - first + 1) as usize);
        for b in first..=last {
            match self.ahead.remove(&b) {
                // Consumed: the permit goes back now, the data lives on in the cache and
                // in the future we hand out.
                Some(a) => parts.push(a.data),
                None => parts.push(self.fetch(b)),
            }
        }

        if sequential && self.last_block.is_some_and(|lb| last > lb) {
            self.window = (self.window * 2).min(self.max_window);
        }
        self.last_block = Some(last);
        self.next_offset = end;
        if sequential {
            self.schedule_ahead(last + 1);
        }

        async move {
            if parts.len() == 1 {
                let block = parts.pop().expect("one part").await?;
                let start = (offset - first * bs) as usize;
                let stop = (end - first * bs) as usize;
                return Ok(block.slice(start..stop));
            }
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for (i, part) in parts.into_iter().enumerate() {
                let block = part.await?;
                let block_start = (first + i as u64) * bs;
                let from = offset.saturating_sub(block_start) as usize;
                let to = ((end - block_start) as usize).min(block.len());
                out.extend_from_slice(&block[from..to]);
            }
            Ok(out.freeze())
        }
        .boxed()
    }

    /// Keeps `window` blocks from `from` on in flight, as far as the budget allows.
    fn schedule_ahead(&mut self, from: u64) {
        let nblocks = self.cache.block_count(self.obj.size);
        let until = (from + self.window).min(nblocks);
        for b in from..until {
            if self.ahead.contains_key(&b) || self.cache.contains(&self.obj, b) {
                continue;
            }
            let range = self.cache.block_range(&self.obj, b);
            let Some(permit) = self.budget.try_reserve(range.end - range.start) else {
                // Memory pressure: stop growing, and shrink to what we already hold.
                self.window = (self.ahead.len() as u64).max(1);
                break;
            };
            let (data, abort) = self.spawn_fetch(b);
            self.ahead.insert(
                b,
                Ahead {
                    data,
                    abort,
                    _permit: permit,
                },
            );
        }
    }

    /// A demand fetch of one block, awaited by the reader (not spawned).
    fn fetch(&self, index: u64) -> BlockFuture {
        let (store, cache, obj) = (self.store.clone(), self.cache.clone(), self.obj.clone());
        async move { cache.get_or_fetch(&store, &obj, index).await }
            .boxed()
            .shared()
    }

    /// A read-ahead fetch: runs on its own task so it progresses without being polled.
    fn spawn_fetch(&self, index: u64) -> (BlockFuture, AbortHandle) {
        let (store, cache, obj) = (self.store.clone(), self.cache.clone(), self.obj.clone());
        let task = tokio::spawn(async move { cache.get_or_fetch(&store, &obj, index).await });
        let abort = task.abort_handle();
        let data = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Arc::new(Error::Io(std::io::Error::other(format!(
                    "read-ahead task: {e}"
                ))))),
            }
        }
        .boxed()
        .shared();
        (data, abort)
    }

    fn cancel_all(&mut self) {
        for (_, a) in std::mem::take(&mut self.ahead) {
            a.abort.abort();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.cancel_all();
    }
}
