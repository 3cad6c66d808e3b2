//! What the HTTP API returns and the CLI prints: JSON shapes with lowercase status words and
//! RFC 3339 times.

use crate::store::{LogRow, SpanRow, TransitionRow, WorkspaceRow};
use serde::{Deserialize, Serialize};
use tether_shared::proto::Heartbeat;
use tether_shared::{Lifecycle, SpanStatus, WorkspaceStatus};

/// `2026-11-23T06:42:15.123Z` for a Unix-millisecond time.
pub fn rfc3339(ms: i64) -> String {
    format_time(ms, true)
}

/// `2026-11-23T06:42:15Z` for a Unix-millisecond time.
pub fn rfc3339_seconds(ms: i64) -> String {
    format_time(ms, false)
}

/// RFC 3339 has four-digit years: a time past 9999 (from a damaged database or a peer) is printed
/// as its number instead of failing.
fn format_time(ms: i64, millis: bool) -> String {
    use std::fmt::Write;
    // At most i64::MAX ms, which SystemTime holds on every platform Tether runs on.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    let mut out = String::new();
    let written = if millis {
        write!(out, "{}", humantime::format_rfc3339_millis(t))
    } else {
        write!(out, "{}", humantime::format_rfc3339_seconds(t))
    };
    match written {
        Ok(()) => out,
        Err(_) => format!("{ms} ms after the Unix epoch"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceView {
    pub name: String,
    pub owner: Option<String>,
    pub provisioner: String,
    pub status: WorkspaceStatus,
    pub status_reason: String,
    pub status_changed_at: String,
    pub lifecycle: Option<Lifecycle>,
    pub last_error: Option<String>,
    pub build: i64,
    pub last_heartbeat_at: Option<String>,
    pub agent: Option<AgentView>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub connected: bool,
    pub version: String,
    pub hostname: String,
    pub stats: Option<Heartbeat>,
}

impl WorkspaceView {
    pub fn new(row: &WorkspaceRow, agent: Option<AgentView>, last_heartbeat_ms: Option<i64>) -> Self {
        WorkspaceView {
            name: row.name.clone(),
            owner: row.owner.clone(),
            provisioner: row.provisioner.clone(),
            status: row.status,
            status_reason: row.status_reason.clone(),
            status_changed_at: rfc3339(row.status_changed_at),
            lifecycle: row.lifecycle,
            last_error: row.last_error.clone(),
            build: row.build,
            last_heartbeat_at: last_heartbeat_ms.map(rfc3339),
            agent,
            created_at: rfc3339(row.created_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpanView {
    pub build: i64,
    /// `coordinator` (provisioning) or `agent`.
    pub source: String,
    pub stage: String,
    pub name: String,
    pub started_at: String,
    pub ended_at: String,
    /// Milliseconds from the start of the build.
    pub offset_ms: i64,
    pub duration_ms: i64,
    pub exit_code: Option<i32>,
    pub status: SpanStatus,
}

impl SpanView {
    pub fn new(s: &SpanRow, origin: i64) -> Self {
        SpanView {
            build: s.build,
            source: s.source.clone(),
            stage: s.stage.clone(),
            name: s.name.clone(),
            started_at: rfc3339(s.started_at),
            ended_at: rfc3339(s.ended_at),
            offset_ms: s.started_at - origin,
            duration_ms: s.ended_at - s.started_at,
            exit_code: s.exit_code,
            status: s.status,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogView {
    pub id: i64,
    pub build: i64,
    /// The script's name, or `provision` for provisioning commands.
    pub source: String,
    pub stream: String,
    pub at: String,
    pub line: String,
}

impl From<&LogRow> for LogView {
    fn from(l: &LogRow) -> Self {
        LogView {
            id: l.id,
            build: l.build,
            source: l.source.clone(),
            stream: l.stream.clone(),
            at: rfc3339(l.at),
            line: l.line.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransitionView {
    pub at: String,
    /// `None` for the first: the workspace was created.
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

impl From<&TransitionRow> for TransitionView {
    fn from(t: &TransitionRow) -> Self {
        TransitionView {
            at: rfc3339(t.at),
            from: Some(t.from.clone()).filter(|f| !f.is_empty()),
            to: t.to.clone(),
            reason: t.reason.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShowView {
    #[serde(flatten)]
    pub workspace: WorkspaceView,
    pub history: Vec<TransitionView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedView {
    #[serde(flatten)]
    pub workspace: WorkspaceView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_command: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsView {
    pub lines: Vec<LogView>,
    /// Pass as `after` to get what comes next.
    pub next: i64,
    /// The build these lines are from: pass it as `build` to follow that build.
    #[serde(default)]
    pub build: i64,
    /// No more lines will come unless the workspace is started again: it is stopped, deleted, or
    /// failed with no agent connected. A follower stops here.
    #[serde(default)]
    pub ended: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_the_year_9999_are_printed_as_numbers_not_a_panic() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_seconds(1_700_000_000_123), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), format!("{} ms after the Unix epoch", i64::MAX));
        assert_eq!(rfc3339_seconds(300_000_000_000_000), "300000000000000 ms after the Unix epoch");
    }
}
