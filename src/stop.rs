//! A stop request that sleeping threads wake up for at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Set once, on SIGTERM/SIGINT or by the in-process owner; every wait ends.
/// It remembers when it was set, so that the shutdown flush is bounded from
/// the stop itself, not from whenever the sender gets to it.
#[derive(Debug, Default)]
pub struct Stop {
    stopped: Mutex<Option<Instant>>,
    wake: Condvar,
}

impl Stop {
    /// A stop not yet requested.
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Requests the stop and wakes every waiter.
    pub fn trigger(&self) {
        self.lock().get_or_insert_with(Instant::now);
        self.wake.notify_all();
    }

    /// Whether the stop was requested.
    pub fn is_set(&self) -> bool {
        self.lock().is_some()
    }

    /// `d` after the stop was requested (after now, if it was not).
    pub fn deadline_after(&self, d: Duration) -> Instant {
        self.lock().unwrap_or_else(Instant::now) + d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Never poisoned in the release build (panic = abort); a test that
        // panics must not stop the others.
        self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps until `deadline` or the stop; true when stopped.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut stopped = self.lock();
        while stopped.is_none() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            stopped = self
                .wake
                .wait_timeout(stopped, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Sleeps for `d` or until the stop; true when stopped.
    pub fn wait(&self, d: Duration) -> bool {
        self.wait_until(Instant::now() + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn trigger_wakes_a_long_wait() {
        let s = Arc::new(Stop::new());
        assert!(!s.wait(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(Duration::from_secs(600)));
        s.trigger();
        assert!(t.join().unwrap());
        assert!(s.is_set());
    }
}
