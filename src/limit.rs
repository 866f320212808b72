//! The throughput limiter: one byte-rate budget shared by every object-store read of a
//! process (or, stacked, of a mount inside a node).
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
//! It must not do I/O or know about stores; callers (the [`crate::store::Store`]) call
//! [`RateLimiter::acquire`] with the byte count of each chunk as it arrives.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far ahead of the average rate a burst may run.
const BURST: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; `None` means unlimited.
    bytes_per_sec: Option<f64>,
    tat: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `mib_per_s` MiB/s; `0` means unlimited.
    pub fn new_mib(mib_per_s: f64) -> Self {
        Self::new_bytes((mib_per_s * 1024.0 * 1024.0) as u64)
    }

    /// A limiter of `bytes_per_sec` bytes/s; `0` means unlimited.
    pub fn new_bytes(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: (bytes_per_sec > 0).then_some(bytes_per_sec as f64),
            tat: Mutex::new(Instant::now()),
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

    /// The configured rate in bytes per second, `None` when unlimited.
    pub fn bytes_per_sec(&self) -> Option<u64> {
        self.bytes_per_sec.map(|r| r as u64)
    }

    /// Waits until `bytes` may pass. Cancel-safe: a dropped future has still consumed its
    /// reservation, which errs on the side of staying under the cap.
    pub async fn acquire(&self, bytes: u64) {
        if let Some(deadline) = self.reserve(bytes) {
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
    async fn unlimited_never_waits() {
        let l = RateLimiter::unlimited();
        let start = Instant::now();
        l.acquire(u64::MAX / 2).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
