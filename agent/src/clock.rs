//! Wall-clock timestamps derived from one monotonic anchor, so a span's start and end stay consistent
//! with each other even if the system clock is stepped while a script runs.

use std::time::Duration;
use tokio::time::Instant;

/// Maps monotonic instants to Unix milliseconds through one anchor taken at agent start.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    origin: Instant,
    origin_ms: i64,
}

impl WallClock {
    /// Anchors the clock now: call it first thing in `main`, it marks "agent process start".
    pub fn start() -> Self {
        Self::anchored(Instant::now(), tether_shared::now_ms())
    }

    pub fn anchored(origin: Instant, origin_ms: i64) -> Self {
        WallClock { origin, origin_ms }
    }

    /// The instant the clock was anchored.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Unix milliseconds of `t`.
    pub fn at(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.origin) {
            Some(after) => self.origin_ms.saturating_add(millis(after)),
            None => self.origin_ms.saturating_sub(millis(self.origin.duration_since(t))),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.at(Instant::now())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_to_anchor_plus_elapsed() {
        let origin = Instant::now();
        let clock = WallClock::anchored(origin, 1_000_000);
        assert_eq!(clock.at(origin), 1_000_000);
        assert_eq!(clock.at(origin + Duration::from_millis(1500)), 1_001_500);
        assert_eq!(clock.origin(), origin);
    }
}
