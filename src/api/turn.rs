//! A turn: one exchange with the LLM as either door asked for it, and what it came to. Pure
//! values: parsing a body into a [`Turn`], and the prompt it sends once the history is read.

use super::error::ApiError;
use super::openai;
use super::request::{idempotency_key, parse_send_message};
use crate::llm::prompt;
use crate::llm::wire::{ChatMessage, Completion, Sampling, Usage};
use crate::store::{Message, StoredReply};

/// How a turn's answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// chatpool's own API: `{"reply": ...}`, or `data: {"delta"}` events and `event: done`.
    Native,
    /// OpenAI's: `chat.completion`, or `chat.completion.chunk` events and `data: [DONE]`.
    OpenAi {
        /// Whether the stream ends with a usage chunk.
        include_usage: bool,
    },
}

/// The shape of a turn's answer: its format, and whether it goes out as an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Native or OpenAI.
    pub format: Format,
    /// Whether the client asked for server-sent events.
    pub stream: bool,
}

/// The part of a turn that belongs to a chat: stored with the reply, and replayed by its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    /// The chat.
    pub chat_id: String,
    /// The user's message, as stored.
    pub user: String,
    /// The `Idempotency-Key`, if one was sent.
    pub key: Option<String>,
}

/// One exchange with the LLM, as the request asked for it: parsed, not yet run.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The chat it belongs to; `None` for a stateless relay, which reads and stores nothing.
    pub chat: Option<ChatTurn>,
    /// The conversation the client sent (the front door's), empty on the native door.
    pub client: Vec<ChatMessage>,
    /// Passed to the LLM.
    pub sampling: Sampling,
    /// How the answer is written.
    pub shape: Shape,
}

impl Turn {
    /// A `POST /v1/chats/{chat_id}/messages`: its body and its `Idempotency-Key`.
    pub fn native(chat_id: &str, body: &[u8], key: Option<&str>) -> Result<Turn, ApiError> {
        let key = idempotency_key(key)?;
        let message = parse_send_message(body)?;
        Ok(Turn {
            chat: Some(ChatTurn {
                chat_id: chat_id.to_string(),
                user: message.content,
                key,
            }),
            client: Vec::new(),
            sampling: message.sampling,
            shape: Shape {
                format: Format::Native,
                stream: message.stream,
            },
        })
    }

    /// A `POST /v1/chat/completions`, history-backed when it names a chat.
    pub fn openai(chat_id: Option<&str>, body: &[u8], key: Option<&str>) -> Result<Turn, ApiError> {
        let key = idempotency_key(key)?;
        let parsed = openai::parse_request(body)?;
        let chat =
            match chat_id {
                Some(chat_id) => Some(ChatTurn {
                    chat_id: chat_id.to_string(),
                    user: parsed.new_turn()?.to_string(),
                    key,
                }),
                None if key.is_some() => return Err(ApiError::invalid(
                    "Idempotency-Key needs X-Chat-Id: a stateless relay stores no reply to replay",
                )),
                None => None,
            };
        Ok(Turn {
            chat,
            client: parsed.messages,
            sampling: parsed.sampling,
            shape: Shape {
                format: Format::OpenAi {
                    include_usage: parsed.include_usage,
                },
                stream: parsed.stream,
            },
        })
    }

    /// What goes to the LLM: the history window (oldest first) around this turn's message, or
    /// for a stateless relay the client's conversation as it was sent.
    pub fn prompt(&mut self, system_prompt: &str, window: &[Message]) -> Vec<ChatMessage> {
        let client = std::mem::take(&mut self.client);
        match (&self.chat, self.shape.format) {
            (Some(chat), Format::Native) => prompt::assemble(system_prompt, window, &chat.user),
            (Some(_), Format::OpenAi { .. }) => {
                prompt::around_client(system_prompt, window, client)
            }
            (None, _) => client,
        }
    }
}

/// What a chat holds for a turn before the LLM is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// The reply stored earlier under the turn's idempotency key: the answer, as it was.
    Replay(StoredReply),
    /// The chat's history window, oldest first, for the prompt.
    Window(Vec<Message>),
}

/// What a turn came to when it succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The reply's text.
    pub content: String,
    /// The model that wrote it.
    pub model: String,
    /// Tokens, as the LLM counted them.
    pub usage: Option<Usage>,
    /// Why the reply ended, as the LLM said (a replay's was complete: `stop`).
    pub finish_reason: String,
    /// Where it is stored: the chat and the reply's message id; `None` for a relay.
    pub stored: Option<(String, i64)>,
    /// Whether it was stored earlier, under the same idempotency key.
    pub replayed: bool,
}

impl Reply {
    /// A completion relayed and stored nowhere.
    pub fn relayed(completion: Completion) -> Reply {
        Reply {
            content: completion.content,
            model: completion.model,
            usage: completion.usage,
            finish_reason: completion.finish_reason,
            stored: None,
            replayed: false,
        }
    }

    /// A reply stored in `chat_id`: just now (with the LLM's finish reason) or earlier.
    pub fn stored(chat_id: &str, reply: StoredReply, finish_reason: Option<String>) -> Reply {
        Reply {
            replayed: finish_reason.is_none(),
            // Not stored with the reply; a stored reply was complete.
            finish_reason: finish_reason.unwrap_or_else(|| "stop".into()),
            usage: reply.usage.map(|(p, c)| Usage::new(p, c)),
            stored: Some((chat_id.to_string(), reply.message_id)),
            content: reply.content,
            model: reply.model,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64, role: &str, content: &str) -> Message {
        Message {
            id,
            role: role.into(),
            content: content.into(),
            created_at: "2026-11-30T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_native_turn_puts_the_window_between_the_system_prompt_and_the_message() {
        let mut turn =
            Turn::native("c1", br#"{"content":"now","stream":true}"#, Some("k")).unwrap();
        let chat = turn.chat.clone().unwrap();
        assert_eq!((chat.chat_id.as_str(), chat.user.as_str()), ("c1", "now"));
        assert_eq!(chat.key.as_deref(), Some("k"));
        assert!(turn.shape.stream);
        let window = [message(1, "user", "before"), message(2, "assistant", "re")];
        let prompt: Vec<_> = turn
            .prompt("sys", &window)
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect();
        let expected = [
            ("system", "sys"),
            ("user", "before"),
            ("assistant", "re"),
            ("user", "now"),
        ];
        assert_eq!(prompt.len(), expected.len());
        for ((role, content), (r, c)) in prompt.iter().zip(expected) {
            assert_eq!((role.as_str(), content.as_str()), (r, c));
        }
    }

    #[test]
    fn a_relay_sends_the_clients_conversation_and_refuses_a_key() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let mut turn = Turn::openai(None, body, None).unwrap();
        assert_eq!(turn.chat, None);
        let prompt = turn.prompt("sys", &[message(1, "user", "ignored")]);
        assert_eq!(prompt.len(), 1);
        assert_eq!(prompt[0].content, "hi");
        let keyed = Turn::openai(None, body, Some("k")).unwrap_err();
        assert!(keyed.to_string().contains("needs X-Chat-Id"), "{keyed}");
    }

    #[test]
    fn a_history_backed_openai_turn_stores_the_last_user_message() {
        let body = br#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q"}],
                        "stream":true,"stream_options":{"include_usage":true}}"#;
        let turn = Turn::openai(Some("c"), body, None).unwrap();
        assert_eq!(turn.chat.unwrap().user, "q");
        let usage = Format::OpenAi {
            include_usage: true,
        };
        assert_eq!(
            turn.shape,
            Shape {
                format: usage,
                stream: true
            }
        );
    }

    #[test]
    fn a_replayed_reply_says_stop_and_a_fresh_one_keeps_the_llms_reason() {
        let stored = StoredReply {
            message_id: 4,
            content: "r".into(),
            model: "m".into(),
            usage: Some((1, 2)),
        };
        let replay = Reply::stored("c", stored.clone(), None);
        assert!(replay.replayed);
        assert_eq!(replay.finish_reason, "stop");
        let fresh = Reply::stored("c", stored, Some("length".into()));
        assert!(!fresh.replayed);
        assert_eq!(fresh.finish_reason, "length");
        assert_eq!(fresh.stored, Some(("c".to_string(), 4)));
    }
}
