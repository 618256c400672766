//! Every endpoint's happy path against `chatpool mock-llm`, and the error table's rows.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn every_endpoint_works_against_mock_llm() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.spawn(&openai_llm(mock.addr, ""));
    let addr = server.addr;

    let first = request(
        addr,
        "POST",
        "/v1/chats/c1/messages",
        Some(r#"{"content":"Hello"}"#),
        &[("X-Request-Id", "req-1")],
    );
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("X-Request-Id"), Some("req-1"));
    let body = first.json();
    assert_eq!(body["chat_id"], "c1");
    assert_eq!(body["reply"], "You said: Hello");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["message_id"], 2);
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    for stage in ["queued", "history", "llm", "store", "total"] {
        assert!(
            body["timings_ms"][stage].as_f64().is_some(),
            "{stage} in {body}"
        );
    }
    let second = send(addr, "c1", "Again");
    assert_eq!(second.json()["message_id"], 4);
    assert_eq!(send(addr, "c2", "Other chat").status, 200);

    let history = get(addr, "/v1/chats/c1/messages");
    assert_eq!(history.status, 200);
    let h = history.json();
    let contents: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["Hello", "You said: Hello", "Again", "You said: Again"]
    );
    assert_eq!(h["messages"][0]["role"], "user");
    assert_eq!(h["messages"][1]["role"], "assistant");
    assert!(h["messages"][0]["created_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(h["has_more"], false);

    let page = get(addr, "/v1/chats/c1/messages?limit=2").json();
    assert_eq!(page["messages"][0]["content"], "Again");
    assert_eq!(page["has_more"], true);
    let before = page["messages"][0]["id"].as_i64().unwrap();
    let older = get(
        addr,
        &format!("/v1/chats/c1/messages?limit=2&before={before}"),
    )
    .json();
    assert_eq!(older["messages"][0]["content"], "Hello");
    assert_eq!(older["has_more"], false);

    let chats = get(addr, "/v1/chats").json();
    let listed: Vec<_> = chats["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["chat_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["c2", "c1"]);
    assert_eq!(chats["chats"][1]["message_count"], 4);
    assert_eq!(
        get(addr, "/v1/chats?limit=1").json()["chats"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let deleted = request(addr, "DELETE", "/v1/chats/c1", None, &[]);
    assert_eq!(deleted.status, 204);
    assert!(deleted.header("X-Request-Id").is_some());
    assert_eq!(get(addr, "/v1/chats/c1/messages").status, 404);
    assert_eq!(
        request(addr, "DELETE", "/v1/chats/c1", None, &[]).status,
        404
    );

    assert_eq!(get(addr, "/healthz").json(), json!({"status": "ok"}));
    assert_eq!(get(addr, "/readyz").status, 200);
    let status = get(addr, "/status").json();
    assert_eq!(status["workers"], 16);
    assert_eq!(status["queue_capacity"], 64);
    assert_eq!(status["draining"], false);
    for key in [
        "version",
        "uptime_secs",
        "workers_busy",
        "queue_depth",
        "sqlite_version",
    ] {
        assert!(!status[key].is_null(), "{key} in {status}");
    }
    // 3.51.3 is the first SQLite without the WAL-reset bug.
    let sqlite: Vec<u32> = status["sqlite_version"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|part| part.parse().unwrap())
        .collect();
    assert!(sqlite >= vec![3, 51, 3], "{status}");
    let metrics = get(addr, "/metrics");
    assert!(metrics
        .header("Content-Type")
        .unwrap()
        .starts_with("text/plain"));
    // Workers count a request just after its response is out.
    let counted = r#"chatpool_requests_total{route="post_message",status="200"} 3"#;
    assert!(eventually(Duration::from_secs(5), || get(addr, "/metrics")
        .text()
        .contains(counted)));

    assert!(
        server.log_shows("POST /v1/chats/c1/messages 200"),
        "{}",
        server.log()
    );
    assert!(server.log_shows("request_id=req-1"));
}

#[test]
fn a_new_chat_starts_with_its_first_message_and_request_ids_are_generated() {
    let work = Workdir::new();
    let server = work.serve("");
    assert_eq!(get(server.addr, "/v1/chats").json(), json!({"chats": []}));
    let r = send(server.addr, "fresh", "hi");
    assert_eq!(r.status, 200);
    let generated = r.header("X-Request-Id").unwrap();
    assert!(!generated.is_empty());
    let insane = request(
        server.addr,
        "GET",
        "/healthz",
        None,
        &[("X-Request-Id", &"x".repeat(200))],
    );
    assert_ne!(insane.header("X-Request-Id").unwrap(), "x".repeat(200));
}

/// (method, path, body, expected status, expected type, text the message must contain)
const BAD_REQUESTS: &[(&str, &str, &str, u16, &str, &str)] = &[
    (
        "POST",
        "/v1/chats/c/messages",
        "",
        400,
        "invalid_json",
        "empty",
    ),
    (
        "POST",
        "/v1/chats/c/messages",
        "{nope",
        400,
        "invalid_json",
        "not valid JSON",
    ),
    (
        "POST",
        "/v1/chats/c/messages",
        "[1]",
        400,
        "invalid_request",
        "JSON object",
    ),
    (
        "POST",
        "/v1/chats/c/messages",
        r#"{"content":"x","colour":1}"#,
        400,
        "invalid_request",
        "`colour`",
    ),
    (
        "POST",
        "/v1/chats/c/messages",
        r#"{"content":""}"#,
        400,
        "invalid_request",
        "content",
    ),
    (
        "POST",
        "/v1/chats/c/messages",
        r#"{"content":"x","temperature":"hot"}"#,
        400,
        "invalid_request",
        "temperature",
    ),
    (
        "POST",
        "/v1/chats/bad!id/messages",
        r#"{"content":"x"}"#,
        400,
        "invalid_request",
        "chat_id",
    ),
    (
        "GET",
        "/v1/chats/c/messages?limit=0",
        "",
        400,
        "invalid_request",
        "limit",
    ),
    (
        "GET",
        "/v1/chats/c/messages?before=x",
        "",
        400,
        "invalid_request",
        "before",
    ),
    (
        "GET",
        "/v1/chats?limit=9999",
        "",
        400,
        "invalid_request",
        "limit",
    ),
    ("GET", "/v1/nothing", "", 404, "not_found", "/v1/nothing"),
    (
        "GET",
        "/v1/chats/missing/messages",
        "",
        404,
        "not_found",
        "missing",
    ),
    (
        "DELETE",
        "/v1/chats/missing",
        "",
        404,
        "not_found",
        "missing",
    ),
    (
        "PATCH",
        "/v1/chats/c/messages",
        "",
        405,
        "method_not_allowed",
        "GET, POST",
    ),
    ("POST", "/v1/chats", "", 405, "method_not_allowed", "GET"),
    (
        "GET",
        "/v1/chats?before=5",
        "",
        400,
        "invalid_request",
        "`before`",
    ),
    ("DELETE", "/healthz", "", 405, "method_not_allowed", "GET"),
];

#[test]
fn the_error_table_for_client_errors() {
    let work = Workdir::new();
    let server = work.serve("");
    for (method, path, body, status, kind, needle) in BAD_REQUESTS {
        let r = request(server.addr, method, path, Some(body), &[]);
        assert_eq!(r.status, *status, "{method} {path} {body}: {}", r.text());
        assert_eq!(r.error_type(), *kind, "{method} {path} {body}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{method} {path}: {message}");
        if *status == 405 {
            assert_eq!(r.header("Allow"), Some(*needle));
        }
    }
    let not_utf8 = [&b"POST /v1/chats/c/messages HTTP/1.1\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"[..], &[0xff, 0xfe, 0xfd]].concat();
    let r = raw(server.addr, &not_utf8);
    assert_eq!((r.status, r.error_type().as_str()), (400, "invalid_json"));
    // A form content type, as curl -d sends, is still read as JSON.
    let r = request(
        server.addr,
        "POST",
        "/v1/chats/c/messages",
        Some(r#"{"content":"x"}"#),
        &[("Content-Type", "application/x-www-form-urlencoded")],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn payload_too_large_with_and_without_content_length() {
    let work = Workdir::new();
    let server = work.serve("[server]\nmax_body_bytes = 100\n");
    let big = json!({ "content": "x".repeat(200) }).to_string();
    let r = post(server.addr, "/v1/chats/c/messages", &big);
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (413, "payload_too_large")
    );
    let chunked = format!(
        "POST /v1/chats/c/messages HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let r = raw(server.addr, chunked.as_bytes());
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (413, "payload_too_large")
    );
    assert_eq!(send(server.addr, "c", "small").status, 200);
}

#[test]
fn a_second_message_to_a_busy_chat_is_409() {
    let work = Workdir::new();
    let server = work.serve("[llm]\nmock_latency_ms = 1500\n");
    let addr = server.addr;
    let slow = std::thread::spawn(move || send(addr, "busy", "first"));
    assert!(eventually(Duration::from_secs(10), || get(addr, "/status")
        .json()["workers_busy"]
        == 1));
    let r = send(addr, "busy", "second");
    assert_eq!((r.status, r.error_type().as_str()), (409, "chat_busy"));
    assert!(r.header("Retry-After").is_some());
    assert_eq!(send(addr, "other", "fine").status, 200);
    assert_eq!(slow.join().unwrap().status, 200);
    // Free again once answered.
    assert_eq!(send(addr, "busy", "third").status, 200);
    let contents: Vec<_> = stored_messages(&work.db(), "busy")
        .into_iter()
        .map(|m| m.2)
        .collect();
    assert_eq!(
        contents,
        ["first", "You said: first", "third", "You said: third"]
    );
}

#[test]
fn deleting_a_chat_with_a_reply_in_flight_is_409_and_the_chat_stands_whole() {
    let work = Workdir::new();
    let server = work.serve("[llm]\nmock_latency_ms = 1500\n");
    let addr = server.addr;
    assert_eq!(send(addr, "c", "before").status, 200);
    let in_flight = [
        (
            "/v1/chats/c/messages",
            r#"{"content":"in flight"}"#.to_string(),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "front door"}]}).to_string(),
            Some("c"),
        ),
    ];
    for (path, body, chat_header) in in_flight {
        let slow = std::thread::spawn(move || {
            let header: Vec<(&str, &str)> =
                chat_header.map(|c| ("X-Chat-Id", c)).into_iter().collect();
            request(addr, "POST", path, Some(&body), &header)
        });
        assert!(eventually(Duration::from_secs(10), || get(addr, "/status")
            .json()["workers_busy"]
            == 1));
        let r = request(addr, "DELETE", "/v1/chats/c", None, &[]);
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (409, "chat_busy"),
            "{path}"
        );
        assert!(r.header("Retry-After").is_some());
        assert_eq!(slow.join().unwrap().status, 200, "{path}");
    }
    // The refused delete left the chat as it was plus both replies; a delete now wins.
    let contents: Vec<_> = stored_messages(&work.db(), "c")
        .into_iter()
        .map(|m| m.2)
        .collect();
    assert_eq!(
        contents,
        [
            "before",
            "You said: before",
            "in flight",
            "You said: in flight",
            "front door",
            "You said: front door"
        ]
    );
    assert_eq!(
        request(addr, "DELETE", "/v1/chats/c", None, &[]).status,
        204
    );
    assert!(stored_messages(&work.db(), "c").is_empty());
    assert_eq!(get(addr, "/v1/chats/c/messages").status, 404);
}

#[test]
fn an_idempotent_replay_returns_the_stored_reply_without_calling_the_llm() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("reply {n}")))));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let key = [("Idempotency-Key", "k-123")];
    let path = "/v1/chats/c/messages";
    let first = request(server.addr, "POST", path, Some(r#"{"content":"hi"}"#), &key).json();
    let again = request(server.addr, "POST", path, Some(r#"{"content":"hi"}"#), &key).json();
    assert_eq!(first["message_id"], again["message_id"]);
    assert_eq!(again["reply"], "reply 0");
    assert_eq!(again["usage"], first["usage"]);
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(stored_messages(&work.db(), "c").len(), 2);
    // The same key in another chat is another request.
    let other = request(
        server.addr,
        "POST",
        "/v1/chats/d/messages",
        Some(r#"{"content":"hi"}"#),
        &key,
    )
    .json();
    assert_eq!(other["reply"], "reply 1");
    // Keys live in the database, so a replay works after a restart.
    drop(server);
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let after = request(server.addr, "POST", path, Some(r#"{"content":"hi"}"#), &key).json();
    assert_eq!(after["message_id"], first["message_id"]);
    assert_eq!(upstream.seen().len(), 2);
    let bad = request(
        server.addr,
        "POST",
        path,
        Some(r#"{"content":"hi"}"#),
        &[("Idempotency-Key", "has space")],
    );
    assert_eq!(
        (bad.status, bad.error_type().as_str()),
        (400, "invalid_request")
    );
}

#[test]
fn a_broken_database_is_500_internal_without_details() {
    let work = Workdir::new();
    let server = work.spawn("");
    assert_eq!(send(server.addr, "c", "hi").status, 200);
    rusqlite::Connection::open(work.db())
        .unwrap()
        .execute_batch("DROP TABLE messages")
        .unwrap();
    let r = send(server.addr, "c", "again");
    assert_eq!((r.status, r.error_type().as_str()), (500, "internal"));
    assert!(!r.text().contains("messages"), "{}", r.text());
    let id = r.header("X-Request-Id").unwrap().to_string();
    assert!(
        server.log_shows(&format!("request_id={id} post_message failed")),
        "{}",
        server.log()
    );
}

#[test]
fn an_idempotency_key_reused_for_another_message_is_422() {
    let work = Workdir::new();
    let server = work.serve("");
    let post = |content: &str| {
        let body = serde_json::json!({ "content": content }).to_string();
        request(
            server.addr,
            "POST",
            "/v1/chats/c/messages",
            Some(&body),
            &[("Idempotency-Key", "k-1")],
        )
    };
    let first = post("hello");
    assert_eq!(first.status, 200);
    assert_eq!(
        post("hello").json()["message_id"],
        first.json()["message_id"]
    );
    let reused = post("something else");
    assert_eq!(
        (reused.status, reused.error_type().as_str()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(stored_messages(&work.db(), "c").len(), 2);
    // The front door's history-backed calls share the rule.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "other"}]}).to_string();
    let r = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        Some(&body),
        &[("X-Chat-Id", "c"), ("Idempotency-Key", "k-1")],
    );
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (422, "idempotency_key_reused")
    );
}
