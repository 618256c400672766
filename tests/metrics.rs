//! `/metrics` as Prometheus reads it: a strict parse of the text format, every family of the
//! contract, and counters and histograms that move by exactly the requests made.

use crate::support::*;
use std::collections::HashMap;
use std::time::Duration;

/// One scrape: family name → type, and every sample by its name and sorted labels.
#[derive(Debug, Default)]
struct Scrape {
    types: HashMap<String, String>,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// Parses the text exposition format, failing on anything it does not allow.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(
                    scrape
                        .types
                        .insert(name.to_string(), kind.to_string())
                        .is_none(),
                    "TYPE twice: {line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") || line.is_empty() {
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels close")),
                None => (series, ""),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(
                scrape.types.contains_key(name) || scrape.types.contains_key(family),
                "sample before its TYPE: {line}"
            );
            let mut pairs: Vec<String> = Vec::new();
            if !labels.is_empty() {
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "{line}"
                    );
                    pairs.push(format!("{k}={v}"));
                }
            }
            pairs.sort();
            let key = format!("{name}{{{}}}", pairs.join(","));
            assert!(
                scrape.samples.insert(key, value).is_none(),
                "sample twice: {line}"
            );
        }
        scrape
    }

    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }
}

#[test]
fn counters_and_histograms_move_by_exactly_the_requests_made() {
    let work = Workdir::new();
    let config = "[server]\nmax_concurrent_requests = 1\nqueue_capacity = 0\n\n[llm]\nmock_latency_ms = 800\n";
    let server = work.serve(config);
    let addr = server.addr;
    let before = Scrape::parse(&get(addr, "/metrics").text());
    assert_eq!(before.get("chatpool_workers{}"), 1.0);
    assert_eq!(before.get("chatpool_queue_capacity{}"), 0.0);

    let slow = std::thread::spawn(move || send(addr, "a", "slow one"));
    assert!(eventually(Duration::from_secs(10), || get(addr, "/status")
        .json()["workers_busy"]
        == 1));
    assert_eq!(send(addr, "a", "same chat").status, 409);
    assert_eq!(send(addr, "b", "no room").status, 503);
    let busy = Scrape::parse(&get(addr, "/metrics").text());
    assert_eq!(busy.get("chatpool_workers_busy{}"), 1.0);
    assert_eq!(slow.join().unwrap().status, 200);
    assert_eq!(get(addr, "/v1/chats/nope/messages").status, 404);
    // A worker counts its request just after the response is out; it is idle once that is done.
    assert!(eventually(Duration::from_secs(5), || get(addr, "/status")
        .json()["workers_busy"]
        == 0));
    let after = Scrape::parse(&get(addr, "/metrics").text());
    for (family, kind) in [
        ("chatpool_requests_total", "counter"),
        ("chatpool_request_duration_seconds", "histogram"),
        ("chatpool_workers", "gauge"),
        ("chatpool_workers_busy", "gauge"),
        ("chatpool_queue_depth", "gauge"),
        ("chatpool_queue_capacity", "gauge"),
        ("chatpool_rejected_total", "counter"),
        ("chatpool_upstream_requests_total", "counter"),
        ("chatpool_upstream_retries_total", "counter"),
    ] {
        assert_eq!(
            after.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }

    let delta = |key: &str| after.get(key) - before.get(key);
    let requests = |route: &str, status: u16| {
        delta(&format!(
            r#"chatpool_requests_total{{route="{route}",status="{status}"}}"#
        ))
    };
    assert_eq!(requests("post_message", 200), 1.0);
    assert_eq!(requests("post_message", 409), 1.0);
    assert_eq!(requests("post_message", 503), 1.0);
    assert_eq!(requests("get_messages", 404), 1.0);
    assert_eq!(delta(r#"chatpool_rejected_total{reason="chat_busy"}"#), 1.0);
    assert_eq!(
        delta(r#"chatpool_rejected_total{reason="overloaded"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"chatpool_upstream_requests_total{outcome="ok"}"#),
        1.0
    );
    // Stages are observed for what reached a worker: the 200 and the 404.
    let stage = |name: &str, part: &str| {
        delta(&format!(
            r#"chatpool_request_duration_seconds_{part}{{stage="{name}"}}"#
        ))
    };
    assert_eq!(stage("total", "count"), 2.0);
    assert_eq!(stage("queued", "count"), 2.0);
    assert_eq!(stage("llm", "count"), 1.0);
    assert_eq!(stage("store", "count"), 1.0);
    assert!(stage("llm", "sum") >= 0.8, "{}", stage("llm", "sum"));
    let bucket = |le: &str| {
        after.get(&format!(
            r#"chatpool_request_duration_seconds_bucket{{le="{le}",stage="llm"}}"#
        ))
    };
    assert_eq!(bucket("0.5"), 0.0, "the 800 ms call is above 0.5 s");
    assert_eq!(bucket("1"), 1.0);
    assert_eq!(
        bucket("+Inf"),
        after.get(r#"chatpool_request_duration_seconds_count{stage="llm"}"#)
    );
    assert_eq!(after.get("chatpool_workers_busy{}"), 0.0);
    assert_eq!(after.get("chatpool_queue_depth{}"), 0.0);
}

/// A value of the process's own `/proc/PID/status`, in bytes for the `kB` lines.
fn proc_status(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    let mut words = line.split_whitespace();
    let value: f64 = words.next().unwrap().parse().unwrap();
    match words.next() {
        Some("kB") => value * 1024.0,
        _ => value,
    }
}

#[test]
fn memory_is_exported_with_the_values_the_process_has() {
    let work = Workdir::new();
    let server = work.spawn("[server]\nmax_concurrent_requests = 4\n");
    let addr = server.addr;
    for n in 0..20 {
        assert_eq!(send(addr, &format!("m{}", n % 4), "hello").status, 200);
    }
    let scrape = Scrape::parse(&get(addr, "/metrics").text());
    for family in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_threads",
        "chatpool_sqlite_memory_used_bytes",
        "chatpool_sqlite_memory_highwater_bytes",
        "chatpool_sqlite_page_cache_used_bytes",
    ] {
        assert_eq!(
            scrape.types.get(family).map(String::as_str),
            Some("gauge"),
            "{family}"
        );
    }
    let rss = scrape.get("process_resident_memory_bytes{}");
    let rss_now = proc_status(server.pid(), "VmRSS");
    assert!(
        rss > 0.5 * rss_now && rss < 2.0 * rss_now,
        "exported RSS {rss}, /proc says {rss_now}"
    );
    let threads = scrape.get("process_threads{}");
    assert!(threads >= 4.0 + 2.0, "4 workers and more, got {threads}");
    assert!(scrape.get("process_open_fds{}") > 0.0);
    let heap = scrape.get("chatpool_sqlite_memory_used_bytes{}");
    let cache = scrape.get("chatpool_sqlite_page_cache_used_bytes{}");
    // Seven connections have read the schema and the messages just stored.
    assert!(
        heap > 100_000.0 && heap < rss,
        "SQLite heap {heap}, RSS {rss}"
    );
    assert!(
        cache > 0.0 && cache < heap,
        "page cache {cache}, heap {heap}"
    );
    assert!(scrape.get("chatpool_sqlite_memory_highwater_bytes{}") >= heap);
}
