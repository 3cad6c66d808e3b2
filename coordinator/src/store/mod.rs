//! The one place that speaks SQL. SQLite (bundled, WAL) by default; the SQL is kept portable
//! (integers for times, text for words, no SQLite-only syntax outside `open`) so a PostgreSQL backend
//! can sit behind the same methods.

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqlitePool};
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tether_shared::limits;
use tether_shared::proto::{Event, EventKind, LogLine, Span};
use tether_shared::{Lifecycle, SpanStatus, WorkspaceStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("a workspace named '{0}' already exists")]
    NameTaken(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Missing(String),
    #[error("database holds an unknown value in {column}: {value}")]
    Corrupt { column: &'static str, value: String },
    #[error("database schema version {found} is newer than this coordinator knows ({known}); upgrade tether")]
    TooNew { found: i64, known: i64 },
}

type Result<T> = std::result::Result<T, StoreError>;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_ssh.sql"),
    include_str!("../../migrations/0003_build_log_bytes.sql"),
    include_str!("../../migrations/0004_lifecycle_detail.sql"),
    include_str!("../../migrations/0005_owners_are_users.sql"),
    include_str!("../../migrations/0006_logs_by_build.sql"),
];

#[derive(Debug, Clone)]
pub struct WorkspaceRow {
    pub id: i64,
    pub name: String,
    pub owner: Option<String>,
    pub template: String,
    pub provisioner: String,
    pub status: WorkspaceStatus,
    pub status_reason: String,
    pub status_changed_at: i64,
    pub op: Option<String>,
    pub last_error: Option<String>,
    pub build: i64,
    pub build_started_at: Option<i64>,
    pub waiting_since: Option<i64>,
    pub lifecycle: Option<Lifecycle>,
    /// The agent's words for the lifecycle's last change in this build, if it gave any.
    pub lifecycle_detail: Option<String>,
    pub agent_instance: Option<i64>,
    pub events_acked: i64,
    pub logs_acked: i64,
    pub agent_version: Option<String>,
    pub agent_hostname: Option<String>,
    pub last_heartbeat_at: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct SpanRow {
    pub build: i64,
    pub source: String,
    pub stage: String,
    pub name: String,
    pub started_at: i64,
    pub ended_at: i64,
    pub exit_code: Option<i32>,
    pub status: SpanStatus,
}

/// What [`Store::purge_builds`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub builds: u64,
    pub logs: u64,
    pub spans: u64,
    /// Deleted workspaces whose last trace went.
    pub workspaces: u64,
}

#[derive(Debug, Clone)]
pub struct LogRow {
    pub id: i64,
    pub build: i64,
    pub source: String,
    pub stream: String,
    pub at: i64,
    pub line: String,
}

#[derive(Debug, Clone)]
pub struct TransitionRow {
    pub at: i64,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// What applying a batch of agent events changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub acked: u64,
    pub lifecycle: Option<Lifecycle>,
    pub spans: usize,
    /// Spans for a build this workspace does not have, or past `MAX_SPANS_PER_BUILD`.
    pub dropped_spans: usize,
}

#[derive(Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
}

fn word<T: FromStr>(column: &'static str, value: String) -> Result<T> {
    value.parse().map_err(|_| StoreError::Corrupt { column, value })
}

/// Brings the schema up to date, one migration per transaction.
async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").execute(&mut *conn).await?;
    let current: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM schema_version").fetch_one(&mut *conn).await?;
    let current = current.unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::TooNew { found: current, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        for stmt in sql
            .split(';')
            .map(str::trim)
            .filter(|s| !s.lines().all(|l| l.trim().is_empty() || l.trim().starts_with("--")))
        {
            sqlx::query(sqlx::AssertSqlSafe(stmt.to_string())).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)").bind(i as i64 + 1).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

fn workspace(row: &SqliteRow) -> Result<WorkspaceRow> {
    Ok(WorkspaceRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        owner: row.try_get("owner")?,
        template: row.try_get("template")?,
        provisioner: row.try_get("provisioner")?,
        status: word("status", row.try_get("status")?)?,
        status_reason: row.try_get("status_reason")?,
        status_changed_at: row.try_get("status_changed_at")?,
        op: row.try_get("op")?,
        last_error: row.try_get("last_error")?,
        build: row.try_get("build")?,
        build_started_at: row.try_get("build_started_at")?,
        waiting_since: row.try_get("waiting_since")?,
        lifecycle: row.try_get::<Option<String>, _>("lifecycle")?.map(|v| word("lifecycle", v)).transpose()?,
        lifecycle_detail: row.try_get("lifecycle_detail")?,
        agent_instance: row.try_get("agent_instance")?,
        events_acked: row.try_get("events_acked")?,
        logs_acked: row.try_get("logs_acked")?,
        agent_version: row.try_get("agent_version")?,
        agent_hostname: row.try_get("agent_hostname")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        created_at: row.try_get("created_at")?,
    })
}

/// What [`Store::apply_logs`] did with a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogsApplied {
    /// The highest sequence number now stored or deliberately dropped: the agent's acknowledgement.
    pub acked: u64,
    /// Builds whose logs reached the limit with this batch (each once, when its marker is written).
    pub capped: Vec<i64>,
    /// Lines not kept because their build does not exist (never started, or purged).
    pub unknown_build: usize,
}

/// The line that ends a build's logs at the coordinator's limit.
pub fn build_log_marker(max_build_bytes: u64) -> String {
    format!(
        "[tether: this build's logs reached the coordinator's limit of {} (--max-build-log-mib); later lines \
         are not kept]",
        human_mib(max_build_bytes)
    )
}

fn human_mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

impl Store {
    pub async fn open(path: &Path) -> Result<Store> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // Migrations run on a connection of their own, closed before the pool opens: a pooled
        // connection that had read the schema before another one altered a table would prepare
        // `SELECT *` with the old columns, and sqlx, which keeps a statement's columns from its
        // prepare, panics when SQLite re-prepares it with the new ones.
        let mut conn = SqliteConnection::connect_with(&options).await?;
        migrate(&mut conn).await?;
        conn.close().await?;
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        Ok(Store { pool })
    }

    /// A write transaction that takes SQLite's write lock up front. A deferred transaction that
    /// reads and then writes can fail at once with "database is locked" when another writer got
    /// there first; taking the lock first makes it wait its turn (up to the busy timeout).
    pub(crate) async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM settings WHERE key = $1").bind(key).fetch_optional(&self.pool).await?)
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create_workspace(
        &self,
        name: &str,
        owner: Option<&str>,
        template: &str,
        provisioner: &str,
        status: WorkspaceStatus,
        reason: &str,
        token_hash: Option<&str>,
        now: i64,
    ) -> Result<WorkspaceRow> {
        let mut tx = self.write_tx().await?;
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT id FROM workspaces WHERE name = $1 AND status <> 'deleted'")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_some() {
            return Err(StoreError::NameTaken(name.to_string()));
        }
        // In the transaction that inserts, so a user removed meanwhile leaves no name behind for a
        // later user of that name to inherit.
        if let Some(owner) = owner {
            if users::user_id(&mut tx, owner).await?.is_none() {
                return Err(StoreError::Conflict(format!(
                    "user '{owner}' was removed while workspace '{name}' was being created"
                )));
            }
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO workspaces (name, owner, template, provisioner, status, status_reason, status_changed_at, token_hash, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7) RETURNING id",
        )
        .bind(name)
        .bind(owner)
        .bind(template)
        .bind(provisioner)
        .bind(status.as_str())
        .bind(reason)
        .bind(now)
        .bind(token_hash)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO transitions (workspace_id, at, from_status, to_status, reason) VALUES ($1, $2, '', $3, $4)",
        )
        .bind(id)
        .bind(now)
        .bind(status.as_str())
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.workspace_by_id(id).await?.ok_or(StoreError::Db(sqlx::Error::RowNotFound))
    }

    pub async fn workspace(&self, name: &str) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE name = $1 AND status <> 'deleted'")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(workspace).transpose()
    }

    /// The newest workspace of that name, deleted or not.
    pub async fn workspace_any(&self, name: &str) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE name = $1 ORDER BY id DESC LIMIT 1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(workspace).transpose()
    }

    pub async fn workspace_by_id(&self, id: i64) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(workspace).transpose()
    }

    pub async fn workspace_by_token(&self, token_hash: &str) -> Result<Option<WorkspaceRow>> {
        let row = sqlx::query("SELECT * FROM workspaces WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(workspace).transpose()
    }

    /// The workspaces in any of `statuses`; with none, in any status (deleted ones only with
    /// `include_deleted`).
    pub async fn list(&self, statuses: &[WorkspaceStatus], include_deleted: bool) -> Result<Vec<WorkspaceRow>> {
        let rows = match statuses {
            [] if include_deleted => {
                sqlx::query("SELECT * FROM workspaces ORDER BY name, id").fetch_all(&self.pool).await?
            }
            [] => {
                sqlx::query("SELECT * FROM workspaces WHERE status <> 'deleted' ORDER BY name, id")
                    .fetch_all(&self.pool)
                    .await?
            }
            some => {
                // At most the nine statuses: one placeholder each.
                let marks: Vec<String> = (1..=some.len()).map(|i| format!("${i}")).collect();
                let sql = format!("SELECT * FROM workspaces WHERE status IN ({}) ORDER BY name, id", marks.join(", "));
                // Only placeholders go into the text; the statuses are bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for s in some {
                    q = q.bind(s.as_str());
                }
                q.fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(workspace).collect()
    }

    pub async fn counts(&self) -> Result<Vec<(String, i64)>> {
        let rows =
            sqlx::query("SELECT status, COUNT(*) AS n FROM workspaces GROUP BY status").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect()
    }

    /// Moves a workspace to a new status and records the transition.
    pub async fn set_status(
        &self,
        id: i64,
        from: WorkspaceStatus,
        to: WorkspaceStatus,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE workspaces SET status = $1, status_reason = $2, status_changed_at = $3 WHERE id = $4")
            .bind(to.as_str())
            .bind(reason)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO transitions (workspace_id, at, from_status, to_status, reason) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(now)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        // Only the newest are kept, so an agent that comes and goes in a loop cannot grow the table.
        sqlx::query(
            "DELETE FROM transitions WHERE workspace_id = $1 AND id <= (SELECT id FROM transitions
             WHERE workspace_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
        )
        .bind(id)
        .bind(limits::MAX_TRANSITIONS_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts a new build: the next build number, a fresh lifecycle, and (for managed workspaces) the
    /// hash of a fresh agent token.
    pub async fn begin_build(&self, id: i64, token_hash: Option<&str>, now: i64) -> Result<i64> {
        let mut tx = self.write_tx().await?;
        let build: i64 = sqlx::query_scalar(
            "UPDATE workspaces SET build = build + 1, build_started_at = $1, lifecycle = NULL, lifecycle_detail = NULL,
             last_error = NULL,
             token_hash = COALESCE($2, token_hash) WHERE id = $3 RETURNING build",
        )
        .bind(now)
        .bind(token_hash)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO builds (workspace_id, build, started_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(build)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(build)
    }

    pub async fn set_op(&self, id: i64, op: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE workspaces SET op = $1 WHERE id = $2").bind(op).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn set_last_error(&self, id: i64, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE workspaces SET last_error = $1 WHERE id = $2")
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_waiting_since(&self, id: i64, since: Option<i64>) -> Result<()> {
        sqlx::query("UPDATE workspaces SET waiting_since = $1 WHERE id = $2")
            .bind(since)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets the build's lifecycle: the next one the agent reports is taken as it is.
    pub async fn restart_lifecycle(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE workspaces SET lifecycle = NULL, lifecycle_detail = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_token(&self, id: i64, token_hash: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE workspaces SET token_hash = $1 WHERE id = $2")
            .bind(token_hash)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an agent's hello. Acknowledgements carry over only for the same agent instance.
    pub async fn agent_hello(
        &self,
        id: i64,
        instance: u64,
        version: &str,
        hostname: &str,
        now: i64,
    ) -> Result<(u64, u64)> {
        let instance = instance as i64;
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT agent_instance, events_acked, logs_acked FROM workspaces WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let same = row.try_get::<Option<i64>, _>("agent_instance")? == Some(instance);
        let acked =
            if same { (row.try_get::<i64, _>("events_acked")?, row.try_get::<i64, _>("logs_acked")?) } else { (0, 0) };
        sqlx::query(
            "UPDATE workspaces SET agent_instance = $1, events_acked = $2, logs_acked = $3, agent_version = $4,
             agent_hostname = $5, last_heartbeat_at = $6 WHERE id = $7",
        )
        .bind(instance)
        .bind(acked.0)
        .bind(acked.1)
        .bind(version)
        .bind(hostname)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((acked.0 as u64, acked.1 as u64))
    }

    /// Stores lifecycle changes and spans exactly once: events at or below the stored
    /// acknowledgement are skipped, and the acknowledgement moves in the same transaction.
    /// `clock_offset_ms` is added to agent times to put them on the coordinator's clock.
    pub async fn apply_events(
        &self,
        id: i64,
        instance: u64,
        events: &[Event],
        clock_offset_ms: i64,
    ) -> Result<Applied> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "SELECT agent_instance, events_acked, build, lifecycle, lifecycle_detail FROM workspaces WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let mut applied = Applied { acked: row.try_get::<i64, _>("events_acked")? as u64, ..Applied::default() };
        if row.try_get::<Option<i64>, _>("agent_instance")? != Some(instance as i64) {
            // A newer connection of another agent instance took over; this one's events are stale.
            return Ok(applied);
        }
        let build: i64 = row.try_get("build")?;
        let mut lifecycle: Option<Lifecycle> =
            row.try_get::<Option<String>, _>("lifecycle")?.map(|v| word("lifecycle", v)).transpose()?;
        let mut lifecycle_detail: Option<String> = row.try_get("lifecycle_detail")?;
        // Spans kept so far per build this batch touches; `None` for a build with no record.
        let mut spans: BTreeMap<i64, Option<i64>> = BTreeMap::new();
        for e in events {
            if e.seq <= applied.acked {
                continue;
            }
            applied.acked = e.seq;
            let event_build = i64::try_from(e.build).unwrap_or(i64::MAX);
            match &e.kind {
                EventKind::Lifecycle { state, detail, .. } => {
                    let advances = lifecycle.is_none_or(|l| l.may_advance_to(*state));
                    if event_build == build && advances {
                        lifecycle = Some(*state);
                        lifecycle_detail = detail.clone();
                        applied.lifecycle = Some(*state);
                    }
                }
                EventKind::Span(span) => {
                    let count = match spans.get(&event_build) {
                        Some(count) => *count,
                        None => {
                            let count: Option<i64> = sqlx::query_scalar(
                                "SELECT (SELECT COUNT(*) FROM spans s WHERE s.workspace_id = b.workspace_id
                                 AND s.build = b.build) FROM builds b WHERE b.workspace_id = $1 AND b.build = $2",
                            )
                            .bind(id)
                            .bind(event_build)
                            .fetch_optional(&mut *tx)
                            .await?;
                            count
                        }
                    };
                    // A build this workspace does not have, or one with its fill of spans: dropped.
                    match count {
                        Some(n) if n < limits::MAX_SPANS_PER_BUILD => {
                            insert_span(&mut tx, id, event_build, "agent", span, clock_offset_ms).await?;
                            applied.spans += 1;
                            spans.insert(event_build, Some(n + 1));
                        }
                        _ => {
                            applied.dropped_spans += 1;
                            spans.insert(event_build, count);
                        }
                    }
                }
            }
        }
        sqlx::query("UPDATE workspaces SET events_acked = $1, lifecycle = $2, lifecycle_detail = $3 WHERE id = $4")
            .bind(applied.acked as i64)
            .bind(lifecycle.map(|l| l.as_str()))
            .bind(lifecycle_detail)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Stores log lines exactly once, like [`Store::apply_events`], and returns what became of them.
    /// Each build keeps at most `max_build_bytes` of lines: the line that would cross the limit is
    /// replaced by one marker saying so, and the build's later lines are acknowledged but not kept.
    /// Lines for a build this workspace does not have (never started, or purged) are dropped too.
    pub async fn apply_logs(
        &self,
        id: i64,
        instance: u64,
        lines: &[LogLine],
        clock_offset_ms: i64,
        max_build_bytes: u64,
    ) -> Result<LogsApplied> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT agent_instance, logs_acked FROM workspaces WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let mut applied = LogsApplied { acked: row.try_get::<i64, _>("logs_acked")? as u64, ..LogsApplied::default() };
        if row.try_get::<Option<i64>, _>("agent_instance")? != Some(instance as i64) {
            return Ok(applied);
        }
        let cap = max_build_bytes.min(i64::MAX as u64 - 1) as i64;
        // Bytes kept so far per build this batch touches; `None` for a build with no record.
        let mut kept: BTreeMap<i64, Option<i64>> = BTreeMap::new();
        for l in lines {
            if l.seq <= applied.acked {
                continue;
            }
            applied.acked = l.seq;
            let build = i64::try_from(l.build).unwrap_or(i64::MAX);
            let used = match kept.get(&build) {
                Some(used) => *used,
                None => {
                    let bytes: Option<i64> =
                        sqlx::query_scalar("SELECT log_bytes FROM builds WHERE workspace_id = $1 AND build = $2")
                            .bind(id)
                            .bind(build)
                            .fetch_optional(&mut *tx)
                            .await?;
                    kept.insert(build, bytes);
                    bytes
                }
            };
            let Some(used) = used else {
                applied.unknown_build += 1;
                continue;
            };
            // `cap + 1` marks a build whose marker is written: everything after it is dropped.
            if used > cap {
                continue;
            }
            // What the row costs, not only its text: empty lines with long script names add up too.
            let len = (l.line.len() + l.script.len() + limits::LOG_ROW_OVERHEAD) as i64;
            let (line, used) = if used + len > cap {
                applied.capped.push(build);
                (build_log_marker(max_build_bytes), cap + 1)
            } else {
                (l.line.clone(), used + len)
            };
            kept.insert(build, Some(used));
            sqlx::query(
                "INSERT INTO logs (workspace_id, build, source, stream, at, line) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(build)
            .bind(&l.script)
            .bind(l.stream.as_str())
            .bind(l.at_ms.saturating_add(clock_offset_ms))
            .bind(line)
            .execute(&mut *tx)
            .await?;
        }
        for (build, used) in kept {
            if let Some(used) = used {
                sqlx::query("UPDATE builds SET log_bytes = $1 WHERE workspace_id = $2 AND build = $3")
                    .bind(used)
                    .bind(id)
                    .bind(build)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("UPDATE workspaces SET logs_acked = $1 WHERE id = $2")
            .bind(applied.acked as i64)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// A span the coordinator itself measured (provisioning).
    pub async fn add_span(&self, id: i64, build: i64, span: &Span) -> Result<()> {
        let mut tx = self.write_tx().await?;
        insert_span(&mut tx, id, build, "coordinator", span, 0).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Log lines the coordinator itself captured (provisioning output).
    pub async fn add_logs(&self, id: i64, build: i64, source: &str, lines: &[(String, String, i64)]) -> Result<()> {
        let mut tx = self.write_tx().await?;
        for (stream, line, at) in lines {
            sqlx::query(
                "INSERT INTO logs (workspace_id, build, source, stream, at, line) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(build)
            .bind(source)
            .bind(stream)
            .bind(at)
            .bind(line)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn spans(&self, id: i64, build: i64) -> Result<Vec<SpanRow>> {
        let rows = sqlx::query(
            "SELECT build, source, stage, name, started_at, ended_at, exit_code, status FROM spans
             WHERE workspace_id = $1 AND build = $2 ORDER BY started_at, id",
        )
        .bind(id)
        .bind(build)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SpanRow {
                    build: r.try_get("build")?,
                    source: r.try_get("source")?,
                    stage: r.try_get("stage")?,
                    name: r.try_get("name")?,
                    started_at: r.try_get("started_at")?,
                    ended_at: r.try_get("ended_at")?,
                    exit_code: r.try_get::<Option<i64>, _>("exit_code")?.map(|c| c as i32),
                    status: word("span status", r.try_get("status")?)?,
                })
            })
            .collect()
    }

    /// Deletes the logs, spans and record of every build that started before `before` (Unix ms)
    /// and is not its workspace's current build (a deleted workspace has none), `batch` rows per
    /// statement; then what is left of workspaces deleted before `before`: their transitions,
    /// grants and row (nothing shows a deleted workspace any more).
    pub async fn purge_builds(&self, before: i64, batch: i64) -> Result<Purged> {
        // The builds to purge: started before the cut-off and no longer their workspace's current.
        const LOGS: &str = "DELETE FROM logs WHERE id IN (SELECT l.id FROM logs l
             JOIN builds b ON b.workspace_id = l.workspace_id AND b.build = l.build
             JOIN workspaces w ON w.id = b.workspace_id
             WHERE b.started_at < $1 AND (b.build < w.build OR w.status = 'deleted') LIMIT $2)";
        const SPANS: &str = "DELETE FROM spans WHERE rowid IN (SELECT s.rowid FROM spans s
             JOIN builds b ON b.workspace_id = s.workspace_id AND b.build = s.build
             JOIN workspaces w ON w.id = b.workspace_id
             WHERE b.started_at < $1 AND (b.build < w.build OR w.status = 'deleted') LIMIT $2)";
        const BUILDS: &str = "DELETE FROM builds WHERE rowid IN (SELECT b.rowid FROM builds b
             JOIN workspaces w ON w.id = b.workspace_id
             WHERE b.started_at < $1 AND (b.build < w.build OR w.status = 'deleted') LIMIT $2)";
        // Deleted workspaces, once deleted before the cut-off: whatever their builds left (lines of
        // a build with no record), their history and grants, then the row itself.
        const GONE: &str = "SELECT id FROM workspaces WHERE status = 'deleted' AND status_changed_at < $1";
        const GONE_LOGS: &str = "DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE workspace_id IN
             (SELECT id FROM workspaces WHERE status = 'deleted' AND status_changed_at < $1)
             AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.workspace_id = logs.workspace_id) LIMIT $2)";
        const GONE_SPANS: &str = "DELETE FROM spans WHERE rowid IN (SELECT rowid FROM spans WHERE workspace_id IN
             (SELECT id FROM workspaces WHERE status = 'deleted' AND status_changed_at < $1)
             AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.workspace_id = spans.workspace_id) LIMIT $2)";
        const GONE_TRANSITIONS: &str = "DELETE FROM transitions WHERE id IN (SELECT id FROM transitions
             WHERE workspace_id IN (SELECT id FROM workspaces WHERE status = 'deleted' AND status_changed_at < $1)
             LIMIT $2)";
        const GONE_GRANTS: &str = "DELETE FROM grants WHERE rowid IN (SELECT rowid FROM grants
             WHERE workspace_id IN (SELECT id FROM workspaces WHERE status = 'deleted' AND status_changed_at < $1)
             LIMIT $2)";
        const GONE_ROWS: &str = "DELETE FROM workspaces WHERE id IN (SELECT id FROM workspaces w
             WHERE w.status = 'deleted' AND w.status_changed_at < $1
             AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.workspace_id = w.id)
             AND NOT EXISTS (SELECT 1 FROM logs l WHERE l.workspace_id = w.id)
             AND NOT EXISTS (SELECT 1 FROM spans s WHERE s.workspace_id = w.id)
             AND NOT EXISTS (SELECT 1 FROM transitions t WHERE t.workspace_id = w.id)
             AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.workspace_id = w.id) LIMIT $2)";
        // Logs and spans first: a build's record goes last, so an interrupted purge is finished by
        // the next one; a workspace's row goes after everything that refers to it.
        let mut logs = self.delete_in_batches(LOGS, before, batch).await?;
        let mut spans = self.delete_in_batches(SPANS, before, batch).await?;
        let builds = self.delete_in_batches(BUILDS, before, batch).await?;
        let gone: Vec<i64> = sqlx::query_scalar(GONE).bind(before).fetch_all(&self.pool).await?;
        let mut workspaces = 0;
        if !gone.is_empty() {
            logs += self.delete_in_batches(GONE_LOGS, before, batch).await?;
            spans += self.delete_in_batches(GONE_SPANS, before, batch).await?;
            self.delete_in_batches(GONE_TRANSITIONS, before, batch).await?;
            self.delete_in_batches(GONE_GRANTS, before, batch).await?;
            workspaces = self.delete_in_batches(GONE_ROWS, before, batch).await?;
        }
        Ok(Purged { builds, logs, spans, workspaces })
    }

    /// Runs `sql`, a `DELETE` bound to a cut-off (`$1`) and a row limit (`$2`), until it deletes
    /// fewer than `batch` rows: no statement holds the write lock for long. Returns the total.
    pub(crate) async fn delete_in_batches(&self, sql: &'static str, before: i64, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let done = sqlx::query(sql).bind(before).bind(batch).execute(&self.pool).await?.rows_affected();
            total += done;
            if done < batch as u64 {
                return Ok(total);
            }
        }
    }

    pub async fn build_started_at(&self, id: i64, build: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT started_at FROM builds WHERE workspace_id = $1 AND build = $2")
            .bind(id)
            .bind(build)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Log lines of one build after `after`, oldest first.
    pub async fn logs(&self, id: i64, build: i64, after: i64, limit: i64, source: Option<&str>) -> Result<Vec<LogRow>> {
        let rows = sqlx::query(
            "SELECT id, build, source, stream, at, line FROM logs
             WHERE workspace_id = $1 AND build = $5 AND id > $2 AND ($3 IS NULL OR source = $3) ORDER BY id LIMIT $4",
        )
        .bind(id)
        .bind(after)
        .bind(source)
        .bind(limit)
        .bind(build)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogRow {
                    id: r.try_get("id")?,
                    build: r.try_get("build")?,
                    source: r.try_get("source")?,
                    stream: r.try_get("stream")?,
                    at: r.try_get("at")?,
                    line: r.try_get("line")?,
                })
            })
            .collect()
    }

    pub async fn transitions(&self, id: i64, limit: i64) -> Result<Vec<TransitionRow>> {
        let rows = sqlx::query(
            "SELECT at, from_status, to_status, reason FROM
             (SELECT * FROM transitions WHERE workspace_id = $1 ORDER BY id DESC LIMIT $2) AS t ORDER BY id",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TransitionRow {
                    at: r.try_get("at")?,
                    from: r.try_get("from_status")?,
                    to: r.try_get("to_status")?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    /// Persists last-seen times for many workspaces in one transaction (called periodically, not
    /// per heartbeat).
    pub async fn touch_heartbeats(&self, seen: &[(i64, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        for (id, at) in seen {
            // Never backwards: a reconnected agent's hello may have written a newer time already.
            sqlx::query(
                "UPDATE workspaces SET last_heartbeat_at = MAX(COALESCE(last_heartbeat_at, 0), $1) WHERE id = $2",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_span(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: i64,
    build: i64,
    source: &str,
    span: &Span,
    offset: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO spans (workspace_id, build, source, stage, name, started_at, ended_at, exit_code, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(build)
    .bind(source)
    .bind(&span.stage)
    .bind(&span.name)
    .bind(span.started_at_ms + offset)
    .bind(span.ended_at_ms.max(span.started_at_ms) + offset)
    .bind(span.exit_code.map(i64::from))
    .bind(span.status.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// A trivial query, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Flushes and closes the database (on shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

mod backup;
mod users;
pub use backup::known_schema_version;
pub use users::{AuditRow, UserRow};

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::proto::LogStream;

    fn line(seq: u64, build: u64, text: &str) -> LogLine {
        LogLine { seq, build, script: "setup".into(), stream: LogStream::Stdout, at_ms: 1_000, line: text.into() }
    }

    async fn store_with_build() -> (tempfile::TempDir, Store, WorkspaceRow, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        let w =
            store.create_workspace("w", None, "", "external", WorkspaceStatus::Starting, "", None, 0).await.unwrap();
        let build = store.begin_build(w.id, None, 0).await.unwrap() as u64;
        store.agent_hello(w.id, 7, "v", "h", 0).await.unwrap();
        (dir, store, w, build)
    }

    #[tokio::test]
    async fn a_build_keeps_logs_up_to_the_limit_then_one_marker() {
        let (_dir, store, w, build) = store_with_build().await;
        // Each row counts its text, its script's name ("setup") and the row overhead.
        let row = ("setup".len() + limits::LOG_ROW_OVERHEAD) as u64;
        let cap = 2 * row + 10;

        // 4 + 6 bytes of text fit exactly; the next line is replaced by the marker; later lines are
        // acknowledged and dropped; a build that does not exist keeps nothing.
        let batch = [line(1, build, "abcd"), line(2, build, "efghij"), line(3, build, "k"), line(4, build + 5, "zz")];
        let applied = store.apply_logs(w.id, 7, &batch, 0, cap).await.unwrap();
        assert_eq!(applied, LogsApplied { acked: 4, capped: vec![build as i64], unknown_build: 1 });
        let applied = store.apply_logs(w.id, 7, &[line(5, build, "l")], 0, cap).await.unwrap();
        assert_eq!(applied, LogsApplied { acked: 5, ..LogsApplied::default() });
        // A resent batch is not stored twice.
        let applied = store.apply_logs(w.id, 7, &batch, 0, cap).await.unwrap();
        assert_eq!(applied.acked, 5);
        let kept: Vec<String> =
            store.logs(w.id, build as i64, 0, 100, None).await.unwrap().into_iter().map(|l| l.line).collect();
        assert_eq!(kept, ["abcd", "efghij", &build_log_marker(cap)]);
        assert_eq!(
            build_log_marker(64 << 20),
            "[tether: this build's logs reached the coordinator's limit of 64 MiB (--max-build-log-mib); later \
             lines are not kept]"
        );

        // The next build starts from nothing, and empty lines count too.
        let next = store.begin_build(w.id, None, 1).await.unwrap() as u64;
        let empties: Vec<LogLine> = (6..10).map(|seq| line(seq, next, "")).collect();
        let applied = store.apply_logs(w.id, 7, &empties, 0, 3 * row).await.unwrap();
        assert_eq!(applied, LogsApplied { acked: 9, capped: vec![next as i64], unknown_build: 0 });
    }

    #[tokio::test]
    async fn a_workspace_or_grant_for_a_user_removed_meanwhile_is_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        let create = |owner| store.create_workspace("w", owner, "", "external", WorkspaceStatus::Starting, "", None, 0);
        let refused = create(Some("gone")).await.unwrap_err();
        assert_eq!(refused.to_string(), "user 'gone' was removed while workspace 'w' was being created");
        let w = create(None).await.unwrap();
        assert!(matches!(store.grant(w.id, "gone", 0).await, Err(StoreError::Missing(m)) if m == "no user 'gone'"));
        assert!(store.grants(w.id).await.unwrap().is_empty());
    }

    fn span_event(seq: u64, build: u64) -> Event {
        let span = Span {
            stage: "script".into(),
            name: format!("s{seq}"),
            started_at_ms: 1,
            ended_at_ms: 2,
            exit_code: Some(0),
            status: SpanStatus::Ok,
        };
        Event { seq, build, kind: EventKind::Span(span) }
    }

    #[tokio::test]
    async fn spans_are_kept_for_builds_that_exist_up_to_the_limit() {
        let (_dir, store, w, build) = store_with_build().await;
        let batch = [span_event(1, build), span_event(2, build + 1), span_event(3, u64::MAX)];
        let applied = store.apply_events(w.id, 7, &batch, 0).await.unwrap();
        assert_eq!((applied.acked, applied.spans, applied.dropped_spans), (3, 1, 2));
        assert_eq!(store.spans(w.id, build as i64).await.unwrap().len(), 1);

        let limit = limits::MAX_SPANS_PER_BUILD as u64;
        // One is kept already: limit - 1 more fit, the last 10 do not.
        let flood: Vec<Event> = (4..4 + limit - 1 + 10).map(|seq| span_event(seq, build)).collect();
        let applied = store.apply_events(w.id, 7, &flood, 0).await.unwrap();
        assert_eq!(applied.spans as u64, limit - 1);
        assert_eq!(applied.dropped_spans, 10);
        assert_eq!(store.spans(w.id, build as i64).await.unwrap().len() as u64, limit);
    }

    #[tokio::test]
    async fn a_deleted_workspace_is_purged_whole_once_deleted_before_the_cut_off() {
        let (_dir, store, w, build) = store_with_build().await;
        store.apply_logs(w.id, 7, &[line(1, build, "hello")], 0, u64::MAX).await.unwrap();
        store.apply_events(w.id, 7, &[span_event(1, build)], 0).await.unwrap();
        store.add_user("bob", &[], "hash", 0).await.unwrap();
        store.grant(w.id, "bob", 0).await.unwrap();
        store.set_status(w.id, WorkspaceStatus::Starting, WorkspaceStatus::Deleted, "deleted", 50).await.unwrap();
        let count = |sql: &'static str| {
            let store = &store;
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&store.pool).await.unwrap() }
        };
        let left = || async {
            (
                count("SELECT COUNT(*) FROM transitions").await,
                count("SELECT COUNT(*) FROM grants").await,
                count("SELECT COUNT(*) FROM workspaces").await,
            )
        };
        // Deleted after the cut-off: its build started before, so that goes, but its record stays.
        let purged = store.purge_builds(10, 2).await.unwrap();
        assert_eq!((purged.builds, purged.logs, purged.spans, purged.workspaces), (1, 1, 1, 0));
        assert_eq!(left().await, (2, 1, 1));
        // Deleted before it: nothing is left.
        let purged = store.purge_builds(100, 2).await.unwrap();
        assert_eq!(purged.workspaces, 1);
        assert_eq!(left().await, (0, 0, 0));
    }

    #[tokio::test]
    async fn only_the_newest_status_changes_are_kept() {
        let (_dir, store, w, _) = store_with_build().await;
        let n = limits::MAX_TRANSITIONS_KEPT + 5;
        for i in 0..n {
            let (from, to) = if i % 2 == 0 {
                (WorkspaceStatus::Starting, WorkspaceStatus::Running)
            } else {
                (WorkspaceStatus::Running, WorkspaceStatus::Starting)
            };
            store.set_status(w.id, from, to, &format!("change {i}"), i).await.unwrap();
        }
        let kept = store.transitions(w.id, 10 * n).await.unwrap();
        assert_eq!(kept.len() as i64, limits::MAX_TRANSITIONS_KEPT);
        assert_eq!(kept.last().unwrap().reason, format!("change {}", n - 1));
    }
}
