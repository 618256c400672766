//! chatpool patch: counting open connections, and logging a repeated error now and then.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One of a limited number of open connections; dropping it frees the place.
pub struct Slot {
    open: Arc<AtomicUsize>,
}

impl Slot {
    /// Takes a place if fewer than `max` are taken.
    pub fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot { open: open.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs an error at most once a period, with the number of repeats left out.
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            suppressed: 0,
        }
    }

    pub fn log(&mut self, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::error!("{} (and {} more like it)", message(), self.suppressed);
        } else {
            log::error!("{}", message());
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_freed_on_drop() {
        let open = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&open, 2).unwrap();
        let _b = Slot::take(&open, 2).unwrap();
        assert!(Slot::take(&open, 2).is_none());
        drop(a);
        assert!(Slot::take(&open, 2).is_some());
        assert_eq!(open.load(Ordering::Acquire), 1);
    }
}
