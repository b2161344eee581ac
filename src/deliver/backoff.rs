//! Retry delays after a failed push (docs/design.md#delivery): exponential
//! from 1 s, capped at 60 s, with full jitter above a floor, unless the
//! manager said `Retry-After`, which is held to the same floor.
//!
//! The floor is what keeps a fleet from hammering a struggling manager: a
//! manager answering `503` with `Retry-After: 0`, or a jittered delay that
//! comes out near zero, would otherwise have every agent ask again at once,
//! thousands of times a second.

use std::time::Duration;

/// The first retry ceiling, and the shortest wait after any failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The shortest wait before a retry, whatever the jitter or the manager's
/// `Retry-After` say.
pub const MIN_RETRY_DELAY: Duration = BACKOFF_BASE;
/// The largest retry ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The longest `Retry-After` obeyed; a larger one is taken as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delays for consecutive failures. Full jitter spreads hundreds of VMs that
/// lost the same manager at the same moment over the whole window.
#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff whose jitter is seeded from `seed` (the run id makes every
    /// agent's sequence different).
    pub fn new(seed: &str) -> Backoff {
        // FNV-1a of the seed, never zero (xorshift's fixed point).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Backoff {
            failures: 0,
            rng: h | 1,
        }
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The ceiling for the next delay: 1 s, 2 s, 4 s … capped at 60 s.
    pub fn ceiling(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        (BACKOFF_BASE * (1u32 << doublings)).min(BACKOFF_CAP)
    }

    /// Records a failure and returns how long to wait before the next try:
    /// `retry_after` when the manager gave one, else uniform between
    /// [`MIN_RETRY_DELAY`] and the ceiling; never less than
    /// [`MIN_RETRY_DELAY`], never more than [`MAX_RETRY_AFTER`].
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if let Some(ra) = retry_after {
            return ra.clamp(MIN_RETRY_DELAY, MAX_RETRY_AFTER);
        }
        let floor = MIN_RETRY_DELAY.as_millis() as u64;
        let span = (self.ceiling().as_millis() as u64).saturating_sub(floor);
        Duration::from_millis(floor + self.next_random() % (span + 1))
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: plenty for jitter, no dependency.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// Parses a `Retry-After` header given in seconds: `1*DIGIT` (RFC 9110
/// section 10.2.3), so `+5`, `-1` or `5.0` are not a delay. The HTTP-date
/// form is not used by managers and is ignored.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits too many for a u64 are a very long delay, capped by the caller.
    Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_from_one_second_to_the_cap() {
        let mut b = Backoff::new("run");
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            b.next_delay(None);
            ceilings.push(b.ceiling().as_secs());
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_vary() {
        let mut b = Backoff::new("run-a");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let d = b.next_delay(None);
            assert!(d <= b.ceiling());
            seen.insert(d.as_millis());
        }
        assert!(seen.len() > 50, "jitter should spread delays");
        b.reset();
        assert_eq!(b.next_delay(None), MIN_RETRY_DELAY);
    }

    #[test]
    fn no_delay_is_ever_below_the_floor() {
        let mut b = Backoff::new("floor");
        for _ in 0..1000 {
            assert!(b.next_delay(None) >= MIN_RETRY_DELAY);
        }
        assert_eq!(b.next_delay(Some(Duration::ZERO)), MIN_RETRY_DELAY);
        assert_eq!(
            b.next_delay(Some(Duration::from_millis(10))),
            MIN_RETRY_DELAY
        );
    }

    #[test]
    fn retry_after_is_obeyed_and_bounded() {
        let mut b = Backoff::new("x");
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(99_999))),
            MAX_RETRY_AFTER
        );
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        for bad in ["+5", "-1", "5.0", "", " ", "5s", "0x5", "1 2"] {
            assert_eq!(parse_retry_after(bad), None, "{bad:?}");
        }
        assert_eq!(
            b.next_delay(parse_retry_after("99999999999999999999999")),
            MAX_RETRY_AFTER
        );
    }
}
