//! Prometheus metrics: what the pool is doing, for `/metrics` and `/status`.
//!
//! Counters, gauges and histograms are atomics inside the `prometheus` crate. Finding the
//! counter for a label set takes a lock inside the crate that every thread would share, so each
//! thread keeps its own handles on the labelled counters it has used, and the per-stage
//! histograms are resolved once here: updating a metric costs a worker an atomic add, no lock.
//!
//! Memory is exported for an operator to watch against the ceiling in the README: the process's
//! own figures (`process_resident_memory_bytes` and the rest of the Prometheus process collector,
//! read from /proc when scraped) and SQLite's heap and page cache, set when `/metrics` renders.

use prometheus::process_collector::ProcessCollector;
use prometheus::IntCounter;
use std::cell::RefCell;
use std::collections::HashMap;

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

/// A labelled counter: (family, label, status or 0).
type HandleKey = (Family, &'static str, u16);

thread_local! {
    /// This thread's handles on labelled counters. Every thread that counts belongs to one
    /// server (its acceptor, a worker, a connection of its own), so to one `Metrics`.
    static HANDLES: RefCell<HashMap<HandleKey, IntCounter>> = RefCell::new(HashMap::new());
}

/// Every metric chatpool exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    stages: Vec<Histogram>,
    /// Workers handling a request right now.
    pub workers_busy: IntGauge,
    /// Admitted requests waiting for a worker (set when scraped).
    pub queue_depth: IntGauge,
    rejected: IntCounterVec,
    upstream: IntCounterVec,
    upstream_retries: prometheus::IntCounter,
    sqlite: SqliteGauges,
}

/// SQLite's memory, as `sqlite3_status64` counts it; set when rendered.
struct SqliteGauges {
    heap: IntGauge,
    heap_highwater: IntGauge,
    page_cache: IntGauge,
}

impl SqliteGauges {
    fn new() -> SqliteGauges {
        SqliteGauges {
            heap: gauge(
                "chatpool_sqlite_memory_used_bytes",
                "Heap held by SQLite: page caches, schemas, statements.",
            ),
            heap_highwater: gauge(
                "chatpool_sqlite_memory_highwater_bytes",
                "The most heap SQLite has held since the start.",
            ),
            page_cache: gauge(
                "chatpool_sqlite_page_cache_used_bytes",
                "Part of SQLite's heap that is page cache, all connections together.",
            ),
        }
    }

    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 3] {
        [
            Box::new(self.heap.clone()),
            Box::new(self.heap_highwater.clone()),
            Box::new(self.page_cache.clone()),
        ]
    }

    fn update(&self) {
        let memory = crate::store::sqlite_memory();
        self.heap.set(memory.heap);
        self.heap_highwater.set(memory.heap_highwater);
        self.page_cache.set(memory.page_cache);
    }
}

impl Metrics {
    /// A fresh set, registered in its own registry.
    pub fn new(workers: usize, queue_capacity: usize) -> Metrics {
        let requests = counters(
            "chatpool_requests_total",
            "Requests answered, by route and status.",
            &["route", "status"],
        );
        let (durations, stages) = stage_histograms();
        let [workers_gauge, workers_busy, queue_depth, queue_capacity_gauge] =
            pool_gauges(workers, queue_capacity);
        let rejected = counters(
            "chatpool_rejected_total",
            "Requests refused before reaching a worker, by reason.",
            &["reason"],
        );
        let upstream = counters(
            "chatpool_upstream_requests_total",
            "Calls to the LLM, by outcome.",
            &["outcome"],
        );
        let upstream_retries = prometheus::IntCounter::new(
            "chatpool_upstream_retries_total",
            "Retried calls to the LLM.",
        )
        .expect("valid metric");
        let sqlite = SqliteGauges::new();
        let registry = Registry::new();
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(durations),
            Box::new(workers_gauge),
            Box::new(workers_busy.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_capacity_gauge),
            Box::new(rejected.clone()),
            Box::new(upstream.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(ProcessCollector::for_self()),
        ]
        .into_iter()
        .chain(sqlite.collectors())
        {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            stages,
            workers_busy,
            queue_depth,
            rejected,
            upstream,
            upstream_retries,
            sqlite,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.inc(Family::Requests, route, Some(status));
    }

    /// Increments a labelled counter through this thread's handle on it.
    fn inc(&self, family: Family, label: &'static str, status: Option<u16>) {
        let vec = match family {
            Family::Requests => &self.requests,
            Family::Rejected => &self.rejected,
            Family::Upstream => &self.upstream,
        };
        let key = (family, label, status.unwrap_or(0));
        HANDLES.with(|handles| {
            handles
                .borrow_mut()
                .entry(key)
                .or_insert_with(|| match status {
                    Some(status) => vec.with_label_values(&[label, &status.to_string()]),
                    None => vec.with_label_values(&[label]),
                })
                .inc()
        });
    }

    /// Records one stage's duration; `stage` indexes [`STAGES`].
    pub fn observe_stage(&self, stage: usize, seconds: f64) {
        self.stages[stage].observe(seconds);
    }

    /// Counts a request refused before a worker saw it (`overloaded`, `chat_busy`, ...).
    pub fn rejected(&self, reason: &'static str) {
        self.inc(Family::Rejected, reason, None);
    }

    /// Counts one call to the LLM by how it ended.
    pub fn upstream_outcome(&self, outcome: &'static str) {
        self.inc(Family::Upstream, outcome, None);
    }

    /// Counts one retry of an LLM call.
    pub fn upstream_retry(&self) {
        self.upstream_retries.inc();
    }

    /// Adds a family defined elsewhere (the per-tenant counters) to what `/metrics` shows.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(collector) {
            log::warn!("a metric family could not be registered: {e}");
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> Vec<u8> {
        self.sqlite.update();
        let mut out = Vec::new();
        // Encoding into a Vec fails only on invalid metric names, which `new` already checked.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A family of counters labelled by `labels`.
fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// A gauge.
fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

/// The pool's gauges: workers and busy workers, queue depth and capacity; the fixed ones set.
fn pool_gauges(workers: usize, queue_capacity: usize) -> [IntGauge; 4] {
    let workers_gauge = gauge("chatpool_workers", "Worker threads.");
    workers_gauge.set(workers as i64);
    let capacity = gauge(
        "chatpool_queue_capacity",
        "Requests that may wait for a worker.",
    );
    capacity.set(queue_capacity as i64);
    [
        workers_gauge,
        gauge("chatpool_workers_busy", "Workers handling a request."),
        gauge(
            "chatpool_queue_depth",
            "Admitted requests waiting for a worker.",
        ),
        capacity,
    ]
}

/// The per-stage duration histogram, and its series resolved once per stage of [`STAGES`].
fn stage_histograms() -> (HistogramVec, Vec<Histogram>) {
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
    (durations, stages)
}

/// The labelled counter families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    Requests,
    Rejected,
    Upstream,
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
            "process_resident_memory_bytes ",
            "process_threads ",
            "chatpool_sqlite_memory_used_bytes ",
            "chatpool_sqlite_page_cache_used_bytes ",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
    }
}
