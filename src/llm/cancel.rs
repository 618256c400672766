//! Cancelling an LLM call from outside it.
//!
//! A call runs on its worker's thread and may block for as long as `request_timeout_ms`. When
//! the client it serves goes away, whoever notices (the connection watching its socket, or the
//! stream writer whose write failed) sets a shared flag. Everything the call waits on, the
//! socket to the upstream and the pauses between attempts, waits in short slices and looks at
//! the flag between them, so a cancelled call ends within one slice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a cancelled call goes on waiting before it notices.
pub(crate) const SLICE: Duration = Duration::from_millis(200);

/// Whether the client of a call has gone away; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Option<Arc<AtomicBool>>,
}

impl Cancel {
    /// A call that is cancelled once `flag` is set.
    pub fn new(flag: Arc<AtomicBool>) -> Cancel {
        Cancel { flag: Some(flag) }
    }

    /// A call nothing cancels.
    pub fn never() -> Cancel {
        Cancel { flag: None }
    }

    /// Whether the call should be abandoned.
    pub fn is_cancelled(&self) -> bool {
        self.flag
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    /// Sleeps for `wait`, or less if cancelled; returns `false` if it was.
    pub fn sleep(&self, wait: Duration) -> bool {
        let until = Instant::now().checked_add(wait);
        loop {
            if self.is_cancelled() {
                return false;
            }
            let left = until.map_or(SLICE, |t| t.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_cancels_and_never_does_not() {
        let flag = Arc::new(AtomicBool::new(false));
        let cancel = Cancel::new(Arc::clone(&flag));
        assert!(!cancel.is_cancelled());
        flag.store(true, Ordering::Relaxed);
        assert!(cancel.is_cancelled());
        assert!(cancel.clone().is_cancelled());
        assert!(!Cancel::never().is_cancelled());
    }

    #[test]
    fn a_cancelled_sleep_ends_within_a_slice() {
        let flag = Arc::new(AtomicBool::new(false));
        let cancel = Cancel::new(Arc::clone(&flag));
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            flag.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        assert!(!cancel.sleep(Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(5));
        setter.join().unwrap();
        assert!(Cancel::never().sleep(Duration::from_millis(1)));
    }
}
