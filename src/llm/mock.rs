//! The mock LLM's answers, shared by the in-process `mock` provider and `chatpool mock-llm`.
//!
//! Deterministic, so tests can predict a reply from the request that caused it.

use super::wire::{ChatMessage, Completion, Usage};

/// The reply to a conversation: it quotes the last user message, then pads to `extra_words`
/// more words so load tests can ask for longer replies.
pub fn reply(messages: &[ChatMessage], model: &str, extra_words: usize) -> Completion {
    let last = messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .unwrap_or("");
    let mut content = format!("You said: {last}");
    for i in 0..extra_words {
        content.push_str(if i % 2 == 0 { " lorem" } else { " ipsum" });
    }
    let prompt_chars: usize = messages.iter().map(|m| m.content.chars().count()).sum();
    let prompt_tokens = (prompt_chars / 4 + messages.len()) as u64;
    let completion_tokens = content.split_whitespace().count() as u64;
    Completion {
        content,
        model: model.to_string(),
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
        finish_reason: "stop".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_the_last_user_message_and_pads() {
        let messages = [
            ChatMessage::new("system", "s"),
            ChatMessage::new("user", "first"),
            ChatMessage::new("assistant", "x"),
            ChatMessage::new("user", "second"),
        ];
        let c = reply(&messages, "m", 3);
        assert_eq!(c.content, "You said: second lorem ipsum lorem");
        assert_eq!(c.usage.unwrap().completion_tokens, 6);
    }
}
