//! The OpenAI Chat Completions wire format: what chatpool sends upstream and how it reads the
//! answer. Kept free of I/O so the parser is tested (and fuzzed) on plain bytes.

use serde::{Deserialize, Serialize};

/// One message of a conversation, as OpenAI's API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Token counts as the LLM reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens in the reply.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage from its two parts. The counts come from the upstream, so their sum saturates
    /// rather than overflow.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Optional sampling settings passed through from the client.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sampling {
    /// OpenAI's `temperature`.
    pub temperature: Option<f64>,
    /// OpenAI's `max_tokens`.
    pub max_tokens: Option<u64>,
}

/// The body of `POST /chat/completions`.
#[derive(Debug, Serialize)]
pub struct CompletionRequest<'a> {
    /// The model name.
    pub model: &'a str,
    /// The conversation.
    pub messages: &'a [ChatMessage],
    /// Passed through when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Passed through when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Asks for server-sent events.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// With `stream`, asks for usage in the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

/// OpenAI's `stream_options`.
#[derive(Debug, Serialize)]
pub struct StreamOptions {
    /// Whether the stream ends with a chunk carrying usage.
    pub include_usage: bool,
}

/// What one `data:` line of a streamed completion carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    /// The next piece of the reply, if any.
    pub delta: Option<String>,
    /// The model, as the upstream names it.
    pub model: Option<String>,
    /// Usage, usually only in the last chunk.
    pub usage: Option<Usage>,
    /// Set on the chunk that ends the reply.
    pub finished: bool,
}

#[derive(Deserialize)]
struct ChunkBody {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: ChunkDelta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct ChunkDelta {
    content: Option<String>,
}

/// One line of an upstream event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamLine {
    /// A `data:` line with a chunk.
    Chunk(Chunk),
    /// `data: [DONE]`.
    Done,
    /// A blank line, a comment, or a field chatpool does not use.
    Other,
}

/// Reads one line of a `chat.completion.chunk` event stream.
pub fn parse_stream_line(line: &str) -> Result<StreamLine, String> {
    let Some(data) = line.trim_end_matches(['\r', '\n']).strip_prefix("data:") else {
        return Ok(StreamLine::Other);
    };
    let data = data.trim_start();
    if data == "[DONE]" {
        return Ok(StreamLine::Done);
    }
    let body: ChunkBody = serde_json::from_str(data)
        .map_err(|e| format!("the LLM streamed something that is not a completion chunk: {e}"))?;
    let choice = body.choices.into_iter().next();
    Ok(StreamLine::Chunk(Chunk {
        finished: choice.as_ref().is_some_and(|c| c.finish_reason.is_some()),
        delta: choice
            .and_then(|c| c.delta.content)
            .filter(|d| !d.is_empty()),
        model: body.model,
        usage: body.usage,
    }))
}

/// The LLM's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The reply text.
    pub content: String,
    /// The model that answered, as the upstream names it.
    pub model: String,
    /// Token counts, when given.
    pub usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ResponseBody {
    model: Option<String>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
}

#[derive(Deserialize)]
struct ResponseMessage {
    content: Option<String>,
}

/// Reads a `chat.completion` body; the error says what was wrong with it.
pub fn parse_completion(body: &[u8], requested_model: &str) -> Result<Completion, String> {
    let parsed: ResponseBody = serde_json::from_slice(body)
        .map_err(|e| format!("the LLM's answer is not a chat completion: {e}"))?;
    let choice = parsed
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| "the LLM's answer has no choices".to_string())?;
    let content = choice
        .message
        .content
        .ok_or_else(|| "the LLM's answer has no message content".to_string())?;
    Ok(Completion {
        content,
        model: parsed.model.unwrap_or_else(|| requested_model.to_string()),
        usage: parsed.usage,
    })
}

/// The `error.message` of an OpenAI-style error body, or the start of the body, for a person.
pub fn error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorInner,
    }
    #[derive(Deserialize)]
    struct ErrorInner {
        message: String,
    }
    let text = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.error.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_huge_counts_saturates_instead_of_overflowing() {
        let usage = Usage::new(u64::MAX - 1, 5);
        assert_eq!(usage.total_tokens, u64::MAX);
        assert_eq!(Usage::new(u64::MAX, u64::MAX).total_tokens, u64::MAX);
        assert_eq!(Usage::new(7, 2).total_tokens, 9);
    }

    #[test]
    fn parses_a_completion_with_and_without_usage() {
        let body = br#"{"id":"x","object":"chat.completion","model":"m-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        let c = parse_completion(body, "m").unwrap();
        assert_eq!(
            c,
            Completion {
                content: "Hi".into(),
                model: "m-1".into(),
                usage: Some(Usage::new(5, 1))
            }
        );
        let c = parse_completion(br#"{"choices":[{"message":{"content":"x"}}]}"#, "m").unwrap();
        assert_eq!((c.model.as_str(), c.usage), ("m", None));
    }

    #[test]
    fn nonsense_is_an_error_that_says_so() {
        assert!(parse_completion(b"<html>", "m")
            .unwrap_err()
            .contains("not a chat completion"));
        assert!(parse_completion(br#"{"choices":[]}"#, "m")
            .unwrap_err()
            .contains("no choices"));
        assert!(
            parse_completion(br#"{"choices":[{"message":{"content":null}}]}"#, "m")
                .unwrap_err()
                .contains("no message content")
        );
    }

    #[test]
    fn error_detail_prefers_the_openai_message() {
        assert_eq!(
            error_detail(br#"{"error":{"message":"Rate limit\nreached"}}"#),
            "Rate limit reached"
        );
        assert_eq!(error_detail(b"Bad Gateway"), "Bad Gateway");
        assert_eq!(error_detail(&[b'x'; 300]).chars().count(), 201);
    }

    #[test]
    fn reads_stream_lines() {
        let line = r#"data: {"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        let StreamLine::Chunk(c) = parse_stream_line(line).unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.delta.as_deref(), c.model.as_deref(), c.finished),
            (Some("Hel"), Some("m"), false)
        );
        let last = r#"data: {"choices":[{"delta":{},"finish_reason":"stop"}]}"#;
        let StreamLine::Chunk(c) = parse_stream_line(last).unwrap() else {
            panic!()
        };
        assert_eq!((c.delta, c.finished), (None, true));
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let StreamLine::Chunk(c) = parse_stream_line(usage).unwrap() else {
            panic!()
        };
        assert_eq!(c.usage, Some(Usage::new(1, 2)));
        assert_eq!(
            parse_stream_line("data: [DONE]\r\n").unwrap(),
            StreamLine::Done
        );
        assert_eq!(
            parse_stream_line(": keep-alive").unwrap(),
            StreamLine::Other
        );
        assert_eq!(parse_stream_line("").unwrap(), StreamLine::Other);
        assert!(parse_stream_line("data: {nope").is_err());
    }

    #[test]
    fn request_omits_unset_sampling() {
        let messages = [ChatMessage::new("user", "hi")];
        let req = CompletionRequest {
            model: "m",
            messages: &messages,
            temperature: None,
            max_tokens: Some(5),
            stream: false,
            stream_options: None,
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#
        );
    }
}
