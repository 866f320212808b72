//! Runtime emulation knobs (latency, bandwidth cap, fault injection), the
//! seeded RNG that drives probabilistic faults, and the request/byte counters.
//! All of it is lock-free or behind short locks so the handle can change it
//! while the server runs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// Probabilistic fault injection for GET/HEAD. Rates are probabilities in `[0, 1]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// A GET or HEAD answers 503 SlowDown or 500 InternalError (50/50) before any body.
    pub error_rate: f64,
    /// A GET body stream errors out part-way (the client sees a truncated body / reset).
    pub reset_rate: f64,
    /// A GET body has one byte flipped (same length, same headers).
    pub corrupt_rate: f64,
}

/// Faults of UploadPart (independent of the read faults above).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartFaults {
    /// The part is received, then answered 503 SlowDown or 500 InternalError (50/50).
    pub error_rate: f64,
    /// One byte of the part is flipped on the way in (a Content-MD5 catches it as
    /// BadDigest; without one, the part is stored and its ETag and CRC-64 are of the
    /// damaged bytes).
    pub corrupt_rate: f64,
    /// The part's body is read half-way, then the request is answered 500 InternalError
    /// without reading the rest (the client sees its upload broken off: an error answer
    /// or a closed connection).
    pub reset_rate: f64,
}

/// Counter snapshot returned by [`crate::Emulator::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request that reached the server (including ones rejected by auth).
    pub requests: u64,
    /// GetObject requests (including failed / injected-fault ones).
    pub gets: u64,
    /// HeadObject requests.
    pub heads: u64,
    /// ListObjects and ListObjectsV2 requests.
    pub lists: u64,
    /// PutObject and UploadPart requests.
    pub puts: u64,
    /// DeleteObject and DeleteObjects (batch) requests.
    pub deletes: u64,
    /// Body bytes handed to the connection by GetObject responses.
    pub get_bytes: u64,
    /// GET/HEAD answered with an injected 5xx (probabilistic or `fail_next_gets`).
    pub injected_errors: u64,
    /// GET bodies cut short on purpose.
    pub injected_resets: u64,
    /// GET bodies with a flipped byte.
    pub injected_corruptions: u64,
    /// Body bytes received by PutObject and UploadPart (refused ones included).
    pub put_bytes: u64,
    /// UploadPart requests answered with an injected fault (error, corruption, reset).
    pub injected_part_faults: u64,
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub gets: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub get_bytes: AtomicU64,
    pub injected_errors: AtomicU64,
    pub injected_resets: AtomicU64,
    pub injected_corruptions: AtomicU64,
    pub put_bytes: AtomicU64,
    pub injected_part_faults: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        Stats {
            requests: self.requests.load(Relaxed),
            gets: self.gets.load(Relaxed),
            heads: self.heads.load(Relaxed),
            lists: self.lists.load(Relaxed),
            puts: self.puts.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            get_bytes: self.get_bytes.load(Relaxed),
            injected_errors: self.injected_errors.load(Relaxed),
            injected_resets: self.injected_resets.load(Relaxed),
            injected_corruptions: self.injected_corruptions.load(Relaxed),
            put_bytes: self.put_bytes.load(Relaxed),
            injected_part_faults: self.injected_part_faults.load(Relaxed),
        }
    }

    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.gets,
            &self.heads,
            &self.lists,
            &self.puts,
            &self.deletes,
            &self.get_bytes,
            &self.injected_errors,
            &self.injected_resets,
            &self.injected_corruptions,
            &self.put_bytes,
            &self.injected_part_faults,
        ] {
            c.store(0, Relaxed);
        }
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// SplitMix64 over an atomic counter: lock-free, and deterministic for a given
/// seed and call order.
pub struct Rng {
    state: AtomicU64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    pub fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`; draws nothing when `p <= 0`.
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && (p >= 1.0 || self.next_f64() < p)
    }

    /// Uniform in `[lo, hi)`; `lo` when the range is empty.
    pub fn range(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }
}

/// The live knobs.
pub struct Knobs {
    latency_nanos: AtomicU64,
    /// Bytes per second; 0 = unlimited.
    bandwidth: AtomicU64,
    error_rate: AtomicU64,
    reset_rate: AtomicU64,
    corrupt_rate: AtomicU64,
    fail_next_gets: AtomicU64,
    any_corrupt_keys: AtomicBool,
    corrupt_keys: RwLock<HashSet<(String, String)>>,
    public_read: AtomicBool,
    declare_crc64: AtomicBool,
    max_single_put: AtomicU64,
    part_faults: RwLock<PartFaults>,
    corrupt_next_parts: AtomicU64,
    fail_next_parts: AtomicU64,
    corrupt_part_numbers: Mutex<HashSet<i32>>,
}

impl Knobs {
    pub fn new(latency: Duration, bandwidth: Option<u64>) -> Self {
        let k = Self {
            latency_nanos: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            error_rate: AtomicU64::new(0f64.to_bits()),
            reset_rate: AtomicU64::new(0f64.to_bits()),
            corrupt_rate: AtomicU64::new(0f64.to_bits()),
            fail_next_gets: AtomicU64::new(0),
            any_corrupt_keys: AtomicBool::new(false),
            corrupt_keys: RwLock::new(HashSet::new()),
            public_read: AtomicBool::new(false),
            declare_crc64: AtomicBool::new(true),
            max_single_put: AtomicU64::new(5 << 30),
            part_faults: RwLock::new(PartFaults::default()),
            corrupt_next_parts: AtomicU64::new(0),
            fail_next_parts: AtomicU64::new(0),
            corrupt_part_numbers: Mutex::new(HashSet::new()),
        };
        k.set_latency(latency);
        k.set_bandwidth(bandwidth);
        k
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Relaxed))
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_nanos
            .store(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Bytes per second, `None` when unlimited.
    pub fn bandwidth(&self) -> Option<u64> {
        match self.bandwidth.load(Relaxed) {
            0 => None,
            b => Some(b),
        }
    }

    pub fn set_bandwidth(&self, b: Option<u64>) {
        self.bandwidth.store(b.unwrap_or(0), Relaxed);
    }

    pub fn faults(&self) -> Faults {
        Faults {
            error_rate: f64::from_bits(self.error_rate.load(Relaxed)),
            reset_rate: f64::from_bits(self.reset_rate.load(Relaxed)),
            corrupt_rate: f64::from_bits(self.corrupt_rate.load(Relaxed)),
        }
    }

    pub fn set_faults(&self, f: Faults) {
        let clamp = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        self.error_rate
            .store(clamp(f.error_rate).to_bits(), Relaxed);
        self.reset_rate
            .store(clamp(f.reset_rate).to_bits(), Relaxed);
        self.corrupt_rate
            .store(clamp(f.corrupt_rate).to_bits(), Relaxed);
    }

    pub fn add_fail_next_gets(&self, n: u64) {
        self.fail_next_gets.fetch_add(n, Relaxed);
    }

    pub fn clear_fail_next_gets(&self) {
        self.fail_next_gets.store(0, Relaxed);
    }

    /// Consume one pending forced GET failure, if any.
    pub fn take_forced_get_failure(&self) -> bool {
        self.fail_next_gets
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    pub fn corrupt_key(&self, bucket: &str, key: &str) {
        let mut set = self.corrupt_keys.write().unwrap();
        set.insert((bucket.to_owned(), key.to_owned()));
        self.any_corrupt_keys.store(true, Relaxed);
    }

    pub fn clear_corrupt_keys(&self) {
        let mut set = self.corrupt_keys.write().unwrap();
        set.clear();
        self.any_corrupt_keys.store(false, Relaxed);
    }

    /// Whether unsigned GET and HEAD requests (reads and listings) are served.
    pub fn public_read(&self) -> bool {
        self.public_read.load(Relaxed)
    }

    pub fn set_public_read(&self, on: bool) {
        self.public_read.store(on, Relaxed);
    }

    /// Whether GET and HEAD responses carry `x-oss-hash-crc64ecma` (as OSS) or not (as S3).
    pub fn declare_crc64(&self) -> bool {
        self.declare_crc64.load(Relaxed)
    }

    pub fn set_declare_crc64(&self, on: bool) {
        self.declare_crc64.store(on, Relaxed);
    }

    /// Largest PutObject body accepted (S3 and OSS: 5 GiB); above it, EntityTooLarge.
    pub fn max_single_put(&self) -> u64 {
        self.max_single_put.load(Relaxed)
    }

    pub fn set_max_single_put(&self, bytes: u64) {
        self.max_single_put.store(bytes, Relaxed);
    }

    pub fn part_faults(&self) -> PartFaults {
        *self.part_faults.read().unwrap()
    }

    pub fn set_part_faults(&self, f: PartFaults) {
        let clamp = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        *self.part_faults.write().unwrap() = PartFaults {
            error_rate: clamp(f.error_rate),
            corrupt_rate: clamp(f.corrupt_rate),
            reset_rate: clamp(f.reset_rate),
        };
    }

    pub fn add_corrupt_next_parts(&self, n: u64) {
        self.corrupt_next_parts.fetch_add(n, Relaxed);
    }

    pub fn add_fail_next_parts(&self, n: u64) {
        self.fail_next_parts.fetch_add(n, Relaxed);
    }

    /// Whether this part arrives damaged: one of the next `corrupt_next_parts`, or the first
    /// arrival of a part number set with `add_corrupt_part_number`.
    pub fn take_corrupt_part(&self, number: i32) -> bool {
        self.corrupt_next_parts
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
            || self.corrupt_part_numbers.lock().unwrap().remove(&number)
    }

    pub fn add_corrupt_part_number(&self, number: i32) {
        self.corrupt_part_numbers.lock().unwrap().insert(number);
    }

    pub fn take_failed_part(&self) -> bool {
        self.fail_next_parts
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    pub fn is_corrupt_key(&self, bucket: &str, key: &str) -> bool {
        if !self.any_corrupt_keys.load(Relaxed) {
            return false;
        }
        let set = self.corrupt_keys.read().unwrap();
        set.iter().any(|(b, k)| b == bucket && k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniformish() {
        let a = Rng::new(7);
        let b = Rng::new(7);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let r = Rng::new(1);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
        for _ in 0..1000 {
            let x = r.range(3, 9);
            assert!((3..9).contains(&x));
        }
    }

    #[test]
    fn forced_failures_count_down() {
        let k = Knobs::new(Duration::ZERO, None);
        assert!(!k.take_forced_get_failure());
        k.add_fail_next_gets(2);
        assert!(k.take_forced_get_failure());
        assert!(k.take_forced_get_failure());
        assert!(!k.take_forced_get_failure());
    }
}
