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
//! It must not change requests or bodies, and it never sees credentials (it only reads
//! response headers).

use std::cell::Cell;
use std::future::Future;

use http::{Method, Request, Response};
use opendal::{Buffer, HttpBody, HttpTransport, HttpTransporter};

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
        let resp = self.inner.fetch(req).await?;
        if is_get && let Some(crc) = crc64_of_response(resp.headers()) {
            // Outside `with_object_crc64` (listings, the FUSE cache) nobody asks.
            let _ = OBJECT_CRC64.try_with(|slot| slot.set(Some(crc)));
        }
        Ok(resp)
    }
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
