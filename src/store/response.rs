//! What a store says in response headers that OpenDAL does not hand back: the whole
//! object's CRC-64 (`x-oss-hash-crc64ecma` from OSS, also on its S3-compatible endpoint;
//! `x-cos-hash-crc64ecma` from COS), sent on every GET, ranged ones included.
//!
//! [`HeaderTap`] wraps the operator's HTTP transport and reads those headers off each GET
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
//! Apart from that one substitution it must not change requests or bodies, and it never
//! sees credentials (it only reads the `If-Match` request header and response headers).

use std::cell::Cell;
use std::future::Future;

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
        let if_match = req.headers().get(IF_MATCH).cloned();
        let resp = self.inner.fetch(req).await?;
        if !is_get {
            return Ok(resp);
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
            // Outside `with_object_crc64` (listings, the FUSE cache) nobody asks.
            let _ = OBJECT_CRC64.try_with(|slot| slot.set(Some(crc)));
        }
        Ok(resp)
    }
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
