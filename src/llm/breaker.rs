//! The circuit breaker: stop calling an LLM that keeps failing, and find out when it is back.
//!
//! After `threshold` calls in a row fail, the breaker opens: for the cool-down every request
//! is answered 503 `upstream_unavailable` at once instead of tying up a worker on a call that
//! will most likely fail too. Then one request is let through as a probe; its success closes
//! the breaker, its failure opens it for another cool-down, and a probe that proves nothing
//! (its client left) frees the turn for the next call. Each call's outcome is recorded when its
//! [`Pass`] drops, so no path, a panic included, can leave the breaker waiting for a probe that
//! never reports. Shared by every worker; the lock is held for a few instructions, never across
//! a call.

use super::later;
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
enum Permit {
    /// An ordinary call while the breaker is closed.
    Call,
    /// The one call that decides whether an open breaker closes.
    Probe,
}

/// How a permitted call ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The LLM answered (also a refusal of this particular request).
    Succeeded,
    /// The LLM looks unwell.
    Failed,
    /// The call was abandoned before it showed anything either way.
    Inconclusive,
}

/// Leave to make one call; records the call's [`Outcome`] when dropped, as
/// [`Outcome::Failed`] unless [`Pass::record`] said otherwise.
pub struct Pass<'a> {
    breaker: &'a Breaker,
    permit: Permit,
    outcome: Outcome,
}

impl Pass<'_> {
    /// Says how the call ended.
    pub fn record(mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.breaker
            .record(self.permit, self.outcome, Instant::now());
    }
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
    pub fn admit(&self, now: Instant) -> Result<Pass<'_>, Duration> {
        let permit = self.permit(now)?;
        Ok(Pass {
            breaker: self,
            permit,
            outcome: Outcome::Failed,
        })
    }

    fn permit(&self, now: Instant) -> Result<Permit, Duration> {
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

    fn record(&self, permit: Permit, outcome: Outcome, now: Instant) {
        if self.threshold == 0 {
            return;
        }
        let mut state = self.state.lock();
        let next = match (*state, permit, outcome) {
            (_, _, Outcome::Succeeded) => State::Closed { failures: 0 },
            // The next call may probe at once.
            (State::Probing, Permit::Probe, Outcome::Inconclusive) => State::Open { until: now },
            (current, _, Outcome::Inconclusive) => current,
            (State::Closed { failures }, Permit::Call, Outcome::Failed)
                if failures.saturating_add(1) >= self.threshold =>
            {
                State::Open {
                    until: later(now, self.cooldown),
                }
            }
            (State::Closed { failures }, Permit::Call, Outcome::Failed) => State::Closed {
                failures: failures + 1,
            },
            (_, Permit::Probe, Outcome::Failed) => State::Open {
                until: later(now, self.cooldown),
            },
            // A call that started before the breaker opened and failed changes nothing.
            (current, Permit::Call, Outcome::Failed) => current,
        };
        self.log_change(*state, next, outcome);
        *state = next;
    }

    fn log_change(&self, from: State, to: State, outcome: Outcome) {
        match (from, to, outcome) {
            (State::Closed { .. }, State::Open { .. }, _) => log::warn!(
                "the LLM failed {} times in a row: not calling it for {} ms",
                self.threshold,
                self.cooldown.as_millis()
            ),
            (State::Probing, State::Open { .. }, Outcome::Failed) => {
                log::warn!("the probe call to the LLM failed: breaker stays open")
            }
            (State::Probing, State::Open { .. }, _) => {
                log::info!("the probe call was abandoned: the next call probes")
            }
            (State::Probing | State::Open { .. }, State::Closed { .. }, _) => {
                log::info!("the LLM answers again: breaker closed")
            }
            _ => {}
        }
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
            assert_eq!(b.permit(t), Ok(Permit::Call));
            b.record(Permit::Call, Outcome::Failed, t);
        }
        assert_eq!(b.permit(t), Ok(Permit::Call));
        b.record(Permit::Call, Outcome::Failed, t);
        assert_eq!(
            b.permit(t + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        assert_eq!(b.permit(t + COOL), Ok(Permit::Probe));
        assert_eq!(
            b.permit(t + COOL),
            Err(WHILE_PROBING),
            "one probe at a time"
        );
    }

    #[test]
    fn a_successful_probe_closes_and_a_failed_one_reopens() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record(Permit::Call, Outcome::Failed, t);
        assert_eq!(b.permit(t + COOL), Ok(Permit::Probe));
        b.record(Permit::Probe, Outcome::Failed, t + COOL);
        assert!(b.permit(t + COOL + Duration::from_secs(1)).is_err());
        let later = t + COOL * 2;
        assert_eq!(b.permit(later), Ok(Permit::Probe));
        b.record(Permit::Probe, Outcome::Succeeded, later);
        assert_eq!(b.permit(later), Ok(Permit::Call));
    }

    #[test]
    fn a_success_resets_the_count_and_zero_disables() {
        let b = Breaker::new(2, COOL);
        let t = Instant::now();
        b.record(Permit::Call, Outcome::Failed, t);
        b.record(Permit::Call, Outcome::Succeeded, t);
        b.record(Permit::Call, Outcome::Failed, t);
        assert_eq!(b.permit(t), Ok(Permit::Call));
        let off = Breaker::new(0, COOL);
        for _ in 0..10 {
            off.record(Permit::Call, Outcome::Failed, t);
        }
        assert_eq!(off.permit(t), Ok(Permit::Call));
    }

    fn probing(b: &Breaker) -> Pass<'_> {
        *b.state.lock() = State::Probing;
        Pass {
            breaker: b,
            permit: Permit::Probe,
            outcome: Outcome::Failed,
        }
    }

    #[test]
    fn a_probe_that_panics_before_recording_counts_as_failed() {
        let b = Breaker::new(1, COOL);
        let pass = probing(&b);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _pass = pass;
            panic!("a bug in the call");
        }));
        assert!(panicked.is_err());
        assert!(matches!(*b.state.lock(), State::Open { .. }));
        let wait = b.permit(Instant::now()).unwrap_err();
        assert!(
            wait > COOL / 2,
            "a new cool-down, not a jammed probe: {wait:?}"
        );
    }

    #[test]
    fn a_cancelled_probe_frees_the_turn_and_closes_nothing() {
        let b = Breaker::new(1, COOL);
        probing(&b).record(Outcome::Inconclusive);
        let next = b.admit(Instant::now()).expect("the next call probes");
        assert_eq!(next.permit, Permit::Probe);
        next.record(Outcome::Succeeded);
        assert_eq!(*b.state.lock(), State::Closed { failures: 0 });
    }

    #[test]
    fn a_cancelled_call_changes_no_count() {
        let b = Breaker::new(2, COOL);
        let t = Instant::now();
        b.record(Permit::Call, Outcome::Failed, t);
        b.admit(t).unwrap().record(Outcome::Inconclusive);
        assert_eq!(*b.state.lock(), State::Closed { failures: 1 });
    }
}
