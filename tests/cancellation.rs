//! Abandoning an LLM call whose client left: the call ends within a fraction of a second, as
//! `Cancelled`, and the upstream sees its connection close.

use crate::support::*;
use chatpool::config::{LlmConfig, Provider};
use chatpool::llm::wire::{ChatMessage, Sampling};
use chatpool::llm::{Cancel, LlmClient, UpstreamError};
use chatpool::metrics::Metrics;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

fn client(upstream: SocketAddr) -> LlmClient {
    let config = LlmConfig {
        provider: Provider::Openai,
        base_url: format!("http://{upstream}/v1"),
        max_retries: 0,
        ..LlmConfig::default()
    };
    LlmClient::new(&config, Arc::new(Metrics::new(1, 0)))
}

fn stat(mock: &Proc, name: &str) -> u64 {
    get(mock.addr, "/stats").json()[name].as_u64().unwrap()
}

/// Runs one call on its own thread, as a worker would; returns its result and when it ended.
fn call_in_background(
    llm: LlmClient,
    cancel: Cancel,
    stream: Option<mpsc::Sender<String>>,
) -> thread::JoinHandle<(Result<String, UpstreamError>, Instant)> {
    thread::spawn(move || {
        let messages = [ChatMessage::new("user", "one two three four")];
        let result = match stream {
            Some(pieces) => {
                let mut sink = |piece: &str| {
                    let _ = pieces.send(piece.to_string());
                };
                llm.complete(&messages, Sampling::default(), Some(&mut sink), &cancel)
            }
            None => llm.complete(&messages, Sampling::default(), None, &cancel),
        };
        (result.map(|c| c.content), Instant::now())
    })
}

#[test]
fn a_call_waiting_for_the_answer_is_abandoned_within_a_second_and_the_upstream_told() {
    let mock = mock_llm(&["--latency-ms", "8000"]);
    let flag = Arc::new(AtomicBool::new(false));
    let call = call_in_background(client(mock.addr), Cancel::new(Arc::clone(&flag)), None);
    assert!(eventually(Duration::from_secs(5), || stat(
        &mock,
        "completions"
    ) == 1));
    cancel_and_expect_abandoned(&mock, &flag, call);
}

/// Sets `flag` 0.3 s into a call already under way, then checks that the call ends as
/// cancelled within 1.5 s.
fn cancel_and_expect_cancelled(
    flag: &AtomicBool,
    call: thread::JoinHandle<(Result<String, UpstreamError>, Instant)>,
) {
    thread::sleep(Duration::from_millis(300));
    let cancelled_at = Instant::now();
    flag.store(true, Ordering::Relaxed);
    let (result, ended) = call.join().unwrap();
    assert_eq!(result, Err(UpstreamError::Cancelled));
    let took = ended - cancelled_at;
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

/// [`cancel_and_expect_cancelled`], and the mock sees its connection closed.
fn cancel_and_expect_abandoned(
    mock: &Proc,
    flag: &AtomicBool,
    call: thread::JoinHandle<(Result<String, UpstreamError>, Instant)>,
) {
    cancel_and_expect_cancelled(flag, call);
    assert!(
        eventually(Duration::from_secs(5), || stat(mock, "disconnects") == 1),
        "the mock never saw the connection closed"
    );
}

#[test]
fn a_streaming_call_is_abandoned_between_pieces_and_the_upstream_told() {
    let mock = mock_llm(&["--chunk-gap-ms", "8000"]);
    let flag = Arc::new(AtomicBool::new(false));
    let (pieces_tx, pieces) = mpsc::channel();
    let llm = client(mock.addr);
    let call = call_in_background(llm, Cancel::new(Arc::clone(&flag)), Some(pieces_tx));
    pieces.recv_timeout(Duration::from_secs(10)).unwrap();
    cancel_and_expect_abandoned(&mock, &flag, call);
}

#[test]
fn calls_nothing_cancels_are_answered_one_after_another() {
    let mock = mock_llm(&[]);
    let llm = client(mock.addr);
    let messages = [ChatMessage::new("user", "hello")];
    for _ in 0..3 {
        let reply = llm.complete(&messages, Sampling::default(), None, &Cancel::never());
        assert_eq!(reply.unwrap().content, "You said: hello");
    }
    assert_eq!(stat(&mock, "disconnects"), 0);
}

fn workers_busy(addr: SocketAddr) -> u64 {
    get(addr, "/status").json()["workers_busy"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_client_that_hangs_up_during_the_llm_call_frees_its_worker_and_stores_nothing() {
    let mock = mock_llm(&["--latency-ms", "8000"]);
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(mock.addr, "max_retries = 0"));
    let body = r#"{"content": "never mind"}"#;
    let mut client = TcpStream::connect(server.addr).unwrap();
    let request = format!(
        "POST /v1/chats/left/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(5), || stat(
        &mock,
        "completions"
    ) == 1));
    thread::sleep(Duration::from_millis(300));
    let hung_up = Instant::now();
    drop(client);
    assert!(
        eventually(Duration::from_secs(5), || workers_busy(server.addr) == 0),
        "the worker stayed busy"
    );
    let freed = hung_up.elapsed();
    assert!(freed < Duration::from_millis(1500), "{freed:?}");
    assert!(
        eventually(Duration::from_secs(5), || stat(&mock, "disconnects") == 1),
        "the mock never saw the call broken off"
    );
    assert!(server.log_shows("the client went away during the LLM call"));
    assert!(stored_messages(&work.db(), "left").is_empty());
}

#[test]
fn a_call_still_connecting_is_abandoned_too() {
    // A listener with a full queue that never accepts: further SYNs go unanswered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on the listener's own descriptor.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) },
        0
    );
    let addr = listener.local_addr().unwrap();
    let _queued: Vec<_> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    let config = LlmConfig {
        provider: Provider::Openai,
        base_url: format!("http://{addr}/v1"),
        connect_timeout_ms: 8000,
        max_retries: 0,
        ..LlmConfig::default()
    };
    let llm = LlmClient::new(&config, Arc::new(Metrics::new(1, 0)));
    let flag = Arc::new(AtomicBool::new(false));
    let call = call_in_background(llm, Cancel::new(Arc::clone(&flag)), None);
    cancel_and_expect_cancelled(&flag, call);
}
