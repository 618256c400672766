//! Exact admission: workers + queue_capacity requests in flight, every other one refused at once.

use crate::support::*;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn ten_concurrent_requests_with_two_workers_and_a_queue_of_two() {
    let upstream_latency = Duration::from_millis(3000);
    let mock = mock_llm(&["--latency-ms", "3000"]);
    let work = Workdir::new();
    let config = format!(
        "[server]\nmax_concurrent_requests = 2\nqueue_capacity = 2\n\n{}",
        openai_llm(mock.addr, "")
    );
    let server = work.spawn(&config);
    let addr = server.addr;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(10));
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let r = send(addr, &format!("chat-{i}"), "hello");
                (r, started.elapsed())
            })
        })
        .collect();
    // While saturated, the acceptor still answers the operations endpoints.
    assert!(eventually(Duration::from_secs(10), || {
        let status = get(addr, "/status").json();
        status["workers_busy"] == 2 && status["queue_depth"] == 2
    }));
    assert_eq!(get(addr, "/healthz").status, 200);
    let metrics = get(addr, "/metrics").text();
    assert!(metrics.contains("chatpool_workers_busy 2"), "{metrics}");
    assert!(metrics.contains("chatpool_queue_depth 2"), "{metrics}");

    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = results.iter().filter(|(r, _)| r.status == 200).count();
    let shed: Vec<_> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(
        (ok, shed.len()),
        (4, 6),
        "{:?}",
        results.iter().map(|(r, _)| r.status).collect::<Vec<_>>()
    );
    for (r, took) in shed {
        assert_eq!(r.error_type(), "overloaded");
        assert_eq!(r.header("Retry-After"), Some("1"));
        assert!(*took < upstream_latency / 10, "a 503 took {took:?}");
    }
    let metrics = get(addr, "/metrics").text();
    assert!(
        metrics.contains(r#"chatpool_rejected_total{reason="overloaded"} 6"#),
        "{metrics}"
    );
    // Shed requests are summed up in the log, a line a second, not a line each.
    let shed_logged = || -> u64 {
        server
            .log()
            .lines()
            .filter_map(|line| line.split("(overloaded ").nth(1))
            .filter_map(|rest| rest.split(')').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(5), || shed_logged() == 6),
        "{}",
        server.log()
    );
    assert!(!server.log().contains(" 503 "), "{}", server.log());
}
