//! SQLite's own account of the memory it holds in this process, for `/metrics`.
//!
//! SQLite counts every allocation it makes (the bundled build keeps `SQLITE_DEFAULT_MEMSTATUS`
//! on), across all connections: page caches, schemas, prepared statements and lookaside.

use rusqlite::ffi;
use std::os::raw::c_int;

/// Bytes SQLite holds, from `sqlite3_status64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteMemory {
    /// Everything SQLite has allocated and not freed.
    pub heap: i64,
    /// The most `heap` has been since the process started.
    pub heap_highwater: i64,
    /// The part of `heap` that is page cache (no page-cache pool is configured, so all of it
    /// comes from the heap and SQLite counts it as overflow).
    pub page_cache: i64,
}

/// What SQLite holds right now.
pub fn sqlite_memory() -> SqliteMemory {
    let (heap, heap_highwater) = status(ffi::SQLITE_STATUS_MEMORY_USED);
    let (page_cache, _) = status(ffi::SQLITE_STATUS_PAGECACHE_OVERFLOW);
    SqliteMemory {
        heap,
        heap_highwater,
        page_cache,
    }
}

fn status(op: c_int) -> (i64, i64) {
    let (mut current, mut highwater) = (0, 0);
    // SAFETY: sqlite3_status64 is thread-safe and writes only the two integers it is given.
    // It fails only for an unknown `op`, and then leaves them at 0.
    unsafe { ffi::sqlite3_status64(op, &mut current, &mut highwater, 0) };
    (current, highwater)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::Store;

    #[test]
    fn an_open_connection_shows_in_the_heap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_and_migrate(&dir.path().join("m.db"), Synchronous::Normal).unwrap();
        store.check_readable().unwrap();
        let memory = sqlite_memory();
        assert!(memory.heap > 0, "{memory:?}");
        assert!(memory.heap_highwater >= memory.heap, "{memory:?}");
        assert!(
            memory.page_cache > 0 && memory.page_cache < memory.heap,
            "{memory:?}"
        );
    }
}
