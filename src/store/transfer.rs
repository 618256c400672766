//! Moving chats between databases: `chatpool export`, `import` and `forget`.
//!
//! A chat travels as one JSON line holding its whole history, so a line is either applied whole
//! or not at all. Import is idempotent: a chat already there with the same messages is left
//! alone, one whose stored messages are the start of the line's gets only the rest, and one that
//! has messages the line lacks (it was written in both places) is refused and reported, never
//! merged by guess. Forget deletes a chat only while it still holds exactly the exported
//! messages, so a move (export, import into the new owner, forget on the old) cannot drop an
//! exchange that arrived in between.

use super::{remove_chat, reserve_message_ids, Store, StoreError};
use crate::api::route::is_valid_chat_id;
use crate::config::is_valid_tenant;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// One chat and its whole history, as a line of `chatpool export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRecord {
    /// The tenant that owns the chat.
    pub tenant: String,
    /// The chat's id.
    pub chat_id: String,
    /// When its first message was stored.
    pub created_at: String,
    /// When its last message was stored.
    pub updated_at: String,
    /// Every message, oldest first.
    pub messages: Vec<MessageRecord>,
}

/// One message of a [`ChatRecord`], with everything stored beside its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRecord {
    /// `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
    /// When it was stored.
    pub created_at: String,
    /// The model that wrote a reply.
    pub model: Option<String>,
    /// Prompt tokens of a reply, when the LLM gave them.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens of a reply, when the LLM gave them.
    pub completion_tokens: Option<i64>,
    /// The client's `Idempotency-Key` of a reply, so replays still work after a move.
    pub idempotency_key: Option<String>,
}

impl MessageRecord {
    /// What makes two copies of a message the same message.
    fn same_as(&self, other: &MessageRecord) -> bool {
        (&self.role, &self.content, &self.created_at)
            == (&other.role, &other.content, &other.created_at)
    }
}

/// What importing one chat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// The chat was not there; all its messages were stored.
    New(usize),
    /// The chat held the start of the history; this many later messages were added.
    Extended(usize),
    /// The chat already held every message.
    AlreadyPresent,
    /// The chat holds messages the record lacks; nothing was changed.
    Diverged,
}

/// What forgetting one chat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// The chat held exactly the record's messages and is deleted.
    Deleted,
    /// The chat was not there.
    Absent,
    /// The chat no longer matches the record (it got new messages); nothing was deleted.
    Changed,
}

/// Counts of a whole run, for the summary line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Chats read or written.
    pub chats: usize,
    /// Messages stored (import) or written out (export).
    pub messages: usize,
    /// Chats left alone because they were already as asked.
    pub unchanged: usize,
    /// Problems, each naming its line and chat; the command exits non-zero when any.
    pub problems: Vec<String>,
}

impl Store {
    /// Every chat, as (tenant, chat_id), in a stable order.
    pub fn chat_keys(&mut self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT tenant, chat_id FROM chats ORDER BY tenant, chat_id")?;
        let keys = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(keys.collect::<Result<_, _>>()?)
    }

    /// A chat and its whole history, read in one transaction; `None` if it does not exist.
    pub fn export_chat(
        &mut self,
        tenant: &str,
        chat_id: &str,
    ) -> Result<Option<ChatRecord>, StoreError> {
        let tx = self.conn.transaction()?;
        let Some((created_at, updated_at)) = tx
            .query_row(
                "SELECT created_at, updated_at FROM chats WHERE tenant = ?1 AND chat_id = ?2",
                params![tenant, chat_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let messages = read_messages(&tx, tenant, chat_id)?;
        Ok(Some(ChatRecord {
            tenant: tenant.to_string(),
            chat_id: chat_id.to_string(),
            created_at,
            updated_at,
            messages,
        }))
    }

    /// Stores what the record has that this database lacks; see the module's rules.
    pub fn import_chat(&mut self, record: &ChatRecord) -> Result<Imported, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = read_messages(&tx, &record.tenant, &record.chat_id)?;
        let is_prefix =
            stored.len() <= record.messages.len() && same_start(&stored, &record.messages);
        if !is_prefix {
            return Ok(Imported::Diverged);
        }
        let missing = &record.messages[stored.len()..];
        if missing.is_empty() {
            return Ok(Imported::AlreadyPresent);
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (tenant, chat_id, id, role, content, created_at, model,
                                   prompt_tokens, completion_tokens, idempotency_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let first_id = reserve_message_ids(&tx, missing.len())?;
        let last_id = first_id + missing.len() as i64 - 1;
        for (id, m) in (first_id..).zip(missing) {
            insert.execute(params![
                record.tenant,
                record.chat_id,
                id,
                m.role,
                m.content,
                m.created_at,
                m.model,
                m.prompt_tokens,
                m.completion_tokens,
                m.idempotency_key
            ])?;
        }
        drop(insert);
        tx.execute(
            "INSERT INTO chats (tenant, chat_id, created_at, updated_at, message_count,
                                last_message_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant, chat_id) DO UPDATE SET updated_at = excluded.updated_at,
                 message_count = message_count + excluded.message_count,
                 last_message_id = excluded.last_message_id",
            params![
                record.tenant,
                record.chat_id,
                record.created_at,
                record.updated_at,
                missing.len() as i64,
                last_id
            ],
        )?;
        tx.commit()?;
        Ok(if stored.is_empty() {
            Imported::New(missing.len())
        } else {
            Imported::Extended(missing.len())
        })
    }

    /// Deletes the chat if it holds exactly the record's messages; see the module's rules.
    pub fn forget_chat(&mut self, record: &ChatRecord) -> Result<Forgotten, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = read_messages(&tx, &record.tenant, &record.chat_id)?;
        if stored.is_empty() {
            return Ok(Forgotten::Absent);
        }
        let same = stored.len() == record.messages.len() && same_start(&stored, &record.messages);
        if !same {
            return Ok(Forgotten::Changed);
        }
        remove_chat(&tx, &record.tenant, &record.chat_id)?;
        tx.commit()?;
        Ok(Forgotten::Deleted)
    }
}

/// Whether the two histories agree as far as the shorter goes.
fn same_start(a: &[MessageRecord], b: &[MessageRecord]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.same_as(y))
}

fn read_messages(
    conn: &rusqlite::Connection,
    tenant: &str,
    chat_id: &str,
) -> Result<Vec<MessageRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT role, content, created_at, model, prompt_tokens, completion_tokens,
                idempotency_key
         FROM messages WHERE tenant = ?1 AND chat_id = ?2 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![tenant, chat_id], |r| {
        Ok(MessageRecord {
            role: r.get(0)?,
            content: r.get(1)?,
            created_at: r.get(2)?,
            model: r.get(3)?,
            prompt_tokens: r.get(4)?,
            completion_tokens: r.get(5)?,
            idempotency_key: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Writes chats as JSON lines: the ones named (as tenant and chat id), or every chat when none
/// is. A named chat that does not exist is a problem, not a silent skip.
pub fn export(
    store: &mut Store,
    only: &[(String, String)],
    out: &mut dyn Write,
) -> Result<Report, StoreError> {
    let keys = if only.is_empty() {
        store.chat_keys()?
    } else {
        only.to_vec()
    };
    let mut report = Report::default();
    for (tenant, chat_id) in keys {
        match store.export_chat(&tenant, &chat_id)? {
            Some(record) => {
                let line = serde_json::to_string(&record)
                    .map_err(|e| StoreError::Sqlite(format!("cannot encode {chat_id}: {e}")))?;
                writeln!(out, "{line}")
                    .map_err(|e| StoreError::Unavailable(format!("cannot write: {e}")))?;
                report.chats += 1;
                report.messages += record.messages.len();
            }
            None => report
                .problems
                .push(format!("no chat {chat_id} of tenant {tenant}")),
        }
    }
    Ok(report)
}

/// Applies `apply` to each JSON line of `input`, collecting per-line problems instead of
/// stopping at the first, so one bad line does not hide the state of the others.
fn each_record(
    input: &mut dyn BufRead,
    report: &mut Report,
    mut apply: impl FnMut(&ChatRecord, &mut Report) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| StoreError::Unavailable(format!("cannot read input: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = match parse_record(&line) {
            Ok(record) => record,
            Err(why) => {
                report.problems.push(format!("line {}: {why}", n + 1));
                continue;
            }
        };
        report.chats += 1;
        apply(&record, report)?;
    }
    Ok(())
}

/// A line of export, checked as the API would check what it stores.
fn parse_record(line: &str) -> Result<ChatRecord, String> {
    let record: ChatRecord =
        serde_json::from_str(line).map_err(|e| format!("not a chat record: {e}"))?;
    if !is_valid_tenant(&record.tenant) {
        return Err(format!("invalid tenant {:?}", record.tenant));
    }
    if !is_valid_chat_id(&record.chat_id) {
        return Err(format!("invalid chat_id {:?}", record.chat_id));
    }
    if record.messages.is_empty() {
        return Err(format!("chat {} has no messages", record.chat_id));
    }
    if let Some(m) = record
        .messages
        .iter()
        .find(|m| m.role != "user" && m.role != "assistant")
    {
        return Err(format!(
            "chat {}: unknown role {:?}",
            record.chat_id, m.role
        ));
    }
    Ok(record)
}

/// Imports every JSON line of `input`; see [`Store::import_chat`].
pub fn import(store: &mut Store, input: &mut dyn BufRead) -> Result<Report, StoreError> {
    let mut report = Report::default();
    each_record(input, &mut report, |record, report| {
        match store.import_chat(record)? {
            Imported::New(n) | Imported::Extended(n) => report.messages += n,
            Imported::AlreadyPresent => report.unchanged += 1,
            Imported::Diverged => report.problems.push(format!(
                "chat {} of tenant {} holds messages the record lacks; left as it was",
                record.chat_id, record.tenant
            )),
        }
        Ok(())
    })?;
    Ok(report)
}

/// Forgets every chat of `input` that still matches its line; see [`Store::forget_chat`].
pub fn forget(store: &mut Store, input: &mut dyn BufRead) -> Result<Report, StoreError> {
    let mut report = Report::default();
    each_record(input, &mut report, |record, report| {
        match store.forget_chat(record)? {
            Forgotten::Deleted => report.messages += record.messages.len(),
            Forgotten::Absent => report.unchanged += 1,
            Forgotten::Changed => report.problems.push(format!(
                "chat {} of tenant {} changed since the export; kept",
                record.chat_id, record.tenant
            )),
        }
        Ok(())
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::{Exchange, DEFAULT_TENANT};

    fn store(dir: &tempfile::TempDir, name: &str) -> Store {
        Store::open_and_migrate(&dir.path().join(name), Synchronous::Normal).unwrap()
    }

    fn say(store: &mut Store, chat: &str, text: &str) {
        store
            .append_exchange(&Exchange {
                tenant: DEFAULT_TENANT.into(),
                chat_id: chat.into(),
                user: text.into(),
                reply: format!("re: {text}"),
                model: "m".into(),
                usage: Some((1, 2)),
                idempotency_key: Some(format!("k-{text}")),
            })
            .unwrap();
    }

    fn lines(store: &mut Store) -> String {
        let mut out = Vec::new();
        export(store, &[], &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn export_then_import_copies_every_field_and_twice_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut from = store(&dir, "a.db");
        say(&mut from, "c1", "one");
        say(&mut from, "c1", "two");
        say(&mut from, "c2", "three");
        let exported = lines(&mut from);
        assert_eq!(exported.lines().count(), 2);

        let mut to = store(&dir, "b.db");
        let first = import(&mut to, &mut exported.as_bytes()).unwrap();
        assert_eq!((first.chats, first.messages, first.unchanged), (2, 6, 0));
        assert!(first.problems.is_empty());
        assert_eq!(lines(&mut to), exported);
        let again = import(&mut to, &mut exported.as_bytes()).unwrap();
        assert_eq!((again.messages, again.unchanged), (0, 2));
        assert_eq!(lines(&mut to), exported);
        let replay = to.find_reply(DEFAULT_TENANT, "c1", "k-two").unwrap();
        assert_eq!(replay.unwrap().content, "re: two");
    }

    #[test]
    fn import_adds_a_missing_tail_and_refuses_a_diverged_chat() {
        let dir = tempfile::tempdir().unwrap();
        let mut from = store(&dir, "a.db");
        say(&mut from, "c1", "one");
        let early = lines(&mut from);
        say(&mut from, "c1", "two");
        let late = lines(&mut from);

        let mut to = store(&dir, "b.db");
        import(&mut to, &mut early.as_bytes()).unwrap();
        let tail = import(&mut to, &mut late.as_bytes()).unwrap();
        assert_eq!(tail.messages, 2);
        assert_eq!(lines(&mut to), late);

        let mut other = store(&dir, "c.db");
        say(&mut other, "c1", "elsewhere");
        let diverged = import(&mut other, &mut late.as_bytes()).unwrap();
        assert_eq!(diverged.messages, 0);
        assert_eq!(diverged.problems.len(), 1, "{:?}", diverged.problems);
        assert_eq!(
            other
                .export_chat(DEFAULT_TENANT, "c1")
                .unwrap()
                .unwrap()
                .messages
                .len(),
            2
        );
    }

    #[test]
    fn forget_deletes_only_a_chat_that_still_matches() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(&dir, "a.db");
        say(&mut s, "kept", "one");
        say(&mut s, "gone", "one");
        let exported = lines(&mut s);
        say(&mut s, "kept", "two");
        let report = forget(&mut s, &mut exported.as_bytes()).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("kept"));
        assert!(s.export_chat(DEFAULT_TENANT, "gone").unwrap().is_none());
        assert_eq!(
            s.export_chat(DEFAULT_TENANT, "kept")
                .unwrap()
                .unwrap()
                .messages
                .len(),
            4
        );
        let again = forget(&mut s, &mut exported.as_bytes()).unwrap();
        assert_eq!(again.unchanged, 1);
    }

    #[test]
    fn bad_lines_are_reported_by_number_and_the_rest_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut from = store(&dir, "a.db");
        say(&mut from, "c1", "one");
        let good = lines(&mut from);
        let input = format!(
            "not json\n{good}{}\n",
            good.replace("\"c1\"", "\"bad id!\"").trim_end()
        );
        let mut to = store(&dir, "b.db");
        let report = import(&mut to, &mut input.as_bytes()).unwrap();
        assert_eq!(report.chats, 1);
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert!(report.problems[0].starts_with("line 1:"));
        assert!(report.problems[1].starts_with("line 3:"));
    }
}
