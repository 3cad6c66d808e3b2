//! Reconnect delays: exponential with full jitter, so ten thousand agents that lose the coordinator
//! at the same moment spread their reconnects over the whole window instead of arriving together.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, attempt: 0 }
    }

    /// The ceiling of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, given a uniform random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit_random: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit_random.clamp(0.0, 1.0))
    }

    /// Back to the shortest delay after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_grows_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(b.next_delay(0.999_999), Duration::from_millis(100).mul_f64(0.999_999));
        assert_eq!(b.ceiling(), Duration::from_millis(200));
        for _ in 0..40 {
            assert!(b.next_delay(0.5) <= Duration::from_millis(2500));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(5));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
