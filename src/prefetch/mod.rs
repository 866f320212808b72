//! Read-ahead for one open file handle.
//!
//! How it works. Each open handle owns a [`Prefetcher`], which is either *streaming* or
//! not. A handle starts not streaming: its reads are answered by *pieces*, one ranged GET
//! of exactly the bytes asked for (unless every block of the read is already at hand: held
//! by the handle or in the cache), so a random reader pays for 256 KiB, not for a 4 MiB
//! block, per miss (fio randread 256 KiB at iodepth 1, 20 ms first byte: see
//! `bench/results/readpath.md`). A read that lands within [`NEAR`] of where the previous one
//! ended starts the stream; so does a first read at offset 0 (how `cp`, `cat` and every
//! whole-file reader begin: a piece there would fetch its bytes twice) and any read of an
//! object that fits in one block (one GET for the whole small file). Streaming, a read is *sequential* when it lands within
//! one block behind or the current window ahead of the previous one (the kernel's own
//! readahead delivers reads slightly out of order); anything else ends the stream: all
//! read-ahead is cancelled (tasks aborted, memory released) and the read is a piece again.
//! A sequential read that crosses into a new block doubles the window, up to `max_window`
//! blocks, and the prefetcher keeps `window` blocks past the reader in flight, each one
//! ranged GET through the shared [`BlockCache`], so other readers of the same object find
//! them and concurrent misses are fetched once.
//!
//! Under a cap. Read-ahead beyond what the cap delivers in [`CAP_WINDOW`] only moves bytes
//! nobody may read (a reader that stops early has paid for them, and they delay everyone
//! else's reads): [`window_under_cap`] bounds the window to that (at least two blocks).
//! And demand goes first at the limiter: a piece, a reader's miss, and read-ahead a reader
//! has reached are *urgent* ([`crate::limit::with_urgency`]), admitted before read-ahead.
//!
//! Memory. Every block a handle holds outside the cache — read ahead, being fetched for a
//! reader, or kept as the handle's current block — draws from one [`PrefetchBudget`] (a
//! byte semaphore, the half of `--cache-size` the cache does not use) through a [`Hold`].
//! Read-ahead only takes what is free: when the budget is exhausted the window shrinks to
//! what the handle already holds. A reader's miss waits for its bytes, and *demand goes
//! first*: it takes them back from the oldest holds of any handle (an idle handle's current
//! block, read-ahead nobody has reached), which are dropped (read-ahead aborted) and
//! fetched again through the cache if their handle comes back; a small fixed spare
//! ([`DEMAND_SPARE`]) serves misses first. So memory is bounded however many handles are
//! open (before: one current block per handle on top of the budget; 128 handles under
//! 256 MiB peaked at 719 MiB, now 328 MiB), and no handle can starve another.
//!
//! Several handles on one file each have their own prefetcher, hence their own stream.
//!
//! This module must not talk to FUSE, and reads object data only through the block cache.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
/// How close to the end of the previous read a read must start to begin a stream (either
/// side: the kernel's readahead reads of one stream arrive slightly out of order).
pub const NEAR: u64 = 1024 * 1024;
/// Under a cap, the read-ahead window holds at most what the cap delivers in this time:
/// twice the limiter's in-flight horizon, which is what keeps a stream at the cap.
pub const CAP_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

/// The window, in blocks, for a handle reading through `limiters`: `max_window`, bounded
/// under a cap to what the lowest cap delivers in [`CAP_WINDOW`], and never below two
/// blocks (the one being read and the next). Measured without it: half of a 512 MiB file
/// read through `--throughput 32` took 1.25x the ideal time (the window fetched far beyond
/// the reader, sharing the cap between the blocks it needed and blocks it never read).
pub fn window_under_cap(
    max_window: u64,
    limiters: &[Arc<crate::limit::RateLimiter>],
    block_size: u64,
) -> u64 {
    let max_window = max_window.max(1);
    match limiters.iter().filter_map(|l| l.bytes_per_sec()).min() {
        None => max_window,
        Some(rate) => {
            let bytes = (rate as f64 * CAP_WINDOW.as_secs_f64()) as u64;
            bytes.div_ceil(block_size.max(1)).max(2).min(max_window)
        }
    }
}
/// Semaphore permits are KiB: tokio semaphores count in u32 units.
const PERMIT_UNIT: u64 = 1024;

type BlockFuture = Shared<BoxFuture<'static, Result<Bytes, Arc<Error>>>>;

/// Process-wide cap on the bytes handles hold outside the cache: read-ahead not yet
/// consumed, readers' misses being fetched, and each handle's current block.
#[derive(Clone, Debug)]
pub struct PrefetchBudget {
    permits: Arc<Semaphore>,
    bytes: u64,
    /// [`DEMAND_SPARE`]: for readers' misses only, so that a few streams' current blocks
    /// never have to take back each other's (each taken-back block is fetched again).
    spare: Arc<Semaphore>,
    /// Every hold, oldest first (dead ones are skipped and pruned): what a reader's miss
    /// takes back when the budget is spent.
    holds: Arc<std::sync::Mutex<std::collections::VecDeque<std::sync::Weak<Hold>>>>,
}

impl PrefetchBudget {
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / PERMIT_UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        PrefetchBudget {
            permits: Arc::new(Semaphore::new(units)),
            bytes,
            spare: Arc::new(Semaphore::new((DEMAND_SPARE / PERMIT_UNIT) as usize)),
            holds: Default::default(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes currently reserved by holds (the [`DEMAND_SPARE`] not counted).
    pub fn in_use(&self) -> u64 {
        self.bytes
            .saturating_sub(self.permits.available_permits() as u64 * PERMIT_UNIT)
    }

    fn try_reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(PERMIT_UNIT).max(1) as u32;
        self.permits.clone().try_acquire_many_owned(units).ok()
    }

    /// `bytes` for a reader's miss: free ones, else from the small [`DEMAND_SPARE`] kept for
    /// misses, else taken back from the oldest holds, else (every byte is in a fetch about to
    /// finish) the next ones returned.
    async fn reserve_for_demand(&self, bytes: u64) -> OwnedSemaphorePermit {
        let units = bytes
            .div_ceil(PERMIT_UNIT)
            .clamp(1, (self.bytes / PERMIT_UNIT).max(1)) as u32;
        loop {
            if let Ok(p) = self.permits.clone().try_acquire_many_owned(units) {
                return p;
            }
            if let Ok(p) = self.spare.clone().try_acquire_many_owned(units) {
                return p;
            }
            if let Some(victim) = self.oldest_hold() {
                victim.release();
                continue;
            }
            // Nothing to take back: holds appear as fetches finish; look again soon.
            let wait = self.permits.clone().acquire_many_owned(units);
            if let Ok(Ok(p)) = tokio::time::timeout(RECLAIM_POLL, wait).await {
                return p;
            }
        }
    }

    /// The hold to take back, removed from the queue: the oldest finished read-ahead no
    /// reader has reached yet (it was also put in the cache, so its reader most likely
    /// finds it there), else the oldest block a reader has had (an idle handle's current
    /// block). A fetch under way is never taken back: its bytes would be fetched for nothing
    /// (it finishes soon, and the next look finds it).
    fn oldest_hold(&self) -> Option<Arc<Hold>> {
        let mut q = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        // Released holds go; a miss's hold stays even before its permit arrives.
        q.retain(|w| w.upgrade().is_some_and(|h| h.data().is_some()));
        let pick = |consumed: bool| {
            q.iter()
                .position(|w| w.upgrade().is_some_and(|h| h.can_give_back(consumed)))
        };
        let at = pick(false).or_else(|| pick(true))?;
        q.remove(at).and_then(|w| w.upgrade())
    }

    /// A hold of `data` (with its `permit` and, for read-ahead, its task), newest in the
    /// queue.
    fn hold(
        &self,
        data: BlockFuture,
        permit: Option<OwnedSemaphorePermit>,
        read_ahead: Option<(AbortHandle, Arc<AtomicBool>)>,
    ) -> Arc<Hold> {
        let consumed = read_ahead.is_none(); // only read-ahead has a task to abort
        let (abort, urgent) = read_ahead.unzip();
        let h = Arc::new(Hold(std::sync::Mutex::new(Some(Held {
            data,
            permit,
            abort,
            urgent,
            consumed,
        }))));
        let mut q = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= 4096 {
            q.retain(|w| w.strong_count() > 0);
        }
        q.push_back(Arc::downgrade(&h));
        h
    }
}

/// Bytes beyond the budget that readers' misses (never read-ahead) may hold: the fixed
/// part of the memory bound (eight 4 MiB blocks). Measured: without it, 4 streams under
/// `--cache-size 64MiB` took back each other's current blocks and fetched 1.03-1.04x the
/// data; with 16 MiB, 1.016-1.023x; with 32 MiB, every block once (1.000x).
pub const DEMAND_SPARE: u64 = 32 * 1024 * 1024;

/// How often a reader's miss looks again for bytes to take back when every byte of the
/// budget is in a fetch under way.
const RECLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// One block a handle holds outside the cache, with its share of the budget. Dropped or
/// released: the data reference goes, the permit returns, a read-ahead fetch still
/// running is aborted.
pub struct Hold(std::sync::Mutex<Option<Held>>);

struct Held {
    data: BlockFuture,
    permit: Option<OwnedSemaphorePermit>,
    abort: Option<AbortHandle>,
    /// Read-ahead's urgency at the limiter, raised when a reader reaches it.
    urgent: Option<Arc<AtomicBool>>,
    /// A reader has had this block (a miss, or read-ahead it reached).
    consumed: bool,
}

impl Hold {
    /// The block, unless it was taken back.
    fn data(&self) -> Option<BlockFuture> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|h| h.data.clone())
    }

    /// Gives the hold the permit its fetch reserved (a reader's miss reserves before its
    /// bytes exist); a hold already released returns it at once.
    fn set_permit(&self, permit: OwnedSemaphorePermit) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = g.as_mut() {
            h.permit = Some(permit);
        }
    }

    /// The block became a reader's: its fetch must now finish whatever happens to the hold
    /// (a reader awaits it; aborting it would fail the read).
    fn disarm(&self) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = g.as_mut() {
            h.abort = None;
            h.consumed = true;
            if let Some(u) = &h.urgent {
                u.store(true, Ordering::Relaxed); // a reader waits for it now
            }
        }
    }

    /// Whether taking this hold back frees budget without wasting a fetch: it has a permit,
    /// its fetch has finished, and a reader has (`consumed`) or has not had the block.
    fn can_give_back(&self, consumed: bool) -> bool {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().is_some_and(|h| {
            // Read-ahead is a task nobody polls through `data` until its reader comes.
            let done = h.data.peek().is_some() || h.abort.as_ref().is_some_and(|a| a.is_finished());
            h.permit.is_some() && done && h.consumed == consumed
        })
    }

    /// Drops the block reference, returns the permit, aborts a fetch still running.
    fn release(&self) {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Held {
            abort: Some(abort), ..
        }) = held
        {
            abort.abort();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
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
    /// Blocks fetched (or being fetched) ahead of the reader.
    ahead: BTreeMap<u64, Arc<Hold>>,
    /// The last blocks this handle read (at most [`RECENT_BLOCKS`]): the kernel reads a
    /// block in several pieces (1 MiB reads of a 4 MiB block), and with other streams
    /// filling the shared cache an LRU may evict a block between its pieces; holding them
    /// here makes each block one GET whatever the cache does. Measured: 4 parallel `cp`
    /// of 512 MiB files from a mount made 830 GETs for 512 blocks in 15 s before, 512 in
    /// 4.3 s after (same machine, same emulator). A block moved here from `ahead` keeps its
    /// hold, so memory stays bounded.
    recent: BTreeMap<u64, Arc<Hold>>,
    /// Whether reads are served by blocks and read-ahead (else by pieces).
    streaming: bool,
    /// Set by a read whose block failed: the next plan drops everything the handle holds
    /// (failed futures included) and starts the stream again, as mountpoint-s3 resets its
    /// prefetcher. Without it a failed block's future stayed held and every later read of
    /// it on the handle failed with no new request.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

/// Blocks a handle keeps after reading them: the current one (measured enough: one GET
/// per block with 4 and 8 parallel streams).
const RECENT_BLOCKS: usize = 1;

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
            recent: BTreeMap::new(),
            streaming: false,
            failed: Default::default(),
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

        if self.failed.swap(false, Ordering::Relaxed) {
            // A block failed since the last plan: nothing held is trusted, the stream
            // starts again from this read.
            self.cancel_all();
            self.window = INITIAL_WINDOW.min(self.max_window);
            self.last_block = None;
            self.streaming = false;
        }
        let sequential = if self.streaming {
            offset + bs >= self.next_offset && offset <= self.next_offset + self.window * bs
        } else {
            // A small object is one GET whatever the access; a first read at the start is
            // how whole-file readers begin (a piece would fetch its bytes twice); else a
            // stream starts where a read continues the previous one.
            size <= bs
                || (self.last_block.is_none() && offset == 0)
                || (self.last_block.is_some()
                    && offset + NEAR >= self.next_offset
                    && offset <= self.next_offset + NEAR)
        };
        if !sequential && self.streaming {
            self.cancel_all();
            self.window = INITIAL_WINDOW.min(self.max_window);
        }
        self.streaming = sequential;
        if !sequential && !self.at_hand(first, last) {
            self.last_block = Some(last);
            self.next_offset = end;
            return self.piece(offset..end);
        }
        // Blocks more than one behind this read are no longer needed. The one just behind
        // is kept: the kernel's readahead delivers reads of one stream slightly out of
        // order over several FUSE threads, and aborting that block mid-GET would make its
        // late read fetch it again.
        let keep = self.ahead.split_off(&first);
        drop(std::mem::replace(&mut self.ahead, keep)); // dropped holds abort their fetch

        // Each part: the block's future, and whether it was fetched ahead (a failed
        // read-ahead is fetched again for the reader before the read fails).
        let mut parts: Vec<(BlockFuture, bool)> = Vec::with_capacity((last - first + 1) as usize);
        for b in first..=last {
            // Ahead or recent, unless taken back by another reader's miss. A held future
            // that has already failed is not used again.
            let usable = |d: &BlockFuture| !matches!(d.peek(), Some(Err(_)));
            let held = match self.ahead.remove(&b) {
                Some(h) => {
                    h.disarm();
                    h.data().filter(usable).map(|d| (d, h, true))
                }
                None => self
                    .recent
                    .get(&b)
                    .and_then(|h| h.data().filter(usable).map(|d| (d, h.clone(), false))),
            };
            let (data, hold, ahead) = held.unwrap_or_else(|| {
                let (d, h) = self.demand(b);
                (d, h, false)
            });
            parts.push((data, ahead));
            self.recent.insert(b, hold);
        }
        while self.recent.len() > RECENT_BLOCKS {
            // Drop the block farthest from this read.
            let far = if self
                .recent
                .first_key_value()
                .is_some_and(|(k, _)| *k < first)
            {
                *self.recent.first_key_value().expect("non-empty").0
            } else {
                *self.recent.last_key_value().expect("non-empty").0
            };
            self.recent.remove(&far);
        }

        if sequential && self.last_block.is_some_and(|lb| last > lb) {
            self.window = (self.window * 2).min(self.max_window);
        }
        self.last_block = Some(last);
        self.next_offset = end;
        if sequential {
            self.schedule_ahead(last + 1);
        }

        let (store, cache, obj, failed) = (
            self.store.clone(),
            self.cache.clone(),
            self.obj.clone(),
            self.failed.clone(),
        );
        // A part's bytes; a read-ahead that failed (perhaps long before the reader came)
        // is fetched once more before the read fails. Any failure resets the handle.
        let block = move |i: usize, (part, ahead): (BlockFuture, bool)| {
            let (store, cache, obj, failed) =
                (store.clone(), cache.clone(), obj.clone(), failed.clone());
            async move {
                let mut r = part.await;
                if r.is_err() && ahead {
                    let urgent = Arc::new(AtomicBool::new(true));
                    let fetch = cache.get_or_fetch(&store, &obj, first + i as u64);
                    r = crate::limit::with_urgency(urgent, fetch).await;
                }
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            }
        };
        async move {
            if parts.len() == 1 {
                let block = block(0, parts.pop().expect("one part")).await?;
                let start = (offset - first * bs) as usize;
                let stop = (end - first * bs) as usize;
                return Ok(block.slice(start..stop));
            }
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for (i, part) in parts.into_iter().enumerate() {
                let block = block(i, part).await?;
                let block_start = (first + i as u64) * bs;
                let from = offset.saturating_sub(block_start) as usize;
                let to = ((end - block_start) as usize).min(block.len());
                out.extend_from_slice(&block[from..to]);
            }
            Ok(out.freeze())
        }
        .boxed()
    }

    /// Whether every block of `first..=last` is held by the handle or in the cache.
    fn at_hand(&self, first: u64, last: u64) -> bool {
        let usable = |h: &Arc<Hold>| h.data().is_some_and(|d| !matches!(d.peek(), Some(Err(_))));
        (first..=last).all(|b| {
            self.ahead.get(&b).is_some_and(usable)
                || self.recent.get(&b).is_some_and(usable)
                || self.cache.contains(&self.obj, b)
        })
    }

    /// A read outside any stream: one ranged GET of exactly `range`, urgent at the limiter,
    /// not cached (a random reader would evict blocks for bytes read once; the kernel's page
    /// cache keeps what it reads).
    fn piece(&self, range: std::ops::Range<u64>) -> BoxFuture<'static, Result<Bytes, Arc<Error>>> {
        let (store, obj) = (self.store.clone(), self.obj.clone());
        async move {
            let urgent = Arc::new(AtomicBool::new(true));
            crate::limit::with_urgency(
                urgent,
                store.read_range(&obj.id.key, &obj.id.version, range),
            )
            .await
            .map_err(Arc::new)
        }
        .boxed()
    }

    /// Keeps `window` blocks from `from` on in flight, as far as the budget allows.
    fn schedule_ahead(&mut self, from: u64) {
        let nblocks = self.cache.block_count(self.obj.size);
        let until = (from + self.window).min(nblocks);
        for b in from..until {
            if self.ahead.get(&b).is_some_and(|h| h.data().is_some())
                || self.cache.contains(&self.obj, b)
            {
                continue;
            }
            let range = self.cache.block_range(&self.obj, b);
            let Some(permit) = self.budget.try_reserve(range.end - range.start) else {
                // Memory pressure: stop growing, and shrink to what we already hold.
                self.window = (self.ahead.len() as u64).max(1);
                break;
            };
            let (data, abort, urgent) = self.spawn_fetch(b);
            let hold = self.budget.hold(data, Some(permit), Some((abort, urgent)));
            self.ahead.insert(b, hold);
        }
    }

    /// A reader's block that this handle does not hold: from the cache when it is there
    /// (with budget if some is free), else fetched once its bytes are reserved — taken back
    /// from other holds if need be. Awaited by the reader (not spawned).
    fn demand(&self, index: u64) -> (BlockFuture, Arc<Hold>) {
        let range = self.cache.block_range(&self.obj, index);
        let len = range.end - range.start;
        let (store, cache, obj) = (self.store.clone(), self.cache.clone(), self.obj.clone());
        if self.cache.contains(&self.obj, index) {
            // Urgent too: the block may be evicted before it is taken, and then fetched.
            let data = async move {
                let urgent = Arc::new(AtomicBool::new(true));
                crate::limit::with_urgency(urgent, cache.get_or_fetch(&store, &obj, index)).await
            }
            .boxed()
            .shared();
            let permit = self.budget.try_reserve(len);
            return (data.clone(), self.budget.hold(data, permit, None));
        }
        let budget = self.budget.clone();
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<Hold>>> = Default::default();
        let my_slot = slot.clone();
        let data = async move {
            let permit = budget.reserve_for_demand(len).await;
            let urgent = Arc::new(AtomicBool::new(true));
            let fetch = cache.get_or_fetch(&store, &obj, index);
            let r = crate::limit::with_urgency(urgent, fetch).await;
            match my_slot.get().and_then(std::sync::Weak::upgrade) {
                Some(hold) => hold.set_permit(permit),
                None => drop(permit), // the handle has let go of the block already
            }
            r
        }
        .boxed()
        .shared();
        let hold = self.budget.hold(data.clone(), None, None);
        let _ = slot.set(Arc::downgrade(&hold));
        (data, hold)
    }

    /// A read-ahead fetch: runs on its own task so it progresses without being polled; not
    /// urgent at the limiter until a reader reaches it ([`Hold::disarm`]).
    fn spawn_fetch(&self, index: u64) -> (BlockFuture, AbortHandle, Arc<AtomicBool>) {
        let (store, cache, obj) = (self.store.clone(), self.cache.clone(), self.obj.clone());
        let urgent = Arc::new(AtomicBool::new(false));
        let fetch = crate::limit::with_urgency(urgent.clone(), async move {
            cache.get_or_fetch(&store, &obj, index).await
        });
        let task = tokio::spawn(fetch);
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
        (data, abort, urgent)
    }

    fn cancel_all(&mut self) {
        self.recent.clear();
        self.ahead.clear(); // dropped holds abort their fetch
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.cancel_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ObjectId;
    use crate::store::{SourceUrl, StoreConfig, Version};

    const BS: u64 = 64 * 1024;

    /// A real store over a temp directory (OpenDAL fs), holding one object of `size` bytes.
    fn setup(size: u64) -> (tempfile::TempDir, Store, ObjectRef, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(dir.path().join("obj"), &data).unwrap();
        let url = SourceUrl::parse(&format!("file://{}", dir.path().display())).unwrap();
        let store = Store::new(&StoreConfig::new(url, None, None), Vec::new()).unwrap();
        let obj = ObjectRef {
            id: Arc::new(ObjectId {
                store: "t".into(),
                key: "obj".into(),
                version: Version::Any,
            }),
            size,
        };
        (dir, store, obj, data)
    }

    #[tokio::test]
    async fn sequential_reads_grow_the_window_and_return_exact_bytes() {
        let (_d, store, obj, data) = setup(64 * BS + 5);
        let cache = BlockCache::new(64 * BS, BS);
        let budget = PrefetchBudget::new(32 * BS);
        let mut p = Prefetcher::new(store, cache, budget.clone(), obj, 16);
        let mut off = 0u64;
        let mut max_window = 0;
        while off < data.len() as u64 {
            let got = p.plan_read(off, 40_000).await.unwrap();
            assert_eq!(&got[..], &data[off as usize..(off as usize + got.len())]);
            assert!(p.ahead_blocks() as u64 <= p.window());
            max_window = max_window.max(p.window());
            off += got.len() as u64;
        }
        assert_eq!(
            max_window, 16,
            "window must grow to max_window on a sequential stream"
        );
        assert!(budget.in_use() > 0, "the stream held read-ahead");
        drop(p);
        assert_eq!(budget.in_use(), 0, "a closed handle keeps no budget");
    }

    #[tokio::test]
    async fn a_seek_outside_the_window_cancels_read_ahead() {
        let (_d, store, obj, data) = setup(256 * BS);
        let cache = BlockCache::new(512 * BS, BS);
        let budget = PrefetchBudget::new(64 * BS);
        let mut p = Prefetcher::new(store, cache, budget.clone(), obj, 32);
        for i in 0..8 {
            p.plan_read(i * BS, BS).await.unwrap();
        }
        assert!(p.window() > INITIAL_WINDOW);
        assert!(p.ahead_blocks() > 0);
        let far = 200 * BS + 17;
        let got = p.plan_read(far, 100).await.unwrap();
        assert_eq!(&got[..], &data[far as usize..far as usize + 100]);
        assert_eq!(
            p.window(),
            INITIAL_WINDOW,
            "random access resets the window"
        );
        assert!(
            p.ahead_blocks() as u64 <= INITIAL_WINDOW,
            "old read-ahead is cancelled"
        );
    }

    #[tokio::test]
    async fn the_budget_bounds_read_ahead_of_all_handles_and_windows_shrink() {
        let (_d, store, obj, _data) = setup(128 * BS);
        let cache = BlockCache::new(256 * BS, BS);
        let budget = PrefetchBudget::new(6 * BS);
        let mut handles: Vec<Prefetcher> = (0..4)
            .map(|_| {
                Prefetcher::new(
                    store.clone(),
                    cache.clone(),
                    budget.clone(),
                    obj.clone(),
                    64,
                )
            })
            .collect();
        for step in 0..20 {
            for (h, p) in handles.iter_mut().enumerate() {
                // Each handle streams its own region so they cannot share blocks.
                p.plan_read((h as u64 * 32 + step) * BS, BS).await.unwrap();
            }
            let ahead: usize = handles.iter().map(|p| p.ahead_blocks()).sum();
            assert!(ahead <= 6, "step {step}: {ahead} blocks ahead, budget 6");
        }
        let held: usize = handles.iter().map(|p| p.ahead_blocks()).sum();
        assert!(
            held <= 6,
            "read-ahead held {held} blocks with a 6-block budget"
        );
        assert!(
            handles.iter().any(|p| p.window() < 64),
            "windows must shrink under pressure"
        );
        drop(handles);
        assert_eq!(
            budget.in_use(),
            0,
            "closing handles releases their read-ahead"
        );
    }

    #[tokio::test]
    async fn a_readers_miss_takes_budget_back_from_idle_handles() {
        let (_d, store, obj, data) = setup(256 * BS);
        // A cache too small to hold anything useful: every block a handle keeps is budget.
        let cache = BlockCache::new(4 * BS, BS);
        let budget = PrefetchBudget::new(4 * BS);
        let mut idle: Vec<Prefetcher> = (0..8)
            .map(|_| Prefetcher::new(store.clone(), cache.clone(), budget.clone(), obj.clone(), 4))
            .collect();
        // Eight handles each start a stream (a read, then one continuing it) and stop: they
        // hold what the budget has.
        for (h, p) in idle.iter_mut().enumerate() {
            p.plan_read(h as u64 * 16 * BS, 100).await.unwrap();
            p.plan_read(h as u64 * 16 * BS + 100, BS - 100)
                .await
                .unwrap();
        }
        assert_eq!(
            budget.in_use(),
            budget.bytes(),
            "the idle handles hold the whole budget (the case under test)"
        );
        // A ninth reader is not starved by them, and the bytes are right.
        let mut p = Prefetcher::new(store, cache, budget.clone(), obj, 4);
        for i in 0..16u64 {
            let off = (200 + i) * BS;
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), p.plan_read(off, BS))
                .await
                .expect("a reader waited for budget held by idle handles")
                .unwrap();
            assert_eq!(&got[..], &data[off as usize..(off + BS) as usize]);
        }
        // The idle handles read again: taken-back blocks are fetched again, correctly.
        for (h, p) in idle.iter_mut().enumerate() {
            let off = h as u64 * 16 * BS + 100;
            let got = p.plan_read(off, 1000).await.unwrap();
            assert_eq!(&got[..], &data[off as usize..off as usize + 1000]);
        }
    }

    #[tokio::test]
    async fn a_failed_block_is_fetched_again_on_the_same_handle() {
        let (dir, store, obj, data) = setup(64 * BS);
        let cache = BlockCache::new(64 * BS, BS);
        let budget = PrefetchBudget::new(32 * BS);
        let mut p = Prefetcher::new(store, cache, budget, obj, 8);
        // A stream is under way: blocks are held ahead and the current one is kept.
        for i in 0..4 {
            p.plan_read(i * BS, BS).await.unwrap();
        }
        // The object goes away: the reads fail (read-ahead and demand alike).
        let saved = dir.path().join("saved");
        std::fs::rename(dir.path().join("obj"), &saved).unwrap();
        let far = 40 * BS;
        assert!(p.plan_read(far, BS).await.is_err());
        assert!(p.plan_read(far, BS).await.is_err(), "still gone");
        // Back again: the very same handle reads the block that failed, and the stream
        // goes on (before: the failed future stayed held and every read of it failed).
        std::fs::rename(&saved, dir.path().join("obj")).unwrap();
        for off in [far, far + 100, far + BS, 4 * BS] {
            let got = p.plan_read(off, 1000).await.expect("recovered");
            assert_eq!(&got[..], &data[off as usize..off as usize + 1000]);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_read_ahead_that_failed_is_fetched_again_for_its_reader() {
        let (dir, store, obj, data) = setup(64 * BS);
        let cache = BlockCache::new(64 * BS, BS);
        let budget = PrefetchBudget::new(32 * BS);
        let mut p = Prefetcher::new(store, cache, budget, obj, 8);
        // The first read schedules read-ahead of blocks 1 and 2 (spawned, not yet run on
        // this single thread); its own block is fetched when it is awaited.
        let first = p.plan_read(0, BS);
        assert!(p.ahead_blocks() >= 1);
        // The object is away while the read-ahead runs: it fails.
        let saved = dir.path().join("saved");
        std::fs::rename(dir.path().join("obj"), &saved).unwrap();
        // Long enough for the read-ahead tasks (and the blocking-pool opens they wait
        // for) to run and fail.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        std::fs::rename(&saved, dir.path().join("obj")).unwrap();
        assert_eq!(&first.await.unwrap()[..], &data[..BS as usize]);
        // The reader reaches block 1: its read-ahead failed long ago, the reader's read
        // fetches it again instead of failing.
        let got = p
            .plan_read(BS, BS)
            .await
            .expect("failed read-ahead fetched again");
        assert_eq!(&got[..], &data[BS as usize..2 * BS as usize]);
    }

    #[tokio::test]
    async fn random_reads_are_pieces_of_what_was_asked() {
        let (_d, store, obj, data) = setup(256 * BS);
        let cache = BlockCache::new(512 * BS, BS);
        let budget = PrefetchBudget::new(64 * BS);
        let mut p = Prefetcher::new(store.clone(), cache.clone(), budget.clone(), obj, 32);
        let before = store.stats().bytes_read.load(Ordering::Relaxed);
        let mut asked = 0;
        // Far apart, never at offset 0: no read continues another.
        for (i, off) in [200 * BS + 17, 3 * BS + 5, 120 * BS, 60 * BS + 999, 250 * BS]
            .into_iter()
            .enumerate()
        {
            let len = 1000 + i as u64 * 5000;
            let got = p.plan_read(off, len).await.unwrap();
            assert_eq!(&got[..], &data[off as usize..(off + len) as usize]);
            asked += len;
            assert_eq!(p.ahead_blocks(), 0, "read-ahead for a random read");
        }
        let fetched = store.stats().bytes_read.load(Ordering::Relaxed) - before;
        assert_eq!(fetched, asked, "random reads fetch exactly what they ask");
        assert_eq!(cache.weighted_size(), 0, "pieces are not cached as blocks");
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_read_that_continues_the_previous_one_starts_the_stream() {
        let (_d, store, obj, data) = setup(256 * BS);
        let cache = BlockCache::new(512 * BS, BS);
        let budget = PrefetchBudget::new(64 * BS);
        let mut p = Prefetcher::new(store, cache.clone(), budget, obj, 32);
        let mut off = 100 * BS + 5;
        p.plan_read(off, 4096).await.unwrap();
        assert_eq!(p.ahead_blocks(), 0);
        off += 4096;
        let got = p.plan_read(off, BS).await.unwrap();
        assert_eq!(&got[..], &data[off as usize..(off + BS) as usize]);
        assert!(
            p.ahead_blocks() > 0,
            "no read-ahead once the reader continued"
        );
        // A block read at hand (in the cache) serves a random read without a piece.
        let cached = 100 * BS + 77;
        assert!(cache.contains(&p.obj, 100));
        let got = p.plan_read(cached, 10).await.unwrap();
        assert_eq!(&got[..], &data[cached as usize..cached as usize + 10]);
        // A jump far away ends the stream: its read-ahead is cancelled.
        p.plan_read(10 * BS, 10).await.unwrap();
        assert_eq!(p.ahead_blocks(), 0);
    }

    #[test]
    fn the_window_under_a_cap_is_what_the_cap_delivers_in_200_ms() {
        use crate::limit::RateLimiter;
        let mib = 1024 * 1024;
        let lim = |r: f64| vec![Arc::new(RateLimiter::new_mib(r))];
        assert_eq!(
            window_under_cap(16, &[], 4 * mib),
            16,
            "no cap: as configured"
        );
        assert_eq!(
            window_under_cap(16, &lim(32.0), 4 * mib),
            2,
            "6.4 MiB: two blocks"
        );
        assert_eq!(
            window_under_cap(16, &lim(1.0), 4 * mib),
            2,
            "never below two"
        );
        assert_eq!(window_under_cap(16, &lim(200.0), 4 * mib), 10);
        assert_eq!(
            window_under_cap(16, &lim(2000.0), 4 * mib),
            16,
            "never above the max"
        );
        // The lowest of stacked caps counts (a volume cap under a node cap).
        let both = vec![
            Arc::new(RateLimiter::new_mib(2000.0)),
            Arc::new(RateLimiter::new_mib(100.0)),
        ];
        assert_eq!(window_under_cap(16, &both, 4 * mib), 5);
    }
}
