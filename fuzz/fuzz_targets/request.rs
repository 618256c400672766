//! From a request line and body to the command a worker would run: routing (path, query,
//! `X-Chat-Id`) and both body parsers. Input: `METHOD URL [X-Chat-Id]`, a newline, the body.

#![no_main]

use chatpool::api::{self, ApiError, Route, Target};
use libfuzzer_sys::fuzz_target;

/// Every refusal must be a client error with the contract's body, whatever the input.
fn check(error: &ApiError) {
    let (status, kind) = error.status_and_type();
    assert!((400..500).contains(&status), "{status} {kind} for a bad request");
    let body = error.body("fuzz");
    assert_eq!(body["error"]["type"], kind);
    assert!(!error.to_string().is_empty());
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let mut parts = head.splitn(3, ' ');
    let method: tiny_http::Method = parts
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(tiny_http::Method::Get);
    let url = parts.next().unwrap_or("/");
    let chats: Vec<&str> = parts.next().into_iter().collect();
    match api::route(&method, url, &chats) {
        Ok(Target::Api(Route::PostMessage { chat_id })) => {
            assert!(chatpool::validate::chat_id(&chat_id, "chat_id").is_ok(), "{chat_id:?}");
        }
        Ok(_) => {}
        Err(e) => check(&e),
    }
    match api::request::parse_send_message(body) {
        Ok(message) => assert!(!message.content.is_empty()),
        Err(e) => check(&e),
    }
    if let Err(e) = api::openai::parse_request(body) {
        check(&e);
    }
});
