//! What reaches the LLM, and how its failures reach the client.

use crate::support::*;
use std::time::{Duration, Instant};

#[test]
fn the_upstream_gets_system_prompt_history_window_new_message_model_and_key() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("r{n}")))));
    let work = Workdir::new();
    let llm = openai_llm(
        upstream.addr,
        "model = \"test-model\"\napi_key_env = \"CHATPOOL_TEST_KEY\"\n",
    );
    let config =
        format!("[history]\nmax_messages = 3\nmax_chars = 1000\nsystem_prompt = \"SYS\"\n\n{llm}");
    let server = work.spawn_with_env(&config, &[("CHATPOOL_TEST_KEY", "sk-test-123")]);
    for text in ["m0", "m1", "m2"] {
        assert_eq!(send(server.addr, "c", text).status, 200);
    }
    let seen = upstream.seen();
    assert_eq!(
        seen[0].messages(),
        pairs(&[("system", "SYS"), ("user", "m0")])
    );
    assert_eq!(
        seen[1].messages(),
        pairs(&[
            ("system", "SYS"),
            ("user", "m0"),
            ("assistant", "r0"),
            ("user", "m1")
        ])
    );
    // max_messages = 3: the oldest earlier message is dropped.
    assert_eq!(
        seen[2].messages(),
        pairs(&[
            ("system", "SYS"),
            ("assistant", "r0"),
            ("user", "m1"),
            ("assistant", "r1"),
            ("user", "m2")
        ])
    );
    assert_eq!(seen[2].body["model"], "test-model");
    assert_eq!(seen[2].header("Authorization"), Some("Bearer sk-test-123"));
    assert!(!server.log().contains("sk-test-123"));
    // The reply's model is the upstream's, as it named it.
    assert_eq!(
        send(server.addr, "d", "x").json()["model"],
        "upstream-model"
    );
}

#[test]
fn a_chat_with_huge_old_messages_sends_only_the_window_and_never_loads_the_rest() {
    let upstream = FakeUpstream::start(Box::new(|_, _| (200, completion("ok"))));
    let work = Workdir::new();
    let config = format!(
        "[history]\nmax_messages = 40\nmax_chars = 1000\nsystem_prompt = \"\"\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    for text in ["huge one", "huge two", "small", "new"] {
        if text == "small" {
            // The first exchange (ids 1 and 2) becomes 5 MB each of something that cannot be
            // read as text at all, which only a window that loads rows past max_chars would
            // trip on; the second (ids 3 and 4) a 5-million-character question.
            let conn = rusqlite::Connection::open(work.db()).unwrap();
            conn.execute_batch(
                "UPDATE messages SET content = zeroblob(5000000) WHERE id IN (1, 2);
                 UPDATE messages SET content = printf('%.*c', 5000000, 'x') WHERE id = 3;",
            )
            .unwrap();
        }
        assert_eq!(send(server.addr, "c", text).status, 200, "{text}");
    }
    let last = upstream.seen().pop().unwrap();
    assert_eq!(
        last.messages(),
        pairs(&[
            ("assistant", "ok"),
            ("user", "small"),
            ("assistant", "ok"),
            ("user", "new")
        ])
    );
}

#[test]
fn the_history_window_is_bounded_by_characters_newest_kept() {
    let upstream = FakeUpstream::start(Box::new(|_, _| (200, completion("ok"))));
    let work = Workdir::new();
    let config = format!(
        "[history]\nmax_messages = 40\nmax_chars = 12\nsystem_prompt = \"\"\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    // Stored: "ééééé" (5 chars, 10 bytes), "ok", "abcdef", "ok"; then a new message.
    for text in ["ééééé", "abcdef", "new"] {
        assert_eq!(send(server.addr, "c", text).status, 200);
    }
    // 12 characters hold "ok" + "abcdef" + "ok" (10) but not "ééééé" as well (15).
    let last = upstream.seen().pop().unwrap();
    assert_eq!(
        last.messages(),
        pairs(&[
            ("assistant", "ok"),
            ("user", "abcdef"),
            ("assistant", "ok"),
            ("user", "new")
        ])
    );
}

#[test]
fn an_upstream_error_is_502_naming_its_status_and_stores_nothing() {
    let upstream = FakeUpstream::start(Box::new(|_, _| {
        (500, r#"{"error":{"message":"model exploded"}}"#.into())
    }));
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(upstream.addr, "max_retries = 1\n"));
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    // The status, in chatpool's words; what the upstream said is for the log.
    assert!(
        message.contains("500") && !message.contains("model exploded"),
        "{message}"
    );
    assert!(log_line(&server, &r).contains("model exploded"));
    assert_eq!(upstream.seen().len(), 2, "one call and one retry");
    assert!(stored_messages(&work.db(), "c").is_empty());
    assert_eq!(get(server.addr, "/v1/chats/c/messages").status, 404);
    assert!(server.log_shows(&format!("request_id={}", r.header("X-Request-Id").unwrap())));
}

#[test]
fn nonsense_from_the_upstream_is_502() {
    let upstream = FakeUpstream::start(Box::new(|_, _| (200, "<html>hello</html>".into())));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    assert!(stored_messages(&work.db(), "c").is_empty());
}

#[test]
fn a_slow_upstream_is_504_within_the_deadline() {
    let mock = mock_llm(&["--latency-ms", "5000"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "request_timeout_ms = 400\n"));
    let started = Instant::now();
    let r = send(server.addr, "c", "hi");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (504, "upstream_timeout")
    );
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );
    assert!(stored_messages(&work.db(), "c").is_empty());
}

#[test]
fn an_unreachable_upstream_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let work = Workdir::new();
    let server = work.serve(&openai_llm(closed, "max_retries = 0\n"));
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not reach"));
}

/// The log line that names `response`'s request id.
fn log_line(server: &Proc, response: &Response) -> String {
    let id = format!("request_id={}", response.header("X-Request-Id").unwrap());
    assert!(server.log_shows(&id), "{}", server.log());
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains(&id) && l.contains("failed"));
    line.unwrap_or_else(|| panic!("no failure line for {id}:\n{log}"))
        .to_string()
}

#[test]
fn an_upstream_error_body_reaches_the_log_and_not_the_client() {
    let upstream = FakeUpstream::start(Box::new(|_, _| {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-test-SECRETabcd"}}"#;
        (401, body.into())
    }));
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(upstream.addr, ""));
    for r in [
        send(server.addr, "c", "hi"),
        EventReader::post(
            server.addr,
            "/v1/chat/completions",
            r#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#,
            &[],
        )
        .into_response(),
    ] {
        assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
        assert!(r.text().contains("HTTP 401"), "{}", r.text());
        assert!(!r.text().contains("SECRET"), "{}", r.text());
        assert!(!r.text().contains("Incorrect API key"), "{}", r.text());
        assert!(log_line(&server, &r).contains("sk-test-SECRETabcd"));
    }
}

#[test]
fn an_unreachable_upstream_names_neither_its_address_nor_its_credentials_to_the_client() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let work = Workdir::new();
    let llm = format!(
        "[llm]\nprovider = \"openai\"\nbase_url = \"http://agent:hunter2@{closed}/v1\"\nmax_retries = 0\n"
    );
    let server = work.spawn(&llm);
    let r = send(server.addr, "c", "hi");
    assert_eq!((r.status, r.error_type().as_str()), (502, "upstream_error"));
    let port = closed.port().to_string();
    for secret in ["hunter2", "agent", "127.0.0.1", port.as_str()] {
        assert!(!r.text().contains(secret), "{secret} in {}", r.text());
    }
    // The operator's log says where; a password in base_url stays out of it too.
    let line = log_line(&server, &r);
    assert!(line.contains(&closed.to_string()), "{line}");
    assert!(!line.contains("hunter2"), "{line}");
}

#[test]
fn a_response_head_up_to_16_kib_is_read_and_a_longer_one_is_a_502() {
    // The first chat's calls get a 12 KiB header, the second's 20 KiB.
    let upstream = FakeUpstream::start_with_headers(Box::new(|_, seen| {
        let last = seen.messages().last().map(|(_, text)| text.clone());
        let size = if last.as_deref() == Some("big") {
            20
        } else {
            12
        } << 10;
        (200, vec![("X-Padding", "p".repeat(size))], completion("ok"))
    }));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, "max_retries = 0\n"));
    assert_eq!(send(server.addr, "fits", "small").status, 200);
    let refused = send(server.addr, "too-big", "big");
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert_eq!(stored_messages(&work.db(), "fits").len(), 2);
    assert!(stored_messages(&work.db(), "too-big").is_empty());
}

#[test]
fn a_prompt_and_a_reply_larger_than_the_upstream_buffers_go_through_whole() {
    // Each worker's upstream buffers start at 4 KiB and grow to 32 KiB in, 16 KiB out: a
    // 40,000-character question is several writes, and its 120,000-character answer several
    // reads, both after the buffers have grown as far as they go.
    let upstream = FakeUpstream::start(Box::new(|_, seen| {
        let question = seen.messages().last().map(|(_, text)| text.clone());
        (200, completion(&question.unwrap_or_default().repeat(3)))
    }));
    let work = Workdir::new();
    let llm = openai_llm(upstream.addr, "max_retries = 0\n");
    let server = work.serve(&format!("[history]\nsystem_prompt = \"\"\n\n{llm}"));
    let question: String = (0..40_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for _ in 0..2 {
        let answered = send(server.addr, "long", &question);
        assert_eq!(answered.status, 200, "{}", answered.text());
        assert_eq!(answered.json()["reply"], question.repeat(3));
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].messages(), pairs(&[("user", &question)]));
}

/// The contents of the earlier messages in the last prompt the upstream saw.
fn last_history(upstream: &FakeUpstream) -> Vec<String> {
    let seen = upstream.seen();
    let messages = seen.last().unwrap().messages();
    let earlier = &messages[..messages.len() - 1];
    earlier.iter().map(|(_, content)| content.clone()).collect()
}

#[test]
fn a_deleted_chat_starts_its_next_prompt_afresh() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("r{n}")))));
    let work = Workdir::new();
    let config = format!(
        "[history]\nsystem_prompt = \"\"\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    for text in ["old-1", "old-2"] {
        assert_eq!(send(server.addr, "c", text).status, 200);
    }
    assert_eq!(last_history(&upstream), ["old-1", "r0"]);
    let deleted = request(server.addr, "DELETE", "/v1/chats/c", None, &[]);
    assert_eq!(deleted.status, 204);
    assert_eq!(send(server.addr, "c", "new").status, 200);
    assert!(last_history(&upstream).is_empty());
    assert_eq!(send(server.addr, "c", "newer").status, 200);
    assert_eq!(last_history(&upstream), ["new", "r2"]);
}

#[test]
fn a_write_by_another_process_reaches_the_prompts_that_follow() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("r{n}")))));
    let work = Workdir::new();
    let config = format!(
        "[history]\nsystem_prompt = \"\"\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.spawn(&config);
    for text in ["before-1", "before-2"] {
        assert_eq!(send(server.addr, "c", text).status, 200);
    }
    assert_eq!(last_history(&upstream), ["before-1", "r0"]);
    // What `chatpool forget` does, from this process: the chat's rows go.
    let conn = rusqlite::Connection::open(work.db()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "DELETE FROM messages WHERE chat_id = 'c'; DELETE FROM chats WHERE chat_id = 'c';",
    )
    .unwrap();
    drop(conn);
    // The server sees the write within moments; until then a turn may still see the old window.
    let forgotten = eventually(Duration::from_secs(10), || {
        assert_eq!(send(server.addr, "c", "after").status, 200);
        !last_history(&upstream)
            .iter()
            .any(|m| m.starts_with("before"))
    });
    assert!(
        forgotten,
        "prompts kept the history another process deleted: {:?}",
        last_history(&upstream)
    );
}

/// One worker, and so one pool of kept-alive connections, calling `upstream` without retries;
/// `server` adds to the `[server]` section.
fn one_worker(upstream: std::net::SocketAddr, server: &str) -> String {
    let llm = openai_llm(upstream, "max_retries = 0\n");
    format!("[server]\nmax_concurrent_requests = 1\n{server}\n{llm}")
}

/// A relay's body.
fn relay(content: &str) -> String {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]})
        .to_string()
}

#[test]
fn an_upstream_that_closes_after_every_answer_without_saying_so_is_reconnected_to() {
    // No `Connection: close`: the connection looks reusable, and only a look before the next
    // call finds it closed. Without retries, a call sent on it would fail. Each call waits for
    // the upstream to have closed the last one's connection: a close still on its way when the
    // next call looks is no one's to see (a call sent then fails, as it would for any client).
    let upstream = ThreadedUpstream::start(|_| Answer::Close(http_200(&completion("ok"))));
    let work = Workdir::new();
    // One worker, so that every call after the first could take the same kept-alive connection.
    let server = work.serve(&one_worker(upstream.addr, ""));
    for n in 1..=30 {
        let relayed = post(
            server.addr,
            "/v1/chat/completions",
            &relay(&format!("m{n}")),
        );
        assert_eq!(relayed.status, 200, "call {n}: {}", relayed.text());
        assert!(eventually(Duration::from_secs(10), || upstream.closed() == 2 * n - 1));
        let sent = send(server.addr, "c", &format!("m{n}"));
        assert_eq!(sent.status, 200, "message {n}: {}", sent.text());
        assert!(eventually(Duration::from_secs(10), || upstream.closed() == 2 * n));
    }
    assert_eq!(upstream.connections(), 60);
}

#[test]
fn a_kept_alive_connection_with_bytes_past_the_answer_is_not_reused() {
    // Bytes that come after the answer was read would be read as the next call's answer.
    let upstream = ThreadedUpstream::start(|body| {
        let answer = http_200(&completion(if body.contains("first") {
            "one"
        } else {
            "two"
        }));
        Answer::Trail(answer, http_200(&completion("stale")))
    });
    let work = Workdir::new();
    let server = work.serve(&one_worker(upstream.addr, ""));
    for n in 1..=10 {
        let content = if n == 1 { "first" } else { "later" };
        let relayed = post(server.addr, "/v1/chat/completions", &relay(content));
        assert_eq!(relayed.status, 200, "call {n}: {}", relayed.text());
        let want = if n == 1 { "one" } else { "two" };
        assert_eq!(
            relayed.json()["choices"][0]["message"]["content"],
            want,
            "call {n}"
        );
        assert!(eventually(Duration::from_secs(10), || upstream.trailers() == n));
    }
    assert_eq!(upstream.connections(), 10);
}

#[test]
fn a_body_larger_than_the_socket_takes_arrives_whole_over_many_writes() {
    // The upstream stops reading for longer than a socket timeout while the request is larger
    // than the socket buffers hold: writes come back short, and what is left must follow on.
    // Then a small call on the same kept-alive connection.
    let big = format!("{}END", "a".repeat(15 << 20));
    let expected = big.len();
    let upstream = ThreadedUpstream::start_reading(
        move |body| {
            let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let content = body["messages"][0]["content"].as_str().unwrap_or("");
            let whole = content.len() == expected && content.ends_with("END") || content == "small";
            let reply = if whole { "whole" } else { "torn" };
            Answer::Keep(http_200(&completion(reply)))
        },
        Duration::from_millis(700),
    );
    let work = Workdir::new();
    let server = work.serve(&one_worker(upstream.addr, "max_body_bytes = 16777216\n"));
    for content in [big.as_str(), "small"] {
        let relayed = post(server.addr, "/v1/chat/completions", &relay(content));
        assert_eq!(relayed.status, 200, "{}", relayed.text());
        assert_eq!(relayed.json()["choices"][0]["message"]["content"], "whole");
    }
    assert_eq!(upstream.connections(), 1);
}
