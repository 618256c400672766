//! OpenAI's Responses and Conversations APIs over the wire: chains, streams, conversations,
//! storage, tenants, busy chats, idempotency, and malformed input.

use crate::support::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;

const ALICE: &str = "alice-secret-token";
const BOB: &str = "bob-secret-token";

/// An `[auth]` section with tenants alice and bob.
fn two_tenants() -> String {
    let entry = |tenant: &str, token: &str| {
        let digest: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{{ tenant = \"{tenant}\", sha256 = \"{digest}\" }}")
    };
    format!(
        "[auth]\ntokens = [{}, {}]\n",
        entry("alice", ALICE),
        entry("bob", BOB)
    )
}

/// A request as `token`'s tenant (none: auth off).
fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let body = body.map(|b| b.to_string());
    request(addr, method, path, body.as_deref(), &headers)
}

fn create(addr: SocketAddr, body: Value) -> Value {
    let r = call(addr, "POST", "/v1/responses", Some(body), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn output_text(response: &Value) -> &str {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
}

/// A fake upstream answering the n-th call with "reply n".
fn counting_upstream() -> FakeUpstream {
    FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("reply {n}")))))
}

fn count(db: &std::path::Path, table: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

const SYSTEM: &str = "[history]\nsystem_prompt = \"sys\"\n";

#[test]
fn a_response_is_stored_before_it_is_answered_and_read_back() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "model = \"m-1\"\n"));
    let r = create(
        server.addr,
        json!({"model": "x", "input": "Hello", "metadata": {"k": "v"}}),
    );
    let id = r["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"), "{r}");
    assert_eq!(
        (r["object"].as_str(), r["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert_eq!(output_text(&r), "You said: Hello");
    assert_eq!(r["metadata"], json!({"k": "v"}));
    assert!(r["usage"]["total_tokens"].as_u64().unwrap() > 0);
    for field in [
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "error",
        "incomplete_details",
    ] {
        assert!(r.get(field).is_some(), "{field}: {r}");
    }
    // A new response is a new chat named after it, committed before the 200.
    let stored: Vec<_> = stored_messages(&work.db(), id)
        .into_iter()
        .map(|(_, role, content)| (role, content))
        .collect();
    assert_eq!(
        stored,
        pairs(&[("user", "Hello"), ("assistant", "You said: Hello")])
    );
    let again = call(
        server.addr,
        "GET",
        &format!("/v1/responses/{id}"),
        None,
        None,
    )
    .json();
    assert_eq!(
        (again["id"].clone(), output_text(&again)),
        (json!(id), "You said: Hello")
    );
    assert_eq!(again["output"][0]["id"], r["output"][0]["id"]);
    let counted = r#"chatpool_requests_total{route="create_response",status="200"} 1"#;
    assert!(eventually(Duration::from_secs(5), || get(
        server.addr,
        "/metrics"
    )
    .text()
    .contains(counted)));
}

#[test]
fn a_chain_sends_its_earlier_turns_in_order_across_a_restart_and_forks_stay_apart() {
    let upstream = counting_upstream();
    let work = Workdir::new();
    let config = format!("{SYSTEM}{}", openai_llm(upstream.addr, ""));
    let server = work.serve(&config);
    let first = create(
        server.addr,
        json!({"input": "one", "instructions": "only for one"}),
    );
    let second = create(
        server.addr,
        json!({"input": "two", "previous_response_id": first["id"]}),
    );
    drop(server);
    let server = work.serve(&config);
    let third = create(
        server.addr,
        json!({"input": "three", "previous_response_id": second["id"]}),
    );
    assert_eq!(output_text(&third), "reply 2");
    assert_eq!(third["previous_response_id"], second["id"]);
    let fork = create(
        server.addr,
        json!({"input": "other", "previous_response_id": first["id"]}),
    );
    let seen: Vec<_> = upstream.seen().iter().map(Seen::messages).collect();
    assert_eq!(
        seen[0],
        pairs(&[("system", "only for one"), ("user", "one")])
    );
    assert_eq!(
        seen[2],
        pairs(&[
            ("system", "sys"),
            ("user", "one"),
            ("assistant", "reply 0"),
            ("user", "two"),
            ("assistant", "reply 1"),
            ("user", "three")
        ])
    );
    assert_eq!(
        seen[3],
        pairs(&[
            ("system", "sys"),
            ("user", "one"),
            ("assistant", "reply 0"),
            ("user", "other")
        ])
    );
    // One chat holds the chain: /v1/chats shows it whole.
    let chat = first["id"].as_str().unwrap();
    assert_eq!(stored_messages(&work.db(), chat).len(), 8);
    assert_eq!(fork["previous_response_id"], first["id"]);
}

#[test]
fn truncation_auto_keeps_the_history_window_and_disabled_makes_a_context_error_a_400() {
    let upstream = FakeUpstream::start(Box::new(|n, seen| {
        if n >= 2 && seen.messages().len() > 4 {
            let error = json!({"error": {"message": "maximum context length exceeded", "code": "context_length_exceeded"}});
            return (400, error.to_string());
        }
        (200, completion(&format!("reply {n}")))
    }));
    let work = Workdir::new();
    let server = work.serve(&format!(
        "[history]\nsystem_prompt = \"\"\nmax_messages = 2\n{}\nmax_retries = 0\n",
        openai_llm(upstream.addr, "")
    ));
    let first = create(server.addr, json!({"input": "one"}));
    let second = create(
        server.addr,
        json!({"input": "two", "previous_response_id": first["id"]}),
    );
    let auto = create(
        server.addr,
        json!({"input": "three", "previous_response_id": second["id"], "truncation": "auto"}),
    );
    assert_eq!(auto["truncation"], "auto");
    assert_eq!(
        upstream.seen()[2].messages(),
        pairs(&[("user", "two"), ("assistant", "reply 1"), ("user", "three")])
    );
    let body = json!({"input": "four", "previous_response_id": auto["id"]});
    let refused = call(server.addr, "POST", "/v1/responses", Some(body), None);
    assert_eq!(refused.status, 400, "{}", refused.text());
    let error = &refused.json()["error"];
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("invalid_request"), Some("context_length_exceeded"))
    );
    assert!(
        error["message"].as_str().unwrap().contains("truncation"),
        "{error}"
    );
    assert_eq!(upstream.seen()[3].messages().len(), 7);
}

/// The events of a streamed response, as (event name, data).
fn events(addr: SocketAddr, body: Value) -> Vec<(String, Value)> {
    let mut reader = EventReader::post(addr, "/v1/responses", &body.to_string(), &[]);
    assert_eq!(reader.status, 200);
    assert_eq!(reader.header("Content-Type"), Some("text/event-stream"));
    let mut all = Vec::new();
    while let Some((name, data)) = reader.next_event() {
        all.push((name.unwrap(), serde_json::from_str(&data).unwrap()));
    }
    all
}

#[test]
fn a_streamed_response_sends_the_events_the_sdk_checks_in_order_and_stores_the_reply() {
    let mock = mock_llm(&["--reply-words", "3"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let all = events(server.addr, json!({"input": "stream me", "stream": true}));
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = names.len() - 8;
    assert!(deltas > 1, "{names:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    let item_id = all[2].1["item"]["id"].clone();
    for (n, (name, data)) in all.iter().enumerate() {
        assert_eq!(
            (data["type"].as_str(), data["sequence_number"].as_u64()),
            (Some(name.as_str()), Some(n as u64))
        );
    }
    let text: String = all[4..4 + deltas]
        .iter()
        .map(|(_, d)| {
            assert_eq!(
                (
                    d["item_id"].clone(),
                    d["output_index"].clone(),
                    d["content_index"].clone(),
                    d["logprobs"].clone()
                ),
                (item_id.clone(), json!(0), json!(0), json!([]))
            );
            d["delta"].as_str().unwrap().to_string()
        })
        .collect();
    let completed = &all.last().unwrap().1["response"];
    assert_eq!(output_text(completed), text);
    assert!(text.starts_with("You said: stream me"), "{text}");
    assert_eq!(completed["output"][0]["id"], item_id);
    let id = completed["id"].as_str().unwrap();
    assert_eq!(all[0].1["response"]["id"], json!(id));
    assert_eq!(stored_messages(&work.db(), id).len(), 2);
}

#[test]
fn a_stream_that_fails_after_it_began_ends_with_response_failed_and_stores_nothing() {
    let upstream = upstream_streaming(format!("{}{SSE_ERROR}", sse_piece("Hel")), completion("x"));
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, "max_retries = 0\n"));
    let all = events(server.addr, json!({"input": "hi", "stream": true}));
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.last(), Some(&"response.failed"), "{names:?}");
    let failed = &all.last().unwrap().1["response"];
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"]["message"].as_str().is_some(), "{failed}");
    assert_eq!(count(&work.db(), "messages"), 0);
    assert_eq!(count(&work.db(), "responses"), 0);
}

#[test]
fn a_conversation_is_a_chat_whose_items_page_and_grow_with_responses() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&format!("{SYSTEM}{}", openai_llm(mock.addr, "")));
    let a = server.addr;
    let created = call(
        a,
        "POST",
        "/v1/conversations",
        Some(json!({"items": [{"role": "user", "content": "hello"}], "metadata": {"t": "1"}})),
        None,
    );
    assert_eq!(created.status, 200, "{}", created.text());
    let conversation = created.json();
    let id = conversation["id"].as_str().unwrap();
    assert_eq!(
        (
            conversation["object"].as_str(),
            conversation["metadata"].clone()
        ),
        (Some("conversation"), json!({"t": "1"}))
    );
    let items = format!("/v1/conversations/{id}/items");
    let added = call(a, "POST", &items, Some(json!({"items": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "how?"}]}]})), None).json();
    assert_eq!(added["object"], "list");
    assert_eq!(added["data"].as_array().unwrap().len(), 2);
    let page = call(a, "GET", &format!("{items}?limit=2&order=asc"), None, None).json();
    let texts = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["content"][0]["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        (texts(&page), page["has_more"].clone()),
        (vec!["hello".to_string(), "hi".into()], json!(true))
    );
    assert_eq!(page["first_id"], page["data"][0]["id"]);
    let after = page["last_id"].as_str().unwrap();
    let rest = call(
        a,
        "GET",
        &format!("{items}?limit=2&order=asc&after={after}"),
        None,
        None,
    )
    .json();
    assert_eq!(
        (texts(&rest), rest["has_more"].clone()),
        (vec!["how?".to_string()], json!(false))
    );
    let newest = call(a, "GET", &format!("{items}?limit=1"), None, None).json();
    assert_eq!(texts(&newest), ["how?"]);

    let reply = create(a, json!({"input": "fine", "conversation": id}));
    assert_eq!(reply["conversation"], json!({ "id": id }));
    let chat = get(a, &format!("/v1/chats/{id}/messages")).json();
    let history: Vec<_> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        history,
        [
            ("user", "hello"),
            ("assistant", "hi"),
            ("user", "how?"),
            ("user", "fine"),
            ("assistant", "You said: fine")
        ]
    );

    let hi = page["data"][1]["id"].as_str().unwrap();
    let item = call(a, "GET", &format!("{items}/{hi}"), None, None).json();
    assert_eq!(
        (item["role"].as_str(), item["content"][0]["type"].as_str()),
        (Some("assistant"), Some("output_text"))
    );
    assert_eq!(
        call(a, "DELETE", &format!("{items}/{hi}"), None, None).json()["id"],
        json!(id)
    );
    assert_eq!(
        call(a, "GET", &format!("{items}/{hi}"), None, None).status,
        404
    );
    let deleted = call(a, "DELETE", &format!("/v1/conversations/{id}"), None, None).json();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    assert_eq!(
        call(a, "GET", &format!("/v1/conversations/{id}"), None, None).status,
        404
    );
    assert_eq!(get(a, &format!("/v1/chats/{id}/messages")).status, 404);
    assert_eq!(count(&work.db(), "responses"), 0);
}

#[test]
fn deleted_unstored_and_foreign_responses_are_previous_response_not_found() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&format!("{}{}", two_tenants(), openai_llm(mock.addr, "")));
    let a = server.addr;
    let new = |input: &str, extra: Value, token: &str| {
        let mut body = json!({ "input": input });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        call(a, "POST", "/v1/responses", Some(body), Some(token))
    };
    let kept = new("kept", json!({}), ALICE).json();
    let unstored = new("gone", json!({"store": false}), ALICE).json();
    let deleted = new("deleted", json!({}), ALICE).json();
    let path = |r: &Value| format!("/v1/responses/{}", r["id"].as_str().unwrap());
    assert_eq!(
        call(a, "DELETE", &path(&deleted), None, Some(ALICE)).json()["deleted"],
        true
    );
    assert_eq!(
        call(a, "DELETE", &path(&deleted), None, Some(ALICE)).status,
        404
    );
    for (previous, token) in [(&unstored, ALICE), (&deleted, ALICE), (&kept, BOB)] {
        let r = new(
            "next",
            json!({"previous_response_id": previous["id"]}),
            token,
        );
        assert_eq!(r.status, 400, "{}", r.text());
        let error = &r.json()["error"];
        assert_eq!(
            (error["code"].as_str(), error["param"].as_str()),
            (
                Some("previous_response_not_found"),
                Some("previous_response_id")
            )
        );
        assert_eq!(
            (error["type"].as_str(), error["request_id"].as_str()),
            (Some("invalid_request"), r.header("X-Request-Id"))
        );
    }
    // Bob can neither read, list nor delete Alice's response, and Alice still can.
    for (method, suffix) in [("GET", ""), ("GET", "/input_items"), ("DELETE", "")] {
        let r = call(
            a,
            method,
            &format!("{}{suffix}", path(&kept)),
            None,
            Some(BOB),
        );
        assert_eq!(r.status, 404, "{method} {suffix}");
    }
    assert_eq!(
        output_text(&call(a, "GET", &path(&kept), None, Some(ALICE)).json()),
        "You said: kept"
    );
    assert_eq!(
        call(a, "GET", &path(&unstored), None, Some(ALICE)).status,
        404
    );
}

#[test]
fn another_tenants_conversation_is_not_found_for_every_verb() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&format!("{}{}", two_tenants(), openai_llm(mock.addr, "")));
    let a = server.addr;
    let created = call(
        a,
        "POST",
        "/v1/conversations",
        Some(json!({"items": [{"role": "user", "content": "mine"}]})),
        Some(ALICE),
    )
    .json();
    let id = created["id"].as_str().unwrap();
    let item = call(
        a,
        "GET",
        &format!("/v1/conversations/{id}/items"),
        None,
        Some(ALICE),
    )
    .json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = json!({"items": [{"role": "user", "content": "x"}]});
    for (method, path, body) in [
        ("GET", format!("/v1/conversations/{id}"), None),
        ("GET", format!("/v1/conversations/{id}/items"), None),
        ("POST", format!("/v1/conversations/{id}/items"), Some(body)),
        ("GET", format!("/v1/conversations/{id}/items/{item}"), None),
        (
            "DELETE",
            format!("/v1/conversations/{id}/items/{item}"),
            None,
        ),
        (
            "POST",
            "/v1/responses".to_string(),
            Some(json!({"input": "x", "conversation": id})),
        ),
        ("DELETE", format!("/v1/conversations/{id}"), None),
    ] {
        let r = call(a, method, &path, body, Some(BOB));
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
    }
    let items = call(
        a,
        "GET",
        &format!("/v1/conversations/{id}/items"),
        None,
        Some(ALICE),
    )
    .json();
    assert_eq!(items["data"].as_array().unwrap().len(), 1);
}

#[test]
fn store_false_leaves_nothing_in_the_database() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let r = create(server.addr, json!({"input": "secret", "store": false}));
    assert_eq!(
        (output_text(&r), r["store"].clone()),
        ("You said: secret", json!(false))
    );
    let streamed = events(
        server.addr,
        json!({"input": "secret", "store": false, "stream": true}),
    );
    assert_eq!(streamed.last().unwrap().0, "response.completed");
    for table in ["messages", "chats", "responses", "conversations"] {
        assert_eq!(count(&work.db(), table), 0, "{table}");
    }
}

#[test]
fn an_idempotency_key_replays_the_stored_response_and_refuses_another_body() {
    let upstream = counting_upstream();
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let body = json!({"input": "once"}).to_string();
    let send = |body: &str| {
        request(
            server.addr,
            "POST",
            "/v1/responses",
            Some(body),
            &[("Idempotency-Key", "k-1")],
        )
    };
    let first = send(&body).json();
    let again = send(&body).json();
    assert_eq!(
        (again["id"].clone(), output_text(&again)),
        (first["id"].clone(), "reply 0")
    );
    assert_eq!(upstream.seen().len(), 1);
    let other = send(&json!({"input": "twice"}).to_string());
    assert_eq!(
        (other.status, other.error_type()),
        (422, "idempotency_key_reused".to_string())
    );
    let unstored = send(&json!({"input": "x", "store": false}).to_string());
    assert_eq!(
        (unstored.status, unstored.json()["error"]["param"].clone()),
        (400, json!("store"))
    );
    assert_eq!(count(&work.db(), "responses"), 1);
}

#[test]
fn an_idempotency_key_where_nothing_replays_it_is_refused_and_adds_nothing() {
    let mock = mock_llm(&[]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, ""));
    let key = [("Idempotency-Key", "k-1")];
    let body = json!({"items": [{"role": "user", "content": "x"}]}).to_string();
    let created = request(server.addr, "POST", "/v1/conversations", Some(&body), &key);
    assert_eq!(
        (created.status, created.error_type()),
        (400, "invalid_request".to_string())
    );
    assert!(created.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
    assert_eq!(count(&work.db(), "conversations"), 0);
}

#[test]
fn a_responses_tokens_count_against_its_tenants_daily_budget() {
    let upstream = FakeUpstream::replying("fine");
    let work = Workdir::new();
    let config = format!(
        "{}[limits]\ntokens_per_day = 5\n",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    create(server.addr, json!({"input": "one", "store": false}));
    let total = &get(server.addr, "/v1/usage").json()["data"][0];
    assert_eq!(
        (total["requests"].as_u64(), total["total_tokens"].as_u64()),
        (Some(1), Some(9))
    );
    let refused = call(
        server.addr,
        "POST",
        "/v1/responses",
        Some(json!({"input": "two"})),
        None,
    );
    assert_eq!(
        (refused.status, refused.error_type()),
        (429, "rate_limited".to_string())
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[test]
fn a_chain_or_conversation_with_a_turn_in_flight_is_chat_busy() {
    let mock = mock_llm(&["--latency-ms", "3000"]);
    let work = Workdir::new();
    let server = work.serve(&openai_llm(mock.addr, "request_timeout_ms = 20000\n"));
    let a = server.addr;
    let conversation = call(a, "POST", "/v1/conversations", None, None).json();
    let id = conversation["id"].as_str().unwrap().to_string();
    let body = json!({"input": "slow", "conversation": id});
    let slow = std::thread::spawn(move || call(a, "POST", "/v1/responses", Some(body), None));
    let completions = || {
        get(mock.addr, "/stats").json()["completions"]
            .as_u64()
            .unwrap()
    };
    assert!(eventually(Duration::from_secs(10), || completions() == 1));
    let busy = call(
        a,
        "POST",
        "/v1/responses",
        Some(json!({"input": "x", "conversation": id})),
        None,
    );
    assert_eq!(
        (busy.status, busy.error_type()),
        (409, "chat_busy".to_string())
    );
    assert!(busy.header("Retry-After").is_some());
    let items = call(
        a,
        "POST",
        &format!("/v1/conversations/{id}/items"),
        Some(json!({"items": [{"role": "user", "content": "x"}]})),
        None,
    );
    assert_eq!(items.status, 409);
    assert_eq!(slow.join().unwrap().status, 200);
    assert_eq!(completions(), 1);
    assert_eq!(stored_messages(&work.db(), &id).len(), 2);
}

#[test]
fn malformed_input_is_a_400_naming_the_field_and_stores_nothing() {
    let upstream = counting_upstream();
    let work = Workdir::new();
    let server = work.serve(&openai_llm(upstream.addr, ""));
    let a = server.addr;
    let image = json!([{"role": "user", "content": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "data:x"}]}]);
    for (body, field) in [
        (
            json!({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}),
            "input[0].type",
        ),
        (
            json!({"input": [{"role": "user", "content": "ok"}, {"type": "reasoning", "summary": []}]}),
            "input[1].type",
        ),
        (json!({"input": image}), "input[0].content[1]"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "input[0].content[0]",
        ),
        (
            json!({"input": "x", "previous_response_id": "chat-1"}),
            "previous_response_id",
        ),
        (json!({"input": "x", "conversation": "c1"}), "conversation"),
        (
            json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}),
            "tools",
        ),
        (json!({"input": "x", "colour": "blue"}), "colour"),
        (json!({"model": "m"}), "input"),
    ] {
        let r = call(a, "POST", "/v1/responses", Some(body.clone()), None);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(
            (error["type"].as_str(), error["param"].as_str()),
            (Some("invalid_request"), Some(field)),
            "{body}"
        );
        let named = field.split('[').next().unwrap();
        assert!(
            error["message"].as_str().unwrap().contains(named),
            "{error}"
        );
    }
    let conversation = call(
        a,
        "POST",
        "/v1/conversations",
        Some(json!({"items": [{"type": "item_reference", "id": "msg_1"}]})),
        None,
    );
    assert_eq!(
        (
            conversation.status,
            conversation.json()["error"]["param"].clone()
        ),
        (400, json!("items[0].type"))
    );
    for path in [
        "/v1/responses/chat-1",
        "/v1/conversations/resp_1/items",
        "/v1/conversations/conv_1/items/42",
    ] {
        let r = get(a, path);
        assert_eq!(r.status, 400, "{path}");
        let param = r.json()["error"]["param"].as_str().unwrap().to_string();
        assert!(
            ["response_id", "conversation_id", "item_id"].contains(&param.as_str()),
            "{path}: {param}"
        );
    }
    assert!(upstream.seen().is_empty());
    for table in ["messages", "chats", "responses", "conversations"] {
        assert_eq!(count(&work.db(), table), 0, "{table}");
    }
}
