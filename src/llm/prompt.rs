//! Prompt assembly: which earlier messages go to the LLM, and in what order.
//!
//! Pure functions over values; the store supplies the newest messages that fit the window.

use super::wire::ChatMessage;
use crate::store::Message;

/// Keeps the newest messages whose characters (not bytes) add up to at most `max_chars`, whole
/// messages only, and returns them oldest first. `newest_first` is at most `max_messages` long.
/// The window stops at the first message that does not fit: skipping it to take an older one
/// would hand the LLM a conversation with a hole in it.
pub fn window(newest_first: Vec<Message>, max_chars: usize) -> Vec<Message> {
    let mut used = 0usize;
    let mut kept: Vec<Message> = newest_first
        .into_iter()
        .take_while(|m| {
            used += m.content.chars().count();
            used <= max_chars
        })
        .collect();
    kept.reverse();
    kept
}

/// The messages sent upstream: the system prompt when non-empty, the history window in order,
/// then the new user message.
pub fn assemble(system_prompt: &str, history: &[Message], user: &str) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(history.len() + 2);
    if !system_prompt.is_empty() {
        messages.push(ChatMessage::new("system", system_prompt));
    }
    messages.extend(
        history
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content)),
    );
    messages.push(ChatMessage::new("user", user));
    messages
}

/// The messages sent upstream for a history-backed OpenAI request: the client's own leading
/// system messages (or the configured system prompt when it sent none), the history window,
/// then the rest of the client's messages, whose last user message is the new turn.
pub fn around_client(
    system_prompt: &str,
    history: &[Message],
    client: Vec<ChatMessage>,
) -> Vec<ChatMessage> {
    let lead = client.iter().take_while(|m| m.role == "system").count();
    let mut messages = Vec::with_capacity(client.len() + history.len() + 1);
    let mut client = client.into_iter();
    messages.extend(client.by_ref().take(lead));
    if lead == 0 && !system_prompt.is_empty() {
        messages.push(ChatMessage::new("system", system_prompt));
    }
    messages.extend(
        history
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content)),
    );
    messages.extend(client);
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, content: &str) -> Message {
        let role = if id % 2 == 1 { "user" } else { "assistant" };
        Message {
            id,
            role: role.into(),
            content: content.into(),
            created_at: String::new(),
        }
    }

    fn ids(ms: &[Message]) -> Vec<i64> {
        ms.iter().map(|m| m.id).collect()
    }

    #[test]
    fn window_keeps_newest_whole_messages_in_order() {
        let newest_first = vec![msg(4, "dddd"), msg(3, "ccc"), msg(2, "bb"), msg(1, "a")];
        assert_eq!(ids(&window(newest_first.clone(), 100)), [1, 2, 3, 4]);
        assert_eq!(ids(&window(newest_first.clone(), 7)), [3, 4]);
        assert_eq!(ids(&window(newest_first.clone(), 9)), [2, 3, 4]);
        assert_eq!(ids(&window(newest_first, 3)), Vec::<i64>::new());
    }

    #[test]
    fn window_counts_characters_not_bytes() {
        let newest_first = vec![msg(2, "ééé"), msg(1, "日本")];
        assert_eq!(ids(&window(newest_first.clone(), 5)), [1, 2]);
        assert_eq!(ids(&window(newest_first, 4)), [2]);
    }

    #[test]
    fn window_does_not_skip_over_a_large_message() {
        let newest_first = vec![msg(3, "c"), msg(2, &"x".repeat(50)), msg(1, "a")];
        assert_eq!(ids(&window(newest_first, 10)), [3]);
    }

    #[test]
    fn assemble_puts_system_history_then_user() {
        let history = [msg(1, "hi"), msg(2, "hello")];
        let out = assemble("be brief", &history, "next");
        let pairs: Vec<_> = out
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("system", "be brief"),
                ("user", "hi"),
                ("assistant", "hello"),
                ("user", "next")
            ]
        );
        assert_eq!(assemble("", &[], "x"), [ChatMessage::new("user", "x")]);
    }

    #[test]
    fn around_client_puts_history_after_the_clients_system_messages() {
        let history = [msg(1, "hi"), msg(2, "hello")];
        let roles = |ms: Vec<ChatMessage>| -> Vec<String> {
            ms.into_iter()
                .map(|m| format!("{}:{}", m.role, m.content))
                .collect()
        };
        let client = vec![
            ChatMessage::new("system", "terse"),
            ChatMessage::new("user", "next"),
        ];
        assert_eq!(
            roles(around_client("SYS", &history, client)),
            ["system:terse", "user:hi", "assistant:hello", "user:next"]
        );
        assert_eq!(
            roles(around_client(
                "SYS",
                &history,
                vec![ChatMessage::new("user", "n")]
            )),
            ["system:SYS", "user:hi", "assistant:hello", "user:n"]
        );
    }
}
