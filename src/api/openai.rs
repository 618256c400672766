//! OpenAI's Chat Completions shapes for the front door: reading a request, writing a
//! `chat.completion` or its `chat.completion.chunk` stream. Pure functions over values.
//!
//! The front door is permissive where OpenAI's SDKs are chatty: fields chatpool has no use for
//! (`n`, `top_p`, `user`, `tools` ...) are accepted and ignored, and `model` is taken as a wish:
//! the answer always comes from the configured model, and says which one that was.

use super::error::ApiError;
use crate::llm::wire::{ChatMessage, Sampling, Usage};
use serde_json::{json, Value};

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionsRequest {
    /// The conversation as the client sent it.
    pub messages: Vec<ChatMessage>,
    /// Whether to answer with `chat.completion.chunk` events.
    pub stream: bool,
    /// Whether a streamed answer ends with a usage chunk.
    pub include_usage: bool,
    /// Passed to the LLM.
    pub sampling: Sampling,
}

impl CompletionsRequest {
    /// The text of the last user message: what a history-backed chat stores as the new turn.
    pub fn last_user_message(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
    }
}

fn invalid(message: String) -> ApiError {
    ApiError::InvalidRequest(message)
}

/// Parses and validates an OpenAI chat completions body.
pub fn parse_request(body: &[u8]) -> Result<CompletionsRequest, ApiError> {
    let object = super::request::json_object(body)?;
    let messages = object
        .get("messages")
        .ok_or_else(|| invalid("missing field `messages`".into()))?
        .as_array()
        .ok_or_else(|| invalid("messages must be an array".into()))?;
    if messages.is_empty() {
        return Err(invalid("messages must not be empty".into()));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream must be true or false".into())),
    };
    let include_usage = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let temperature = match object.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| (0.0..=2.0).contains(t))
                .ok_or_else(|| invalid("temperature must be a number from 0 to 2".into()))?,
        ),
    };
    let max_tokens = match object
        .get("max_completion_tokens")
        .or_else(|| object.get("max_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid("max_tokens must be a positive whole number".into()))?,
        ),
    };
    Ok(CompletionsRequest {
        messages,
        stream,
        include_usage,
        sampling: Sampling {
            temperature,
            max_tokens,
        },
    })
}

fn parse_message(index: usize, message: &Value) -> Result<ChatMessage, ApiError> {
    let role = message["role"]
        .as_str()
        .ok_or_else(|| invalid(format!("messages[{index}].role must be a string")))?;
    let role = match role {
        "system" | "developer" => "system",
        "user" | "assistant" => role,
        other => {
            return Err(invalid(format!(
                "messages[{index}].role `{other}` is not supported; use system, user or assistant"
            )))
        }
    };
    let content = match &message["content"] {
        Value::String(text) => text.clone(),
        // The newer form: a list of parts, of which chatpool reads the text ones.
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => {
            return Err(invalid(format!(
                "messages[{index}].content must be a string or a list of text parts"
            )))
        }
    };
    Ok(ChatMessage::new(role, &content))
}

/// Seconds since the epoch, for `created`.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A `chat.completion` object.
pub fn completion(id: &str, model: &str, content: &str, usage: Option<Usage>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": usage,
    })
}

/// A `chat.completion.chunk` carrying one piece of the reply (the first also names the role).
pub fn delta_chunk(id: &str, model: &str, piece: &str, first: bool) -> Value {
    let delta = if first {
        json!({"role": "assistant", "content": piece})
    } else {
        json!({"content": piece})
    };
    chunk(
        id,
        model,
        json!([{"index": 0, "delta": delta, "finish_reason": null}]),
        None,
    )
}

/// The chunk that ends the reply.
pub fn finish_chunk(id: &str, model: &str) -> Value {
    chunk(
        id,
        model,
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        None,
    )
}

/// The chunk with usage that OpenAI sends last when `stream_options.include_usage` is set.
pub fn usage_chunk(id: &str, model: &str, usage: Option<Usage>) -> Value {
    chunk(id, model, json!([]), Some(usage))
}

fn chunk(id: &str, model: &str, choices: Value, usage: Option<Option<Usage>>) -> Value {
    let mut chunk = json!({
        "id": id, "object": "chat.completion.chunk", "created": now_secs(), "model": model, "choices": choices,
    });
    if let Some(usage) = usage {
        chunk["usage"] = json!(usage);
    }
    chunk
}

/// `GET /v1/models`: the one configured model.
pub fn models(model: &str) -> Value {
    json!({"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "chatpool"}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_sdk_sends() {
        let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":7,"n":1,"user":"x"}"#;
        let r = parse_request(body).unwrap();
        assert_eq!(
            r.messages,
            [
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "Hi there")
            ]
        );
        assert!(r.stream && r.include_usage);
        assert_eq!(r.sampling.max_tokens, Some(7));
        assert_eq!(r.last_user_message(), Some("Hi there"));
    }

    #[test]
    fn refuses_what_it_cannot_relay() {
        for (body, needle) in [
            (r#"{"model":"m"}"#, "missing field `messages`"),
            (r#"{"messages":[]}"#, "must not be empty"),
            (r#"{"messages":[{"role":"tool","content":"x"}]}"#, "`tool`"),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":9}"#,
                "temperature",
            ),
        ] {
            let e = parse_request(body.as_bytes()).unwrap_err();
            assert_eq!(e.status_and_type().1, "invalid_request", "{body}");
            assert!(e.to_string().contains(needle), "{body}: {e}");
        }
        assert_eq!(
            parse_request(b"nope").unwrap_err().status_and_type().1,
            "invalid_json"
        );
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let first = delta_chunk("id", "m", "He", true);
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": "He"})
        );
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(
            finish_chunk("id", "m")["choices"][0]["finish_reason"],
            "stop"
        );
        let usage = usage_chunk("id", "m", Some(Usage::new(1, 2)));
        assert_eq!(usage["usage"]["total_tokens"], 3);
        assert_eq!(usage["choices"], json!([]));
        assert!(finish_chunk("id", "m").get("usage").is_none());
    }
}
