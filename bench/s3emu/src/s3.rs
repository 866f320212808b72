//! The `s3s::S3` implementation: maps each supported S3 operation onto the
//! in-memory [`Store`], applying the GET/HEAD fault knobs and counters.

use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::StatusCode;
use s3s::dto::*;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use time::OffsetDateTime;

use crate::body::GetBody;
use crate::emulation::{Counters, Knobs, Rng};
use crate::store::{self, Object, Resume, Store};

const OWNER_ID: &str = "5e3e0000000000000000000000000000000000000000000000000000000000e3";
const OWNER_NAME: &str = "s3emu";
const MAX_KEYS: i32 = 1000;

/// State shared by the S3 handler, the HTTP layer and the [`crate::Emulator`] handle.
pub struct Shared {
    pub store: Store,
    pub knobs: Arc<Knobs>,
    pub counters: Arc<Counters>,
    pub rng: Rng,
    id_rng: Rng,
    pub region: String,
    pub endpoint: String,
    /// The access keys accepted (id → secret); [`crate::Emulator::rotate_key`] replaces them.
    pub keys: std::sync::RwLock<std::collections::HashMap<String, String>>,
}

impl Shared {
    pub fn new(knobs: Knobs, seed: u64, region: String, endpoint: String) -> Self {
        Self {
            store: Store::default(),
            knobs: Arc::new(knobs),
            counters: Arc::new(Counters::default()),
            rng: Rng::new(seed),
            id_rng: Rng::new(seed ^ 0x5EED_1D5E_ED1D_5EED),
            region,
            endpoint,
            keys: Default::default(),
        }
    }
}

pub struct Emu {
    pub shared: Arc<Shared>,
}

fn ts(t: OffsetDateTime) -> Timestamp {
    Timestamp::from(t)
}

fn etag_dto(quoted: &str) -> ETag {
    ETag::Strong(store::unquote(quoted).to_owned())
}

/// The OSS header with the whole object's CRC-64 (decimal), which OSS sends on GET (ranged
/// too) and HEAD, also on its S3-compatible endpoint.
pub const CRC64_HEADER: &str = "x-oss-hash-crc64ecma";

fn with_crc64<T>(mut resp: S3Response<T>, obj: &Object, knobs: &Knobs) -> S3Response<T> {
    if knobs.declare_crc64() {
        resp.headers
            .insert(CRC64_HEADER, http::HeaderValue::from(obj.crc64));
    }
    resp
}

fn owner() -> Owner {
    Owner {
        display_name: Some(OWNER_NAME.to_owned()),
        id: Some(OWNER_ID.to_owned()),
    }
}

fn custom_error(code: &'static str, status: StatusCode, msg: &'static str) -> S3Error {
    let mut e = S3Error::with_message(S3ErrorCode::Custom(code.into()), msg);
    e.set_status_code(status);
    e
}

/// Read a request body fully (a single chunk is kept as is, without copying).
/// The body of a PUT or UploadPart into an existing bucket, checked against Content-Length.
async fn receive_body(
    s: &Shared,
    bucket: &str,
    body: Option<StreamingBlob>,
    content_length: Option<i64>,
) -> S3Result<Bytes> {
    if !s.store.bucket_exists(bucket) {
        return Err(s3_error!(NoSuchBucket));
    }
    let data = collect_body(body, s.knobs.bandwidth()).await?;
    if let Some(n) = content_length
        && u64::try_from(n).ok() != Some(data.len() as u64)
    {
        return Err(s3_error!(
            IncompleteBody,
            "You did not provide the number of bytes specified by the Content-Length HTTP header."
        ));
    }
    Ok(data)
}

/// The per-connection cap applies to request bodies too: reading is paced to it (one
/// request at a time per HTTP/1 connection, so per request is per connection).
async fn collect_body(body: Option<StreamingBlob>, bandwidth: Option<u64>) -> S3Result<Bytes> {
    let Some(mut body) = body else {
        return Ok(Bytes::new());
    };
    let mut chunks: Vec<Bytes> = Vec::new();
    let started = tokio::time::Instant::now();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        if let (Some(bw), Ok(c)) = (bandwidth, &chunk) {
            received += c.len() as u64;
            let due = started + std::time::Duration::from_secs_f64(received as f64 / bw as f64);
            tokio::time::sleep_until(due).await;
        }
        let chunk = chunk.map_err(|e| {
            let msg = e.to_string();
            if msg.contains("Sha256Mismatch") {
                custom_error(
                    "XAmzContentSHA256Mismatch",
                    StatusCode::BAD_REQUEST,
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                )
            } else if msg.contains("Signature") {
                s3_error!(SignatureDoesNotMatch, "chunk signature mismatch")
            } else {
                s3_error!(IncompleteBody, "You did not provide the number of bytes specified by the Content-Length HTTP header: {msg}")
            }
        })?;
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in &chunks {
                buf.extend_from_slice(c);
            }
            buf.freeze()
        }
    })
}

/// Verify `Content-MD5` (base64 of the binary digest) against `md5`.
fn check_content_md5(header: Option<&str>, md5: &[u8; 16]) -> S3Result<()> {
    let Some(h) = header else { return Ok(()) };
    let decoded = base64_simd::STANDARD
        .decode_to_vec(h.trim().as_bytes())
        .ok()
        .filter(|d| d.len() == 16)
        .ok_or_else(|| s3_error!(InvalidDigest, "The Content-MD5 you specified was invalid."))?;
    if decoded != md5 {
        return Err(s3_error!(
            BadDigest,
            "The Content-MD5 you specified did not match what we received."
        ));
    }
    Ok(())
}

fn etag_matches(cond: &ETagCondition, obj: &Object) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == obj.etag_value(),
    }
}

/// RFC 9110 / S3 precondition evaluation for GET and HEAD.
fn check_read_conditions(
    obj: &Object,
    if_match: Option<&ETagCondition>,
    if_none_match: Option<&ETagCondition>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> S3Result<()> {
    let modified = ts(obj.last_modified);
    if let Some(c) = if_match {
        if !etag_matches(c, obj) {
            return Err(s3_error!(
                PreconditionFailed,
                "At least one of the pre-conditions you specified did not hold"
            ));
        }
    } else if let Some(t) = if_unmodified_since
        && modified > *t
    {
        return Err(s3_error!(
            PreconditionFailed,
            "At least one of the pre-conditions you specified did not hold"
        ));
    }
    if let Some(c) = if_none_match {
        if etag_matches(c, obj) {
            return Err(not_modified(obj));
        }
    } else if let Some(t) = if_modified_since
        && modified <= *t
    {
        return Err(not_modified(obj));
    }
    Ok(())
}

fn not_modified(obj: &Object) -> S3Error {
    let mut e = s3_error!(NotModified);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&obj.etag) {
        headers.insert(http::header::ETAG, v);
    }
    e.set_headers(headers);
    e
}

/// What part of an object a GET/HEAD returns.
#[derive(Debug)]
struct Selection {
    range: Range<u64>,
    /// `Content-Range` value for 206 answers.
    content_range: Option<String>,
    parts_count: Option<i32>,
}

fn select(
    obj: &Object,
    range: Option<&s3s::dto::Range>,
    part_number: Option<i32>,
) -> S3Result<Selection> {
    let len = obj.len();
    let full = Selection {
        range: 0..len,
        content_range: None,
        parts_count: None,
    };
    let partial = |r: Range<u64>, parts_count| Selection {
        content_range: Some(format!(
            "bytes {}-{}/{}",
            r.start,
            r.end.saturating_sub(1),
            len
        )),
        range: r,
        parts_count,
    };
    match (range, part_number) {
        (Some(_), Some(_)) => Err(s3_error!(
            InvalidRequest,
            "Cannot specify both Range header and partNumber query parameter"
        )),
        (Some(r), None) => {
            if len == 0 {
                return Ok(full);
            }
            let r = r
                .check(len)
                .map_err(|_| s3_error!(InvalidRange, "The requested range is not satisfiable"))?;
            Ok(partial(r, None))
        }
        (None, Some(n)) => {
            let invalid = || {
                custom_error(
                    "InvalidPartNumber",
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "The requested partnumber is not satisfiable",
                )
            };
            match &obj.part_sizes {
                Some(sizes) => {
                    let idx = usize::try_from(n)
                        .ok()
                        .filter(|&i| i >= 1 && i <= sizes.len())
                        .ok_or_else(invalid)?;
                    let start: u64 = sizes[..idx - 1].iter().sum();
                    let count = i32::try_from(sizes.len()).unwrap_or(i32::MAX);
                    Ok(partial(start..start + sizes[idx - 1], Some(count)))
                }
                None if n == 1 => Ok(if len == 0 {
                    full
                } else {
                    partial(0..len, None)
                }),
                None => Err(invalid()),
            }
        }
        (None, None) => Ok(full),
    }
}

impl Emu {
    fn s(&self) -> &Shared {
        &self.shared
    }

    /// Probabilistic (and, for GETs, forced) 5xx before any body.
    fn inject_read_error(&self, is_get: bool) -> S3Result<()> {
        let s = self.s();
        let forced = is_get && s.knobs.take_forced_get_failure();
        if forced || s.rng.chance(s.knobs.faults().error_rate) {
            Counters::add(&s.counters.injected_errors, 1);
            if forced || s.rng.next_u64() & 1 == 0 {
                return Err(s3_error!(SlowDown, "Please reduce your request rate."));
            }
            return Err(s3_error!(
                InternalError,
                "We encountered an internal error. Please try again."
            ));
        }
        Ok(())
    }

    fn object_entry(key: &str, obj: &Object, with_owner: bool) -> s3s::dto::Object {
        s3s::dto::Object {
            key: Some(key.to_owned()),
            size: Some(i64::try_from(obj.len()).unwrap_or(i64::MAX)),
            e_tag: Some(etag_dto(&obj.etag)),
            last_modified: Some(ts(obj.last_modified)),
            storage_class: Some(ObjectStorageClass::from_static(
                ObjectStorageClass::STANDARD,
            )),
            owner: with_owner.then(owner),
            ..Default::default()
        }
    }

    fn max_keys(v: Option<i32>) -> S3Result<i32> {
        match v {
            None => Ok(MAX_KEYS),
            Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys cannot be negative")),
            Some(n) => Ok(n.min(MAX_KEYS)),
        }
    }
}

/// `encoding-type=url`: percent-encode everything but unreserved characters and
/// `/`, space as `+` (what S3 does; clients decode with unquote_plus).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn encoder(enc: Option<&EncodingType>) -> fn(&str) -> String {
    match enc {
        Some(e) if e.as_str().eq_ignore_ascii_case("url") => url_encode,
        _ => str::to_owned,
    }
}

#[async_trait::async_trait]
impl S3 for Emu {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let s = self.s();
        let name = &req.input.bucket;
        if !s.store.create_bucket(name) && s.region != "us-east-1" {
            return Err(s3_error!(
                BucketAlreadyOwnedByYou,
                "Your previous request to create the named bucket succeeded and you already own it."
            ));
        }
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{name}")),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let s = self.s();
        if !s.store.bucket_exists(&req.input.bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(s.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let s = self.s();
        if !s.store.bucket_exists(&req.input.bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        let location_constraint =
            (s.region != "us-east-1").then(|| BucketLocationConstraint::from(s.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint,
        }))
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let s = self.s();
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let buckets = s
            .store
            .list_buckets()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(name, created)| Bucket {
                name: Some(name),
                creation_date: Some(ts(created)),
                bucket_region: Some(s.region.clone()),
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(owner()),
            prefix: req.input.prefix,
            continuation_token: None,
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.s().store.delete_bucket(&req.input.bucket)?;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let s = self.s();
        Counters::add(&s.counters.puts, 1);
        let mut input = req.input;
        let max = s.knobs.max_single_put();
        let too_large = || {
            custom_error(
                "EntityTooLarge",
                StatusCode::BAD_REQUEST,
                "Your proposed upload exceeds the maximum allowed object size.",
            )
        };
        // The body is taken before refusing it: a refusal before it would reach a client
        // still writing it as a broken pipe rather than as the store's answer.
        let data = receive_body(s, &input.bucket, input.body.take(), input.content_length).await?;
        Counters::add(&s.counters.put_bytes, data.len() as u64);
        if data.len() as u64 > max {
            return Err(too_large());
        }
        let md5 = store::md5_of(&data);
        check_content_md5(input.content_md5.as_deref(), &md5)?;
        let obj = Object::with_md5(data, md5, input.content_type, input.metadata);
        let (if_match, if_none_match) = (input.if_match, input.if_none_match);
        let obj = s
            .store
            .put_checked(&input.bucket, &input.key, obj, |existing| {
                if let Some(c) = &if_none_match
                    && existing.is_some_and(|o| etag_matches(c, o))
                {
                    return Err(s3_error!(
                        PreconditionFailed,
                        "At least one of the pre-conditions you specified did not hold"
                    ));
                }
                if let Some(c) = &if_match {
                    let Some(o) = existing else {
                        return Err(s3_error!(NoSuchKey, "The specified key does not exist."));
                    };
                    if !etag_matches(c, o) {
                        return Err(s3_error!(
                            PreconditionFailed,
                            "At least one of the pre-conditions you specified did not hold"
                        ));
                    }
                }
                Ok(())
            })?;
        // OSS answers a PUT with the object's CRC-64 too.
        Ok(with_crc64(
            S3Response::new(PutObjectOutput {
                e_tag: Some(etag_dto(&obj.etag)),
                size: Some(i64::try_from(obj.len()).unwrap_or(i64::MAX)),
                ..Default::default()
            }),
            &obj,
            &s.knobs,
        ))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let s = self.s();
        Counters::add(&s.counters.gets, 1);
        self.inject_read_error(true)?;
        let input = &req.input;
        let obj = s.store.get(&input.bucket, &input.key)?;
        check_read_conditions(
            &obj,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let sel = select(&obj, input.range.as_ref(), input.part_number)?;
        // Both bounds are within `obj.data`, which lives in memory.
        let (start, end) = (sel.range.start as usize, sel.range.end as usize);
        let data = obj.data.slice(start..end);
        let len = data.len();

        let faults = s.knobs.faults();
        let mut cut = None;
        if len > 0 && s.rng.chance(faults.reset_rate) {
            cut = Some(if len >= 2 {
                s.rng.range(1, len as u64) as usize
            } else {
                0
            });
            Counters::add(&s.counters.injected_resets, 1);
        }
        let mut corrupt_at = None;
        if len > 0 {
            if s.knobs.is_corrupt_key(&input.bucket, &input.key) {
                corrupt_at = Some(len / 2);
            } else if s.rng.chance(faults.corrupt_rate) {
                corrupt_at = Some(s.rng.range(0, len as u64) as usize);
            }
            if let (Some(at), Some(c)) = (corrupt_at, cut) {
                // keep the flipped byte inside what actually gets sent
                corrupt_at = (c > 0).then_some(at % c);
            }
            if corrupt_at.is_some() {
                Counters::add(&s.counters.injected_corruptions, 1);
            }
        }

        let body = GetBody::new(
            data,
            cut,
            corrupt_at,
            Arc::clone(&s.knobs),
            Arc::clone(&s.counters),
        );
        let output = GetObjectOutput {
            body: Some(StreamingBlob::new(body)),
            accept_ranges: Some("bytes".to_owned()),
            content_length: Some(i64::try_from(len).unwrap_or(i64::MAX)),
            content_range: sel.content_range,
            content_type: Some(
                obj.content_type
                    .clone()
                    .unwrap_or_else(|| store::DEFAULT_CONTENT_TYPE.to_owned()),
            ),
            e_tag: Some(etag_dto(&obj.etag)),
            last_modified: Some(ts(obj.last_modified)),
            metadata: obj.metadata.clone(),
            parts_count: sel.parts_count,
            ..Default::default()
        };
        Ok(with_crc64(S3Response::new(output), &obj, &s.knobs))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let s = self.s();
        Counters::add(&s.counters.heads, 1);
        self.inject_read_error(false)?;
        let input = &req.input;
        let obj = s.store.get(&input.bucket, &input.key)?;
        check_read_conditions(
            &obj,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let sel = select(&obj, input.range.as_ref(), input.part_number)?;
        let len = sel.range.end - sel.range.start;
        let resp = S3Response::new(HeadObjectOutput {
            accept_ranges: Some("bytes".to_owned()),
            content_length: Some(i64::try_from(len).unwrap_or(i64::MAX)),
            content_range: sel.content_range,
            content_type: Some(
                obj.content_type
                    .clone()
                    .unwrap_or_else(|| store::DEFAULT_CONTENT_TYPE.to_owned()),
            ),
            e_tag: Some(etag_dto(&obj.etag)),
            last_modified: Some(ts(obj.last_modified)),
            metadata: obj.metadata.clone(),
            parts_count: sel.parts_count,
            ..Default::default()
        });
        Ok(with_crc64(resp, &obj, &s.knobs))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        Counters::add(&self.s().counters.deletes, 1);
        self.s().store.delete(&req.input.bucket, &req.input.key)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let s = self.s();
        Counters::add(&s.counters.deletes, 1);
        let input = req.input;
        if !s.store.bucket_exists(&input.bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        for id in input.delete.objects {
            s.store.delete(&input.bucket, &id.key)?;
            if !quiet {
                deleted.push(DeletedObject {
                    key: Some(id.key),
                    ..Default::default()
                });
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: None,
            request_charged: None,
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let s = self.s();
        Counters::add(&s.counters.lists, 1);
        let input = req.input;
        let max = Self::max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let resume = match input.continuation_token.as_deref() {
            Some(t) => Some(Resume::from_token(t).ok_or_else(|| {
                s3_error!(
                    InvalidArgument,
                    "The continuation token provided is incorrect"
                )
            })?),
            None => input
                .start_after
                .clone()
                .filter(|s| !s.is_empty())
                .map(Resume::After),
        };
        let page = s.store.list(
            &input.bucket,
            &prefix,
            input.delimiter.as_deref(),
            resume.as_ref(),
            usize::try_from(max).unwrap_or(0),
        )?;
        let enc = encoder(input.encoding_type.as_ref());
        let with_owner = input.fetch_owner.unwrap_or(false);
        let key_count = page.objects.len() + page.common_prefixes.len();
        let contents = page
            .objects
            .iter()
            .map(|(k, o)| Self::object_entry(&enc(k), o, with_owner))
            .collect();
        let common_prefixes = page
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p)),
            })
            .collect();
        let next = if page.truncated {
            page.last.as_ref().map(Resume::to_token)
        } else {
            None
        };
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(enc(&prefix)),
            max_keys: Some(max),
            key_count: Some(i32::try_from(key_count).unwrap_or(i32::MAX)),
            continuation_token: input.continuation_token,
            is_truncated: Some(page.truncated),
            next_continuation_token: next,
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            delimiter: input.delimiter.as_deref().map(enc),
            encoding_type: input.encoding_type,
            start_after: input.start_after.as_deref().map(enc),
            request_charged: None,
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let s = self.s();
        Counters::add(&s.counters.lists, 1);
        let input = req.input;
        let max = Self::max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let resume = input
            .marker
            .clone()
            .filter(|m| !m.is_empty())
            .map(Resume::After);
        let page = s.store.list(
            &input.bucket,
            &prefix,
            input.delimiter.as_deref(),
            resume.as_ref(),
            usize::try_from(max).unwrap_or(0),
        )?;
        let enc = encoder(input.encoding_type.as_ref());
        let contents = page
            .objects
            .iter()
            .map(|(k, o)| Self::object_entry(&enc(k), o, true))
            .collect();
        let common_prefixes = page
            .common_prefixes
            .iter()
            .map(|p| CommonPrefix {
                prefix: Some(enc(p)),
            })
            .collect();
        // S3 only returns NextMarker when a delimiter was given; otherwise
        // clients continue from the last key.
        let has_delimiter = input.delimiter.as_deref().is_some_and(|d| !d.is_empty());
        let next_marker = if page.truncated && has_delimiter {
            page.last.as_ref().map(|r| enc(r.as_str()))
        } else {
            None
        };
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(enc(&prefix)),
            marker: Some(input.marker.as_deref().map(enc).unwrap_or_default()),
            max_keys: Some(max),
            is_truncated: Some(page.truncated),
            contents: Some(contents),
            common_prefixes: Some(common_prefixes),
            delimiter: input.delimiter.as_deref().map(enc),
            next_marker,
            encoding_type: input.encoding_type,
            request_charged: None,
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let s = self.s();
        let input = req.input;
        let upload_id = format!("{:016x}{:016x}", s.id_rng.next_u64(), s.id_rng.next_u64());
        s.store.create_upload(
            upload_id.clone(),
            &input.bucket,
            &input.key,
            input.content_type,
            input.metadata,
        )?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let s = self.s();
        Counters::add(&s.counters.puts, 1);
        let mut input = req.input;
        let faults = s.knobs.part_faults();
        if s.rng.chance(faults.reset_rate) {
            // Take part of the body, then give up on the request: the client's upload of
            // the part breaks off half-way.
            Counters::add(&s.counters.injected_part_faults, 1);
            if let Some(mut body) = input.body.take() {
                let half = input.content_length.unwrap_or(0) as u64 / 2;
                let mut got = 0u64;
                while got < half {
                    match body.next().await {
                        Some(Ok(c)) => got += c.len() as u64,
                        _ => break,
                    }
                }
                Counters::add(&s.counters.put_bytes, got);
            }
            return Err(s3_error!(
                InternalError,
                "We encountered an internal error. Please try again. (connection reset)"
            ));
        }
        let mut data =
            receive_body(s, &input.bucket, input.body.take(), input.content_length).await?;
        Counters::add(&s.counters.put_bytes, data.len() as u64);
        if !data.is_empty()
            && (s.knobs.take_corrupt_part(input.part_number) || s.rng.chance(faults.corrupt_rate))
        {
            Counters::add(&s.counters.injected_part_faults, 1);
            let mut damaged = BytesMut::from(&data[..]);
            let at = damaged.len() / 2;
            damaged[at] ^= 0x55;
            data = damaged.freeze();
        }
        if s.knobs.take_failed_part() || s.rng.chance(faults.error_rate) {
            Counters::add(&s.counters.injected_part_faults, 1);
            return Err(if s.rng.next_u64() & 1 == 0 {
                s3_error!(SlowDown, "Please reduce your request rate.")
            } else {
                s3_error!(
                    InternalError,
                    "We encountered an internal error. Please try again."
                )
            });
        }
        let md5 = store::md5_of(&data);
        check_content_md5(input.content_md5.as_deref(), &md5)?;
        let (etag, crc64) = s.store.upload_part(
            &input.upload_id,
            &input.bucket,
            &input.key,
            input.part_number,
            data,
            md5,
        )?;
        let mut resp = S3Response::new(UploadPartOutput {
            e_tag: Some(etag_dto(&etag)),
            ..Default::default()
        });
        if s.knobs.declare_crc64() {
            resp.headers
                .insert(CRC64_HEADER, http::HeaderValue::from(crc64));
        }
        Ok(resp)
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let s = self.s();
        let input = req.input;
        let listed: Vec<(i32, Option<String>)> = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let n = p
                    .part_number
                    .ok_or_else(|| s3_error!(InvalidPart, "missing PartNumber"))?;
                Ok((n, p.e_tag.map(ETag::into_value)))
            })
            .collect::<S3Result<_>>()?;
        let obj = s
            .store
            .complete_upload(&input.upload_id, &input.bucket, &input.key, &listed)?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(etag_dto(&obj.etag)),
            location: Some(format!("{}/{}/{}", s.endpoint, input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.s()
            .store
            .abort_upload(&input.upload_id, &input.bucket, &input.key)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let prefix = input.prefix.clone().unwrap_or_default();
        let all = self.s().store.list_uploads(&input.bucket, &prefix)?;
        let max = input.max_uploads.unwrap_or(1000).clamp(1, 1000) as usize;
        let key_marker = input.key_marker.clone().unwrap_or_default();
        let id_marker = input.upload_id_marker.clone().unwrap_or_default();
        // Markers are positions in the sorted list (key, then initiation): the entry they
        // name, or for a key marker alone everything of that key, is passed over.
        let start = if key_marker.is_empty() {
            0
        } else if id_marker.is_empty() {
            all.iter()
                .position(|u| u.key > key_marker)
                .unwrap_or(all.len())
        } else {
            all.iter()
                .position(|u| u.key == key_marker && u.upload_id == id_marker)
                .map(|i| i + 1)
                .unwrap_or_else(|| {
                    all.iter()
                        .position(|u| u.key > key_marker)
                        .unwrap_or(all.len())
                })
        };
        let mut after: Vec<_> = all.into_iter().skip(start).collect();
        let truncated = after.len() > max;
        after.truncate(max);
        let (next_key, next_id) = match after.last() {
            Some(u) if truncated => (Some(u.key.clone()), Some(u.upload_id.clone())),
            _ => (None, None),
        };
        let uploads = after
            .into_iter()
            .map(|u| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.upload_id),
                initiated: Some(ts(u.initiated)),
                owner: Some(owner()),
                storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            uploads: Some(uploads),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let (_initiated, parts) =
            self.s()
                .store
                .list_parts(&input.upload_id, &input.bucket, &input.key)?;
        let max = input.max_parts.unwrap_or(1000).clamp(0, 1000);
        let marker = input.part_number_marker.unwrap_or(0);
        let mut selected: Vec<_> = parts
            .into_iter()
            .filter(|p| p.part_number > marker)
            .collect();
        let truncated = selected.len() > usize::try_from(max).unwrap_or(0);
        selected.truncate(usize::try_from(max).unwrap_or(0));
        let next = selected.last().map(|p| p.part_number);
        let parts = selected
            .into_iter()
            .map(|p| Part {
                part_number: Some(p.part_number),
                e_tag: Some(etag_dto(&p.etag)),
                size: Some(i64::try_from(p.size).unwrap_or(i64::MAX)),
                last_modified: Some(ts(p.last_modified)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            is_truncated: Some(truncated),
            parts: Some(parts),
            owner: Some(owner()),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(url_encode("a b/c+d%é"), "a+b/c%2Bd%25%C3%A9");
    }

    #[test]
    fn content_md5() {
        let md5 = store::md5_of(b"hello");
        let good = base64_simd::STANDARD.encode_to_string(md5);
        assert!(check_content_md5(Some(&good), &md5).is_ok());
        let bad = base64_simd::STANDARD.encode_to_string([0u8; 16]);
        assert_eq!(
            check_content_md5(Some(&bad), &md5)
                .unwrap_err()
                .code()
                .as_str(),
            "BadDigest"
        );
        assert_eq!(
            check_content_md5(Some("zz"), &md5)
                .unwrap_err()
                .code()
                .as_str(),
            "InvalidDigest"
        );
    }

    #[test]
    fn selection() {
        let obj = Object::new(Bytes::from_static(b"0123456789"), None, None);
        let r = |first, last| s3s::dto::Range::Int { first, last };
        let sel = select(&obj, Some(&r(2, Some(4))), None).unwrap();
        assert_eq!(sel.range, 2..5);
        assert_eq!(sel.content_range.as_deref(), Some("bytes 2-4/10"));
        let sel = select(&obj, Some(&r(8, Some(100))), None).unwrap();
        assert_eq!(sel.range, 8..10);
        let sel = select(&obj, Some(&s3s::dto::Range::Suffix { length: 3 }), None).unwrap();
        assert_eq!(sel.range, 7..10);
        let err = select(&obj, Some(&r(10, None)), None).unwrap_err();
        assert_eq!(err.status_code(), Some(StatusCode::RANGE_NOT_SATISFIABLE));
        let empty = Object::new(Bytes::new(), None, None);
        let sel = select(&empty, Some(&r(0, None)), None).unwrap();
        assert!(sel.content_range.is_none());
    }
}
