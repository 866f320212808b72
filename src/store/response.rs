//! What a store says in response headers that OpenDAL does not hand back: the whole
//! object's CRC-64 (`x-oss-hash-crc64ecma` from OSS, also on its S3-compatible endpoint;
//! `x-cos-hash-crc64ecma` from COS), sent on every GET, ranged ones included.
//!
//! [`HeaderTap`] wraps the operator's HTTP transport and reads those headers off each GET (and HEAD)
//! response; [`with_object_crc64`] runs a read with a task-local slot the tap fills, so the
//! value reaches the caller of that read and no other. OpenDAL runs a single-stream read
//! (what [`super::Store`] asks for) inside the caller's task, retries included, so the slot
//! is always in scope.
//!
//! The tap also holds a store to the version a read is pinned to (see
//! [`super::version`]): a GET that asked `If-Match: E` and is answered 2xx with another
//! ETag came from a store that ignores the condition; the tap answers it with the 412 the
//! store should have sent, so its body, of another version, is never read.
//!
//! And it reads the keys of listings that OpenDAL cannot hand back whole: at a bucket's
//! root OpenDAL strips a key's leading `/` (`/etc/x` is listed as `etc/x`, an alias of
//! another key), so [`with_slash_keys`] collects the raw keys beginning with `/` that the
//! LIST responses of a listing carry, and the store puts them back ([`super::Store`]).
//!
//! Apart from that one substitution it must not change requests or bodies, and it never
//! sees credentials (it only reads the `If-Match` request header, the query of LIST
//! requests, response headers and LIST bodies).

use std::cell::Cell;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;

use http::header::{ETAG, IF_MATCH};
use http::{Method, Request, Response, StatusCode};
use opendal::{Buffer, HttpBody, HttpTransport, HttpTransporter};

use super::version::same_etag;

/// Response headers that carry a CRC-64/XZ (ECMA-182) of the whole object, in decimal.
pub const CRC64_HEADERS: [&str; 2] = ["x-oss-hash-crc64ecma", "x-cos-hash-crc64ecma"];

tokio::task_local! {
    static OBJECT_CRC64: Cell<Option<u64>>;
}

/// The CRC-64 a response declares for its object, if it declares one.
pub fn crc64_of_response(headers: &http::HeaderMap) -> Option<u64> {
    CRC64_HEADERS
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `read` and returns its output with the CRC-64 that the last GET response inside it
/// declared for the whole object.
pub async fn with_object_crc64<F: Future>(read: F) -> (F::Output, Option<u64>) {
    OBJECT_CRC64
        .scope(Cell::new(None), async {
            let out = read.await;
            (out, OBJECT_CRC64.with(Cell::get))
        })
        .await
}

/// The operator's transport, plus a look at GET response headers.
pub struct HeaderTap {
    pub inner: HttpTransporter,
}

impl HttpTransport for HeaderTap {
    async fn fetch(&self, req: Request<Buffer>) -> opendal::Result<Response<HttpBody>> {
        let is_get = req.method() == Method::GET;
        let is_head = req.method() == Method::HEAD;
        let is_list = is_get
            && req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "list-type=2"));
        let if_match = req.headers().get(IF_MATCH).cloned();
        let resp = self.inner.fetch(req).await?;
        if !is_get && !is_head {
            return Ok(resp);
        }
        if is_list && let Ok(sink) = SLASH_KEYS.try_with(Arc::clone) {
            let mut scan = KeyScan::default();
            return Ok(resp.map(|body| {
                body.map_inner(|s| {
                    Box::new(s.map_ok(move |buf| {
                        let found = scan.feed(&buf.to_vec());
                        if !found.is_empty() {
                            sink.lock().unwrap_or_else(|e| e.into_inner()).extend(found);
                        }
                        buf
                    }))
                })
            }));
        }
        if let Some(want) = if_match
            && let Some(got) = other_version(&want, &resp)
        {
            tracing::debug!(want = ?want, got = ?got, "store ignored If-Match; answering 412");
            let mut failed = Response::new(HttpBody::new(futures::stream::empty(), Some(0)));
            *failed.status_mut() = StatusCode::PRECONDITION_FAILED;
            return Ok(failed);
        }
        if let Some(crc) = crc64_of_response(resp.headers()) {
            // GET and HEAD (an upload's check) declare it; outside `with_object_crc64`
            // (listings, the FUSE cache) nobody asks.
            let _ = OBJECT_CRC64.try_with(|slot| slot.set(Some(crc)));
        }
        Ok(resp)
    }
}

tokio::task_local! {
    static SLASH_KEYS: Arc<Mutex<Vec<String>>>;
}

/// Runs a listing and returns, with its result, every key beginning with `/` that its
/// LIST responses held (as the store spells them, before OpenDAL strips the slash).
pub async fn with_slash_keys<F: Future>(list: F) -> (F::Output, Vec<String>) {
    let sink: Arc<Mutex<Vec<String>>> = Default::default();
    let out = SLASH_KEYS.scope(sink.clone(), list).await;
    let keys = std::mem::take(&mut *sink.lock().unwrap_or_else(|e| e.into_inner()));
    (out, keys)
}

/// Finds `<Key>/…</Key>` in a LIST body that arrives in pieces.
#[derive(Default)]
struct KeyScan {
    /// The unfinished end of what has been fed: a partial tag or key.
    carry: Vec<u8>,
}

impl KeyScan {
    const OPEN: &[u8] = b"<Key>";
    const CLOSE: &[u8] = b"</Key>";

    fn feed(&mut self, piece: &[u8]) -> Vec<String> {
        self.carry.extend_from_slice(piece);
        let mut found = Vec::new();
        let mut at = 0;
        loop {
            let Some(open) = find(&self.carry[at..], Self::OPEN).map(|i| at + i) else {
                // Keep what could be the start of an `<Key>` cut by the piece's end.
                at = self
                    .carry
                    .len()
                    .saturating_sub(Self::OPEN.len() - 1)
                    .max(at);
                break;
            };
            let start = open + Self::OPEN.len();
            let Some(close) = find(&self.carry[start..], Self::CLOSE).map(|i| start + i) else {
                at = open; // a key cut by the piece's end: wait for the rest
                break;
            };
            let key = xml_unescape(&String::from_utf8_lossy(&self.carry[start..close]));
            if key.starts_with('/') {
                found.push(key);
            }
            at = close + Self::CLOSE.len();
        }
        self.carry.drain(..at);
        found
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The five XML entities and numeric references (what S3 and OSS escape in keys).
fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let ent = &rest[1..end];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The ETag of a successful response that is not the one `If-Match` asked for.
fn other_version<B>(want: &http::HeaderValue, resp: &Response<B>) -> Option<http::HeaderValue> {
    let got = resp.headers().get(ETAG)?;
    let differs = match (want.to_str(), got.to_str()) {
        (Ok(w), Ok(g)) => !same_etag(w, g),
        _ => want != got,
    };
    (resp.status().is_success() && differs).then(|| got.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_either_header_and_ignores_garbage() {
        let mut h = http::HeaderMap::new();
        assert_eq!(crc64_of_response(&h), None);
        h.insert(
            "x-cos-hash-crc64ecma",
            "18446744073709551615".parse().unwrap(),
        );
        assert_eq!(crc64_of_response(&h), Some(u64::MAX));
        h.insert("x-oss-hash-crc64ecma", " 42".parse().unwrap());
        assert_eq!(crc64_of_response(&h), Some(42));
        h.insert("x-oss-hash-crc64ecma", "-1".parse().unwrap());
        assert_eq!(crc64_of_response(&h), None);
    }

    #[test]
    fn a_success_with_another_etag_than_asked_for_is_another_version() {
        let want = http::HeaderValue::from_static("\"a\"");
        let resp = |status: u16, etag: Option<&'static str>| {
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(e) = etag {
                r.headers_mut()
                    .insert(ETAG, http::HeaderValue::from_static(e));
            }
            r
        };
        assert!(other_version(&want, &resp(206, Some("\"b\""))).is_some());
        assert!(other_version(&want, &resp(200, Some("a"))).is_none());
        assert!(other_version(&want, &resp(206, None)).is_none());
        assert!(other_version(&want, &resp(412, Some("\"b\""))).is_none());
    }

    #[test]
    fn keys_beginning_with_a_slash_are_found_across_pieces() {
        let body = "<ListBucketResult><Contents><Key>/etc/x&amp;y</Key></Contents>\
                    <Contents><Key>plain</Key></Contents><Contents><Key>/a&#x2F;b</Key>\
                    </Contents></ListBucketResult>";
        for cut in 1..body.len() {
            let mut scan = KeyScan::default();
            let mut got = scan.feed(&body.as_bytes()[..cut]);
            got.extend(scan.feed(&body.as_bytes()[cut..]));
            assert_eq!(got, ["/etc/x&y", "/a/b"], "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn the_slot_belongs_to_one_read() {
        let set = |v| OBJECT_CRC64.try_with(|s| s.set(Some(v))).is_ok();
        assert!(!set(1), "no slot outside a read");
        let (_, got) = with_object_crc64(async { set(7) }).await;
        assert_eq!(got, Some(7));
        let (_, got) = with_object_crc64(async {}).await;
        assert_eq!(got, None, "a new read starts empty");
    }
}
