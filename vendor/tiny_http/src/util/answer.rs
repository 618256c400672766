//! The hand-back of one answer to its connection's thread.
//!
//! std's channels spin and call `sched_yield` several times before a receiver sleeps, which on a
//! machine with more busy threads than cores is system calls that do no work. Here the
//! connection's thread sleeps on a condition variable at once, and whoever answers wakes it only
//! if it is asleep, after letting go of the lock: one wake-up per answer.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Gives the answer; dropped without giving one, the receiver hears that none will come.
pub(crate) struct AnswerSender<T> {
    slot: Arc<Slot<T>>,
}

/// Waits for the answer.
pub(crate) struct AnswerReceiver<T> {
    slot: Arc<Slot<T>>,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    answer: Option<T>,
    sender_gone: bool,
    receiver_gone: bool,
    asleep: bool,
}

/// Why no answer was received.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// None yet.
    Timeout,
    /// None will come: the sender is gone.
    Disconnected,
}

pub(crate) fn answer<T>() -> (AnswerSender<T>, AnswerReceiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State {
            answer: None,
            sender_gone: false,
            receiver_gone: false,
            asleep: false,
        }),
        ready: Condvar::new(),
    });
    (
        AnswerSender {
            slot: Arc::clone(&slot),
        },
        AnswerReceiver { slot },
    )
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> AnswerSender<T> {
    /// Hands the answer over; gives it back if the receiver is gone.
    pub(crate) fn send(self, value: T) -> Result<(), T> {
        let mut state = self.slot.lock();
        if state.receiver_gone {
            return Err(value);
        }
        state.answer = Some(value);
        let asleep = state.asleep;
        drop(state);
        if asleep {
            self.slot.ready.notify_one();
        }
        Ok(())
    }
}

impl<T> Drop for AnswerSender<T> {
    fn drop(&mut self) {
        let mut state = self.slot.lock();
        state.sender_gone = true;
        let wake = state.asleep && state.answer.is_none();
        drop(state);
        if wake {
            self.slot.ready.notify_one();
        }
    }
}

impl<T> AnswerReceiver<T> {
    /// The answer, waiting at most `timeout` for it.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, Unanswered> {
        let mut state = self.slot.lock();
        if state.answer.is_none() && !state.sender_gone {
            state.asleep = true;
            state = self
                .slot
                .ready
                .wait_timeout_while(state, timeout, |s| s.answer.is_none() && !s.sender_gone)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.asleep = false;
        }
        match state.answer.take() {
            Some(value) => Ok(value),
            None if state.sender_gone => Err(Unanswered::Disconnected),
            None => Err(Unanswered::Timeout),
        }
    }
}

impl<T> Drop for AnswerReceiver<T> {
    fn drop(&mut self) {
        self.slot.lock().receiver_gone = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_arrives_across_threads_and_a_dropped_sender_disconnects() {
        let (tx, rx) = answer();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(Unanswered::Timeout)
        );
        let sender = std::thread::spawn(move || tx.send(5).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(5));
        sender.join().unwrap();
        let (tx, rx) = answer::<u8>();
        drop(tx);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(Unanswered::Disconnected)
        );
        let (tx, rx) = answer();
        drop(rx);
        assert_eq!(tx.send(1), Err(1));
    }
}
