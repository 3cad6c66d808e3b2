//! Retention: ended SSH connections leave the audit log, and a workspace's earlier builds lose
//! their logs and timings, once they are older than what ops chose to keep (`--keep-audit`,
//! `--keep-builds`). The current build of a workspace is never touched; a deleted workspace's
//! builds, history and record go once it has been deleted that long.

use crate::engine::Engine;
use std::sync::Arc;
use std::time::Duration;
use tether_shared::now_ms;
use tracing::{info, warn};

/// Purges run at least this often, and at most as often as [`MIN_EVERY`].
const MAX_EVERY: Duration = Duration::from_secs(3600);
const MIN_EVERY: Duration = Duration::from_secs(1);
/// Rows deleted per statement, so that a large first purge never holds the database's write lock
/// for long.
pub const BATCH: i64 = 5000;

/// How often to purge: a tenth of the shortest retention, between a second and an hour, so a
/// record outlives its retention by at most a tenth of it. `None` when everything is kept.
pub fn interval(keep_audit: Option<Duration>, keep_builds: Option<Duration>) -> Option<Duration> {
    let shortest = [keep_audit, keep_builds].into_iter().flatten().min()?;
    Some((shortest / 10).clamp(MIN_EVERY, MAX_EVERY))
}

/// The cut-off time (Unix ms) for records kept `keep` at `now_ms`.
pub fn cutoff(now_ms: i64, keep: Option<Duration>) -> Option<i64> {
    keep.map(|k| now_ms.saturating_sub(i64::try_from(k.as_millis()).unwrap_or(i64::MAX)))
}

/// Purges now and then every [`interval`], until the task is dropped.
pub async fn run(engine: Arc<Engine>, keep_audit: Option<Duration>, keep_builds: Option<Duration>) {
    let Some(every) = interval(keep_audit, keep_builds) else { return };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        if let Some(before) = cutoff(now, keep_audit) {
            match engine.store.purge_audit(before, BATCH).await {
                Ok(0) => {}
                Ok(n) => info!(connections = n, "retention: removed ended SSH connections from the audit log"),
                Err(e) => warn!(error = %e, "retention: could not purge the SSH audit log"),
            }
        }
        if let Some(before) = cutoff(now, keep_builds) {
            match engine.store.purge_builds(before, BATCH).await {
                Ok(p) if p.builds == 0 && p.workspaces == 0 => {}
                Ok(p) => info!(
                    builds = p.builds,
                    log_lines = p.logs,
                    spans = p.spans,
                    deleted_workspaces = p.workspaces,
                    "retention: removed earlier builds"
                ),
                Err(e) => warn!(error = %e, "retention: could not purge earlier builds"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_run_at_a_tenth_of_the_shortest_retention_between_a_second_and_an_hour() {
        let d = Duration::from_secs;
        assert_eq!(interval(None, None), None);
        assert_eq!(interval(Some(d(90 * 86_400)), None), Some(d(3600)));
        assert_eq!(interval(Some(d(90 * 86_400)), Some(d(600))), Some(d(60)));
        assert_eq!(interval(None, Some(d(2))), Some(d(1)));
    }

    #[test]
    fn cutoffs_do_not_overflow() {
        assert_eq!(cutoff(10_000, Some(Duration::from_secs(3))), Some(7_000));
        assert_eq!(cutoff(10_000, None), None);
        assert!(cutoff(10_000, Some(Duration::MAX)).unwrap() < 0);
    }
}
