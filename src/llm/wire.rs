//! The OpenAI Chat Completions wire format: what chatpool sends upstream and how it reads the
//! answer, plain or streamed. Kept free of sockets so the parsers are tested (and fuzzed) on
//! plain bytes.
//!
//! Reading is strict about what makes a reply a reply: a body or stream that carries an
//! `error` object, tool calls or a refusal, or a stream that ends without a finish reason, is
//! a failure, never a (partial or empty) reply. The reply text is capped at
//! [`MAX_REPLY_BYTES`] whichever way it came, so the cap does not depend on framing.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;
use std::io::{self, BufRead};

/// The longest reply text chatpool takes from the LLM, streamed or not.
pub const MAX_REPLY_BYTES: usize = 8 << 20;

/// The longest non-streamed body: a reply at the cap, even if every character of it came
/// `\u`-escaped, plus the envelope.
pub const MAX_BODY_BYTES: u64 = 4 * MAX_REPLY_BYTES as u64 + (64 << 10);

/// The longest event (or line) of a stream: one piece at most the whole reply, plus framing.
const MAX_EVENT_BYTES: usize = MAX_REPLY_BYTES + (64 << 10);

/// One message of a conversation, as OpenAI's API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text; text parts joined by a newline.
    #[serde(deserialize_with = "text_of")]
    pub content: String,
    /// The message as a client wrote it (`name`, image parts ...), sent upstream in place of
    /// `role` and `content` so a relay passes on what it does not interpret.
    #[serde(skip)]
    pub verbatim: Option<Map<String, Value>>,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            verbatim: None,
        }
    }
}

impl Serialize for ChatMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Plain<'a> {
            role: &'a str,
            content: &'a str,
        }
        match &self.verbatim {
            Some(message) => message.serialize(serializer),
            None => Plain {
                role: &self.role,
                content: &self.content,
            }
            .serialize(serializer),
        }
    }
}

/// The text of a message's `content`: a string, or a list of parts whose text parts are joined
/// by a newline (so `"Describe"` and `"this"` do not run together).
pub fn join_text_parts(parts: &[Value]) -> String {
    parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn text_of<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(text) => Ok(text),
        Value::Array(parts) => Ok(join_text_parts(&parts)),
        Value::Null => Ok(String::new()),
        _ => Err(serde::de::Error::custom(
            "content must be a string or a list of parts",
        )),
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

/// Settings that go upstream beside the messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// OpenAI's `temperature`.
    pub temperature: Option<f64>,
    /// OpenAI's `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Fields of a client's request that chatpool does not interpret (`stop`, `seed`,
    /// `response_format` ...), passed on unchanged. Never one of the fields chatpool sets.
    pub passthrough: Map<String, Value>,
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
    /// The client's fields that chatpool does not interpret.
    #[serde(flatten)]
    pub passthrough: &'a Map<String, Value>,
}

/// OpenAI's `stream_options`.
#[derive(Debug, Serialize)]
pub struct StreamOptions {
    /// Whether the stream ends with a chunk carrying usage.
    pub include_usage: bool,
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
    /// Why the reply ended, as the upstream said: `stop`, `length`, `content_filter` ...
    pub finish_reason: String,
}

/// Why an answer from the LLM is not a reply chatpool can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// The LLM reported an error (an `error` object, or an `event: error`).
    Error(String),
    /// Not a chat completion (or its stream); says what was wrong.
    Malformed(String),
    /// Tool calls or a refusal: an answer, but not a text reply to store or relay as one.
    NotText(&'static str),
    /// The reply is longer than [`MAX_REPLY_BYTES`].
    TooLong,
    /// The stream ended before a finish reason: the reply may be cut short.
    Truncated,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Error(detail) => write!(f, "the LLM reported an error: {detail}"),
            Unusable::Malformed(detail) => f.write_str(detail),
            Unusable::NotText(what) => write!(
                f,
                "the LLM answered with {what}, which chatpool does not relay; ask for a text reply"
            ),
            Unusable::TooLong => write!(
                f,
                "the LLM's reply is longer than {} MiB",
                MAX_REPLY_BYTES >> 20
            ),
            Unusable::Truncated => {
                f.write_str("the LLM's stream ended before the reply was complete")
            }
        }
    }
}

#[derive(Deserialize)]
struct ResponseBody {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u64,
    message: Option<Delta>,
    finish_reason: Option<String>,
}

/// A message, or a streamed piece of one: the parts chatpool looks at.
#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Value>,
    function_call: Option<Value>,
    refusal: Option<Value>,
}

impl Delta {
    /// The text of this message or piece, or why it is not text.
    fn text(self) -> Result<Option<String>, Unusable> {
        let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if present(&self.tool_calls) || present(&self.function_call) {
            return Err(Unusable::NotText("tool calls"));
        }
        if present(&self.refusal) && self.refusal.as_ref().and_then(Value::as_str) != Some("") {
            return Err(Unusable::NotText("a refusal"));
        }
        Ok(self.content.filter(|c| !c.is_empty()))
    }
}

/// The message of an `error` object, whatever its shape.
fn error_message(error: &Value) -> String {
    let text = match error {
        Value::String(s) => s.clone(),
        other => match other["message"].as_str() {
            Some(message) => message.to_string(),
            None => other.to_string(),
        },
    };
    error_detail(text.as_bytes())
}

/// Reads a `chat.completion` body.
pub fn parse_completion(body: &[u8], requested_model: &str) -> Result<Completion, Unusable> {
    let parsed: ResponseBody = serde_json::from_slice(body).map_err(|e| {
        Unusable::Malformed(format!("the LLM's answer is not a chat completion: {e}"))
    })?;
    if let Some(error) = parsed.error.as_ref().filter(|e| !e.is_null()) {
        return Err(Unusable::Error(error_message(error)));
    }
    let choice = parsed
        .choices
        .into_iter()
        .find(|c| c.index == 0)
        .ok_or_else(|| Unusable::Malformed("the LLM's answer has no choices".into()))?;
    let content = choice
        .message
        .ok_or_else(|| Unusable::Malformed("the LLM's answer has no message".into()))?
        .text()?
        .ok_or_else(|| Unusable::Malformed("the LLM's answer has no message content".into()))?;
    if content.len() > MAX_REPLY_BYTES {
        return Err(Unusable::TooLong);
    }
    Ok(Completion {
        content,
        model: parsed.model.unwrap_or_else(|| requested_model.to_string()),
        usage: parsed.usage,
        finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
    })
}

/// How reading a streamed reply ended, short of a completion.
#[derive(Debug)]
pub enum StreamFailure {
    /// The connection failed.
    Io(io::Error),
    /// The sink said its client has gone.
    Cancelled,
    /// The stream said something that is not a usable reply.
    Unusable(Unusable),
}

impl From<Unusable> for StreamFailure {
    fn from(e: Unusable) -> Self {
        StreamFailure::Unusable(e)
    }
}

/// Reads a `chat.completion.chunk` event stream, handing each piece of the reply to `sink` as
/// it arrives (`sink` returns `false` once its client has gone).
///
/// The reply is complete at `data: [DONE]`, at the end of the stream, or as soon as a finish
/// reason and usage have both arrived (a server that then keeps the stream open has nothing
/// more to say); each only after a finish reason.
pub fn read_stream(
    input: impl BufRead,
    requested_model: &str,
    sink: &mut dyn FnMut(&str) -> bool,
) -> Result<Completion, StreamFailure> {
    let mut events = Events::new(input);
    let mut reply = StreamReply::new(requested_model);
    while let Some(event) = events.next_event()? {
        if let Some(piece) = reply.event(&event)? {
            if !sink(&piece) {
                return Err(StreamFailure::Cancelled);
            }
        }
        if reply.complete {
            break;
        }
    }
    Ok(reply.finish()?)
}

/// One event of a stream: its name (`event:`) and its data lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Event {
    name: String,
    data: String,
}

/// The events of an event stream, read as the event-stream syntax has them: lines end in
/// CRLF, LF or a lone CR; `data:` lines of one event are joined by newlines; an event ends at
/// a blank line; comments and unknown fields are skipped.
struct Events<R> {
    input: R,
    /// The previous line ended in CR, so a LF that follows belongs to it.
    after_cr: bool,
    line: Vec<u8>,
}

impl<R: BufRead> Events<R> {
    fn new(input: R) -> Events<R> {
        Events {
            input,
            after_cr: false,
            line: Vec::new(),
        }
    }

    /// The next event; `None` at the end of the input. An event cut off by the end of the
    /// input still counts: some servers close the stream instead of ending the last event.
    fn next_event(&mut self) -> Result<Option<Event>, StreamFailure> {
        let mut event = Event::default();
        let mut has_data = false;
        loop {
            if !self.next_line()? {
                return Ok(has_data.then_some(event));
            }
            let line = std::str::from_utf8(&self.line).map_err(|_| {
                Unusable::Malformed("the LLM streamed text that is not valid UTF-8".into())
            })?;
            if line.is_empty() {
                if has_data {
                    return Ok(Some(event));
                }
                event.name.clear();
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                    if event.data.len() > MAX_EVENT_BYTES {
                        return Err(Unusable::TooLong.into());
                    }
                }
                "event" => event.name = value.to_string(),
                _ => {}
            }
        }
    }

    /// Reads the next line into `self.line`, without its ending; `false` at the end of input.
    fn next_line(&mut self) -> Result<bool, StreamFailure> {
        self.line.clear();
        loop {
            let buf = self.input.fill_buf().map_err(StreamFailure::Io)?;
            if buf.is_empty() {
                return Ok(!self.line.is_empty());
            }
            let skip = usize::from(std::mem::take(&mut self.after_cr) && buf[0] == b'\n');
            let rest = &buf[skip..];
            match rest.iter().position(|b| matches!(b, b'\n' | b'\r')) {
                Some(end) => {
                    self.line.extend_from_slice(&rest[..end]);
                    self.after_cr = rest[end] == b'\r';
                    self.input.consume(skip + end + 1);
                    return Ok(true);
                }
                None => {
                    self.line.extend_from_slice(rest);
                    let used = buf.len();
                    self.input.consume(used);
                }
            }
            if self.line.len() > MAX_EVENT_BYTES {
                return Err(Unusable::TooLong.into());
            }
        }
    }
}

/// A streamed reply as far as it has arrived.
struct StreamReply {
    completion: Completion,
    finish_reason: Option<String>,
    /// Nothing more is needed: `[DONE]` came, or a finish reason and usage did.
    complete: bool,
}

#[derive(Deserialize)]
struct ChunkBody {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

impl StreamReply {
    fn new(requested_model: &str) -> StreamReply {
        StreamReply {
            completion: Completion {
                content: String::new(),
                model: requested_model.to_string(),
                usage: None,
                finish_reason: String::new(),
            },
            finish_reason: None,
            complete: false,
        }
    }

    /// Takes one event; returns the piece of text it carried, if any.
    fn event(&mut self, event: &Event) -> Result<Option<String>, Unusable> {
        if event.name == "error" {
            let error = serde_json::from_str::<Value>(&event.data)
                .map(|v| v.get("error").cloned().unwrap_or(v))
                .unwrap_or_else(|_| Value::String(event.data.clone()));
            return Err(Unusable::Error(error_message(&error)));
        }
        if event.data == "[DONE]" {
            self.complete = true;
            return Ok(None);
        }
        let chunk: ChunkBody = serde_json::from_str(&event.data).map_err(|e| {
            Unusable::Malformed(format!(
                "the LLM streamed something that is not a completion chunk: {e}"
            ))
        })?;
        if let Some(error) = chunk.error.as_ref().filter(|e| !e.is_null()) {
            return Err(Unusable::Error(error_message(error)));
        }
        if let Some(model) = chunk.model {
            self.completion.model = model;
        }
        if chunk.usage.is_some() {
            self.completion.usage = chunk.usage;
        }
        let mut piece = None;
        if let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
            piece = choice.delta.map(Delta::text).transpose()?.flatten();
        }
        if let Some(piece) = &piece {
            if self.completion.content.len() + piece.len() > MAX_REPLY_BYTES {
                return Err(Unusable::TooLong);
            }
            self.completion.content.push_str(piece);
        }
        self.complete = self.finish_reason.is_some() && self.completion.usage.is_some();
        Ok(piece)
    }

    fn finish(mut self) -> Result<Completion, Unusable> {
        let reason = self.finish_reason.ok_or(Unusable::Truncated)?;
        if matches!(reason.as_str(), "tool_calls" | "function_call") {
            return Err(Unusable::NotText("tool calls"));
        }
        self.completion.finish_reason = reason;
        Ok(self.completion)
    }
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

    fn completion(content: &str, model: &str, usage: Option<Usage>, reason: &str) -> Completion {
        Completion {
            content: content.into(),
            model: model.into(),
            usage,
            finish_reason: reason.into(),
        }
    }

    #[test]
    fn usage_from_huge_counts_saturates_instead_of_overflowing() {
        let usage = Usage::new(u64::MAX - 1, 5);
        assert_eq!(usage.total_tokens, u64::MAX);
        assert_eq!(Usage::new(u64::MAX, u64::MAX).total_tokens, u64::MAX);
        assert_eq!(Usage::new(7, 2).total_tokens, 9);
    }

    #[test]
    fn parses_a_completion_with_and_without_usage() {
        let body = br#"{"id":"x","object":"chat.completion","model":"m-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        let c = parse_completion(body, "m").unwrap();
        assert_eq!(c, completion("Hi", "m-1", Some(Usage::new(5, 1)), "length"));
        let c = parse_completion(br#"{"choices":[{"message":{"content":"x"}}]}"#, "m").unwrap();
        assert_eq!(
            (c.model.as_str(), c.usage, c.finish_reason.as_str()),
            ("m", None, "stop")
        );
    }

    #[test]
    fn nonsense_is_an_error_that_says_so() {
        let error = |body: &[u8]| parse_completion(body, "m").unwrap_err().to_string();
        assert!(error(b"<html>").contains("not a chat completion"));
        assert!(error(br#"{"choices":[]}"#).contains("no choices"));
        assert!(
            error(br#"{"choices":[{"message":{"content":null}}]}"#).contains("no message content")
        );
        assert!(error(br#"{"error":{"message":"model overloaded"}}"#).contains("model overloaded"));
        let tools = br#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"t"}]}}]}"#;
        assert_eq!(
            parse_completion(tools, "m").unwrap_err(),
            Unusable::NotText("tool calls")
        );
        let refusal = br#"{"choices":[{"message":{"content":null,"refusal":"no"}}]}"#;
        assert_eq!(
            parse_completion(refusal, "m").unwrap_err(),
            Unusable::NotText("a refusal")
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

    fn piece(text: &str) -> String {
        format!(
            "data: {}\n\n",
            serde_json::json!({"model": "up", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        )
    }

    fn finish(reason: &str) -> String {
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n")
    }

    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";

    /// Reads a stream from bytes; returns the pieces forwarded and the outcome.
    fn read(stream: &str) -> (Vec<String>, Result<Completion, String>) {
        let mut pieces = Vec::new();
        let result = read_stream(stream.as_bytes(), "m", &mut |p: &str| {
            pieces.push(p.to_string());
            true
        })
        .map_err(|e| match e {
            StreamFailure::Unusable(u) => u.to_string(),
            StreamFailure::Io(e) => format!("io: {e}"),
            StreamFailure::Cancelled => "cancelled".into(),
        });
        (pieces, result)
    }

    #[test]
    fn a_whole_stream_is_its_pieces_model_usage_and_finish_reason() {
        let stream = format!(
            ": keep-alive\n\n{}{}{}{USAGE}data: [DONE]\n\n",
            piece("Hel"),
            piece("lo"),
            finish("length")
        );
        let (pieces, result) = read(&stream);
        assert_eq!(pieces, ["Hel", "lo"]);
        assert_eq!(
            result.unwrap(),
            completion("Hello", "up", Some(Usage::new(1, 2)), "length")
        );
    }

    #[test]
    fn an_error_object_in_the_stream_is_a_failure_before_or_after_pieces() {
        let error = "data: {\"error\":{\"message\":\"generation failed\",\"code\":500}}\n\n";
        for stream in [
            format!("{}{}{error}data: [DONE]\n\n", piece("a"), piece("b")),
            format!("{error}data: [DONE]\n\n"),
            format!(
                "{}event: error\ndata: {{\"message\":\"generation failed\"}}\n\n",
                piece("a")
            ),
        ] {
            let (_, result) = read(&stream);
            let e = result.unwrap_err();
            assert!(e.contains("reported an error: generation failed"), "{e}");
        }
    }

    #[test]
    fn a_stream_without_a_finish_reason_is_truncated() {
        for stream in [
            format!("{}{}data: [DONE]\n\n", piece("a"), piece("b")),
            format!("{}{}", piece("a"), piece("b")),
            String::new(),
        ] {
            assert_eq!(
                read(&stream).1.unwrap_err(),
                Unusable::Truncated.to_string()
            );
        }
        // Some servers end the stream without [DONE]; a finished reply is still whole.
        let (_, result) = read(&format!("{}{}", piece("a"), finish("stop")));
        assert_eq!(result.unwrap().content, "a");
    }

    #[test]
    fn tool_calls_and_refusals_are_not_an_empty_reply() {
        let tools = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\"}]}}]}\n\n";
        let refusal = "data: {\"choices\":[{\"index\":0,\"delta\":{\"refusal\":\"I can't\"}}]}\n\n";
        for (stream, what) in [(tools, "tool calls"), (refusal, "a refusal")] {
            let stream = format!("{stream}{}data: [DONE]\n\n", finish("stop"));
            let e = read(&stream).1.unwrap_err();
            assert!(e.contains(what), "{e}");
        }
        let e = read(&format!("{}data: [DONE]\n\n", finish("tool_calls")))
            .1
            .unwrap_err();
        assert!(e.contains("tool calls"), "{e}");
    }

    #[test]
    fn bare_cr_and_crlf_line_ends_and_multi_line_data_are_event_stream_syntax() {
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#;
        let (pieces, result) = read(&format!("data: {chunk}\r\rdata: [DONE]\r\r"));
        assert_eq!((pieces.len(), result.unwrap().content.as_str()), (1, "x"));
        let (_, result) = read(&format!("data: {chunk}\r\n\r\ndata: [DONE]\r\n\r\n"));
        assert_eq!(result.unwrap().content, "x");
        // One JSON object over two data lines, joined by a newline (JSON whitespace).
        let split = chunk.replacen(",", ",\ndata: ", 1);
        let (_, result) = read(&format!("data: {split}\n\ndata: [DONE]\n\n"));
        assert_eq!(result.unwrap().content, "x");
    }

    #[test]
    fn a_finished_stream_with_usage_is_complete_without_done() {
        let stream = format!("{}{}{USAGE}", piece("a"), finish("stop"));
        let mut events = Events::new(stream.as_bytes());
        let mut reply = StreamReply::new("m");
        let mut steps = Vec::new();
        while let Some(e) = events.next_event().unwrap() {
            steps.push((reply.event(&e).unwrap(), reply.complete));
        }
        // No need to wait for [DONE] or the end of the connection.
        assert_eq!(
            steps,
            [(Some("a".into()), false), (None, false), (None, true)]
        );
    }

    #[test]
    fn the_cap_is_on_the_reply_text_not_the_framing() {
        // 45,000 pieces of 5 bytes: about 225 KB of text in over 5 MB of events.
        let mut stream = String::new();
        for _ in 0..45_000 {
            stream.push_str(&piece("word "));
        }
        stream.push_str(&finish("stop"));
        stream.push_str("data: [DONE]\n\n");
        let (pieces, result) = read(&stream);
        assert_eq!(pieces.len(), 45_000);
        assert_eq!(result.unwrap().content.len(), 225_000);
        let big = "x".repeat(MAX_REPLY_BYTES / 2 + 1);
        let (_, result) = read(&format!("{}{}{}", piece(&big), piece(&big), finish("stop")));
        assert_eq!(result.unwrap_err(), Unusable::TooLong.to_string());
        let body = serde_json::json!({"choices": [{"message": {"content": big.repeat(2)}}]});
        assert_eq!(
            parse_completion(body.to_string().as_bytes(), "m").unwrap_err(),
            Unusable::TooLong
        );
    }

    #[test]
    fn invalid_utf8_and_nonsense_are_malformed() {
        let mut bytes = piece("ok").into_bytes();
        bytes.extend_from_slice(b"data: \xff\xfe\n\n");
        let outcome = read_stream(&bytes[..], "m", &mut |_: &str| true);
        assert!(
            matches!(&outcome, Err(StreamFailure::Unusable(Unusable::Malformed(m))) if m.contains("UTF-8")),
            "{outcome:?}"
        );
        assert!(read("data: {nope\n\n")
            .1
            .unwrap_err()
            .contains("not a completion chunk"));
    }

    #[test]
    fn a_sink_that_refuses_cancels() {
        let outcome = read_stream(piece("a").as_bytes(), "m", &mut |_: &str| false);
        assert!(matches!(outcome, Err(StreamFailure::Cancelled)));
    }

    #[test]
    fn request_omits_unset_sampling_and_passes_the_rest_through() {
        let mut verbatim = Map::new();
        verbatim.insert("role".into(), "user".into());
        verbatim.insert(
            "content".into(),
            serde_json::json!([{"type": "text", "text": "hi"}]),
        );
        verbatim.insert("name".into(), "ann".into());
        let messages = [
            ChatMessage::new("system", "s"),
            ChatMessage {
                verbatim: Some(verbatim),
                ..ChatMessage::new("user", "hi")
            },
        ];
        let mut passthrough = Map::new();
        passthrough.insert("seed".into(), 7.into());
        let req = CompletionRequest {
            model: "m",
            messages: &messages,
            temperature: None,
            max_tokens: Some(5),
            stream: false,
            stream_options: None,
            passthrough: &passthrough,
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}],"name":"ann"}],"max_tokens":5,"seed":7}"#
        );
    }

    #[test]
    fn a_message_with_parts_reads_as_its_text_parts_joined() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"Describe"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"this"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content, "Describe\nthis");
    }
}
