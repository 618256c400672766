use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

enum Control<T> {
    Elem(T),
    Unblock,
}

/// The queue of received requests, from the connections' threads to whoever calls `recv`.
///
/// chatpool patch: a push wakes a receiver only when one is asleep, and after letting go of
/// the lock. Every push used to wake the condition variable, a system call even when no one
/// waited (a busy receiver), and the receiver it did wake found the lock still held and slept
/// on it once more.
pub struct MessagesQueue<T>
where
    T: Send,
{
    state: Mutex<State<T>>,
    condvar: Condvar,
}

struct State<T> {
    queue: VecDeque<Control<T>>,
    asleep: usize,
}

impl<T> MessagesQueue<T>
where
    T: Send,
{
    pub fn with_capacity(capacity: usize) -> Arc<MessagesQueue<T>> {
        Arc::new(MessagesQueue {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity),
                asleep: 0,
            }),
            condvar: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, control: Control<T>) {
        let mut state = self.lock();
        state.queue.push_back(control);
        let wake = state.asleep > 0;
        drop(state);
        if wake {
            self.condvar.notify_one();
        }
    }

    /// Pushes an element to the queue.
    pub fn push(&self, value: T) {
        self.add(Control::Elem(value));
    }

    /// Unblock one thread stuck in pop loop.
    pub fn unblock(&self) {
        self.add(Control::Unblock);
    }

    /// Pops an element. Blocks until one is available.
    /// Returns None in case unblock() was issued.
    pub fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        while state.queue.is_empty() {
            state.asleep += 1;
            state = self
                .condvar
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.asleep -= 1;
        }
        Self::take(&mut state)
    }

    /// Tries to pop an element without blocking.
    pub fn try_pop(&self) -> Option<T> {
        Self::take(&mut self.lock())
    }

    /// Pops an element, waiting at most `timeout` for one; `None` after the timeout or when
    /// unblock() was issued.
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.asleep += 1;
            state = self
                .condvar
                .wait_timeout_while(state, timeout, |s| s.queue.is_empty())
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.asleep -= 1;
        }
        Self::take(&mut state)
    }

    fn take(state: &mut State<T>) -> Option<T> {
        match state.queue.pop_front() {
            Some(Control::Elem(value)) => Some(value),
            Some(Control::Unblock) | None => None,
        }
    }
}
