//! Prometheus metrics of the server, one registry, text exposition at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Matched route template (`other` for unmatched paths).
    pub route: String,
    /// HTTP status code.
    pub status: u16,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Images admitted and not finished.
    pub queue_depth: Gauge,
    /// Seconds from admission to the start of generation.
    pub queue_seconds: Histogram,
    /// Seconds per sampling step (whole batch).
    pub step_seconds: Histogram,
    /// Sampling steps run, counted per image.
    pub steps: Counter,
    /// Images generated.
    pub images: Counter,
    /// Images dropped because the client went away or the deadline passed.
    pub cancelled: Counter,
    /// Images per batch.
    pub batch_size: Histogram,
    /// Seconds the model took to load (and warm up).
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    /// Connections answered 503 and closed at once because `--max-connections-reading`
    /// connections were already being read.
    pub connections_refused: Counter,
    /// Connections being read now (sending a request head, or idle between requests).
    pub connections_reading: Gauge,
    /// Connections closed because their request head did not arrive in time.
    pub header_read_timeouts: Counter,
    /// Requests answered 503 because the drain deadline passed before they finished.
    pub drain_cut: Counter,
    /// Images being sampled now (the batch on the model).
    pub images_in_flight: Gauge,
    /// Sampling steps still to run for every admitted image (queued or being sampled): with
    /// the recent seconds per step, the work ahead of a new request.
    pub steps_outstanding: Gauge,
    /// Images stored in the artifact store.
    pub artifacts_stored: Counter,
    /// Images that could not be stored (each answered with a 502).
    pub artifact_store_failures: Counter,
    /// Previews sent on streamed generations.
    pub partial_images: Counter,
    /// Moving average of the seconds per step (f64 bits; 0 before the first step).
    recent_step: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sd35");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Images admitted and not finished",
            queue_depth.clone(),
        );
        let queue_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "queue_seconds",
            "Seconds from admission to the start of generation",
            queue_seconds.clone(),
        );
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "step_seconds",
            "Seconds per sampling step of a batch",
            step_seconds.clone(),
        );
        let steps = Counter::default();
        registry.register("steps", "Sampling steps run, per image", steps.clone());
        let images = Counter::default();
        registry.register("images_generated", "Images generated", images.clone());
        let cancelled = Counter::default();
        registry.register(
            "images_cancelled",
            "Images dropped: client gone or deadline passed",
            cancelled.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]);
        registry.register("batch_size", "Images per batch", batch_size.clone());
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "model_load_seconds",
            "Seconds the model took to load and warm up",
            model_load_seconds.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "Connections refused because --max-connections-reading were being read",
            connections_refused.clone(),
        );
        let connections_reading = Gauge::default();
        registry.register(
            "http_connections_reading",
            "Connections sending a request head or idle between requests",
            connections_reading.clone(),
        );
        let header_read_timeouts = Counter::default();
        registry.register(
            "http_header_read_timeouts",
            "Connections closed because the request head did not arrive in time",
            header_read_timeouts.clone(),
        );
        let drain_cut = Counter::default();
        registry.register(
            "drain_cut_requests",
            "Requests answered 503 because the drain deadline passed",
            drain_cut.clone(),
        );
        let images_in_flight = Gauge::default();
        registry.register(
            "images_in_flight",
            "Images being sampled now",
            images_in_flight.clone(),
        );
        let steps_outstanding = Gauge::default();
        registry.register(
            "steps_outstanding",
            "Sampling steps still to run for every admitted image",
            steps_outstanding.clone(),
        );
        let artifacts_stored = Counter::default();
        registry.register(
            "artifacts_stored",
            "Images stored in the artifact store",
            artifacts_stored.clone(),
        );
        let artifact_store_failures = Counter::default();
        registry.register(
            "artifact_store_failures",
            "Images that could not be stored (answered 502)",
            artifact_store_failures.clone(),
        );
        let partial_images = Counter::default();
        registry.register(
            "partial_images",
            "Previews sent on streamed generations",
            partial_images.clone(),
        );
        Self {
            registry,
            images_in_flight,
            steps_outstanding,
            artifacts_stored,
            artifact_store_failures,
            partial_images,
            connections_refused,
            connections_reading,
            header_read_timeouts,
            drain_cut,
            requests,
            queue_depth,
            queue_seconds,
            step_seconds,
            steps,
            images,
            cancelled,
            batch_size,
            model_load_seconds,
            recent_step: AtomicU64::new(0),
        }
    }

    /// Records one sampling step of `batch` images that took `seconds`.
    pub fn step_done(&self, batch: usize, seconds: f64) {
        self.steps.inc_by(batch as u64);
        self.step_seconds.observe(seconds);
        let old = f64::from_bits(self.recent_step.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            seconds
        } else {
            0.8 * old + 0.2 * seconds
        };
        self.recent_step.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Recent seconds per step (1 s before any step ran).
    pub fn recent_step_seconds(&self) -> f64 {
        match f64::from_bits(self.recent_step.load(Ordering::Relaxed)) {
            0.0 => 1.0,
            s => s,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
