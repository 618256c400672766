//! Prometheus metrics: what the pool is doing, for `/metrics` and `/status`.
//!
//! Counters, gauges and histograms are atomics inside the `prometheus` crate, so workers
//! update them without contending for a lock; the per-stage histograms are resolved once here
//! rather than looked up by label on every request.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The stages of a request, in the order they happen, as `timings_ms` and the histogram name them.
pub const STAGES: [&str; 5] = ["queued", "history", "llm", "store", "total"];

/// Bucket bounds in seconds: sub-millisecond storage up to multi-minute LLM calls.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Every metric chatpool exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    stages: Vec<Histogram>,
    /// Worker threads.
    pub workers: IntGauge,
    /// Workers handling a request right now.
    pub workers_busy: IntGauge,
    /// Admitted requests waiting for a worker (set when scraped).
    pub queue_depth: IntGauge,
    /// Requests that may wait.
    pub queue_capacity: IntGauge,
    rejected: IntCounterVec,
    upstream: IntCounterVec,
    upstream_retries: prometheus::IntCounter,
}

impl Metrics {
    /// A fresh set, registered in its own registry.
    pub fn new(workers: usize, queue_capacity: usize) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "chatpool_requests_total",
                "Requests answered, by route and status.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "chatpool_request_duration_seconds",
                "Time spent per request stage.",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        let stages = STAGES
            .iter()
            .map(|s| durations.with_label_values(&[s]))
            .collect();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let workers_gauge = gauge("chatpool_workers", "Worker threads.");
        let workers_busy = gauge("chatpool_workers_busy", "Workers handling a request.");
        let queue_depth = gauge(
            "chatpool_queue_depth",
            "Admitted requests waiting for a worker.",
        );
        let queue_capacity_gauge = gauge(
            "chatpool_queue_capacity",
            "Requests that may wait for a worker.",
        );
        let rejected = IntCounterVec::new(
            Opts::new(
                "chatpool_rejected_total",
                "Requests refused before reaching a worker, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let upstream = IntCounterVec::new(
            Opts::new(
                "chatpool_upstream_requests_total",
                "Calls to the LLM, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let upstream_retries = prometheus::IntCounter::new(
            "chatpool_upstream_retries_total",
            "Retried calls to the LLM.",
        )
        .expect("valid metric");
        workers_gauge.set(workers as i64);
        queue_capacity_gauge.set(queue_capacity as i64);
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(durations),
            Box::new(workers_gauge.clone()),
            Box::new(workers_busy.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_capacity_gauge.clone()),
            Box::new(rejected.clone()),
            Box::new(upstream.clone()),
            Box::new(upstream_retries.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            stages,
            workers: workers_gauge,
            workers_busy,
            queue_depth,
            queue_capacity: queue_capacity_gauge,
            rejected,
            upstream,
            upstream_retries,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// Records one stage's duration; `stage` indexes [`STAGES`].
    pub fn observe_stage(&self, stage: usize, seconds: f64) {
        self.stages[stage].observe(seconds);
    }

    /// Counts a request refused before a worker saw it (`overloaded`, `chat_busy`, ...).
    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Counts one call to the LLM by how it ended.
    pub fn upstream_outcome(&self, outcome: &str) {
        self.upstream.with_label_values(&[outcome]).inc();
    }

    /// Counts one retry of an LLM call.
    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on invalid metric names, which `new` already checked.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_of_the_contract() {
        let m = Metrics::new(4, 8);
        m.request("post_message", 200);
        m.observe_stage(4, 0.01);
        m.rejected("overloaded");
        m.upstream_outcome("ok");
        let text = String::from_utf8(m.render()).unwrap();
        for family in [
            "chatpool_requests_total{route=\"post_message\",status=\"200\"} 1",
            "chatpool_request_duration_seconds_bucket{stage=\"total\",le=\"0.01\"} 1",
            "chatpool_workers 4",
            "chatpool_workers_busy 0",
            "chatpool_queue_depth 0",
            "chatpool_queue_capacity 8",
            "chatpool_rejected_total{reason=\"overloaded\"} 1",
            "chatpool_upstream_requests_total{outcome=\"ok\"} 1",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
    }
}
