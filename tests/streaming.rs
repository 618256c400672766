//! `"stream": true`: server-sent events from the LLM through a worker to the client.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const STREAM_BODY: &str = r#"{"content": "tell me more", "stream": true}"#;

fn deltas_and_end(events: &mut EventReader) -> (String, Option<String>, Value) {
    let mut text = String::new();
    while let Some((name, data)) = events.next_event() {
        match name {
            None => text.push_str(
                serde_json::from_str::<Value>(&data).unwrap()["delta"]
                    .as_str()
                    .unwrap(),
            ),
            Some(name) => return (text, Some(name), serde_json::from_str(&data).unwrap()),
        }
    }
    (text, None, Value::Null)
}

#[test]
fn the_deltas_add_up_to_the_done_reply_and_the_stored_reply() {
    let mock = mock_llm(&["--reply-words", "6"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let mut events = EventReader::post(
        server.addr,
        "/v1/chats/s/messages",
        STREAM_BODY,
        &[("X-Request-Id", "s-1")],
    );
    assert_eq!(events.status, 200);
    assert_eq!(events.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(events.header("X-Request-Id"), Some("s-1"));
    let (text, end, done) = deltas_and_end(&mut events);
    assert_eq!(end.as_deref(), Some("done"));
    assert_eq!(
        text,
        "You said: tell me more lorem ipsum lorem ipsum lorem ipsum"
    );
    assert_eq!(done["reply"], text);
    assert_eq!(done["chat_id"], "s");
    assert!(done["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let stored = stored_messages(&work.db(), "s");
    assert_eq!(stored.len(), 2);
    assert_eq!(
        (stored[1].0, stored[1].2.as_str()),
        (done["message_id"].as_i64().unwrap(), text.as_str())
    );
    // The built-in mock provider streams too.
    let server = work.serve("");
    let mut events = EventReader::post(server.addr, "/v1/chats/m/messages", STREAM_BODY, &[]);
    let (text, end, done) = deltas_and_end(&mut events);
    assert_eq!(
        (text.as_str(), end.as_deref()),
        ("You said: tell me more", Some("done"))
    );
    assert_eq!(done["reply"], "You said: tell me more");
}

#[test]
fn the_first_delta_arrives_before_the_upstream_sends_the_second() {
    let mock = mock_llm(&["--chunks", "3", "--chunk-gap-ms", "1000"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let started = Instant::now();
    let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    let (name, _) = events.next_event().unwrap();
    let first = started.elapsed();
    assert_eq!(name, None);
    // The upstream sends its second chunk 1000 ms after the first.
    assert!(
        first < Duration::from_millis(900),
        "first delta after {first:?}"
    );
    let (_, end, _) = deltas_and_end(&mut events);
    assert_eq!(end.as_deref(), Some("done"));
    assert!(
        started.elapsed() >= Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_upstream_failure_mid_stream_is_an_error_event_and_stores_nothing() {
    let mock = mock_llm(&[
        "--chunks",
        "4",
        "--fail-after-chunk",
        "2",
        "--reply-words",
        "6",
    ]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "max_retries = 2\n"));
    let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    assert_eq!(events.status, 200);
    let (text, end, error) = deltas_and_end(&mut events);
    assert!(!text.is_empty());
    assert_eq!(end.as_deref(), Some("error"));
    assert_eq!(error["error"]["type"], "upstream_error");
    assert!(stored_messages(&work.db(), "s").is_empty());
    // No retry once a delta reached the client.
    assert_eq!(get(mock.addr, "/stats").json()["completions"], 1);
}

#[test]
fn an_upstream_failure_before_the_first_byte_is_an_ordinary_json_error() {
    let mock = mock_llm(&["--fault", "error", "--fault-status", "503"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "max_retries = 1\n"));
    let events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    assert_eq!(events.status, 502);
    assert_eq!(events.header("Content-Type"), Some("application/json"));
    let body: Value = serde_json::from_str(&events.body()).unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(
        get(mock.addr, "/stats").json()["completions"],
        2,
        "retried before the first byte"
    );
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_worker_and_closes_the_upstream() {
    let mock = mock_llm(&[
        "--chunks",
        "20",
        "--chunk-gap-ms",
        "150",
        "--reply-words",
        "30",
    ]);
    let work = Workdir::new();
    let config = format!(
        "[server]\nmax_concurrent_requests = 1\n\n{}",
        openai_llm(mock.addr, "")
    );
    let server = work.serve(&config);
    let mut events = EventReader::post(server.addr, "/v1/chats/gone/messages", STREAM_BODY, &[]);
    assert_eq!(events.next_event().unwrap().0, None);
    drop(events);
    // The only worker notices at its next write, drops the upstream call, takes the next job.
    let r = send(server.addr, "next", "anyone there?");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(eventually(Duration::from_secs(5), || get(
        mock.addr, "/stats"
    )
    .json()["disconnects"]
        .as_u64()
        >= Some(1)));
    assert!(stored_messages(&work.db(), "gone").is_empty());
    assert!(server.log_shows("went away mid-stream"));
}

#[test]
fn an_idempotent_replay_streams_the_stored_reply() {
    let work = Workdir::new();
    let server = work.serve("");
    let key = [("Idempotency-Key", "stream-key")];
    let mut first = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &key);
    let (_, _, done) = deltas_and_end(&mut first);
    let mut again = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &key);
    let (text, end, replay) = deltas_and_end(&mut again);
    assert_eq!((text.as_str(), end.as_deref()), ("", Some("done")));
    assert_eq!(replay["message_id"], done["message_id"]);
    assert_eq!(stored_messages(&work.db(), "s").len(), 2);
}
