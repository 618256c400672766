//! Storage: chats and their messages in one SQLite file.
//!
//! A [`Store`] is one connection with its own statement cache, used by one thread at a time:
//! workers borrow one of a few shared read connections ([`Readers`]) for a read, and hand their
//! exchanges to the one [`Writer`] thread, which commits them in groups; SQLite's WAL lets the
//! readers run beside it. The schema is an append-only list of migrations indexed by
//! `PRAGMA user_version`, applied in one transaction at start-up; a database newer than this
//! code, or one that is not chatpool's, is refused rather than touched.

use crate::config::Synchronous;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Schema versions, oldest first. Append only: a released entry never changes.
const MIGRATIONS: &[&str] = &[
    // 1: chats, their messages, and idempotency keys stored with the reply they produced.
    "CREATE TABLE chats (
        chat_id TEXT PRIMARY KEY NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        message_count INTEGER NOT NULL,
        last_message_id INTEGER NOT NULL
    );
    CREATE INDEX chats_by_recency ON chats(last_message_id);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at TEXT NOT NULL,
        model TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        idempotency_key TEXT
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    CREATE UNIQUE INDEX messages_by_idempotency_key ON messages(chat_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;",
    // 2: chats belong to tenants; everything stored before auth goes to the default tenant.
    "CREATE TABLE chats_by_tenant (
        tenant TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        message_count INTEGER NOT NULL,
        last_message_id INTEGER NOT NULL,
        PRIMARY KEY (tenant, chat_id)
    );
    INSERT INTO chats_by_tenant
        SELECT 'default', chat_id, created_at, updated_at, message_count, last_message_id FROM chats;
    DROP TABLE chats;
    ALTER TABLE chats_by_tenant RENAME TO chats;
    CREATE INDEX chats_by_recency ON chats(tenant, last_message_id);
    ALTER TABLE messages ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    DROP INDEX messages_by_chat;
    CREATE INDEX messages_by_chat ON messages(tenant, chat_id, id);
    DROP INDEX messages_by_idempotency_key;
    CREATE UNIQUE INDEX messages_by_idempotency_key ON messages(tenant, chat_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;",
    // 3: a chat's messages stored together, in one B-tree ordered by (tenant, chat, id), so that
    // reading a history window touches a page or two instead of one page per message; message
    // ids, still global and increasing, come from a counter in place of AUTOINCREMENT.
    "CREATE TABLE message_ids (next INTEGER NOT NULL);
    INSERT INTO message_ids SELECT max(
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
        coalesce((SELECT max(id) FROM messages), 0)) + 1;
    CREATE TABLE messages_clustered (
        tenant TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        id INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at TEXT NOT NULL,
        model TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        idempotency_key TEXT,
        PRIMARY KEY (tenant, chat_id, id)
    ) WITHOUT ROWID;
    INSERT INTO messages_clustered
        SELECT tenant, chat_id, id, role, content, created_at, model, prompt_tokens,
               completion_tokens, idempotency_key
        FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_clustered RENAME TO messages;
    CREATE UNIQUE INDEX messages_by_idempotency_key ON messages(tenant, chat_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;",
    // 4: LLM calls and their tokens by tenant, UTC day and model, kept apart from the chats so
    // that deleting a chat (or relaying without one) leaves what was spent on record; seeded
    // from the replies stored so far.
    "CREATE TABLE usage (
        tenant TEXT NOT NULL,
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        PRIMARY KEY (tenant, day, model)
    ) WITHOUT ROWID;
    INSERT INTO usage
        SELECT tenant, substr(created_at, 1, 10), coalesce(model, ''), count(*),
               coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
        FROM messages WHERE role = 'assistant' GROUP BY 1, 2, 3;",
    // 5: OpenAI's Responses and Conversations, kept in chats: a message may carry the item id
    // those APIs named it by; a response maps its id to the run of messages it stored in a
    // chat (its inputs, then its reply); a conversation is a chat with an id, a creation time
    // and metadata of its own.
    "ALTER TABLE messages ADD COLUMN item_id TEXT;
    CREATE UNIQUE INDEX messages_by_item_id ON messages(tenant, chat_id, item_id)
        WHERE item_id IS NOT NULL;
    CREATE TABLE responses (
        tenant TEXT NOT NULL,
        response_id TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        conversation_id TEXT,
        previous_response_id TEXT,
        first_message_id INTEGER NOT NULL,
        reply_message_id INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        echo TEXT NOT NULL,
        idempotency_key TEXT,
        fingerprint TEXT,
        PRIMARY KEY (tenant, response_id)
    ) WITHOUT ROWID;
    CREATE INDEX responses_by_chat ON responses(tenant, chat_id);
    CREATE UNIQUE INDEX responses_by_idempotency_key ON responses(tenant, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE conversations (
        tenant TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (tenant, conversation_id)
    ) WITHOUT ROWID;",
];

/// The tenant that owns every chat while auth is off, and every chat stored before it existed.
pub const DEFAULT_TENANT: &str = "default";

/// How long a statement waits for another connection's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// WAL length, in pages, past which a checkpoint restarts it: 16 MiB of 4 KiB pages, a few
/// seconds of heavy traffic. Bounds the WAL file and its index (32 KiB per 4,096 frames).
const WAL_RESTART_FRAMES: i64 = 4096;

/// SQL for "now" in the API's timestamp format.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')";

mod memory;
mod readers;
mod recent;
mod responses;
pub mod transfer;
pub mod usage;
mod writer;

pub use memory::{sqlite_memory, SqliteMemory};
pub use readers::{Reader, Readers, MAX_READERS, READ_CACHE_KIB};
pub use recent::{Recent, WATCH_EVERY};
pub use responses::{Conversation, Item, ItemPage, NewItem, NewResponse, Order, StoredResponse};
pub use writer::{Unstored, Writer};

/// What can go wrong with the database.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The database stayed locked by another writer for longer than the busy timeout.
    Busy,
    /// The disk is full or read-only, the file cannot be read or written, or the connection or
    /// thread that would do the work is gone.
    Unavailable(Cause),
    /// The file is not a chatpool database, or one from a newer chatpool.
    Schema(String),
    /// SQLite would not put the database in WAL mode (it reported this journal mode instead),
    /// which the writer and the readers beside it need.
    NotWal(String),
    /// The SQLite library linked in is too old to run chatpool safely; see [`check_sqlite`].
    OldSqlite(String),
    /// What was to be stored breaks a rule of the schema (such as an idempotency key used
    /// twice in one chat); the database is fine.
    Constraint(Cause),
    /// Any other SQLite failure.
    Sqlite(Cause),
}

/// What went wrong underneath a [`StoreError`], kept whole as its `source()`. Shared, since
/// the failure of one batch is the answer to each exchange in it.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    /// A cause that is only a message: no error value lies beneath it.
    pub fn message(text: impl Into<String>) -> Cause {
        let boxed: Box<dyn std::error::Error + Send + Sync> = text.into().into();
        Cause(Arc::from(boxed))
    }

    fn of(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(Arc::new(e))
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Busy => write!(f, "the database is locked by another writer"),
            StoreError::Unavailable(e) => write!(f, "the database cannot be used: {e}"),
            StoreError::Schema(why) => f.write_str(why),
            StoreError::NotWal(mode) => write!(
                f,
                "cannot switch the database to WAL (journal_mode is {mode})"
            ),
            StoreError::OldSqlite(version) => write!(
                f,
                "SQLite {version} is linked in, older than {OLDEST_SAFE_SQLITE}: its WAL-reset bug \
                 can corrupt the database when two connections write or checkpoint at once; \
                 build chatpool with its bundled SQLite"
            ),
            StoreError::Constraint(e) | StoreError::Sqlite(e) => write!(f, "SQLite: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(e) | StoreError::Constraint(e) | StoreError::Sqlite(e) => {
                Some(&*e.0)
            }
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy,
            Some(ConstraintViolation) => StoreError::Constraint(Cause::of(e)),
            Some(DiskFull | ReadOnly | SystemIoFailure | CannotOpen | PermissionDenied) => {
                StoreError::Unavailable(Cause::of(e))
            }
            _ => StoreError::Sqlite(Cause::of(e)),
        }
    }
}

/// The database's schema version, or why chatpool must not touch the file: it is not SQLite,
/// it holds tables but no chatpool schema, or its schema is newer than this code.
///
/// Version and tables are read in one statement, so in one snapshot: another process may be
/// migrating the same fresh file at this moment, and two reads could see no version and then
/// its tables.
fn schema_version(conn: &Connection) -> Result<usize, StoreError> {
    let (version, tables): (i64, i64) = conn.query_row(
        "SELECT (SELECT user_version FROM pragma_user_version),
                (SELECT count(*) FROM sqlite_master WHERE type = 'table')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Ok(version) = usize::try_from(version) else {
        return Err(StoreError::Schema(format!(
            "the database has schema version {version}, which no chatpool writes; \
             refusing to touch it"
        )));
    };
    if version > MIGRATIONS.len() {
        return Err(StoreError::Schema(format!(
            "the database has schema version {version}, newer than this chatpool knows ({}); \
             refusing to touch it",
            MIGRATIONS.len()
        )));
    }
    if version == 0 && tables > 0 {
        return Err(StoreError::Schema(
            "the file holds tables but is not a chatpool database; refusing to touch it".into(),
        ));
    }
    Ok(version)
}

/// One stored message, as history and the API see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Increasing over the whole database, never reused.
    pub id: i64,
    /// `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
    /// RFC 3339, UTC, seconds.
    pub created_at: String,
}

/// A reply stored with an idempotency key, enough to answer a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    /// The reply's message id.
    pub message_id: i64,
    /// The reply text.
    pub content: String,
    /// The model that wrote it.
    pub model: String,
    /// Token counts, when the LLM gave them.
    pub usage: Option<(u64, u64)>,
}

/// The exchange to store after the LLM answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The tenant that owns the chat.
    pub tenant: String,
    /// The chat it belongs to.
    pub chat_id: String,
    /// The user's message.
    pub user: String,
    /// The LLM's reply.
    pub reply: String,
    /// The model that wrote it.
    pub model: String,
    /// Prompt and completion tokens, when the LLM gave them.
    pub usage: Option<(u64, u64)>,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
}

/// A page of a chat's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The messages, oldest first.
    pub messages: Vec<Message>,
    /// Whether older messages exist before the first one.
    pub has_more: bool,
}

/// One row of the chat list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSummary {
    /// The chat's id.
    pub chat_id: String,
    /// Messages in it.
    pub message_count: i64,
    /// When its first message was stored.
    pub created_at: String,
    /// When its last message was stored.
    pub updated_at: String,
}

/// A connection to the database, owned by one thread.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens the file (creating it when missing), sets the pragmas and brings the schema up to
    /// date. Call once at start-up, before any other connection is opened with [`Store::open`].
    ///
    /// Another process may be doing the same to the same fresh file (a server started beside
    /// `chatpool import`). SQLite answers "busy" at once, without waiting, to one of two
    /// connections that both try to switch a file to WAL, so a busy start is tried again
    /// until the busy timeout has passed.
    pub fn open_and_migrate(path: &Path, sync: Synchronous) -> Result<Store, StoreError> {
        check_sqlite(rusqlite::version(), rusqlite::version_number())?;
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Store::try_open_and_migrate(path, sync) {
                Err(StoreError::Busy) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(fastrand::u64(5..50)));
                }
                outcome => return outcome,
            }
        }
    }

    fn try_open_and_migrate(path: &Path, sync: Synchronous) -> Result<Store, StoreError> {
        // Checked on a read-only connection first: switching a file to WAL already writes to it.
        if path.exists() {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            schema_version(&Connection::open_with_flags(path, flags)?)?;
        }
        let mut store = Store::open(path, sync)?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens a connection to a database that is already migrated.
    pub fn open(path: &Path, sync: Synchronous) -> Result<Store, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL is a property of the file and cannot change inside a transaction, so it is set
        // here, before any migration runs.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal(mode));
        }
        let sync = match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        // No memory map (mmap_size stays 0): in WAL mode a connection drops its whole map
        // whenever another connection has committed since its last read, and each unmapping
        // stops every CPU running a thread of this process to flush its TLB. With a commit
        // every few hundred microseconds that costs more than the system calls the map saves
        // (measured with ../shared/bench: more requests a second without it, and less RSS).
        conn.execute_batch(&format!("PRAGMA synchronous = {sync};"))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Store { conn })
    }

    /// Opens a connection that can only read (SQLite refuses any write on it), to a database
    /// that is already migrated.
    pub fn open_read_only(path: &Path, sync: Synchronous) -> Result<Store, StoreError> {
        let store = Store::open(path, sync)?;
        store.conn.pragma_update(None, "query_only", true)?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // The version is read inside the exclusive transaction: a second process opening the
        // same fresh file at the same moment (a server beside an import) waits here, then
        // finds the schema in place instead of creating it again.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)?;
        let version = schema_version(&tx)?;
        if version == MIGRATIONS.len() {
            return Ok(());
        }
        // On a large database a migration that rewrites a table takes a while; say so before.
        if version > 0 {
            log::info!(
                "migrating the database from schema version {version} to {} (one transaction)",
                MIGRATIONS.len()
            );
        }
        for sql in &MIGRATIONS[version..] {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
        tx.commit()?;
        Ok(())
    }

    /// A chat's history window, newest first: its newest messages, at most `max_messages` of
    /// them, while their characters add up to at most `max_chars`, stopping at the first that
    /// does not fit. Only those rows are loaded: a chat with huge old messages costs their
    /// lengths, not their text.
    pub fn history_window(
        &self,
        tenant: &str,
        chat_id: &str,
        max_messages: usize,
        max_chars: usize,
    ) -> Result<Vec<Message>, StoreError> {
        // One read transaction, so both statements see the same messages.
        let tx = self.conn.unchecked_transaction()?;
        // length() counts characters, as the window does (up to a NUL, which only makes it
        // load a message more; the prompt's window trims on the text itself).
        let lengths: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT id, length(content) FROM messages
                 WHERE tenant = ?1 AND chat_id = ?2 ORDER BY id DESC LIMIT ?3",
            )?
            .query_map(params![tenant, chat_id, max_messages as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut used = 0u64;
        let count = lengths
            .iter()
            .take_while(|(_, chars)| {
                used = used.saturating_add(u64::try_from(*chars).unwrap_or(0));
                used <= max_chars as u64
            })
            .count();
        let Some(&(oldest, _)) = count.checked_sub(1).and_then(|last| lengths.get(last)) else {
            return Ok(Vec::new());
        };
        let messages = tx
            .prepare_cached(
                "SELECT id, role, content, created_at FROM messages
                 WHERE tenant = ?1 AND chat_id = ?2 AND id >= ?3 ORDER BY id DESC LIMIT ?4",
            )?
            .query_map(
                params![tenant, chat_id, oldest, count as i64],
                message_from_row,
            )?
            .collect::<Result<_, _>>()?;
        Ok(messages)
    }

    /// The reply stored earlier under this idempotency key in this chat, if any.
    pub fn find_reply(
        &self,
        tenant: &str,
        chat_id: &str,
        key: &str,
    ) -> Result<Option<StoredReply>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, content, model, prompt_tokens, completion_tokens FROM messages
             WHERE tenant = ?1 AND chat_id = ?2 AND idempotency_key = ?3",
        )?;
        let reply = stmt
            .query_row(params![tenant, chat_id, key], |r| {
                let prompt: Option<i64> = r.get(3)?;
                let completion: Option<i64> = r.get(4)?;
                Ok(StoredReply {
                    message_id: r.get(0)?,
                    content: r.get(1)?,
                    model: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    usage: prompt.zip(completion).map(|(p, c)| (p as u64, c as u64)),
                })
            })
            .optional()?;
        Ok(reply)
    }

    /// The text of the message a stored reply answered: the chat's message just before it.
    pub fn message_before(
        &self,
        tenant: &str,
        chat_id: &str,
        reply_id: i64,
    ) -> Result<Option<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT content FROM messages WHERE tenant = ?1 AND chat_id = ?2 AND id < ?3
             ORDER BY id DESC LIMIT 1",
        )?;
        Ok(stmt
            .query_row(params![tenant, chat_id, reply_id], |r| r.get(0))
            .optional()?)
    }

    /// Stores one exchange (the user's message and the reply together); returns the reply's id.
    pub fn append_exchange(&mut self, exchange: &Exchange) -> Result<i64, StoreError> {
        let now = self.now()?;
        self.append_exchange_at(exchange, &now)
    }

    fn append_exchange_at(&mut self, exchange: &Exchange, now: &str) -> Result<i64, StoreError> {
        let ids = self.commit_all(std::slice::from_ref(exchange), now)?;
        ids.first()
            .copied()
            .ok_or_else(|| StoreError::Sqlite(Cause::message("nothing was written")))
    }

    /// Stores several exchanges in one transaction and returns each one's reply id, in order.
    /// Should one exchange be refused (a constraint, not the database as a whole), the batch is
    /// rolled back and each exchange stored on its own, so one bad exchange costs only itself.
    pub fn append_batch(&mut self, batch: &[Exchange]) -> Vec<Result<i64, StoreError>> {
        match self.now() {
            Ok(now) => self.append_batch_at(batch, &now),
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// [`Store::append_batch`], with `now` (from [`Store::now`]) as every message's time.
    pub fn append_batch_at(
        &mut self,
        batch: &[Exchange],
        now: &str,
    ) -> Vec<Result<i64, StoreError>> {
        match self.commit_all(batch, now) {
            Ok(ids) => ids.into_iter().map(Ok).collect(),
            Err(StoreError::Constraint(_) | StoreError::Sqlite(_)) if batch.len() > 1 => batch
                .iter()
                .map(|e| self.append_exchange_at(e, now))
                .collect(),
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// The time now, as messages are stamped with it.
    pub fn now(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {NOW}"))?
            .query_row([], |r| r.get(0))?)
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection has committed.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Stores the usage gathered and a batch of exchanges in one transaction, every message
    /// stamped with the one time it returns beside each exchange's reply id. One transaction
    /// rather than three (the time, the usage, the exchanges) takes SQLite's locks once per
    /// batch. On an error nothing is stored, and the caller can store each part on its own.
    pub fn commit_batch(
        &mut self,
        spends: &usage::Spends,
        batch: &[Exchange],
    ) -> Result<(String, Vec<i64>), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now: String = tx
            .prepare_cached(&format!("SELECT {NOW}"))?
            .query_row([], |r| r.get(0))?;
        usage::upsert_usage(&tx, spends)?;
        let ids = batch
            .iter()
            .map(|exchange| insert_exchange(&tx, exchange, &now))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok((now, ids))
    }

    fn commit_all(&mut self, batch: &[Exchange], now: &str) -> Result<Vec<i64>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids = batch
            .iter()
            .map(|exchange| insert_exchange(&tx, exchange, now))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(ids)
    }

    /// Up to `limit` messages older than `before` (or the newest), oldest first; `None` when the
    /// chat does not exist for this tenant.
    pub fn page(
        &self,
        tenant: &str,
        chat_id: &str,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Option<Page>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let exists = tx
            .prepare_cached("SELECT 1 FROM chats WHERE tenant = ?1 AND chat_id = ?2")?
            .exists(params![tenant, chat_id])?;
        if !exists {
            return Ok(None);
        }
        let mut messages: Vec<Message> = tx
            .prepare_cached(
                "SELECT id, role, content, created_at FROM messages
                 WHERE tenant = ?1 AND chat_id = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?4",
            )?
            .query_map(
                params![
                    tenant,
                    chat_id,
                    before.unwrap_or(i64::MAX),
                    limit as i64 + 1
                ],
                message_from_row,
            )?
            .collect::<Result<_, _>>()?;
        let has_more = messages.len() > limit;
        messages.truncate(limit);
        messages.reverse();
        Ok(Some(Page { messages, has_more }))
    }

    /// The tenant's `limit` most recently updated chats, most recent first.
    pub fn list_chats(&self, tenant: &str, limit: usize) -> Result<Vec<ChatSummary>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT chat_id, message_count, created_at, updated_at FROM chats
             WHERE tenant = ?1 ORDER BY last_message_id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![tenant, limit as i64], |r| {
            Ok(ChatSummary {
                chat_id: r.get(0)?,
                message_count: r.get(1)?,
                created_at: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a tenant's chat and all its messages; `false` when it did not exist. Only the
    /// [`Writer`] deletes, so this is not public.
    fn delete_chat(&mut self, tenant: &str, chat_id: &str) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let deleted = remove_chat(&tx, tenant, chat_id)?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Copies what the WAL holds into the database file without blocking readers or the writer,
    /// and once the WAL is longer than [`WAL_RESTART_FRAMES`], makes the next commit write it
    /// from its start again.
    ///
    /// SQLite starts the WAL over only when a commit begins with every frame copied back and no
    /// reader still in it; under steady traffic a commit and a read are always in progress, so
    /// that never happens and the WAL grew for as long as the traffic lasted (800 MB in 4
    /// minutes at 200 requests a second), its index, mapped into this process, with it. A
    /// `RESTART` checkpoint holds new commits back until the readers in the WAL are done,
    /// milliseconds, since the passive one just before has already copied almost everything.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let frames: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
        if frames > WAL_RESTART_FRAMES {
            self.conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Caps this connection's page cache at `kib` KiB; SQLite's default is 2,000 KiB, held for
    /// the connection's life once it has read that much.
    pub fn limit_page_cache(&mut self, kib: u32) -> Result<(), StoreError> {
        self.conn
            .execute_batch(&format!("PRAGMA cache_size = -{kib};"))?;
        Ok(())
    }

    /// Stops this connection from checkpointing when it commits; see [`Writer`].
    fn disable_autocheckpoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_autocheckpoint = 0", [], |_| Ok(()))?;
        Ok(())
    }

    /// Whether the database answers a read, for `/readyz`.
    pub fn check_readable(&self) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("SELECT count(*) FROM chats WHERE rowid = 0")?
            .query_row([], |_| Ok(()))?;
        Ok(())
    }
}

fn insert_exchange(conn: &Connection, exchange: &Exchange, now: &str) -> Result<i64, StoreError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO messages (tenant, chat_id, id, role, content, created_at, model,
                               prompt_tokens, completion_tokens, idempotency_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?10, ?6, ?7, ?8, ?9)",
    )?;
    // SQLite's integers are signed; a count past i64::MAX (only a broken upstream sends one)
    // is stored as the largest it can hold.
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (prompt, completion) = match exchange.usage {
        Some((p, c)) => (Some(count(p)), Some(count(c))),
        None => (None, None),
    };
    let (tenant, chat_id) = (&exchange.tenant, &exchange.chat_id);
    let user_id = reserve_message_ids(conn, 2)?;
    let reply_id = user_id + 1;
    let none: Option<&str> = None;
    let no_count: Option<i64> = None;
    insert.execute(params![
        tenant,
        chat_id,
        user_id,
        "user",
        exchange.user,
        none,
        no_count,
        no_count,
        none,
        now
    ])?;
    insert.execute(params![
        tenant,
        chat_id,
        reply_id,
        "assistant",
        exchange.reply,
        exchange.model,
        prompt,
        completion,
        exchange.idempotency_key,
        now
    ])?;
    conn.prepare_cached(
        "INSERT INTO chats (tenant, chat_id, created_at, updated_at, message_count, last_message_id)
         VALUES (?1, ?2, ?4, ?4, 2, ?3)
         ON CONFLICT (tenant, chat_id) DO UPDATE SET updated_at = excluded.updated_at,
             message_count = message_count + 2, last_message_id = excluded.last_message_id",
    )?
    .execute(params![tenant, chat_id, reply_id, now])?;
    Ok(reply_id)
}

/// Takes `count` consecutive message ids from the counter, in the caller's transaction, and
/// returns the first.
fn reserve_message_ids(conn: &Connection, count: usize) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE message_ids SET next = next + ?1 RETURNING next - ?1")?
        .query_row([count as i64], |r| r.get(0))?)
}

/// Deletes a chat's messages and its row, in the caller's transaction; `false` when there was
/// no such chat.
fn remove_chat(conn: &Connection, tenant: &str, chat_id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM messages WHERE tenant = ?1 AND chat_id = ?2")?
        .execute(params![tenant, chat_id])?;
    // A response or conversation kept in the chat goes with it.
    conn.prepare_cached("DELETE FROM responses WHERE tenant = ?1 AND chat_id = ?2")?
        .execute(params![tenant, chat_id])?;
    let conversation = conn
        .prepare_cached("DELETE FROM conversations WHERE tenant = ?1 AND conversation_id = ?2")?
        .execute(params![tenant, chat_id])?;
    let deleted = conn
        .prepare_cached("DELETE FROM chats WHERE tenant = ?1 AND chat_id = ?2")?
        .execute(params![tenant, chat_id])?;
    Ok(deleted + conversation > 0)
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get(0)?,
        role: r.get(1)?,
        content: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// The version of the SQLite library linked in.
pub fn sqlite_version() -> &'static str {
    rusqlite::version()
}

/// The oldest SQLite chatpool runs on. SQLite 3.7.0 to 3.51.2 can corrupt a database in WAL
/// mode when two connections write or checkpoint at once (the WAL-reset bug), and chatpool
/// always has two: its writer and its checkpointer, or Litestream beside it.
pub const OLDEST_SAFE_SQLITE: &str = "3.51.3";

/// [`OLDEST_SAFE_SQLITE`] as `sqlite3_libversion_number` gives it.
const OLDEST_SAFE_SQLITE_NUMBER: i32 = 3_051_003;

/// Refuses a SQLite library older than [`OLDEST_SAFE_SQLITE`]; `version` and `number` are what
/// `sqlite3_libversion` and `sqlite3_libversion_number` say.
pub fn check_sqlite(version: &str, number: i32) -> Result<(), StoreError> {
    if number < OLDEST_SAFE_SQLITE_NUMBER {
        return Err(StoreError::OldSqlite(version.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = DEFAULT_TENANT;

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_and_migrate(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        (dir, store)
    }

    fn exchange(chat: &str, user: &str, reply: &str, key: Option<&str>) -> Exchange {
        Exchange {
            tenant: DEFAULT_TENANT.into(),
            chat_id: chat.into(),
            user: user.into(),
            reply: reply.into(),
            model: "m".into(),
            usage: Some((3, 4)),
            idempotency_key: key.map(str::to_string),
        }
    }

    #[test]
    fn a_sqlite_with_the_wal_reset_bug_is_refused() {
        let old = check_sqlite("3.51.2", 3_051_002).unwrap_err();
        assert!(matches!(old, StoreError::OldSqlite(_)));
        let message = old.to_string();
        assert!(
            message.contains("SQLite 3.51.2") && message.contains("3.51.3"),
            "{message}"
        );
        assert!(check_sqlite("3.46.0", 3_046_000).is_err());
        assert!(check_sqlite("3.51.3", 3_051_003).is_ok());
        assert!(check_sqlite("4.0.0", 4_000_000).is_ok());
        assert!(check_sqlite(sqlite_version(), rusqlite::version_number()).is_ok());
    }

    #[test]
    fn migrating_twice_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        s.append_exchange(&exchange("c", "hi", "hello", None))
            .unwrap();
        drop(s);
        let s = Store::open_and_migrate(&path, Synchronous::Full).unwrap();
        assert_eq!(s.history_window(T, "c", 10, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn refuses_a_newer_or_foreign_database() {
        let dir = tempfile::tempdir().unwrap();
        let newer = dir.path().join("newer.db");
        Connection::open(&newer)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = Store::open_and_migrate(&newer, Synchronous::Normal)
            .err()
            .unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        let err = Store::open_and_migrate(&foreign, Synchronous::Normal)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a chatpool database"), "{err}");
    }

    #[test]
    fn exchange_is_stored_in_order_and_counted() {
        let (_d, mut s) = temp_store();
        let first = s.append_exchange(&exchange("c", "u1", "a1", None)).unwrap();
        let second = s.append_exchange(&exchange("c", "u2", "a2", None)).unwrap();
        assert!(second > first);
        let newest = s.history_window(T, "c", 3, usize::MAX).unwrap();
        let texts: Vec<_> = newest.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["a2", "u2", "a1"]);
        let chats = s.list_chats(T, 10).unwrap();
        assert_eq!(chats.len(), 1);
        assert_eq!(chats[0].message_count, 4);
    }

    #[test]
    fn the_history_window_loads_only_the_newest_messages_that_fit() {
        let (_d, mut s) = temp_store();
        s.append_exchange(&exchange("c", "old question", "old answer", None))
            .unwrap();
        s.append_exchange(&exchange("c", "ééé", "日本", None))
            .unwrap();
        // Never read as text: a row the window does not reach is not loaded at all.
        s.conn
            .execute(
                "UPDATE messages SET content = zeroblob(1000000) WHERE id = 2",
                [],
            )
            .unwrap();
        let texts = |window: Vec<Message>| -> Vec<String> {
            window.into_iter().map(|m| m.content).collect()
        };
        assert_eq!(
            texts(s.history_window(T, "c", 40, 5).unwrap()),
            ["日本", "ééé"]
        );
        assert_eq!(texts(s.history_window(T, "c", 40, 4).unwrap()), ["日本"]);
        assert_eq!(texts(s.history_window(T, "c", 1, 100).unwrap()), ["日本"]);
        assert!(s.history_window(T, "c", 40, 1).unwrap().is_empty());
        assert!(s.history_window(T, "c", 0, 100).unwrap().is_empty());
        // The huge message stops the window: nothing older is taken past it.
        assert_eq!(s.history_window(T, "c", 40, 999_999).unwrap().len(), 2);
    }

    #[test]
    fn pages_go_backwards_with_has_more() {
        let (_d, mut s) = temp_store();
        for i in 0..3 {
            s.append_exchange(&exchange("c", &format!("u{i}"), &format!("a{i}"), None))
                .unwrap();
        }
        let page = s.page(T, "c", 4, None).unwrap().unwrap();
        let texts: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["u1", "a1", "u2", "a2"]);
        assert!(page.has_more);
        let older = s
            .page(T, "c", 4, Some(page.messages[0].id))
            .unwrap()
            .unwrap();
        let texts: Vec<_> = older.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["u0", "a0"]);
        assert!(!older.has_more);
        assert_eq!(s.page(T, "nope", 4, None).unwrap(), None);
    }

    #[test]
    fn idempotency_keys_are_per_chat() {
        let (_d, mut s) = temp_store();
        let id = s
            .append_exchange(&exchange("c", "u", "a", Some("k")))
            .unwrap();
        let found = s.find_reply(T, "c", "k").unwrap().unwrap();
        assert_eq!(
            (found.message_id, found.content.as_str(), found.usage),
            (id, "a", Some((3, 4)))
        );
        assert_eq!(s.find_reply(T, "other", "k").unwrap(), None);
        assert_eq!(s.message_before(T, "c", id).unwrap().as_deref(), Some("u"));
        assert_eq!(s.message_before(T, "c", id - 1).unwrap(), None);
    }

    #[test]
    fn list_is_most_recent_first_and_delete_removes_everything() {
        let (_d, mut s) = temp_store();
        s.append_exchange(&exchange("a", "u", "r", None)).unwrap();
        s.append_exchange(&exchange("b", "u", "r", None)).unwrap();
        s.append_exchange(&exchange("a", "u", "r", Some("k")))
            .unwrap();
        let ids: Vec<_> = s
            .list_chats(T, 10)
            .unwrap()
            .into_iter()
            .map(|c| c.chat_id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(s.delete_chat(T, "a").unwrap());
        assert!(!s.delete_chat(T, "a").unwrap());
        assert!(s.history_window(T, "a", 10, usize::MAX).unwrap().is_empty());
        assert_eq!(s.find_reply(T, "a", "k").unwrap(), None);
        assert_eq!(s.list_chats(T, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_failing_exchange_in_a_batch_does_not_sink_the_others() {
        let (_d, mut s) = temp_store();
        s.append_exchange(&exchange("c", "u", "a", Some("k")))
            .unwrap();
        let batch = [
            exchange("d", "u1", "a1", None),
            exchange("c", "dup", "dup", Some("k")),
            exchange("e", "u2", "a2", None),
        ];
        let results = s.append_batch(&batch);
        assert!(results[0].is_ok() && results[2].is_ok());
        assert!(matches!(results[1], Err(StoreError::Constraint(_))));
        assert_eq!(s.history_window(T, "c", 10, usize::MAX).unwrap().len(), 2);
        assert_eq!(s.history_window(T, "e", 10, usize::MAX).unwrap().len(), 2);
        assert_eq!(s.list_chats(T, 10).unwrap().len(), 3);
    }

    #[test]
    fn a_pre_auth_database_moves_into_the_default_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(
            "INSERT INTO messages (chat_id, role, content, created_at, idempotency_key)
                 VALUES ('c', 'user', 'old question', 't', NULL), ('c', 'assistant', 'old answer', 't', 'k');
             INSERT INTO chats VALUES ('c', 't', 't', 2, 2);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);
        let mut s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let page = s.page(T, "c", 10, None).unwrap().unwrap();
        let texts: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["old question", "old answer"]);
        assert_eq!(s.find_reply(T, "c", "k").unwrap().unwrap().message_id, 2);
        assert_eq!(s.list_chats(T, 10).unwrap()[0].message_count, 2);
        assert_eq!(s.page("other", "c", 10, None).unwrap(), None);
        let next = s
            .append_exchange(&exchange("c", "new", "reply", None))
            .unwrap();
        assert_eq!(next, 4);
    }

    #[test]
    fn ids_after_the_clustering_migration_continue_past_every_id_ever_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        // Chat "gone" held ids 3 and 4 and was deleted: AUTOINCREMENT never hands them out
        // again, and neither may the counter that replaces it.
        conn.execute_batch(
            "INSERT INTO messages (tenant, chat_id, role, content, created_at)
                 VALUES ('default', 'c', 'user', 'q', 't'), ('default', 'c', 'assistant', 'a', 't'),
                        ('default', 'gone', 'user', 'q', 't'), ('default', 'gone', 'assistant', 'a', 't');
             DELETE FROM messages WHERE chat_id = 'gone';
             INSERT INTO chats VALUES ('default', 'c', 't', 't', 2, 2);
             PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(conn);
        let mut s = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let next = s.append_exchange(&exchange("c", "new", "reply", None));
        assert_eq!(next.unwrap(), 6);
        let newest = s.history_window(T, "c", 10, usize::MAX).unwrap();
        let ids: Vec<_> = newest.iter().map(|m| m.id).collect();
        assert_eq!(ids, [6, 5, 2, 1]);
        let other = s.append_exchange(&exchange("d", "first", "reply", None));
        assert_eq!(other.unwrap(), 8);
    }

    #[test]
    fn the_same_chat_id_under_two_tenants_is_two_chats() {
        let (_d, mut s) = temp_store();
        let mut a = exchange("c", "from a", "to a", Some("k"));
        a.tenant = "a".into();
        let mut b = exchange("c", "from b", "to b", Some("k"));
        b.tenant = "b".into();
        s.append_exchange(&a).unwrap();
        s.append_exchange(&b).unwrap();
        assert_eq!(s.history_window("a", "c", 10, usize::MAX).unwrap().len(), 2);
        assert_eq!(
            s.find_reply("b", "c", "k").unwrap().unwrap().content,
            "to b"
        );
        assert!(s.delete_chat("a", "c").unwrap());
        assert_eq!(s.history_window("b", "c", 10, usize::MAX).unwrap().len(), 2);
        assert!(s.list_chats("a", 10).unwrap().is_empty());
    }
}
