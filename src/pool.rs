//! The worker pool: a fixed set of named threads taking jobs from one bounded channel.
//!
//! Threads are started once and live as long as the channel has its sender: the acceptor
//! holds it, so dropping it lets the workers finish what is queued and return. A worker with
//! nothing to do sleeps at once on the channel's doorbell (see [`handoff::bounded`]), never
//! spinning. Each worker owns what it needs (its handler, with its clone of the LLM client and
//! its handles on storage) inside its closure, and holds no lock across I/O. A job that panics
//! is caught and logged; the thread takes the next job, because losing a worker would quietly
//! shrink the pool for every user.

use crate::handoff;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{self, JoinHandle};
use std::time::Instant;

/// The running worker threads.
pub struct Pool {
    handles: Vec<JoinHandle<()>>,
    // Each worker holds a sender clone of this channel and drops it on exit, so the receiver
    // disconnects exactly when the last worker has returned.
    exited: Receiver<()>,
}

impl Pool {
    /// Starts one thread per element of `workers`, named `worker-0`, `worker-1`, …, each
    /// running its closure on jobs from `jobs` until the channel is closed and empty.
    pub fn start<J, W>(jobs: handoff::BoundedReceiver<J>, workers: Vec<W>) -> std::io::Result<Pool>
    where
        J: Send + 'static,
        W: FnMut(J) + Send + 'static,
    {
        let (exit_tx, exited) = crossbeam_channel::bounded::<()>(0);
        let (started_tx, started) = crossbeam_channel::unbounded::<()>();
        let mut handles = Vec::with_capacity(workers.len());
        for (index, mut work) in workers.into_iter().enumerate() {
            let jobs = jobs.clone();
            let exit_guard = exit_tx.clone();
            let started_tx = started_tx.clone();
            let name = format!("worker-{index}");
            let handle = thread::Builder::new().name(name.clone()).spawn(move || {
                let _exit_guard = exit_guard;
                let _ = started_tx.send(());
                while let Some(job) = jobs.recv() {
                    if catch_unwind(AssertUnwindSafe(|| work(job))).is_err() {
                        log::error!("{name}: a job panicked; the worker carries on");
                    }
                }
            })?;
            handles.push(handle);
        }
        // A thread takes its name when it first runs; waiting for every worker to run means
        // that once the server says it is ready, `ps -L` shows every worker by name.
        for _ in 0..handles.len() {
            let _ = started.recv();
        }
        Ok(Pool { handles, exited })
    }

    /// Waits until every worker has returned or `deadline` passes; `true` when all returned.
    /// Workers return once the channel's sender is gone and the queue is empty.
    pub fn join_until(self, deadline: Instant) -> bool {
        match self.exited.recv_deadline(deadline) {
            Err(RecvTimeoutError::Disconnected) => {
                for handle in self.handles {
                    // A worker's panics are caught per job; a join error cannot carry news.
                    let _ = handle.join();
                }
                true
            }
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_panicking_job_does_not_lose_the_worker() {
        let (tx, rx) = handoff::bounded::<u32>(4);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let worker = move |n: u32| {
            assert!(n != 0, "job 0 panics on purpose");
            done_tx
                .send((n, thread::current().name().map(str::to_string)))
                .unwrap();
        };
        let pool = Pool::start(rx, vec![worker]).unwrap();
        tx.try_send(0).unwrap();
        tx.try_send(7).unwrap();
        let (n, name) = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((n, name.as_deref()), (7, Some("worker-0")));
        drop(tx);
        assert!(pool.join_until(Instant::now() + Duration::from_secs(10)));
    }

    #[test]
    fn join_until_gives_up_at_the_deadline() {
        let (tx, rx) = handoff::bounded::<()>(1);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let worker = move |_: ()| {
            let _ = release_rx.recv();
        };
        let pool = Pool::start(rx, vec![worker]).unwrap();
        tx.try_send(()).unwrap();
        drop(tx);
        assert!(!Pool::join_until(
            pool,
            Instant::now() + Duration::from_millis(50)
        ));
        drop(release_tx);
    }
}
