//! Reading the bodies of the Responses and Conversations APIs: a new response, a new
//! conversation, new items. Pure functions over bytes.
//!
//! Every field OpenAI's SDK may send is either used, echoed back, or refused with a 400 naming
//! it (in `param` and in the message) when it asks for more than a text reply: tools,
//! reasoning, structured output, images and files are never dropped in silence.

use super::route::{checked_conversation_id, checked_response_id};
use crate::api::error::ApiError;
use crate::api::request::json_object;
use crate::llm::wire::Sampling;
use crate::validate::{max_tokens, temperature};
use serde_json::{json, Map, Value};

/// One message item of an input, as stored: its role and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputItem {
    /// `user`, `assistant`, `system` or `developer`.
    pub role: String,
    /// Its text parts, joined by a newline.
    pub text: String,
}

/// How much of the earlier conversation goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// The history window (`max_messages`, `max_chars`) applies.
    Auto,
    /// Everything goes; too much for the model is the client's 400. OpenAI's default.
    Disabled,
}

/// A validated `POST /v1/responses` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateResponse {
    /// The new input items, in order.
    pub input: Vec<InputItem>,
    /// The system message for this response only.
    pub instructions: Option<String>,
    /// The response this one continues.
    pub previous_response_id: Option<String>,
    /// The conversation this one is part of.
    pub conversation: Option<String>,
    /// Whether to keep it (default true).
    pub store: bool,
    /// Whether to answer with events.
    pub stream: bool,
    /// Passed to the LLM.
    pub sampling: Sampling,
    /// How much history goes upstream.
    pub truncation: Truncation,
    /// What the response object echoes: instructions, metadata, sampling, truncation.
    pub echo: Value,
}

fn param(param: &str, message: String) -> ApiError {
    ApiError::InvalidParam {
        param: param.to_string(),
        code: Some("invalid_value"),
        message,
    }
}

/// Parses and validates a new response.
pub fn parse_create(body: &[u8]) -> Result<CreateResponse, ApiError> {
    let object = json_object(body)?;
    let mut asked = CreateResponse {
        input: Vec::new(),
        instructions: None,
        previous_response_id: None,
        conversation: None,
        store: true,
        stream: false,
        sampling: Sampling::default(),
        truncation: Truncation::Disabled,
        echo: json!({"instructions": null, "metadata": {}, "temperature": null, "top_p": null,
                     "max_output_tokens": null, "truncation": "disabled", "user": null}),
    };
    let mut input = None;
    for (key, value) in object {
        read_field(&mut asked, &key, value, &mut input)?;
    }
    let input = input.ok_or_else(|| param("input", "missing field `input`".into()))?;
    asked.input = items(&input, "input")?;
    if asked.previous_response_id.is_some() && asked.conversation.is_some() {
        return Err(param(
            "conversation",
            "give previous_response_id or conversation, not both".into(),
        ));
    }
    Ok(asked)
}

fn read_field(
    asked: &mut CreateResponse,
    key: &str,
    value: Value,
    input: &mut Option<Value>,
) -> Result<(), ApiError> {
    let echo = |asked: &mut CreateResponse, value: Value| asked.echo[key] = value;
    match key {
        "input" => *input = Some(value),
        "model" if value.is_string() || value.is_null() => {}
        "stream" => asked.stream = flag(key, &value, false)?,
        "store" => asked.store = flag(key, &value, true)?,
        "instructions" => {
            asked.instructions = text_or_null(key, &value)?;
            echo(asked, value);
        }
        "previous_response_id" => {
            asked.previous_response_id = text_or_null(key, &value)?
                .map(|id| checked_response_id(&id, key))
                .transpose()?;
        }
        "conversation" => {
            let id = match &value {
                Value::Object(c) => c.get("id").cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            asked.conversation = text_or_null(key, &id)?
                .map(|id| checked_conversation_id(&id, key))
                .transpose()?;
        }
        "temperature" | "max_output_tokens" | "top_p" | "truncation" => {
            read_sampling(asked, key, value)?
        }
        "metadata" => echo(asked, metadata(&value)?),
        "user" | "safety_identifier" | "prompt_cache_key" => {
            text_or_null(key, &value)?;
            if key == "user" {
                echo(asked, value);
            }
        }
        // What asks for nothing beyond a text reply is taken; anything more is refused.
        "service_tier" | "stream_options" | "parallel_tool_calls" | "max_tool_calls" => {}
        _ if asks_for_text_only(key, &value) => {}
        _ => return Err(refusal(key)),
    }
    Ok(())
}

/// A field that goes to the LLM, or says how much history does; each is echoed back.
fn read_sampling(asked: &mut CreateResponse, key: &str, value: Value) -> Result<(), ApiError> {
    let echo = |asked: &mut CreateResponse, value: Value| asked.echo[key] = value;
    match key {
        "temperature" => {
            asked.sampling.temperature =
                temperature(&value).map_err(|e| param(key, e.to_string()))?;
            echo(asked, value);
        }
        "max_output_tokens" => {
            asked.sampling.max_tokens = max_tokens(&value).map_err(|_| {
                param(
                    key,
                    "max_output_tokens must be a whole number from 1 to 1000000".into(),
                )
            })?;
            echo(asked, value);
        }
        "top_p" => {
            if !value.is_null() {
                value
                    .as_f64()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| param(key, "top_p must be a number from 0 to 1".into()))?;
                asked.sampling.passthrough.insert(key.into(), value.clone());
            }
            echo(asked, value);
        }
        "truncation" => {
            asked.truncation = match value.as_str() {
                None if value.is_null() => Truncation::Disabled,
                Some("disabled") => Truncation::Disabled,
                Some("auto") => Truncation::Auto,
                _ => return Err(param(key, "truncation must be auto or disabled".into())),
            };
            let name = if asked.truncation == Truncation::Auto {
                "auto"
            } else {
                "disabled"
            };
            echo(asked, name.into());
        }
        _ => {}
    }
    Ok(())
}

/// Why a field is refused: one asking for more than a text reply, or one OpenAI's API lacks.
fn refusal(key: &str) -> ApiError {
    let message = match key {
        "tools" | "tool_choice" | "reasoning" | "text" | "include" | "background" | "prompt"
        | "top_logprobs" => format!(
            "`{key}` is not supported: chatpool answers with a text reply from a \
             chat-completions model"
        ),
        other => format!("unknown field `{other}`"),
    };
    param(key, message)
}

/// Whether a field OpenAI's SDK may send holds the value that asks for a plain text reply.
fn asks_for_text_only(key: &str, value: &Value) -> bool {
    match (key, value) {
        (
            "tools" | "tool_choice" | "reasoning" | "text" | "include" | "background" | "prompt",
            Value::Null,
        ) => true,
        ("tools" | "include", Value::Array(list)) => list.is_empty(),
        ("tool_choice", v) => v == "none" || v == "auto",
        ("reasoning", Value::Object(r)) => r.values().all(Value::is_null),
        ("text", Value::Object(t)) => t.iter().all(|(k, v)| {
            v.is_null() || (k == "format" && v["type"] == "text") || (k == "verbosity")
        }),
        ("background", Value::Bool(false)) => true,
        ("top_logprobs", v) => v.is_null() || v.as_u64() == Some(0),
        _ => false,
    }
}

fn flag(key: &str, value: &Value, default: bool) -> Result<bool, ApiError> {
    match value {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        _ => Err(param(key, format!("{key} must be true or false"))),
    }
}

fn text_or_null(key: &str, value: &Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(param(key, format!("{key} must be a string"))),
    }
}

/// OpenAI's metadata: at most 16 string values, keys up to 64 characters, values up to 512.
pub fn metadata(value: &Value) -> Result<Value, ApiError> {
    let map = match value {
        Value::Null => return Ok(json!({})),
        Value::Object(map) => map,
        _ => return Err(param("metadata", "metadata must be an object".into())),
    };
    let fits = map.len() <= 16
        && map.iter().all(|(k, v)| {
            k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512)
        });
    if !fits {
        return Err(param(
            "metadata",
            "metadata holds at most 16 string values, keys up to 64 characters and values up \
             to 512"
                .into(),
        ));
    }
    Ok(value.clone())
}

/// The input: a string (one user message) or a list of message items; `name` is the field
/// it came in (`input`, `items`), for errors.
pub fn items(value: &Value, name: &str) -> Result<Vec<InputItem>, ApiError> {
    let list = match value {
        Value::String(text) if !text.is_empty() => {
            return Ok(vec![InputItem {
                role: "user".into(),
                text: text.clone(),
            }])
        }
        Value::Array(list) if !list.is_empty() => list,
        Value::String(_) | Value::Array(_) => {
            return Err(param(name, format!("{name} must not be empty")))
        }
        _ => {
            return Err(param(
                name,
                format!("{name} must be a string or a list of message items"),
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, item)| message_item(item, &format!("{name}[{i}]")))
        .collect()
}

/// One message item: `{"role", "content"}`, with `"type": "message"` or none.
fn message_item(item: &Value, at: &str) -> Result<InputItem, ApiError> {
    let object = item
        .as_object()
        .ok_or_else(|| param(at, format!("{at} must be a message item (an object)")))?;
    match object.get("type") {
        None | Some(Value::Null) => {}
        Some(kind) if kind == "message" => {}
        Some(kind) => {
            return Err(param(
                &format!("{at}.type"),
                format!(
                    "{at}.type {kind} is not supported: chatpool takes message items with text"
                ),
            ))
        }
    }
    let role = match object.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant" | "system" | "developer")) => role,
        _ => {
            return Err(param(
                &format!("{at}.role"),
                format!("{at}.role must be user, assistant, system or developer"),
            ))
        }
    };
    known_fields(object, at)?;
    let text = content(object.get("content"), &format!("{at}.content"))?;
    Ok(InputItem {
        role: role.into(),
        text,
    })
}

fn known_fields(object: &Map<String, Value>, at: &str) -> Result<(), ApiError> {
    match object
        .keys()
        .find(|k| !matches!(k.as_str(), "type" | "role" | "content" | "id" | "status"))
    {
        Some(other) => Err(param(
            &format!("{at}.{other}"),
            format!("unknown field `{other}` in {at}"),
        )),
        None => Ok(()),
    }
}

/// A message's text: a string, or text parts joined by a newline; anything but text is refused.
fn content(value: Option<&Value>, at: &str) -> Result<String, ApiError> {
    let text = match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part["type"].as_str().unwrap_or_default();
                let text = part["text"].as_str();
                match (kind, text) {
                    ("input_text" | "output_text" | "text", Some(text)) => texts.push(text),
                    _ => {
                        return Err(param(
                            &format!("{at}[{j}]"),
                            format!(
                                "{at}[{j}] is not a text part (input_text or output_text); a \
                                 chat stores text only"
                            ),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
        _ => {
            return Err(param(
                at,
                format!("{at} must be a string or a list of text parts"),
            ))
        }
    };
    if text.is_empty() {
        return Err(param(at, format!("{at} must not be empty")));
    }
    Ok(text)
}

/// A validated `POST /v1/conversations` body: its first items and its metadata.
pub fn parse_new_conversation(body: &[u8]) -> Result<(Vec<InputItem>, Value), ApiError> {
    // The SDK sends `{}` when given nothing; an empty body means the same.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((Vec::new(), json!({})));
    }
    let object = json_object(body)?;
    let (mut items_given, mut metadata_given) = (Vec::new(), json!({}));
    for (key, value) in &object {
        match key.as_str() {
            "items" if value.is_null() => {}
            "items" => items_given = bounded(items(value, "items")?)?,
            "metadata" => metadata_given = metadata(value)?,
            other => return Err(param(other, format!("unknown field `{other}`"))),
        }
    }
    Ok((items_given, metadata_given))
}

/// A validated `POST /v1/conversations/{id}/items` body.
pub fn parse_new_items(body: &[u8]) -> Result<Vec<InputItem>, ApiError> {
    let object = json_object(body)?;
    if let Some(other) = object.keys().find(|k| *k != "items") {
        return Err(param(other, format!("unknown field `{other}`")));
    }
    let list = object
        .get("items")
        .ok_or_else(|| param("items", "missing field `items`".into()))?;
    if !list.is_array() {
        return Err(param(
            "items",
            "items must be a list of message items".into(),
        ));
    }
    bounded(items(list, "items")?)
}

/// At most 20 items at once, as OpenAI takes.
fn bounded(items: Vec<InputItem>) -> Result<Vec<InputItem>, ApiError> {
    if items.len() > 20 {
        return Err(param("items", "add at most 20 items at once".into()));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: Value) -> (String, String) {
        match parse_create(body.to_string().as_bytes()) {
            Err(ApiError::InvalidParam { param, message, .. }) => (param, message),
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn reads_what_the_sdk_sends() {
        let body = json!({"model": "m", "input": [
            {"role": "developer", "content": "be brief"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "there"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Yo", "annotations": []}]}],
            "instructions": "Talk like a pirate", "previous_response_id": "resp_abc",
            "store": false, "stream": true, "temperature": 0.5, "max_output_tokens": 9,
            "metadata": {"k": "v"}, "truncation": "auto", "tools": [], "tool_choice": "auto",
            "text": {"format": {"type": "text"}}, "parallel_tool_calls": true});
        let r = parse_create(body.to_string().as_bytes()).unwrap();
        let texts: Vec<_> = r
            .input
            .iter()
            .map(|i| (i.role.as_str(), i.text.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("developer", "be brief"),
                ("user", "Hi\nthere"),
                ("assistant", "Yo")
            ]
        );
        assert_eq!(r.instructions.as_deref(), Some("Talk like a pirate"));
        assert_eq!(r.previous_response_id.as_deref(), Some("resp_abc"));
        assert!(!r.store && r.stream);
        assert_eq!(
            (r.sampling.temperature, r.sampling.max_tokens),
            (Some(0.5), Some(9))
        );
        assert_eq!(r.truncation, Truncation::Auto);
        assert_eq!(r.echo["metadata"], json!({"k": "v"}));
        assert_eq!(r.echo["truncation"], "auto");
        let plain =
            parse_create(br#"{"model":"m","input":"Hello","conversation":{"id":"conv_1"}}"#)
                .unwrap();
        assert_eq!(
            plain.input,
            [InputItem {
                role: "user".into(),
                text: "Hello".into()
            }]
        );
        assert_eq!(plain.conversation.as_deref(), Some("conv_1"));
        assert!(plain.store && !plain.stream);
        assert_eq!(plain.truncation, Truncation::Disabled);
    }

    #[test]
    fn refuses_what_is_not_text_naming_the_field() {
        for (body, field) in [
            (json!({"model": "m"}), "input"),
            (json!({"input": ""}), "input"),
            (json!({"input": []}), "input"),
            (json!({"input": 5}), "input"),
            (
                json!({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"role": "tool", "content": "x"}]}),
                "input[0].role",
            ),
            (json!({"input": ["x"]}), "input[0]"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                {"type": "input_image", "image_url": "data:x"}]}]}),
                "input[0].content[1]",
            ),
            (
                json!({"input": [{"role": "user", "content": ""}]}),
                "input[0].content",
            ),
            (
                json!({"input": [{"role": "user", "content": "x", "name": "ann"}]}),
                "input[0].name",
            ),
            (
                json!({"input": "x", "previous_response_id": "chat-1"}),
                "previous_response_id",
            ),
            (
                json!({"input": "x", "previous_response_id": 5}),
                "previous_response_id",
            ),
            (
                json!({"input": "x", "conversation": "resp_1"}),
                "conversation",
            ),
            (
                json!({"input": "x", "conversation": "conv_1", "previous_response_id": "resp_1"}),
                "conversation",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema"}}}),
                "text",
            ),
            (json!({"input": "x", "temperature": 3}), "temperature"),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "truncation": "middle"}), "truncation"),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata"),
            (json!({"input": "x", "stream": "yes"}), "stream"),
            (json!({"input": "x", "frobnicate": 1}), "frobnicate"),
        ] {
            let (param, message) = refused(body.clone());
            assert_eq!(param, field, "{body}: {message}");
            assert!(
                message.contains(field.split('[').next().unwrap()),
                "{body}: {message}"
            );
        }
        assert!(matches!(
            parse_create(b"nope"),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn conversations_take_items_and_metadata() {
        let (items, metadata) = parse_new_conversation(
            br#"{"items":[{"type":"message","role":"user","content":"hi"}],"metadata":{"topic":"x"}}"#,
        )
        .unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(metadata, json!({"topic": "x"}));
        assert_eq!(
            parse_new_conversation(b"").unwrap(),
            (Vec::new(), json!({}))
        );
        assert_eq!(parse_new_conversation(b"{}").unwrap().0, []);
        assert!(parse_new_items(br#"{"items":[]}"#).is_err());
        assert!(parse_new_items(br#"{}"#).is_err());
        let many = json!({"items": vec![json!({"role": "user", "content": "x"}); 21]});
        assert!(parse_new_items(many.to_string().as_bytes()).is_err());
        assert_eq!(
            parse_new_items(br#"{"items":[{"role":"assistant","content":"ok"}]}"#).unwrap()[0].role,
            "assistant"
        );
    }
}
