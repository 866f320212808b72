//! The library's error type. Every failure a user can meet has a variant whose message says
//! what went wrong and what to do; store errors keep OpenDAL's error as the source.
//! Messages never contain credentials.

use std::io;
use std::sync::Arc;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid source {source_url:?}: {reason}")]
    InvalidSource { source_url: String, reason: String },

    #[error("invalid option: {0}")]
    InvalidOption(String),

    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    BucketNotFound { bucket: String, endpoint: String },

    #[error("directory {0:?} does not exist or is not a directory")]
    DirectoryNotFound(String),

    #[error("access denied to {what}: check the credentials ({hint})")]
    AccessDenied { what: String, hint: String },

    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },

    /// The endpoint answered a LIST with something that is not an S3/OSS listing.
    #[error(
        "{endpoint} did not answer like an object store: a LIST of the bucket returned {got}; check the endpoint URL and port (a web server, proxy or captive portal answers like this)"
    )]
    NotAStore { endpoint: String, got: String },

    /// Nothing is stored under the source prefix (a typo, or not uploaded yet).
    #[error("nothing is stored under {source_url}: check the bucket and prefix; {allow}")]
    EmptySource { source_url: String, allow: String },

    #[error("object {key:?}: expected {expected} bytes at offset {offset}, store returned {got}")]
    ShortRead {
        key: String,
        offset: u64,
        expected: u64,
        got: u64,
    },

    #[error("{path}: checksum mismatch (expected {expected}, got {got}) after a retry")]
    ChecksumMismatch {
        path: String,
        expected: String,
        got: String,
    },

    #[error("{path}: wrote {got} bytes, object has {expected}")]
    SizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },

    #[error("not enough space in {target}: needs {needs}, has {has}")]
    NoSpace {
        target: String,
        needs: String,
        has: String,
    },

    /// Something in the target stands where the fill must write and cannot be replaced by
    /// it (a symbolic link, a file where a directory goes). Never followed, never removed.
    #[error("{path}: {reason}")]
    UnsafeTarget { path: String, reason: String },

    /// Another fill holds the target's lock.
    #[error(
        "{target} is being filled by another fillfs ({holder}); wait for that fill to end or stop it, then run this one again"
    )]
    Locked { target: String, holder: String },

    #[error(
        "{count} keys cannot be written safely (e.g. {examples}); nothing was written. Use --skip-invalid-keys to copy the rest"
    )]
    UnsafeKeys { count: usize, examples: String },

    /// Not a `source` (thiserror would chain it, and `{:#}` would print the cause twice).
    #[error("copying {path}: {cause}")]
    Copy { path: String, cause: Box<Error> },

    #[error("object store: {0}")]
    Store(#[from] opendal::Error),

    /// A request this crate signs and sends itself (the multipart protocol,
    /// `store/multipart.rs`); `status` is `None` when no answer came.
    #[error("object store: {op} of {key:?}: {}{code}: {message}", status.map(|s| format!("HTTP {s} ")).unwrap_or_default())]
    Request {
        op: &'static str,
        key: String,
        status: Option<u16>,
        code: String,
        message: String,
    },

    #[error(transparent)]
    Io(#[from] io::Error),

    /// An error shared by several waiters of one fetch (block cache, listing cache).
    #[error(transparent)]
    Shared(#[from] Arc<Error>),
}

impl Error {
    /// An error carrying an errno, for answers the file system gives by itself.
    pub fn errno(code: i32) -> Self {
        Error::Io(io::Error::from_raw_os_error(code))
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn to_errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Shared(e) => e.to_errno(),
            e if e.is_not_found() => libc::ENOENT,
            _ => libc::EIO,
        }
    }

    /// True when running the same command again cannot succeed: bad input, a missing
    /// bucket, rejected credentials, corrupt data after a retry, a volume too small.
    /// `fillfs populate` exits with 2 for these (the populator controller stops retrying).
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidSource { .. }
            | Error::InvalidOption(_)
            | Error::BucketNotFound { .. }
            | Error::DirectoryNotFound(_)
            | Error::NotAStore { .. }
            | Error::EmptySource { .. }
            | Error::AccessDenied { .. }
            | Error::ChecksumMismatch { .. }
            | Error::NoSpace { .. }
            | Error::UnsafeKeys { .. }
            | Error::UnsafeTarget { .. }
            | Error::Locked { .. } => true,
            Error::Copy { cause, .. } => cause.is_permanent(),
            Error::Shared(e) => e.is_permanent(),
            Error::Request { .. } => !self.is_transient_request(),
            // What retrying cannot change: a full, read-only or forbidden target, a name
            // the target's file system cannot hold.
            // (By kind: a message-carrying io::Error has no raw errno, only its kind.)
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::ReadOnlyFilesystem
                    | io::ErrorKind::InvalidFilename
                    | io::ErrorKind::PermissionDenied
            ),
            _ => false,
        }
    }

    /// For [`Error::Request`]: whether sending it again may succeed (no answer, 5xx,
    /// throttling, a timeout, or a body that arrived damaged).
    pub fn is_transient_request(&self) -> bool {
        match self {
            Error::Request { status, code, .. } => {
                matches!(status, None | Some(408) | Some(429) | Some(500..))
                    || matches!(
                        code.as_str(),
                        "RequestTimeout"
                            | "SlowDown"
                            | "BadDigest"
                            | "InvalidDigest"
                            | "InternalError"
                            | "IncompleteBody"
                    )
            }
            Error::Shared(e) => e.is_transient_request(),
            _ => false,
        }
    }

    /// True when the error means "no such object or directory" (mapped to ENOENT).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Store(e) => e.kind() == opendal::ErrorKind::NotFound,
            Error::Io(e) => e.kind() == io::ErrorKind::NotFound,
            Error::Shared(e) => e.is_not_found(),
            _ => false,
        }
    }
}
