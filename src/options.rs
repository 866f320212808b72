//! What every number a user can give fillfs accepts: sizes, rates, durations and counts,
//! parsed and bounded in one place for the command line and the CSI volume attributes, so
//! that no value — `1e-7` MiB/s, a 5 GiB block, a TTL of a thousand years — reaches the
//! engine as something it cannot hold (a panic, an overflow) or silently means something
//! else (a rate that rounds to "unlimited").
//!
//! It must not know about commands or defaults; it only says what a value means and
//! whether it is in range, in an error a user can act on.

use std::ops::RangeInclusive;
use std::time::Duration;

use bytesize::ByteSize;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A throughput cap in MiB/s: 0 (unlimited) or 1/16 (64 KiB/s) up to 1 TiB/s.
pub const THROUGHPUT_MIB: RangeInclusive<f64> = 0.0625..=1024.0 * 1024.0;
/// A FUSE cache block (and the mount's ranged GET): 64 KiB to 256 MiB.
pub const BLOCK_SIZE: RangeInclusive<u64> = 64 * KIB..=256 * MIB;
/// A populate range: 64 KiB to 5 GiB (S3's and OSS's largest part).
pub const PART_SIZE: RangeInclusive<u64> = 64 * KIB..=5 * GIB;
/// A multipart upload's part: S3 and OSS refuse smaller parts (but the last) and bigger ones.
pub const UPLOAD_PART_SIZE: RangeInclusive<u64> = 5 * MIB..=5 * GIB;
/// How long listings are trusted: up to 365 days (moka refuses TTLs over 1,000 years).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Kernel read-ahead per file: 0 (kernel default) up to 1 GiB.
pub const KERNEL_READ_AHEAD: RangeInclusive<u64> = 0..=GIB;
/// The controller's first retry delay (it doubles, up to a day).
pub const RETRY_DELAY: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// How often the controller reads a running fill's progress.
pub const POLL: RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(600);
/// A fill pod's deadline.
pub const FILL_DEADLINE: RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(30 * 24 * 3600);
/// GETs in flight for a fill.
pub const JOBS: RangeInclusive<usize> = 1..=4096;
/// FUSE request threads.
pub const FUSE_THREADS: RangeInclusive<usize> = 1..=256;
/// Attempts after a transient store error.
pub const RETRIES: RangeInclusive<usize> = 0..=100;

/// `"512MiB"`, `"4MiB"`, `"1GiB"`: a positive size.
pub fn size(s: &str) -> Result<u64, String> {
    let size: ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a size like 512MiB: {e}"))?;
    if size.as_u64() == 0 {
        return Err(format!("{s:?}: the size must be positive"));
    }
    Ok(size.as_u64())
}

/// A size within `range`, named `what` in the error.
pub fn size_in(s: &str, what: &str, range: &RangeInclusive<u64>) -> Result<u64, String> {
    let v = if s.trim() == "0" { 0 } else { size(s)? };
    if !range.contains(&v) {
        return Err(format!(
            "{what} {s:?} is out of range: from {} to {}",
            show(*range.start()),
            show(*range.end())
        ));
    }
    Ok(v)
}

/// A throughput in MiB/s: 0 = unlimited, else within [`THROUGHPUT_MIB`].
pub fn throughput_mib(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of MiB/s (0 = unlimited)"))?;
    if v == 0.0 {
        return Ok(0.0);
    }
    if !v.is_finite() || !THROUGHPUT_MIB.contains(&v) {
        return Err(format!(
            "throughput {s:?} MiB/s is out of range: 0 (unlimited) or from {} to {} MiB/s",
            THROUGHPUT_MIB.start(),
            THROUGHPUT_MIB.end()
        ));
    }
    Ok(v)
}

/// A metadata TTL like `60s`, `5m`, `0s`: at most [`MAX_TTL`].
pub fn ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 60s or 5m: {e}"))?;
    if d > MAX_TTL {
        return Err(format!("{s:?} is longer than the longest TTL, 365 days"));
    }
    Ok(d)
}

/// A duration like `10s`, `5m`, `24h` within `range`, named `what` in the error.
pub fn duration_in(
    s: &str,
    what: &str,
    range: &RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{what} {s:?} is not a duration like 10s or 5m: {e}"))?;
    if !range.contains(&d) {
        return Err(format!(
            "{what} {s:?} is out of range: from {} to {}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        ));
    }
    Ok(d)
}

/// A count within `range`, named `what` in the error.
pub fn count_in(s: &str, what: &str, range: &RangeInclusive<usize>) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "{what} {s:?} is out of range: a whole number from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

fn show(bytes: u64) -> String {
    ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_that_round_to_nothing_are_refused_not_unlimited() {
        assert_eq!(throughput_mib("0"), Ok(0.0));
        assert_eq!(throughput_mib("20"), Ok(20.0));
        for bad in ["1e-7", "0.01", "-1", "inf", "NaN", "fast", "2e6"] {
            let e = throughput_mib(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_and_ttls_are_bounded() {
        assert_eq!(size_in("4MiB", "--block-size", &BLOCK_SIZE), Ok(4 * MIB));
        let e = size_in("5GiB", "--block-size", &BLOCK_SIZE).unwrap_err();
        assert!(e.contains("from 64.0 KiB to 256.0 MiB"), "{e}");
        assert!(size_in("0", "--block-size", &BLOCK_SIZE).is_err());
        assert_eq!(
            size_in("0", "--kernel-read-ahead", &KERNEL_READ_AHEAD),
            Ok(0)
        );
        assert!(size("lots").is_err());
        assert_eq!(ttl("5m"), Ok(Duration::from_secs(300)));
        assert!(ttl("1001y").unwrap_err().contains("365 days"));
        assert!(ttl("99999999999999999999y").is_err());
        assert_eq!(count_in("64", "--jobs", &JOBS), Ok(64));
        assert!(count_in("0", "--jobs", &JOBS).is_err());
        assert!(count_in("-1", "--jobs", &JOBS).is_err());
    }
}
