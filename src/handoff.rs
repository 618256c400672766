//! Hand-offs between threads that sleep at once instead of spinning first.
//!
//! crossbeam's channels (and std's, which are a copy of them) spin, then call `sched_yield`
//! up to eight times, before a receiver sleeps. With many more threads than cores, as here,
//! each yield is a system call and a trip through the scheduler that does no work: they were
//! 5 to 9 of the 35 to 60 system calls a request cost. A thread waiting here sleeps on its
//! condition variable straight away, and a hand-off costs at most one wake-up: a sender wakes a
//! receiver only when one is asleep, and after letting go of the lock, so the receiver it wakes
//! does not find the lock still held and sleep again.
//!
//! Three shapes: a [`queue`] (unbounded, for the writer's batches and the idle read
//! connections), a [`reply`] (one answer handed back), and a [`bounded`] crossbeam channel for
//! the job queue, where the bound and a `try_send` that never waits are the point. Its receivers
//! only ever `try_recv`, which does not spin on an empty channel, and sleep on a doorbell (a
//! condition variable and a count of sleepers) rather than in crossbeam's `recv`.

use crossbeam_channel::{TryRecvError, TrySendError};
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

/// Sends into a [`bounded`] channel. It is the channel's only sender, so that dropping it is
/// what closes the channel: receivers then take what is left and return.
pub struct BoundedSender<T> {
    channel: crossbeam_channel::Sender<T>,
    bell: Arc<Doorbell>,
}

/// Receives from a [`bounded`] channel; clones share it, each item going to one of them.
pub struct BoundedReceiver<T> {
    channel: crossbeam_channel::Receiver<T>,
    bell: Arc<Doorbell>,
}

/// Where the receivers of a [`bounded`] channel sleep while it is empty.
///
/// crossbeam's `recv` on an empty channel spins, then calls `sched_yield` several times, before
/// it parks; a receiver here sleeps on the condition variable at once. The sender rings only
/// when a receiver sleeps that no earlier ring is already waking (one more would be a wake-up
/// system call with nobody left to wake), and after letting go of the lock, so the one woken
/// does not find it still held. While every receiver is busy, a hand-off makes no system call.
struct Doorbell {
    state: Mutex<Bell>,
    rung: Condvar,
}

struct Bell {
    /// Receivers asleep, counting one woken until it holds the lock again.
    asleep: usize,
    /// Rings not yet taken by a receiver; never more than `asleep`.
    rings: usize,
    /// The sender is gone: no item will come.
    closed: bool,
}

/// A crossbeam channel holding at most `capacity` items, whose receivers sleep at once, never
/// spin, when it is empty.
pub fn bounded<T>(capacity: usize) -> (BoundedSender<T>, BoundedReceiver<T>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    let bell = Arc::new(Doorbell {
        state: Mutex::new(Bell {
            asleep: 0,
            rings: 0,
            closed: false,
        }),
        rung: Condvar::new(),
    });
    (
        BoundedSender {
            channel: sender,
            bell: Arc::clone(&bell),
        },
        BoundedReceiver {
            channel: receiver,
            bell,
        },
    )
}

impl Doorbell {
    fn lock(&self) -> MutexGuard<'_, Bell> {
        // Nothing here panics while holding the lock, so a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes one sleeping receiver, unless every sleeper already has a ring coming.
    fn ring(&self) {
        let mut bell = self.lock();
        let wake = bell.asleep > bell.rings;
        if wake {
            bell.rings += 1;
        }
        drop(bell);
        if wake {
            self.rung.notify_one();
        }
    }

    /// Wakes every receiver for good: the sender is gone.
    fn close(&self) {
        self.lock().closed = true;
        self.rung.notify_all();
    }
}

impl<T> BoundedSender<T> {
    /// Queues `item` without waiting, and wakes a receiver if one sleeps; gives the item back
    /// when the channel is full or every receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.channel.try_send(item)?;
        self.bell.ring();
        Ok(())
    }
}

impl<T> Drop for BoundedSender<T> {
    fn drop(&mut self) {
        self.bell.close();
    }
}

impl<T> BoundedReceiver<T> {
    /// The next item, sleeping while there is none; `None` once the channel is empty and its
    /// sender gone.
    pub fn recv(&self) -> Option<T> {
        match self.channel.try_recv() {
            Ok(item) => return Some(item),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        let mut bell = self.bell.lock();
        loop {
            // Looked at under the lock, which a sender takes after queuing: either this finds
            // its item, or the sender finds this receiver asleep and rings.
            match self.channel.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if bell.closed => return None,
                Err(TryRecvError::Empty) => {}
            }
            bell.asleep += 1;
            bell = self
                .bell
                .rung
                .wait_while(bell, |b| b.rings == 0 && !b.closed)
                .unwrap_or_else(PoisonError::into_inner);
            bell.asleep -= 1;
            bell.rings = bell.rings.saturating_sub(1);
        }
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.channel.len()
    }

    /// Whether no item is waiting.
    pub fn is_empty(&self) -> bool {
        self.channel.is_empty()
    }
}

impl<T> Clone for BoundedReceiver<T> {
    fn clone(&self) -> Self {
        BoundedReceiver {
            channel: self.channel.clone(),
            bell: Arc::clone(&self.bell),
        }
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

    /// Starts `n` receivers of `rx`, each sending what it takes to `taken` until the channel
    /// closes, and waits until all of them sleep on the doorbell.
    fn sleeping_receivers<T: Send + 'static>(
        rx: &BoundedReceiver<T>,
        n: usize,
    ) -> (Vec<thread::JoinHandle<()>>, crossbeam_channel::Receiver<T>) {
        let (taken_tx, taken) = crossbeam_channel::unbounded();
        let receivers = (0..n)
            .map(|_| {
                let (rx, taken_tx) = (rx.clone(), taken_tx.clone());
                thread::spawn(move || {
                    std::iter::from_fn(|| rx.recv()).for_each(|item| {
                        let _ = taken_tx.send(item);
                    })
                })
            })
            .collect();
        while rx.bell.lock().asleep < n {
            thread::yield_now();
        }
        (receivers, taken)
    }

    #[test]
    fn an_item_sent_while_every_receiver_sleeps_is_taken_and_they_sleep_again() {
        let (tx, rx) = bounded::<u32>(4);
        let (receivers, taken) = sleeping_receivers(&rx, 3);
        for i in 0..20 {
            tx.try_send(i).unwrap();
            assert_eq!(taken.recv_timeout(Duration::from_secs(10)), Ok(i));
            while rx.bell.lock().asleep < 3 {
                thread::yield_now();
            }
            assert_eq!(rx.bell.lock().rings, 0, "a ring left untaken");
        }
        drop(tx);
        joined_within_10s(receivers);
    }

    /// `senders` threads each send `rounds` items, one at a time, waiting until a receiver of
    /// `receivers` has taken one before sending the next. Receivers keep going back to sleep
    /// while others send, so a lost ring leaves an item untaken for good.
    fn ping_pong(senders: u32, receivers: usize, rounds: u32) {
        let (tx, rx) = bounded::<(u32, crossbeam_channel::Sender<u32>)>(8);
        let receivers: Vec<_> = (0..receivers)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || {
                    while let Some((n, ack)) = rx.recv() {
                        ack.send(n).unwrap();
                    }
                })
            })
            .collect();
        thread::scope(|scope| {
            for s in 0..senders {
                let tx = &tx;
                scope.spawn(move || {
                    let (ack_tx, acks) = crossbeam_channel::bounded(1);
                    for i in 0..rounds {
                        let n = s * rounds + i;
                        while let Err(TrySendError::Full(_)) = tx.try_send((n, ack_tx.clone())) {
                            thread::yield_now();
                        }
                        let taken = acks.recv_timeout(Duration::from_secs(10));
                        assert_eq!(taken, Ok(n), "item {n} was never taken");
                    }
                });
            }
        });
        drop(tx);
        joined_within_10s(receivers);
    }

    #[test]
    fn no_wake_up_is_lost_between_one_sender_and_one_receiver() {
        ping_pong(1, 1, 2_000);
    }

    #[test]
    fn no_wake_up_is_lost_between_many_senders_and_receivers() {
        ping_pong(4, 2, 1_000);
        ping_pong(4, 8, 1_000);
    }

    /// Joins `threads` on a thread of its own, so that a receiver that never returns fails the
    /// test instead of hanging it.
    fn joined_within_10s<R: Send + 'static>(threads: Vec<thread::JoinHandle<R>>) -> Vec<R> {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let results: Vec<R> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let _ = done_tx.send(results);
        });
        done.recv_timeout(Duration::from_secs(10))
            .expect("a receiver did not return once the sender was gone")
    }

    #[test]
    fn sleeping_receivers_return_when_the_sender_is_dropped() {
        let (tx, rx) = bounded::<u32>(8);
        let (receivers, taken) = sleeping_receivers(&rx, 4);
        drop(tx);
        joined_within_10s(receivers);
        assert!(taken.try_recv().is_err());
    }

    #[test]
    fn receivers_take_what_is_left_after_the_sender_is_gone_then_return() {
        let (tx, rx) = bounded::<u32>(8);
        (0..8).for_each(|i| tx.try_send(i).unwrap());
        drop(tx);
        let receivers: Vec<_> = (0..3)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || std::iter::from_fn(|| rx.recv()).collect::<Vec<_>>())
            })
            .collect();
        let mut got: Vec<u32> = joined_within_10s(receivers).concat();
        got.sort();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn try_send_gives_the_item_back_when_full_or_when_no_receiver_is_left() {
        let (tx, rx) = bounded(1);
        assert!(tx.try_send(1).is_ok());
        assert_eq!(rx.len(), 1);
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        assert_eq!(rx.recv(), Some(1));
        assert!(rx.is_empty());
        drop(rx);
        assert_eq!(tx.try_send(3), Err(TrySendError::Disconnected(3)));
    }
}
