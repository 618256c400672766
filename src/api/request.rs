//! Reading a request: its body within the size limit, its JSON, and the headers the API uses.
//! Everything past the body read is pure, so validation is tested (and fuzzed) on bytes.

use super::error::ApiError;
use crate::llm::wire::Sampling;
use crate::validate::{max_tokens, temperature};
use serde_json::Value;
use std::io::Read;

/// A validated `POST /v1/chats/{chat_id}/messages` body.
#[derive(Debug, Clone, PartialEq)]
pub struct SendMessage {
    /// The user's message, non-empty.
    pub content: String,
    /// Whether the client asked for server-sent events.
    pub stream: bool,
    /// Passed to the LLM.
    pub sampling: Sampling,
}

/// Reads the whole body. Its connection's thread read it already, within `max_body_bytes`
/// (a longer one is refused by the acceptor), so this only copies it out of the request.
pub fn read_body(reader: &mut dyn Read) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    reader
        .read_to_end(&mut body)
        .map_err(|e| ApiError::invalid(format!("could not read the request body: {e}")))?;
    Ok(body)
}

/// Parses and validates a send-message body.
pub fn parse_send_message(body: &[u8]) -> Result<SendMessage, ApiError> {
    let object = json_object(body)?;
    let mut message = SendMessage {
        content: String::new(),
        stream: false,
        sampling: Sampling::default(),
    };
    let mut content = None;
    for (key, value) in &object {
        match key.as_str() {
            "content" => match value.as_str() {
                Some("") => return Err(ApiError::invalid("content must not be empty")),
                Some(text) => content = Some(text.to_string()),
                None => return Err(ApiError::invalid("content must be a string")),
            },
            "stream" => match value {
                Value::Bool(b) => message.stream = *b,
                Value::Null => {}
                _ => return Err(ApiError::invalid("stream must be true or false")),
            },
            "temperature" => message.sampling.temperature = temperature(value)?,
            "max_tokens" => message.sampling.max_tokens = max_tokens(value)?,
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown field `{other}`; expected content, stream, temperature or max_tokens"
                )))
            }
        }
    }
    message.content = content.ok_or_else(|| ApiError::invalid("missing field `content`"))?;
    Ok(message)
}

/// The body as a JSON object, or the `invalid_json`/`invalid_request` error that says why not.
pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson(
            "the request body is empty; send a JSON object such as {\"content\": \"Hello\"}".into(),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::InvalidJson(format!("the request body is not valid UTF-8: {e}")))?;
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
        Err(e) => Err(ApiError::InvalidJson(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Whether a client-supplied `X-Request-Id` or `Idempotency-Key` is sane: 1 to 128 visible
/// ASCII characters, so it is safe in logs and JSON as it stands.
pub fn is_sane_token(value: &str) -> bool {
    (1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic())
}

/// The `Idempotency-Key` header, validated.
pub fn idempotency_key(value: Option<&str>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(key) if is_sane_token(key) => Ok(Some(key.to_string())),
        Some(_) => Err(ApiError::invalid(
            "Idempotency-Key must be 1 to 128 visible ASCII characters",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> (u16, &'static str, String) {
        let e = parse_send_message(body.as_bytes()).unwrap_err();
        let (status, kind) = e.status_and_type();
        (status, kind, e.to_string())
    }

    #[test]
    fn accepts_a_full_body() {
        let m = parse_send_message(
            br#"{"content":"hi","stream":false,"temperature":0.5,"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(m.content, "hi");
        assert_eq!(
            m.sampling,
            Sampling {
                temperature: Some(0.5),
                max_tokens: Some(9),
                passthrough: Default::default(),
            }
        );
        assert!(!m.stream);
    }

    #[test]
    fn malformed_bodies_are_invalid_json() {
        for body in ["", "  ", "{", "{\"content\": \"x\"", "nope"] {
            assert_eq!(error_of(body).1, "invalid_json", "{body:?}");
        }
        let e = parse_send_message(&[b'"', 0xff, b'"']).unwrap_err();
        assert_eq!(e.status_and_type().1, "invalid_json");
    }

    #[test]
    fn wrong_shapes_are_invalid_request_naming_the_field() {
        let cases = [
            ("[]", "JSON object"),
            ("\"x\"", "JSON object"),
            ("{}", "missing field `content`"),
            (r#"{"content":""}"#, "content must not be empty"),
            (r#"{"content":5}"#, "content must be a string"),
            (r#"{"content":"x","stream":"yes"}"#, "stream"),
            (r#"{"content":"x","temperature":3}"#, "temperature"),
            (r#"{"content":"x","max_tokens":0}"#, "max_tokens"),
            (r#"{"content":"x","max_tokens":1.5}"#, "max_tokens"),
            (r#"{"content":"x","role":"user"}"#, "unknown field `role`"),
        ];
        for (body, needle) in cases {
            let (status, kind, message) = error_of(body);
            assert_eq!((status, kind), (400, "invalid_request"), "{body}");
            assert!(message.contains(needle), "{body}: {message}");
        }
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert_eq!(
            idempotency_key(Some("k-1")).unwrap().as_deref(),
            Some("k-1")
        );
        assert_eq!(idempotency_key(None).unwrap(), None);
        assert!(idempotency_key(Some("")).is_err());
        assert!(idempotency_key(Some("has space")).is_err());
        assert!(idempotency_key(Some(&"k".repeat(129))).is_err());
    }
}
