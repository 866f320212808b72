//! The throughput limiter: one byte-rate budget shared by every object-store read (and
//! upload) of a process (or, stacked, of a mount inside a node).
//!
//! Design: a virtual-clock reservation scheduler (GCRA). The limiter keeps one instant,
//! `tat` ("theoretical arrival time"): the moment at which all bytes granted so far will have
//! been paid for at `rate`. A caller asking for `n` bytes moves `tat` forward by `n / rate`
//! under a mutex and then sleeps until `tat - burst`. Consequences:
//! - accuracy does not depend on timer resolution: sleeps only delay, the budget is kept in
//!   the clock arithmetic, so 10 MiB/s and 2 GiB/s are equally exact over any window longer
//!   than `burst`;
//! - fairness is arrival order: concurrent readers that ask chunk by chunk interleave, so
//!   each gets an equal share;
//! - a request larger than the burst is not an error (as it is for `governor`'s
//!   `until_n_ready`): it just waits for its whole reservation.
//!
//! Hand-written rather than taken from `governor` because of those last two points: governor
//! rejects cells above its burst and lets concurrent waiters race instead of queueing.
//! Pacing what arrives is not enough on its own: every byte a GET asks for is sent by the
//! server into socket buffers whether or not it has been paid for (with 257 requests open,
//! 425 MiB arrived in the first second of a 20 MiB/s fill). So a capped limiter also bounds
//! the bytes *in flight* — asked for and not yet paid — to [`FLIGHT_HORIZON`] of its rate:
//! a GET is only sent once its bytes fit ([`RateLimiter::admit`]), and the store cuts ranges
//! to at most half of that ([`RateLimiter::max_request`]). Whatever the concurrency, the
//! server can then be ahead of the cap by at most one horizon's worth of bytes.
//!
//! It must not do I/O or know about stores; callers (the [`crate::store::Store`]'s range
//! reader, and the upload paths for bytes sent) call [`RateLimiter::admit`] before a GET
//! and [`RateLimiter::acquire`] with the byte count of each chunk as it passes. It counts
//! how long callers waited ([`RateLimiter::waited`], shown by [`crate::metrics`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How far ahead of the average rate a burst may run.
const BURST: Duration = Duration::from_millis(50);

/// How much of its rate a capped limiter lets be requested and not yet paid. Long enough to
/// cover a GET's first-byte latency (so the cap is still reached), short enough that the
/// server can never be more than this ahead of the cap.
pub const FLIGHT_HORIZON: Duration = Duration::from_millis(100);

/// The floor of the in-flight budget: at very low rates, still a useful request size.
const MIN_FLIGHT: u64 = 128 * 1024;

/// The lowest cap a limiter accepts, in bytes/s (64 KiB/s): below it, `--throughput` is a typo.
pub const MIN_RATE: u64 = 64 * 1024;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; `None` means unlimited.
    bytes_per_sec: Option<f64>,
    tat: Mutex<Instant>,
    /// Bytes that may be requested and not yet paid (capped limiters only).
    flight: Option<(Arc<Semaphore>, u64)>,
    /// Nanoseconds callers have waited here, in `admit` and `acquire` (for metrics).
    waited_ns: std::sync::atomic::AtomicU64,
}

/// Bytes admitted by [`RateLimiter::admit`] and not yet paid; what is left returns to the
/// limiter's in-flight budget when dropped.
#[derive(Debug)]
pub struct Admitted {
    sem: Arc<Semaphore>,
    held: u64,
}

impl Admitted {
    /// `bytes` have been paid: they no longer count as in flight.
    pub fn paid(&mut self, bytes: u64) {
        let n = bytes.min(self.held);
        self.held -= n;
        self.sem.add_permits(n as usize);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.sem.add_permits(self.held as usize);
    }
}

impl RateLimiter {
    /// A limiter of `mib_per_s` MiB/s; `0` means unlimited.
    pub fn new_mib(mib_per_s: f64) -> Self {
        Self::new_bytes((mib_per_s * 1024.0 * 1024.0) as u64)
    }

    /// A limiter of `bytes_per_sec` bytes/s; `0` means unlimited.
    pub fn new_bytes(bytes_per_sec: u64) -> Self {
        let flight = (bytes_per_sec > 0).then(|| {
            let budget = ((bytes_per_sec as f64 * FLIGHT_HORIZON.as_secs_f64()) as u64)
                .max(MIN_FLIGHT)
                .min(u32::MAX as u64);
            (Arc::new(Semaphore::new(budget as usize)), budget)
        });
        RateLimiter {
            bytes_per_sec: (bytes_per_sec > 0).then_some(bytes_per_sec as f64),
            tat: Mutex::new(Instant::now()),
            flight,
            waited_ns: Default::default(),
        }
    }

    pub fn unlimited() -> Self {
        Self::new_bytes(0)
    }

    /// The limiters for a `--throughput` of `mib_per_s` (none when 0), ready for
    /// [`crate::store::Store::new`].
    pub fn for_throughput(mib_per_s: f64) -> Vec<std::sync::Arc<RateLimiter>> {
        if mib_per_s > 0.0 {
            vec![std::sync::Arc::new(Self::new_mib(mib_per_s))]
        } else {
            Vec::new()
        }
    }

    /// How long callers have waited here in all (admission and pacing).
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn add_wait(&self, d: Duration) {
        self.waited_ns.fetch_add(
            d.as_nanos().min(u64::MAX as u128) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The configured rate in bytes per second, `None` when unlimited.
    pub fn bytes_per_sec(&self) -> Option<u64> {
        self.bytes_per_sec.map(|r| r as u64)
    }

    /// The largest single request the store should send through this limiter (`None`: any):
    /// half the in-flight budget, so two requests overlap and hide each other's latency.
    pub fn max_request(&self) -> Option<u64> {
        self.flight.as_ref().map(|(_, budget)| (budget / 2).max(1))
    }

    /// Waits until `bytes` more may be requested from the store (`None` when unlimited).
    /// `bytes` above [`max_request`](Self::max_request)'s budget are admitted as the whole
    /// budget. Pay them back with [`Admitted::paid`] as they arrive.
    pub async fn admit(&self, bytes: u64) -> Option<Admitted> {
        let (sem, budget) = self.flight.as_ref()?;
        let n = bytes.min(*budget).max(1);
        let start = Instant::now();
        sem.acquire_many(n as u32)
            .await
            .expect("the in-flight semaphore is never closed")
            .forget();
        self.add_wait(start.elapsed());
        Some(Admitted {
            sem: sem.clone(),
            held: n,
        })
    }

    /// Waits until `bytes` may pass. Cancel-safe: a dropped future has still consumed its
    /// reservation, which errs on the side of staying under the cap.
    pub async fn acquire(&self, bytes: u64) {
        if let Some(deadline) = self.reserve(bytes) {
            self.add_wait(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Books `bytes` and returns when they may pass (`None`: now).
    fn reserve(&self, bytes: u64) -> Option<Instant> {
        let rate = self.bytes_per_sec?;
        let cost = Duration::from_secs_f64(bytes as f64 / rate);
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*tat).max(now);
        *tat = start + cost;
        let ready = tat.checked_sub(BURST).unwrap_or(now);
        (ready > now).then_some(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused tokio time: the arithmetic is checked exactly, without a noisy wall clock.
    #[tokio::test(start_paused = true)]
    async fn paces_to_rate_with_small_chunks() {
        let l = RateLimiter::new_mib(10.0);
        let start = Instant::now();
        for _ in 0..(20 * 16) {
            l.acquire(64 * 1024).await; // 20 MiB in 64 KiB chunks
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 2.0).abs() < 0.06, "20 MiB at 10 MiB/s took {secs}s");
    }

    #[tokio::test(start_paused = true)]
    async fn accurate_at_high_rate() {
        let l = RateLimiter::new_mib(2048.0);
        let start = Instant::now();
        for _ in 0..(4096 * 4) {
            l.acquire(256 * 1024).await; // 4 GiB in 256 KiB chunks
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 2.0).abs() < 0.06, "4 GiB at 2 GiB/s took {secs}s");
    }

    #[tokio::test(start_paused = true)]
    async fn request_larger_than_burst_waits_its_share() {
        let l = RateLimiter::new_mib(10.0);
        let start = Instant::now();
        l.acquire(30 * 1024 * 1024).await;
        l.acquire(1).await;
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 3.0).abs() < 0.06, "30 MiB request took {secs}s");
        // What it waited is counted (the burst passes at once).
        let waited = l.waited().as_secs_f64();
        assert!((waited - 2.95).abs() < 0.06, "waited {waited}s");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_readers_share_fairly() {
        let l = std::sync::Arc::new(RateLimiter::new_mib(8.0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..64 {
                    l.acquire(64 * 1024).await; // 4 MiB each
                }
                start.elapsed().as_secs_f64()
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        // 16 MiB at 8 MiB/s: everyone finishes near 2 s. An unfair limiter would let one
        // reader finish at 0.5 s and starve the others.
        for d in &done {
            assert!((1.7..=2.1).contains(d), "finish times {done:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_until_their_bytes_fit_in_flight() {
        let l = RateLimiter::new_mib(20.0);
        // 100 ms of 20 MiB/s in flight, requests of half that.
        assert_eq!(l.max_request(), Some(1024 * 1024));
        let mut a = l.admit(1024 * 1024).await.unwrap();
        let _b = l.admit(1024 * 1024).await.unwrap();
        // The budget is spent: a third request waits until bytes are paid back.
        let third = tokio::time::timeout(Duration::from_secs(10), l.admit(512 * 1024));
        assert!(third.await.is_err(), "a third request was admitted");
        a.paid(512 * 1024);
        let c = tokio::time::timeout(Duration::from_millis(1), l.admit(512 * 1024)).await;
        assert!(c.is_ok(), "paid bytes were not returned to the budget");
        drop(c);
        drop(a);
        // Dropping returns what was held: 1 MiB free again (the other is `_b`'s).
        let d = tokio::time::timeout(Duration::from_millis(1), l.admit(1024 * 1024)).await;
        assert!(d.is_ok(), "a dropped admission kept its bytes");
        assert!(RateLimiter::unlimited().admit(u64::MAX).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let l = RateLimiter::unlimited();
        let start = Instant::now();
        l.acquire(u64::MAX / 2).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
