//! The multipart-upload protocol of S3 and OSS, spoken directly: initiate, upload a part,
//! list an upload's parts, list a key's open uploads, complete, abort; and the preflight's
//! probe, a LIST of one key whose answer must be an S3/OSS listing ([`Client::probe_listing`]).
//!
//! OpenDAL's writer uploads multipart too, but keeps the upload id and parts to itself, so
//! an upload cannot be resumed after a crash, confirmed with ListParts, or found and aborted
//! later. These requests are small enough to sign and send here (with `reqsign`, the
//! signer OpenDAL itself uses, and `reqwest`, its HTTP client), one attempt each: retrying,
//! checking digests and deciding what to send is the upload engine's (`crate::upload`).
//! The two protocols differ only in the signer, the address style and the checksum header
//! a part is answered with (`x-oss-hash-crc64ecma` on OSS, and on our emulator).
//! This module must not read files or hold upload state.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{Method, Request, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::credentials::Credentials;
use super::{Scheme, StoreConfig};
use crate::error::{Error, Result};

/// Largest single PUT S3 and OSS accept; above it an object must be uploaded in parts.
pub const MAX_SINGLE_PUT: u64 = 5 * 1024 * 1024 * 1024;
/// Most parts an upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// Smallest part but the last.
pub const MIN_PART: u64 = 5 * 1024 * 1024;

/// Characters escaped in a key's path (S3's URI encoding: all but unreserved and `/`).
const KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');
/// Characters escaped in a query value.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What the store answered for one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartReceipt {
    /// As sent, quotes included (CompleteMultipartUpload wants it back so).
    pub etag: String,
    /// `x-oss-hash-crc64ecma` of the part, where the store declares one.
    pub crc64: Option<u64>,
}

/// One part ListParts reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub number: u32,
    pub etag: String,
    pub size: u64,
}

/// An upload ListMultipartUploads reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    /// Relative to the store's root, like every key this module takes.
    pub key: String,
    pub upload_id: String,
    pub initiated: String,
}

/// The body of one part: its length and its bytes as a stream (paid to the limiters by
/// whoever makes it).
pub struct PartBody {
    pub len: u64,
    /// Base64 MD5 of the part, sent as `Content-MD5` (the store refuses a part that does
    /// not hash to it).
    pub content_md5: Option<String>,
    pub stream: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + Sync>>,
}

enum Signing {
    Aws(reqsign_core::Signer<reqsign_aws_v4::Credential>),
    Oss(reqsign_core::Signer<reqsign_aliyun_oss::Credential>),
    Anonymous,
}

/// Sends the multipart requests of one store (bucket + root prefix).
pub struct Client {
    http: reqwest::Client,
    signing: Signing,
    /// `scheme://host[:port]` plus `/bucket` for path-style addressing.
    base: String,
    /// The store's root prefix, `""` or ending in `/`.
    root: String,
    pub scheme: Scheme,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("multipart::Client")
            .field("base", &self.base)
            .field("root", &self.root)
            .finish()
    }
}

/// reqsign's credential providers (RRSA) send their own requests through this.
#[derive(Debug, Clone)]
struct HttpSend(reqwest::Client);

impl reqsign_core::HttpSend for HttpSend {
    async fn http_send(
        &self,
        req: http::Request<Bytes>,
    ) -> reqsign_core::Result<http::Response<Bytes>> {
        let req = reqwest::Request::try_from(req)
            .map_err(|e| reqsign_core::Error::unexpected("building a request").with_source(e))?;
        let resp = self
            .0
            .execute(req)
            .await
            .map_err(|e| reqsign_core::Error::unexpected("sending a request").with_source(e))?;
        let mut out = http::Response::builder().status(resp.status());
        for (k, v) in resp.headers() {
            out = out.header(k, v);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| reqsign_core::Error::unexpected("reading a response").with_source(e))?;
        out.body(body)
            .map_err(|e| reqsign_core::Error::unexpected("a response").with_source(e))
    }
}

impl Client {
    /// A client for the store `cfg` names (S3 or OSS; `file://` has no multipart).
    pub fn new(cfg: &StoreConfig, endpoint: &str) -> Result<Self> {
        // No read timeout: reqwest's runs from the send until the response head, so it
        // would cut off a large part still being sent. `send` bounds each request instead.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::InvalidOption(format!("an HTTP client: {e}")))?;
        let src = &cfg.source;
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| Error::InvalidOption(format!("endpoint {endpoint:?}: {e}")))?;
        let scheme = uri.scheme_str().unwrap_or("https");
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| Error::InvalidOption(format!("endpoint {endpoint:?} has no host")))?;
        let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
        let path_style = src.scheme == Scheme::S3
            || host == "localhost"
            || host.parse::<std::net::IpAddr>().is_ok();
        // An endpoint may carry a path (a gateway's `https://gw/minio`): kept, as OpenDAL does.
        let path = uri.path().trim_end_matches('/');
        let base = if path_style {
            format!("{scheme}://{authority}{path}/{}", src.bucket)
        } else {
            format!("{scheme}://{}.{authority}{path}", src.bucket)
        };
        let ctx = reqsign_core::Context::new()
            .with_file_read(reqsign_file_read_tokio::TokioFileRead)
            .with_http_send(HttpSend(http.clone()))
            .with_env(reqsign_core::OsEnv);
        let c: &Credentials = &cfg.credentials;
        let signing = match src.scheme {
            Scheme::S3 => {
                let region = cfg.region.as_deref().unwrap_or("us-east-1");
                let signer = reqsign_aws_v4::RequestSigner::new("s3", region);
                if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
                    let mut p =
                        reqsign_aws_v4::StaticCredentialProvider::new(id.expose(), secret.expose());
                    if let Some(t) = &c.session_token {
                        p = p.with_session_token(t.expose());
                    }
                    Signing::Aws(reqsign_core::Signer::new(ctx, p, signer))
                } else if cfg.ambient_credentials {
                    let p = reqsign_aws_v4::DefaultCredentialProvider::new();
                    Signing::Aws(reqsign_core::Signer::new(ctx, p, signer))
                } else {
                    Signing::Anonymous
                }
            }
            Scheme::Oss => {
                let signer = reqsign_aliyun_oss::RequestSigner::new(&src.bucket);
                if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
                    let mut p = reqsign_aliyun_oss::StaticCredentialProvider::new(
                        id.expose(),
                        secret.expose(),
                    );
                    if let Some(t) = &c.session_token {
                        p = p.with_security_token(t.expose());
                    }
                    Signing::Oss(reqsign_core::Signer::new(ctx, p, signer))
                } else if let Some(r) = &c.rrsa {
                    let p = reqsign_aliyun_oss::AssumeRoleWithOidcCredentialProvider::new()
                        .with_role_arn(&r.role_arn)
                        .with_oidc_provider_arn(&r.oidc_provider_arn)
                        .with_oidc_token_file(&r.oidc_token_file);
                    Signing::Oss(reqsign_core::Signer::new(ctx, p, signer))
                } else {
                    Signing::Anonymous
                }
            }
            Scheme::File => {
                return Err(Error::InvalidOption(
                    "multipart uploads need an object store (s3:// or oss://)".into(),
                ));
            }
        };
        Ok(Client {
            http,
            signing,
            base,
            root: src.prefix.clone(),
            scheme: src.scheme,
        })
    }

    /// Whether a key can be sent as a URL path unchanged: `.` and `..` segments would be
    /// collapsed by URL normalisation after signing (a different key, or a bad signature).
    pub fn key_is_addressable(key: &str) -> bool {
        !key.split('/').any(|c| c == "." || c == "..")
    }

    /// The URL of `key` (under the root) with `query`.
    fn url(&self, key: &str, query: &[(&str, &str)]) -> String {
        let path = utf8_percent_encode(&format!("{}{key}", self.root), KEY).to_string();
        format!("{}/{path}{}", self.base, query_string(query))
    }

    /// The bucket's own URL with `query`.
    fn url_bucket(&self, query: &[(&str, &str)]) -> String {
        format!("{}/{}", self.base, query_string(query))
    }

    /// Signs and sends one request; a non-2xx answer becomes [`Error::Request`].
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        method: Method,
        url: String,
        headers: &[(&str, String)],
        body: reqwest::Body,
    ) -> Result<reqwest::Response> {
        let body_len = headers
            .iter()
            .find(|(k, _)| *k == "content-length")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0);
        let mut builder = Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            builder = builder.header(*k, v);
        }
        let (mut parts, ()) = builder
            .body(())
            .map_err(|e| Error::InvalidOption(format!("{op} request for {key:?}: {e}")))?
            .into_parts();
        let signed = match &self.signing {
            Signing::Aws(s) => s.sign(&mut parts, None).await,
            Signing::Oss(s) => s.sign(&mut parts, None).await,
            Signing::Anonymous => Ok(()),
        };
        signed.map_err(|e| Error::AccessDenied {
            what: format!("{op} of {key:?}"),
            hint: format!("signing failed: {e}"),
        })?;
        let req = reqwest::Request::try_from(Request::from_parts(parts, body))
            .map_err(|e| Error::InvalidOption(format!("{op} request for {key:?}: {e}")))?;
        // 60 s for the answer, plus the body at 64 KiB/s (the lowest cap fillfs accepts).
        let limit =
            Duration::from_secs(60) + Duration::from_secs(body_len / crate::limit::MIN_RATE);
        let resp = match tokio::time::timeout(limit, self.http.execute(req)).await {
            Ok(r) => r.map_err(|e| Error::Request {
                op,
                key: key.to_string(),
                status: None,
                code: "connection".into(),
                message: error_chain(&e),
            })?,
            Err(_) => {
                return Err(Error::Request {
                    op,
                    key: key.to_string(),
                    status: None,
                    code: "RequestTimeout".into(),
                    message: format!("no answer within {} s", limit.as_secs()),
                });
            }
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Err(request_error(op, key, status, &text))
    }

    /// Starts an upload of `key`; returns its id.
    pub async fn initiate(&self, key: &str) -> Result<String> {
        let url = self.url(key, &[("uploads", "")]);
        let resp = self
            .send(
                "InitiateMultipartUpload",
                key,
                Method::POST,
                url,
                &[("content-length", "0".into())],
                Bytes::new().into(),
            )
            .await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Initiated {
            upload_id: String,
        }
        let r: Initiated = parse("InitiateMultipartUpload", key, &body(resp).await?)?;
        Ok(r.upload_id)
    }

    /// Sends part `number` of an upload.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        part: PartBody,
    ) -> Result<PartReceipt> {
        let n = number.to_string();
        let url = self.url(key, &[("partNumber", &n), ("uploadId", upload_id)]);
        self.send_body("UploadPart", key, url, part).await
    }

    /// Stores a whole object in one PUT (at most [`MAX_SINGLE_PUT`]); answered like a part,
    /// so it is checked the same way, without a HEAD afterwards.
    pub async fn put_object(&self, key: &str, body: PartBody) -> Result<PartReceipt> {
        let url = self.url(key, &[]);
        self.send_body("PutObject", key, url, body).await
    }

    async fn send_body(
        &self,
        op: &'static str,
        key: &str,
        url: String,
        part: PartBody,
    ) -> Result<PartReceipt> {
        let mut headers = vec![("content-length", part.len.to_string())];
        if let Some(md5) = part.content_md5 {
            headers.push(("content-md5", md5));
        }
        let resp = self
            .send(
                op,
                key,
                Method::PUT,
                url,
                &headers,
                reqwest::Body::wrap_stream(part.stream),
            )
            .await?;
        let etag = resp
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let crc64 = resp
            .headers()
            .get("x-oss-hash-crc64ecma")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Ok(PartReceipt { etag, crc64 })
    }

    /// Every part the store holds for an upload, in part-number order.
    pub async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<ListedPart>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Page {
            #[serde(default)]
            is_truncated: bool,
            #[serde(default)]
            next_part_number_marker: Option<String>,
            #[serde(default)]
            part: Vec<Part>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Part {
            part_number: u32,
            #[serde(rename = "ETag")]
            etag: String,
            size: u64,
        }
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let mut q = vec![("uploadId", upload_id), ("max-parts", "1000")];
            if !marker.is_empty() {
                q.push(("part-number-marker", &marker));
            }
            let url = self.url(key, &q);
            let resp = self
                .send("ListParts", key, Method::GET, url, &[], Bytes::new().into())
                .await?;
            let page: Page = parse("ListParts", key, &body(resp).await?)?;
            out.extend(page.part.into_iter().map(|p| ListedPart {
                number: p.part_number,
                etag: p.etag,
                size: p.size,
            }));
            if !page.is_truncated {
                break;
            }
            match page.next_part_number_marker {
                Some(m) if !m.is_empty() && m != marker => marker = m,
                _ => return Err(truncated("ListParts", key)),
            }
        }
        out.sort_by_key(|p| p.number);
        Ok(out)
    }

    /// The open uploads of exactly `key` (ListMultipartUploads with the key as prefix).
    pub async fn open_uploads(&self, key: &str) -> Result<Vec<OpenUpload>> {
        self.open_uploads_under(key)
            .await
            .map(|v| v.into_iter().filter(|u| u.key == key).collect())
    }

    /// The open uploads of every key starting with `prefix`.
    pub async fn open_uploads_under(&self, prefix: &str) -> Result<Vec<OpenUpload>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Page {
            #[serde(default)]
            is_truncated: bool,
            #[serde(default)]
            next_key_marker: Option<String>,
            #[serde(default)]
            next_upload_id_marker: Option<String>,
            #[serde(default)]
            upload: Vec<Upload>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Upload {
            key: String,
            upload_id: String,
            #[serde(default)]
            initiated: String,
        }
        let full = format!("{}{prefix}", self.root);
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        loop {
            let mut q = vec![("uploads", ""), ("prefix", full.as_str())];
            if !key_marker.is_empty() {
                q.push(("key-marker", &key_marker));
                q.push(("upload-id-marker", &id_marker));
            }
            // The bucket's own URL: the root prefix goes in the query.
            let url = self.url_bucket(&q);
            let resp = self
                .send(
                    "ListMultipartUploads",
                    prefix,
                    Method::GET,
                    url,
                    &[],
                    Bytes::new().into(),
                )
                .await?;
            let page: Page = parse("ListMultipartUploads", prefix, &body(resp).await?)?;
            out.extend(page.upload.into_iter().filter_map(|u| {
                Some(OpenUpload {
                    key: u.key.strip_prefix(&self.root)?.to_string(),
                    upload_id: u.upload_id,
                    initiated: u.initiated,
                })
            }));
            if !page.is_truncated {
                break;
            }
            match (page.next_key_marker, page.next_upload_id_marker) {
                (Some(k), Some(i)) if k != key_marker || i != id_marker => {
                    key_marker = k;
                    id_marker = i;
                }
                _ => return Err(truncated("ListMultipartUploads", prefix)),
            }
        }
        Ok(out)
    }

    /// One LIST of at most one key under the root (ListObjectsV2, which OSS speaks too), to
    /// tell a real S3/OSS answer from anything else that says 200: a captive portal, a web
    /// server on the wrong port, a proxy's page. OpenDAL takes such a page for an empty
    /// listing. Returns whether anything is under the root.
    pub async fn probe_listing(&self) -> Result<bool> {
        let q = [
            ("list-type", "2"),
            ("max-keys", "1"),
            ("prefix", self.root.as_str()),
        ];
        let url = self.url_bucket(&q);
        let resp = self
            .send(
                "LIST",
                &self.root,
                Method::GET,
                url,
                &[],
                Bytes::new().into(),
            )
            .await?;
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type")
            .to_string();
        let text = body(resp).await?;
        listing_has_entries(&text).ok_or_else(|| Error::NotAStore {
            endpoint: self.base.clone(),
            got: format!(
                "{content_type}: {:?}",
                text.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(120)
                    .collect::<String>()
            ),
        })
    }

    /// Completes an upload from its parts (number, ETag as the store answered it), in order.
    /// Returns the object's ETag.
    pub async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u32, String)],
    ) -> Result<String> {
        let mut xml = String::with_capacity(64 + parts.len() * 80);
        xml.push_str("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let len = xml.len() as u64;
        let url = self.url(key, &[("uploadId", upload_id)]);
        let resp = self
            .send(
                "CompleteMultipartUpload",
                key,
                Method::POST,
                url,
                &[
                    ("content-type", "application/xml".into()),
                    ("content-length", len.to_string()),
                ],
                xml.into(),
            )
            .await?;
        // S3 may answer 200 and put the error in the body.
        let text = body(resp).await?;
        if text.contains("<Error>") {
            // Classified by its code (InternalError and SlowDown are transient, InvalidPart
            // is not), not by the 200.
            return Err(request_error(
                "CompleteMultipartUpload",
                key,
                StatusCode::OK,
                &text,
            ));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Completed {
            #[serde(rename = "ETag", default)]
            etag: String,
        }
        let r: Completed = parse("CompleteMultipartUpload", key, &text)?;
        Ok(r.etag)
    }

    /// Aborts an upload; one already gone (completed or aborted) is not an error.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<()> {
        let url = self.url(key, &[("uploadId", upload_id)]);
        match self
            .send(
                "AbortMultipartUpload",
                key,
                Method::DELETE,
                url,
                &[],
                Bytes::new().into(),
            )
            .await
        {
            Err(Error::Request { code, .. }) if code == "NoSuchUpload" => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

/// `?k=v&...`, values escaped; `uploads` (a sub-resource) has no `=` when empty.
fn query_string(query: &[(&str, &str)]) -> String {
    let mut q = String::new();
    for (i, (k, v)) in query.iter().enumerate() {
        q.push(if i == 0 { '?' } else { '&' });
        q.push_str(k);
        if !v.is_empty() || *k != "uploads" {
            q.push('=');
            q.push_str(&utf8_percent_encode(v, QUERY).to_string());
        }
    }
    q
}

/// Whether an answer to a LIST is an S3/OSS listing (`None` if not) and names anything.
fn listing_has_entries(text: &str) -> Option<bool> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Listing {
        #[serde(rename = "$value", default)]
        fields: Vec<Field>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    enum Field {
        Contents(serde::de::IgnoredAny),
        CommonPrefixes(serde::de::IgnoredAny),
        #[serde(other)]
        Other,
    }
    // quick-xml does not check the root element's name; a listing's is ListBucketResult.
    let body = text.trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>")?.1.trim_start(),
        None => body,
    };
    if !body.starts_with("<ListBucketResult") {
        return None;
    }
    let l: Listing = quick_xml::de::from_str(body).ok()?;
    Some(
        l.fields
            .iter()
            .any(|f| matches!(f, Field::Contents(_) | Field::CommonPrefixes(_))),
    )
}

/// A listing that says it goes on but not where: never taken as complete.
fn truncated(op: &'static str, key: &str) -> Error {
    Error::Request {
        op,
        key: key.to_string(),
        status: Some(200),
        code: "MalformedResponse".into(),
        message: "the listing is truncated but gives no marker to go on from".into(),
    }
}

async fn body(resp: reqwest::Response) -> Result<String> {
    resp.text().await.map_err(|e| Error::Request {
        op: "reading a response",
        key: String::new(),
        status: None,
        code: "connection".into(),
        message: error_chain(&e),
    })
}

fn parse<T: for<'de> Deserialize<'de>>(op: &'static str, key: &str, text: &str) -> Result<T> {
    quick_xml::de::from_str(text).map_err(|e| Error::Request {
        op,
        key: key.to_string(),
        status: Some(200),
        code: "MalformedResponse".into(),
        message: format!("{e}: {}", text.chars().take(200).collect::<String>()),
    })
}

fn request_error(op: &'static str, key: &str, status: StatusCode, text: &str) -> Error {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Body {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let b: Body = quick_xml::de::from_str(text).unwrap_or_default();
    let code = if b.code.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        b.code
    };
    let message = if b.message.is_empty() {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(200)
            .collect()
    } else {
        b.message
    };
    Error::Request {
        op,
        key: key.to_string(),
        status: Some(status.as_u16()),
        code,
        message,
    }
}

/// The error and its causes on one line (reqwest's Display hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A shared client, built on first use.
pub type Shared = Arc<Client>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_keep_sub_resources_bare_and_escape_values() {
        assert_eq!(query_string(&[]), "");
        assert_eq!(query_string(&[("uploads", "")]), "?uploads");
        assert_eq!(
            query_string(&[("uploads", ""), ("prefix", "a b/c+d")]),
            "?uploads&prefix=a%20b%2Fc%2Bd"
        );
        assert_eq!(
            query_string(&[("partNumber", "3"), ("uploadId", "x~y")]),
            "?partNumber=3&uploadId=x~y"
        );
        assert!(!Client::key_is_addressable("a/../b"));
        assert!(Client::key_is_addressable("a/..b/c."));
    }

    #[test]
    fn only_a_listing_is_taken_for_one() {
        let empty = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix><KeyCount>0</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>"#;
        let one = r#"<ListBucketResult><Name>b</Name><Contents><Key>p/a</Key><Size>1</Size></Contents><IsTruncated>true</IsTruncated></ListBucketResult>"#;
        let dir = r#"<ListBucketResult><Name>b</Name><CommonPrefixes><Prefix>p/d/</Prefix></CommonPrefixes></ListBucketResult>"#;
        assert_eq!(listing_has_entries(empty), Some(false));
        assert_eq!(listing_has_entries(one), Some(true));
        assert_eq!(listing_has_entries(dir), Some(true));
        for not in [
            "<!DOCTYPE html><html><body>Welcome to nginx!</body></html>",
            "<html><head><title>Login</title></head></html>",
            r#"{"ok": true}"#,
            "",
            "<?xml version=\"1.0\"?><Error><Code>X</Code></Error>",
            "<ListBucketResult",
        ] {
            assert_eq!(listing_has_entries(not), None, "{not}");
        }
    }

    #[test]
    fn errors_are_read_from_the_body() {
        let e = request_error(
            "UploadPart",
            "k",
            StatusCode::BAD_REQUEST,
            "<?xml version=\"1.0\"?><Error><Code>BadDigest</Code><Message>The Content-MD5 you specified did not match</Message></Error>",
        );
        match e {
            Error::Request {
                code,
                message,
                status,
                ..
            } => {
                assert_eq!(code, "BadDigest");
                assert_eq!(status, Some(400));
                assert!(message.contains("Content-MD5"));
            }
            e => panic!("{e}"),
        }
        let e = request_error(
            "UploadPart",
            "k",
            StatusCode::BAD_GATEWAY,
            "<html>oops</html>",
        );
        assert!(
            matches!(e, Error::Request { ref code, .. } if code == "Bad Gateway"),
            "{e}"
        );
    }
}
