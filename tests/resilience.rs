//! Upstream faults injected by `chatpool mock-llm`: retries, deadlines, the breaker, and that
//! no fault costs a worker or leaves a trace in history.

use crate::support::*;
use std::thread;
use std::time::{Duration, Instant};

fn completions(mock: &Proc) -> u64 {
    get(mock.addr, "/stats").json()["completions"]
        .as_u64()
        .unwrap()
}

/// Sends `n` messages at once to distinct chats; all must succeed.
fn all_workers_serve(addr: std::net::SocketAddr, n: usize, tag: &str) {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let chat = format!("{tag}-{i}");
            thread::spawn(move || send(addr, &chat, "still there?").status)
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
}

fn serve(work: &Workdir, mock: &Proc, llm_extra: &str) -> Running {
    work.serve(&format!(
        "[server]\nmax_concurrent_requests = 3\n\n{}",
        openai_llm(mock.addr, llm_extra)
    ))
}

#[test]
fn one_500_then_success_is_a_200_after_two_calls() {
    let mock = mock_llm(&["--fault", "error", "--fault-first", "1"]);
    let work = Workdir::new();
    let server = serve(&work, &mock, "");
    let r = send(server.addr, "c", "hi");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(completions(&mock), 2);
    assert_eq!(stored_messages(&work.db(), "c").len(), 2);
    let metrics = get(server.addr, "/metrics").text();
    assert!(
        metrics.contains("chatpool_upstream_retries_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"chatpool_upstream_requests_total{outcome="server_error"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_429_with_retry_after_is_retried_after_that_wait() {
    let mock = mock_llm(&[
        "--fault",
        "error",
        "--fault-status",
        "429",
        "--retry-after",
        "1",
        "--fault-first",
        "1",
    ]);
    let work = Workdir::new();
    let server = serve(&work, &mock, "");
    let started = Instant::now();
    let r = send(server.addr, "c", "hi");
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(completions(&mock), 2);
}

#[test]
fn a_persistent_500_is_a_502_naming_it_after_every_allowed_call() {
    let mock = mock_llm(&["--fault", "error"]);
    let work = Workdir::new();
    let server = serve(&work, &mock, "max_retries = 2\n");
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("500") && message.contains("3 attempts"),
        "{message}"
    );
    assert_eq!(completions(&mock), 3);
    assert!(stored_messages(&work.db(), "c").is_empty());
    // A 4xx is not retried.
    let mock = mock_llm(&["--fault", "error", "--fault-status", "400"]);
    let server = serve(&work, &mock, "max_retries = 2\n");
    assert_eq!(send(server.addr, "c", "hi").status, 502);
    assert_eq!(completions(&mock), 1);
}

#[test]
fn a_hang_is_a_504_within_the_deadline_and_frees_the_worker() {
    let mock = mock_llm(&["--fault", "hang", "--fault-first", "3"]);
    let work = Workdir::new();
    let server = serve(&work, &mock, "request_timeout_ms = 600\nmax_retries = 0\n");
    let started = Instant::now();
    let hung: Vec<_> = (0..3)
        .map(|i| {
            let addr = server.addr;
            thread::spawn(move || send(addr, &format!("h{i}"), "hello?"))
        })
        .collect();
    for h in hung {
        let r = h.join().unwrap();
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (504, "upstream_timeout")
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(600 + 1500),
        "{:?}",
        started.elapsed()
    );
    all_workers_serve(server.addr, 3, "after-hang");
    for i in 0..3 {
        assert!(stored_messages(&work.db(), &format!("h{i}")).is_empty());
    }
}

#[test]
fn a_reset_and_malformed_json_are_502_and_workers_carry_on() {
    for fault in ["reset", "malformed"] {
        let mock = mock_llm(&["--fault", fault, "--fault-first", "3"]);
        let work = Workdir::new();
        let server = serve(&work, &mock, "max_retries = 0\n");
        for i in 0..3 {
            let r = send(server.addr, &format!("f{i}"), "hi");
            assert_eq!(
                (r.status, r.error_type().as_str()),
                (502, "upstream_error"),
                "{fault}"
            );
            assert!(stored_messages(&work.db(), &format!("f{i}")).is_empty());
        }
        all_workers_serve(server.addr, 3, fault);
    }
}

#[test]
fn a_slow_drip_within_the_deadline_is_a_reply_and_past_it_a_504() {
    let mock = mock_llm(&["--fault", "drip", "--drip-ms", "2"]);
    let work = Workdir::new();
    let server = serve(&work, &mock, "request_timeout_ms = 20000\n");
    let r = send(server.addr, "c", "hi");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reply"], "You said: hi");
    let server = serve(&work, &mock, "request_timeout_ms = 300\nmax_retries = 0\n");
    let r = send(server.addr, "d", "hi");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (504, "upstream_timeout")
    );
}

#[test]
fn the_breaker_opens_after_the_threshold_then_a_probe_closes_it() {
    let mock = mock_llm(&["--fault", "error", "--fault-first", "3"]);
    let work = Workdir::new();
    let server = serve(
        &work,
        &mock,
        "max_retries = 0\nbreaker_failures = 3\nbreaker_cooldown_ms = 1500\n",
    );
    for i in 0..3 {
        assert_eq!(send(server.addr, &format!("b{i}"), "hi").status, 502);
    }
    assert_eq!(completions(&mock), 3);
    let started = Instant::now();
    let r = send(server.addr, "b3", "hi");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (503, "upstream_unavailable")
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    let wait: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(completions(&mock), 3, "no call while open");
    assert!(stored_messages(&work.db(), "b3").is_empty());

    thread::sleep(Duration::from_millis(1600));
    assert_eq!(send(server.addr, "probe", "hi").status, 200);
    assert_eq!(completions(&mock), 4);
    all_workers_serve(server.addr, 3, "closed");
    let metrics = get(server.addr, "/metrics").text();
    assert!(
        metrics.contains(r#"chatpool_upstream_requests_total{outcome="paused"} 1"#),
        "{metrics}"
    );
}

/// Sends until the breaker lets a call through (anything but 503 `upstream_unavailable`).
fn past_the_breaker(addr: std::net::SocketAddr) -> Response {
    let mut last = None;
    let through = eventually(Duration::from_secs(5), || {
        let r = send(addr, "c", "anyone there?");
        let paused = r.status == 503;
        last = Some(r);
        !paused
    });
    let last = last.unwrap();
    assert!(
        through,
        "the breaker never let a call through: {}",
        last.text()
    );
    last
}

#[test]
fn a_retry_after_too_large_for_the_clock_is_a_502_and_never_jams_the_breaker() {
    // 10^19 seconds fits a u64 but not the clock; the probes get it.
    let huge = || vec![("Retry-After", "10000000000000000000".to_string())];
    let down = r#"{"error":{"message":"down"}}"#.to_string();
    let upstream = FakeUpstream::start_with_headers(Box::new(move |n, _| match n {
        0 => (500, Vec::new(), down.clone()),
        1 => (429, huge(), down.clone()),
        2 => (503, huge(), down.clone()),
        _ => (200, Vec::new(), completion("back")),
    }));
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(
        upstream.addr,
        "max_retries = 2\nbreaker_failures = 1\nbreaker_cooldown_ms = 200\n",
    ));
    // The 500 is retried; the 429's wait is longer than the deadline, so the call gives up.
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    assert!(r.text().contains("HTTP 429"), "{}", r.text());
    // The breaker opened; its probe meets the 503 with the same wait: an answer, not a panic.
    let r = past_the_breaker(server.addr);
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    assert!(r.text().contains("HTTP 503"), "{}", r.text());
    // The failed probe reopened the breaker instead of leaving it probing for ever.
    let r = past_the_breaker(server.addr);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(upstream.seen().len(), 4);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}
