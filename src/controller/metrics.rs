//! Prometheus metrics of the controller (`fillfs_` prefix), served by
//! [`crate::metrics::serve`] at `/metrics` (with `/healthz` and `/readyz`). Owns the
//! controller's metric names; it must not reconcile.

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
    /// `fillfs_watch_errors_total`
    pub watch_errors: Counter,
    watch_problem: std::sync::Mutex<Option<String>>,
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
            "Fill pods that exist and have not finished",
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
        let watch_errors = Counter::default();
        registry.register(
            "watch_errors",
            "Failed watches of the Kubernetes API (403, missing CRD, ...)",
            watch_errors.clone(),
        );
        Metrics {
            registry,
            populations,
            duration,
            in_flight,
            bytes,
            retries,
            watch_errors,
            watch_problem: Default::default(),
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

    /// Fills in flight, as counted from the fill pods that exist (so a deleted claim or a
    /// restarted controller never leaves the gauge off).
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.set(n as i64);
    }

    /// A watch failed (e.g. 403: RBAC; 404: the CRD is not installed): logged at warn, and
    /// `/readyz` fails until a watch succeeds again.
    pub fn watch_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let text = format!("watch of {what}: {error}");
        tracing::warn!("{text}");
        *self.watch_problem.lock().expect("lock") = Some(text);
        self.watch_errors.inc();
    }

    /// A watch delivered an event: whatever failed before works now.
    pub fn watch_ok(&self) {
        let mut p = self.watch_problem.lock().expect("lock");
        if p.is_some() {
            tracing::info!("watches work again");
            *p = None;
        }
    }

    /// `None` when ready; else what is wrong.
    pub fn readiness_problem(&self) -> Option<String> {
        self.watch_problem.lock().expect("lock").clone()
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl crate::metrics::Exposition for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }

    fn readiness_problem(&self) -> Option<String> {
        Metrics::readiness_problem(self)
    }
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (watches working) on `addr` until
/// the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    crate::metrics::serve(addr, metrics).await
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
            "fillfs_watch_errors_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn a_failed_watch_makes_it_unready_until_one_works() {
        let m = Metrics::default();
        assert_eq!(m.readiness_problem(), None);
        m.watch_failed(
            "ossvolumepopulators",
            &"404: the server could not find the requested resource",
        );
        let p = m.readiness_problem().unwrap();
        assert!(
            p.contains("ossvolumepopulators") && p.contains("404"),
            "{p}"
        );
        assert!(m.render().contains("fillfs_watch_errors_total 1"));
        m.watch_ok();
        assert_eq!(m.readiness_problem(), None);
    }
}
