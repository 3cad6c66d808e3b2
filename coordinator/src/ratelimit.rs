//! Token buckets by key (a user name): how often something may happen per key, with a burst. No
//! I/O and no clock of its own: callers pass the time in.

use std::collections::HashMap;
use std::time::Instant;

/// Buckets kept before full ones (idle long enough to have refilled) are dropped.
const PRUNE_AT: usize = 4096;

#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Takes refused since the last one allowed.
    refused: u64,
}

/// The answer to [`RateLimiter::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Within the rate; `refused_before` takes were refused since the previous allowed one, for
    /// the caller to mention when it reports this one.
    Allowed {
        refused_before: u64,
    },
    Refused,
}

impl RateLimiter {
    /// `per_sec` takes a second on average, at most `burst` at once.
    pub fn new(per_sec: f64, burst: u32) -> Self {
        RateLimiter { per_sec, burst: f64::from(burst.max(1)), buckets: HashMap::new() }
    }

    /// Takes one for `key` at `now`.
    pub fn take(&mut self, key: &str, now: Instant) -> Take {
        if self.buckets.len() >= PRUNE_AT && !self.buckets.contains_key(key) {
            self.prune(now);
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.buckets.entry(key.to_string()).or_insert(Bucket { tokens: burst, at: now, refused: 0 });
        bucket.refill(now, per_sec, burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Take::Allowed { refused_before: std::mem::take(&mut bucket.refused) }
        } else {
            bucket.refused += 1;
            Take::Refused
        }
    }

    /// Whether a log line about `key` may be written at `now`: if so, the end it takes, saying how
    /// many lines were not written since the last one ("" when none were).
    pub fn log_line(&mut self, key: &str, now: Instant) -> Option<String> {
        match self.take(key, now) {
            Take::Allowed { refused_before: 0 } => Some(String::new()),
            Take::Allowed { refused_before } => Some(format!(" (and {refused_before} times before, not logged)")),
            Take::Refused => None,
        }
    }

    /// Drops buckets that have refilled: forgetting them changes no answer.
    fn prune(&mut self, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets.retain(|_, b| {
            b.refill(now, per_sec, burst);
            b.tokens < burst
        });
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant, per_sec: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(burst);
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_say_how_many_were_not_written() {
        let mut r = RateLimiter::new(0.1, 1);
        let t = Instant::now();
        assert_eq!(r.log_line("a", t).as_deref(), Some(""));
        assert_eq!(r.log_line("a", t), None);
        assert_eq!(r.log_line("a", t), None);
        assert_eq!(
            r.log_line("a", t + std::time::Duration::from_secs(10)).as_deref(),
            Some(" (and 2 times before, not logged)")
        );
    }
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let allowed = |n| Take::Allowed { refused_before: n };
        let mut r = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.take("alice", t0), allowed(0));
        }
        assert_eq!(r.take("alice", t0), Take::Refused);
        assert_eq!(r.take("alice", t0), Take::Refused);
        // Another key has its own bucket.
        assert_eq!(r.take("bob", t0), allowed(0));
        // Half a second gives alice one more, which carries the count of those refused before it.
        assert_eq!(r.take("alice", t0 + Duration::from_millis(500)), allowed(2));
        assert_eq!(r.take("alice", t0 + Duration::from_millis(500)), Take::Refused);
        // Idle for long, the bucket is full again, never over the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(r.take("alice", later), allowed(1));
        for _ in 0..2 {
            assert_eq!(r.take("alice", later), allowed(0));
        }
        assert_eq!(r.take("alice", later), Take::Refused);
    }

    #[test]
    fn full_buckets_are_forgotten_when_there_are_many() {
        let mut r = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        for i in 0..PRUNE_AT {
            r.take(&format!("user{i}"), t0);
        }
        assert_eq!(r.buckets.len(), PRUNE_AT);
        // A second later every bucket has refilled; a new key prunes them all.
        r.take("late", t0 + Duration::from_secs(1));
        assert_eq!(r.buckets.len(), 1);
        // A bucket still short of tokens is kept.
        let mut r = RateLimiter::new(1.0, 2);
        r.take("busy", t0);
        for i in 0..PRUNE_AT {
            r.take(&format!("user{i}"), t0 + Duration::from_secs(10));
        }
        assert!(r.buckets.contains_key("user0"));
    }
}
