//! What a CSI volume asks for: the `volumeAttributes` (CSI `volume_context`) and the
//! node-publish secrets of a NodePublishVolume call, parsed into a [`VolumeSpec`].
//!
//! Owns the vocabulary users write in their Pod or PV (see [`KEYS`]) and every message a
//! mistake in it produces. It must not mount or touch the network; a missing bucket or a
//! rejected key is found by the store's preflight, later.
//!
//! Credentials come only from the call: the secrets (AK/SK) or, for RRSA, the pod's
//! service-account token that kubelet passes in `csi.storage.k8s.io/serviceAccount.tokens`.
//! The plugin's own identity is never lent to a volume (see `StoreConfig::ambient_credentials`).
//!
//! Sources are buckets only. The plugin runs privileged with the host's kubelet directory
//! mounted, so a `file://` source would let any pod author read the node's files (every
//! Secret under `/var/lib/kubelet/pods/`): it is refused here, before anything touches the
//! disk, with one message whatever the path (no oracle for which host paths exist).
//!
//! Endpoints are normalised (scheme added, lower case, default port and trailing `/`
//! dropped) because the node-wide cache is keyed by endpoint: two spellings of one endpoint
//! must share blocks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::store::{Credentials, Scheme, Secret, SourceUrl, StoreConfig};

/// The audience RRSA tokens are requested for (CSIDriver `tokenRequests`).
pub const RRSA_AUDIENCE: &str = "sts.aliyuncs.com";

/// Keys kubelet adds (pod info, ephemeral flag, tokens); never a user's typo.
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
const TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// The `volumeAttributes` a user may set, with what each means.
pub const KEYS: &[(&str, &str)] = &[
    (
        "url",
        "the whole source: s3://BUCKET/PREFIX or oss://BUCKET/PREFIX",
    ),
    ("bucket", "bucket name (instead of url)"),
    ("path", "prefix inside the bucket, default / (with bucket)"),
    ("protocol", "oss (default) or s3 (with bucket)"),
    (
        "endpoint",
        "endpoint URL or host, e.g. oss-cn-hangzhou-internal.aliyuncs.com",
    ),
    ("region", "region, e.g. cn-hangzhou"),
    (
        "throughput",
        "MiB/s cap for this volume's reads, 0 = none (the node cap still applies)",
    ),
    ("metadataTTL", "how long listings are trusted, e.g. 60s"),
    (
        "allowEmpty",
        "\"true\": mount even if nothing is stored under the source (else refused as a likely typo)",
    ),
    (
        "roleArn",
        "RRSA: the RAM role to assume with the pod's token",
    ),
    ("oidcProviderArn", "RRSA: the cluster's OIDC provider ARN"),
];

/// Secret keys accepted for a static access key (Alibaba CSI, Alibaba SDK and AWS names).
const KEY_ID_NAMES: &[&str] = &[
    "akId",
    "accessKeyId",
    "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "AWS_ACCESS_KEY_ID",
];
const KEY_SECRET_NAMES: &[&str] = &[
    "akSecret",
    "accessKeySecret",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "AWS_SECRET_ACCESS_KEY",
];
const TOKEN_NAMES: &[&str] = &[
    "securityToken",
    "ALIBABA_CLOUD_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
];

/// A parsed volume, ready to be mounted.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Credentials inside are from the call only; for RRSA `oidc_token_file` is empty until
    /// the node service writes [`rrsa_token`](Self::rrsa_token) to a file.
    pub store: StoreConfig,
    pub throughput_mib: f64,
    pub metadata_ttl: Option<Duration>,
    pub rrsa_token: Option<Secret>,
    /// The user-set attributes (kubelet's own keys removed): two publishes of one target
    /// path are the same volume only if these are equal.
    pub attributes: BTreeMap<String, String>,
    /// `namespace/name` of the pod, when kubelet passes pod info (CSIDriver
    /// `podInfoOnMount`); for logs only.
    pub pod: Option<String>,
    /// Mount even if nothing is stored under the source (`allowEmpty: "true"`).
    pub allow_empty: bool,
}

/// Why a `file://` source is refused. Deliberately without the path: the answer must not
/// depend on what exists on the node.
pub const LOCAL_SOURCE_REFUSED: &str = "file:// sources are not allowed in CSI volumes: the plugin runs privileged on the node, so a local path would expose the node's files to the pod; use s3:// or oss://";

/// Parses a NodePublishVolume's context and secrets. The error is a sentence for the
/// user (it ends up in the pod's events), never containing a secret value.
pub fn parse(
    context: &HashMap<String, String>,
    secrets: &HashMap<String, String>,
) -> Result<VolumeSpec, String> {
    let mut attributes = BTreeMap::new();
    for (k, v) in context {
        if k.starts_with(KUBELET_PREFIX) {
            continue;
        }
        if !KEYS.iter().any(|(known, _)| known == k) {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown volumeAttributes key {k:?}; known keys: {}",
                known.join(", ")
            ));
        }
        attributes.insert(k.clone(), v.trim().to_string());
    }
    let get = |k: &str| attributes.get(k).filter(|v| !v.is_empty()).cloned();

    let source = match (get("url"), get("bucket")) {
        (Some(_), Some(_)) => return Err("set either url or bucket, not both".into()),
        (None, None) => {
            return Err(
                "no source: set volumeAttributes url (e.g. oss://bucket/prefix) or bucket (with path, protocol)"
                    .into(),
            );
        }
        (Some(url), None) => {
            if get("path").is_some() || get("protocol").is_some() {
                return Err(
                    "path and protocol go with bucket; with url, put them in the url".into(),
                );
            }
            if url
                .split_once("://")
                .is_some_and(|(s, _)| s.eq_ignore_ascii_case("file"))
            {
                return Err(LOCAL_SOURCE_REFUSED.into());
            }
            SourceUrl::parse(&url).map_err(|e| e.to_string())?
        }
        (None, Some(bucket)) => {
            let protocol = get("protocol").unwrap_or_else(|| "oss".into());
            if protocol != "oss" && protocol != "s3" {
                return Err(format!("protocol {protocol:?} is not oss or s3"));
            }
            let path = get("path").unwrap_or_default();
            let path = path.trim_start_matches('/');
            SourceUrl::parse(&format!("{protocol}://{bucket}/{path}")).map_err(|e| e.to_string())?
        }
    };
    if source.scheme == Scheme::File {
        return Err(LOCAL_SOURCE_REFUSED.into());
    }
    if source.scheme == Scheme::Oss && get("endpoint").is_none() && get("region").is_none() {
        return Err("oss volumes need endpoint or region (e.g. region: cn-hangzhou)".into());
    }

    let throughput_mib = match get("throughput") {
        None => 0.0,
        Some(t) => crate::options::throughput_mib(&t)?,
    };
    let allow_empty = match get("allowEmpty").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("allowEmpty {other:?} is not \"true\" or \"false\"")),
    };
    let metadata_ttl = match get("metadataTTL") {
        None => None,
        Some(t) => Some(crate::options::ttl(&t).map_err(|e| format!("metadataTTL: {e}"))?),
    };

    let endpoint = match get("endpoint") {
        None => None,
        Some(e) => Some(normalize_endpoint(&e)?),
    };
    let credentials = credentials(secrets)?;
    let (credentials, rrsa_token) = match (get("roleArn"), get("oidcProviderArn")) {
        (None, None) => (credentials, None),
        (Some(role_arn), Some(oidc_provider_arn)) => {
            if source.scheme != Scheme::Oss {
                return Err("roleArn/oidcProviderArn (RRSA) work with oss volumes only".into());
            }
            let token = rrsa_token(context)?;
            let mut c = credentials;
            c.rrsa = Some(crate::store::Rrsa {
                role_arn,
                oidc_provider_arn,
                oidc_token_file: String::new(),
            });
            (c, Some(token))
        }
        _ => return Err("RRSA needs both roleArn and oidcProviderArn".into()),
    };

    let pod = Some(pod_of(context)).filter(|p| p != "-");

    let mut store = StoreConfig::new(source, endpoint, get("region"));
    store.credentials = credentials;
    store.ambient_credentials = false;
    Ok(VolumeSpec {
        store,
        throughput_mib,
        metadata_ttl,
        rrsa_token,
        attributes,
        pod,
        allow_empty,
    })
}

/// The `pod` label of a volume's metrics: `namespace/name` from kubelet's pod info, or,
/// without it (a CSIDriver without `podInfoOnMount`), `uid:` and the pod's UID from the
/// target path relative to the kubelet dir (`pods/<uid>/volumes/…`), so two pods' mounts
/// of one volume are two series, never one label set twice; the path itself otherwise.
pub fn metrics_pod(pod: Option<&str>, target_in_kubelet_dir: &std::path::Path) -> String {
    if let Some(pod) = pod {
        return pod.to_string();
    }
    let mut parts = target_in_kubelet_dir.iter().map(|p| p.to_string_lossy());
    match (parts.next().as_deref(), parts.next()) {
        (Some("pods"), Some(uid)) => format!("uid:{uid}"),
        _ => target_in_kubelet_dir.display().to_string(),
    }
}

/// `namespace/name` of the pod from kubelet's pod info (CSIDriver `podInfoOnMount`), or
/// `-` without it. For logs.
pub fn pod_of(context: &HashMap<String, String>) -> String {
    match (
        context.get("csi.storage.k8s.io/pod.namespace"),
        context.get("csi.storage.k8s.io/pod.name"),
    ) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "-".into(),
    }
}

/// One spelling per endpoint: `OSS-cn-hangzhou.aliyuncs.com/`, `https://oss-cn-hangzhou.aliyuncs.com`
/// and `https://oss-cn-hangzhou.aliyuncs.com:443` all become the last but one. The scheme
/// defaults to https (as the store assumes); scheme and host are case-insensitive; a
/// default port and trailing slashes say nothing.
pub fn normalize_endpoint(endpoint: &str) -> Result<String, String> {
    let e = endpoint.trim();
    // Messages show the endpoint without a `user:password@` part (they reach pod events).
    let shown = crate::store::operator::redact_userinfo(e);
    if crate::store::operator::has_userinfo(e) {
        return Err(format!(
            "endpoint {shown:?} carries credentials (user:password@); put them in the node-publish secret, never in the endpoint"
        ));
    }
    let (scheme, rest) = match e.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("https".to_string(), e),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!("endpoint {shown:?}: scheme must be http or https"));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "endpoint {shown:?} must be a host (and port), e.g. oss-cn-hangzhou-internal.aliyuncs.com"
        ));
    }
    let authority = authority.to_ascii_lowercase();
    if !is_host_and_port(&authority) || !path.bytes().all(is_path_byte) {
        return Err(format!(
            "endpoint {shown:?} is not a valid URL or host (e.g. oss-cn-hangzhou-internal.aliyuncs.com)"
        ));
    }
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let host = authority.strip_suffix(default_port).unwrap_or(&authority);
    Ok(format!("{scheme}://{host}{path}"))
}

/// A DNS name, an IPv4 address or a bracketed IPv6 address, then an optional port:
/// what an endpoint's authority may be (no user, no spaces, nothing a URL parser would
/// read as the start of a query or fragment).
fn is_host_and_port(authority: &str) -> bool {
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (host, port) = match authority.find(':') {
                Some(i) => authority.split_at(i),
                None => (authority, ""),
            };
            (is_dns_name_or_ipv4(host), port)
        }
    };
    let port_ok = match port.strip_prefix(':') {
        Some(p) => {
            p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && !p.starts_with('0')
                && p.parse::<u16>().is_ok()
        }
        None => port.is_empty(),
    };
    host_ok && port_ok
}

/// Dot-separated labels of letters, digits, underscores (Docker service names) and inner
/// hyphens (an IPv4 address is one).
fn is_dns_name_or_ipv4(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Bytes a URL path may hold as written (RFC 3986 unreserved, sub-delims, `:@/%`); no
/// space, `?` or `#`.
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b)
}

fn first<'a>(secrets: &'a HashMap<String, String>, names: &[&str]) -> Option<&'a String> {
    names
        .iter()
        .find_map(|n| secrets.get(*n))
        .filter(|v| !v.is_empty())
}

fn credentials(secrets: &HashMap<String, String>) -> Result<Credentials, String> {
    let id = first(secrets, KEY_ID_NAMES);
    let secret = first(secrets, KEY_SECRET_NAMES);
    match (id, secret) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: Some(Secret::new(id.clone())),
            secret_access_key: Some(Secret::new(secret.clone())),
            session_token: first(secrets, TOKEN_NAMES).map(|t| Secret::new(t.clone())),
            rrsa: None,
        }),
        (None, None) => Ok(Credentials::default()),
        (Some(_), None) => Err(format!(
            "the node-publish secret has an access key id but no secret (one of {})",
            KEY_SECRET_NAMES.join(", ")
        )),
        (None, Some(_)) => Err(format!(
            "the node-publish secret has an access key secret but no id (one of {})",
            KEY_ID_NAMES.join(", ")
        )),
    }
}

/// The pod's token for [`RRSA_AUDIENCE`], from kubelet's JSON
/// `{"sts.aliyuncs.com": {"token": "...", "expirationTimestamp": "..."}}`.
fn rrsa_token(context: &HashMap<String, String>) -> Result<Secret, String> {
    let missing = || {
        format!(
            "RRSA needs the pod's service-account token: the CSIDriver must request tokens for audience {RRSA_AUDIENCE} (spec.tokenRequests)"
        )
    };
    let raw = context.get(TOKENS_KEY).ok_or_else(missing)?;
    let tokens: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("{TOKENS_KEY} is not JSON: {e}"))?;
    tokens
        .get(RRSA_AUDIENCE)
        .and_then(|t| t.get("token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(Secret::new)
        .ok_or_else(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bucket_path_protocol_make_a_source() {
        let spec = parse(
            &map(&[
                ("bucket", "data"),
                ("path", "/models/llama/"),
                ("region", "cn-hangzhou"),
                ("throughput", "1000"),
                ("csi.storage.k8s.io/pod.name", "fill-1"),
            ]),
            &map(&[("akId", "LTAIid"), ("akSecret", "s3cr3t")]),
        )
        .unwrap();
        assert_eq!(spec.store.source.to_string(), "oss://data/models/llama/");
        assert_eq!(spec.throughput_mib, 1000.0);
        assert!(!spec.store.ambient_credentials);
        assert_eq!(
            spec.store
                .credentials
                .secret_access_key
                .as_ref()
                .unwrap()
                .expose(),
            "s3cr3t"
        );
        assert!(!spec.attributes.contains_key("csi.storage.k8s.io/pod.name"));
    }

    #[test]
    fn mistakes_are_explained() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("url", "s3://bkt/p"), ("troughput", "5")],
                "unknown volumeAttributes key \"troughput\"",
            ),
            (&[], "no source"),
            (
                &[("url", "s3://bkt"), ("bucket", "bkt")],
                "either url or bucket",
            ),
            (&[("url", "ftp://x")], "unsupported scheme"),
            (&[("bucket", "bkt")], "need endpoint or region"),
            (&[("bucket", "bkt"), ("protocol", "gcs")], "not oss or s3"),
            (
                &[("url", "s3://bkt/"), ("throughput", "fast")],
                "not a number",
            ),
            (
                &[("url", "s3://bkt/"), ("metadataTTL", "soon")],
                "metadataTTL",
            ),
            // moka panics on a TTL over 1,000 years; a node plugin must not.
            (
                &[("url", "s3://bkt/"), ("metadataTTL", "1001y")],
                "longer than the longest TTL",
            ),
            (
                &[("url", "s3://bkt/"), ("throughput", "1e-7")],
                "out of range",
            ),
            (
                &[
                    ("url", "oss://bkt/"),
                    ("region", "r"),
                    ("roleArn", "acs:ram::1:role/x"),
                ],
                "both roleArn and oidcProviderArn",
            ),
            (
                &[
                    ("url", "oss://bkt/"),
                    ("region", "r"),
                    ("roleArn", "acs:ram::1:role/x"),
                    ("oidcProviderArn", "acs:ram::1:oidc-provider/p"),
                ],
                "tokenRequests",
            ),
        ];
        for (ctx, want) in cases {
            let err = parse(&map(ctx), &HashMap::new()).unwrap_err();
            assert!(err.contains(want), "{ctx:?}: {err}");
        }
        let err = parse(&map(&[("url", "s3://bkt/")]), &map(&[("akId", "only-id")])).unwrap_err();
        assert!(
            err.contains("no secret") && !err.contains("only-id"),
            "{err}"
        );
    }

    #[test]
    fn rrsa_token_comes_from_kubelet() {
        let tokens = r#"{"sts.aliyuncs.com":{"token":"eyJhbGciOi.tok","expirationTimestamp":"2026-11-23T10:00:00Z"}}"#;
        let spec = parse(
            &map(&[
                ("url", "oss://bkt/p/"),
                ("endpoint", "oss-cn-hangzhou-internal.aliyuncs.com"),
                ("roleArn", "acs:ram::1:role/fill"),
                ("oidcProviderArn", "acs:ram::1:oidc-provider/ack"),
                (TOKENS_KEY, tokens),
            ]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(spec.rrsa_token.unwrap().expose(), "eyJhbGciOi.tok");
        let shown = format!("{:?}", spec.store);
        assert!(!shown.contains("eyJhbGciOi"), "{shown}");
        assert_eq!(
            spec.store.credentials.rrsa.unwrap().role_arn,
            "acs:ram::1:role/fill"
        );
    }
}
