//! Recent history in memory: each recently used chat's history window, so that most turns
//! read no SQLite at all.
//!
//! A reader's page cache is empty at almost every read (another connection has committed
//! since), so a history read from SQLite costs its page reads and its locks every time. The
//! window kept here is exactly what [`Store::history_window`](super::Store::history_window)
//! would return: a worker fills it from SQLite on a miss, and the writer thread extends it at
//! each commit with the exchange it stored (newer messages only ever push older ones out of a
//! window, so the window and the new exchange hold the next window) and drops it with the chat.
//! Only the writer and the one request in flight on a chat touch its window (admission lets
//! no second one in), so a window cannot fall behind this process's own writes.
//!
//! Another process writing to the database (`chatpool import`, `forget`) is seen by the writer
//! through `PRAGMA data_version`, at its next commit or within [`WATCH_EVERY`] when idle, and
//! everything here is dropped; a window read from SQLite before that and put in after is refused.

use super::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How often an idle writer looks for another process's writes.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Bytes of windows kept, counting their text and a fixed cost per message; past it, the
/// chats put in longest ago are dropped first.
const BUDGET_BYTES: usize = 16 << 20;
const MESSAGE_BYTES: usize = 96;

/// The windows, shared by the readers (which fill them) and the writer (which extends them).
pub struct Recent {
    inner: Mutex<Inner>,
    max_messages: usize,
    max_chars: usize,
}

#[derive(Default)]
struct Inner {
    windows: HashMap<String, Kept>,
    /// Chats in the order they were put in, for dropping the oldest; an entry whose `put`
    /// no longer matches its chat's is stale and skipped.
    order: VecDeque<(String, u64)>,
    puts: u64,
    bytes: usize,
    /// Counts the times everything was dropped, so a fill read before a drop is refused.
    epoch: u64,
}

struct Kept {
    /// Newest first, as [`Store::history_window`](super::Store::history_window) returns them.
    window: Vec<Message>,
    /// Which put made it, to match it with its place in `order`.
    put: u64,
}

/// When a fill started, to hand back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

fn key(tenant: &str, chat_id: &str) -> String {
    // A chat id never holds a NUL, so the key names one tenant's chat.
    format!("{tenant}\0{chat_id}")
}

fn cost(window: &[Message]) -> usize {
    window.iter().map(|m| m.content.len() + MESSAGE_BYTES).sum()
}

impl Recent {
    /// Windows of at most `max_messages` messages and `max_chars` characters.
    pub fn new(max_messages: usize, max_chars: usize) -> Recent {
        Recent {
            inner: Mutex::new(Inner::default()),
            max_messages,
            max_chars,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a window with these limits is the one kept here.
    pub fn serves(&self, max_messages: usize, max_chars: usize) -> bool {
        (max_messages, max_chars) == (self.max_messages, self.max_chars)
    }

    /// The chat's window, newest first, when it is kept; and else the epoch to fill it with.
    pub fn window(&self, tenant: &str, chat_id: &str) -> Result<Vec<Message>, Epoch> {
        let inner = self.lock();
        match inner.windows.get(&key(tenant, chat_id)) {
            Some(kept) => Ok(kept.window.clone()),
            None => Err(Epoch(inner.epoch)),
        }
    }

    /// Keeps a window just read from SQLite, unless everything was dropped since `epoch`.
    pub fn fill(&self, tenant: &str, chat_id: &str, window: &[Message], epoch: Epoch) {
        let mut inner = self.lock();
        if inner.epoch != epoch.0 {
            return;
        }
        inner.put(key(tenant, chat_id), window.to_vec());
    }

    /// Extends a kept window with an exchange just committed: `user` and then `reply`.
    pub fn committed(&self, tenant: &str, chat_id: &str, user: Message, reply: Message) {
        let mut inner = self.lock();
        let Some(kept) = inner.windows.get_mut(&key(tenant, chat_id)) else {
            return;
        };
        let window = &mut kept.window;
        let before = cost(window);
        window.splice(0..0, [reply, user]);
        let mut used = 0usize;
        let fits = window
            .iter()
            .take(self.max_messages)
            .take_while(|m| {
                used = used.saturating_add(m.content.chars().count());
                used <= self.max_chars
            })
            .count();
        window.truncate(fits);
        let after = cost(window);
        inner.bytes = inner.bytes - before + after;
        inner.evict();
    }

    /// Drops a chat's window (the chat was deleted).
    pub fn forget(&self, tenant: &str, chat_id: &str) {
        self.lock().take(&key(tenant, chat_id));
    }

    /// Drops every window: another process has written to the database.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let epoch = inner.epoch + 1;
        *inner = Inner {
            epoch,
            ..Inner::default()
        };
    }
}

impl Inner {
    fn take(&mut self, key: &str) {
        if let Some(kept) = self.windows.remove(key) {
            self.bytes -= cost(&kept.window);
        }
    }

    fn put(&mut self, key: String, window: Vec<Message>) {
        self.take(&key);
        self.puts += 1;
        let put = self.puts;
        self.bytes += cost(&window);
        self.order.push_back((key.clone(), put));
        self.windows.insert(key, Kept { window, put });
        self.evict();
        // Chats deleted or put in again leave stale entries behind; keep them few.
        if self.order.len() > 2 * self.windows.len() + 1024 {
            let windows = &self.windows;
            self.order
                .retain(|(key, put)| windows.get(key).is_some_and(|k| k.put == *put));
        }
    }

    fn evict(&mut self) {
        while self.bytes > BUDGET_BYTES {
            let Some((oldest, put)) = self.order.pop_front() else {
                break;
            };
            if self.windows.get(&oldest).is_some_and(|k| k.put == put) {
                self.take(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64, content: &str) -> Message {
        Message {
            id,
            role: if id % 2 == 0 { "assistant" } else { "user" }.into(),
            content: content.into(),
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn ids(window: &[Message]) -> Vec<i64> {
        window.iter().map(|m| m.id).collect()
    }

    #[test]
    fn a_commit_extends_a_kept_window_within_its_limits() {
        let recent = Recent::new(3, 10);
        let epoch = recent.window("t", "c").unwrap_err();
        recent.fill("t", "c", &[message(2, "bb"), message(1, "a")], epoch);
        recent.committed("t", "c", message(3, "ccc"), message(4, "dddd"));
        // Three messages at most: the oldest goes.
        assert_eq!(ids(&recent.window("t", "c").unwrap()), [4, 3, 2]);
        recent.committed("t", "c", message(5, "e"), message(6, "ffffff"));
        // Ten characters at most: 6 + 1 + 4 fits no more than two.
        assert_eq!(ids(&recent.window("t", "c").unwrap()), [6, 5]);
    }

    #[test]
    fn a_chat_not_kept_stays_unkept_and_tenants_do_not_mix() {
        let recent = Recent::new(40, 1000);
        recent.committed("t", "c", message(1, "a"), message(2, "b"));
        assert!(recent.window("t", "c").is_err());
        let epoch = recent.window("t", "c").unwrap_err();
        recent.fill("t", "c", &[message(2, "b")], epoch);
        assert!(recent.window("u", "c").is_err());
        recent.forget("t", "c");
        assert!(recent.window("t", "c").is_err());
    }

    #[test]
    fn a_fill_read_before_a_clear_is_refused() {
        let recent = Recent::new(40, 1000);
        let before = recent.window("t", "c").unwrap_err();
        recent.clear();
        recent.fill("t", "c", &[message(1, "stale")], before);
        assert!(recent.window("t", "c").is_err());
        let after = recent.window("t", "c").unwrap_err();
        recent.fill("t", "c", &[message(1, "fresh")], after);
        assert_eq!(recent.window("t", "c").unwrap()[0].content, "fresh");
    }

    #[test]
    fn past_the_budget_the_oldest_chats_go_first() {
        let recent = Recent::new(40, usize::MAX);
        let big = "x".repeat(1 << 20);
        for chat in 0..20 {
            let epoch = recent.window("t", &chat.to_string()).unwrap_err();
            recent.fill("t", &chat.to_string(), &[message(1, &big)], epoch);
        }
        assert!(recent.window("t", "0").is_err());
        assert!(recent.window("t", "19").is_ok());
        assert!(recent.lock().bytes <= BUDGET_BYTES);
    }
}
