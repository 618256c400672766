//! OpenAI's Responses and Conversations, kept in the one storage model: chats and messages.
//!
//! A response is a run of messages in a chat (its input items, then its reply) plus a row that
//! maps its `resp_…` id to that run, to the response it continued, and to what it echoes back
//! (instructions, metadata, sampling). A chain of responses lives in one chat, so history,
//! paging and deletion of the chat work as for any other. A conversation is a chat whose id is
//! the conversation's `conv_…` id: its items are the chat's messages. Reads run on a borrowed
//! reader; every write goes through the [`Writer`], in a transaction of its own.

use super::{reserve_message_ids, Message, Store, StoreError, Writer, NOW};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// An item as the Responses and Conversations APIs show it: a stored message and its item id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The message's id in its chat.
    pub message_id: i64,
    /// The item id (`msg_…`): the one it was stored with, or `msg_` and the message id.
    pub id: String,
    /// `user`, `assistant`, `system` or `developer`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// An item to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Its item id, fresh.
    pub id: String,
    /// Its role.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A response to store, committed before it is answered.
#[derive(Debug, Clone)]
pub struct NewResponse {
    /// The tenant that owns it.
    pub tenant: String,
    /// Its `resp_…` id.
    pub id: String,
    /// The chat its messages go to: a new one, the previous response's, or the conversation.
    pub chat_id: String,
    /// The conversation it was made in, if any (then `chat_id` is that conversation).
    pub conversation_id: Option<String>,
    /// The response it continues, if any.
    pub previous_response_id: Option<String>,
    /// Its input items, in order.
    pub inputs: Vec<NewItem>,
    /// The reply, as an assistant item.
    pub reply: NewItem,
    /// The model that wrote the reply.
    pub model: String,
    /// Prompt and completion tokens, when the LLM gave them.
    pub usage: Option<(u64, u64)>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// What the response object echoes (instructions, metadata, sampling), as JSON.
    pub echo: String,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// What the key stands for: a digest of the request.
    pub fingerprint: Option<String>,
}

/// A stored response, enough to answer it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// Its `resp_…` id.
    pub id: String,
    /// The chat its messages are in.
    pub chat_id: String,
    /// The conversation it was made in, if any.
    pub conversation_id: Option<String>,
    /// The response it continued, if any.
    pub previous_response_id: Option<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// What it echoes, as JSON.
    pub echo: String,
    /// The first of its input messages.
    pub first_message_id: i64,
    /// Its reply's message id.
    pub reply_message_id: i64,
    /// Its reply, unless that item was deleted from its conversation since.
    pub reply: Option<Item>,
    /// The model that wrote the reply.
    pub model: String,
    /// Prompt and completion tokens, when the LLM gave them.
    pub usage: Option<(u64, u64)>,
    /// The digest of the request its idempotency key stands for, if it had one.
    pub fingerprint: Option<String>,
}

/// A stored conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Its `conv_…` id, which is also its chat's id.
    pub id: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Its metadata, as JSON.
    pub metadata: String,
}

/// Which way a list of items runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// A page of items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPage {
    /// The items, in the order asked for.
    pub items: Vec<Item>,
    /// Whether more follow in that order.
    pub has_more: bool,
}

const ITEM_COLUMNS: &str = "id, coalesce(item_id, 'msg_' || id), role, content";

fn item_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
    Ok(Item {
        message_id: r.get(0)?,
        id: r.get(1)?,
        role: r.get(2)?,
        content: r.get(3)?,
    })
}

/// A token count as SQLite stores it, and back.
fn stored_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store {
    /// A tenant's response, or `None` (never stored, deleted, or another tenant's).
    pub fn response(&self, tenant: &str, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT r.response_id, r.chat_id, r.conversation_id, r.previous_response_id,
                    r.created_at, r.echo, r.first_message_id, r.fingerprint, r.reply_message_id,
                    m.id, coalesce(m.item_id, 'msg_' || m.id), m.role, m.content,
                    m.model, m.prompt_tokens, m.completion_tokens
             FROM responses r LEFT JOIN messages m
                 ON m.tenant = r.tenant AND m.chat_id = r.chat_id AND m.id = r.reply_message_id
             WHERE r.tenant = ?1 AND r.response_id = ?2",
        )?;
        let found = stmt
            .query_row(params![tenant, id], |r| {
                let reply = match r.get::<_, Option<i64>>(9)? {
                    Some(message_id) => Some(Item {
                        message_id,
                        id: r.get(10)?,
                        role: r.get(11)?,
                        content: r.get(12)?,
                    }),
                    None => None,
                };
                let prompt: Option<i64> = r.get(14)?;
                let completion: Option<i64> = r.get(15)?;
                Ok(StoredResponse {
                    id: r.get(0)?,
                    chat_id: r.get(1)?,
                    conversation_id: r.get(2)?,
                    previous_response_id: r.get(3)?,
                    created_at: r.get::<_, i64>(4)?.max(0) as u64,
                    echo: r.get(5)?,
                    first_message_id: r.get(6)?,
                    fingerprint: r.get(7)?,
                    reply_message_id: r.get(8)?,
                    reply,
                    model: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
                    usage: prompt
                        .zip(completion)
                        .map(|(p, c)| (p.max(0) as u64, c.max(0) as u64)),
                })
            })
            .optional()?;
        Ok(found)
    }

    /// The tenant's response stored under an idempotency key, if any.
    pub fn response_by_key(&self, tenant: &str, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT response_id FROM responses WHERE tenant = ?1 AND idempotency_key = ?2",
            )?
            .query_row(params![tenant, key], |r| r.get(0))
            .optional()?)
    }

    /// The messages of a chain of responses, newest first: the response `id`, the one it
    /// continued, and so on back, at most `depth` responses and `max_messages` messages. A
    /// link deleted since ends the chain there.
    pub fn chain_messages(
        &self,
        tenant: &str,
        id: &str,
        depth: usize,
        max_messages: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let clamp = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "WITH RECURSIVE chain(previous, chat_id, first_id, last_id, depth) AS (
                 SELECT previous_response_id, chat_id, first_message_id, reply_message_id, 1
                 FROM responses WHERE tenant = ?1 AND response_id = ?2
                 UNION ALL
                 SELECT r.previous_response_id, r.chat_id, r.first_message_id,
                        r.reply_message_id, chain.depth + 1
                 FROM responses r JOIN chain ON r.tenant = ?1 AND r.response_id = chain.previous
                 WHERE chain.depth < ?3
             )
             SELECT m.id, m.role, m.content, m.created_at FROM chain JOIN messages m
                 ON m.tenant = ?1 AND m.chat_id = chain.chat_id
                 AND m.id BETWEEN chain.first_id AND chain.last_id
             ORDER BY m.id DESC LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![tenant, id, clamp(depth), clamp(max_messages)],
            super::message_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A tenant's conversation, or `None`.
    pub fn conversation(&self, tenant: &str, id: &str) -> Result<Option<Conversation>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT conversation_id, created_at, metadata FROM conversations
                 WHERE tenant = ?1 AND conversation_id = ?2",
            )?
            .query_row(params![tenant, id], |r| {
                Ok(Conversation {
                    id: r.get(0)?,
                    created_at: r.get::<_, i64>(1)?.max(0) as u64,
                    metadata: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// One item of a chat by its item id, or `None`.
    pub fn item(&self, tenant: &str, chat_id: &str, id: &str) -> Result<Option<Item>, StoreError> {
        // A message stored without an item id is named by its message id.
        let plain = id
            .strip_prefix("msg_")
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-1);
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM messages WHERE tenant = ?1 AND chat_id = ?2
                 AND (item_id = ?3 OR (item_id IS NULL AND id = ?4))"
            ))?
            .query_row(params![tenant, chat_id, id, plain], item_from_row)
            .optional()?)
    }

    /// Up to `limit` items of a chat whose message ids are within `range`, in `order`.
    pub fn items(
        &self,
        tenant: &str,
        chat_id: &str,
        range: (i64, i64),
        order: Order,
        limit: usize,
    ) -> Result<ItemPage, StoreError> {
        let direction = match order {
            Order::Asc => "ASC",
            Order::Desc => "DESC",
        };
        let mut items: Vec<Item> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ITEM_COLUMNS} FROM messages WHERE tenant = ?1 AND chat_id = ?2
                 AND id BETWEEN ?3 AND ?4 ORDER BY id {direction} LIMIT ?5"
            ))?
            .query_map(
                params![tenant, chat_id, range.0, range.1, limit as i64 + 1],
                item_from_row,
            )?
            .collect::<Result<_, _>>()?;
        let has_more = items.len() > limit;
        items.truncate(limit);
        Ok(ItemPage { items, has_more })
    }

    /// Stores a response: its items in its chat and its row. `false` when its conversation
    /// was deleted meanwhile (then nothing is stored).
    fn insert_response(&mut self, response: &NewResponse) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (tenant, chat) = (response.tenant.as_str(), response.chat_id.as_str());
        if let Some(conversation) = &response.conversation_id {
            if !conversation_exists(&tx, tenant, conversation)? {
                return Ok(false);
            }
        }
        let first = insert_items(&tx, tenant, chat, &response.inputs)?;
        let reply_id = reserve_message_ids(&tx, 1)?;
        let (prompt, completion) = match response.usage {
            Some((p, c)) => (Some(stored_count(p)), Some(stored_count(c))),
            None => (None, None),
        };
        tx.prepare_cached(&format!(
            "INSERT INTO messages (tenant, chat_id, id, role, content, created_at, model,
                                   prompt_tokens, completion_tokens, item_id)
             VALUES (?1, ?2, ?3, 'assistant', ?4, {NOW}, ?5, ?6, ?7, ?8)"
        ))?
        .execute(params![
            tenant,
            chat,
            reply_id,
            response.reply.content,
            response.model,
            prompt,
            completion,
            response.reply.id
        ])?;
        touch_chat(&tx, tenant, chat, response.inputs.len() + 1, reply_id)?;
        tx.prepare_cached(
            "INSERT INTO responses (tenant, response_id, chat_id, conversation_id,
                 previous_response_id, first_message_id, reply_message_id, created_at, echo,
                 idempotency_key, fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            tenant,
            response.id,
            chat,
            response.conversation_id,
            response.previous_response_id,
            first.unwrap_or(reply_id),
            reply_id,
            stored_count(response.created_at),
            response.echo,
            response.idempotency_key,
            response.fingerprint
        ])?;
        tx.commit()?;
        Ok(true)
    }

    fn insert_conversation(
        &mut self,
        tenant: &str,
        conversation: &Conversation,
        items: &[NewItem],
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO conversations (tenant, conversation_id, created_at, metadata)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            tenant,
            conversation.id,
            stored_count(conversation.created_at),
            conversation.metadata
        ])?;
        // The chat exists from the start, empty until its first item: a conversation is a chat.
        let newest: i64 = tx.query_row("SELECT next - 1 FROM message_ids", [], |r| r.get(0))?;
        insert_items(&tx, tenant, &conversation.id, items)?;
        let last: i64 = tx.query_row("SELECT next - 1 FROM message_ids", [], |r| r.get(0))?;
        touch_chat(&tx, tenant, &conversation.id, items.len(), last.max(newest))?;
        tx.commit()?;
        Ok(())
    }

    /// Appends items to a conversation; `None` when it does not exist.
    fn append_items(
        &mut self,
        tenant: &str,
        conversation: &str,
        items: &[NewItem],
    ) -> Result<Option<Vec<Item>>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !conversation_exists(&tx, tenant, conversation)? {
            return Ok(None);
        }
        let first = insert_items(&tx, tenant, conversation, items)?;
        let stored: Vec<Item> = items
            .iter()
            .zip(first.unwrap_or_default()..)
            .map(|(item, message_id)| Item {
                message_id,
                id: item.id.clone(),
                role: item.role.clone(),
                content: item.content.clone(),
            })
            .collect();
        if let Some(last) = stored.last() {
            touch_chat(&tx, tenant, conversation, items.len(), last.message_id)?;
        }
        tx.commit()?;
        Ok(Some(stored))
    }

    /// Deletes one item of a conversation; `false` when there was no such item.
    fn delete_item(
        &mut self,
        tenant: &str,
        conversation: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let Some(item) = self.item(tenant, conversation, id)? else {
            return Ok(false);
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached("DELETE FROM messages WHERE tenant = ?1 AND chat_id = ?2 AND id = ?3")?
            .execute(params![tenant, conversation, item.message_id])?;
        tx.prepare_cached(
            "UPDATE chats SET message_count = message_count - 1 WHERE tenant = ?1 AND chat_id = ?2",
        )?
        .execute(params![tenant, conversation])?;
        tx.commit()?;
        Ok(true)
    }

    /// Deletes a response: its row, and its messages unless they are a conversation's items
    /// (those stay the conversation's). A chat left empty goes too. `false` when there was no
    /// such response.
    fn delete_response(&mut self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let Some(found) = self.response(tenant, id)? else {
            return Ok(false);
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached("DELETE FROM responses WHERE tenant = ?1 AND response_id = ?2")?
            .execute(params![tenant, id])?;
        if found.conversation_id.is_none() {
            let last = found.reply_message_id;
            let removed = tx
                .prepare_cached(
                    "DELETE FROM messages WHERE tenant = ?1 AND chat_id = ?2
                     AND id BETWEEN ?3 AND ?4",
                )?
                .execute(params![tenant, found.chat_id, found.first_message_id, last])?;
            tx.prepare_cached(
                "UPDATE chats SET message_count = message_count - ?3
                 WHERE tenant = ?1 AND chat_id = ?2",
            )?
            .execute(params![tenant, found.chat_id, removed as i64])?;
            tx.prepare_cached(
                "DELETE FROM chats WHERE tenant = ?1 AND chat_id = ?2 AND message_count <= 0",
            )?
            .execute(params![tenant, found.chat_id])?;
        }
        tx.commit()?;
        Ok(true)
    }
}

fn conversation_exists(conn: &Connection, tenant: &str, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM conversations WHERE tenant = ?1 AND conversation_id = ?2")?
        .exists(params![tenant, id])?)
}

/// Inserts items in order with consecutive message ids; returns the first id (`None` for none).
fn insert_items(
    conn: &Connection,
    tenant: &str,
    chat_id: &str,
    items: &[NewItem],
) -> Result<Option<i64>, StoreError> {
    if items.is_empty() {
        return Ok(None);
    }
    let first = reserve_message_ids(conn, items.len())?;
    let mut insert = conn.prepare_cached(&format!(
        "INSERT INTO messages (tenant, chat_id, id, role, content, created_at, item_id)
         VALUES (?1, ?2, ?3, ?4, ?5, {NOW}, ?6)"
    ))?;
    for (item, id) in items.iter().zip(first..) {
        insert.execute(params![
            tenant,
            chat_id,
            id,
            item.role,
            item.content,
            item.id
        ])?;
    }
    Ok(Some(first))
}

/// Counts `added` messages into a chat, creating its row when it is new.
fn touch_chat(
    conn: &Connection,
    tenant: &str,
    chat_id: &str,
    added: usize,
    last_id: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT INTO chats (tenant, chat_id, created_at, updated_at, message_count, last_message_id)
         VALUES (?1, ?2, {NOW}, {NOW}, ?3, ?4)
         ON CONFLICT (tenant, chat_id) DO UPDATE SET updated_at = excluded.updated_at,
             message_count = message_count + excluded.message_count,
             last_message_id = max(last_message_id, excluded.last_message_id)"
    ))?
    .execute(params![tenant, chat_id, added as i64, last_id])?;
    Ok(())
}

impl Writer {
    /// Stores a response once its reply is in; `false` when its conversation was deleted
    /// meanwhile (nothing is stored then).
    pub fn store_response(&self, response: NewResponse) -> Result<bool, StoreError> {
        self.run_task(move |store| store.insert_response(&response))
    }

    /// Creates a conversation with its first items.
    pub fn create_conversation(
        &self,
        tenant: &str,
        conversation: Conversation,
        items: Vec<NewItem>,
    ) -> Result<(), StoreError> {
        let tenant = tenant.to_string();
        self.run_task(move |store| store.insert_conversation(&tenant, &conversation, &items))
    }

    /// Appends items to a conversation and returns them stored; `None` when it does not exist.
    pub fn append_items(
        &self,
        tenant: &str,
        conversation: &str,
        items: Vec<NewItem>,
    ) -> Result<Option<Vec<Item>>, StoreError> {
        let (tenant, conversation) = (tenant.to_string(), conversation.to_string());
        self.run_task(move |store| store.append_items(&tenant, &conversation, &items))
    }

    /// Deletes an item of a conversation; `false` when there was no such item.
    pub fn delete_item(
        &self,
        tenant: &str,
        conversation: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        let (tenant, conversation, id) =
            (tenant.to_string(), conversation.to_string(), id.to_string());
        self.run_task(move |store| store.delete_item(&tenant, &conversation, &id))
    }

    /// Deletes a response; `false` when there was no such response.
    pub fn delete_response(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.run_task(move |store| store.delete_response(&tenant, &id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_and_migrate(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        (dir, store)
    }

    fn item(id: &str, role: &str, content: &str) -> NewItem {
        NewItem {
            id: id.into(),
            role: role.into(),
            content: content.into(),
        }
    }

    fn response(id: &str, chat: &str, previous: Option<&str>, input: &str) -> NewResponse {
        NewResponse {
            tenant: "t".into(),
            id: id.into(),
            chat_id: chat.into(),
            conversation_id: None,
            previous_response_id: previous.map(str::to_string),
            inputs: vec![item(&format!("msg_in_{id}"), "user", input)],
            reply: item(
                &format!("msg_out_{id}"),
                "assistant",
                &format!("re {input}"),
            ),
            model: "m".into(),
            usage: Some((3, 4)),
            created_at: 7,
            echo: "{}".into(),
            idempotency_key: None,
            fingerprint: None,
        }
    }

    fn texts(messages: &[Message]) -> Vec<&str> {
        messages.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn a_chain_is_read_back_along_its_links_newest_first() {
        let (_d, mut s) = temp_store();
        s.insert_response(&response("resp_1", "resp_1", None, "a"))
            .unwrap();
        s.insert_response(&response("resp_2", "resp_1", Some("resp_1"), "b"))
            .unwrap();
        // A fork from the first response lives in the same chat but not in the chain.
        s.insert_response(&response("resp_x", "resp_1", Some("resp_1"), "x"))
            .unwrap();
        s.insert_response(&response("resp_3", "resp_1", Some("resp_2"), "c"))
            .unwrap();
        let chain = s.chain_messages("t", "resp_3", 10, 100).unwrap();
        assert_eq!(texts(&chain), ["re c", "c", "re b", "b", "re a", "a"]);
        assert_eq!(s.chain_messages("t", "resp_3", 2, 100).unwrap().len(), 4);
        assert_eq!(s.chain_messages("t", "resp_3", 10, 3).unwrap().len(), 3);
        assert!(s
            .chain_messages("other", "resp_3", 10, 100)
            .unwrap()
            .is_empty());
        let stored = s.response("t", "resp_3").unwrap().unwrap();
        assert_eq!(stored.reply.unwrap().id, "msg_out_resp_3");
        assert_eq!((stored.usage, stored.model.as_str()), (Some((3, 4)), "m"));
        assert_eq!(s.response("other", "resp_3").unwrap(), None);
        assert_eq!(s.list_chats("t", 10).unwrap()[0].message_count, 8);
    }

    #[test]
    fn deleting_a_response_removes_its_messages_and_ends_chains_there() {
        let (_d, mut s) = temp_store();
        s.insert_response(&response("resp_1", "resp_1", None, "a"))
            .unwrap();
        s.insert_response(&response("resp_2", "resp_1", Some("resp_1"), "b"))
            .unwrap();
        assert!(!s.delete_response("other", "resp_1").unwrap());
        assert!(s.delete_response("t", "resp_1").unwrap());
        assert!(!s.delete_response("t", "resp_1").unwrap());
        assert_eq!(
            texts(&s.chain_messages("t", "resp_2", 10, 100).unwrap()),
            ["re b", "b"]
        );
        assert!(s.delete_response("t", "resp_2").unwrap());
        assert!(s.list_chats("t", 10).unwrap().is_empty());
    }

    #[test]
    fn a_conversation_is_a_chat_whose_messages_are_its_items() {
        let (_d, mut s) = temp_store();
        let conversation = Conversation {
            id: "conv_1".into(),
            created_at: 5,
            metadata: "{}".into(),
        };
        s.insert_conversation("t", &conversation, &[item("msg_a", "user", "hi")])
            .unwrap();
        assert_eq!(s.conversation("t", "conv_1").unwrap(), Some(conversation));
        assert_eq!(s.conversation("u", "conv_1").unwrap(), None);
        let added = s
            .append_items(
                "t",
                "conv_1",
                &[item("msg_b", "assistant", "yo"), item("msg_c", "user", "q")],
            )
            .unwrap()
            .unwrap();
        assert_eq!(added.len(), 2);
        assert_eq!(s.append_items("u", "conv_1", &[]).unwrap(), None);
        let page = s
            .items("t", "conv_1", (0, i64::MAX), Order::Asc, 2)
            .unwrap();
        let ids: Vec<_> = page.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!((ids, page.has_more), (vec!["msg_a", "msg_b"], true));
        let newest = s
            .items("t", "conv_1", (0, i64::MAX), Order::Desc, 5)
            .unwrap();
        assert_eq!(newest.items[0].content, "q");
        assert_eq!(
            s.page("t", "conv_1", 10, None)
                .unwrap()
                .unwrap()
                .messages
                .len(),
            3
        );
        assert!(s.delete_item("t", "conv_1", "msg_b").unwrap());
        assert!(!s.delete_item("t", "conv_1", "msg_b").unwrap());
        assert_eq!(
            s.item("t", "conv_1", "msg_c").unwrap().unwrap().content,
            "q"
        );
        assert!(s.delete_chat("t", "conv_1").unwrap());
        assert_eq!(s.conversation("t", "conv_1").unwrap(), None);
    }

    #[test]
    fn a_response_in_a_deleted_conversation_is_not_stored() {
        let (_d, mut s) = temp_store();
        let mut r = response("resp_1", "conv_gone", None, "a");
        r.conversation_id = Some("conv_gone".into());
        assert!(!s.insert_response(&r).unwrap());
        assert!(s.list_chats("t", 10).unwrap().is_empty());
        assert_eq!(s.response("t", "resp_1").unwrap(), None);
    }

    #[test]
    fn a_message_stored_without_an_item_id_is_named_by_its_id() {
        let (_d, mut s) = temp_store();
        s.append_exchange(&crate::store::Exchange {
            tenant: "t".into(),
            chat_id: "c".into(),
            user: "u".into(),
            reply: "r".into(),
            model: "m".into(),
            usage: None,
            idempotency_key: None,
        })
        .unwrap();
        let found = s.item("t", "c", "msg_1").unwrap().unwrap();
        assert_eq!((found.id.as_str(), found.content.as_str()), ("msg_1", "u"));
    }

    #[test]
    fn a_version_3_database_migrates_to_keep_responses_and_migrating_again_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        let conn = Connection::open(&path).unwrap();
        for sql in &super::super::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO messages (tenant, chat_id, id, role, content, created_at)
                 VALUES ('t', 'c', 1, 'user', 'old', 'x'), ('t', 'c', 2, 'assistant', 'reply', 'x');
             INSERT INTO chats VALUES ('t', 'c', 'x', 'x', 2, 2);
             UPDATE message_ids SET next = 3;
             PRAGMA user_version = 3;",
        )
        .unwrap();
        drop(conn);
        let mut s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        assert_eq!(s.item("t", "c", "msg_2").unwrap().unwrap().content, "reply");
        s.insert_response(&response("resp_1", "c", None, "new"))
            .unwrap();
        drop(s);
        let s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let stored = s.response("t", "resp_1").unwrap().unwrap();
        assert_eq!((stored.first_message_id, stored.reply_message_id), (3, 4));
        let page = s.items("t", "c", (0, i64::MAX), Order::Asc, 10).unwrap();
        let ids: Vec<_> = page.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["msg_1", "msg_2", "msg_in_resp_1", "msg_out_resp_1"]);
    }
}
