//! What a copied file's bytes must hash to, and the checks.
//!
//! Two sources, best first:
//! - **CRC-64/XZ** (ECMA-182) of the whole object, which OSS and COS declare on every GET,
//!   ranged ones included (`store/response.rs`). A CRC of each range is computed as the range
//!   is written and the ranges are combined in offset order (CRCs compose without the data),
//!   so a file of any size, multipart uploads included, is checked without reading it again.
//!   It costs a small fraction of an MD5 (SIMD, `crc-fast`; see ARCHITECTURE.md).
//! - **MD5** of a single-part ETag (S3 and OSS objects uploaded in one PUT): checked from the
//!   buffer for one-GET files; for larger files only with `--verify`, which re-reads the file.
//!
//! Without either, only the size is checked. This module computes and compares; it must not
//! fetch or write.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crc_fast::CrcAlgorithm;
use md5::{Digest, Md5};

use crate::error::{Error, Result};

const CRC64: CrcAlgorithm = CrcAlgorithm::Crc64Xz;

/// What a file should hash to, from the listing (ETag) and the GET responses (CRC-64).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub crc64: Option<u64>,
    /// Lowercase hex, from a single-part ETag.
    pub md5: Option<String>,
}

/// How a finished file was checked, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Crc64,
    Md5,
    SizeOnly,
}

/// The MD5 an ETag stands for, when it is a single-part ETag (32 hex digits, no `-N`).
pub fn etag_md5(etag: Option<&str>) -> Option<String> {
    let e = etag?.trim_matches('"');
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn crc64(data: &[u8]) -> u64 {
    crc_fast::checksum(CRC64, data)
}

/// MD5 of chunks taken back to back.
pub fn md5(chunks: &[bytes::Bytes]) -> String {
    let mut h = Md5::new();
    chunks.iter().for_each(|c| h.update(c));
    hex(&h.finalize())
}

/// CRC-64s of the ranges of one object (taken by the store as chunks arrive), combined
/// into the whole object's.
#[derive(Debug, Default)]
pub struct RangeCrcs {
    /// (offset, length, CRC-64 of those bytes)
    ranges: Vec<(u64, u64, u64)>,
    /// What the store's responses declared for the whole object.
    declared: Option<u64>,
    /// Two responses declared different values: the object changed during the copy.
    disagree: bool,
}

impl RangeCrcs {
    /// Records one range and what its response declared.
    pub fn add(&mut self, offset: u64, len: u64, crc: u64, declared: Option<u64>) {
        self.ranges.push((offset, len, crc));
        if let Some(d) = declared {
            match self.declared {
                Some(prev) if prev != d => self.disagree = true,
                _ => self.declared = Some(d),
            }
        }
    }

    pub fn declared(&self) -> Option<u64> {
        self.declared
    }

    /// The CRC-64 of the concatenated ranges (they must tile the object).
    pub fn combined(&mut self) -> u64 {
        self.ranges.sort_unstable_by_key(|r| r.0);
        self.ranges.iter().fold(0, |acc, &(_, len, crc)| {
            crc_fast::checksum_combine(CRC64, acc, crc, len)
        })
    }

    /// Compares the combined CRC with what the store declared.
    pub fn check(&mut self, path: &str) -> Result<Checked> {
        if self.disagree {
            return Err(Error::ChecksumMismatch {
                path: path.to_string(),
                expected: "one CRC-64 in every response".into(),
                got: "different values (the object changed during the copy)".into(),
            });
        }
        let Some(want) = self.declared else {
            return Ok(Checked::SizeOnly);
        };
        check_crc64(path, want, self.combined())?;
        Ok(Checked::Crc64)
    }
}

pub fn check_crc64(path: &str, want: u64, got: u64) -> Result<()> {
    if want != got {
        return Err(Error::ChecksumMismatch {
            path: path.to_string(),
            expected: format!("CRC-64 {want}"),
            got: format!("CRC-64 {got}"),
        });
    }
    Ok(())
}

pub fn check_md5(path: &str, want: &str, got: &str) -> Result<()> {
    if want != got {
        return Err(Error::ChecksumMismatch {
            path: path.to_string(),
            expected: format!("MD5 {want}"),
            got: format!("MD5 {got}"),
        });
    }
    Ok(())
}

/// Re-reads the first `len` bytes of `path` (a file, or a block device holding an image)
/// and checks them against everything `expected` has.
pub fn verify_file(path: &Path, len: u64, expected: &Expected, name: &str) -> Result<Checked> {
    let mut f = File::open(path)?.take(len);
    let mut crc = crc_fast::Digest::new(CRC64);
    let mut md5 = expected.md5.as_ref().map(|_| Md5::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        if let Some(h) = md5.as_mut() {
            h.update(&buf[..n]);
        }
    }
    let mut checked = Checked::SizeOnly;
    if let (Some(h), Some(want)) = (md5, &expected.md5) {
        check_md5(name, want, &hex(&h.finalize()))?;
        checked = Checked::Md5;
    }
    if let Some(want) = expected.crc64 {
        check_crc64(name, want, crc.finalize())?;
        checked = Checked::Crc64;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_is_the_oss_algorithm() {
        // CRC-64/XZ check value, and the example value OSS SDKs use for "hello world!".
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
        assert_eq!(crc64(b"hello world!"), 0x8483_c0fa_3260_7d61);
        assert_eq!(crc64(b""), 0);
    }

    #[test]
    fn ranges_combine_in_offset_order_whatever_order_they_arrive() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = crc64(&data);
        let mut r = RangeCrcs::default();
        for (start, end) in [(60_000, 100_000), (0, 30_000), (30_000, 60_000)] {
            let d = &data[start..end];
            r.add(start as u64, d.len() as u64, crc64(d), Some(whole));
        }
        assert_eq!(r.combined(), whole);
        assert_eq!(r.check("f").unwrap(), Checked::Crc64);

        let mut bad = RangeCrcs::default();
        bad.add(0, 3, crc64(b"abc"), Some(whole));
        assert!(matches!(
            bad.check("f"),
            Err(Error::ChecksumMismatch { .. })
        ));
        let mut changed = RangeCrcs::default();
        changed.add(0, 1, crc64(b"a"), Some(1));
        changed.add(1, 1, crc64(b"b"), Some(2));
        assert!(
            changed.check("f").is_err(),
            "two values: the object changed"
        );
        let mut none = RangeCrcs::default();
        none.add(0, 1, crc64(b"a"), None);
        assert_eq!(none.check("f").unwrap(), Checked::SizeOnly);
    }

    #[test]
    fn verify_file_checks_what_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello world!trailing").unwrap();
        let good = Expected {
            crc64: Some(crc64(b"hello world!")),
            md5: Some(md5(&[
                bytes::Bytes::from_static(b"hello "),
                bytes::Bytes::from_static(b"world!"),
            ])),
        };
        assert_eq!(verify_file(&p, 12, &good, "f").unwrap(), Checked::Crc64);
        let md5_only = Expected {
            crc64: None,
            md5: good.md5.clone(),
        };
        assert_eq!(verify_file(&p, 12, &md5_only, "f").unwrap(), Checked::Md5);
        let wrong = Expected {
            crc64: Some(1),
            md5: None,
        };
        let e = verify_file(&p, 12, &wrong, "f").unwrap_err().to_string();
        assert!(e.contains("CRC-64 1"), "{e}");
        assert_eq!(
            verify_file(&p, 12, &Expected::default(), "f").unwrap(),
            Checked::SizeOnly
        );
    }
}
