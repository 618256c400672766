//! Moving chats between databases: `chatpool export`, `import` and `forget`.
//!
//! A chat travels as one JSON line holding its whole history, so a line is either applied whole
//! or not at all. Import is idempotent: a chat already there with the same messages is left
//! alone, one whose stored messages are the start of the line's gets only the rest, and one that
//! has messages the line lacks (it was written in both places) is refused and reported, never
//! merged by guess. Forget deletes a chat only while it still holds exactly the exported
//! messages, so a move (export, import into the new owner, forget on the old) cannot drop an
//! exchange that arrived in between.
//!
//! A bad line (not a record, a field out of bounds, a record the schema refuses) is reported
//! with its line number and the run goes on with the next; only a failing database or input
//! stops it.

use super::{remove_chat, reserve_message_ids, Store, StoreError};
use crate::validate;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, Write};

/// The longest message text a record may carry: the longest reply chatpool takes from an LLM
/// (`llm::wire::MAX_REPLY_BYTES`), and far above any user message a server accepts.
pub const MAX_CONTENT_BYTES: usize = 8 << 20;

/// Why a whole run stopped (a bad line only becomes a problem in the [`Report`]).
#[derive(Debug)]
pub enum TransferError {
    /// The database failed.
    Store(StoreError),
    /// The input could not be read.
    Input(io::Error),
    /// The output could not be written.
    Output(io::Error),
}

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransferError::Store(e) => e.fmt(f),
            TransferError::Input(e) => write!(f, "cannot read the input: {e}"),
            TransferError::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl std::error::Error for TransferError {}

impl From<StoreError> for TransferError {
    fn from(e: StoreError) -> Self {
        TransferError::Store(e)
    }
}

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
    /// Chats written out (export), stored or extended (import), or deleted (forget).
    pub chats: usize,
    /// Messages in those chats that were written out, stored or deleted.
    pub messages: usize,
    /// Chats left alone because they were already as asked.
    pub unchanged: usize,
    /// Problems, each naming its line and chat; the command exits non-zero when any.
    pub problems: Vec<String>,
    /// The tenants of the chats stored or extended (import).
    pub tenants: BTreeSet<String>,
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
/// is. A named chat that does not exist is a problem, not a silent skip; in a full export, a
/// chat deleted after the list was read is simply no longer there.
pub fn export(
    store: &mut Store,
    only: &[(String, String)],
    out: &mut dyn Write,
) -> Result<Report, TransferError> {
    let keys = if only.is_empty() {
        store.chat_keys()?
    } else {
        only.to_vec()
    };
    let mut report = Report::default();
    for (tenant, chat_id) in keys {
        let Some(record) = store.export_chat(&tenant, &chat_id)? else {
            if !only.is_empty() {
                report
                    .problems
                    .push(format!("no chat {chat_id} of tenant {tenant}"));
            }
            continue;
        };
        let line = serde_json::to_string(&record)
            .map_err(|e| TransferError::Output(io::Error::other(e)))?;
        writeln!(out, "{line}").map_err(TransferError::Output)?;
        report.chats += 1;
        report.messages += record.messages.len();
    }
    Ok(report)
}

/// Applies `apply` to each JSON line of `input`, collecting per-line problems instead of
/// stopping at the first, so one bad line does not hide the state of the others. `apply`
/// returns the problem with a record it could not apply.
fn each_record(
    input: &mut dyn BufRead,
    report: &mut Report,
    mut apply: impl FnMut(&ChatRecord, &mut Report) -> Result<Option<String>, StoreError>,
) -> Result<(), TransferError> {
    let mut bytes = Vec::new();
    for n in 1.. {
        bytes.clear();
        if input
            .read_until(b'\n', &mut bytes)
            .map_err(TransferError::Input)?
            == 0
        {
            break;
        }
        let problem = match std::str::from_utf8(&bytes) {
            Err(e) => Some(format!("not UTF-8 text: {e}")),
            Ok(line) if line.trim().is_empty() => None,
            Ok(line) => match parse_record(line) {
                Err(why) => Some(why),
                Ok(record) => match apply(&record, report) {
                    Err(StoreError::Constraint(e)) => Some(format!(
                        "chat {} of tenant {} cannot be stored: {e}",
                        record.chat_id, record.tenant
                    )),
                    outcome => outcome?,
                },
            },
        };
        if let Some(problem) = problem {
            report.problems.push(format!("line {n}: {problem}"));
        }
    }
    Ok(())
}

/// A line of export, checked as the API would check what it stores.
fn parse_record(line: &str) -> Result<ChatRecord, String> {
    let record: ChatRecord =
        serde_json::from_str(line).map_err(|e| format!("not a chat record: {e}"))?;
    validate::tenant(&record.tenant, "tenant")
        .and_then(|()| validate::chat_id(&record.chat_id, "chat_id"))
        .map_err(|e| format!("{e}: {:?}/{:?}", record.tenant, record.chat_id))?;
    let chat = &record.chat_id;
    if record.messages.is_empty() {
        return Err(format!("chat {chat} has no messages"));
    }
    for time in [&record.created_at, &record.updated_at] {
        if !is_timestamp(time) {
            return Err(format!(
                "chat {chat}: {time:?} is not a time such as 2026-11-29T10:00:00Z"
            ));
        }
    }
    let mut keys = BTreeSet::new();
    for (i, m) in record.messages.iter().enumerate() {
        let problem = if m.role != "user" && m.role != "assistant" {
            Some(format!("unknown role {:?}", m.role))
        } else if m.content.len() > MAX_CONTENT_BYTES {
            Some(format!(
                "{} bytes of text, over {MAX_CONTENT_BYTES}",
                m.content.len()
            ))
        } else if !is_timestamp(&m.created_at) {
            Some(format!(
                "created_at {:?} is not a time such as 2026-11-29T10:00:00Z",
                m.created_at
            ))
        } else if m.idempotency_key.as_ref().is_some_and(|k| !keys.insert(k)) {
            Some("its idempotency key is used twice in the chat".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(format!("chat {chat}, message {}: {problem}", i + 1));
        }
    }
    Ok(record)
}

/// Whether `text` is a UTC time as chatpool stores it: `YYYY-MM-DDTHH:MM:SSZ`, optionally with
/// a fraction of a second.
fn is_timestamp(text: &str) -> bool {
    let Some(body) = text.strip_suffix('Z') else {
        return false;
    };
    let (time, fraction) = body.split_once('.').unwrap_or((body, "0"));
    if fraction.is_empty() || !fraction.bytes().all(|c| c.is_ascii_digit()) || time.len() != 19 {
        return false;
    }
    let shape = time.bytes().enumerate().all(|(i, c)| match i {
        4 | 7 => c == b'-',
        10 => c == b'T',
        13 | 16 => c == b':',
        _ => c.is_ascii_digit(),
    });
    let field = |range: std::ops::Range<usize>| time[range].parse::<u32>().unwrap_or(u32::MAX);
    shape
        && (1..=12).contains(&field(5..7))
        && (1..=31).contains(&field(8..10))
        && field(11..13) <= 23
        && field(14..16) <= 59
        && field(17..19) <= 60
}

/// Imports every JSON line of `input`; see [`Store::import_chat`].
pub fn import(store: &mut Store, input: &mut dyn BufRead) -> Result<Report, TransferError> {
    let mut report = Report::default();
    each_record(input, &mut report, |record, report| {
        Ok(match store.import_chat(record)? {
            Imported::New(n) | Imported::Extended(n) => {
                report.chats += 1;
                report.messages += n;
                report.tenants.insert(record.tenant.clone());
                None
            }
            Imported::AlreadyPresent => {
                report.unchanged += 1;
                None
            }
            Imported::Diverged => Some(format!(
                "chat {} of tenant {} holds messages the record lacks; left as it was",
                record.chat_id, record.tenant
            )),
        })
    })?;
    Ok(report)
}

/// Forgets every chat of `input` that still matches its line; see [`Store::forget_chat`].
pub fn forget(store: &mut Store, input: &mut dyn BufRead) -> Result<Report, TransferError> {
    let mut report = Report::default();
    each_record(input, &mut report, |record, report| {
        Ok(match store.forget_chat(record)? {
            Forgotten::Deleted => {
                report.chats += 1;
                report.messages += record.messages.len();
                None
            }
            Forgotten::Absent => {
                report.unchanged += 1;
                None
            }
            Forgotten::Changed => Some(format!(
                "chat {} of tenant {} changed since the export; kept",
                record.chat_id, record.tenant
            )),
        })
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

    #[test]
    fn a_record_the_schema_refuses_is_named_by_line_and_the_rest_imported() {
        let dir = tempfile::tempdir().unwrap();
        let mut from = store(&dir, "a.db");
        say(&mut from, "c1", "one");
        say(&mut from, "c2", "two");
        let good = lines(&mut from);
        let mut bad: ChatRecord = serde_json::from_str(good.lines().next().unwrap()).unwrap();
        bad.chat_id = "dup".into();
        bad.messages.extend(bad.messages.clone());
        let mut huge = bad.clone();
        huge.chat_id = "huge".into();
        huge.messages.truncate(2);
        huge.messages[0].content = "x".repeat(MAX_CONTENT_BYTES + 1);
        let mut late = huge.clone();
        late.chat_id = "late".into();
        late.messages[0].content = "ok".into();
        late.messages[1].created_at = "yesterday".into();
        let input = format!(
            "{}\n\u{7f}\n{}\n{}\n{}",
            serde_json::to_string(&bad).unwrap(),
            serde_json::to_string(&huge).unwrap(),
            serde_json::to_string(&late).unwrap(),
            good
        );
        let mut bytes = input.into_bytes();
        let at = bytes.iter().position(|b| *b == 0x7f).unwrap();
        bytes[at] = 0xff;
        let mut to = store(&dir, "b.db");
        let report = import(&mut to, &mut &bytes[..]).unwrap();
        assert_eq!((report.chats, report.messages), (2, 4), "{report:?}");
        let problems = &report.problems;
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems[0].starts_with("line 1: chat dup, message 4:")
                && problems[0].contains("twice"),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].starts_with("line 2: not UTF-8"),
            "{}",
            problems[1]
        );
        assert!(
            problems[2].starts_with("line 3: chat huge, message 1:"),
            "{}",
            problems[2]
        );
        assert!(
            problems[3].starts_with("line 4: chat late, message 2:")
                && problems[3].contains("yesterday")
        );
        assert_eq!(lines(&mut to), good);
        assert_eq!(report.tenants, BTreeSet::from([DEFAULT_TENANT.to_string()]));
    }

    #[test]
    fn the_summary_counts_chats_changed_not_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut from = store(&dir, "a.db");
        say(&mut from, "c1", "one");
        say(&mut from, "c2", "two");
        let exported = lines(&mut from);
        let mut to = store(&dir, "b.db");
        import(&mut to, &mut exported.lines().next().unwrap().as_bytes()).unwrap();
        let again = import(&mut to, &mut exported.as_bytes()).unwrap();
        assert_eq!((again.chats, again.messages, again.unchanged), (1, 2, 1));
    }

    /// Output that deletes a chat through another connection when the export writes its first
    /// line, as a server would while the export runs.
    struct DeletingOutput {
        path: std::path::PathBuf,
        chat: &'static str,
        written: Vec<u8>,
    }

    impl Write for DeletingOutput {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.written.is_empty() {
                let mut other = Store::open(&self.path, Synchronous::Normal).unwrap();
                let tx = other.conn.transaction().unwrap();
                assert!(remove_chat(&tx, DEFAULT_TENANT, self.chat).unwrap());
                tx.commit().unwrap();
            }
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_export_survives_chats_deleted_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(&dir, "a.db");
        for chat in ["c1", "c2", "c3"] {
            say(&mut s, chat, "hi");
        }
        let mut out = DeletingOutput {
            path: dir.path().join("a.db"),
            chat: "c2",
            written: Vec::new(),
        };
        let report = export(&mut s, &[], &mut out).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.chats, 2);
        let text = String::from_utf8(out.written).unwrap();
        assert!(text.contains("\"c1\"") && text.contains("\"c3\"") && !text.contains("\"c2\""));
        // A chat named on the command line that is not there is still a problem.
        let named = export(
            &mut s,
            &[(DEFAULT_TENANT.into(), "c2".into())],
            &mut io::sink(),
        )
        .unwrap();
        assert_eq!(named.problems.len(), 1);
    }

    #[test]
    fn timestamps_are_checked_for_shape_and_range() {
        for good in [
            "2026-11-29T10:00:00Z",
            "2026-11-29T23:59:60Z",
            "2026-01-01T00:00:00.123Z",
        ] {
            assert!(is_timestamp(good), "{good}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-11-29 10:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29T10:00:00",
            "2026-11-29T10:00:00.Z",
            "+026-11-29T10:00:00Z",
            "2026-11-29T10:00:00+01:00",
        ] {
            assert!(!is_timestamp(bad), "{bad}");
        }
        assert_eq!(MAX_CONTENT_BYTES, crate::llm::wire::MAX_REPLY_BYTES);
    }
}
