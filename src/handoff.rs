//! Hand-offs between threads that sleep at once instead of spinning first.
//!
//! crossbeam's channels (and std's, which are a copy of them) spin, then call `sched_yield`
//! up to eight times, before a receiver sleeps. With many more threads than cores, as here,
//! each yield is a system call and a trip through the scheduler that does no work: they were
//! 5 to 9 of the 35 to 60 system calls a request cost. A thread waiting here sleeps on its
//! condition variable straight away, and a hand-off costs at most one wake-up: a sender wakes a
//! receiver only when one is asleep, and after letting go of the lock, so the receiver it wakes
//! does not find the lock still held and sleep again.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Sends into a [`queue`]; clones share it. The queue closes when the last sender is dropped.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// Receives from a [`queue`]; clones share it, each item going to one of them.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
    /// Receivers asleep on `ready`: only they need a wake-up.
    asleep: usize,
}

/// What [`Receiver::recv_many_timeout`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Some items, now in the caller's vector.
    Items,
    /// None within the timeout.
    Timeout,
    /// None, and none will come: the queue is empty and every sender gone.
    Closed,
}

/// An unbounded queue with any number of senders and receivers.
pub fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receivers: 1,
            asleep: 0,
        }),
        ready: Condvar::new(),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock, so a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Sender<T> {
    /// Queues `item`; gives it back when every receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if state.receivers == 0 {
            return Err(item);
        }
        state.items.push_back(item);
        let wake = state.asleep > 0;
        drop(state);
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the queue is empty and every sender gone.
    pub fn recv(&self) -> Option<T> {
        let mut state = self.wait_for_items()?;
        state.items.pop_front()
    }

    /// Moves up to `max` items into `into`, waiting at most `timeout` for the first.
    pub fn recv_many_timeout(&self, into: &mut Vec<T>, max: usize, timeout: Duration) -> Received {
        let mut state = self.shared.lock();
        if state.items.is_empty() && state.senders > 0 {
            state.asleep += 1;
            state = self
                .shared
                .ready
                .wait_timeout_while(state, timeout, |s| s.items.is_empty() && s.senders > 0)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.asleep -= 1;
        }
        if state.items.is_empty() {
            return match state.senders {
                0 => Received::Closed,
                _ => Received::Timeout,
            };
        }
        let n = state.items.len().min(max);
        into.extend(state.items.drain(..n));
        Received::Items
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Whether no item is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lock, held with at least one item in the queue; `None` when none will come.
    fn wait_for_items(&self) -> Option<MutexGuard<'_, State<T>>> {
        let mut state = self.shared.lock();
        while state.items.is_empty() {
            if state.senders == 0 {
                return None;
            }
            state.asleep += 1;
            state = self
                .shared
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.asleep -= 1;
        }
        Some(state)
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.lock().receivers += 1;
        Receiver {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.ready.notify_all();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.lock().receivers -= 1;
    }
}

/// The sending side of a [`reply`]: one value, once.
pub struct Reply<T> {
    slot: Arc<Slot<T>>,
}

/// The receiving side of a [`reply`].
pub struct Awaited<T> {
    slot: Arc<Slot<T>>,
}

struct Slot<T> {
    /// The answer, and whether the receiver is asleep waiting for it.
    value: Mutex<(Answer<T>, bool)>,
    ready: Condvar,
}

enum Answer<T> {
    Pending,
    Given(T),
    /// The [`Reply`] was dropped without a value.
    Dropped,
    Taken,
}

/// A one-time answer from one thread to another (a result handed back).
pub fn reply<T>() -> (Reply<T>, Awaited<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new((Answer::Pending, false)),
        ready: Condvar::new(),
    });
    (
        Reply {
            slot: Arc::clone(&slot),
        },
        Awaited { slot },
    )
}

impl<T> Slot<T> {
    fn settle(&self, answer: Answer<T>) {
        let mut value = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(value.0, Answer::Pending) {
            value.0 = answer;
            let asleep = value.1;
            drop(value);
            if asleep {
                self.ready.notify_one();
            }
        }
    }
}

impl<T> Reply<T> {
    /// Hands the value over.
    pub fn send(self, value: T) {
        self.slot.settle(Answer::Given(value));
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        self.slot.settle(Answer::Dropped);
    }
}

impl<T> Awaited<T> {
    /// The value, waiting for it; `None` if the [`Reply`] was dropped without one.
    pub fn recv(self) -> Option<T> {
        let mut value = self
            .slot
            .value
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while matches!(value.0, Answer::Pending) {
            value.1 = true;
            value = self
                .slot
                .ready
                .wait(value)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match std::mem::replace(&mut value.0, Answer::Taken) {
            Answer::Given(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn every_item_reaches_one_receiver_and_the_queue_closes_with_its_senders() {
        let (tx, rx) = queue::<u32>();
        let receivers: Vec<_> = (0..4)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || std::iter::from_fn(|| rx.recv()).collect::<Vec<_>>())
            })
            .collect();
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let tx = tx.clone();
                thread::spawn(move || (0..250).for_each(|i| tx.send(s * 1000 + i).unwrap()))
            })
            .collect();
        drop(tx);
        senders.into_iter().for_each(|s| s.join().unwrap());
        let mut got: Vec<u32> = receivers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect();
        got.sort();
        let mut sent: Vec<u32> = (0..4)
            .flat_map(|s| (0..250).map(move |i| s * 1000 + i))
            .collect();
        sent.sort();
        assert_eq!(got, sent);
        assert!(rx.recv().is_none());
    }

    #[test]
    fn recv_many_takes_what_waits_up_to_the_most_asked() {
        let (tx, rx) = queue();
        let mut batch = Vec::new();
        let short = Duration::from_millis(1);
        assert_eq!(
            rx.recv_many_timeout(&mut batch, 3, short),
            Received::Timeout
        );
        (0..5).for_each(|i| tx.send(i).unwrap());
        assert_eq!(rx.recv_many_timeout(&mut batch, 3, short), Received::Items);
        assert_eq!(batch, [0, 1, 2]);
        assert_eq!(rx.len(), 2);
        drop(tx);
        assert_eq!(rx.recv_many_timeout(&mut batch, 3, short), Received::Items);
        assert_eq!(batch, [0, 1, 2, 3, 4]);
        assert_eq!(rx.recv_many_timeout(&mut batch, 3, short), Received::Closed);
    }

    #[test]
    fn a_send_without_receivers_gives_the_item_back() {
        let (tx, rx) = queue();
        drop(rx);
        assert_eq!(tx.send(7), Err(7));
    }

    #[test]
    fn a_reply_arrives_across_threads_and_a_dropped_one_is_none() {
        let (reply, awaited) = reply();
        let sender = thread::spawn(move || reply.send("done"));
        assert_eq!(awaited.recv(), Some("done"));
        sender.join().unwrap();
        let (reply, awaited) = super::reply::<u8>();
        thread::spawn(move || drop(reply)).join().unwrap();
        assert_eq!(awaited.recv(), None);
    }
}
