//! The read connections: a small fixed set shared by every worker.
//!
//! A SQLite connection costs about 90 KB once it has read the schema, so a connection per
//! worker would cost 90 MB at 1,024 workers before serving anything. Reads are short and never
//! wait on the network, so a worker borrows a connection for one read and gives it back; with
//! as many connections as a read ever runs in parallel, borrowing almost never waits. A history
//! window kept in memory ([`Recent`]) needs no connection at all.

use super::{Cause, Message, Recent, Store, StoreError};
use crate::config::Synchronous;
use crate::handoff::{self, Receiver, Sender};
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

/// Most read connections, whatever the pool size: more than the cores can use at once.
pub const MAX_READERS: usize = 16;

/// Page cache of a read connection, in KiB: the bound on what each one may hold. A read takes a
/// 40-message window (a few leaf pages, since a chat's messages are stored together) and the
/// B-tree pages above it, about ten pages of 4 KiB. Under writes a reader's cache is emptied
/// at most reads anyway (WAL mode drops it once another connection has committed), but when
/// nothing commits between reads, say a burst of history pages, it keeps what it read; at
/// SQLite's default of 2,000 KiB that could reach 32 MB across 16 readers.
pub const READ_CACHE_KIB: u32 = 256;

/// A fixed set of connections to borrow from.
#[derive(Clone)]
pub struct Readers {
    idle: Receiver<Store>,
    returns: Sender<Store>,
    recent: Arc<Recent>,
}

/// A borrowed connection, returned when dropped. It lends only `&Store`, whose methods that
/// take `&self` only read; SQLite refuses a write on it besides (`query_only`).
pub struct Reader {
    store: ManuallyDrop<Store>,
    returns: Sender<Store>,
}

impl Readers {
    /// Opens `count` connections to a migrated database; history windows are kept in `recent`.
    pub fn open(
        path: &Path,
        sync: Synchronous,
        count: usize,
        recent: Arc<Recent>,
    ) -> Result<Readers, StoreError> {
        let (returns, idle) = handoff::queue();
        for _ in 0..count {
            // Cannot fail: both ends are here.
            let mut store = Store::open_read_only(path, sync)?;
            store.limit_page_cache(READ_CACHE_KIB)?;
            let _ = returns.send(store);
        }
        Ok(Readers {
            idle,
            returns,
            recent,
        })
    }

    /// A chat's history window, as [`Store::history_window`] reads it: from memory when it is
    /// kept there, else from SQLite, and then kept.
    pub fn history_window(
        &self,
        tenant: &str,
        chat_id: &str,
        max_messages: usize,
        max_chars: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let kept = self
            .recent
            .serves(max_messages, max_chars)
            .then(|| self.recent.window(tenant, chat_id));
        let epoch = match kept {
            Some(Ok(window)) => return Ok(window),
            Some(Err(epoch)) => Some(epoch),
            None => None,
        };
        let window = self
            .get()?
            .history_window(tenant, chat_id, max_messages, max_chars)?;
        if let Some(epoch) = epoch {
            self.recent.fill(tenant, chat_id, &window, epoch);
        }
        Ok(window)
    }

    /// Borrows a connection, waiting while all are in use.
    pub fn get(&self) -> Result<Reader, StoreError> {
        let store = self
            .idle
            .recv()
            .ok_or_else(|| StoreError::Unavailable(Cause::message("no read connection is left")))?;
        Ok(Reader {
            store: ManuallyDrop::new(store),
            returns: self.returns.clone(),
        })
    }
}

impl Deref for Reader {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // SAFETY: `store` is taken exactly once, here, and never used again.
        let store = unsafe { ManuallyDrop::take(&mut self.store) };
        // If the pool itself is gone the connection just closes.
        let _ = self.returns.send(store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent() -> Arc<Recent> {
        Arc::new(Recent::new(40, 1000))
    }

    #[test]
    fn a_borrowed_connection_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let readers = Readers::open(&path, Synchronous::Normal, 1, recent()).unwrap();
        {
            let reader = readers.get().unwrap();
            assert!(reader.check_readable().is_ok());
            assert!(readers.idle.is_empty());
        }
        assert_eq!(readers.idle.len(), 1);
        assert!(readers.get().is_ok());
    }

    #[test]
    fn a_read_connection_refuses_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let readers = Readers::open(&path, Synchronous::Normal, 1, recent()).unwrap();
        let reader = readers.get().unwrap();
        let write = reader.conn.execute("DELETE FROM chats", []);
        assert!(write.is_err(), "{write:?}");
    }
}
