//! The circuit breaker: stop calling an LLM that keeps failing, and find out when it is back.
//!
//! After `threshold` calls in a row fail, the breaker opens: for the cool-down every request
//! is answered 503 `upstream_unavailable` at once instead of tying up a worker on a call that
//! will most likely fail too. Then one request is let through as a probe; its success closes
//! the breaker, its failure opens it for another cool-down. Shared by every worker; the lock
//! is held for a few instructions, never across a call.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// How long clients are told to wait while a probe is deciding.
const WHILE_PROBING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing,
}

/// Leave to call the LLM, and what kind of call it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// An ordinary call while the breaker is closed.
    Call,
    /// The one call that decides whether an open breaker closes.
    Probe,
}

/// A breaker shared by all workers.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures (0: never) for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go out now; if not, how long the client should wait.
    pub fn admit(&self, now: Instant) -> Result<Permit, Duration> {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Ok(Permit::Call),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } => {
                *state = State::Probing;
                Ok(Permit::Probe)
            }
            State::Probing => Err(WHILE_PROBING),
        }
    }

    /// Records how a permitted call ended.
    pub fn record(&self, permit: Permit, succeeded: bool, now: Instant) {
        if self.threshold == 0 {
            return;
        }
        let mut state = self.state.lock();
        let next = match (*state, permit, succeeded) {
            (_, _, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, Permit::Call, false) if failures + 1 >= self.threshold => {
                State::Open {
                    until: now + self.cooldown,
                }
            }
            (State::Closed { failures }, Permit::Call, false) => State::Closed {
                failures: failures + 1,
            },
            (_, Permit::Probe, false) => State::Open {
                until: now + self.cooldown,
            },
            // A call that started before the breaker opened and failed changes nothing.
            (current, Permit::Call, false) => current,
        };
        match (*state, next) {
            (State::Closed { .. }, State::Open { .. }) => log::warn!(
                "the LLM failed {} times in a row: not calling it for {} ms",
                self.threshold,
                self.cooldown.as_millis()
            ),
            (State::Probing, State::Open { .. }) => {
                log::warn!("the probe call to the LLM failed: breaker stays open")
            }
            (State::Probing | State::Open { .. }, State::Closed { .. }) => {
                log::info!("the LLM answers again: breaker closed")
            }
            _ => {}
        }
        *state = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_the_threshold_and_refuses_until_the_cooldown_ends() {
        let b = Breaker::new(3, COOL);
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t), Ok(Permit::Call));
            b.record(Permit::Call, false, t);
        }
        assert_eq!(b.admit(t), Ok(Permit::Call));
        b.record(Permit::Call, false, t);
        assert_eq!(
            b.admit(t + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        assert_eq!(b.admit(t + COOL), Ok(Permit::Probe));
        assert_eq!(b.admit(t + COOL), Err(WHILE_PROBING), "one probe at a time");
    }

    #[test]
    fn a_successful_probe_closes_and_a_failed_one_reopens() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record(Permit::Call, false, t);
        assert_eq!(b.admit(t + COOL), Ok(Permit::Probe));
        b.record(Permit::Probe, false, t + COOL);
        assert!(b.admit(t + COOL + Duration::from_secs(1)).is_err());
        let later = t + COOL * 2;
        assert_eq!(b.admit(later), Ok(Permit::Probe));
        b.record(Permit::Probe, true, later);
        assert_eq!(b.admit(later), Ok(Permit::Call));
    }

    #[test]
    fn a_success_resets_the_count_and_zero_disables() {
        let b = Breaker::new(2, COOL);
        let t = Instant::now();
        b.record(Permit::Call, false, t);
        b.record(Permit::Call, true, t);
        b.record(Permit::Call, false, t);
        assert_eq!(b.admit(t), Ok(Permit::Call));
        let off = Breaker::new(0, COOL);
        for _ in 0..10 {
            off.record(Permit::Call, false, t);
        }
        assert_eq!(off.admit(t), Ok(Permit::Call));
    }
}
