//! The group-commit writer: one thread that owns the only connection that stores exchanges
//! and deletes chats.
//!
//! SQLite lets one transaction write at a time. Sixteen workers each opening their own write
//! transaction would queue inside SQLite's busy handler, which sleeps in steps of milliseconds,
//! and every commit would pay its own WAL append and checkpoint share. Instead a worker hands
//! its exchange to this thread and waits: the thread takes every exchange waiting at that moment
//! and commits them in one transaction, then wakes each worker with its own result. A worker
//! still answers only after its exchange is committed, so a 200 still means stored. A chat's
//! deletion goes the same way, in its place among the exchanges, in a transaction of its own.
//! Usage (each LLM call's tokens, see [`super::usage`]) does not go through the queue: a worker
//! adds it to a [`Tally`] in memory without waking this thread, and the thread stores the whole
//! tally in the same transaction as each batch's exchanges (so an exchange's answer also means
//! its usage is stored), on its idle tick every [`WATCH_EVERY`], when `GET /v1/usage` asks (a
//! barrier through the queue), and when it returns. A relay that stores nothing else thus hands over
//! nothing and waits for nothing; a crash loses at most the last tick's worth of its counts.
//!
//! Checkpoints (copying the WAL back into the database file, with an fsync) are taken off this
//! path: a second thread, `store-checkpoint`, runs them every `checkpoint_interval_ms` on its
//! own connection, which SQLite lets proceed beside the writer (or not at all, when an external
//! replicator such as Litestream does them). Left to SQLite, the commit that
//! crosses the WAL's size threshold would run the checkpoint itself and every worker waiting on
//! that batch would wait for the disk too.

use super::usage::{Spend, Tally};
use super::{Cause, Exchange, Message, Recent, Store, StoreError, WATCH_EVERY};
use crate::config::Synchronous;
use crate::handoff::{self, Received, Reply};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Most exchanges committed in one transaction; bounds how long one commit can take.
const MAX_BATCH: usize = 256;

/// A write waiting for the writer thread, with where to send its result.
enum Pending {
    Append(Exchange, Reply<Result<i64, StoreError>>),
    /// Store the tally now: everything added before this was handed over.
    StoreUsage(Reply<Result<(), StoreError>>),
    Delete {
        tenant: String,
        chat_id: String,
        done: Reply<Result<bool, StoreError>>,
    },
    /// Any other write (the Responses and Conversations APIs'), in a transaction of its own;
    /// it sends its own result.
    Task(Box<dyn FnOnce(&mut Store) + Send>),
}

/// A handle for storing exchanges and usage and deleting chats; clone one per worker. The
/// writer thread returns once every handle is dropped and what was handed to it, and the
/// tally, is committed.
#[derive(Clone)]
pub struct Writer {
    pending: handoff::Sender<Pending>,
    tally: Arc<Tally>,
}

impl Writer {
    /// Opens the writer's connection and starts its thread, and the checkpointer's when
    /// `checkpoint_every` is set. The handle returned joins both: the writer once every
    /// [`Writer`] is dropped, then the checkpointer after a last checkpoint.
    pub fn start(
        path: &Path,
        sync: Synchronous,
        checkpoint_every: Option<Duration>,
        recent: Arc<Recent>,
    ) -> Result<(Writer, JoinHandle<()>), StoreError> {
        let mut store = Store::open(path, sync)?;
        store.disable_autocheckpoint()?;
        let (pending, incoming) = handoff::queue();
        let tally = Arc::new(Tally::default());
        let committer = Committer {
            store,
            recent,
            tally: Arc::clone(&tally),
            data_version: None,
            batch: Batch::default(),
        };
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let spawn_error = |e: std::io::Error| {
            StoreError::Unavailable(Cause::message(format!("cannot start a thread: {e}")))
        };
        let checkpoints = match checkpoint_every {
            Some(every) => {
                let mut checkpointer = Store::open(path, sync)?;
                // A checkpoint copies WAL frames into the file without caching them.
                checkpointer.limit_page_cache(super::READ_CACHE_KIB)?;
                let thread = thread::Builder::new()
                    .name("store-checkpoint".into())
                    .spawn(move || checkpoint_until_stopped(checkpointer, every, stop))
                    .map_err(spawn_error)?;
                Some(thread)
            }
            None => None,
        };
        let thread = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                run(committer, incoming);
                drop(stop_tx);
                if let Some(checkpoints) = checkpoints {
                    let _ = checkpoints.join();
                }
            })
            .map_err(spawn_error)?;
        Ok((Writer { pending, tally }, thread))
    }

    /// Stores the exchange and returns the reply's id once it is committed.
    pub fn append(&self, exchange: Exchange) -> Result<i64, StoreError> {
        let (done, result) = handoff::reply();
        self.send(Pending::Append(exchange, done), result)
    }

    /// Adds one LLM call's usage to the tally, without waking the writer thread: it is
    /// committed no later than anything handed over after it (such as the exchange that
    /// follows), or than the writer's next idle tick.
    pub fn add_usage(&self, spend: Spend) {
        self.tally.add(spend);
    }

    /// A handle that stores, from any thread and without this one, the usage the tally holds
    /// when it is called; for the database at `path`, the one this writer writes.
    pub fn unstored(&self, path: &Path, sync: Synchronous) -> Unstored {
        Unstored {
            tally: Arc::clone(&self.tally),
            path: path.to_path_buf(),
            sync,
        }
    }

    /// Stores the usage added so far and returns once it is committed, so that a read sees
    /// every call answered before.
    pub fn flush_usage(&self) -> Result<(), StoreError> {
        let (done, result) = handoff::reply();
        self.send(Pending::StoreUsage(done), result)
    }

    /// Deletes a tenant's chat and all its messages; `false` when it did not exist.
    pub fn delete(&self, tenant: &str, chat_id: &str) -> Result<bool, StoreError> {
        let (done, result) = handoff::reply();
        let pending = Pending::Delete {
            tenant: tenant.to_string(),
            chat_id: chat_id.to_string(),
            done,
        };
        self.send(pending, result)
    }

    /// Runs `task` on the writer's connection, in its place among the other writes, and
    /// returns its result once it is done.
    pub(super) fn run_task<T: Send + 'static>(
        &self,
        task: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, result) = handoff::reply();
        let task = Box::new(move |store: &mut Store| done.send(task(store)));
        self.send(Pending::Task(task), result)
    }

    fn send<T>(
        &self,
        pending: Pending,
        result: handoff::Awaited<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let gone = || StoreError::Unavailable(Cause::message("the writer thread has stopped"));
        self.pending.send(pending).map_err(|_| gone())?;
        result.recv().ok_or_else(gone)?
    }
}

/// The usage counted but not yet stored, for a process about to end before the writer thread
/// can store it (a second signal during a drain).
#[derive(Clone)]
pub struct Unstored {
    tally: Arc<Tally>,
    path: PathBuf,
    sync: Synchronous,
}

impl Unstored {
    /// Stores whatever the tally holds now, on a connection of its own: the writer thread may
    /// be in the middle of a batch. Waits at most `within` for SQLite's write lock, so that an
    /// exit asked for at once comes soon whatever the database is doing.
    pub fn store(&self, within: Duration) -> Result<(), StoreError> {
        let spends = self.tally.take();
        if spends.is_empty() {
            return Ok(());
        }
        let mut store = Store::open(&self.path, self.sync)?;
        store.conn.busy_timeout(within)?;
        let stored = store.add_usage(&spends);
        if stored.is_err() {
            self.tally.put_back(spends);
        }
        stored
    }
}

/// The writer thread's state.
struct Committer {
    store: Store,
    recent: Arc<Recent>,
    /// The usage the workers added, stored ahead of each batch and on each tick.
    tally: Arc<Tally>,
    /// `PRAGMA data_version` when last looked at; it changes only when another connection
    /// commits, and no other connection of this process does.
    data_version: Option<i64>,
    batch: Batch,
}

fn run(mut committer: Committer, incoming: handoff::Receiver<Pending>) {
    let mut received = Vec::with_capacity(MAX_BATCH);
    loop {
        match incoming.recv_many_timeout(&mut received, MAX_BATCH, WATCH_EVERY) {
            Received::Closed => {
                // Every handle is gone, so nothing can be added after this.
                let _ = committer.store_usage();
                return;
            }
            Received::Timeout => {
                committer.watch();
                let _ = committer.store_usage();
            }
            Received::Items => committer.take(&mut received),
        }
    }
}

impl Committer {
    /// Drops the windows kept in memory once another process has written to the database.
    fn watch(&mut self) {
        let version = self.store.data_version().ok();
        if version.is_none() || version != self.data_version {
            self.recent.clear();
        }
        self.data_version = version;
    }

    fn take(&mut self, received: &mut Vec<Pending>) {
        self.watch();
        for pending in received.drain(..) {
            match pending {
                Pending::Append(exchange, done) => {
                    self.batch.exchanges.push(exchange);
                    self.batch.waiting.push(done);
                }
                Pending::StoreUsage(done) => done.send(self.store_usage()),
                Pending::Delete {
                    tenant,
                    chat_id,
                    done,
                } => {
                    // The exchanges handed over before it are committed before it.
                    self.commit();
                    self.recent.forget(&tenant, &chat_id);
                    done.send(self.store.delete_chat(&tenant, &chat_id));
                }
                Pending::Task(task) => {
                    self.commit();
                    task(&mut self.store);
                    // It may have written any chat's messages (a conversation is a chat).
                    self.recent.clear();
                }
            }
        }
        self.commit();
    }

    /// Stores the tally and the batch together: a worker adds its usage before it hands over
    /// the exchange (or task) that waits on this commit. Should that one transaction fail,
    /// each is tried again on its own, so that the usage, or an exchange, that can be stored
    /// is not lost with one that cannot.
    fn commit(&mut self) {
        if self.batch.exchanges.is_empty() {
            let _ = self.store_usage();
            return;
        }
        let spends = self.tally.take();
        match self.store.commit_batch(&spends, &self.batch.exchanges) {
            Ok((now, ids)) => self
                .batch
                .answer(&self.recent, ids.into_iter().map(Ok), &now),
            Err(_) => {
                self.tally.put_back(spends);
                let _ = self.store_usage();
                self.batch.commit(&mut self.store, &self.recent);
            }
        }
    }

    /// Adds the whole tally to the usage rows in one transaction. What cannot be stored is
    /// given back to the tally, to be tried again at the next commit or tick.
    fn store_usage(&mut self) -> Result<(), StoreError> {
        let spends = self.tally.take();
        if spends.is_empty() {
            return Ok(());
        }
        let stored = self.store.add_usage(&spends);
        if let Err(e) = &stored {
            log::warn!(
                "usage for {} (tenant, day, model) could not be stored; kept to try again: {e}",
                spends.len()
            );
            self.tally.put_back(spends);
        }
        stored
    }
}

/// What the writer has gathered for its next commit, and who waits on it.
#[derive(Default)]
struct Batch {
    exchanges: Vec<Exchange>,
    waiting: Vec<Reply<Result<i64, StoreError>>>,
}

impl Batch {
    /// Commits the exchanges, in one transaction unless one of them is refused, extends the
    /// windows kept in memory with them, and answers each waiting worker.
    fn commit(&mut self, store: &mut Store, recent: &Recent) {
        match store.now() {
            Ok(now) => {
                let results = store.append_batch_at(&self.exchanges, &now);
                self.answer(recent, results.into_iter(), &now);
            }
            Err(e) => {
                let results: Vec<_> = self.exchanges.iter().map(|_| Err(e.clone())).collect();
                self.answer(recent, results.into_iter(), "");
            }
        }
    }

    /// Answers each waiting worker with its exchange's result, in order, and extends the
    /// windows kept in memory with those stored at `now`.
    fn answer(
        &mut self,
        recent: &Recent,
        results: impl Iterator<Item = Result<i64, StoreError>>,
        now: &str,
    ) {
        let answered = self.waiting.drain(..).zip(self.exchanges.drain(..));
        for ((done, exchange), result) in answered.zip(results) {
            if let Ok(id) = &result {
                remember(recent, exchange, *id, now);
            }
            done.send(result);
        }
    }
}

/// Extends the chat's window kept in memory, if it is kept, with an exchange just committed.
fn remember(recent: &Recent, exchange: Exchange, reply_id: i64, now: &str) {
    let stored = |id, role: &str, content| Message {
        id,
        role: role.into(),
        content,
        created_at: now.to_string(),
    };
    let Exchange {
        tenant,
        chat_id,
        user,
        reply,
        ..
    } = exchange;
    let user = stored(reply_id - 1, "user", user);
    let reply = stored(reply_id, "assistant", reply);
    recent.committed(&tenant, &chat_id, user, reply);
}

fn checkpoint_until_stopped(mut store: Store, every: Duration, stop: Receiver<()>) {
    loop {
        let stopping = matches!(
            stop.recv_timeout(every),
            Err(RecvTimeoutError::Disconnected)
        );
        if let Err(e) = store.checkpoint() {
            log::warn!("checkpoint failed (the WAL keeps growing until one succeeds): {e}");
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::Awaited;
    use crate::store::DEFAULT_TENANT;

    fn recent() -> Arc<Recent> {
        Arc::new(Recent::new(40, 32_000))
    }

    #[test]
    fn concurrent_appends_are_all_committed_with_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let reader = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let every = Some(Duration::from_millis(50));
        let (writer, thread) = Writer::start(&path, Synchronous::Normal, every, recent()).unwrap();
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            writer
                                .append(Exchange {
                                    tenant: DEFAULT_TENANT.into(),
                                    chat_id: format!("chat-{w}"),
                                    user: format!("u{i}"),
                                    reply: format!("a{i}"),
                                    model: "m".into(),
                                    usage: None,
                                    idempotency_key: None,
                                })
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ids: Vec<i64> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        drop(writer);
        thread.join().unwrap();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 200);
        let newest = reader
            .history_window(DEFAULT_TENANT, "chat-3", 100, usize::MAX)
            .unwrap();
        assert_eq!(newest.len(), 50);
        assert_eq!(newest[0].content, "a24");
    }

    /// A committer on a fresh database, and a connection to read that database with.
    fn committer_and_reader() -> (tempfile::TempDir, Store, Committer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let reader = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let committer = Committer {
            store: Store::open(&path, Synchronous::Normal).unwrap(),
            recent: recent(),
            tally: Arc::new(Tally::default()),
            data_version: None,
            batch: Batch::default(),
        };
        (dir, reader, committer)
    }

    fn exchange(user: &str, key: Option<&str>) -> Exchange {
        Exchange {
            tenant: DEFAULT_TENANT.into(),
            chat_id: "c".into(),
            user: user.into(),
            reply: "r".into(),
            model: "m".into(),
            usage: None,
            idempotency_key: key.map(str::to_string),
        }
    }

    fn spend(prompt_tokens: u64) -> Spend {
        Spend {
            tenant: DEFAULT_TENANT.into(),
            model: "m".into(),
            day: crate::tenants::day::Day::parse("2026-12-01").unwrap(),
            prompt_tokens,
            completion_tokens: 1,
        }
    }

    /// Queues `exchanges` into the committer's batch; the results, in order, once committed.
    fn queue(
        committer: &mut Committer,
        exchanges: Vec<Exchange>,
    ) -> Vec<Awaited<Result<i64, StoreError>>> {
        exchanges
            .into_iter()
            .map(|exchange| {
                let (done, result) = handoff::reply();
                committer.batch.exchanges.push(exchange);
                committer.batch.waiting.push(done);
                result
            })
            .collect()
    }

    fn stored_usage(store: &Store) -> (u64, u64) {
        let rows = store.usage(None, &Default::default()).unwrap();
        rows.first()
            .map_or((0, 0), |r| (r.requests, r.prompt_tokens))
    }

    #[test]
    fn a_batch_and_the_tally_are_committed_together() {
        let (_dir, reader, mut committer) = committer_and_reader();
        committer.tally.add(spend(5));
        committer.tally.add(spend(7));
        let results = queue(
            &mut committer,
            vec![exchange("a", None), exchange("b", None)],
        );
        committer.commit();
        let ids: Vec<i64> = results
            .into_iter()
            .map(|r| r.recv().unwrap().unwrap())
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] < ids[1]);
        assert_eq!(stored_usage(&reader), (2, 12));
        assert!(committer.tally.take().is_empty());
    }

    #[test]
    fn an_exchange_refused_in_a_batch_costs_neither_the_tally_nor_the_others() {
        let (_dir, reader, mut committer) = committer_and_reader();
        committer.tally.add(spend(5));
        // The second reuses the first's idempotency key in the same chat: the unique index
        // refuses it, and with it the batch's one transaction.
        let batch = vec![
            exchange("a", Some("k")),
            exchange("b", Some("k")),
            exchange("c", None),
        ];
        let results = queue(&mut committer, batch);
        committer.commit();
        let results: Vec<_> = results.into_iter().map(|r| r.recv().unwrap()).collect();
        assert!(results[0].is_ok(), "{results:?}");
        assert!(
            matches!(results[1], Err(StoreError::Constraint(_))),
            "{results:?}"
        );
        assert!(results[2].is_ok(), "{results:?}");
        assert_eq!(stored_usage(&reader), (1, 5));
        let window = reader
            .history_window(DEFAULT_TENANT, "c", 10, usize::MAX)
            .unwrap();
        let newest_first: Vec<_> = window.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(newest_first, ["r", "c", "r", "a"]);
    }

    #[test]
    fn a_delete_takes_its_place_among_the_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let reader = Store::open_and_migrate(&path, Synchronous::Normal).unwrap();
        let (writer, thread) = Writer::start(&path, Synchronous::Normal, None, recent()).unwrap();
        writer.append(exchange("gone", None)).unwrap();
        assert!(writer.delete(DEFAULT_TENANT, "c").unwrap());
        assert!(!writer.delete(DEFAULT_TENANT, "c").unwrap());
        assert!(!writer.delete("another tenant", "c").unwrap());
        writer.append(exchange("new", None)).unwrap();
        drop(writer);
        thread.join().unwrap();
        let window = reader
            .history_window(DEFAULT_TENANT, "c", 10, usize::MAX)
            .unwrap();
        let texts: Vec<_> = window.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["r", "new"]);
    }
}
