//! Admission: whether a request may enter the pool, decided by the acceptor before it queues.
//!
//! A request is admitted while fewer than `workers + queue_capacity` are in flight (running or
//! waiting), and, for a new message, while its chat has no other message in flight. Admission
//! hands out a [`Ticket`] that travels with the job; dropping it (when the worker is done, or
//! when the job is dropped unserved) releases both, so a worker never has to remember to.
//!
//! A ticket also carries the tenant's place under its `max_concurrent` (a [`Pass`], see
//! [`crate::tenants`]), so that both are released at the same moment.
//!
//! Counting in-flight requests, rather than asking whether the channel is full, makes the
//! limit exact: a worker that has been woken but not yet scheduled still holds its job in the
//! channel, and a channel sized to the queue alone would turn such a moment into a false 503.

use crate::tenants::Pass;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every worker is busy and the queue is full.
    Full,
    /// The chat already has a message queued or in progress.
    ChatBusy,
}

/// The admission state shared by the acceptor (which admits) and tickets (which release).
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

struct Shared {
    limit: usize,
    in_flight: AtomicUsize,
    busy_chats: Mutex<HashSet<String>>,
}

/// Proof of admission; releases its place, its chat and its tenant's place when dropped.
pub struct Ticket {
    shared: Arc<Shared>,
    chat: Option<String>,
    tenant: Option<Pass>,
}

impl Admission {
    /// Admits at most `limit` requests in flight at once.
    pub fn new(limit: usize) -> Admission {
        Admission {
            shared: Arc::new(Shared {
                limit,
                in_flight: AtomicUsize::new(0),
                busy_chats: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Admits one request, holding `chat` busy until the ticket is dropped. Only the acceptor
    /// calls this, so the check and the increment cannot race with another admission.
    pub fn admit(&self, chat: Option<&str>) -> Result<Ticket, Refusal> {
        let shared = &self.shared;
        // Held throughout: a worker may claim a chat meanwhile (see [`Ticket::hold_chat`]).
        let mut busy = shared.busy_chats.lock();
        if chat.is_some_and(|chat| busy.contains(chat)) {
            return Err(Refusal::ChatBusy);
        }
        if shared.in_flight.load(Ordering::Acquire) >= shared.limit {
            return Err(Refusal::Full);
        }
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(chat) = chat {
            busy.insert(chat.to_string());
        }
        drop(busy);
        Ok(Ticket {
            shared: Arc::clone(shared),
            chat: chat.map(str::to_string),
            tenant: None,
        })
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }
}

impl Ticket {
    /// Holds the tenant's place for as long as this ticket.
    pub fn hold(&mut self, pass: Pass) {
        self.tenant = Some(pass);
    }

    /// Holds `chat` busy until the ticket is dropped, for a request whose chat is known only
    /// once its body has been read (a response continuing an earlier one); refused while
    /// another request holds it. A ticket holds one chat at most.
    pub fn hold_chat(&mut self, chat: &str) -> Result<(), Refusal> {
        if self.chat.as_deref() == Some(chat) {
            return Ok(());
        }
        let mut busy = self.shared.busy_chats.lock();
        if self.chat.is_some() || !busy.insert(chat.to_string()) {
            return Err(Refusal::ChatBusy);
        }
        self.chat = Some(chat.to_string());
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(chat) = self.chat.take() {
            self.shared.busy_chats.lock().remove(&chat);
        }
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_again_after_a_release() {
        let a = Admission::new(2);
        let t1 = a.admit(None).unwrap();
        let _t2 = a.admit(Some("x")).unwrap();
        assert_eq!(a.admit(None).err(), Some(Refusal::Full));
        drop(t1);
        assert_eq!(a.in_flight(), 1);
        assert!(a.admit(None).is_ok());
    }

    #[test]
    fn a_chat_is_busy_until_its_ticket_drops() {
        let a = Admission::new(10);
        let t = a.admit(Some("c")).unwrap();
        assert_eq!(a.admit(Some("c")).err(), Some(Refusal::ChatBusy));
        assert!(a.admit(Some("d")).is_ok());
        drop(t);
        assert!(a.admit(Some("c")).is_ok());
    }

    #[test]
    fn a_worker_holds_a_chat_found_in_the_body_like_the_acceptor_does() {
        let a = Admission::new(10);
        let mut t = a.admit(None).unwrap();
        t.hold_chat("c").unwrap();
        assert_eq!(a.admit(Some("c")).err(), Some(Refusal::ChatBusy));
        let mut other = a.admit(None).unwrap();
        assert_eq!(other.hold_chat("c").err(), Some(Refusal::ChatBusy));
        drop(t);
        assert!(other.hold_chat("c").is_ok());
        assert_eq!(other.hold_chat("d").err(), Some(Refusal::ChatBusy));
    }
}
