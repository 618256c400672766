//! The OpenAI-compatible front door: shapes, history with X-Chat-Id, limits and errors.

use crate::support::*;
use serde_json::{json, Value};

const PATH: &str = "/v1/chat/completions";

fn body(stream: bool, content: &str) -> String {
    json!({
        "model": "anything",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

#[test]
fn a_stateless_relay_answers_in_openai_shape_and_stores_nothing() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "model = \"m-1\"\n"));
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&body(false, "hi")),
        &[("X-Request-Id", "r1")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c = r.json();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["id"], "chatcmpl-r1");
    assert_eq!(c["model"], "m-1");
    assert_eq!(
        c["choices"][0]["message"],
        json!({"role": "assistant", "content": "You said: hi"})
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert!(c["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(get(server.addr, "/v1/chats").json()["chats"], json!([]));

    let models = get(server.addr, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "m-1");
    assert_eq!(models["object"], "list");
    // The worker counts the request just after its response is out.
    let counted = r#"chatpool_requests_total{route="chat_completions",status="200"} 1"#;
    assert!(eventually(std::time::Duration::from_secs(5), || get(
        server.addr,
        "/metrics"
    )
    .text()
    .contains(counted)));
}

#[test]
fn a_streamed_relay_is_chunks_then_usage_then_done() {
    let mock = mock_llm(&["--reply-words", "4"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let mut events = EventReader::post(server.addr, PATH, &body(true, "hi"), &[]);
    assert_eq!(events.status, 200);
    let mut chunks = Vec::new();
    let mut done = false;
    while let Some((name, data)) = events.next_event() {
        assert_eq!(name, None);
        if data == "[DONE]" {
            done = true;
            assert!(events.next_event().is_none());
            break;
        }
        chunks.push(serde_json::from_str::<Value>(&data).unwrap());
    }
    assert!(done);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "You said: hi lorem ipsum lorem ipsum");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn x_chat_id_puts_the_stored_history_after_the_system_message_and_stores_the_turn() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("r{n}")))));
    let work = Workdir::new();
    let server = work.serve(&format!(
        "[history]\nsystem_prompt = \"SYS\"\n\n{}",
        openai_llm(upstream.addr, "")
    ));
    let chat = [("X-Chat-Id", "c1")];
    assert_eq!(
        request(
            server.addr,
            "POST",
            PATH,
            Some(&body(false, "first")),
            &chat
        )
        .status,
        200
    );
    let second = json!({"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "second"}]});
    let r = request(server.addr, "POST", PATH, Some(&second.to_string()), &chat);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "r1");
    let seen = upstream.seen();
    assert_eq!(
        seen[0].messages(),
        pairs(&[("system", "SYS"), ("user", "first")])
    );
    assert_eq!(
        seen[1].messages(),
        pairs(&[
            ("system", "be terse"),
            ("user", "first"),
            ("assistant", "r0"),
            ("user", "second")
        ])
    );
    let history = get(server.addr, "/v1/chats/c1/messages").json();
    let stored: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(stored, ["first", "r0", "second", "r1"]);
    // A stateless call in between stored nothing and saw no history.
    request(server.addr, "POST", PATH, Some(&body(false, "aside")), &[]);
    assert_eq!(upstream.seen()[2].messages(), pairs(&[("user", "aside")]));
    assert_eq!(
        get(server.addr, "/v1/chats/c1/messages").json()["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn x_chat_id_honours_idempotency_keys_and_chat_busy() {
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("r{n}")))));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let headers = [("X-Chat-Id", "c1"), ("Idempotency-Key", "k1")];
    let post = || {
        request(
            server.addr,
            "POST",
            PATH,
            Some(&body(false, "hi")),
            &headers,
        )
        .json()
    };
    let (first, again) = (post(), post());
    assert_eq!(
        first["choices"][0]["message"]["content"],
        again["choices"][0]["message"]["content"]
    );
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(stored_messages(&work.db(), "c1").len(), 2);
    let mut replay = EventReader::post(server.addr, PATH, &body(true, "hi"), &headers);
    let (_, first_chunk) = replay.next_event().unwrap();
    let first_chunk: Value = serde_json::from_str(&first_chunk).unwrap();
    assert_eq!(first_chunk["choices"][0]["delta"]["content"], "r0");
    assert_eq!(upstream.seen().len(), 1);

    let slow = Workdir::new();
    let server = slow.serve("[llm]\nmock_latency_ms = 1500\n");
    let addr = server.addr;
    let busy = std::thread::spawn(move || {
        request(
            addr,
            "POST",
            PATH,
            Some(&body(false, "a")),
            &[("X-Chat-Id", "b")],
        )
    });
    assert!(eventually(std::time::Duration::from_secs(10), || get(
        addr, "/status"
    )
    .json()["workers_busy"]
        == 1));
    let r = request(
        addr,
        "POST",
        PATH,
        Some(&body(false, "b")),
        &[("X-Chat-Id", "b")],
    );
    assert_eq!((r.status, r.error_type().as_str()), (409, "chat_busy"));
    assert_eq!(busy.join().unwrap().status, 200);
}

#[test]
fn bad_front_door_requests_get_the_contract_errors() {
    let work = Workdir::new();
    let server = work.serve("");
    let cases = [
        ("{}", 400, "invalid_request"),
        (
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#,
            400,
            "invalid_request",
        ),
        ("not json", 400, "invalid_json"),
    ];
    for (b, status, kind) in cases {
        let r = request(server.addr, "POST", PATH, Some(b), &[]);
        assert_eq!((r.status, r.error_type().as_str()), (status, kind), "{b}");
    }
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&body(false, "x")),
        &[("X-Chat-Id", "bad id")],
    );
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request")
    );
    let only_system = json!({"messages": [{"role": "system", "content": "x"}]}).to_string();
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&only_system),
        &[("X-Chat-Id", "c")],
    );
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request")
    );
    assert_eq!(request(server.addr, "GET", PATH, None, &[]).status, 405);
}

#[test]
fn the_routing_key_is_the_path_id_on_path_routes_and_one_x_chat_id_elsewhere() {
    let work = Workdir::new();
    let server = work.serve("");
    let two = [("X-Chat-Id", "c1"), ("X-Chat-Id", "c2")];
    let listed = [("X-Chat-Id", "c1,c2")];
    for headers in [&two[..], &listed[..]] {
        for (path, body) in [
            (PATH, body(false, "hi")),
            (
                "/v1/chats/c1/messages",
                json!({"content": "hi"}).to_string(),
            ),
        ] {
            let r = request(server.addr, "POST", path, Some(&body), headers);
            assert_eq!((r.status, r.error_type()), (400, "invalid_request".into()));
            let message = r.json()["error"]["message"].to_string();
            assert!(
                message.contains("X-Chat-Id"),
                "{path} {headers:?}: {message}"
            );
        }
    }
    assert!(stored_messages(&work.db(), "c1").is_empty());
    assert!(stored_messages(&work.db(), "c2").is_empty());
    // On a path route the path names the chat, whatever X-Chat-Id says.
    let r = request(
        server.addr,
        "POST",
        "/v1/chats/c1/messages",
        Some(r#"{"content":"hi"}"#),
        &[("X-Chat-Id", "elsewhere")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(stored_messages(&work.db(), "c1").len(), 2);
    assert!(stored_messages(&work.db(), "elsewhere").is_empty());
}

#[test]
fn an_error_object_in_the_stream_is_an_error_on_the_front_door_and_stores_nothing() {
    let after_two = format!(
        "{}{}{SSE_ERROR}data: [DONE]\n\n",
        sse_piece("Hel"),
        sse_piece("lo")
    );
    let before_any = format!("{SSE_ERROR}data: [DONE]\n\n");
    for (stream, pieces) in [(after_two, "Hello"), (before_any, "")] {
        let upstream = upstream_streaming(stream, completion("unused"));
        let work = Workdir::new();
        let server = work.serve(&openai_llm(upstream.addr, ""));
        for chat in [None, Some("c1")] {
            let headers: Vec<_> = chat.map(|c| ("X-Chat-Id", c)).into_iter().collect();
            let mut events = EventReader::post(server.addr, PATH, &body(true, "hi"), &headers);
            if pieces.is_empty() {
                assert_eq!(events.status, 502);
                let error: Value = serde_json::from_str(&events.body()).unwrap();
                assert_eq!(error["error"]["type"], "upstream_error");
                assert!(error.to_string().contains("reported an error"), "{error}");
                continue;
            }
            assert_eq!(events.status, 200);
            let mut text = String::new();
            let mut error = None;
            while let Some((name, data)) = events.next_event() {
                assert_eq!(name, None);
                assert_ne!(
                    data, "[DONE]",
                    "a failed stream must not end as a whole one"
                );
                let chunk: Value = serde_json::from_str(&data).unwrap();
                if chunk.get("error").is_some() {
                    error = Some(chunk);
                    continue;
                }
                assert_ne!(chunk["choices"][0]["finish_reason"], "stop");
                text.extend(chunk["choices"][0]["delta"]["content"].as_str());
            }
            assert_eq!(text, pieces);
            // The OpenAI SDKs raise an APIError for a data event holding `error`.
            let error = error.expect("an error event");
            assert_eq!(error["error"]["type"], "upstream_error");
            assert!(error.to_string().contains("reported an error"), "{error}");
        }
        assert!(stored_messages(&work.db(), "c1").is_empty());
    }
}

#[test]
fn the_upstreams_finish_reason_is_relayed_in_json_and_in_chunks() {
    let stream = format!("{}{}", sse_piece("cut sh"), sse_end("length"));
    let plain = completion("cut sh").replace("\"stop\"", "\"length\"");
    let upstream = upstream_streaming(stream, plain);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let r = request(server.addr, "POST", PATH, Some(&body(false, "hi")), &[]);
    assert_eq!(
        r.json()["choices"][0]["finish_reason"],
        "length",
        "{}",
        r.text()
    );
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&body(false, "hi")),
        &[("X-Chat-Id", "c")],
    );
    assert_eq!(
        r.json()["choices"][0]["finish_reason"],
        "length",
        "{}",
        r.text()
    );
    for chat in [None, Some("c")] {
        let headers: Vec<_> = chat.map(|c| ("X-Chat-Id", c)).into_iter().collect();
        let mut events = EventReader::post(server.addr, PATH, &body(true, "hi"), &headers);
        let (chunks, done) = openai_chunks(&mut events);
        assert!(done);
        let reasons: Vec<_> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(reasons, ["length"]);
        // One stream, one id, one `created`, one model.
        for field in ["id", "created", "model"] {
            assert!(
                chunks.iter().all(|c| c[field] == chunks[0][field]),
                "{field} differs: {chunks:?}"
            );
        }
    }
}

/// The request fields the front door does not interpret, each with a value that is not the
/// default, and how each must reach the upstream.
fn uninterpreted_fields() -> Vec<(&'static str, Value)> {
    vec![
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
        ),
        ("stop", json!(["\n\n", "END"])),
        ("seed", json!(42)),
        ("top_p", json!(0.25)),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(-0.5)),
        ("user", json!("end-user-7")),
        ("parallel_tool_calls", json!(false)),
    ]
}

#[test]
fn what_the_front_door_does_not_interpret_reaches_the_upstream_unchanged() {
    let upstream = FakeUpstream::start(Box::new(|_, _| (200, completion("ok"))));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let image =
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}});
    let user = json!({"role": "user", "name": "ann",
        "content": [{"type": "text", "text": "Describe"}, image, {"type": "text", "text": "this"}]});
    let mut request_body = json!({"model": "m", "messages": [user.clone()]});
    for (field, value) in uninterpreted_fields() {
        request_body[field] = value;
    }
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&request_body.to_string()),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &upstream.seen()[0].body;
    for (field, value) in uninterpreted_fields() {
        assert_eq!(seen[field], value, "{field}");
    }
    assert_eq!(
        seen["messages"],
        json!([user]),
        "name and image parts unchanged"
    );

    // With X-Chat-Id the fields go upstream too, and text parts are stored joined.
    let text_only = json!({"role": "user", "name": "ann",
        "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this"}]});
    request_body["messages"] = json!([text_only]);
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&request_body.to_string()),
        &[("X-Chat-Id", "c")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &upstream.seen()[1].body;
    for (field, value) in uninterpreted_fields() {
        assert_eq!(seen[field], value, "{field}");
    }
    assert_eq!(
        seen["messages"].as_array().unwrap().last().unwrap(),
        &text_only
    );
    assert_eq!(stored_messages(&work.db(), "c")[0].2, "Describe\nthis");
}

#[test]
fn what_the_front_door_cannot_relay_is_refused_naming_the_field() {
    let upstream = FakeUpstream::start(Box::new(|_, _| (200, completion("ok"))));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let refused = [
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
        ("tool_choice", json!("required")),
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        ("modalities", json!(["text", "audio"])),
    ];
    for (field, value) in refused {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}]});
        b[field] = value;
        let r = request(server.addr, "POST", PATH, Some(&b.to_string()), &[]);
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (400, "invalid_request"),
            "{field}"
        );
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&format!("`{field}`")),
            "{field}: {message}"
        );
    }
    // An image cannot be stored in a chat; an empty new turn is refused as the native API does.
    let image = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"},
        {"type": "image_url", "image_url": {"url": "data:x"}}]}]});
    let empty = json!({"messages": [{"role": "user", "content": ""}]});
    for (b, needle) in [
        (image, "messages[0].content[1]"),
        (empty, "must not be empty"),
    ] {
        let r = request(
            server.addr,
            "POST",
            PATH,
            Some(&b.to_string()),
            &[("X-Chat-Id", "c")],
        );
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (400, "invalid_request")
        );
        assert!(r.text().contains(needle), "{}", r.text());
    }
    // A stateless relay stores nothing to replay, so a key there is refused, not ignored.
    let r = request(
        server.addr,
        "POST",
        PATH,
        Some(&body(false, "x")),
        &[("Idempotency-Key", "k")],
    );
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request")
    );
    assert!(r.text().contains("Idempotency-Key"), "{}", r.text());
    assert!(upstream.seen().is_empty());
    assert!(stored_messages(&work.db(), "c").is_empty());
}
