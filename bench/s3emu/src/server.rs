//! HTTP serving: SigV4 auth setup, the front service (first-byte latency,
//! request counting, request ids, small protocol fix-ups around `s3s`), and
//! the hyper-util accept loop with graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderValue, Method, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{HttpError, HttpResponse, S3Result, s3_error};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::emulation::Counters;
use crate::s3::{Emu, Shared};

/// The keys in `Shared::keys` (replaceable while serving, to test rotated credentials);
/// an unknown access key is `InvalidAccessKeyId` (403) like real S3.
struct EmuAuth(Arc<Shared>);

#[async_trait::async_trait]
impl S3Auth for EmuAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let keys = self.0.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(access_key)
            .cloned()
            .map(SecretKey::from)
            .ok_or_else(|| {
                s3_error!(
                    InvalidAccessKeyId,
                    "The AWS Access Key Id you provided does not exist in our records."
                )
            })
    }
}

/// Signed requests pass; unsigned ones only for reads when the public-read knob is on.
struct EmuAccess(Arc<Shared>);

#[async_trait::async_trait]
impl S3Access for EmuAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        if cx.credentials().is_some()
            || (self.0.knobs.public_read() && matches!(*cx.method(), Method::GET | Method::HEAD))
        {
            return Ok(());
        }
        Err(s3_error!(AccessDenied, "Anonymous access is not allowed"))
    }
}

pub fn build_service(shared: Arc<Shared>, access_key: &str, secret_key: &str) -> Front {
    let mut builder = S3ServiceBuilder::new(Emu {
        shared: Arc::clone(&shared),
    });
    shared
        .keys
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(access_key.to_owned(), secret_key.to_owned());
    builder.set_auth(EmuAuth(Arc::clone(&shared)));
    builder.set_access(EmuAccess(Arc::clone(&shared)));
    Front {
        inner: builder.build(),
        shared,
        next_id: Arc::new(AtomicU64::new(1)),
    }
}

/// The hyper service in front of `S3Service`.
#[derive(Clone)]
pub struct Front {
    inner: S3Service,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
}

impl hyper::service::Service<http::Request<Incoming>> for Front {
    type Response = HttpResponse;
    type Error = HttpError;
    type Future = BoxFuture<'static, Result<HttpResponse, HttpError>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        Counters::add(&self.shared.counters.requests, 1);
        let is_head = req.method() == Method::HEAD;
        let latency = self.shared.knobs.latency();
        let id = self.next_id.fetch_add(1, Relaxed);
        // Lazy: nothing runs until awaited, so the latency really comes first.
        let fut = hyper::service::Service::call(&self.inner, req);
        Box::pin(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut resp = fut.await?;
            // s3s always answers HEAD with 200; S3 says 206 for a ranged HEAD.
            if is_head
                && resp.status() == StatusCode::OK
                && resp.headers().contains_key(http::header::CONTENT_RANGE)
            {
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            }
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("{id:016X}")) {
                h.insert("x-amz-request-id", v);
            }
            h.insert(http::header::SERVER, HeaderValue::from_static("s3emu"));
            Ok(resp)
        })
    }
}

/// Accept connections until `shutdown` fires, then close idle connections and
/// give in-flight ones a short grace period.
pub async fn serve(listener: TcpListener, service: Front, mut shutdown: oneshot::Receiver<()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let stream = match res {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("s3emu: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), service.clone()).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("s3emu: connection ended: {e}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_millis(500), graceful.shutdown()).await;
}
