//! Parsing of source URLs (`s3://BUCKET/PREFIX`, `oss://BUCKET/PREFIX`, `file:///DIR`).
//!
//! Owns only syntax: turning the string a user typed into a [`SourceUrl`]. It must not touch
//! the network or the disk; whether the bucket or directory exists is checked by
//! [`crate::store::Store::preflight`].

use std::fmt;

use crate::error::{Error, Result};

/// Which object-store protocol a source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Any S3-compatible endpoint (AWS, MinIO, Ceph RGW, OSS's S3 API...).
    S3,
    /// Alibaba Cloud OSS through its native API.
    Oss,
    /// A local directory served through the same object-store layer (the embedded default).
    File,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::S3 => "s3",
            Scheme::Oss => "oss",
            Scheme::File => "file",
        })
    }
}

/// A parsed source: for `s3`/`oss` a bucket and a key prefix, for `file` an absolute directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceUrl {
    pub scheme: Scheme,
    /// Bucket name; for `file://` the empty string.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading `/`, ending in `/` unless empty.
    /// For `file://` the absolute directory path (leading and trailing `/`).
    pub prefix: String,
}

impl SourceUrl {
    /// A SOURCE argument: a URL, or a plain path to a local directory (relative to the
    /// current one; in Kubernetes, the fillfs mount of the bucket).
    pub fn from_arg(input: &str) -> Result<Self> {
        if input.trim().is_empty() {
            return Err(Error::InvalidSource {
                source_url: input.to_string(),
                reason: "it is empty; give s3://BUCKET/PREFIX, oss://BUCKET/PREFIX, \
                         file:///DIR or a directory"
                    .into(),
            });
        }
        if input.contains("://") {
            return Self::parse(input);
        }
        let abs = std::path::absolute(input).map_err(|e| Error::InvalidSource {
            source_url: input.to_string(),
            reason: e.to_string(),
        })?;
        let abs = abs.to_str().ok_or_else(|| Error::InvalidSource {
            source_url: input.to_string(),
            reason: "the path is not UTF-8".into(),
        })?;
        Self::parse(&format!("file://{abs}"))
    }

    /// Parses `s3://bucket/prefix`, `oss://bucket/prefix` or `file:///abs/dir`.
    pub fn parse(input: &str) -> Result<Self> {
        // Messages show the URL without a `user:password@` part before the bucket.
        let shown = redact_userinfo(input);
        let invalid = |reason: &str| Error::InvalidSource {
            source_url: shown.clone(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = input.split_once("://").ok_or_else(|| {
            invalid("expected SCHEME://..., e.g. s3://bucket/prefix or file:///data")
        })?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "s3" => Scheme::S3,
            "oss" => Scheme::Oss,
            "file" => Scheme::File,
            other => {
                return Err(invalid(&format!(
                    "unsupported scheme {other:?}; use s3://, oss:// or file://"
                )));
            }
        };
        if rest.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if scheme == Scheme::File {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "file:// needs an absolute path, e.g. file:///srv/data",
                ));
            }
            let mut dir = rest.trim_end_matches('/').to_string();
            dir.push('/');
            return Ok(SourceUrl {
                scheme,
                bucket: String::new(),
                prefix: dir,
            });
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // `id:secret@bucket`; a secret may hold `/`, so `id:sec/ret@bucket` splits
        // before its `@`. A bucket name has neither `@` nor `:`.
        if bucket.contains('@') || (bucket.contains(':') && rest.contains('@')) {
            return Err(invalid(
                "the URL carries credentials (user:password@); give them in the environment \
                 (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ALIBABA_CLOUD_ACCESS_KEY_ID / \
                 ALIBABA_CLOUD_ACCESS_KEY_SECRET), never in the URL",
            ));
        }
        if bucket.contains(':') {
            // Not repeated: it may be `id:secret` with the rest of the secret after a `/`.
            return Err(invalid(
                "the bucket name has a ':' (an endpoint goes in --endpoint, credentials in \
                 the environment)",
            ));
        }
        validate_bucket(bucket).map_err(|reason| {
            if rest.contains('@') {
                // The "bucket" may be the start of a secret that holds a `/`.
                invalid(
                    "the bucket name is not valid (3 to 63 lowercase letters, digits, '-', '.')",
                )
            } else {
                invalid(&reason)
            }
        })?;
        let prefix = normalize_prefix(prefix).map_err(|r| invalid(&r))?;
        Ok(SourceUrl {
            scheme,
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// Builds a URL from the parts a Kubernetes spec carries (`bucket`, `path`).
    pub fn from_parts(scheme: Scheme, bucket: &str, path: &str) -> Result<Self> {
        Self::parse(&format!(
            "{scheme}://{bucket}/{}",
            path.trim_start_matches('/')
        ))
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::File => write!(f, "file://{}", self.prefix),
            _ => write!(f, "{}://{}/{}", self.scheme, self.bucket, self.prefix),
        }
    }
}

/// `input` as an error may show it: everything before the last `@` (after the scheme) is
/// `***`, since it may be a `user:password@` whose secret holds `/` (AWS secrets do) and
/// so ends anywhere; without an `@`, a bucket part with a `:` (no bucket name has one:
/// `id:secret/...`) hides all after the scheme. Over-redacts a key prefix with an `@` in
/// an error message, never a secret.
fn redact_userinfo(input: &str) -> String {
    let (scheme, rest) = match input.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), input),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None if rest.split('/').next().unwrap_or("").contains(':') => format!("{scheme}***"),
        None => input.to_string(),
    }
}

/// Bucket names per the S3/OSS rules that matter for URL safety: 3-63 chars of
/// lowercase letters, digits, `-` and `.`.
fn validate_bucket(bucket: &str) -> std::result::Result<(), String> {
    if bucket.is_empty() {
        return Err("missing bucket name".into());
    }
    if bucket.len() < 3 || bucket.len() > 63 {
        return Err(format!("bucket name {bucket:?} must be 3 to 63 characters"));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(format!(
            "bucket name {bucket:?} may hold only lowercase letters, digits, '-' and '.'"
        ));
    }
    Ok(())
}

/// `"/many-files"` → `"many-files/"`, `""` → `""`. Rejects `..` segments: a prefix is a
/// key prefix, not a path, and `..` in it is almost certainly a mistake.
fn normalize_prefix(prefix: &str) -> std::result::Result<String, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("prefix {prefix:?} contains a '.' or '..' segment"));
    }
    Ok(format!("{trimmed}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_with_prefix() {
        let u = SourceUrl::parse("s3://my-bucket/a/b").unwrap();
        assert_eq!(u.scheme, Scheme::S3);
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "a/b/");
        assert_eq!(u.to_string(), "s3://my-bucket/a/b/");
    }

    #[test]
    fn parses_oss_seed_path() {
        let u = SourceUrl::from_parts(Scheme::Oss, "my-test-bucket", "/many-files/").unwrap();
        assert_eq!(u.prefix, "many-files/");
        assert_eq!(u.bucket, "my-test-bucket");
    }

    #[test]
    fn bucket_without_prefix() {
        let u = SourceUrl::parse("s3://bkt").unwrap();
        assert_eq!(u.prefix, "");
    }

    #[test]
    fn parses_file() {
        let u = SourceUrl::parse("file:///srv/data/").unwrap();
        assert_eq!(u.scheme, Scheme::File);
        assert_eq!(u.prefix, "/srv/data/");
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "bucket/prefix",
            "gs://b/p",
            "s3:///p",
            "s3://UPPER/p",
            "s3://ab/p",
            "s3://bkt/../etc",
            "file://relative/dir",
        ] {
            let err = SourceUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{bad}: error must name the input: {err}");
        }
    }

    #[test]
    fn credentials_in_a_url_are_refused_and_never_repeated() {
        for (bad, shown) in [
            (
                "s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/p/",
                "s3://***@bucket/p/",
            ),
            ("oss://id:wJalrXUtnFEMI@bkt", "oss://***@bkt"),
            ("s3://wJalrXUtnFEMI@x", "s3://***@x"),
            ("file://u:wJalrXUtnFEMI@/srv", "file://***@/srv"),
            // AWS secrets hold `/`: the bucket part ends inside the secret.
            (
                "s3://AKID:wJalrXUtnFEMI/K7MDENG/bPxRfiCY@bkt/p/",
                "s3://***@bkt/p/",
            ),
            ("s3://AKID:wJalrXUtnFEMI/K7MDENG", "s3://***"),
        ] {
            let err = SourceUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains(shown), "{bad}: {err}");
            assert!(
                !err.contains("wJalrXUtnFEMI") && !err.contains("AKID"),
                "{bad}: secret repeated: {err}"
            );
        }
        // A user-only secret with a `/` leaves a bucket part without `@` or `:`; an error
        // still hides all before the last `@`.
        let err = SourceUrl::parse("s3://wJalrXUtnFEMI/K7MDENG@bkt/p")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("wJalrXUtnFEMI") && err.contains("***@bkt/p"),
            "{err}"
        );
        // An `@` in a key prefix is a key, not credentials.
        let url = SourceUrl::parse("s3://bucket/team@site/data").unwrap();
        assert_eq!(url.prefix, "team@site/data/");
    }
}
