//! In-memory object store: buckets, objects, multipart uploads, the S3 ETag
//! rules and the ordered listing algorithm (prefix / delimiter / pagination).
//!
//! Everything here is synchronous and protocol-agnostic apart from returning
//! `S3Error`s with the codes real S3 uses; the `s3` module maps it onto the wire.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use s3s::{S3Result, s3_error};
use time::OffsetDateTime;

/// S3 refuses non-final multipart parts smaller than this.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Largest part number S3 accepts.
pub const MAX_PART_NUMBER: i32 = 10_000;
/// Content type S3 reports when the uploader did not give one.
pub const DEFAULT_CONTENT_TYPE: &str = "binary/octet-stream";

/// One stored object. Immutable once inserted (a PUT replaces the `Arc`).
#[derive(Debug, Clone)]
pub struct Object {
    pub data: Bytes,
    /// Quoted ETag as sent on the wire, e.g. `"\"9e107d9d372bb6826bd81d3542a419d6\""`.
    pub etag: String,
    /// Whole-second precision, like S3.
    pub last_modified: OffsetDateTime,
    pub content_type: Option<String>,
    pub metadata: Option<HashMap<String, String>>,
    /// Part sizes, for objects created by CompleteMultipartUpload.
    pub part_sizes: Option<Vec<u64>>,
    /// CRC-64/XZ (what OSS calls crc64ecma) of `data`, sent as `x-oss-hash-crc64ecma` on
    /// GET and HEAD as OSS does (for a ranged GET too: the whole object's value).
    pub crc64: u64,
}

impl Object {
    /// A single-part object with `ETag = "md5hex"`.
    pub fn new(
        data: Bytes,
        content_type: Option<String>,
        metadata: Option<HashMap<String, String>>,
    ) -> Self {
        let md5 = md5_of(&data);
        Self::with_md5(data, md5, content_type, metadata)
    }

    /// Like [`Object::new`] with the MD5 already computed.
    pub fn with_md5(
        data: Bytes,
        md5: [u8; 16],
        content_type: Option<String>,
        metadata: Option<HashMap<String, String>>,
    ) -> Self {
        Self {
            crc64: crc64_of(&data),
            data,
            etag: quote(&hex::encode(md5)),
            last_modified: now(),
            content_type,
            metadata,
            part_sizes: None,
        }
    }

    /// ETag without the surrounding quotes.
    pub fn etag_value(&self) -> &str {
        unquote(&self.etag)
    }

    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }
}

pub struct Bucket {
    pub created: OffsetDateTime,
    pub objects: BTreeMap<String, Arc<Object>>,
}

struct Part {
    data: Bytes,
    md5: [u8; 16],
    last_modified: OffsetDateTime,
}

struct Upload {
    bucket: String,
    key: String,
    content_type: Option<String>,
    metadata: Option<HashMap<String, String>>,
    initiated: OffsetDateTime,
    parts: BTreeMap<i32, Part>,
}

/// Summary of one uploaded part (for ListParts).
pub struct PartInfo {
    pub part_number: i32,
    pub etag: String,
    pub size: u64,
    pub last_modified: OffsetDateTime,
}

/// Where a listing resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Continue strictly after this key.
    After(String),
    /// Continue after every key that starts with this common prefix.
    AfterPrefix(String),
}

impl Resume {
    /// Opaque continuation token for ListObjectsV2.
    pub fn to_token(&self) -> String {
        match self {
            Resume::After(k) => format!("k{}", hex::encode(k)),
            Resume::AfterPrefix(p) => format!("p{}", hex::encode(p)),
        }
    }

    pub fn from_token(token: &str) -> Option<Self> {
        let decode = |s: &str| hex::decode(s).ok().and_then(|v| String::from_utf8(v).ok());
        if let Some(rest) = token.strip_prefix('k') {
            return decode(rest).map(Resume::After);
        }
        if let Some(rest) = token.strip_prefix('p') {
            return decode(rest).map(Resume::AfterPrefix);
        }
        None
    }

    pub fn as_str(&self) -> &str {
        match self {
            Resume::After(s) | Resume::AfterPrefix(s) => s,
        }
    }
}

/// One page of a listing, in key order (keys and common prefixes interleaved).
#[derive(Default)]
pub struct ListPage {
    pub objects: Vec<(String, Arc<Object>)>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// Last entry returned; where the next page resumes.
    pub last: Option<Resume>,
}

#[derive(Default)]
pub struct Store {
    buckets: RwLock<HashMap<String, Bucket>>,
    uploads: Mutex<HashMap<String, Upload>>,
    /// Where parts and assembled objects of at least [`SPILL_AT`] bytes are kept (unlinked
    /// files, memory-mapped) instead of the heap: a 6 GiB object then costs page cache,
    /// not 12 GiB of RAM.
    spill_dir: RwLock<Option<std::path::PathBuf>>,
}

/// Smallest buffer moved to a spill file.
pub const SPILL_AT: usize = 4 * 1024 * 1024;

/// One open multipart upload, for ListMultipartUploads.
pub struct UploadInfo {
    pub key: String,
    pub upload_id: String,
    pub initiated: OffsetDateTime,
}

/// CRC-64/XZ, the ECMA-182 polynomial as OSS and COS compute it.
pub fn crc64_of(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, data)
}

pub fn md5_of(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

pub fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

pub fn unquote(s: &str) -> &str {
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// Current time truncated to whole seconds (S3 keeps second precision).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// The least string greater than every string that starts with `p`,
/// or `None` if there is none (only possible for strings of `char::MAX`).
fn prefix_successor(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        if next == 0xD800 {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl Store {
    pub fn create_bucket(&self, name: &str) -> bool {
        let mut buckets = self.buckets.write().unwrap();
        if buckets.contains_key(name) {
            return false;
        }
        buckets.insert(
            name.to_owned(),
            Bucket {
                created: now(),
                objects: BTreeMap::new(),
            },
        );
        true
    }

    pub fn bucket_exists(&self, name: &str) -> bool {
        self.buckets.read().unwrap().contains_key(name)
    }

    /// `(name, creation time)` sorted by name.
    pub fn list_buckets(&self) -> Vec<(String, OffsetDateTime)> {
        let buckets = self.buckets.read().unwrap();
        let mut v: Vec<_> = buckets
            .iter()
            .map(|(k, b)| (k.clone(), b.created))
            .collect();
        v.sort();
        v
    }

    pub fn delete_bucket(&self, name: &str) -> S3Result<()> {
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets.get(name).ok_or_else(|| s3_error!(NoSuchBucket))?;
        if !b.objects.is_empty() {
            return Err(s3_error!(
                BucketNotEmpty,
                "The bucket you tried to delete is not empty"
            ));
        }
        buckets.remove(name);
        self.uploads.lock().unwrap().retain(|_, u| u.bucket != name);
        Ok(())
    }

    pub fn get(&self, bucket: &str, key: &str) -> S3Result<Arc<Object>> {
        let buckets = self.buckets.read().unwrap();
        let b = buckets.get(bucket).ok_or_else(|| s3_error!(NoSuchBucket))?;
        b.objects
            .get(key)
            .cloned()
            .ok_or_else(|| s3_error!(NoSuchKey, "The specified key does not exist."))
    }

    /// Insert (or replace) an object. Fails with NoSuchBucket if the bucket is missing.
    pub fn put(&self, bucket: &str, key: &str, mut obj: Object) -> S3Result<Arc<Object>> {
        obj.data = self.spill(obj.data);
        let obj = Arc::new(obj);
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets
            .get_mut(bucket)
            .ok_or_else(|| s3_error!(NoSuchBucket))?;
        b.objects.insert(key.to_owned(), Arc::clone(&obj));
        Ok(obj)
    }

    /// Insert after `check` approved the current object (if any), atomically.
    pub fn put_checked(
        &self,
        bucket: &str,
        key: &str,
        obj: Object,
        check: impl FnOnce(Option<&Object>) -> S3Result<()>,
    ) -> S3Result<Arc<Object>> {
        let mut obj = obj;
        obj.data = self.spill(obj.data);
        let obj = Arc::new(obj);
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets
            .get_mut(bucket)
            .ok_or_else(|| s3_error!(NoSuchBucket))?;
        check(b.objects.get(key).map(Arc::as_ref))?;
        b.objects.insert(key.to_owned(), Arc::clone(&obj));
        Ok(obj)
    }

    /// Insert, creating the bucket if needed (test setup helper).
    pub fn put_force(&self, bucket: &str, key: &str, obj: Object) -> Arc<Object> {
        let obj = Arc::new(obj);
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets.entry(bucket.to_owned()).or_insert_with(|| Bucket {
            created: now(),
            objects: BTreeMap::new(),
        });
        b.objects.insert(key.to_owned(), Arc::clone(&obj));
        obj
    }

    /// Delete; returns whether the key existed. Missing bucket is NoSuchBucket.
    pub fn delete(&self, bucket: &str, key: &str) -> S3Result<bool> {
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets
            .get_mut(bucket)
            .ok_or_else(|| s3_error!(NoSuchBucket))?;
        Ok(b.objects.remove(key).is_some())
    }

    /// All keys of a bucket, in order (test helper).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let buckets = self.buckets.read().unwrap();
        buckets
            .get(bucket)
            .map(|b| b.objects.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// One page of keys and common prefixes in lexicographic order.
    ///
    /// `resume` is the point after which listing starts (start-after, marker or
    /// continuation token). `max` counts keys and common prefixes together.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        resume: Option<&Resume>,
        max: usize,
    ) -> S3Result<ListPage> {
        let buckets = self.buckets.read().unwrap();
        let b = buckets.get(bucket).ok_or_else(|| s3_error!(NoSuchBucket))?;
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let mut page = ListPage::default();
        if max == 0 {
            return Ok(page);
        }

        // `lower` is where the next range scan starts; `skip` (rarely used) is a
        // prefix whose keys must be skipped one by one because it has no successor.
        let mut skip: Option<String> = None;
        let mut lower: Bound<String> = Bound::Included(prefix.to_owned());
        match resume {
            Some(Resume::After(k)) if k.as_str() >= prefix => lower = Bound::Excluded(k.clone()),
            Some(Resume::AfterPrefix(p)) if p.as_str() >= prefix => match prefix_successor(p) {
                Some(s) => lower = Bound::Included(s),
                None => {
                    lower = Bound::Included(p.clone());
                    skip = Some(p.clone());
                }
            },
            _ => {}
        }

        // A common prefix at or before a start-after / marker key is not
        // listed again (S3 semantics), so markers may name common prefixes.
        let after = match resume {
            Some(Resume::After(k)) => Some(k.as_str()),
            _ => None,
        };
        let mut count = 0usize;
        'scan: loop {
            let bounds = (lower.as_ref().map(String::as_str), Bound::Unbounded);
            for (k, obj) in b.objects.range::<str, _>(bounds) {
                if !k.starts_with(prefix) {
                    break 'scan;
                }
                if let Some(s) = &skip {
                    if k.starts_with(s.as_str()) {
                        continue;
                    }
                    skip = None;
                }
                let rest = &k[prefix.len()..];
                let group =
                    delimiter.and_then(|d| rest.find(d).map(|i| &k[..prefix.len() + i + d.len()]));
                let emit = group.is_none_or(|cp| after.is_none_or(|a| cp > a));
                if emit {
                    if count == max {
                        page.truncated = true;
                        break 'scan;
                    }
                    count += 1;
                }
                match group {
                    Some(cp) => {
                        if emit {
                            page.common_prefixes.push(cp.to_owned());
                            page.last = Some(Resume::AfterPrefix(cp.to_owned()));
                        }
                        match prefix_successor(cp) {
                            Some(s) => {
                                lower = Bound::Included(s);
                                continue 'scan;
                            }
                            None => skip = Some(cp.to_owned()),
                        }
                    }
                    None => {
                        page.objects.push((k.clone(), Arc::clone(obj)));
                        page.last = Some(Resume::After(k.clone()));
                    }
                }
            }
            break;
        }
        Ok(page)
    }

    /// Keep large parts and objects in files under `dir` from now on.
    pub fn set_spill_dir(&self, dir: Option<std::path::PathBuf>) {
        *self.spill_dir.write().unwrap() = dir;
    }

    /// `data` moved to a memory-mapped spill file when spilling is on and it is large.
    fn spill(&self, data: Bytes) -> Bytes {
        let dir = self.spill_dir.read().unwrap().clone();
        match dir {
            Some(d) if data.len() >= SPILL_AT => {
                spill_chunks(&d, data.len(), std::iter::once(&data[..])).unwrap_or(data)
            }
            _ => data,
        }
    }

    /// Open uploads of keys starting with `prefix`, by key then initiation time.
    pub fn list_uploads(&self, bucket: &str, prefix: &str) -> S3Result<Vec<UploadInfo>> {
        if !self.bucket_exists(bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        let uploads = self.uploads.lock().unwrap();
        let mut out: Vec<UploadInfo> = uploads
            .iter()
            .filter(|(_, u)| u.bucket == bucket && u.key.starts_with(prefix))
            .map(|(id, u)| UploadInfo {
                key: u.key.clone(),
                upload_id: id.clone(),
                initiated: u.initiated,
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.key, a.initiated, &a.upload_id).cmp(&(&b.key, b.initiated, &b.upload_id))
        });
        Ok(out)
    }

    pub fn create_upload(
        &self,
        upload_id: String,
        bucket: &str,
        key: &str,
        content_type: Option<String>,
        metadata: Option<HashMap<String, String>>,
    ) -> S3Result<()> {
        if !self.bucket_exists(bucket) {
            return Err(s3_error!(NoSuchBucket));
        }
        self.uploads.lock().unwrap().insert(
            upload_id,
            Upload {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                content_type,
                metadata,
                initiated: now(),
                parts: BTreeMap::new(),
            },
        );
        Ok(())
    }

    fn no_such_upload() -> s3s::S3Error {
        s3_error!(
            NoSuchUpload,
            "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."
        )
    }

    /// Store a part; returns its quoted ETag.
    pub fn upload_part(
        &self,
        upload_id: &str,
        bucket: &str,
        key: &str,
        part_number: i32,
        data: Bytes,
        md5: [u8; 16],
    ) -> S3Result<(String, u64)> {
        if !(1..=MAX_PART_NUMBER).contains(&part_number) {
            return Err(s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and 10000, inclusive"
            ));
        }
        let crc = crc64_of(&data);
        let data = self.spill(data);
        let mut uploads = self.uploads.lock().unwrap();
        let up = uploads
            .get_mut(upload_id)
            .filter(|u| u.bucket == bucket && u.key == key)
            .ok_or_else(Self::no_such_upload)?;
        up.parts.insert(
            part_number,
            Part {
                data,
                md5,
                last_modified: now(),
            },
        );
        Ok((quote(&hex::encode(md5)), crc))
    }

    pub fn list_parts(
        &self,
        upload_id: &str,
        bucket: &str,
        key: &str,
    ) -> S3Result<(OffsetDateTime, Vec<PartInfo>)> {
        let uploads = self.uploads.lock().unwrap();
        let up = uploads
            .get(upload_id)
            .filter(|u| u.bucket == bucket && u.key == key)
            .ok_or_else(Self::no_such_upload)?;
        let parts = up
            .parts
            .iter()
            .map(|(&n, p)| PartInfo {
                part_number: n,
                etag: quote(&hex::encode(p.md5)),
                size: p.data.len() as u64,
                last_modified: p.last_modified,
            })
            .collect();
        Ok((up.initiated, parts))
    }

    pub fn abort_upload(&self, upload_id: &str, bucket: &str, key: &str) -> S3Result<()> {
        let mut uploads = self.uploads.lock().unwrap();
        match uploads.get(upload_id) {
            Some(u) if u.bucket == bucket && u.key == key => {
                uploads.remove(upload_id);
                Ok(())
            }
            _ => Err(Self::no_such_upload()),
        }
    }

    /// Assemble the listed parts (`(part number, etag)` in request order) into
    /// an object, with S3's validation and multipart ETag rule.
    pub fn complete_upload(
        &self,
        upload_id: &str,
        bucket: &str,
        key: &str,
        listed: &[(i32, Option<String>)],
    ) -> S3Result<Arc<Object>> {
        let mut uploads = self.uploads.lock().unwrap();
        let up = uploads
            .get(upload_id)
            .filter(|u| u.bucket == bucket && u.key == key)
            .ok_or_else(Self::no_such_upload)?;
        if listed.is_empty() {
            return Err(s3_error!(
                MalformedXML,
                "The XML you provided was not well-formed or did not validate against our published schema"
            ));
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(s3_error!(
                InvalidPartOrder,
                "The list of parts was not in ascending order. Parts must be ordered by part number."
            ));
        }
        let mut chosen = Vec::with_capacity(listed.len());
        for (n, etag) in listed {
            let part = up.parts.get(n).ok_or_else(|| invalid_part(*n))?;
            if let Some(e) = etag
                && unquote(e) != hex::encode(part.md5)
            {
                return Err(invalid_part(*n));
            }
            chosen.push(part);
        }
        let last = chosen.len() - 1;
        for (i, p) in chosen.iter().enumerate() {
            if i != last && p.data.len() < MIN_PART_SIZE {
                return Err(s3_error!(
                    EntityTooSmall,
                    "Your proposed upload is smaller than the minimum allowed object size."
                ));
            }
        }

        let total: usize = chosen.iter().map(|p| p.data.len()).sum();
        let spill_dir = self.spill_dir.read().unwrap().clone();
        let spilled = match spill_dir {
            Some(d) if total >= SPILL_AT && chosen.len() > 1 => {
                spill_chunks(&d, total, chosen.iter().map(|p| &p.data[..]))
            }
            _ => None,
        };
        let data = if let Some(d) = spilled {
            d
        } else if chosen.len() == 1 {
            chosen[0].data.clone()
        } else {
            let total = chosen.iter().map(|p| p.data.len()).sum();
            let mut buf = BytesMut::with_capacity(total);
            for p in &chosen {
                buf.extend_from_slice(&p.data);
            }
            buf.freeze()
        };
        let mut md5s = Vec::with_capacity(16 * chosen.len());
        for p in &chosen {
            md5s.extend_from_slice(&p.md5);
        }
        let etag = quote(&format!("{}-{}", hex::encode(md5_of(&md5s)), chosen.len()));
        let obj = Object {
            crc64: crc64_of(&data),
            data,
            etag,
            last_modified: now(),
            content_type: up.content_type.clone(),
            metadata: up.metadata.clone(),
            part_sizes: Some(chosen.iter().map(|p| p.data.len() as u64).collect()),
        };
        let obj = self.put(bucket, key, obj)?;
        uploads.remove(upload_id);
        Ok(obj)
    }
}

/// `chunks` (`total` bytes) written to an unlinked file in `dir` and mapped back.
fn spill_chunks<'a>(
    dir: &std::path::Path,
    total: usize,
    chunks: impl Iterator<Item = &'a [u8]>,
) -> Option<Bytes> {
    use std::io::Write;
    let file = tempfile::tempfile_in(dir).ok()?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    for c in chunks {
        w.write_all(c).ok()?;
    }
    w.flush().ok()?;
    drop(w);
    // SAFETY: the file is unlinked and private to this process; nothing else maps or
    // writes it, so the mapping's bytes cannot change under the `Bytes`.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    (map.len() == total).then(|| Bytes::from_owner(map))
}

fn invalid_part(n: i32) -> s3s::S3Error {
    s3_error!(
        InvalidPart,
        "One or more of the specified parts could not be found. The part may not have been uploaded, or the specified entity tag may not match the part's entity tag. (part {n})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(keys: &[&str]) -> Store {
        let s = Store::default();
        s.create_bucket("b");
        for k in keys {
            s.put("b", k, Object::new(Bytes::from_static(b"x"), None, None))
                .unwrap();
        }
        s
    }

    fn names(p: &ListPage) -> (Vec<String>, Vec<String>) {
        (
            p.objects.iter().map(|(k, _)| k.clone()).collect(),
            p.common_prefixes.clone(),
        )
    }

    #[test]
    fn etag_is_quoted_md5() {
        let o = Object::new(Bytes::from_static(b"hello"), None, None);
        assert_eq!(o.etag, "\"5d41402abc4b2a76b9719d911017c592\"");
        assert_eq!(o.etag_value(), "5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn successor() {
        assert_eq!(prefix_successor("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_successor("").as_deref(), None);
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }

    #[test]
    fn delimiter_groups_and_paginates() {
        let s = store_with(&["a/1", "a/2", "a/b/3", "b", "c/1", "c/2", "d"]);
        let p = s.list("b", "", Some("/"), None, 1000).unwrap();
        assert_eq!(
            names(&p),
            (vec!["b".into(), "d".into()], vec!["a/".into(), "c/".into()])
        );
        assert!(!p.truncated);

        // two entries per page: [a/, b] [c/, d]
        let p1 = s.list("b", "", Some("/"), None, 2).unwrap();
        assert_eq!(names(&p1), (vec!["b".into()], vec!["a/".into()]));
        assert!(p1.truncated);
        let p2 = s.list("b", "", Some("/"), p1.last.as_ref(), 2).unwrap();
        assert_eq!(names(&p2), (vec!["d".into()], vec!["c/".into()]));
        assert!(!p2.truncated);

        // resuming right after a common prefix does not repeat it
        let p = s.list("b", "", Some("/"), None, 1).unwrap();
        assert_eq!(p.last, Some(Resume::AfterPrefix("a/".into())));
        let p = s.list("b", "", Some("/"), p.last.as_ref(), 1).unwrap();
        assert_eq!(names(&p), (vec!["b".into()], vec![]));

        let p = s.list("b", "a/", Some("/"), None, 1000).unwrap();
        assert_eq!(
            names(&p),
            (vec!["a/1".into(), "a/2".into()], vec!["a/b/".into()])
        );

        let p = s.list("b", "a", None, None, 1000).unwrap();
        assert_eq!(p.objects.len(), 3);
        let p = s
            .list("b", "", None, Some(&Resume::After("b".into())), 1000)
            .unwrap();
        assert_eq!(p.objects.len(), 3);
        // a marker naming a common prefix, or inside one, skips that group
        let p = s
            .list("b", "", Some("/"), Some(&Resume::After("a/".into())), 1000)
            .unwrap();
        assert_eq!(names(&p), (vec!["b".into(), "d".into()], vec!["c/".into()]));
        let p = s
            .list(
                "b",
                "",
                Some("/"),
                Some(&Resume::After("a/10".into())),
                1000,
            )
            .unwrap();
        assert_eq!(names(&p), (vec!["b".into(), "d".into()], vec!["c/".into()]));
        let p = s
            .list("b", "", Some("/"), Some(&Resume::After("a".into())), 1000)
            .unwrap();
        assert_eq!(
            names(&p),
            (vec!["b".into(), "d".into()], vec!["a/".into(), "c/".into()])
        );
        let p = s.list("b", "zz", None, None, 1000).unwrap();
        assert!(p.objects.is_empty() && !p.truncated);
    }

    #[test]
    fn exact_page_boundary_is_not_truncated() {
        let s = store_with(&["a", "b"]);
        let p = s.list("b", "", None, None, 2).unwrap();
        assert!(!p.truncated);
        let p = s.list("b", "", None, None, 1).unwrap();
        assert!(p.truncated);
    }

    #[test]
    fn token_roundtrip() {
        for r in [
            Resume::After("a/b c".into()),
            Resume::AfterPrefix("x/".into()),
        ] {
            assert_eq!(Resume::from_token(&r.to_token()), Some(r));
        }
        assert_eq!(Resume::from_token("zzz"), None);
    }

    #[test]
    fn multipart_rules() {
        let s = store_with(&[]);
        s.create_upload("u".into(), "b", "k", None, None).unwrap();
        let big = Bytes::from(vec![1u8; MIN_PART_SIZE]);
        let e1 = s
            .upload_part("u", "b", "k", 1, big.clone(), md5_of(&big))
            .unwrap()
            .0;
        let (e2, c2) = s
            .upload_part(
                "u",
                "b",
                "k",
                2,
                Bytes::from_static(b"tail"),
                md5_of(b"tail"),
            )
            .unwrap();
        assert_eq!(c2, crc64_of(b"tail"));
        let e3 = s
            .upload_part(
                "u",
                "b",
                "k",
                3,
                Bytes::from_static(b"small"),
                md5_of(b"small"),
            )
            .unwrap()
            .0;
        // small non-final part
        let err = s
            .complete_upload(
                "u",
                "b",
                "k",
                &[(1, Some(e1.clone())), (2, Some(e2.clone())), (3, Some(e3))],
            )
            .unwrap_err();
        assert_eq!(err.code().as_str(), "EntityTooSmall");
        // etag mismatch
        let err = s
            .complete_upload(
                "u",
                "b",
                "k",
                &[(1, Some(e2.clone())), (2, Some(e2.clone()))],
            )
            .unwrap_err();
        assert_eq!(err.code().as_str(), "InvalidPart");
        let err = s
            .complete_upload(
                "u",
                "b",
                "k",
                &[(2, Some(e2.clone())), (1, Some(e1.clone()))],
            )
            .unwrap_err();
        assert_eq!(err.code().as_str(), "InvalidPartOrder");
        let obj = s
            .complete_upload("u", "b", "k", &[(1, Some(e1)), (2, Some(e2))])
            .unwrap();
        assert_eq!(obj.data.len(), MIN_PART_SIZE + 4);
        let mut md5s = md5_of(&big).to_vec();
        md5s.extend_from_slice(&md5_of(b"tail"));
        assert_eq!(obj.etag, format!("\"{}-2\"", hex::encode(md5_of(&md5s))));
        // upload is gone
        let err = s.complete_upload("u", "b", "k", &[(1, None)]).unwrap_err();
        assert_eq!(err.code().as_str(), "NoSuchUpload");
    }
}
