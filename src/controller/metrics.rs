//! Prometheus metrics of the controller (`fillfs_` prefix) and the small HTTP server that
//! serves them at `/metrics` (and `/healthz` for the liveness probe). Owns the metric
//! names; it must not reconcile.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    /// `fillfs_populations_total{result="succeeded"|"failed"}`
    pub populations: Family<ResultLabel, Counter>,
    /// `fillfs_population_duration_seconds`
    pub duration: Histogram,
    /// `fillfs_populations_in_flight`
    pub in_flight: Gauge,
    /// `fillfs_populated_bytes_total`
    pub bytes: Counter,
    /// `fillfs_population_retries_total`
    pub retries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fillfs");
        let populations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "populations",
            "Fills that ended, by result",
            populations.clone(),
        );
        // 1 s .. ~4.5 h
        let duration = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        registry.register(
            "population_duration_seconds",
            "Time from fill start to the end of the copy, of successful fills",
            duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "populations_in_flight",
            "Fill pods started by this controller and not finished",
            in_flight.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "populated_bytes",
            "Bytes written by successful fills",
            bytes.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "population_retries",
            "Failed fill attempts that were retried",
            retries.clone(),
        );
        Metrics {
            registry,
            populations,
            duration,
            in_flight,
            bytes,
            retries,
        }
    }
}

impl Metrics {
    /// Records a fill that ended.
    pub fn finished(&self, result: &str, bytes: Option<u64>, seconds: Option<f64>) {
        self.populations
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
        if let Some(b) = bytes {
            self.bytes.inc_by(b);
        }
        if let Some(s) = seconds {
            self.duration.observe(s);
        }
    }

    /// A fill pod is gone; never below zero (a restarted controller did not count the fills
    /// that were already running).
    pub fn fill_ended(&self) {
        if self.in_flight.get() > 0 {
            self.in_flight.dec();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = match req.uri().path() {
                            "/metrics" => Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.render()))),
                            "/healthz" => Response::builder().body(Full::new(Bytes::from("ok\n"))),
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from("not found\n"))),
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("static response"))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_the_fillfs_prefix() {
        let m = Metrics::default();
        m.finished("succeeded", Some(1024), Some(3.0));
        m.in_flight.set(2);
        let text = m.render();
        for name in [
            "fillfs_populations_total{result=\"succeeded\"} 1",
            "fillfs_populated_bytes_total 1024",
            "fillfs_populations_in_flight 2",
            "fillfs_population_duration_seconds_count 1",
            "fillfs_population_retries_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
