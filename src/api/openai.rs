//! OpenAI's Chat Completions shapes for the front door: reading a request, writing a
//! `chat.completion` or its `chat.completion.chunk` stream. Pure functions over values.
//!
//! The front door is a relay: what it does not interpret (`stop`, `seed`, `response_format`,
//! `top_p`, a message's `name`, image parts ...) goes upstream unchanged, and what it cannot
//! relay back faithfully (tool calls, several choices, log probabilities, audio) is refused
//! with a 400 naming the field, never silently dropped. `model` is taken as a wish: the
//! answer always comes from the configured model, and says which one that was.

use super::error::ApiError;
use crate::llm::wire::{join_text_parts, ChatMessage, Sampling, Usage};
use crate::validate::{max_tokens, temperature};
use serde_json::{json, Map, Value};

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionsRequest {
    /// The conversation as the client sent it.
    pub messages: Vec<ChatMessage>,
    /// Whether to answer with `chat.completion.chunk` events.
    pub stream: bool,
    /// Whether a streamed answer ends with a usage chunk.
    pub include_usage: bool,
    /// Passed to the LLM, with every field chatpool does not interpret.
    pub sampling: Sampling,
}

impl CompletionsRequest {
    /// The last user message, as a chat stores it: the new turn of a history-backed call.
    /// Refused when there is none, when it is empty (as the native API refuses it), or when
    /// it holds parts a chat cannot store.
    pub fn new_turn(&self) -> Result<&str, ApiError> {
        let (index, message) = self
            .messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| m.role == "user")
            .ok_or_else(|| {
                ApiError::invalid("with X-Chat-Id, messages must hold a user message: the new turn")
            })?;
        let parts = message
            .verbatim
            .as_ref()
            .and_then(|m| m.get("content"))
            .and_then(Value::as_array);
        if let Some(j) = parts
            .into_iter()
            .flatten()
            .position(|p| p["type"] != "text")
        {
            return Err(ApiError::invalid(format!(
                "messages[{index}].content[{j}] is not a text part; a chat stores text only, \
                 so send it without X-Chat-Id"
            )));
        }
        if message.content.is_empty() {
            return Err(ApiError::invalid(format!(
                "messages[{index}].content must not be empty"
            )));
        }
        Ok(&message.content)
    }
}

/// Fields whose answer chatpool could not relay, with the reason, unless they hold the value
/// that asks for nothing more than a text reply.
const NOT_RELAYED: [(&str, &str); 9] = [
    ("tools", "tool calls"),
    ("tool_choice", "tool calls"),
    ("functions", "tool calls"),
    ("function_call", "tool calls"),
    ("n", "more than one choice"),
    ("logprobs", "log probabilities"),
    ("top_logprobs", "log probabilities"),
    ("audio", "audio"),
    ("modalities", "audio"),
];

/// Whether a field of [`NOT_RELAYED`] asks for nothing beyond a text reply.
fn asks_for_text_only(field: &str, value: &Value) -> bool {
    match (field, value) {
        (_, Value::Null) => true,
        ("n", v) => v.as_u64() == Some(1),
        ("logprobs", Value::Bool(false)) => true,
        ("modalities", Value::Array(m)) => m.iter().all(|m| m == "text"),
        ("tools" | "functions", Value::Array(list)) => list.is_empty(),
        ("tool_choice", v) => v == "none",
        _ => false,
    }
}

/// Parses and validates an OpenAI chat completions body.
pub fn parse_request(body: &[u8]) -> Result<CompletionsRequest, ApiError> {
    let object = super::request::json_object(body)?;
    let mut request = CompletionsRequest {
        messages: Vec::new(),
        stream: false,
        include_usage: false,
        sampling: Sampling::default(),
    };
    let mut messages = None;
    for (key, value) in object {
        match key.as_str() {
            "messages" => messages = Some(value),
            "model" => {}
            "stream" => {
                request.stream = match value {
                    Value::Null => false,
                    Value::Bool(b) => b,
                    _ => return Err(ApiError::invalid("stream must be true or false")),
                }
            }
            "stream_options" => {
                request.include_usage = value["include_usage"].as_bool().unwrap_or(false)
            }
            "temperature" => request.sampling.temperature = temperature(&value)?,
            "max_tokens" | "max_completion_tokens" => {
                if let Some(n) = max_tokens(&value)? {
                    request.sampling.max_tokens = Some(n);
                }
            }
            field => {
                if let Some((_, what)) = NOT_RELAYED.iter().find(|(f, _)| *f == field) {
                    if !asks_for_text_only(field, &value) {
                        return Err(ApiError::invalid(format!(
                            "`{field}` is not supported: it asks for {what}, and chatpool \
                             relays only a text reply"
                        )));
                    }
                } else {
                    request.sampling.passthrough.insert(key, value);
                }
            }
        }
    }
    let messages = messages.ok_or_else(|| ApiError::invalid("missing field `messages`"))?;
    let messages = messages
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages must be an array"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    request.messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect::<Result<_, _>>()?;
    Ok(request)
}

/// One message: its role (OpenAI's `developer` as `system`, which every upstream knows) and
/// text; anything else it carries (`name`, image parts) is kept to go upstream unchanged.
fn parse_message(index: usize, message: &Value) -> Result<ChatMessage, ApiError> {
    let object = message
        .as_object()
        .ok_or_else(|| ApiError::invalid(format!("messages[{index}] must be an object")))?;
    let role = object
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(format!("messages[{index}].role must be a string")))?;
    let role = match role {
        "system" | "developer" => "system",
        "user" | "assistant" => role,
        other => {
            return Err(ApiError::invalid(format!(
                "messages[{index}].role `{other}` is not supported; use system, user or assistant"
            )))
        }
    };
    let (content, plain) = match object.get("content") {
        Some(Value::String(text)) => (text.clone(), true),
        Some(Value::Array(parts)) => (join_text_parts(parts), false),
        _ => {
            return Err(ApiError::invalid(format!(
                "messages[{index}].content must be a string or a list of parts"
            )))
        }
    };
    let mut message = ChatMessage::new(role, &content);
    if !plain || object.len() > 2 || object["role"] != role {
        let mut verbatim: Map<String, Value> = object.clone();
        verbatim.insert("role".into(), role.into());
        message.verbatim = Some(verbatim);
    }
    Ok(message)
}

/// Seconds since the epoch, for `created`.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A `chat.completion` object.
pub fn completion(
    id: &str,
    model: &str,
    content: &str,
    usage: Option<Usage>,
    finish_reason: &str,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": usage,
    })
}

/// What every `chat.completion.chunk` of one streamed answer shares: its id, its `created`
/// and its model stay the same from the first chunk to the last, as OpenAI's do.
#[derive(Debug, Clone)]
pub struct Chunks {
    id: String,
    created: u64,
    model: String,
}

impl Chunks {
    /// The chunks of the answer `id`, created at `created` (seconds since the epoch).
    pub fn new(id: &str, created: u64, model: &str) -> Chunks {
        Chunks {
            id: id.into(),
            created,
            model: model.into(),
        }
    }

    /// A chunk carrying one piece of the reply (the first also names the role).
    pub fn delta(&self, piece: &str, first: bool) -> Value {
        let delta = if first {
            json!({"role": "assistant", "content": piece})
        } else {
            json!({"content": piece})
        };
        self.chunk(
            json!([{"index": 0, "delta": delta, "finish_reason": null}]),
            None,
        )
    }

    /// The chunk that ends the reply, with the upstream's reason.
    pub fn finish(&self, finish_reason: &str) -> Value {
        self.chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": finish_reason}]),
            None,
        )
    }

    /// The chunk with usage that OpenAI sends last when `stream_options.include_usage` is set.
    pub fn usage(&self, usage: Option<Usage>) -> Value {
        self.chunk(json!([]), Some(usage))
    }

    fn chunk(&self, choices: Value, usage: Option<Option<Usage>>) -> Value {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = json!(usage);
        }
        chunk
    }
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
            {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":7,"n":1,"user":"x"}"#;
        let r = parse_request(body).unwrap();
        let texts: Vec<_> = r
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(texts, [("system", "be brief"), ("user", "Hi\nthere")]);
        assert_eq!(r.messages[0].verbatim.as_ref().unwrap()["role"], "system");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.sampling.max_tokens, Some(7));
        assert_eq!(r.new_turn().unwrap(), "Hi\nthere");
        assert_eq!(Value::Object(r.sampling.passthrough), json!({"user": "x"}));
    }

    #[test]
    fn passes_on_what_it_does_not_interpret() {
        let body = json!({"messages": [{"role": "user", "content": "x", "name": "ann"}],
            "stop": ["\n"], "seed": 3, "top_p": 0.5, "presence_penalty": 0.1,
            "response_format": {"type": "json_object"}, "logprobs": false, "tool_choice": "none"});
        let r = parse_request(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            Value::Object(r.sampling.passthrough),
            json!({"stop": ["\n"], "seed": 3, "top_p": 0.5, "presence_penalty": 0.1,
                   "response_format": {"type": "json_object"}})
        );
        assert_eq!(
            serde_json::to_value(&r.messages[0]).unwrap(),
            json!({"role": "user", "content": "x", "name": "ann"})
        );
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
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                "`n`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "`tools`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
                "`tool_choice`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                "`logprobs`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
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
    fn a_new_turn_is_a_non_empty_text_user_message() {
        let turn = |messages: Value| {
            parse_request(json!({ "messages": messages }).to_string().as_bytes())
                .unwrap()
                .new_turn()
                .map(str::to_string)
                .map_err(|e| e.to_string())
        };
        assert!(turn(json!([{"role": "user", "content": ""}]))
            .unwrap_err()
            .contains("must not be empty"));
        assert!(turn(json!([{"role": "system", "content": "s"}]))
            .unwrap_err()
            .contains("user message"));
        let image = json!([{"role": "user", "content": [{"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "data:x"}}]}]);
        assert!(turn(image).unwrap_err().contains("messages[0].content[1]"));
    }

    #[test]
    fn chunks_have_openai_shapes_and_share_id_created_and_model() {
        let chunks = Chunks::new("id", 42, "m");
        let first = chunks.delta("He", true);
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": "He"})
        );
        assert_eq!(first["object"], "chat.completion.chunk");
        let finish = chunks.finish("length");
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage = chunks.usage(Some(Usage::new(1, 2)));
        assert_eq!(usage["usage"]["total_tokens"], 3);
        assert_eq!(usage["choices"], json!([]));
        assert!(finish.get("usage").is_none());
        for c in [&first, &finish, &usage] {
            assert_eq!(
                (&c["id"], &c["created"], &c["model"]),
                (&json!("id"), &json!(42), &json!("m"))
            );
        }
    }
}
