//! Bearer tokens and tenant isolation.

use crate::support::*;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::Duration;

/// Runs `chatpool token NAME`; returns the token and the config entry it printed.
fn new_token(name: &str) -> (String, String) {
    let out = Command::new(BIN).args(["token", name]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().next().unwrap().to_string();
    let entry = text.lines().last().unwrap().to_string();
    (token, entry)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn the_token_command_prints_a_token_and_the_entry_that_hashes_it() {
    let (token, entry) = new_token("alice");
    assert!(token.len() >= 43, "{token}");
    let digest: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        entry,
        format!("{{ tenant = \"alice\", sha256 = \"{digest}\" }}")
    );
    assert_ne!(new_token("alice").0, token);
    let bad = Command::new(BIN)
        .args(["token", "no/slash"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn missing_malformed_and_wrong_tokens_are_401() {
    let (token, entry) = new_token("alice");
    let work = Workdir::new();
    let server = work.spawn(&format!("[auth]\ntokens = [{entry}]\n"));
    let path = "/v1/chats/c/messages";
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("Authorization", "Basic YWxpY2U6eA==")],
        &[("Authorization", "Bearer")],
        &[("Authorization", "Bearer cp_not-the-token")],
    ];
    for headers in cases {
        let r = request(server.addr, "GET", path, None, headers);
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (401, "unauthorized"),
            "{headers:?}"
        );
        assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
    }
    let ok = request(
        server.addr,
        "POST",
        path,
        Some(r#"{"content":"hi"}"#),
        &[("Authorization", &bearer(&token))],
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Operations endpoints need no token.
    assert_eq!(get(server.addr, "/healthz").status, 200);
    assert_eq!(get(server.addr, "/metrics").status, 200);
    assert!(!server.log().contains(&token), "a token reached the log");
}

#[test]
fn a_storm_of_401s_and_404s_is_summarised_in_the_log_not_a_line_each() {
    let (_, entry) = new_token("alice");
    let work = Workdir::new();
    let server = work.spawn(&format!("[auth]\ntokens = [{entry}]\n"));
    let wrong = [("Authorization", "Bearer cp_not-the-token")];
    for _ in 0..100 {
        let r = request(server.addr, "GET", "/v1/chats", None, &wrong);
        assert_eq!(r.status, 401);
        assert_eq!(get(server.addr, "/v1/no-such-route").status, 404);
    }
    let summed = |kind: &str| -> u64 {
        let marker = format!("{kind} ");
        server
            .log()
            .lines()
            .filter(|line| line.contains("refused ") && line.contains(" requests in "))
            .filter_map(|line| line.split(&marker).nth(1))
            .filter_map(|rest| rest.split([',', ')']).next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(5), || summed("unauthorized") == 100
            && summed("not_found") == 100),
        "{}",
        server.log()
    );
    let log = server.log();
    assert!(!log.contains(" 401 ") && !log.contains(" 404 "), "{log}");
    assert!(log.lines().count() < 30, "{log}");
}

#[test]
fn a_tenant_cannot_see_or_touch_another_tenants_chat() {
    let (token_a, entry_a) = new_token("alice");
    let (token_b, entry_b) = new_token("bob");
    let upstream = FakeUpstream::start(Box::new(|n, _| (200, completion(&format!("reply {n}")))));
    let work = Workdir::new();
    let config = format!(
        "[auth]\ntokens = [{entry_a}, {entry_b}]\n\n{}",
        openai_llm(upstream.addr, "")
    );
    let server = work.serve(&config);
    let (a, b) = (bearer(&token_a), bearer(&token_b));
    let as_a = [("Authorization", a.as_str())];
    let as_b = [("Authorization", b.as_str())];
    let as_b_keyed = [("Authorization", b.as_str()), ("Idempotency-Key", "k1")];
    let as_a_keyed = [("Authorization", a.as_str()), ("Idempotency-Key", "k1")];
    let messages = "/v1/chats/shared/messages";

    let r = request(
        server.addr,
        "POST",
        messages,
        Some(r#"{"content":"bob's secret"}"#),
        &as_b_keyed,
    );
    assert_eq!(r.status, 200);
    let bob_reply_id = r.json()["message_id"].clone();
    let before = request(server.addr, "GET", messages, None, &as_b).body;

    assert_eq!(
        request(server.addr, "GET", messages, None, &as_a).status,
        404
    );
    assert_eq!(
        request(server.addr, "DELETE", "/v1/chats/shared", None, &as_a).status,
        404
    );
    let listed = request(server.addr, "GET", "/v1/chats", None, &as_a).json();
    assert_eq!(listed["chats"].as_array().unwrap().len(), 0);
    // Posting to the same chat id with bob's idempotency key is alice's own chat and her own call.
    let r = request(
        server.addr,
        "POST",
        messages,
        Some(r#"{"content":"alice here"}"#),
        &as_a_keyed,
    );
    assert_eq!(r.status, 200);
    assert_ne!(r.json()["message_id"], bob_reply_id);
    assert_eq!(r.json()["reply"], "reply 1");
    let alice_history = request(server.addr, "GET", messages, None, &as_a).json();
    let contents: Vec<_> = alice_history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(contents, ["alice here", "reply 1"]);
    // The upstream never saw bob's words in alice's prompt.
    assert!(!upstream.seen()[1].body.to_string().contains("bob's secret"));

    // The OpenAI front door with X-Chat-Id: alice's "shared" is still her own chat.
    let front_door =
        serde_json::json!({"messages": [{"role": "user", "content": "via sdk"}]}).to_string();
    let as_a_chat = [("Authorization", a.as_str()), ("X-Chat-Id", "shared")];
    let r = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        Some(&front_door),
        &as_a_chat,
    );
    assert_eq!(r.status, 200);
    let last = upstream.seen().pop().unwrap();
    assert!(
        !last.body.to_string().contains("bob's secret"),
        "alice's prompt held bob's history"
    );
    assert!(last.body.to_string().contains("alice here"));

    let after = request(server.addr, "GET", messages, None, &as_b).body;
    assert_eq!(before, after, "bob's history changed");
    let bob_chats = request(server.addr, "GET", "/v1/chats", None, &as_b).json();
    assert_eq!(bob_chats["chats"].as_array().unwrap().len(), 1);
    assert_eq!(bob_chats["chats"][0]["message_count"], 2);
    // Alice deleting her chat leaves bob's.
    assert_eq!(
        request(server.addr, "DELETE", "/v1/chats/shared", None, &as_a).status,
        204
    );
    assert_eq!(
        request(server.addr, "GET", messages, None, &as_b).body,
        before
    );
}

#[test]
fn a_database_from_before_auth_keeps_its_chats_under_the_default_tenant() {
    let work = Workdir::new();
    {
        let conn = rusqlite::Connection::open(work.db()).unwrap();
        conn.execute_batch(
            "CREATE TABLE chats (chat_id TEXT PRIMARY KEY NOT NULL, created_at TEXT NOT NULL,
                 updated_at TEXT NOT NULL, message_count INTEGER NOT NULL, last_message_id INTEGER NOT NULL);
             CREATE INDEX chats_by_recency ON chats(last_message_id);
             CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, chat_id TEXT NOT NULL,
                 role TEXT NOT NULL, content TEXT NOT NULL, created_at TEXT NOT NULL, model TEXT,
                 prompt_tokens INTEGER, completion_tokens INTEGER, idempotency_key TEXT);
             CREATE INDEX messages_by_chat ON messages(chat_id, id);
             CREATE UNIQUE INDEX messages_by_idempotency_key ON messages(chat_id, idempotency_key)
                 WHERE idempotency_key IS NOT NULL;
             INSERT INTO messages (chat_id, role, content, created_at) VALUES
                 ('old', 'user', 'q', '2026-01-01T00:00:00Z'), ('old', 'assistant', 'a', '2026-01-01T00:00:00Z');
             INSERT INTO chats VALUES ('old', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', 2, 2);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let server = work.serve("");
    let history = get(server.addr, "/v1/chats/old/messages").json();
    assert_eq!(history["messages"].as_array().unwrap().len(), 2);
    assert_eq!(history["messages"][0]["content"], "q");
    assert_eq!(send(server.addr, "old", "more").json()["message_id"], 4);
}

#[test]
fn the_scheme_is_any_case_a_tab_may_follow_it_and_two_headers_are_refused() {
    let (token, entry) = new_token("alice");
    let (other, other_entry) = new_token("bob");
    let work = Workdir::new();
    let server = work.serve(&format!("[auth]\ntokens = [{entry}, {other_entry}]\n"));
    for scheme in ["BEARER", "bearer", "bEaReR"] {
        let r = request(
            server.addr,
            "GET",
            "/v1/chats",
            None,
            &[("Authorization", &format!("{scheme} {token}"))],
        );
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
    let tab = format!("Bearer\t{token}");
    let r = request(
        server.addr,
        "GET",
        "/v1/chats",
        None,
        &[("Authorization", &tab)],
    );
    assert_eq!(r.status, 200, "tab: {}", r.text());
    // Two headers: neither wins, whichever comes first.
    for pair in [
        [bearer(&token), bearer(&other)],
        [bearer(&other), bearer(&token)],
    ] {
        let headers = [
            ("Authorization", pair[0].as_str()),
            ("Authorization", pair[1].as_str()),
        ];
        let r = request(server.addr, "GET", "/v1/chats", None, &headers);
        assert_eq!((r.status, r.error_type().as_str()), (401, "unauthorized"));
        assert!(
            r.text().contains("one Authorization header"),
            "{}",
            r.text()
        );
    }
}
