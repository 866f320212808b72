//! Which version of an object a read must return.
//!
//! Readers learn an object's version from a listing (or a HEAD) and fetch its bytes later,
//! in several ranged GETs: a FUSE handle block by block, a copier range by range. An
//! overwrite in between would make the ranges come from different versions, and a reader
//! would see a mix of both with no error. So every read names the [`Version`] it expects:
//!
//! - [`Version::ETag`]: sent as `If-Match` (S3 and OSS answer 412 once the object has
//!   changed, mid-body resumes included: the retry layer repeats the condition), and
//!   compared with the ETag of each response by [`super::response::HeaderTap`], for stores
//!   that ignore the condition;
//! - [`Version::Stat`]: a local directory has no ETag, so size and modification time are
//!   compared by a stat after each range has been read (a change during the read shows);
//! - [`Version::Any`]: no pin, for callers that hold no listing (benchmarks).
//!
//! A read that finds another version fails with an error for which [`changed`] is true,
//! and never returns a byte of the other version. What to do then is the caller's: the
//! mount answers EIO on the handle, a copier fetches the file's new version once.
//!
//! The version is also part of the block cache's key, so blocks of two versions never mix
//! in the cache either.

use std::sync::Arc;
use std::time::SystemTime;

use crate::error::Error;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Version {
    /// The ETag as the store listed it, quotes included (`"5d41…"`).
    ETag(Arc<str>),
    /// Size and modification time, for stores without ETags (local directories).
    Stat { size: u64, mtime: SystemTime },
    /// Whatever the store holds when each range is read.
    Any,
}

impl Version {
    /// The version a listing or HEAD described: its ETag if it has one, else its size and
    /// modification time, else none.
    pub fn of(etag: Option<&str>, size: u64, mtime: Option<SystemTime>) -> Version {
        match (etag, mtime) {
            (Some(e), _) => Version::ETag(e.into()),
            (None, Some(mtime)) => Version::Stat { size, mtime },
            (None, None) => Version::Any,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::ETag(e) => write!(f, "ETag {e}"),
            Version::Stat { size, mtime } => {
                let t = humantime::format_rfc3339_nanos(*mtime);
                write!(f, "{size} bytes modified {t}")
            }
            Version::Any => f.write_str("any version"),
        }
    }
}

/// Two ETags name the same version: compared without quotes and weak marks (`W/"x"`),
/// which stores and proxies add or drop.
pub fn same_etag(a: &str, b: &str) -> bool {
    fn bare(e: &str) -> &str {
        e.trim().trim_start_matches("W/").trim_matches('"')
    }
    bare(a) == bare(b)
}

/// The error of a read that found another version than it was pinned to.
pub(super) fn changed_error(key: &str, want: &Version, detail: &str) -> Error {
    Error::Store(
        opendal::Error::new(
            opendal::ErrorKind::ConditionNotMatch,
            format!("object {key:?} changed since it was listed ({want}): {detail}"),
        )
        .with_operation("read"),
    )
}

/// True when `e` (or the error it wraps) says the object is no longer the version the
/// read was pinned to.
pub fn changed(e: &Error) -> bool {
    match e {
        Error::Store(e) => e.kind() == opendal::ErrorKind::ConditionNotMatch,
        Error::Shared(e) => changed(e),
        Error::Copy { cause, .. } => changed(cause),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_pins_its_etag_else_its_size_and_mtime() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123);
        assert_eq!(
            Version::of(Some("\"a\""), 1, Some(t)),
            Version::ETag("\"a\"".into())
        );
        assert_eq!(
            Version::of(None, 5, Some(t)),
            Version::Stat { size: 5, mtime: t }
        );
        assert_eq!(Version::of(None, 5, None), Version::Any);
    }

    #[test]
    fn etags_compare_without_quotes_or_weak_marks() {
        assert!(same_etag("\"abc\"", "abc"));
        assert!(same_etag("W/\"abc\"", "\"abc\""));
        assert!(!same_etag("\"abc\"", "\"abd\""));
    }

    #[test]
    fn a_changed_object_is_recognised_through_wrappers() {
        let e = changed_error("k", &Version::Any, "412");
        assert!(changed(&e));
        let e = Error::Copy {
            path: "k".into(),
            cause: Box::new(Error::Shared(std::sync::Arc::new(e))),
        };
        assert!(changed(&e));
        assert!(!changed(&Error::errno(libc::EIO)));
    }
}
