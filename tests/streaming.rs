//! `"stream": true`: server-sent events from the LLM through a worker to the client.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const STREAM_BODY: &str = r#"{"content": "tell me more", "stream": true}"#;

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
    let (text, end, done) = native_deltas(&mut events);
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
    let (text, end, done) = native_deltas(&mut events);
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
    let (_, end, _) = native_deltas(&mut events);
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
    let (text, end, error) = native_deltas(&mut events);
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
    let server = work.spawn(&config);
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
    let (_, _, done) = native_deltas(&mut first);
    let mut again = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &key);
    let (text, end, replay) = native_deltas(&mut again);
    assert_eq!(end.as_deref(), Some("done"));
    assert_eq!(replay["message_id"], done["message_id"]);
    let stored = stored_messages(&work.db(), "s");
    assert_eq!(stored.len(), 2);
    // A client that builds the reply from the pieces gets the stored reply.
    assert_eq!(text, stored[1].2);
    assert_eq!(text, "You said: tell me more");
}

#[test]
fn an_error_object_after_two_pieces_is_an_error_event_and_stores_nothing() {
    let stream = format!(
        "{}{}{SSE_ERROR}data: [DONE]\n\n",
        sse_piece("Hel"),
        sse_piece("lo")
    );
    let upstream = upstream_streaming(stream, completion("unused"));
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(upstream.addr, ""));
    let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    assert_eq!(events.status, 200);
    let (text, end, error) = native_deltas(&mut events);
    assert_eq!(text, "Hello");
    assert_eq!(end.as_deref(), Some("error"), "{error}");
    assert_eq!(error["error"]["type"], "upstream_error");
    // chatpool's reason, not the LLM's words (they are in the log).
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reported an error"),
        "{error}"
    );
    assert!(!error.to_string().contains("generation failed"), "{error}");
    assert!(server.log_shows("generation failed"));
    assert!(stored_messages(&work.db(), "s").is_empty());
}

#[test]
fn an_error_object_before_any_piece_is_an_error_and_stores_nothing() {
    let stream = format!("{SSE_ERROR}data: [DONE]\n\n");
    let upstream = upstream_streaming(
        stream,
        r#"{"error": {"message": "generation failed"}}"#.into(),
    );
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(upstream.addr, ""));
    let events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    assert_eq!(events.status, 502);
    let body: Value = serde_json::from_str(&events.body()).unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    // The LLM reported an error: not a guess from the stream's end. Its own words are for the
    // log, not for the client.
    assert!(body.to_string().contains("reported an error"), "{body}");
    assert!(!body.to_string().contains("generation failed"), "{body}");
    assert!(server.log_shows("generation failed"));
    // The same answer to a call that is not streamed: an error, not an empty reply.
    let r = send(server.addr, "s", "hello");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    assert!(r.text().contains("reported an error"), "{}", r.text());
    assert!(stored_messages(&work.db(), "s").is_empty());
}

#[test]
fn a_stream_of_only_tool_calls_or_without_a_finish_reason_stores_nothing() {
    let tools = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n";
    for (stream, needle) in [
        (format!("{tools}{}", sse_end("tool_calls")), "tool calls"),
        (
            format!("{}data: [DONE]\n\n", sse_piece("cut")),
            "before the reply was complete",
        ),
    ] {
        let upstream = upstream_streaming(stream, completion("unused"));
        let work = Workdir::new();
        let server = work.serve(&openai_llm(upstream.addr, "max_retries = 0\n"));
        let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
        let (status, error) = if events.status == 200 {
            let (_, end, error) = native_deltas(&mut events);
            assert_eq!(end.as_deref(), Some("error"));
            (502, error)
        } else {
            (events.status, serde_json::from_str(&events.body()).unwrap())
        };
        assert_eq!(status, 502);
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
        assert!(stored_messages(&work.db(), "s").is_empty());
    }
}

#[test]
fn a_reply_of_45000_pieces_is_streamed_and_stored_whole() {
    let mut stream = String::new();
    for i in 0..45_000 {
        stream.push_str(&sse_piece(&format!("{:04} ", i % 10_000)));
    }
    stream.push_str(&sse_end("stop"));
    // Far more framing than text: the cap is on the text.
    assert!(stream.len() > 8 << 20, "{} bytes", stream.len());
    let upstream = upstream_streaming(stream, completion("unused"));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let mut events = EventReader::post(server.addr, "/v1/chats/big/messages", STREAM_BODY, &[]);
    let (text, end, done) = native_deltas(&mut events);
    assert_eq!(end.as_deref(), Some("done"), "{done}");
    assert_eq!(text.len(), 225_000);
    assert_eq!(done["reply"], text);
    let stored = stored_messages(&work.db(), "big");
    assert_eq!(stored[1].2, text);
}

#[test]
fn a_stream_that_stays_open_after_its_finish_reason_and_usage_is_finished() {
    let stream = format!("{}{}", sse_piece("all "), sse_piece("done"));
    let finish = sse_end("stop");
    // Everything but [DONE]; then the connection stays open.
    let held = format!("{stream}{}", finish.rsplit_once("data: [DONE]").unwrap().0);
    let upstream = RawUpstream::start(held.into_bytes(), true);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, "request_timeout_ms = 20000\n"));
    let started = Instant::now();
    let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    let (text, end, done) = native_deltas(&mut events);
    assert_eq!(
        (text.as_str(), end.as_deref()),
        ("all done", Some("done")),
        "{done}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stored_messages(&work.db(), "s").len(), 2);
}

#[test]
fn invalid_utf8_from_the_llm_is_malformed_and_not_retried() {
    let mut body = sse_piece("fine ").into_bytes();
    body.extend_from_slice(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n",
    );
    for (stream, pieces) in [
        (body.clone(), "fine "),
        (body[body.len() - 60..].to_vec(), ""),
    ] {
        let upstream = RawUpstream::start(stream, false);
        let work = Workdir::new();
        let server = work.serve(&openai_llm(upstream.addr, "max_retries = 2\n"));
        let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
        let error: Value = if pieces.is_empty() {
            assert_eq!(events.status, 502);
            serde_json::from_str(&events.body()).unwrap()
        } else {
            let (text, end, error) = native_deltas(&mut events);
            assert_eq!((text.as_str(), end.as_deref()), (pieces, Some("error")));
            error
        };
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("UTF-8"),
            "{error}"
        );
        assert_eq!(
            upstream.requests(),
            1,
            "tokens are not spent twice on the same answer"
        );
        assert!(stored_messages(&work.db(), "s").is_empty());
    }
}

#[test]
fn bare_cr_line_ends_and_multi_line_data_events_are_read() {
    let pieces = format!(
        "{}{}{}",
        sse_piece("one "),
        sse_piece("two "),
        sse_piece("three")
    );
    // Each event's JSON split over two data lines, and every line ended by a lone CR.
    let split: String = pieces
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.replacen(",", ",\ndata: ", 1) + "\n\n")
        .collect();
    let stream = (split + &sse_end("stop")).replace('\n', "\r");
    let upstream = upstream_streaming(stream, completion("unused"));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let mut events = EventReader::post(server.addr, "/v1/chats/s/messages", STREAM_BODY, &[]);
    let (text, end, done) = native_deltas(&mut events);
    assert_eq!(
        (text.as_str(), end.as_deref()),
        ("one two three", Some("done")),
        "{done}"
    );
    assert_eq!(stored_messages(&work.db(), "s")[1].2, "one two three");
}

#[test]
fn an_http_1_0_client_gets_a_close_delimited_stream_not_chunks() {
    use std::io::{Read, Write};
    let work = Workdir::new();
    let server = work.serve("");
    // With and without HTTP/1.0's keep-alive: a stream has no length, so either way it ends
    // when the server closes the connection, long before the 30 s idle timeout.
    for connection in ["", "Connection: keep-alive\r\n"] {
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let request = format!(
            "POST /v1/chats/old/messages HTTP/1.0\r\n{connection}Content-Length: {}\r\n\r\n{STREAM_BODY}",
            STREAM_BODY.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .unwrap_or_else(|e| panic!("{connection:?}: the stream did not end: {e}"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
        assert!(body.starts_with("data: {\"delta\""), "{body}");
        assert!(body.contains("event: done\ndata: "), "{body}");
        assert!(body.ends_with("\n\n"), "{body}");
    }
    assert_eq!(stored_messages(&work.db(), "old").len(), 4);
}
