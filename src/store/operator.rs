//! Builds OpenDAL operators for a [`StoreConfig`]: service choice, endpoint defaults,
//! credentials, and the cross-cutting layers (retry with jitter, timeouts).
//! It must not perform requests; [`super::Store::preflight`] does the first one.

use std::time::Duration;

use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::services::{Fs, Oss, S3};
use opendal::{HttpTransporter, Operator};

use super::response::HeaderTap;
use super::{Scheme, StoreConfig};
use crate::error::{Error, Result};

pub(super) struct Built {
    pub op: Operator,
    pub op_no_retry: Operator,
    /// Human-readable endpoint for messages.
    pub endpoint: String,
}

pub(super) fn build(cfg: &StoreConfig) -> Result<Built> {
    let src = &cfg.source;
    if let Some(e) = &cfg.endpoint
        && has_userinfo(e)
    {
        // Not echoed: the part before '@' is most likely a password.
        return Err(Error::InvalidOption(format!(
            "the endpoint {} carries credentials (user:password@); give them as access keys (environment or secret), never in the URL",
            redact_userinfo(e)
        )));
    }
    let (base, endpoint) = match src.scheme {
        Scheme::File => {
            // OpenDAL's fs service creates a missing root; a source must never be created.
            if !std::path::Path::new(&src.prefix).is_dir() {
                return Err(Error::DirectoryNotFound(src.prefix.clone()));
            }
            let op = Operator::new(Fs::default().root(&src.prefix))?;
            (op, format!("local directory {}", src.prefix))
        }
        Scheme::S3 => {
            let region = cfg
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".to_string());
            let mut b = S3::default()
                .bucket(&src.bucket)
                .root(&root(&src.prefix))
                .region(&region);
            let endpoint = match &cfg.endpoint {
                Some(e) => {
                    let e = with_scheme(e);
                    b = b.endpoint(&e);
                    e
                }
                None => format!("https://s3.{region}.amazonaws.com"),
            };
            let c = &cfg.credentials;
            if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
                b = b
                    .access_key_id(id.expose())
                    .secret_access_key(secret.expose());
                if let Some(t) = &c.session_token {
                    b = b.session_token(t.expose());
                }
            } else if !cfg.ambient_credentials {
                b = b.skip_signature();
            }
            if !cfg.ambient_credentials {
                b = b.disable_config_load().disable_ec2_metadata();
            }
            (Operator::new(b)?, endpoint)
        }
        Scheme::Oss => {
            let endpoint = match (&cfg.endpoint, &cfg.region) {
                (Some(e), _) => with_scheme(e),
                (None, Some(r)) => format!("https://oss-{r}.aliyuncs.com"),
                (None, None) => {
                    return Err(Error::InvalidOption(
                        "oss:// needs --endpoint or --region (e.g. --region cn-hangzhou)".into(),
                    ));
                }
            };
            let mut b = Oss::default()
                .bucket(&src.bucket)
                .root(&root(&src.prefix))
                .endpoint(&endpoint);
            if is_ip_or_localhost(&endpoint) {
                // Virtual-host style (`bucket.127.0.0.1`) cannot work without DNS.
                b = b.addressing_style("path");
            }
            let c = &cfg.credentials;
            if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
                b = b
                    .access_key_id(id.expose())
                    .access_key_secret(secret.expose());
                if let Some(t) = &c.session_token {
                    b = b.security_token(t.expose());
                }
            } else if let Some(r) = &c.rrsa {
                b = b
                    .role_arn(&r.role_arn)
                    .oidc_provider_arn(&r.oidc_provider_arn)
                    .oidc_token_file(&r.oidc_token_file);
            } else if !cfg.ambient_credentials {
                // OpenDAL's OSS signer always reads ALIBABA_CLOUD_* from the environment;
                // `fillfs csi` clears those at start, so this is anonymous access.
                b = b.skip_signature();
            }
            (Operator::new(b)?, endpoint)
        }
    };
    // Read the CRC-64 headers of GET responses (see `response.rs`).
    let base = if src.scheme == Scheme::File {
        base
    } else {
        let ctx = base.context().clone();
        let tap = HeaderTap {
            inner: ctx.http_transport().clone(),
        };
        base.with_context(ctx.with_http_transport(HttpTransporter::new(tap)))
    };
    let timeouts = TimeoutLayer::new()
        .with_timeout(Duration::from_secs(60))
        .with_io_timeout(Duration::from_secs(20));
    let op_no_retry = base.clone().layer(timeouts.clone());
    let op = base.layer(timeouts).layer(
        RetryLayer::new()
            .with_jitter()
            .with_max_times(cfg.max_retries)
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_notify(log_retry),
    );
    Ok(Built {
        op,
        op_no_retry,
        endpoint,
    })
}

/// One line per retry (OpenDAL's own notice is the error's Debug form: with
/// RUST_BACKTRACE=1, a backtrace per retry): the request, the status, and the store's
/// message folded onto the line and cut. Never the request's headers.
fn log_retry(event: opendal::layers::RetryEvent<'_>) {
    let e = event.err;
    // OpenDAL keeps its context private but prints it as `{ key: value, ... }`.
    let shown = e.to_string();
    let field = |key: &str| {
        let at = shown.find(&format!("{key}: "))? + key.len() + 2;
        let rest = &shown[at..];
        let end = rest.find([',', ' ']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    tracing::warn!(
        request = field("service_operation").unwrap_or_else(|| event.op.to_string()),
        key = field("path").unwrap_or_default(),
        status = field("status").unwrap_or_default(),
        attempt = event.attempt,
        after_ms = event.retry_after.as_millis() as u64,
        "retrying a store request: {}: {}",
        e.kind(),
        fold(e.message(), 300)
    );
}

/// `text` on one line, at most `max` bytes (a response body can be XML over many lines).
fn fold(text: &str, max: usize) -> String {
    let mut s = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// OpenDAL roots are absolute: `"a/b/"` → `"/a/b/"`.
fn root(prefix: &str) -> String {
    format!("/{prefix}")
}

/// The seed writes endpoints without a scheme (`oss-cn-hangzhou-internal.aliyuncs.com`).
fn with_scheme(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("https://{endpoint}")
    }
}

/// Whether an endpoint URL may carry a `user[:password]@` part: any `@` at all. An
/// endpoint never needs one, and a password may itself hold `/`, `?` or `#`, so where the
/// authority ends cannot be trusted.
pub fn has_userinfo(endpoint: &str) -> bool {
    endpoint.contains('@')
}

/// The endpoint with everything between the scheme and the last `@` replaced by `***`,
/// for messages.
pub fn redact_userinfo(endpoint: &str) -> String {
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((s, r)) => (format!("{s}://"), r),
        None => (String::new(), endpoint),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => endpoint.to_string(),
    }
}

/// Whether the endpoint's host is an IP address or `localhost`.
fn is_ip_or_localhost(endpoint: &str) -> bool {
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_endpoints_are_recognised() {
        assert!(is_ip_or_localhost("http://127.0.0.1:9000"));
        assert!(is_ip_or_localhost("http://[::1]:9000"));
        assert!(is_ip_or_localhost("https://localhost"));
        assert!(!is_ip_or_localhost("https://oss-cn-hangzhou.aliyuncs.com"));
    }

    #[test]
    fn credentials_in_an_endpoint_are_never_shown() {
        for (e, shown) in [
            ("http://admin:hunter2@minio:9000", "http://***@minio:9000"),
            ("admin:hunter2@minio:9000/x", "***@minio:9000/x"),
            ("https://u@h", "https://***@h"),
            ("https://a:b@c@h/p", "https://***@h/p"),
            // A password holding '/', '?' or '#' ends no authority early.
            ("http://admin:p/ss@minio:9000", "http://***@minio:9000"),
            ("http://admin:1234/x@host", "http://***@host"),
            ("https://u:p?w#d@host", "https://***@host"),
        ] {
            assert!(has_userinfo(e), "{e}");
            assert_eq!(redact_userinfo(e), shown);
            assert!(!redact_userinfo(e).contains("p/ss") && !redact_userinfo(e).contains("1234"));
        }
        for e in ["http://h:9000/p", "h", "https://h/?a=b"] {
            assert!(!has_userinfo(e), "{e}");
            assert_eq!(redact_userinfo(e), e);
        }
    }
}
