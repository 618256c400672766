//! The objects of the Responses and Conversations APIs as OpenAI's SDK parses them: a
//! `response`, its items, lists, conversations, and the events of a streamed response. Pure
//! functions over values.

use crate::store::{Conversation, Item};
use serde_json::{json, Value};

/// What a response object says, from a fresh reply or a stored one.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// Its `resp_…` id.
    pub id: &'a str,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// `in_progress`, `completed` or `failed`.
    pub status: &'a str,
    /// The model that answered (or will).
    pub model: &'a str,
    /// The reply's item id and text, once there is one.
    pub output: Option<(&'a str, &'a str)>,
    /// Prompt and completion tokens.
    pub usage: Option<(u64, u64)>,
    /// The response it continued.
    pub previous_response_id: Option<&'a str>,
    /// The conversation it is in.
    pub conversation: Option<&'a str>,
    /// Whether it is kept.
    pub store: bool,
    /// Instructions, metadata, sampling and truncation, as asked.
    pub echo: &'a Value,
    /// Why it failed.
    pub error: Option<&'a str>,
}

/// A `response` object.
pub fn response(view: &View<'_>) -> Value {
    let output: Vec<Value> = view
        .output
        .map(|(id, text)| output_message(id, text, "completed"))
        .into_iter()
        .collect();
    let usage = view.usage.map(|(input, output)| {
        json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
               "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": input.saturating_add(output)})
    });
    let mut object = json!({
        "id": view.id,
        "object": "response",
        "created_at": view.created_at,
        "status": view.status,
        "error": view.error.map(|message| json!({"code": "server_error", "message": message})),
        "incomplete_details": null,
        "model": view.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": view.previous_response_id,
        "conversation": view.conversation.map(|id| json!({ "id": id })),
        "reasoning": null,
        "store": view.store,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    });
    if let (Some(fields), Some(out)) = (view.echo.as_object(), object.as_object_mut()) {
        for (key, value) in fields {
            out.insert(key.clone(), value.clone());
        }
    }
    object
}

/// The assistant's reply as an output `message` item.
pub fn output_message(id: &str, text: &str, status: &str) -> Value {
    let content: Vec<Value> = match status {
        "in_progress" => Vec::new(),
        _ => vec![output_text(text)],
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A stored item: a `message` whose parts are `input_text`, or `output_text` for the assistant.
pub fn item(item: &Item) -> Value {
    let part = if item.role == "assistant" {
        output_text(&item.content)
    } else {
        json!({"type": "input_text", "text": item.content})
    };
    json!({"id": item.id, "type": "message", "status": "completed", "role": item.role, "content": [part]})
}

/// A list of items: `{object: "list", data, first_id, last_id, has_more}`.
pub fn list(items: &[Item], has_more: bool) -> Value {
    json!({
        "object": "list",
        "data": items.iter().map(item).collect::<Vec<_>>(),
        "first_id": items.first().map(|i| i.id.as_str()),
        "last_id": items.last().map(|i| i.id.as_str()),
        "has_more": has_more,
    })
}

/// A `conversation` object.
pub fn conversation(conversation: &Conversation) -> Value {
    let metadata: Value =
        serde_json::from_str(&conversation.metadata).unwrap_or_else(|_| json!({}));
    json!({"id": conversation.id, "object": "conversation", "created_at": conversation.created_at,
           "metadata": metadata})
}

/// What a delete answers: `{id, object, deleted: true}`.
pub fn deleted(id: &str, object: &str) -> Value {
    json!({"id": id, "object": object, "deleted": true})
}

/// The events of one streamed response, numbered in the order sent. The reply is the one
/// output item (index 0) with the one `output_text` part (index 0).
#[derive(Debug)]
pub struct Events {
    sequence: u64,
    item_id: String,
    opened: bool,
}

impl Events {
    /// The events of a response whose reply is item `item_id`.
    pub fn new(item_id: &str) -> Events {
        Events {
            sequence: 0,
            item_id: item_id.into(),
            opened: false,
        }
    }

    /// Whether the opening events have been made.
    pub fn opened(&self) -> bool {
        self.opened
    }

    fn event(&mut self, kind: &'static str, mut fields: Value) -> (&'static str, Value) {
        fields["type"] = kind.into();
        fields["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        (kind, fields)
    }

    fn at(&self) -> Value {
        json!({"item_id": self.item_id, "output_index": 0, "content_index": 0})
    }

    /// What opens the stream: created, in progress, the item and its part added.
    pub fn opening(&mut self, in_progress: &Value) -> Vec<(&'static str, Value)> {
        self.opened = true;
        let response = json!({ "response": in_progress });
        let item = output_message(&self.item_id, "", "in_progress");
        let mut part = self.at();
        part["part"] =
            json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        vec![
            self.event("response.created", response.clone()),
            self.event("response.in_progress", response),
            self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            ),
            self.event("response.content_part.added", part),
        ]
    }

    /// One piece of the reply.
    pub fn delta(&mut self, piece: &str) -> (&'static str, Value) {
        let mut fields = self.at();
        fields["delta"] = piece.into();
        fields["logprobs"] = json!([]);
        self.event("response.output_text.delta", fields)
    }

    /// What closes a completed stream: the text, part and item done, then the response.
    pub fn closing(&mut self, text: &str, completed: &Value) -> Vec<(&'static str, Value)> {
        let mut text_done = self.at();
        text_done["text"] = text.into();
        text_done["logprobs"] = json!([]);
        let mut part_done = self.at();
        part_done["part"] = output_text(text);
        let item = output_message(&self.item_id, text, "completed");
        vec![
            self.event("response.output_text.done", text_done),
            self.event("response.content_part.done", part_done),
            self.event(
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            ),
            self.event("response.completed", json!({ "response": completed })),
        ]
    }

    /// What ends a stream that failed after it began.
    pub fn failed(&mut self, failed: &Value) -> (&'static str, Value) {
        self.event("response.failed", json!({ "response": failed }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(echo: &'a Value, status: &'a str, output: Option<(&'a str, &'a str)>) -> View<'a> {
        View {
            id: "resp_1",
            created_at: 5,
            status,
            model: "m",
            output,
            usage: Some((3, 4)),
            previous_response_id: Some("resp_0"),
            conversation: None,
            store: true,
            echo,
            error: None,
        }
    }

    #[test]
    fn a_response_has_what_the_sdk_reads() {
        let echo = json!({"instructions": "be brief", "metadata": {"k": "v"}, "temperature": 0.5});
        let r = response(&view(&echo, "completed", Some(("msg_a", "Hello"))));
        assert_eq!(r["object"], "response");
        assert_eq!(
            r["output"][0]["content"][0],
            json!({"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []})
        );
        assert_eq!(r["output"][0]["id"], "msg_a");
        assert_eq!(r["usage"]["total_tokens"], 7);
        assert_eq!(
            (r["instructions"].as_str(), r["temperature"].as_f64()),
            (Some("be brief"), Some(0.5))
        );
        assert_eq!(r["previous_response_id"], "resp_0");
        for field in [
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "error",
            "incomplete_details",
            "conversation",
        ] {
            assert!(r.get(field).is_some(), "{field}");
        }
    }

    #[test]
    fn events_come_in_the_order_the_sdk_insists_on_numbered_from_zero() {
        let echo = json!({});
        let mut events = Events::new("msg_a");
        let opening = response(&view(&echo, "in_progress", None));
        let mut all = events.opening(&opening);
        all.push(events.delta("Hel"));
        all.push(events.delta("lo"));
        all.extend(events.closing(
            "Hello",
            &response(&view(&echo, "completed", Some(("msg_a", "Hello")))),
        ));
        let kinds: Vec<_> = all.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (n, (kind, data)) in all.iter().enumerate() {
            assert_eq!(data["type"], *kind);
            assert_eq!(data["sequence_number"], n as u64);
        }
        assert_eq!(all[4].1["item_id"], "msg_a");
        assert_eq!(all[4].1["logprobs"], json!([]));
        assert_eq!(
            (
                all[4].1["output_index"].as_u64(),
                all[4].1["content_index"].as_u64()
            ),
            (Some(0), Some(0))
        );
        assert_eq!(all[2].1["item"]["id"], all[8].1["item"]["id"]);
        assert_eq!(all[6].1["text"], "Hello");
        assert_eq!(events.failed(&opening).1["sequence_number"], 10);
    }

    #[test]
    fn lists_name_their_first_and_last_ids() {
        let items = [
            Item {
                message_id: 1,
                id: "msg_1".into(),
                role: "user".into(),
                content: "q".into(),
            },
            Item {
                message_id: 2,
                id: "msg_b".into(),
                role: "assistant".into(),
                content: "a".into(),
            },
        ];
        let l = list(&items, true);
        assert_eq!(
            (l["first_id"].as_str(), l["last_id"].as_str()),
            (Some("msg_1"), Some("msg_b"))
        );
        assert_eq!(l["data"][0]["content"][0]["type"], "input_text");
        assert_eq!(l["data"][1]["content"][0]["type"], "output_text");
        assert_eq!(list(&[], false)["first_id"], Value::Null);
    }
}
